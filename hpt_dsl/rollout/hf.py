"""The rollout engine on transformers models: batched, KV-cached sampling in one loop.

Prompts are left-padded into one batch (chunks of at most ``max_sequences`` sampled
sequences). Each distinct prompt is run through the model once (the prefill) and its KV
cache is repeated ``n`` times; then every step feeds the last sampled token of each
unfinished sequence and samples the next one::

    logprobs[t] = log_softmax(logits_t / tau)[token_t]          (recorded before filtering)
    token_t     ~ softmax(filter(logits_t / tau))               (top-k, then top-p; greedy: argmax)

Sampling is by inverse CDF, one uniform number per sequence (see ``_sample``), from a
generator seeded with ``params.seed``: the global random state is neither used nor changed.
The attention mask of the whole call (prompt padding, then ones) is allocated once and
each step passes the columns seen so far.

A sequence that samples an end-of-sequence token is finished, and its row leaves the batch
and the KV cache, so a step only computes the sequences still running (``generate`` keeps
computing finished ones until the longest is done). To keep that cheap the running rows
beyond the new batch size move into the rows just freed, and the others stay where they
are; with a cache of plain ``DynamicLayer`` s (full attention) only those moved rows are
copied, in place (``_select_rows``).

On a CPU, the decode steps of a float32 Llama-family model run through ``llama_step`` (one
function over the model's weights, with packed oneDNN products) instead of the model's
forward pass; the prefill always runs through transformers.

The engine samples with the learner's own model object, so after an update its weights
are already current and ``load_weights`` only copies tensors that are not shared.

Lockstep (a ZeRO-3 model over several processes). Every forward pass of a ZeRO-3 model
gathers each layer's parameters from all processes, so every process must run the same
number of forward passes, as transformers' ``synced_gpus`` generation does. Then, each
process's calls of the sampling loop are padded to the largest count over processes, and
after every step the processes agree (one all-reduce of a flag) whether any of them still
has a running sequence; one that has none (or no prompt at all) keeps joining with a
one-token forward pass whose output is dropped, until all are done. What each process
samples is unchanged. Sampling runs under ``torch.no_grad`` (never ``inference_mode``: a
ZeRO-3 model would gather its persistent parameters as inference tensors, which the next
training forward cannot save for backward).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from hpt_dsl.batch import pad_left, positions
from hpt_dsl.models import plain_cache
from hpt_dsl.rollout import llama_step
from hpt_dsl.rollout.base import Rollout, RolloutEngine, SamplingParams
from hpt_dsl.rollout.cpu_linear import onednn_linears
from hpt_dsl.rollout.kv import preallocate, sampling_attention, slot_layer
from hpt_dsl.settings import Settings


def filter_logits(x: Tensor, top_k: int, top_p: float) -> Tensor:
    """``x`` (rows, V) with the tokens outside the top-k, then outside the top-p nucleus, set
    to -inf. The nucleus is the smallest set of most likely tokens whose probability reaches
    ``top_p``; the most likely token is always kept."""
    if 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
        drop = before >= top_p
        drop[..., 0] = False
        x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return x


def _sample(x: Tensor, params: SamplingParams, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(next token, its log-prob log_softmax(x)[token]) of each row of ``x`` = logits / tau.

    The token is drawn by inverse CDF: with p the row's (filtered) probabilities and
    c_i = p_0 + ... + p_i, take u = (1 - r) c_{V-1} for r ~ U[0, 1) and the first i with
    c_i >= u, so that P(i) = P(c_{i-1} < u <= c_i) = p_i. u lies in (0, c_{V-1}], so i is
    always a token of nonzero probability. One random number a row instead of
    ``torch.multinomial``'s V exponentials; c is summed in float64 so that even tiny
    probabilities keep their share."""
    lp = torch.log_softmax(x, dim=-1)
    if params.greedy:
        nxt = x.argmax(-1)
    else:
        if params.top_k == 0 and params.top_p >= 1.0:
            probs = lp.exp()
        else:
            probs = torch.softmax(filter_logits(x, params.top_k, params.top_p), dim=-1)
        r = torch.rand(x.shape[0], 1, dtype=torch.float64, generator=gen, device=x.device)
        nxt = _inverse_cdf(probs, 1 - r)
    return nxt, lp.gather(1, nxt[:, None]).squeeze(1)


