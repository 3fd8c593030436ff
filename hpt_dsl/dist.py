"""One training run over several processes: ranks, question sharding, the global prepare.

A launcher (``deepspeed``, ``torchrun``) starts one process per device and sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. Without a
launcher every helper here answers for a single process (rank 0 of 1) and does nothing.

Data parallel, per optimizer mini-batch:

1. ``shard(n_questions)`` gives each rank a contiguous block of the step's questions;
   a question's rollouts, rewards and gate statistics never leave its rank.
2. ``prepare(program, ...)`` replaces ``program.prepare(...)``: it gathers the small
   per-row inputs of all ranks (rewards, group ids, masks, old / ref log-probs, values:
   (B,) and (B, T) tensors, no activations), runs the estimator's ``prepare`` on the
   global mini-batch, identically on every rank, and keeps this rank's rows. So every
   normaliser that spans the batch (token counts, sequence counts, batch-whitened
   advantages, gate shares) is the one-process value, for every component, without a
   component having to know it runs distributed::

       loss = sum_r sum_{i in rows(r), t} c_{i,t} * l_{i,t}      (c from the global prepare)

   Each rank's micro-batch losses sum to its share; the shares sum to the one-process loss.
3. The learner all-reduces gradients (DeepSpeed averages them, so it scales its loss by
   the world size) and sums the additive metrics over ranks (``sum_metrics``).

Only rank 0 writes logs, metrics and the shared files of a checkpoint (``is_main``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import fields, replace
from typing import Any

import torch
import torch.distributed as td
from torch import Tensor

# ----- who am I ------------------------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip().isdigit() else default


def world_size() -> int:
    """Number of processes in the run (1 without a launcher)."""
    if td.is_available() and td.is_initialized():
        return td.get_world_size()
    return max(1, _env_int("WORLD_SIZE", 1))


def rank() -> int:
    """This process's global rank, 0 .. world_size() - 1."""
    if td.is_available() and td.is_initialized():
        return td.get_rank()
    return _env_int("RANK", 0)


def local_rank() -> int:
    """This process's rank on its machine (its device index)."""
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """True on the one process that writes logs, metrics and checkpoints' shared files."""
    return rank() == 0


def active() -> bool:
    """True when a process group with more than one process is up."""
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def init(backend: str | None = None) -> None:
    """Start the process group from the launcher's environment (no-op for one process or
    when it is already up). backend: 'nccl' on CUDA, else 'gloo'."""
    if world_size() <= 1 or (td.is_available() and td.is_initialized()):
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    td.init_process_group(backend=backend)


def spawn(fn: Callable[..., Any], world: int, *args: Any) -> None:
    """Run ``fn(*args)`` in ``world`` fresh local processes, with the environment a launcher
    would set, each with ``cpus / world`` torch threads (tests and benchmarks on one machine;
    real runs use ``deepspeed`` or ``torchrun``). Raises when any process fails."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_spawned, args=(fn, world, port, args), nprocs=world, start_method="spawn")


def _spawned(rank_: int, fn: Callable[..., Any], world: int, port: int, args: tuple[Any, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank_), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank_), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    fn(*args)
    if td.is_available() and td.is_initialized():  # leave together: a process that exits while
        td.barrier()  # another still talks to it can abort inside gloo's threads
        td.destroy_process_group()


def barrier() -> None:
    if active():
        td.barrier()


def _comm_device() -> torch.device:
    """Where collectives run: the current CUDA device under NCCL, else the CPU."""
    if active() and td.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----- reductions ----------------------------------------------------------------------------


def all_reduce_sum(x: Tensor) -> Tensor:
    """sum_r x_r, as a new tensor on x's device (x itself when there is one process)."""
    if not active():
        return x
    y = x.detach().to(_comm_device(), copy=True)
    td.all_reduce(y, op=td.ReduceOp.SUM)
    return y.to(x.device)


def all_reduce_max(value: int) -> int:
    """max_r value_r (e.g. the number of micro-batches every rank must run)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.long, device=_comm_device())
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return int(t.item())


def sum_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Additive metrics (each rank holds its rows' share) summed over ranks. Every rank must
    pass the same keys; a key missing on some rank counts as 0 there."""
    if not active():
        return dict(metrics)
    keys = _union_keys(list(metrics))
    values = torch.tensor([float(metrics.get(k, 0.0)) for k in keys], dtype=torch.float64, device="cpu")
    total = all_reduce_sum(values)
    return {k: float(v) for k, v in zip(keys, total.tolist(), strict=True)}


def _union_keys(keys: list[str]) -> list[str]:
    gathered: list[list[str] | None] = [None] * td.get_world_size()
    td.all_gather_object(gathered, keys)
    return sorted({k for part in gathered for k in (part or [])})


# ----- sharding ------------------------------------------------------------------------------


