"""Processes and collectives: who am I in a run of several processes, and the few
collective operations the loop and the learners need.

A launcher (``deepspeed``, ``torchrun``) starts one process per device and sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. Without a
launcher every helper here answers for a single process (rank 0 of 1) and does nothing.
Only rank 0 writes logs, metrics and the shared files of a checkpoint (``is_main``).

This module is shared by the loop and the learners (a learner all-reduces, a DeepSpeed
engine asks the world size); the loop's own part of a run over processes, the question
sharding and the global prepare, is ``hpt_dsl.dist``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
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


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every process (a picklable object; rank 0's own when there is one
    process). Every process must call it at the same point."""
    if not active():
        return value
    box = [value]
    td.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


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