SAMPLE_BLOCK = 1024
"""Vocabularies larger than this are searched block by block (``_inverse_cdf``)."""


def _inverse_cdf(probs: Tensor, q: Tensor) -> Tensor:
    """Per row, the first index i with c_i >= q * c_{V-1}, c the float64 running sum of
    ``probs`` (rows, V) and q in (0, 1] of shape (rows, 1).

    A vocabulary of more than ``SAMPLE_BLOCK`` tokens is searched in two levels, which
    avoids a sequential float64 running sum over all V columns (on a CPU the largest cost
    of sampling at V = 49,152): the running sum of the blocks' float64 sums picks the block
    where c crosses the target, and the running sum inside that block alone picks the
    token. It is the same c up to float64 rounding (the distribution is the same; a draw
    within ~1e-16 of a boundary may land on the neighbour). Non-finite logits (weights that
    diverged) give a NaN c, which searchsorted places past the end: the index is kept in
    the vocabulary, so that the NaN log-prob reaches the loop's non-finite check (a skipped
    step, then exit 3) instead of an index error here."""
    rows, vocab = probs.shape
    if vocab <= SAMPLE_BLOCK:
        cdf = probs.double().cumsum(-1)
        return torch.searchsorted(cdf, q * cdf[:, -1:]).squeeze(1).clamp(max=vocab - 1)
    blocks = -(-vocab // SAMPLE_BLOCK)
    padded = torch.nn.functional.pad(probs, (0, blocks * SAMPLE_BLOCK - vocab)) if vocab % SAMPLE_BLOCK else probs
    padded = padded.view(rows, blocks, SAMPLE_BLOCK)
    block_cdf = padded.sum(-1, dtype=torch.float64).cumsum(-1)
    target = q * block_cdf[:, -1:]
    block = torch.searchsorted(block_cdf, target).clamp(max=blocks - 1)  # (rows, 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), torch.zeros_like(target))
    inner = padded.gather(1, block[:, :, None].expand(rows, 1, SAMPLE_BLOCK)).squeeze(1).double().cumsum(-1)
    # rounding may put the rest of the target a hair outside (0, block total]: clamping it
    # there keeps the draw on a token of nonzero probability inside the block
    rest = torch.minimum((target - before).clamp(min=torch.finfo(torch.float64).tiny), inner[:, -1:])
    within = torch.searchsorted(inner, rest).clamp(max=SAMPLE_BLOCK - 1)
    return (block * SAMPLE_BLOCK + within).squeeze(1).clamp(max=vocab - 1)


def _compact_order(done: Tensor) -> Tensor:
    """The rows that keep running, as indices into the current batch, ordered so that few
    move: row i of the new batch (of k rows) is old row i, except where old row i is
    finished; those slots take, in order, the running rows at k and beyond."""
    running = torch.nonzero(~done).squeeze(1)
    k = running.numel()
    order = torch.arange(k, device=done.device)
    order[torch.nonzero(done[:k]).squeeze(1)] = running[running >= k]
    return order


def _select_rows(cache: Any, order: Tensor) -> None:
    """``cache.batch_select_indices(order)``; when every layer is a ``SlotLayer`` (a plain
    cache after ``preallocate``), done in place by copying only the rows i with
    ``order[i] != i`` (all reads happen before the writes) and then keeping the first
    ``len(order)`` rows, a view."""
    layers = getattr(cache, "layers", ())
    if not layers or not all(type(x) is slot_layer() for x in layers):
        cache.batch_select_indices(order)
        return
    moved = torch.nonzero(order != torch.arange(order.numel(), device=order.device)).squeeze(1)
    for layer in layers:
        layer.select_rows(moved, order[moved], order.numel())


class HFRolloutEngine(RolloutEngine):
    """Samples with the model's own forward pass and KV cache; shares the model with the
    torch learner."""

    max_sequences = 512  # sampled sequences per call of the sampling loop (memory bound)

    def __init__(self, model: Any, tokenizer: Any, settings: Settings | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        eos = getattr(model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else [eos])
        self._last_only = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.autocast = autocast_dtype(settings, next(model.parameters()).dtype)
        self._fused = False  # for the length of a sampling call: decode with llama_step

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        per_call = max(1, self.max_sequences // params.n)
        starts = list(range(0, len(prompts), per_call))
        lockstep = self.lockstep
        if lockstep:  # every process runs as many calls as the busiest; the extra ones sample nothing
            starts += [len(prompts)] * (_max_over_processes(len(starts), self._device()) - len(starts))
        out: list[Rollout] = []
        for start in starts:
            chunk = prompts[start : start + per_call]
            for r in self._generate(chunk, params, seed=params.seed + start, lockstep=lockstep):
                out.append(Rollout(r.prompt_index + start, r.token_ids, r.logprobs, r.finish_reason))
        return out

    @property
    def lockstep(self) -> bool:
        return sharded_over_processes(self.model)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _idle_forward(self, device: torch.device) -> None:
        """One forward pass of one padding token, output dropped: a process's share of a
        lockstep step in which it has nothing to sample."""
        one = torch.full((1, 1), self.pad_id, dtype=torch.long, device=device)
        self._forward(one, torch.ones_like(one), torch.zeros_like(one), None)

    @contextlib.contextmanager
    def _sampling(self) -> Iterator[None]:
        """The model in eval mode with the sampling kernels (``kv.sampling_attention``,
        ``cpu_linear.onednn_linears``, the decode step of ``llama_step`` where it applies) for
        one call of the sampling loop; all restored on exit."""
        was_training = self.model.training
        self.model.eval()
        try:
            model = self.model
            self._fused = self.autocast is None and llama_step.eligible(model) and llama_step.memory_allows(model)
            with sampling_attention(self.model), onednn_linears(self.model, enabled=self.autocast is None):
                yield
        finally:
            self._fused = False
            self.model.train(was_training)

    def _forward(self, ids: Tensor, mask: Tensor, pos: Tensor, cache: Any) -> tuple[Tensor, Any]:
        """(float logits of the last position, the KV cache) after feeding ``ids``."""
        extra = {"logits_to_keep": 1} if self._last_only else {}
        low = self.autocast
        with torch.autocast(ids.device.type, dtype=low or torch.float32, enabled=low is not None):
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True, **extra
            )
        return out.logits[:, -1].float(), out.past_key_values

    @torch.no_grad()  # not inference_mode: see the module docstring (ZeRO-3)
    def _generate(
        self, prompts: list[list[int]], params: SamplingParams, seed: int, lockstep: bool = False
    ) -> list[Rollout]:
        n, steps, tau = params.n, params.max_new_tokens, params.temperature
        device = self._device()
        if not prompts:  # lockstep only: join the other processes' forward passes
            if lockstep:
                self._idle(steps, device)
            return []
        ids, mask = pad_left(prompts, self.pad_id)
        ids, mask = ids.to(device), mask.to(device)
        B = len(prompts) * n
        tokens = torch.full((B, max(steps, 1)), self.pad_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(B, max(steps, 1), dtype=torch.float32, device=device)
        length = torch.full((B,), steps, dtype=torch.long, device=device)
        stopped = torch.zeros(B, dtype=torch.bool, device=device)
        eos = torch.tensor(sorted(self.eos_ids), dtype=torch.long, device=device)
        gen = torch.Generator(device).manual_seed(seed)
        with self._sampling():
            pos = positions(mask)
            logits, cache = self._forward(ids, mask, pos, None) if steps else (None, None)
            if n > 1 and cache is not None:  # one prefill per prompt, its cache shared by its n samples
                cache.batch_repeat_interleave(n)
                logits = logits.repeat_interleave(n, dim=0)
            step = None
            if steps > 1 and plain_cache(cache):  # the steps write into buffers of the final width
                preallocate(cache, mask.shape[1] + steps)
                step = llama_step.LlamaDecodeStep(self.model, rows=B) if self._fused else None
            width = mask.shape[1]  # the step-t token is column width + t of the mask
            full_mask = mask.new_ones(B, width + steps)
            full_mask[:, :width] = mask.repeat_interleave(n, dim=0)
            rows = torch.arange(B, device=device)  # the sequences still running
            pos = full_mask[:, :width].sum(1)  # position of the next token of each row
            for t in range(steps):
                assert logits is not None
                if rows.numel():  # (in lockstep a process may be done while others run)
                    nxt, lp = _sample(logits / tau if tau != 1.0 else logits, params, gen)
                    tokens[rows, t] = nxt
                    logprobs[rows, t] = lp
                    done = torch.isin(nxt, eos)
                    if bool(done.any()):
                        stopped[rows[done]] = True
                        length[rows[done]] = t + 1
                        order = _compact_order(done)
                        rows, nxt, full_mask, pos = rows[order], nxt[order], full_mask[order], pos[order]
                        if t + 1 < steps and order.numel():
                            _select_rows(cache, order)
                if t + 1 == steps:  # the last step for every process: no vote
                    break
                more = rows.numel() > 0
                if not (_any_process(more, device) if lockstep else more):
                    break
                if not more:  # lockstep: done here, still running elsewhere
                    self._idle_forward(device)
                    continue
                if step is not None:
                    logits = step(nxt, pos, full_mask[:, : width + t + 1], cache)
                else:
                    logits, cache = self._forward(nxt[:, None], full_mask[:, : width + t + 1], pos[:, None], cache)
                pos = pos + 1
        token_rows, logprob_rows = tokens.tolist(), logprobs.tolist()
        length, stopped = length.tolist(), stopped.tolist()
        return [
            Rollout(
                prompt_index=row // n,
                token_ids=tuple(token_rows[row][: length[row]]),
                logprobs=tuple(logprob_rows[row][: length[row]]),
                finish_reason="stop" if stopped[row] else "length",
            )
            for row in range(B)
        ]

    def _idle(self, steps: int, device: torch.device) -> None:
        """A lockstep call without prompts: the prefill, then per step but the last one vote and,
        while any process has a running sequence, one forward pass (``_generate``'s count)."""
        with self._sampling():
            if steps:
                self._idle_forward(device)
            for _ in range(steps - 1):
                if not _any_process(False, device):
                    break
                self._idle_forward(device)

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in named_tensors:
                target = params[name]
                if target.data_ptr() != tensor.data_ptr():
                    target.copy_(tensor)


def autocast_dtype(settings: Settings | None, weights: torch.dtype) -> torch.dtype | None:
    """The dtype the sampler's forward passes autocast to: ``rollout.dtype`` when it is set and
    lower than the weights' (the engine samples with the learner's own weights), else None."""
    want = settings.rollout.dtype if settings is not None else None
    if want is None or getattr(torch, want) == weights:
        return None
    if getattr(torch, want) == torch.float32:
        from hpt_dsl.rollout.vllm import RolloutEngineError

        have = str(weights).removeprefix("torch.")
        raise RolloutEngineError(
            f"rollout.dtype = float32 but the hf engine samples with the learner's {have} weights and cannot "
            "raise their precision; leave rollout.dtype unset, or use rollout.engine=vllm"
        )
    return getattr(torch, want)


def sharded_over_processes(model: Any) -> bool:
    """True when ``model``'s parameters are ZeRO-3 partitions over several processes: then
    every forward pass is collective, and sampling runs in lockstep."""
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized() and td.get_world_size() > 1):
        return False
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _max_over_processes(value: int, device: torch.device) -> int:
    """max over processes of ``value`` (one all-reduce)."""
    import torch.distributed as td

    on = device if td.get_backend() == "nccl" else torch.device("cpu")  # NCCL reduces on the GPU, gloo on the CPU
    t = torch.full((1,), value, dtype=torch.long, device=on)
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return int(t.item())


def _any_process(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is True on any process (one all-reduce)."""
    return _max_over_processes(int(flag), device) > 0