def shard(n: int, rank_: int | None = None, world: int | None = None) -> range:
    """The contiguous block of ``range(n)`` owned by a rank; the first ``n % world`` ranks
    hold one item more. Concatenating the blocks of ranks 0, 1, ... gives ``range(n)``, so
    the gathered mini-batch has the rows in the one-process order."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))


def all_gather_rows(x: Tensor) -> tuple[Tensor, list[int]]:
    """Concatenate the ranks' tensors along dim 0 (rank order). Sizes may differ in every
    dim: dims past the first are zero-padded to the largest. Returns (tensor, rows per rank)."""
    if not active():
        return x, [int(x.shape[0])]
    w = td.get_world_size()
    dev = _comm_device()
    shape = torch.tensor(list(x.shape), dtype=torch.long, device=dev)
    shapes = [torch.zeros_like(shape) for _ in range(w)]
    td.all_gather(shapes, shape)
    sizes = [[int(v) for v in s.tolist()] for s in shapes]
    full = [max(s[d] for s in sizes) for d in range(x.dim())]
    wire = x.to(torch.uint8) if x.dtype == torch.bool else x  # gloo has no bool collectives
    padded = torch.zeros(full, dtype=wire.dtype, device=dev)
    padded[tuple(slice(0, n) for n in x.shape)] = wire.to(dev)
    parts = [torch.empty_like(padded) for _ in range(w)]
    td.all_gather(parts, padded)
    rows = [s[0] for s in sizes]
    out = torch.cat([p[:n] for p, n in zip(parts, rows, strict=True)]).to(x.device)
    return (out.bool() if x.dtype == torch.bool else out), rows


# ----- the global prepare --------------------------------------------------------------------

_ROW_TENSORS = ("response_mask", "rewards", "group_ids", "is_demo", "old_logprobs", "ref_logprobs", "values",
                "rollout_logprobs")


def prepare(program: Any, **inputs: Any) -> Any:
    """``program.prepare(**inputs)`` over the global mini-batch, returned for this rank's rows.

    inputs are this rank's rows (the keyword arguments of ``LossProgram.prepare``). Group
    ids are made unique across ranks by offsetting each rank's ids past the previous ranks'
    largest id, which keeps the questions in rank order. With one process this is exactly
    ``program.prepare(**inputs)``.
    """
    if not active():
        return program.prepare(**inputs)
    local_b, local_t = (int(n) for n in inputs["response_mask"].shape)
    gathered = dict(inputs)
    rows = [local_b]
    for name in _ROW_TENSORS:
        x = inputs.get(name)
        if x is not None:
            gathered[name], rows = all_gather_rows(x)
    group_ids = inputs.get("group_ids")
    if group_ids is not None:
        gathered["group_ids"] = _offset_groups(group_ids, gathered["group_ids"], rows)
    prep = program.prepare(**gathered)
    start = sum(rows[: rank()])
    return local_rows(prep, slice(start, start + local_b), local_t)


def _offset_groups(local: Tensor, gathered: Tensor, rows: list[int]) -> Tensor:
    top = torch.tensor([int(local.max().item()) + 1 if local.numel() else 0], dtype=torch.long, device="cpu")
    tops, _ = all_gather_rows(top)
    offsets = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long, device="cpu"), tops[:-1]]), 0)
    per_row = torch.repeat_interleave(offsets, torch.tensor(rows, device="cpu"))
    return gathered.to(torch.long) + per_row.to(gathered.device)


# Prepared fields: per row (sliced to this rank's rows) or about the whole batch (kept).
_PER_ROW = {"response_mask", "coef", "adv", "tok", "row_metrics", "old_logprobs", "ref_logprobs", "returns",
            "old_values", "value_coef", "tis", "silent_metrics"}
_WHOLE_BATCH = {"live", "shares", "old_is_current", "stats", "weights", "moments"}


def local_rows(prep: Any, rows: slice, width: int) -> Any:
    """The prepared mini-batch restricted to ``rows`` and to the first ``width`` response
    columns. Per-question statistics and gate weights stay global (they are about questions,
    and every rank reports the same values)."""
    unknown = {f.name for f in fields(prep)} - _PER_ROW - _WHOLE_BATCH
    if unknown:
        raise NotImplementedError(f"hpt_dsl.dist.local_rows does not know Prepared fields {sorted(unknown)}; "
                                  "add each to _PER_ROW or _WHOLE_BATCH")

    def cut(x: Any) -> Any:
        if isinstance(x, Tensor):
            x = x[rows]
            return x[:, :width] if x.dim() == 2 and x.shape[1] > 1 else x
        if isinstance(x, list):
            return [cut(v) for v in x]
        if isinstance(x, tuple):
            return tuple(cut(v) for v in x)
        if isinstance(x, dict):
            return {k: cut(v) for k, v in x.items()}
        return x

    return replace(prep, **{name: cut(getattr(prep, name)) for name in _PER_ROW})
