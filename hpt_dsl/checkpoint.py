"""Checkpoints: written atomically, so a run killed at any moment resumes from a complete one.

Layout under the run folder::

    checkpoints/step-000020/      one complete checkpoint (the step count it follows)
        state.json                step, consecutive bad steps, elapsed seconds, format
        rng.safetensors           torch's RNG state (CPU and, when present, CUDA)
        policy.safetensors, optimizer.safetensors, optimizer.json, scheduler.json,
        critic.safetensors ...    the learner's own files (``Learner.save``)

A checkpoint is first written to ``checkpoints/.tmp-step-000020``; every file is fsynced,
then the folder is renamed to its final name (atomic on POSIX) and the parent fsynced. A
folder named ``step-*`` is therefore always complete; a killed write leaves only a
``.tmp-*`` folder, removed by the next save. Nothing is ever unpickled: tensors are
safetensors, everything else JSON. The newest ``keep`` checkpoints are kept.

In a run of several processes ``save_checkpoint`` and ``load_checkpoint`` are called by
every process: each writes its own shard through the learner and its RNG state
(``rng-rank<r>.safetensors``); the first process writes the rest and renames the folder
once all have written. The run folder must be one folder that every process sees.

For tests, ``HPT_DSL_FAULT=checkpoint:N`` ends the process (``os._exit(86)``) in the
middle of writing the N-th checkpoint of this process, after some files are written and
before the rename: exactly a crash during the write.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hpt_dsl import dist

FORMAT = 1
_PATTERN = re.compile(r"^step-(\d+)$")
_writes = 0


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fault_here() -> bool:
    spec = os.environ.get("HPT_DSL_FAULT", "")
    return spec.startswith("checkpoint:") and spec.split(":", 1)[1] == str(_writes)


def save_checkpoint(run_dir: Path, step: int, learner: Any, state: dict[str, Any], keep: int = 2) -> Path:
    """Write the checkpoint of ``step`` (see the module docstring); returns its folder.
    Collective in a run of several processes."""
    global _writes
    _writes += 1
    root = checkpoint_dir(run_dir)
    name = f"step-{step:06d}"
    tmp = root / f".tmp-{name}"
    final = root / name
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    learner.save(tmp)
    if _fault_here():
        os._exit(86)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    save_file(rng, str(tmp / _rng_file()))
    dist.barrier()
    if dist.is_main():
        _finish(tmp, final, state, step)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _rng_file() -> str:
    return "rng.safetensors" if dist.is_main() else f"rng-rank{dist.rank()}.safetensors"


def _finish(tmp: Path, final: Path, state: dict[str, Any], step: int) -> None:
    """state.json, fsync, then the atomic rename of ``tmp`` to ``final``."""
    py_state = random.getstate()
    full = {
        **state,
        "step": step,
        "format": FORMAT,
        "python_random": [py_state[0], list(py_state[1]), py_state[2]],
    }
    (tmp / "state.json").write_text(json.dumps(full))
    _fsync_tree(tmp)
    if final.exists():  # the same step saved again (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _PATTERN.match(p.name)
        if m and (p / "state.json").exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, learner: Any) -> dict[str, Any]:
    """Restore the learner and the RNG states from ``path``; returns its ``state.json``."""
    state = json.loads((path / "state.json").read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')} is not {FORMAT}")
    learner.load(path)
    rng = load_file(str(path / _rng_file()))  # this process's own (resume keeps the process count)
    torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = state["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return state
