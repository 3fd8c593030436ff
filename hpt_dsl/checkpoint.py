"""Checkpoints: written atomically and verified, so a run killed at any moment, or a checkpoint
damaged on disk afterwards, resumes from a complete one.

Layout under the run folder::

    checkpoints/step-000020/      one checkpoint (the step count it follows)
        state.json                step, consecutive bad steps, elapsed seconds, format
        rng.safetensors           torch's RNG state (CPU and, when present, CUDA)
        policy.safetensors, optimizer.safetensors, optimizer.json, scheduler.json,
        critic.safetensors ...    the learner's own files (``Learner.save``)
        manifest.json             every other file with its size and CRC-32, written last
    checkpoints/step-000010.damaged/   a checkpoint that failed verification, moved aside

A checkpoint is first written to ``checkpoints/.tmp-step-000020``; every file is fsynced, the
manifest is written (atomically, ``hpt_dsl.manifest``), then the folder is renamed to its
final name (atomic on POSIX) and the parent fsynced. A killed write leaves only a ``.tmp-*``
folder, never taken by a resume and removed by the next save; a write that fails (a full
disk) removes its ``.tmp-*`` folder and raises ``RunFault`` naming the folder, the error,
the free space and the space a checkpoint needs. Nothing is ever unpickled: tensors are
safetensors, everything else JSON.

Resume (``resume_point``) verifies the newest checkpoint against its manifest (sizes and
checksums) before anything is loaded. One that fails (a file cut short, flipped bytes, a
missing file or manifest) is named, moved aside to ``step-N.damaged`` (never deleted) and
the next older one is tried; ``CheckpointError`` (exit code 2) when none is complete.
Retention keeps the newest ``keep`` (``train.keep_checkpoints``) complete checkpoints, so
a fallback exists.

In a run of several processes ``save_checkpoint`` and ``load_checkpoint`` are called by
every process: each writes its own shard through the learner and its RNG state
(``rng-rank<r>.safetensors``); the first process writes the rest, the manifest, and
renames the folder once all have written. The run folder must be one folder that every
process sees.

For tests, ``HPT_DSL_FAULT=checkpoint:N`` ends the process (``os._exit(86)``) in the
middle of writing the N-th checkpoint of this process, after the learner's files are
written and before the rename: exactly a crash during the write.
``HPT_DSL_FAULT=checkpoint:N:POINT`` kills the process with SIGKILL at ``POINT`` of that
write: ``start`` (an empty folder), ``learner`` (after the learner's files), ``manifest``
(all written, not renamed) or ``renamed`` (renamed, older checkpoints not yet removed).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hpt_dsl import dist, manifest
from hpt_dsl.errors import InputError
from hpt_dsl.faults import is_lost_peer, write_fault
from hpt_dsl.runfolder import CHECKPOINTS, DAMAGED, step_folders

FORMAT = 2  # 2: with manifest.json
_writes = 0


class CheckpointError(InputError):
    """No complete checkpoint to resume from, or one that cannot be loaded (exit code 2)."""


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    manifest.fsync_dir(path)


def _fault(point: str) -> None:
    """The test hook of the module docstring (``HPT_DSL_FAULT``)."""
    spec = os.environ.get("HPT_DSL_FAULT", "").split(":")
    if spec[0] != "checkpoint" or len(spec) < 2 or spec[1] != str(_writes):
        return
    if len(spec) == 2 and point == "learner":
        os._exit(86)
    if len(spec) == 3 and spec[2] == point:
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(
    run_dir: Path, step: int, learner: Any, state: dict[str, Any], keep: int = 2, need: int | None = None
) -> Path:
    """Write the checkpoint of ``step`` (see the module docstring); returns its folder.
    Collective in a run of several processes. A write that fails removes the partial folder
    and raises ``RunFault`` (``need``: the bytes a checkpoint takes, for its message)."""
    global _writes
    _writes += 1
    root = checkpoint_dir(run_dir)
    name = f"step-{step:06d}"
    tmp = root / f".tmp-{name}"
    final = root / name
    try:
        if dist.is_main():
            root.mkdir(parents=True, exist_ok=True)
            for stale in [*root.glob(".tmp-*"), *root.glob(".old-*")]:
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        dist.barrier()
        _fault("start")
        learner.save(tmp)
        _fault("learner")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda{i}"] = s
        save_file(rng, str(tmp / _rng_file()))
        dist.barrier()
        if dist.is_main():
            _finish(tmp, final, state, step)
    except Exception as err:
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        if _lost_peer(err):
            raise
        last = latest_checkpoint(run_dir)
        kept = f"The last complete checkpoint, {last.name}, is intact" if last else "No earlier checkpoint exists"
        then = f"{kept}: free some space, then continue with --resume {run_dir}."
        raise write_fault(f"the checkpoint of step {step}", root, err, need or size_of(last), then) from err
    if dist.is_main():
        _fault("renamed")
        prune(run_dir, keep)
    dist.barrier()
    return final


def _lost_peer(err: BaseException) -> bool:
    return dist.active() and is_lost_peer(err)


def size_of(path: Path | None) -> int | None:
    """Bytes of a checkpoint's files, from its manifest (None without one)."""
    return manifest.size(path) if path is not None else None


