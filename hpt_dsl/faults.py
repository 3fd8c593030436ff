"""Run faults: what a run says when a disk, a file or another process fails under it.

A fault stops the run with ``RunFault`` (exit code 3): one message that says what failed,
where, and what to do, and the last complete checkpoint left as it was. Three kinds:

* a write that fails (a full disk, a quota, an I/O error, a read-only folder) while writing a
  checkpoint, the metrics, the run's files, the final model or the figures: ``write_fault``
  names the file or folder, the error, the free space there and the space it needs;
* another process of a multi-process run that stopped: ``lost_peer`` turns the error a
  collective raises when a peer's connection closes into that message;
* too many non-finite steps in a row (``hpt_dsl.train``).

``space_warning`` is the pre-flight check: a run folder whose free space cannot hold two
checkpoints (the newest, and the one before it to fall back on) and the final model.
"""

from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path

DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS)
_DISK_WORDS = ("no space left", "os error 28", "disk quota", "file too large", "input/output error",
               "read-only file system", "file write failed")
_PEER_WORDS = ("gloo", "nccl", "connection closed by peer", "connection reset by peer")


class RunFault(RuntimeError):
    """The run stopped on a fault; the last good checkpoint is intact (exit code 3)."""

    exit_code = 3


def human(n: float) -> str:
    """``6815744`` -> ``6.5 MB`` (powers of 1024)."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def is_disk_error(err: BaseException) -> bool:
    """A full disk, a quota, an I/O error or a read-only folder, as an ``OSError`` or as the
    text of a library's error (safetensors and torch wrap the OS error in their own)."""
    if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
        return True
    text = str(err).lower()
    return any(w in text for w in _DISK_WORDS)


def reason(err: BaseException) -> str:
    """The error in a few words: the OS's text for an ``OSError``, else the message's first line."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def write_fault(what: str, where: Path, err: BaseException, need: int | None = None, then: str = "") -> RunFault:
    """``could not write <what> to <where>: <reason>; <free> free there, it needs about <need>.
    <then>`` as a ``RunFault``."""
    free = free_bytes(where)
    space = f"{human(free)} free there" if free is not None else "free space unknown"
    if need:
        space += f"; it needs about {human(need)}"
    text = f"could not write {what} to {where}: {reason(err)} ({space})."
    return RunFault(f"{text} {then}".strip())


def space_warning(run_dir: Path, checkpoint: int, final_model: int) -> str | None:
    """A warning when ``run_dir``'s free space cannot hold two checkpoints and the final model."""
    free = free_bytes(run_dir)
    need = 2 * checkpoint + final_model
    if free is None or free >= need:
        return None
    return (f"{run_dir} has {human(free)} free, but a checkpoint needs about {human(checkpoint)}: two of them "
            f"(the newest and one to fall back on) and the final model need about {human(need)}. "
            "The run may stop with 'could not write'; free some space or choose another --output.")


def is_lost_peer(err: BaseException) -> bool:
    """The error a collective raises when another process of the run has gone: torch's
    distributed errors, or a RuntimeError from the gloo / NCCL backend (an error of the user's
    reward that mentions a connection is not one)."""
    if type(err).__name__ in ("DistBackendError", "DistNetworkError", "DistStoreError"):
        return True
    return isinstance(err, RuntimeError) and any(w in str(err).lower() for w in _PEER_WORDS)


def lost_peer(err: BaseException, rank: int, world: int, then: str) -> RunFault:
    """The message of process ``rank`` when another process of the run has stopped: the
    collective's error in one clause (``[pair.cc:537] Read error ...: Connection reset by peer.
    This is typically ...`` -> ``Read error ...: Connection reset by peer``)."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", reason(err)).split(". ")[0].rstrip(".")
    return RunFault(f"process {rank} of {world}: another process of this run stopped ({text}); stopping too. {then}")
