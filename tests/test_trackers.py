"""Experiment trackers (``log.to``): a few steps of the default recipe with TensorBoard, W&B
(offline) and MLflow (file store); each tracker's stored scalars, read back with that library's
own reader, equal metrics.jsonl at the same steps; the config and the figures are there too.
A missing library is one line with the install command (exit code 2) before anything is
written, and an unknown tracker name is an error at its file:line:col."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hpt_dsl.trackers import mlflow_key, scalars

ROOT = Path(__file__).resolve().parent.parent
SMALL = ("train.questions=2", "rollout.n=2", "rollout.max_new_tokens=6", "eval.max_new_tokens=6", "data.max_test=2",
         "train.micro_batch=4", "train.steps=3", "train.eval_every=2")
ALL = "log.to=tensorboard,wandb,mlflow"


def env() -> dict[str, str]:
    """W&B offline, MLflow's default store (the run folder), no hub."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "WANDB_"))}
    return {**out, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def command(*sets: str, pre: str = "") -> list[str]:
    """``hpt-dsl run recipes/hpt.hpt --quiet`` with ``SMALL`` and ``sets``; ``pre``: Python run first."""
    code = f"import sys\n{pre}\nfrom hpt_dsl.cli.main import main\nsys.argv[0] = 'hpt-dsl'\nmain()"
    return [sys.executable, "-c", code, "run", "recipes/hpt.hpt", *[a for s in (*SMALL, *sets) for a in ("--set", s)],
            "--quiet"]  # fmt: skip


def hpt_run(out: Path, *sets: str, pre: str = "", resume: bool = False) -> subprocess.CompletedProcess[str]:
    """The command into ``out`` (``--resume`` it), to its end."""
    where = ["--resume", str(out), "--no-plots"] if resume else ["-o", str(out)]
    return subprocess.run([*command(*sets, pre=pre), *where], capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env=env())  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trackers") / "run"
    proc = hpt_run(out, ALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def expected(run: Path, steps: int = 3) -> dict[tuple[str, int], float]:
    """metrics.jsonl as {(key, step): value}: what every tracker must hold."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in rows} == {"train", "eval"} and max(r["step"] for r in rows) == steps
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, steps + 1))
    return {(k, r["step"]): v for r in rows for k, v in scalars(r).items()}


def same(stored: dict[tuple[str, int], float], want: dict[tuple[str, int], float]) -> None:
    """Every (key, step) of metrics.jsonl is stored with its value (float32 in TensorBoard)."""
    missing = sorted(set(want) - set(stored))
    assert not missing, missing[:10]
    for key, value in want.items():
        assert stored[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key


def tensorboard(run: Path) -> Any:
    """TensorBoard's own reader over the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def tensorboard_scalars(run: Path) -> dict[tuple[str, int], float]:
    acc = tensorboard(run)
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def test_tensorboard_holds_metrics_jsonl(run: Path) -> None:
    same(tensorboard_scalars(run), expected(run))
    acc = tensorboard(run)
    tags = acc.Tags()
    assert {"figures/accuracy", "figures/reward"} <= set(tags["images"])
    recipe = acc.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "loss" in recipe and "hpt" in recipe


def wandb_records(log: Path) -> list[dict[str, Any]]:
    """The records of a .wandb log, as W&B's own reader (``wandb leet inspect --json``) prints them."""
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)], capture_output=True,
                          text=True, timeout=300, env=env())  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def wandb_scalars(records: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    rows = [r["history"] for r in records if r["type"] == "history"]
    return {(k, int(h["step"]["num"])): v for h in rows for k, v in h["item"].items()
            if isinstance(v, (int, float)) and not k.startswith("_")}  # fmt: skip


def mlflow_client(run: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store behind this opt-in
    from mlflow.tracking import MlflowClient

    return MlflowClient((run / "mlruns").resolve().as_uri())


def mlflow_scalars(client: Any, run_id: str, keys: set[str]) -> dict[tuple[str, int], float]:
    return {(key, m.step): m.value for key in keys for m in client.get_metric_history(run_id, mlflow_key(key))}


def test_wandb_offline_holds_metrics_jsonl(run: Path) -> None:
    (log,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(log)
    history = [r["history"] for r in records if r["type"] == "history"]
    same(wandb_scalars(records), expected(run))
    (image,) = [h["item"] for h in history if h["item"].get("figures/accuracy._type") == "image-file"]
    assert (next((run / "wandb").glob("offline-run-*")) / "files" / image["figures/accuracy.path"]).is_file()
    (first,) = [r["run"] for r in records if r["type"] == "run"]
    config = first["config"]["update"]
    assert config["settings"]["train"]["steps"] == 3 and config["settings"]["log"]["to"] == ["tensorboard", "wandb",
                                                                                               "mlflow"]
    assert "hpt" in config["recipe"] and first["project"] == "hpt-dsl" and first["display_name"] == "run"
    assert json.loads((run / "trackers.json").read_text())["wandb"] == first["run_id"]


def test_mlflow_file_store_holds_metrics_jsonl(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = mlflow_client(run, monkeypatch)
    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED" and info.info.run_name == "run"
    assert client.get_experiment(info.info.experiment_id).name == "hpt-dsl"
    want = expected(run)
    same(mlflow_scalars(client, run_id, {k for k, _ in want}), want)
    params = info.data.params
    assert params["train.steps"] == "3" and params["model.name"] == "tiny" and params["log.project"] == "hpt-dsl"
    assert params["loss.grpo"].startswith("mask=clip(0.2, 0.2)") and params["loss.sft"].startswith("mask=none")
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id,
                                                                                                          "figures")}
    assert {"recipe.hpt", "config.json", "figures/accuracy.png"} <= artifacts


def test_ctrl_c_closes_the_trackers_and_a_resume_continues_them(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C: exit 130, the MLflow run marked failed and the W&B run closed with exit code 1;
    the resume logs into the same MLflow run and W&B run id, and the TensorBoard folder, so
    that each tracker holds metrics.jsonl of the whole run."""
    run = tmp_path / "run"
    sets = ("train.save_every=0", "train.eval_every=0", ALL)
    proc = subprocess.Popen([*command("train.steps=200", *sets), "-o", str(run), "--no-plots"], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and '"kind": "train"' not in _text(run / "metrics.jsonl"):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    done = max(r["step"] for r in map(json.loads, _text(run / "metrics.jsonl").splitlines()))
    ids = json.loads((run / "trackers.json").read_text())
    client = mlflow_client(run, monkeypatch)
    assert client.get_run(ids["mlflow"]).info.status == "FAILED"
    (log,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    assert [r["exit"].get("exit_code") for r in wandb_records(log) if r["type"] == "exit"] == [1]

    resumed = hpt_run(run, f"train.steps={done + 2}", *sets, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want = expected(run, done + 2)
    assert json.loads((run / "trackers.json").read_text()) == ids
    assert client.get_run(ids["mlflow"]).info.status == "FINISHED"
    same(mlflow_scalars(client, ids["mlflow"], {k for k, _ in want}), want)
    logs = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 2 and all(log.name == f"run-{ids['wandb']}.wandb" for log in logs)
    same({k: v for log in logs for k, v in wandb_scalars(wandb_records(log)).items()}, want)
    same(tensorboard_scalars(run), want)


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_a_missing_library_is_one_line_with_the_install_command_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = hpt_run(out, "log.to=tensorboard,wandb", pre="sys.modules['wandb'] = None  # as if not installed")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "wandb" in lines[0] and "not installed" in lines[0] and "pip install 'hpt-dsl[wandb]'" in lines[0]
    assert not out.exists()  # no run folder, no model


def test_an_unknown_tracker_is_an_error_at_its_place(tmp_path: Path) -> None:
    from hpt_dsl.lang import load_recipe
    from hpt_dsl.lang.load import RecipeError

    path = tmp_path / "r.hpt"
    path.write_text('loss = grpo\nlog { to = ["tensorboard", "wandbb"] }\n')
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert f"{path}:2:12: error[E042]: invalid value for log.to" in str(err.value)
    assert "'tensorboard', 'wandb' or 'mlflow'" in str(err.value)
    with pytest.raises(RecipeError) as err:
        load_recipe(ROOT / "recipes/hpt.hpt", overrides=["log.to=tensorbord"])
    assert "--set:1:8: error[E042]: invalid value for log.to" in str(err.value)


def test_the_forms_of_a_tracker_list() -> None:
    from hpt_dsl.lang import load_recipe

    def to(*overrides: str, text: str = "loss = grpo") -> tuple[str, ...]:
        return load_recipe(text=text, overrides=list(overrides)).settings.log.to

    assert to() == ()
    assert to("log.to=tensorboard,wandb") == ("tensorboard", "wandb")
    assert to("log.to=[mlflow, wandb]") == ("mlflow", "wandb")
    assert to(text='loss = grpo\nlog.to = ["wandb"]') == ("wandb",)
    assert to(text='loss = grpo\nlog { to = [tensorboard, mlflow] }') == ("tensorboard", "mlflow")