def estimate_bytes(learner: Any, engine: str, weights_only: bool = False) -> int:
    """About the bytes of a checkpoint of ``learner`` before one exists: the weights of the
    policy (and critic) as they are held, plus Adam's two moments per trainable weight (in the
    weights' dtype with the torch learner; fp32, and an fp32 master copy, with DeepSpeed).
    ``weights_only``: the final model's weights."""
    total = 0
    for module in (learner.model, getattr(learner, "critic", None)):
        if module is None:
            continue
        for p in module.parameters():
            n = int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 holds a shard; ds_numel is the whole
            total += n * p.element_size()
            if p.requires_grad and not weights_only:
                total += n * (12 if engine == "deepspeed" else 2 * p.element_size())
        if weights_only:
            break
    return total


def prune(run_dir: Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` complete checkpoints (sizes checked against their
    manifests); a folder that fails the check is never removed. Returns the removed ones."""
    complete = [p for p in list_checkpoints(run_dir) if not manifest.problems(p, checksums=False)]
    old = complete[: -max(keep, 1)]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return old


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
    publish(tmp, final, hook=True)


def publish(tmp: Path, final: Path, hook: bool = False) -> None:
    """fsync every file of ``tmp``, write its manifest, then rename it to ``final``. An existing
    ``final`` (the same step saved again after a resume, a final model written again) is
    renamed away first and removed after: there is no moment without a complete one."""
    _fsync_tree(tmp)
    manifest.write(tmp)
    if hook:
        _fault("manifest")
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    manifest.fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def save_final_model(final: Path, learner: Any, need: int | None = None) -> None:
    """The policy as a Hugging Face folder at ``final``, written as a checkpoint is (a
    ``.tmp-`` folder, fsync, manifest, rename); a write that fails removes the partial folder
    and raises ``RunFault``. Collective."""
    tmp = final.with_name(f".tmp-{final.name}")
    try:
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        learner.save_pretrained(tmp)
        if dist.is_main():
            publish(tmp, final)
    except Exception as err:
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        if _lost_peer(err):
            raise
        last = latest_checkpoint(final.parent)
        then = (f"The last checkpoint, {last.name}, is complete: free some space, then --resume {final.parent} "
                "writes the final model." if last else "")
        raise write_fault("the final model", final, err, need, then) from err
    dist.barrier()


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints with a manifest (written to the end), oldest first; ``manifest.problems``
    says whether their files are still what was written."""
    return [p for p in step_folders(run_dir) if (p / manifest.MANIFEST).is_file()]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def move_aside(path: Path) -> Path:
    """Rename a damaged checkpoint folder to ``<name>.damaged`` (``.damaged-2``, ... when taken)."""
    target, k = path.with_name(path.name + DAMAGED), 1
    while target.exists():
        k += 1
        target = path.with_name(f"{path.name}{DAMAGED}-{k}")
    os.rename(path, target)
    return target


def resume_point(run_dir: Path, say: Callable[[str], None]) -> Path | None:
    """The newest checkpoint that passes verification (sizes and checksums), after moving every
    newer one that fails aside (``say`` tells which and why). None when the run has none at
    all; ``CheckpointError`` when it has some and none is complete. The first process only."""
    moved = []
    for path in reversed(step_folders(run_dir)):
        found = manifest.problems(path)
        if not found:
            return path
        target = move_aside(path)
        moved.append(target.name)
        say(f"checkpoint {path.name} is damaged: {'; '.join(found)}. Moved aside to {target}; "
            "trying the one before it")
    if moved:
        raise CheckpointError(
            f"no complete checkpoint left in {checkpoint_dir(run_dir)} (damaged, moved aside: {', '.join(moved)}); "
            f"start the run again with another --output, or restore a checkpoint from a copy")
    return None


def choose_resume(run_dir: Path, warn: Callable[[str], None]) -> Path | None:
    """``resume_point`` on the first process, the same answer on every process (collective)."""
    found: Path | None = None
    problem = ""
    if dist.is_main():
        try:
            found = resume_point(run_dir, warn)
        except CheckpointError as err:
            problem = str(err)
    if dist.all_reduce_max(int(bool(problem))):
        raise CheckpointError(problem or "the first process found no complete checkpoint to resume from")
    dist.barrier()  # the damaged ones are moved aside: the newest complete one is the one chosen
    return found if dist.is_main() else latest_checkpoint(run_dir)


def load_checkpoint(path: Path, learner: Any) -> dict[str, Any]:
    """Restore the learner and the RNG states from ``path``; returns its ``state.json``.
    ``CheckpointError`` (naming the checkpoint) when it cannot be read."""
    try:
        return _load(path, learner)
    except Exception as err:
        if _lost_peer(err):
            raise
        raise CheckpointError(f"cannot load checkpoint {path}: {str(err).strip() or type(err).__name__}; "
                              f"'hpt-dsl runs verify {path.parent.parent}' checks it") from err


def _load(path: Path, learner: Any) -> dict[str, Any]:
    state = json.loads((path / "state.json").read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"checkpoint format {state.get('format')} is not {FORMAT}")
    learner.load(path)
    rng = load_file(str(path / _rng_file()))  # this process's own (resume keeps the process count)
    torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted((k for k in rng if k.startswith("cuda")), key=lambda k: int(k[4:]))]  # by index
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = state["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return state
