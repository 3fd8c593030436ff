"""The plain PyTorch learner: AdamW, a learning-rate schedule, gradient accumulation.

One ``update`` is one optimizer step over one optimizer mini-batch:

    rows  = the rows the loss gives weight (``used_rows(prep)``), sorted by length
    for each micro-batch of ``train.micro_batch`` rows, and at most ``train.micro_batch_tokens``
    padded tokens when set (padding trimmed to its own width):
        logprobs, entropy = fused_token_logprobs(decoder(prompt + response), lm_head, tau)
                            (the fused path, ``hpt_dsl.fused_logprob``: no (tokens x vocabulary)
                            logits; ``learner.fused_logprob = false`` or a model without a
                            head: token_logprobs(policy(prompt + response) / tau))
                            (each distinct prompt run once, see ``hpt_dsl.learner.prefix``)
        out = program.loss(prep, logprobs, rows, entropy, values=critic(...))
        (out.loss + out.value_loss).backward()      # micro-batch losses sum to the full loss
    g = clip_grad_norm(policy, train.grad_clip)      # skip everything if not finite
    optimizer.step(); scheduler.step()

The reference model (a frozen copy of the starting policy) exists only when the recipe has
a KL term; the critic (the policy's backbone with a scalar value head, its own AdamW at
``critic.lr``) only for ``adv=gae``. ``learner.gradient_checkpointing`` recomputes the policy's
and the critic's layer activations in the backward pass (transformers' checkpointing, not
reentrant); it turns prompt sharing off, since a checkpointed layer keeps no KV cache.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import Tensor, nn

from hpt_dsl.batch import TrainBatch, model_inputs, used_rows
from hpt_dsl.fused_logprob import Gather, fused_token_logprobs
from hpt_dsl.learner.base import TOTAL, Learner, UpdateResult, add_metrics, add_prepared_metrics, read_metrics
from hpt_dsl.learner.head import FusedHead, HeadMismatch, find_head, run
from hpt_dsl.learner.prefix import distinct_prompts, shared_prompt_logits
from hpt_dsl.logprob import token_logprobs
from hpt_dsl.models import save_pretrained
from hpt_dsl.recipe import Recipe
from hpt_dsl.settings import CriticSettings, TrainSettings

if TYPE_CHECKING:
    from hpt_dsl.estimator.program import LossProgram, Prepared


def lr_lambda(train: TrainSettings, total_updates: int) -> Any:
    """The schedule's multiplier of ``train.lr`` after ``s`` optimizer steps:

    constant: 1;  warmup: min(1, (s + 1) / W);  cosine: warmup, then 0.5 (1 + cos(pi p)),
    p = (s - W) / (total - W) the progress after warm-up.
    """
    W = max(train.warmup_steps, 0)

    def f(s: int) -> float:
        if train.schedule == "constant":
            return 1.0
        warm = min(1.0, (s + 1) / W) if W else 1.0
        if train.schedule == "warmup" or s < W:
            return warm
        p = min(1.0, (s - W) / max(1, total_updates - W))
        return 0.5 * (1.0 + math.cos(math.pi * p))

    return f


class ValueModel(nn.Module):
    """A critic: the policy's transformer body and a scalar head, V(prefix) per position."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.body = copy.deepcopy(policy.get_decoder() if hasattr(policy, "get_decoder") else policy.model)
        hidden = policy.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        h = self.body(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return self.head(h).squeeze(-1)


class TorchLearner(Learner):
    """Owns the policy, its AdamW and schedule; the reference model and critic when needed."""

    def __init__(self, recipe: Recipe, model: Any, tokenizer: Any) -> None:
        s = recipe.settings
        self.settings = s
        self.tokenizer = tokenizer
        self.model = model
        self.device = next(model.parameters()).device
        self.temperature = s.rollout.temperature
        self.with_entropy = recipe.needs.entropy
        self.share_prompts = s.learner.share_prompts  # turned off for good if the model's cache is not plain
        self.fused = s.learner.fused_logprob
        self._heads: dict[int, FusedHead | None] = {}  # per model: its fused head, None for the plain path
        self.autocast = s.learner.precision == "bf16"
        t = s.train
        self.total_updates = t.steps * t.mini_batches * t.epochs
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(t, self.total_updates))
        self.ref = None
        if recipe.needs.ref_model:
            self.ref = copy.deepcopy(model).eval().requires_grad_(False)
        self.critic: ValueModel | None = None
        self.critic_optimizer = None
        if recipe.needs.critic:
            c = s.critic or CriticSettings()
            self.critic = ValueModel(model).to(self.device)
            self.critic_optimizer = torch.optim.AdamW(self.critic.parameters(), lr=c.lr, betas=tuple(t.betas))
        if s.learner.gradient_checkpointing:
            for m in (model, None if self.critic is None else self.critic.body):
                if m is not None:
                    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.share_prompts = False  # a checkpointed layer keeps no KV cache
        self.model.train()
        if self.critic is not None:  # as the policy (a loaded model starts in eval mode, unchecked)
            self.critic.train()

    # ----- forward passes ---------------------------------------------------------------------

    def _head(self, model: Any) -> FusedHead | None:
        """``model``'s fused head, found once; None for the plain path (``learner.fused_logprob =
        false``, a model without a head, or one whose logits are not its head's)."""
        if not self.fused:
            return None
        if id(model) not in self._heads:
            self._heads[id(model)] = find_head(model, self._gather_for)
        return self._heads[id(model)]

    def _gather_for(self, params: list[Tensor]) -> Gather | None:
        """How to make ``params`` whole for the fused path: they are (ZeRO-3 overrides it)."""
        return None

    def _logprobs(
        self, model: nn.Module, mb: TrainBatch, with_entropy: bool, host: TrainBatch | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """(b, T) log pi(response token | prefix) at temperature tau, and the entropy. ``host``:
        the same rows on the CPU, where the distinct prompts are found (no device sync)."""
        head = self._head(model)
        try:
            return self._scored(model, head, mb, with_entropy, host)
        except HeadMismatch:  # the model's logits are not its head's: the plain path from now on
            self._heads[id(model)] = None
            return self._scored(model, None, mb, with_entropy, host)

    def _scored(
        self, model: nn.Module, head: FusedHead | None, mb: TrainBatch, with_entropy: bool, host: TrainBatch | None
    ) -> tuple[Tensor, Tensor | None]:
        """``_logprobs`` from the last hidden states and ``head`` (the fused path), or from the
        logits (``head`` None)."""
        y = mb.response_ids.to(self.device)
        shared = distinct_prompts(mb if host is None else host) if self.share_prompts else None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            split = None if shared is None else shared_prompt_logits(model, mb, self.device, *shared, head=head)
            if shared is not None and split is None:
                self.share_prompts = False
            if split is None:
                ids, mask, pos = model_inputs(mb, self.device)
                x, _ = run(model, head, y.shape[1] + 1, input_ids=ids, attention_mask=mask, position_ids=pos,
                           use_cache=False)  # fmt: skip
                parts = [(x[:, :-1], y)]
            else:
                first, rest = split
                parts = [(first, y[:, :1])] + ([(rest, y[:, 1:])] if rest.shape[1] else [])
            if head is not None:  # hidden states: one call over the response tokens, in autocast's dtype
                h = parts[0][0] if len(parts) == 1 else torch.cat([x for x, _ in parts], dim=1)
                return fused_token_logprobs(h, head.weight, y, self.temperature, with_entropy, bias=head.bias,
                                            chunk=self.settings.learner.logprob_chunk, gather=head.gather)
        scored = [token_logprobs(z, t, self.temperature, with_entropy) for z, t in parts]
        if len(scored) == 1:
            return scored[0]
        lp = torch.cat([p[0] for p in scored], dim=1)
        ent = torch.cat([p[1] for p in scored if p[1] is not None], dim=1) if with_entropy else None
        return lp, ent

    def _values(self, mb: TrainBatch, host: TrainBatch | None = None) -> Tensor:
        """(b, T) critic values V(prompt + response[:t]) for every response token t."""
        assert self.critic is not None
        ids, mask, pos = model_inputs(mb, self.device)
        P = mb.prompt_ids.shape[1]
        T = mb.response_ids.shape[1]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            v = self.critic(ids, mask, pos)
        return v[:, P - 1 : P - 1 + T].float()

    @torch.no_grad()
    def logprobs(self, batch: TrainBatch, which: Literal["policy", "ref"] = "policy") -> Tensor:
        model = self.model if which == "policy" else self.ref
        if model is None:
            raise RuntimeError("this recipe has no reference model (no KL term)")
        return self._no_grad_pass(batch, lambda mb, host: self._logprobs(model, mb, False, host)[0])

    @torch.no_grad()
    def values(self, batch: TrainBatch) -> Tensor:
        if self.critic is None:
            raise RuntimeError("this recipe has no critic (no adv=gae)")
        return self._no_grad_pass(batch, self._values)

    def _no_grad_pass(self, batch: TrainBatch, fn: Any, before: Callable[[int], None] | None = None) -> Tensor:
        """``fn(micro_batch, its host copy)`` over every row, in micro-batches, into (B, T).
        ``before(n)`` is told the number of micro-batches before the first one runs."""
        B, T = batch.response_ids.shape
        out = torch.zeros(B, T, dtype=torch.float32, device=batch.response_mask.device)
        host = batch.to("cpu")  # widths and prompts read on the host: one copy per pass
        chunks = self._micro_batches(host, torch.arange(B, device="cpu"))
        if before is not None:
            before(len(chunks))
        for idx in chunks:
            host_mb = host.select(idx)
            mb = batch.select(idx, like=host_mb)
            x = fn(mb, host_mb).float().to(out.device)
            out[idx.to(out.device), : x.shape[1]] = x * mb.response_mask
        return out

    def _micro_batches(self, host: TrainBatch, rows: Tensor) -> list[Tensor]:
        """``rows`` sorted by length, in chunks of ``train.micro_batch`` (less padding);
        ``host`` is the batch on the CPU. With ``train.micro_batch_tokens`` = N, a chunk also
        ends before the row that would take its padded tokens past N:

            tokens(chunk) = |chunk| * (max prompt length + max response length over the chunk)

        (the width it is trimmed to); a row longer than N alone is a chunk of its own."""
        if rows.numel() == 0:
            return []
        lengths = (host.prompt_mask.sum(1) + host.response_mask.sum(1))[rows]
        order = rows[torch.argsort(lengths, descending=True, stable=True)]
        size, budget = self.settings.train.micro_batch, self.settings.train.micro_batch_tokens
        if budget is None:
            return [order[i : i + size] for i in range(0, order.numel(), size)]
        p_len = (host.prompt_mask > 0).sum(1)[order].tolist()
        r_len = (host.response_mask > 0).sum(1)[order].tolist()
        chunks: list[Tensor] = []
        start, p_max, r_max = 0, 0, 1  # a trimmed batch keeps at least one response column
        for i, (p, r) in enumerate(zip(p_len, r_len, strict=True)):
            wide_p, wide_r = max(p_max, p), max(r_max, r)
            if i > start and ((i - start + 1) * (wide_p + wide_r) > budget or i - start == size):
                chunks.append(order[start:i])
                start, wide_p, wide_r = i, p, max(1, r)
            p_max, r_max = wide_p, wide_r
        chunks.append(order[start:])
        return chunks

    # ----- one optimizer step ----------------------------------------------------------------

    def update(self, batch: TrainBatch, program: LossProgram, prep: Prepared) -> UpdateResult:
        rows = used_rows(prep)
        host = batch.to("cpu")  # widths, token counts and prompts read on the host: one copy
        sums: dict[str, Tensor] = {}  # the loss and metrics, summed on the device, read once
        tokens = 0
        for idx in self._micro_batches(host, rows):
            host_mb = host.select(idx)
            mb = batch.select(idx, like=host_mb)
            lp, ent = self._logprobs(self.model, mb, self.with_entropy, host_mb)
            values = self._values(mb) if self.critic is not None else None
            rows_idx = idx.to(prep.response_mask.device)
            out = program.loss(prep, logprobs=lp, rows=rows_idx, entropy=ent, values=values)
            loss = out.loss if out.value_loss is None else out.loss + out.value_loss
            if loss.requires_grad:
                loss.backward()
            tokens += host_mb.n_tokens
            add_metrics(sums, {TOTAL: out.loss, **out.metrics})
        metrics = read_metrics(sums)
        total = metrics.pop(TOTAL, 0.0)
        add_prepared_metrics(metrics, prep)
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.train.grad_clip)
        finite = math.isfinite(total) and bool(torch.isfinite(grad_norm))
        if self.critic is not None:
            critic_norm = nn.utils.clip_grad_norm_(self.critic.parameters(), self.settings.train.grad_clip)
            finite = finite and bool(torch.isfinite(critic_norm))
            metrics["critic_grad_norm"] = float(critic_norm)
        if finite:
            self.optimizer.step()
            self.scheduler.step()
            if self.critic_optimizer is not None:
                self.critic_optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.critic_optimizer is not None:
            self.critic_optimizer.zero_grad(set_to_none=True)
        metrics["rows_used"] = float(rows.numel())
        metrics["lr"] = float(self.scheduler.get_last_lr()[0])
        return UpdateResult(metrics=metrics, grad_norm=float(grad_norm), skipped=not finite, tokens=tokens)

    def named_parameters(self) -> Iterable[tuple[str, Tensor]]:
        return self.model.named_parameters()

    # ----- state ------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        save_model(self.model, str(path / "policy.safetensors"))
        _save_optimizer(self.optimizer, path / "optimizer")
        (path / "scheduler.json").write_text(json.dumps(_scheduler_state(self.scheduler)))
        if self.critic is not None and self.critic_optimizer is not None:
            save_model(self.critic, str(path / "critic.safetensors"))
            _save_optimizer(self.critic_optimizer, path / "critic_optimizer")

    def load(self, path: Path) -> None:
        load_model(self.model, str(path / "policy.safetensors"), device=str(self.device))
        _load_optimizer(self.optimizer, path / "optimizer")
        self.scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
        if self.critic is not None and self.critic_optimizer is not None:
            load_model(self.critic, str(path / "critic.safetensors"), device=str(self.device))
            _load_optimizer(self.critic_optimizer, path / "critic_optimizer")

    def save_pretrained(self, path: Path) -> None:
        save_pretrained(self.model, self.tokenizer, path)


def _scheduler_state(scheduler: Any) -> dict[str, Any]:
    """The scheduler's plain state (its lambda is rebuilt from the settings: saved as None)."""
    return scheduler.state_dict()


def _save_optimizer(optimizer: torch.optim.Optimizer, stem: Path) -> None:
    """Optimizer state as ``stem.safetensors`` (tensors) + ``stem.json`` (everything else)."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    stem.with_suffix(".json").write_text(json.dumps({"param_groups": sd["param_groups"], "scalars": scalars}))


def _load_optimizer(optimizer: torch.optim.Optimizer, stem: Path) -> None:
    meta = json.loads(stem.with_suffix(".json").read_text())
    tensors = load_file(str(stem.with_suffix(".safetensors")))
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
