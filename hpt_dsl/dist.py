"""One training run over several processes: ranks, question sharding, the global prepare.

Who am I and the collectives are ``hpt_dsl.comm`` (re-exported here: ``dist.rank()``,
``dist.all_reduce_sum(...)``); this module is the loop's part.

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

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hpt_dsl.comm import (  # noqa: F401  (re-exported: the loop's one module for processes)
    active,
    all_gather_rows,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    init,
    is_main,
    local_rank,
    rank,
    spawn,
    sum_metrics,
    world_size,
)

if TYPE_CHECKING:
    from hpt_dsl.estimator.program import LossProgram, Prepared


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


# ----- the global prepare --------------------------------------------------------------------

_ROW_TENSORS = ("response_mask", "rewards", "group_ids", "is_demo", "old_logprobs", "ref_logprobs", "values",
                "rollout_logprobs")


def prepare(program: LossProgram, **inputs: Any) -> Prepared:
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


def local_rows(prep: Prepared, rows: slice, width: int) -> Prepared:
    """The prepared mini-batch restricted to ``rows`` and to the first ``width`` response
    columns (``Prepared.local``)."""
    return prep.local(rows, width)
