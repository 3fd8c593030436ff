"""The plain learner against the DeepSpeed learner (ZeRO 0 and 2) on the default task, CPU.

    python bench/learner.py                     # plain, zero0, zero2; 1 process each
    python bench/learner.py --world 2           # the DeepSpeed runs with 2 processes (gloo)
    python bench/learner.py --updates 4 --repeats 2 --threads 2

The mini-batches have the default recipe's shape (recipes/hpt.hpt with its default
settings: the built-in tiny model, 16 arithmetic questions x 8 rollouts, micro-batches of
64 rows): real prompts and demonstrations of the built-in task, rollouts of random tokens
and lengths up to rollout.max_new_tokens, and pass rates that send about half of the
questions to each branch of the gate. Each configuration runs in fresh processes: one
warm-up update, then ``--updates`` timed updates (global prepare + update, as the loop
does), on the same mini-batches for every configuration, with ``--threads`` torch threads
per process (default 1: the tiny model's matrices are too small to split, and idle threads
spin and burn CPU time on a shared machine). Reported per configuration, the best of
``--repeats`` interleaved runs (the one least disturbed by other programs):

    cpu s/update  CPU seconds per optimizer step, all processes: the work a step costs
    wall s/update wall seconds per optimizer step
    updates/s     1 / (wall s/update)
    overhead      cpu s/update / plain cpu s/update - 1   (target for DeepSpeed on CPU: <= 10%)
    peak RSS MiB  the largest resident set of a process (ru_maxrss), and how much of it
                  training added over the process after the model and learner were built

Prints a table and writes bench/results/learner.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from hpt_dsl import dist
from hpt_dsl.batch import TrainBatch, pad_left, pad_right
from hpt_dsl.estimator import compile_recipe
from hpt_dsl.lang import load_recipe  # type: ignore[attr-defined]
from hpt_dsl.recipe import Recipe

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CONFIGS = {"plain": ("torch", 0), "zero0": ("deepspeed", 0), "zero2": ("deepspeed", 2)}


def recipe(engine: str, stage: int) -> Recipe:
    return load_recipe(ROOT / "recipes" / "hpt.hpt",
                       overrides=[f"learner.engine={engine}", f"learner.zero_stage={stage}"])


def make_batches(r: Recipe, tokenizer: object, count: int) -> list[TrainBatch]:
    """``count`` mini-batches of the default shape (see the module docstring)."""
    from hpt_dsl.data import load_task
    from hpt_dsl.prompting import encode_prompt, encode_response

    s = r.settings
    questions = load_task(s).train
    g = torch.Generator().manual_seed(0)
    n, q_per_step, budget = s.rollout.n, s.train.questions, s.rollout.max_new_tokens
    batches = []
    for k in range(count):
        qs = questions[k * q_per_step : (k + 1) * q_per_step]
        prompts = [encode_prompt(tokenizer, q.prompt, s.model) for q in qs]
        p_rows, r_rows, group, demo, rewards = [], [], [], [], []
        for i, prompt in enumerate(prompts):
            solved = int(torch.randint(0, n + 1, (1,), generator=g)) if i % 2 else 0
            for j in range(n):
                length = int(torch.randint(8, budget + 1, (1,), generator=g))
                p_rows.append(prompt)
                r_rows.append(torch.randint(4, 128, (length,), generator=g).tolist())
                group.append(i), demo.append(False), rewards.append(1.0 if j < solved else 0.0)
        for i, q in enumerate(qs):
            p_rows.append(prompts[i]), r_rows.append(encode_response(tokenizer, q.demo or ""))
            group.append(i), demo.append(True), rewards.append(1.0)
        pad = int(tokenizer.pad_token_id)  # type: ignore[attr-defined]
        prompt_ids, prompt_mask = pad_left(p_rows, pad)
        response_ids, response_mask = pad_right(r_rows, pad, torch.long)
        batches.append(TrainBatch(prompt_ids, prompt_mask, response_ids, response_mask, torch.tensor(group),
                                  torch.tensor(demo), torch.tensor(rewards)))
    return batches


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(name: str, model_dir: str, updates: int, threads: int, out: str) -> None:
    """One configuration in this process (and its peers): warm-up, then timed updates."""
    from hpt_dsl.learner.base import make_learner
    from hpt_dsl.models import load_local

    torch.set_num_threads(threads)
    engine, stage = CONFIGS[name]
    r = recipe(engine, stage)
    torch.manual_seed(0)
    model, tokenizer = load_local(Path(model_dir))
    learner = make_learner(r, model, tokenizer)
    program = compile_recipe(r)
    mine = torch.tensor(list(dist.shard(r.settings.train.questions)))
    batches = [b.select(torch.nonzero(torch.isin(b.group_ids, mine)).squeeze(1))
               for b in make_batches(r, tokenizer, updates + 1)]
    built = _peak_mib()
    times, cpu = [], []
    for k, batch in enumerate(batches):
        dist.barrier()
        start, start_cpu = time.perf_counter(), time.process_time()
        prep = dist.prepare(program, response_mask=batch.response_mask, rewards=batch.rewards,
                            group_ids=batch.group_ids, is_demo=batch.is_demo, step=k, old_is_current=True)
        result = learner.update(batch, program, prep)
        dist.barrier()
        if k:  # the first update is the warm-up
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        assert not result.skipped
    mine_stats = torch.tensor([_peak_mib(), _peak_mib() - built, sum(cpu) / len(cpu)], dtype=torch.float64)
    stats = dist.all_gather_rows(mine_stats[None])[0]
    learner.close()
    if dist.is_main():
        Path(out).write_text(json.dumps({"s_per_update": sum(times) / len(times),
                                         "cpu_s_per_update": float(stats[:, 2].sum()),
                                         "peak_rss_mib": float(stats[:, 0].max()),
                                         "training_rss_mib": float(stats[:, 1].max())}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--updates", type=int, default=8, help="timed updates per run (after one warm-up)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved runs per configuration")
    ap.add_argument("--world", type=int, default=1, help="processes of each DeepSpeed run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = ap.parse_args()
    from hpt_dsl.models import build_tiny

    runs: dict[str, list[dict[str, float]]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny(Path(tmp) / "model", seed=0)
        for rep in range(args.repeats):
            for name in CONFIGS:
                out = Path(tmp) / f"{name}-{rep}.json"
                world = 1 if name == "plain" else args.world
                dist.spawn(worker, world, name, str(model_dir), args.updates, args.threads, str(out))
                runs[name].append(json.loads(out.read_text()))
    rows = []
    for name, results in runs.items():
        s = min(r["s_per_update"] for r in results)
        rows.append({"config": name, "world": 1 if name == "plain" else args.world,
                     "cpu_s_per_update": min(r["cpu_s_per_update"] for r in results),
                     "s_per_update": s, "updates_per_s": 1 / s,
                     "peak_rss_mib": max(r["peak_rss_mib"] for r in results),
                     "training_rss_mib": max(r["training_rss_mib"] for r in results)})
    base = rows[0]["cpu_s_per_update"]
    for row in rows:
        row["overhead"] = row["cpu_s_per_update"] / base - 1
    print(f"{'config':8} {'world':>5} {'cpu s/update':>12} {'wall s/update':>13} {'updates/s':>9} "
          f"{'overhead':>9} {'peak RSS MiB':>13} {'training MiB':>13}")
    for row in rows:
        print(f"{row['config']:8} {row['world']:5d} {row['cpu_s_per_update']:12.3f} "
              f"{row['s_per_update']:13.3f} {row['updates_per_s']:9.2f} {row['overhead']:+9.1%} "
              f"{row['peak_rss_mib']:13.0f} {row['training_rss_mib']:13.0f}")
    summary = {f"{r['config']}_updates_per_s": r["updates_per_s"] for r in rows}
    summary |= {f"{r['config']}_overhead": r["overhead"] for r in rows[1:]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "learner.json").write_text(json.dumps({**summary, "updates": args.updates, "repeats": args.repeats,
                                                      "threads": args.threads, "runs": runs, "rows": rows},
                                                     indent=1))


if __name__ == "__main__":
    main()
