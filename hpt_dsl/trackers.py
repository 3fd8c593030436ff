"""Experiment trackers: every metrics line of a run also goes to TensorBoard, W&B or MLflow.

    log { to = ["tensorboard", "wandb", "mlflow"]  project = "hpt-dsl" }

Each tracker is the library itself, writing into the run folder:

    tensorboard  torch.utils.tensorboard.SummaryWriter    <run>/tensorboard
    wandb        wandb.init(dir=<run>)                     <run>/wandb/ (WANDB_MODE=offline honoured)
    mlflow       mlflow's MlflowClient                     <run>/mlruns, a file store
                                                           (or MLFLOW_TRACKING_URI when set)

A metrics line ``{"step": s, "kind": ..., k: v, ...}`` becomes the scalar ``k = v`` at step
``s`` in every tracker (a boolean as 0 or 1; text is left out; MLflow, which allows fewer
characters in a name, gets ``mlflow_key(k)``: ``loss/grpo`` as ``loss.grpo``). The run's config (the recipe's text, its
estimators' components, every setting) goes in once at the start, the PNG figures of
``run_dir/plots`` at the end. A resumed run continues the same W&B and MLflow runs (their ids
are kept in ``<run>/trackers.json``) and TensorBoard folder (its reader drops the steps a
resume repeats).

    Trackers(names, main)     checks that the libraries are installed (SetupError, exit code 2,
                              with the install command); nothing is written yet
    .start(recipe, run_dir, resume, quiet)   opens each tracker (first process only)
    .log(row)                 one metrics line to each tracker
    .finish(figures_dir)      the figures, then close (the run ended well)
    .close()                  close what is open (an error or Ctrl-C ended the run)
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from hpt_dsl.errors import SetupError

MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""The module each tracker imports (``torch.utils.tensorboard`` needs ``tensorboard``)."""

IDS = "trackers.json"
"""The run folder's record of the W&B and MLflow run ids, read by a resume."""


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics line: every key but ``step`` and ``kind``, booleans as 0/1."""
    return {
        k: float(v)
        for k, v in row.items()
        if k not in ("step", "kind") and isinstance(v, (int, float))
    }


def mlflow_key(key: str) -> str:
    """``key`` as an MLflow metric name: ``/`` as ``.`` (its file store keeps a metric as a file,
    so ``loss`` and ``loss/grpo`` cannot both be names there) and each character MLflow refuses
    as ``_`` (``eval/avg@1`` -> ``eval.avg_1``)."""
    return re.sub(r"[^\w.\- :]", "_", key.replace("/", "."))


def run_config(recipe: Any) -> dict[str, Any]:
    """What a tracker keeps as the run's config: the recipe's text, its estimators'
    components and every setting."""
    return {
        "recipe": recipe.source or "",
        "loss": {name: spec.components() for name, spec in recipe.estimators.items()},
        "settings": recipe.settings.model_dump(mode="json"),
    }


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"settings": {"train": {"lr": 0.003}}}`` -> ``{"settings.train.lr": "0.003"}``."""
    out: dict[str, str] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if not isinstance(v, str) else v
    return out


class Tracker(Protocol):
    """One experiment tracker, open for one run."""

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def figures(self, step: int, paths: Sequence[Path]) -> None: ...

    def close(self, ok: bool) -> None: ...


