"""The DeepSpeed learner on CPU (gloo): one process and two processes, ZeRO 0, 2 and 3, give
the plain PyTorch learner's parameters after 3 updates (to 1e-5) and its metrics; a resumed
run gives the uninterrupted run's metrics; a non-finite step is skipped on every rank.

Each world size runs in ONE set of fresh processes that go through every stage in turn
(DeepSpeed's process group is started once per process)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hpt_dsl import dist
from hpt_dsl.batch import TrainBatch, pad_left, pad_right
from hpt_dsl.estimator import compile_recipe
from hpt_dsl.lang import load_recipe  # type: ignore[attr-defined]
from hpt_dsl.models import build_tiny, load_local
from hpt_dsl.recipe import Recipe

pytestmark = pytest.mark.slow

STAGES = (0, 2, 3)
UPDATES = 3
QUESTIONS, ROLLOUTS = 4, 4
PASS_RATES = (0, 1, 2, 4)  # correct rollouts per question: the gate sends 2 questions each way
RECIPE = """
loss = if acc > 0.3 then grpo kl=k3(0.05) else sft
train { micro_batch = 3  lr = 0.0005  grad_clip = 0.5  schedule = "warmup"  warmup_steps = 2 }
"""


def recipe(engine: str, stage: int = 0) -> Recipe:
    return load_recipe(text=RECIPE, overrides=[f"learner.engine={engine}", f"learner.zero_stage={stage}"])


def make_batch(step: int) -> TrainBatch:
    """A fixed mini-batch: per question 4 rollouts then (after all rollouts) the demos."""
    g = torch.Generator().manual_seed(100 + step)

    def tokens(lo: int, hi: int) -> list[int]:
        n = int(torch.randint(lo, hi, (1,), generator=g))
        return torch.randint(4, 128, (n,), generator=g).tolist()

    prompts = [tokens(3, 9) for _ in range(QUESTIONS)]
    p_rows, r_rows, group, demo, rewards = [], [], [], [], []
    for q in range(QUESTIONS):
        for j in range(ROLLOUTS):
            p_rows.append(prompts[q]), r_rows.append(tokens(1, 11)), group.append(q), demo.append(False)
            rewards.append(1.0 if j < PASS_RATES[q] else 0.0)
    for q in range(QUESTIONS):
        p_rows.append(prompts[q]), r_rows.append(tokens(2, 11)), group.append(q), demo.append(True)
        rewards.append(1.0)
    prompt_ids, prompt_mask = pad_left(p_rows, 0)
    response_ids, response_mask = pad_right(r_rows, 0, torch.long)
    return TrainBatch(prompt_ids, prompt_mask, response_ids, response_mask, torch.tensor(group),
                      torch.tensor(demo), torch.tensor(rewards))


def local_batch(batch: TrainBatch) -> TrainBatch:
    """This rank's questions' rows, in batch order."""
    mine = torch.tensor(list(dist.shard(QUESTIONS)))
    return batch.select(torch.nonzero(torch.isin(batch.group_ids, mine)).squeeze(1))


def train_step(learner, program, batch: TrainBatch, step: int, poison: bool = False) -> dict[str, float]:  # noqa: ANN001
    """One update; ``poison`` makes this rank's loss NaN (the coefficients of its first term)."""
    ref = learner.logprobs(batch, "ref") if learner.ref is not None else None
    prep = dist.prepare(program, response_mask=batch.response_mask, rewards=batch.rewards,
                        group_ids=batch.group_ids, is_demo=batch.is_demo, ref_logprobs=ref, step=step,
                        old_is_current=True)
    if poison:
        prep.coef[0] = torch.full_like(prep.coef[0], float("nan"))
    result = learner.update(batch, program, prep)
    return {**result.metrics, "grad_norm": result.grad_norm, "skipped": float(result.skipped),
            "tokens": float(result.tokens)}


def new_learner(model_dir: str, stage: int, ds_optimizer: bool = False):  # noqa: ANN201
    """A DeepSpeed learner on the tiny model. ``ds_optimizer``: the CUDA configuration path
    (DeepSpeed builds AdamW from the config, the schedule is rebuilt on it), with
    ``torch_adam`` so that it runs on CPU."""
    from hpt_dsl.learner.deepspeed import DeepSpeedLearner
    from hpt_dsl.learner.ds_config import generate

    torch.manual_seed(0)
    model, tokenizer = load_local(Path(model_dir))
    r = recipe("deepspeed", stage)
    config = None
    if ds_optimizer:
        config = generate(r.settings, dist.world_size(), cuda=True)
        config["optimizer"]["params"]["torch_adam"] = True
    return DeepSpeedLearner(r, model, tokenizer, config=config)


