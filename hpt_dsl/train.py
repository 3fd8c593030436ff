"""The training loop, and only the loop.

One step:

    questions  = the next train.questions questions (a seeded permutation per pass)
    rollouts   = engine.generate(prompts, n = rollout.n)             (not for pure SFT)
    rewards    = reward(decoded rollout, answer); demos scored too     (verifier, 0/1)
                 DAPO (hpt_dsl.sampling): with rollout.dynamic_sampling, more rounds of
                 questions until train.questions of them have rewards that differ; with
                 rollout.overlong_cache, a length penalty added to the rewards
    batch      = rollout rows + demonstration rows, grouped by question
    prep       = program.prepare(...)  -> per-question stats, gate weights, advantages
    log-probs  = pi_old (only when epochs > 1, mini_batches > 1 or engine log-probs are
                 not used), pi_ref (only with a KL term), critic values (only adv=gae),
                 each only over the rows the loss gives weight
    update     = learner.update(mini-batch, program, prep) for each epoch and mini-batch;
                 the first mini-batch updates from pi_old itself (old_is_current: its
                 ratio is exactly 1, and with one epoch the pi_old pass skips its rows), so
                 its rows whose advantage is 0 everywhere are not forwarded (``_silence``)
    sync       = engine.load_weights(learner.named_parameters())
    then metrics, a periodic evaluation on the held-out split, a periodic checkpoint.

Several processes (a launcher's ``RANK`` / ``WORLD_SIZE``; the DeepSpeed learner): each
process takes its block of the step's questions (``dist.shard``) and samples, scores and
builds the rows of those only; ``dist.prepare`` computes every statistic and normaliser over
the whole step, and the learner all-reduces the gradients, so an update is the one-process
update. Optimizer mini-batches are drawn from the step's question indices, the same split
in any number of processes. The first process alone evaluates and writes logs, metrics and
the checkpoints' shared files; a Ctrl-C stops every process after the same step.

``run_recipe`` wraps it: load the recipe, prepare the run folder, resume, report. The run
folder's own files are ``hpt_dsl.runfolder``'s, Ctrl-C and CPU threads ``hpt_dsl.process``'s,
the figures at the end ``hpt_dsl.plot``'s.
Exit conditions are exceptions the command line maps to exit codes: ``RunFault`` (3: too
many non-finite steps in a row, a write that failed, another process that stopped; see
``hpt_dsl.faults``), ``SetupError`` and ``CheckpointError`` (2: bad input, no complete
checkpoint to resume from) and ``RunInterrupted`` (130: Ctrl-C, after a checkpoint).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from hpt_dsl import checkpoint as ckpt
from hpt_dsl import dist, errors, runfolder
from hpt_dsl.batch import TrainBatch, build_train_batch, used_rows
from hpt_dsl.data import Task, load_task
from hpt_dsl.data.verify import score_batch
from hpt_dsl.faults import RunFault, is_disk_error, is_lost_peer, lost_peer, space_warning, write_fault
from hpt_dsl.malloc import keep_freed_memory
from hpt_dsl.plot import draw_run_figures
from hpt_dsl.process import RunInterrupted, StopFlag, use_cpu_threads
from hpt_dsl.process import cpu_threads as cpu_threads  # the threads a run uses (hpt_dsl.process)
from hpt_dsl.prompting import PromptCache
from hpt_dsl.recipe import Recipe
from hpt_dsl.report import Reporter, truncate_metrics
from hpt_dsl.rollout.base import Rollout, SamplingParams
from hpt_dsl.sampling import Filled, fill_share, flatten, groups_of, overlong_penalty, round_questions, zero_variance
from hpt_dsl.trackers import Trackers

SetupError = errors.SetupError
"""Bad input found before training starts (``hpt_dsl.errors.SetupError``, exit code 2)."""


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    wall_s: float
    first_eval: dict[str, Any] | None
    last_eval: dict[str, Any] | None


# ----- question order -------------------------------------------------------------------


def step_questions(n_train: int, per_step: int, step: int, seed: int) -> list[int]:
    """Train question indices of ``step``: consecutive slices of a seeded permutation per
    pass over the data, so the order is a function of (seed, step) and resume needs no state."""
    out: list[int] = []
    pos = step * per_step
    while len(out) < per_step:
        epoch, offset = divmod(pos, n_train)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n_train, generator=g).tolist()
        take = perm[offset : offset + per_step - len(out)]
        out += take
        pos += len(take)
    return out


def sample_seed(seed: int, step: int, rank: int = 0, round_: int = 0) -> int:
    """The rollout sampler's seed of a step: a function of (seed, step), and of the process
    in a multi-process run, so that processes draw different samples for their questions,
    and of the sampling round under dynamic sampling (``hpt_dsl.sampling``)."""
    return seed * 1_000_003 + step + rank * 104_729_000_003 + round_ * 15_485_863_000_029


def start_processes(settings: Any) -> None:
    """Before any model is loaded: check the DeepSpeed config (a wrong one costs a second,
    not a model load) and, with several processes, start their process group."""
    world = dist.world_size()
    if settings.rollout.engine == "vllm":
        from hpt_dsl.rollout.colocate import tensor_parallel_error

        if why := tensor_parallel_error(settings.rollout.tensor_parallel_size, world):
            raise SetupError(why)
    if settings.learner.engine != "deepspeed":
        if world > 1:
            raise SetupError(
                f"this run has {world} processes (WORLD_SIZE = {world}) but learner.engine = "
                f"\"{settings.learner.engine}\"; several processes need learner.engine = \"deepspeed\""
            )
        return
    from hpt_dsl.learner.deepspeed import import_deepspeed, init_distributed
    from hpt_dsl.learner.ds_config import preflight

    try:
        import_deepspeed()
    except ImportError:
        raise SetupError(
            "learner.engine = \"deepspeed\" needs DeepSpeed, which is not installed in this environment; "
            "fix: pip install 'deepspeed>=0.19.8,<0.20' (or pip install -e '.[deepspeed]')"
        ) from None
    preflight(settings)
    if world > 1:
        init_distributed()


# ----- one step ---------------------------------------------------------------------------


class Trainer:
    """The loop's state: recipe, program, model, engine, learner, data, run folder."""

    def __init__(self, recipe: Recipe, run_dir: Path, reporter: Reporter) -> None:
        from transformers.utils import logging as hf_logging

        from hpt_dsl.estimator import compile_recipe
        from hpt_dsl.learner.base import make_learner
        from hpt_dsl.models import load_model
        from hpt_dsl.rollout.base import make_rollout_engine

        hf_logging.disable_progress_bar()  # the run has its own live view
        if not torch.cuda.is_available():  # DeepSpeed's own choice on a CPU, named, so that a library
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # importing it (accelerate) prints no warning

        self.recipe = recipe
        self.s = recipe.settings
        self.needs = recipe.needs
        self.run_dir = run_dir
        self.reporter = reporter
        self.program = compile_recipe(recipe)
        self.task: Task = load_task(self.s)
        if not self.task.train:
            raise SetupError(f"data.train '{self.s.data.train}' has no questions; give a file with rows")
        self.shard = dist.shard(self.s.train.questions)  # this process's questions of each step
        torch.manual_seed(self.s.train.seed)
        # the first process builds (or converts) the model files; then the others read them
        loaded = load_model(self.s.model, self.s.train.seed, run_dir) if dist.is_main() else None
        dist.barrier()
        model, self.tokenizer = loaded or load_model(self.s.model, self.s.train.seed, run_dir)
        if torch.cuda.is_available() and self.s.learner.engine != "deepspeed":
            model = model.to("cuda")  # DeepSpeed places the model itself (ZeRO-3: one parameter at a time)
        self.prompts = PromptCache(self.tokenizer, self.s.model)
        self.learner = make_learner(recipe, model, self.tokenizer)
        self.device = next(self.learner.model.parameters()).device
        self.engine = make_rollout_engine(self.s, self.learner.model, self.tokenizer)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.demo_rewards: dict[int, float] = {}
        self.bad_steps = 0
        self._generated, self._scoring_s = 0, 0.0  # of the current step's rollouts

    # ----- data of one step --------------------------------------------------------------------

    def _batch(self, step: int) -> tuple[TrainBatch, dict[str, float]]:
        s, needs = self.s, self.needs
        t0 = time.perf_counter()
        idx = step_questions(len(self.task.train), s.train.questions, step, s.train.seed)
        questions = [self.task.train[i] for i in idx[self.shard.start : self.shard.stop]]
        rollouts: list[Rollout] = []
        scores: list[float] = []
        filled = None
        self._generated, self._scoring_s = 0, 0.0  # over every sampling round
        if needs.rollouts and s.rollout.dynamic_sampling:
            filled = fill_share(lambda r, need: self._round(idx, step, r, need), len(questions),
                                s.rollout.max_sampling_rounds, lambda need: dist.all_reduce_max(int(need)) > 0)
            questions, rollouts, scores = flatten(filled.groups)
        elif needs.rollouts:
            rollouts, scores = self._generate(questions, step, 0)
        prompts = [self.prompts.prompt(q) for q in questions]
        t1 = time.perf_counter()
        penalties = [overlong_penalty(len(r.token_ids), s.rollout.max_new_tokens, s.rollout.overlong_cache,
                                      s.rollout.overlong_penalty) for r in rollouts]  # fmt: skip
        rewards = [x + p for x, p in zip(scores, penalties, strict=True)]
        demos = [self.prompts.demo(q) if needs.demos else None for q in questions]
        demo_rewards = [self._demo_reward(q) if d is not None else 0.0 for q, d in zip(questions, demos, strict=True)]
        batch = build_train_batch(prompts, rollouts, rewards, demos, demo_rewards, self.pad_id)
        # out of the loss: the zero-variance groups that complete a short share, truncated responses
        out = torch.isin(batch.group_ids, torch.arange(filled.trained, len(questions))) if filled else None
        if s.rollout.mask_truncated and rollouts:
            cut = torch.tensor([r.finish_reason == "length" for r in rollouts] + [False] * (len(batch) - len(rollouts)))
            out = cut if out is None else out | cut
        if out is not None:
            batch = batch.exclude(out)
        batch = batch.to(self.device)
        t2 = time.perf_counter()
        groups = groups_of(questions, rollouts, scores)[: filled.trained if filled else None] if rollouts else []
        trained = sum(len(g.rollouts) for g in groups)  # the rollouts of the groups the step trains on
        total = dist.sum_metrics(  # over the questions of every process
            {
                "rollouts": float(trained),
                "reward": float(sum(scores[:trained])),  # the verifier's scores; shaping is reward/overlong
                "correct": float(sum(r >= 0.5 for r in scores[:trained])),
                "tokens": float(sum(len(r.token_ids) for r in rollouts[:trained])),
                "generated": float(self._generated),
                "truncated": float(sum(r.finish_reason == "length" for r in rollouts[:trained])),
                "demos": float(sum(d is not None for d in demos)),
                "rows": float(len(batch)),
                "groups": float(len(groups)),
                "zero_var": float(sum(zero_variance(g.scores) for g in groups)),
                "overlong": float(sum(penalties[:trained])),
                **(_sampling_counts(filled) if filled else {}),
            }
        )
        n = max(total["rollouts"], 1.0)
        gen_s = t1 - t0 - self._scoring_s
        info = {
            "reward/mean": total["reward"] / n,
            "acc": total["correct"] / n,
            "response_length": total["tokens"] / n,
            "truncated": total["truncated"] / n,
            "demos": total["demos"],
            "rows": int(total["rows"]),
            "tokens_per_s": total["generated"] / gen_s if rollouts and gen_s > 0 else 0.0,
            "time/rollout": gen_s,
            "time/reward": t2 - t1 + self._scoring_s,
        }
        if needs.rollouts:
            info["groups/zero_var"] = total["zero_var"] / max(total["groups"], 1.0)
        if s.rollout.overlong_cache and rollouts:
            info["reward/overlong"] = total["overlong"] / n
        if filled is not None:
            info.update({f"sampling/{k}": total[k] for k in ("drawn", "dropped", "surplus", "short")})
            info["sampling/acc"] = total["drawn_correct"] / max(total["drawn_rollouts"], 1.0)
            info["sampling/rounds"] = filled.rounds  # the same in every process
        return batch, info

    def _generate(self, questions: list[Any], step: int, round_: int) -> tuple[list[Rollout], list[float]]:
        """This process's rollouts of ``questions`` in sampling round ``round_``, and their
        verifier scores."""
        s = self.s
        seeded = self.engine.prompt_seeded  # seeds by the prompt's place in the step, not by the process
        params = SamplingParams(
            n=s.rollout.n,
            temperature=s.rollout.temperature,
            top_p=s.rollout.top_p,
            top_k=s.rollout.top_k,
            max_new_tokens=s.rollout.max_new_tokens,
            seed=sample_seed(s.train.seed, step, 0 if seeded else dist.rank(), round_),
            first_prompt=self.shard.start,
        )
        rollouts = self.engine.generate([self.prompts.prompt(q) for q in questions], params)
        texts = [self.tokenizer.decode(list(r.token_ids), skip_special_tokens=True) for r in rollouts]
        answers = [questions[r.prompt_index].answer for r in rollouts]
        t = time.perf_counter()
        scores = score_batch(self.task.reward_fn, texts, answers)
        self._scoring_s += time.perf_counter() - t
        self._generated += sum(len(r.token_ids) for r in rollouts)
        return rollouts, scores

    def _round(self, first: list[int], step: int, round_: int, need: bool) -> list[Any]:
        """Dynamic sampling: this process's groups of sampling round ``round_`` of ``step``
        (none when ``need`` is False: the process only joins the round's sampling call)."""
        idx = round_questions(first, len(self.task.train), step, self.s.train.seed, round_)
        questions = [self.task.train[i] for i in idx[self.shard.start : self.shard.stop]] if need else []
        return groups_of(questions, *self._generate(questions, step, round_))

    def _demo_reward(self, q: Any) -> float:
        if q.id not in self.demo_rewards:
            self.demo_rewards[q.id] = float(score_batch(self.task.reward_fn, [q.demo], [q.answer])[0])
        return self.demo_rewards[q.id]

    def _prepare(self, batch: TrainBatch, step: int, **passes: Any) -> Any:
        """The estimator's prepare over the whole step (all processes), for this one's rows."""
        return dist.prepare(
            self.program,
            response_mask=batch.response_mask,
            rewards=batch.rewards,
            group_ids=batch.group_ids,
            is_demo=batch.is_demo,
            rollout_logprobs=batch.rollout_logprobs,
            step=step,
            **passes,
        )

    def _first_update_on_policy(self) -> bool:
        """Whether the step's first optimizer update may take the live policy as pi_old: pi_old
        is the learner's own (not the engine's log-probs), or nothing reads it (no estimator uses
        it and no truncated importance weight weighs with it)."""
        r = self.s.rollout
        return r.old_logprobs == "learner" or (not self.needs.old_logprobs and r.tis_cap is None)

    def _passes(
        self, batch: TrainBatch, step: int, old_is_current: bool, skip: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """The no-grad passes the recipe needs, over the rows its loss uses only; the pi_old pass
        also leaves out the rows ``skip`` (those of the step's first optimizer step, at which the
        live policy is pi_old: their ratio is exactly 1 and their pi_old is never read)."""
        s, needs = self.s, self.needs
        want_old = needs.old_logprobs and not old_is_current
        if not (want_old or needs.ref_model or needs.critic):
            return {"old_is_current": old_is_current}
        zeros = torch.zeros_like(batch.response_mask)
        # which rows carry weight does not depend on these passes: find them with placeholders
        probe = self._prepare(
            batch, step, old_logprobs=zeros, ref_logprobs=zeros, values=zeros, old_is_current=old_is_current
        )
        rows = used_rows(probe)
        sub = batch.select(rows)

        rows = rows.to(self.device)

        def scatter(x: torch.Tensor, at: torch.Tensor = rows) -> torch.Tensor:
            """The pass's values ``x`` of the rows ``at`` in a zero tensor of the batch's shape."""
            out = torch.zeros_like(batch.response_mask)
            out[at, : x.shape[1]] = x.to(out.device)
            return out

        passes: dict[str, Any] = {"old_is_current": old_is_current}
        if want_old:
            if s.rollout.old_logprobs == "engine" and batch.rollout_logprobs is not None:
                passes["old_logprobs"] = batch.rollout_logprobs
            elif skip is not None:
                kept = rows[~torch.isin(rows, skip.to(rows.device))]
                passes["old_logprobs"] = scatter(self.learner.logprobs(batch.select(kept.cpu()), "policy"), kept)
            else:
                passes["old_logprobs"] = scatter(self.learner.logprobs(sub, "policy"))
        if needs.ref_model:
            passes["ref_logprobs"] = scatter(self.learner.logprobs(sub, "ref"))
        if needs.critic:
            passes["values"] = scatter(self.learner.values(sub))
        return passes

    def _step_moments(self, batch: TrainBatch, step: int, passes: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """The whitening moments of the advantages standardised over the whole step (PPO's
        whitened GAE, REINFORCE++, batch_norm), taken once over the step's rows of every
        process, so that each optimizer mini-batch whitens with the step's statistics."""
        if not self.program.step_whitened or self.s.train.mini_batches == 1:
            return None
        return self._prepare(batch, step, **passes).moments

    def _mini_batches(self, batch: TrainBatch, step: int, epoch: int) -> list[torch.Tensor]:
        """Row indices (this process's) of each optimizer mini-batch: whole questions (advantage
        groups stay together), the step's questions shuffled per epoch from the seed and cut
        into train.mini_batches parts. A part without rows in any process is left out."""
        k = self.s.train.mini_batches
        if k == 1:
            return [torch.arange(len(batch))]
        g = torch.Generator().manual_seed(self.s.train.seed * 7919 + step * 31 + epoch)
        order = torch.randperm(self.s.train.questions, generator=g)
        question = batch.group_ids.cpu() + self.shard.start  # the row's question in the step
        parts = [torch.nonzero(torch.isin(question, part), as_tuple=False).squeeze(1) for part in order.chunk(k)]
        rows = dist.all_reduce_sum(torch.tensor([float(p.numel()) for p in parts]))
        return [p for p, n in zip(parts, rows.tolist(), strict=True) if n > 0]

    def train_step(self, step: int) -> dict[str, Any]:
        """One step (see the module docstring); returns its metrics line."""
        s = self.s
        start = time.perf_counter()
        batch, info = self._batch(step)
        t_batch = time.perf_counter()
        single = s.train.epochs == 1 and s.train.mini_batches == 1
        old_is_current = single and s.rollout.old_logprobs == "learner"
        parts = [self._mini_batches(batch, step, epoch) for epoch in range(s.train.epochs)]
        learner_old = self._first_update_on_policy()
        # the first optimizer step updates from pi_old itself: its rows need no pi_old pass (one epoch)
        live_first = parts[0][0] if learner_old and not single and s.train.epochs == 1 and parts[0] else None
        passes = self._passes(batch, step, old_is_current, skip=live_first)
        moments = self._step_moments(batch, step, passes)
        t_passes = time.perf_counter()
        metrics: dict[str, float] = {}
        grad_norms, skipped, n_updates = [], False, 0
        for epoch in range(s.train.epochs):
            for i, rows in enumerate(parts[epoch]):
                sub = batch if rows.numel() == len(batch) else _rows(batch, rows)
                sub_passes = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in passes.items()}
                if learner_old and epoch == 0 and i == 0:  # pi_old is the live policy at this update
                    sub_passes.pop("old_logprobs", None)
                    sub_passes["old_is_current"] = True
                prep = self._prepare(sub, step, step_moments=moments, **sub_passes)
                res = self.learner.update(sub, self.program, prep)
                n_updates += 1
                grad_norms.append(res.grad_norm)
                skipped |= res.skipped
                for k, v in res.metrics.items():
                    metrics[k] = metrics.get(k, 0.0) + v
        metrics = {k: v / n_updates for k, v in metrics.items()}
        self.engine.load_weights(self.learner.named_parameters())
        end = time.perf_counter()
        row: dict[str, Any] = {"step": step + 1, "kind": "train"}
        row.update(metrics)
        row.update(info)
        row.update(
            {
                "grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
                "skipped": skipped,
                "time/logprob": t_passes - t_batch,
                "time/update": end - t_passes,
                "time/step": end - start,
            }
        )
        return row

    # ----- evaluation -----------------------------------------------------------------------

    def evaluate(self) -> dict[str, Any] | None:
        from hpt_dsl.evaluate import evaluate

        if not self.task.test:
            return None
        s = self.s
        params = SamplingParams(
            n=s.train.eval_n,
            temperature=s.eval.temperature,
            top_p=s.eval.top_p,
            max_new_tokens=s.eval.max_new_tokens or s.rollout.max_new_tokens,
            seed=s.train.seed + 12345,
        )
        reward = self.task.reward_fn
        if s.eval.reward is not None and s.data.train != "arith":
            from hpt_dsl.data.verify import make_reward

            reward = make_reward(s.data.model_copy(update={"reward": s.eval.reward}))
        return evaluate(
            self.engine,
            self.tokenizer,
            self.task.test,
            reward,
            s.train.eval_n,
            params,
            encode=lambda q: self.prompts.prompt(q, "test"),
            batch_questions=256,
        )

    def close(self) -> None:
        self.engine.close()
        self.learner.close()


def _sampling_counts(filled: Filled) -> dict[str, float]:
    """This process's dynamic-sampling counts, summed over processes into the step's."""
    return {
        "drawn": float(filled.drawn),
        "dropped": float(filled.dropped),
        "surplus": float(filled.surplus),
        "short": float(filled.short),
        "drawn_correct": float(filled.drawn_correct),
        "drawn_rollouts": float(filled.drawn_rollouts),
    }


def _rows(batch: TrainBatch, rows: torch.Tensor) -> TrainBatch:
    """The rows of a mini-batch, full width (prepare and the learner trim per micro-batch)."""
    return TrainBatch(
        **{
            f: (None if getattr(batch, f) is None else getattr(batch, f)[rows])
            for f in batch.__dataclass_fields__  # type: ignore[attr-defined]
        }
    )


# ----- the run --------------------------------------------------------------------------------


def train(
    recipe: Recipe,
    run_dir: Path,
    resume: bool = False,
    quiet: bool = False,
    json_logs: bool = False,
    json_stream: TextIO | None = None,
    plots: bool = False,
) -> RunResult:
    """Run ``recipe`` into ``run_dir`` (continuing its latest complete checkpoint when
    ``resume``); with ``json_logs`` every metrics line is also written to ``json_stream``
    (stdout); with ``plots`` the run's figures are drawn into ``run_dir/plots`` at the end.
    A write that fails, or another process of the run that stops, raises ``RunFault``."""
    trackers = Trackers(recipe.settings.log.to, main=dist.is_main())  # a missing library: SetupError here
    try:
        return _train(recipe, run_dir, resume, quiet, json_logs, json_stream, plots, trackers)
    except (RunFault, RunInterrupted, SetupError, ckpt.CheckpointError):
        raise
    except Exception as err:
        last = ckpt.latest_checkpoint(run_dir)
        kept = f"The last complete checkpoint is {last.name}" if last else "No checkpoint was written"
        if dist.active() and is_lost_peer(err):
            world = dist.world_size()
            then = f"{kept}: continue with --resume {run_dir} on {world} processes."
            raise lost_peer(err, dist.rank(), world, then) from err
        if is_disk_error(err):
            where = Path(err.filename) if isinstance(err, OSError) and err.filename else run_dir
            raise write_fault("the run's files", where, err, then=f"{kept}: free some space, then --resume "
                              f"{run_dir}.") from err
        raise
    finally:
        trackers.close()  # after an error or Ctrl-C (a run that ended well closed them)


def _train(
    recipe: Recipe,
    run_dir: Path,
    resume: bool,
    quiet: bool,
    json_logs: bool,
    json_stream: TextIO | None,
    plots: bool,
    trackers: Trackers,
) -> RunResult:
    s = recipe.settings
    started = time.perf_counter()
    keep_freed_memory()  # one step's memory serves the next (hpt_dsl.malloc)
    main = dist.is_main()
    if not resume:
        runfolder.check_fresh(run_dir)
    start_processes(s)
    dist.barrier()  # every process has looked at the run folder before the first one writes
    reporter = Reporter(
        run_dir, s.train.steps, quiet=quiet, json_logs=json_logs, json_stream=json_stream, writes=main,
        trackers=trackers,
    )
    latest = ckpt.choose_resume(run_dir, reporter.warning) if resume else None
    runfolder.open_run_folder(run_dir, recipe, main, dist.world_size())
    trackers.start(recipe, run_dir, resume, quiet)  # log.to, first process only; before the model loads
    trainer = Trainer(recipe, run_dir, reporter)
    need = ckpt.size_of(latest) or ckpt.estimate_bytes(trainer.learner, s.learner.engine)
    final_bytes = ckpt.estimate_bytes(trainer.learner, s.learner.engine, weights_only=True)
    if main and (low := space_warning(run_dir, need, final_bytes)):
        reporter.warning(low)
    start_step, elapsed_before = 0, 0.0
    if latest is not None:
        state = ckpt.load_checkpoint(latest, trainer.learner)
        trainer.engine.load_weights(trainer.learner.named_parameters())
        start_step, trainer.bad_steps = state["step"], state.get("bad_steps", 0)
        elapsed_before = state.get("elapsed", 0.0)
        if main:
            truncate_metrics(run_dir / "metrics.jsonl", start_step)
        reporter.message(f"resumed from {latest.name} (step {start_step})")
    elif resume and main:
        truncate_metrics(run_dir / "metrics.jsonl", -1)

    def evaluate(step: int) -> None:
        """The held-out evaluation, by the first process (the others wait for it); by every
        process when the engine samples in lockstep (ZeRO-3), rank 0 reporting."""
        ev = trainer.evaluate() if main or trainer.engine.lockstep else None
        if ev is not None and main:
            reporter.evaluation(step, ev)
        dist.barrier()

    def save(step: int) -> None:
        elapsed = elapsed_before + time.perf_counter() - started
        state = {"bad_steps": trainer.bad_steps, "elapsed": elapsed}
        ckpt.save_checkpoint(run_dir, step, trainer.learner, state, keep=s.train.keep_checkpoints, need=need)

    try:
        with reporter, StopFlag() as stop:
            reporter.start_at(start_step)
            if start_step == 0:
                evaluate(0)
            for step in range(start_step, s.train.steps):
                row = trainer.train_step(step)
                row["time"] = elapsed_before + time.perf_counter() - started
                reporter.step(row)
                done = step + 1
                if row["skipped"]:
                    trainer.bad_steps += 1
                    reporter.message(f"step {done}: non-finite loss or gradient norm; update skipped")
                    if trainer.bad_steps >= s.train.max_bad_steps:
                        last = ckpt.latest_checkpoint(run_dir)
                        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
                        raise RunFault(
                            f"stopped after {trainer.bad_steps} non-finite steps in a row at step {done}; "
                            f"{where}. Fix: lower train.lr or train.grad_clip, then --resume {run_dir}"
                        )
                    continue
                trainer.bad_steps = 0
                final = done == s.train.steps
                if s.train.eval_every and done % s.train.eval_every == 0 or final:
                    evaluate(done)
                stopping = dist.all_reduce_max(int(stop.set)) > 0  # every process stops after this step
                if final or (s.train.save_every and done % s.train.save_every == 0) or stopping:
                    save(done)
                if stopping:
                    raise RunInterrupted(
                        f"interrupted at step {done}; checkpoint saved, resume with --resume {run_dir}"
                    )
            ckpt.save_final_model(run_dir / "final-model", trainer.learner, final_bytes)
    except KeyboardInterrupt:
        raise RunInterrupted(f"interrupted; resume from the last checkpoint with --resume {run_dir}") from None
    finally:
        trainer.close()
    wall = elapsed_before + time.perf_counter() - started
    if main:
        runfolder.close_run_folder(run_dir, recipe, wall_s=wall, final_eval=reporter.last_eval or None,
                                   first_eval=reporter.first_eval)
    extra = {"run folder": str(run_dir), "final model": str(run_dir / "final-model")}
    if plots and main:
        extra["figures"] = draw_run_figures(run_dir, reporter.message)
    trackers.finish(run_dir / "plots" if plots and main else None)
    reporter.summary(run_dir, wall, extra)
    return RunResult(run_dir, s.train.steps, wall, reporter.first_eval, reporter.last_eval or None)


def run_recipe(
    recipe_path: str | Path | Recipe,
    overrides: list[str] | None = None,
    output: Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    json_logs: bool = False,
    json_stream: TextIO | None = None,
    plots: bool = False,
    set_threads: bool = False,
    warn: Callable[[str], None] | None = None,
) -> RunResult:
    """Load the recipe (with ``--set`` overrides; a checked ``Recipe`` is taken as it is) and
    train it; ``output`` (or the recipe's ``train.output_dir``, or ``runs/<recipe>-<timestamp>``)
    is the run folder, continued when ``resume``. ``set_threads``: set this process's CPU
    threads from the settings (``hpt_dsl.process``; a library caller keeps its own); ``warn``
    hears that ``train.output_dir`` has no effect beside ``output``. The rest as ``train``."""
    from hpt_dsl.lang import load_recipe

    recipe = recipe_path if isinstance(recipe_path, Recipe) else load_recipe(Path(recipe_path),
                                                                             overrides=overrides or [])
    run_dir, ignored = runfolder.choose_run_dir(recipe, output, resume)
    if ignored and warn is not None:
        warn(ignored)
    if set_threads:
        use_cpu_threads(recipe.settings)
    if resume and not run_dir.is_dir():
        raise SetupError(f"--resume {run_dir}: no such run folder")
    return train(recipe, run_dir, resume=resume, quiet=quiet, json_logs=json_logs, json_stream=json_stream,
                 plots=plots)