class TensorBoard:
    """``SummaryWriter`` into ``<run>/tensorboard``: scalars, the config as text, figures as images."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("recipe", "    " + config["recipe"].replace("\n", "\n    "), 0)
        self.writer.add_text("config", "    " + json.dumps(config, indent=2).replace("\n", "\n    "), 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def figures(self, step: int, paths: Sequence[Path]) -> None:
        from matplotlib.image import imread

        for p in paths:
            self.writer.add_image(f"figures/{p.stem}", imread(p)[..., :3], step, dataformats="HWC")

    def close(self, ok: bool) -> None:
        self.writer.close()


class WandB:
    """``wandb.init`` with ``dir=<run>``; ``WANDB_MODE=offline`` keeps it on this machine."""

    def __init__(self, run_dir: Path, config: dict[str, Any], project: str, run_id: str | None,
                 quiet: bool) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=project,
            name=run_dir.name,
            dir=str(run_dir),
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(console="off", silent=quiet),  # the run's own output stays as it is
        )
        self.id = self.run.id

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)  # a second line at the same step (an evaluation) joins it

    def figures(self, step: int, paths: Sequence[Path]) -> None:
        if paths:
            self.run.log({f"figures/{p.stem}": self.wandb.Image(str(p)) for p in paths}, step=step)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class MLflow:
    """``MlflowClient`` on ``MLFLOW_TRACKING_URI``, else a file store in ``<run>/mlruns``:
    metrics, the settings as parameters, the recipe and config as artifacts, the figures."""

    def __init__(self, run_dir: Path, config: dict[str, Any], project: str, run_id: str | None) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):  # MLflow 3 keeps its file store behind this opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(uri)
        if run_id is not None:
            self.id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(project)
        exp_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
        self.id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
        from mlflow.entities import Param

        flat = _flat({**config["settings"], "loss": config["loss"]})  # train.lr = 0.003, loss.grpo = mask=...
        params = [Param(k, v[:6000]) for k, v in flat.items()]
        for i in range(0, len(params), 100):  # MLflow takes 100 parameters per call
            self.client.log_batch(self.id, params=params[i : i + 100])
        self.client.log_text(self.id, config["recipe"], "recipe.hpt")
        self.client.log_dict(self.id, config, "config.json")

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(k), v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.id, metrics=metrics[i : i + 1000])

    def figures(self, step: int, paths: Sequence[Path]) -> None:
        for p in paths:
            self.client.log_artifact(self.id, str(p), "figures")

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.id, "FINISHED" if ok else "FAILED")


class Trackers:
    """The trackers of ``log.to``, open on the first process of a run only."""

    def __init__(self, names: Sequence[str], main: bool = True) -> None:
        missing = [n for n in names if importlib.util.find_spec(MODULES[n]) is None]
        if missing:
            raise SetupError(_missing(missing))
        self.names = tuple(names) if main else ()
        self.open: dict[str, Tracker] = {}
        self.step = 0

    def start(self, recipe: Any, run_dir: Path, resume: bool, quiet: bool = False) -> None:
        """Open each tracker (in ``log.to``'s order); on a resume, continue the runs recorded in
        ``run_dir/trackers.json``; ``quiet``: W&B prints nothing."""
        if not self.names:
            return
        ids_path = run_dir / IDS
        ids = json.loads(ids_path.read_text()) if resume and ids_path.exists() else {}
        config, project = run_config(recipe), recipe.settings.log.project
        try:
            for name in self.names:
                if name == "tensorboard":
                    self.open[name] = TensorBoard(run_dir, config)
                elif name == "wandb":
                    self.open[name] = WandB(run_dir, config, project, ids.get(name), quiet)
                else:
                    self.open[name] = MLflow(run_dir, config, project, ids.get(name))
        except ImportError as err:  # installed, but does not import
            self.close()
            raise SetupError(f"{_missing([name])} ({err})") from None
        except Exception as err:  # e.g. W&B online without a login
            self.close()
            why = str(err).strip().splitlines()[0].strip("'\"").rstrip(".") if str(err).strip() else repr(err)
            offline = " (W&B: or WANDB_MODE=offline)" if name == "wandb" else ""
            raise SetupError(f"log.to: {name} did not start: {why}; fix its setup{offline}, or remove it from log.to") \
                from None
        kept = {n: t.id for n, t in self.open.items() if isinstance(t, (WandB, MLflow))}
        if kept:
            ids_path.write_text(json.dumps(kept, indent=2) + "\n")

    def log(self, row: dict[str, Any]) -> None:
        """One metrics line (``hpt_dsl.report``) to each tracker, at its step."""
        if not self.open:
            return
        self.step = int(row.get("step", self.step))
        values = scalars(row)
        for tracker in self.open.values():
            tracker.log(self.step, values)

    def finish(self, figures_dir: Path | None) -> None:
        """The PNG figures of ``figures_dir`` (when given) at the last step, then close."""
        paths = sorted(figures_dir.glob("*.png")) if figures_dir is not None and figures_dir.is_dir() else []
        for tracker in self.open.values():
            tracker.figures(self.step, paths)
        self.close(ok=True)

    def close(self, ok: bool = False) -> None:
        """Close every open tracker (again: nothing); ``ok`` False marks the run failed."""
        while self.open:
            _, tracker = self.open.popitem()
            tracker.close(ok)


def _missing(names: Sequence[str]) -> str:
    libs = " and ".join(names)
    return (f"log.to names {libs}, which {'is' if len(names) == 1 else 'are'} not installed in this environment; "
            f"fix: pip install 'hpt-dsl[{','.join(names)}]'")
