"""glibc malloc settings for a training process: freed memory is kept for the next step.

Every step allocates and frees the same large CPU tensors again (activations, gradients,
KV caches, logits). glibc serves a block above its mmap threshold with a fresh ``mmap`` and
gives it back with ``munmap``, and it returns free memory at the top of the heap to the
kernel once more than the trim threshold is free. Either way the next step faults the same
pages in again, each one zero-filled by the kernel: on the GRPO benchmark of
``bench/vs_trl.py`` about 20,000 page faults per step, 10-15% of the update's CPU time.

``keep_freed_memory()`` sets, once per process (``mallopt``):

    M_MMAP_THRESHOLD = 32 MiB   the largest value glibc accepts: smaller blocks come from the heap
    M_TRIM_THRESHOLD = 1 GiB    free heap memory stays mapped, ready for the next step

so one step's blocks serve the next. The peak memory of a step does not change; the
process just does not shrink between steps. Nothing is done off glibc, when the user set
any of these through the environment (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``),
or with ``HPT_DSL_MALLOC=default``.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30

_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (see the module docstring); True if set now
    or earlier in this process, False where nothing was changed."""
    global _done
    if _done:
        return True
    if os.environ.get("HPT_DSL_MALLOC") == "default" or platform.libc_ver()[0] != "glibc":
        return False
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    _done = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) & bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