def deepspeed_worker(model_dir: str, out_dir: str, resume: bool) -> None:
    """Every stage in turn: 3 updates (checkpoint after 2); with ``resume``, a second learner
    resumes from the checkpoint, redoes update 3, then takes a non-finite step; then ZeRO-3
    with DeepSpeed's optimizer from the config."""
    out: dict[str, object] = {}
    program = compile_recipe(recipe("deepspeed"))
    learner = new_learner(model_dir, 3, ds_optimizer=True)
    for step in range(UPDATES):
        out[f"3-dsopt/metrics/{step}"] = train_step(learner, program, local_batch(make_batch(step)), step)
    out["3-dsopt/params"] = learner.full_state_dict()
    learner.close()
    for stage in STAGES:
        learner = new_learner(model_dir, stage)
        ckpt = Path(out_dir) / f"ckpt-{stage}"
        if dist.is_main():
            ckpt.mkdir()
        dist.barrier()
        for step in range(UPDATES):
            out[f"{stage}/metrics/{step}"] = train_step(learner, program, local_batch(make_batch(step)), step)
            if step == UPDATES - 2:
                learner.save(ckpt)
        out[f"{stage}/params"] = learner.full_state_dict()
        learner.close()
        if not resume:
            continue
        again = new_learner(model_dir, stage)
        again.load(ckpt)
        last = UPDATES - 1
        out[f"{stage}/resumed/{last}"] = train_step(again, program, local_batch(make_batch(last)), last)
        out[f"{stage}/resumed/params"] = again.full_state_dict()
        last_rank = dist.rank() == dist.world_size() - 1  # one rank's loss is NaN: every rank skips
        out[f"{stage}/nan"] = train_step(again, program, local_batch(make_batch(UPDATES)), UPDATES, last_rank)
        out[f"{stage}/nan/params"] = again.full_state_dict()
        never = compile_recipe(load_recipe(text="loss = if acc > 2 then grpo else 0"))  # no row has weight
        out[f"{stage}/empty"] = train_step(again, never, local_batch(make_batch(UPDATES)), UPDATES)
        out[f"{stage}/empty/params"] = again.full_state_dict()
        final = Path(out_dir) / f"final-{stage}"
        again.save_pretrained(final)
        again.close()
    if dist.is_main():
        torch.save(out, Path(out_dir) / "result.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("ds")
    model_dir = build_tiny(root / "model", seed=0)
    # the plain PyTorch learner, in this process
    from hpt_dsl.learner.torch import TorchLearner

    torch.manual_seed(0)
    model, tokenizer = load_local(model_dir)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plain = TorchLearner(recipe("torch"), model, tokenizer)
    program = compile_recipe(recipe("torch"))
    out: dict[str, dict] = {"plain": {}, "initial": initial}
    for step in range(UPDATES):
        out["plain"][f"metrics/{step}"] = train_step(plain, program, make_batch(step), step)
    out["plain"]["params"] = {k: v.detach().clone() for k, v in plain.model.state_dict().items()}
    for world in (1, 2):
        folder = root / f"world{world}"
        folder.mkdir()
        dist.spawn(deepspeed_worker, world, str(model_dir), str(folder), world == 2)
        out[f"world{world}"] = torch.load(folder / "result.pt", weights_only=True)
        out[f"world{world}"]["dir"] = folder
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", [*STAGES, "3-dsopt"])
def test_same_parameters_as_plain_learner(runs: dict, world: int, stage: int) -> None:
    plain = runs["plain"]["params"]
    ds = runs[f"world{world}"][f"{stage}/params"]
    assert max_diff(ds, plain) < 1e-5
    assert max_diff(plain, runs["initial"]) > 10e-5  # 3 updates moved weights 10x farther than the tolerance


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", [*STAGES, "3-dsopt"])
def test_same_metrics_as_plain_learner(runs: dict, world: int, stage: int) -> None:
    for step in range(UPDATES):
        plain = runs["plain"][f"metrics/{step}"]
        ds = runs[f"world{world}"][f"{stage}/metrics/{step}"]
        for key in ("loss", "grad_norm", "lr", "rows_used", "gate/sft", "kl", "tokens", "skipped"):
            assert ds[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), (step, key)


@pytest.mark.parametrize("stage", STAGES)
def test_resume_gives_uninterrupted_metrics(runs: dict, stage: int) -> None:
    two = runs["world2"]
    last = UPDATES - 1
    for key, value in two[f"{stage}/metrics/{last}"].items():
        assert two[f"{stage}/resumed/{last}"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert max_diff(two[f"{stage}/resumed/params"], two[f"{stage}/params"]) < 1e-6


@pytest.mark.parametrize("stage", STAGES)
def test_non_finite_step_is_skipped(runs: dict, stage: int) -> None:
    two = runs["world2"]
    assert two[f"{stage}/nan"]["skipped"] == 1.0
    assert max_diff(two[f"{stage}/nan/params"], two[f"{stage}/resumed/params"]) == 0.0


@pytest.mark.parametrize("stage", STAGES)
def test_step_without_weighted_rows_moves_nothing(runs: dict, stage: int) -> None:
    two = runs["world2"]
    assert two[f"{stage}/empty"]["skipped"] == 0.0
    assert two[f"{stage}/empty"]["rows_used"] == 0.0
    assert two[f"{stage}/empty"]["grad_norm"] == 0.0
    assert max_diff(two[f"{stage}/empty/params"], two[f"{stage}/nan/params"]) == 0.0


@pytest.mark.parametrize("stage", STAGES)
def test_final_model_is_one_hugging_face_checkpoint(runs: dict, stage: int) -> None:
    folder = runs["world2"]["dir"] / f"final-{stage}"
    model, _ = load_local(folder)
    loaded = {k: v for k, v in model.state_dict().items()}
    expected = runs["world2"][f"{stage}/empty/params"]
    assert max_diff({k: loaded[k] for k in expected}, expected) == 0.0
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]
