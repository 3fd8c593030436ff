"""The DeepSpeed learner: the plain learner's math on DeepSpeed's engine (ZeRO 0-3, bf16,
CPU offload), data parallel over the processes a launcher starts.

Per optimizer mini-batch, on each rank r of W (its questions' rows, ``prep`` from
``hpt_dsl.dist.prepare``, so every normaliser is the global one)::

    n     = max over ranks of this rank's micro-batch count (ZeRO-2/3 reduce and gather in
            every pass: every rank runs the same number; a rank with fewer runs 0-weight passes)
    for each micro-batch i < n, boundary = (i == n - 1):
        loss_i = W * program.loss(prep, rows_i)       # DeepSpeed averages gradients over W
        engine.backward(loss_i); engine.step()        # the update happens at the boundary
    => grad = sum_r sum_i grad(loss_i) / W = the one-process gradient

The number of micro-batches may differ between ranks and between updates (token budgets,
``train.micro_batch_tokens``): the accumulation boundary is set by hand at the last one, and
DeepSpeed's ``gradient_accumulation_steps`` only sizes its config (the loss is not scaled by it).
At ZeRO-3 the fused log-prob path gathers the output head for its chunks (forward and backward).

Gradient clipping (``train.grad_clip``), the AdamW step and the schedule run inside the
engine. A non-finite loss turns the gradients to NaN, and a step with a non-finite
gradient norm is skipped (DeepSpeed's overflow check; our own at ZeRO 0 in fp32).

On CPU (tests, this machine) the engine runs on DeepSpeed's CPU accelerator with gloo and
torch.optim.AdamW; on CUDA, NCCL and DeepSpeed's fused AdamW. The model arrives on the host:
at stages 0-2 the engine moves it to the device; at stage 3 ``_partition`` partitions it one
parameter at a time (never the whole model on one device). Per update the learner reads the
batch back to the host once (widths, token counts, distinct prompts) and sums the loss and
metrics on the device, read once: no host synchronisation per micro-batch. Checkpoints are DeepSpeed's
own (every rank writes its shard; rank 0 the shared files), read back with
``torch.load(weights_only=True)``. ``save_pretrained`` consolidates the full-precision
weights (gathered across ranks under ZeRO-3) into one Hugging Face checkpoint on rank 0.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from hpt_dsl import comm
from hpt_dsl.batch import TrainBatch, used_rows
from hpt_dsl.learner.base import TOTAL, UpdateResult, add_metrics, add_prepared_metrics, read_metrics
from hpt_dsl.learner.ds_config import Config, build_config
from hpt_dsl.learner.torch import TorchLearner
from hpt_dsl.recipe import Recipe

if TYPE_CHECKING:
    from hpt_dsl.estimator.program import LossProgram, Prepared

STATE_FILE = "deepspeed.json"
TOKENS = "\0tokens"
"""The key under which an update's token count travels with the metrics (not a metric)."""


def import_deepspeed() -> Any:
    """``import deepspeed`` without its CPU-only overheads: the CPU accelerator is named (no
    probing), and its shared-memory all-reduce op, which only DeepSpeed's inference path
    uses and which would be JIT-compiled (minutes) at the first ``initialize``, is left
    unbuilt: training collectives go through gloo. DeepSpeed's own log (on stdout, where
    ``--json-logs`` writes metrics) shows warnings only; ``HPT_DSL_DEEPSPEED_LOG=info``
    shows everything."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops
    from deepspeed.utils import logger

    logger.setLevel(os.environ.get("HPT_DSL_DEEPSPEED_LOG", "warning").upper())

    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def init_distributed() -> None:
    """The process group, from the launcher's environment; a lone process gets a one-rank
    group on a free local port (DeepSpeed needs one even then)."""
    deepspeed = import_deepspeed()
    if "RANK" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    if torch.cuda.is_available():
        torch.cuda.set_device(comm.local_rank())
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def _safe_checkpoint_engine(config: Any) -> Any:
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True``: only tensors,
    containers and the few DeepSpeed value classes below are ever unpickled."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            with torch.serialization.safe_globals(allowed):
                try:
                    return torch.load(path, map_location=map_location, weights_only=True)
                except Exception as err:  # an UnpicklingError names the refused class
                    raise ValueError(f"{path}: not a checkpoint written by the DeepSpeed learner "
                                     f"({str(err).splitlines()[0]})") from None

    return SafeCheckpointEngine(config)


def _optimizer_params(optimizer: torch.optim.Optimizer) -> Config:
    """AdamW's hyper-parameters; the base learning rate, before any schedule scaled it."""
    group = optimizer.param_groups[0]
    return {"lr": group.get("initial_lr", group["lr"]), "betas": list(group["betas"]), "eps": group["eps"],
            "weight_decay": group["weight_decay"]}


class DeepSpeedLearner(TorchLearner):
    """The plain learner's forward passes and loss, with DeepSpeed engines for the policy
    (and the critic) doing backward, reduction, clipping, the optimizer step and checkpoints."""

    def __init__(self, recipe: Recipe, model: Any, tokenizer: Any, config: Config | None = None) -> None:
        cuda = torch.cuda.is_available()
        self.world = comm.world_size()
        self.config = config if config is not None else build_config(recipe.settings, self.world, cuda)
        self.zero_stage = int(self.config["zero_optimization"]["stage"])
        self.bf16 = bool(self.config.get("bf16", {}).get("enabled"))
        self.saved_dtype = next(model.parameters()).dtype
        super().__init__(recipe, model, tokenizer)  # AdamW, schedule, reference model, critic
        self.autocast = False  # DeepSpeed holds bf16 weights itself when learner.precision = bf16
        if self.zero_stage == 3:  # each forward gathers parameters: one forward per micro-batch on every rank
            self.share_prompts = False
        deepspeed = import_deepspeed()
        init_distributed()
        self.engine = self._engine(deepspeed, model, self.optimizer, self.scheduler, self.config)
        self.model = self.engine.module
        self.device = self.engine.device
        self.critic_engine = None
        if self.critic is not None and self.critic_optimizer is not None:
            self.critic_engine = self._engine(deepspeed, self.critic, self.critic_optimizer, None,
                                              self.config)
            self.critic = self.critic_engine  # forwards go through the engine (ZeRO-3 hooks)
        if self.ref is not None:  # parameters in bf16 with the policy; buffers (rotary frequencies) as they are
            self.ref.to(self.device)
            for p in self.ref.parameters():
                p.data = p.data.to(torch.bfloat16 if self.bf16 else p.dtype)

    @staticmethod
    def _engine(deepspeed: Any, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                config: Config) -> Any:
        """One DeepSpeed engine. On CUDA the config names DeepSpeed's AdamW (with the torch
        optimizer's hyper-parameters) and the schedule is rebuilt on its optimizer."""
        config = json.loads(json.dumps(config))
        if int(config["zero_optimization"]["stage"]) == 3:
            _partition(deepspeed, module, config)
        if "optimizer" in config:
            section = config["optimizer"]
            section["params"] = {**section.get("params", {}), **_optimizer_params(optimizer)}
            lam = scheduler.lr_lambdas[0] if scheduler is not None else None

            def schedule(opt: Any) -> Any:
                return torch.optim.lr_scheduler.LambdaLR(opt, lam)

            engine, *_ = deepspeed.initialize(
                model=module, model_parameters=[p for p in module.parameters() if p.requires_grad],
                config=config, lr_scheduler=None if lam is None else schedule,
            )
        else:
            engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                              config=config)
        engine.checkpoint_engine = _safe_checkpoint_engine(engine._config)
        return engine

    # ----- forward passes ---------------------------------------------------------------------

    def _gather_for(self, params: list[Tensor]) -> Any:
        """ZeRO-3: the fused log-prob path gathers the output head (a collective: every rank
        runs the same passes); None for parameters that are whole (the reference model's)."""
        if not any(hasattr(p, "ds_id") for p in params):
            return None
        deepspeed = import_deepspeed()
        return lambda: deepspeed.zero.GatheredParameters(params)

    @torch.no_grad()
    def logprobs(self, batch: TrainBatch, which: Literal["policy", "ref"] = "policy") -> Tensor:
        if which == "ref":
            return super().logprobs(batch, "ref")  # the frozen copy: a plain module, no collectives
        return self._collective_pass(batch, lambda mb, host: self._logprobs(self.engine, mb, False, host)[0])

    @torch.no_grad()
    def values(self, batch: TrainBatch) -> Tensor:
        if self.critic_engine is None:
            raise RuntimeError("this recipe has no critic (no adv=gae)")
        return self._collective_pass(batch, self._values)

    def _collective_pass(self, batch: TrainBatch, fn: Any) -> Tensor:
        """The plain learner's no-grad pass; under ZeRO-3 every forward gathers parameters from
        all ranks, so every rank runs as many passes as the busiest (extra ones on one row),
        agreed on before the first pass (a rank's forward waits for every rank's gathers)."""
        extra = [0]

        def agree(mine: int) -> None:
            if self.zero_stage == 3:
                extra[0] = comm.all_reduce_max(mine) - mine

        out = self._no_grad_pass(batch, fn, agree)
        for _ in range(extra[0]):
            filler = self._filler()
            fn(filler, filler)
        return out

    def _filler(self) -> TrainBatch:
        """A one-row batch (one padding token as prompt and as response) for a rank's extra
        (0-weight) passes; on the CPU, where ``_logprobs`` and ``_values`` move what they use."""
        pad = int(self.tokenizer.pad_token_id or 0) if self.tokenizer is not None else 0
        one = torch.full((1, 1), pad, dtype=torch.long, device="cpu")
        return TrainBatch(prompt_ids=one, prompt_mask=torch.ones_like(one), response_ids=one,
                          response_mask=torch.zeros_like(one), group_ids=torch.zeros_like(one[0]),
                          is_demo=torch.zeros_like(one[0], dtype=torch.bool),
                          rewards=torch.zeros_like(one[0], dtype=torch.float32))

    # ----- one optimizer step ----------------------------------------------------------------

    def update(self, batch: TrainBatch, program: LossProgram, prep: Prepared) -> UpdateResult:
        rows = used_rows(prep)
        host = batch.to("cpu")  # widths, token counts and prompts read on the host: one copy
        chunks: list[Tensor | None] = list(self._micro_batches(host, rows))
        n = comm.all_reduce_max(len(chunks))
        chunks += [None] * (n - len(chunks))
        engines = [e for e in (self.engine, self.critic_engine) if e is not None]
        if n == 0:  # no row carries weight on any rank: as the plain learner, nothing moves
            return self._empty_update(prep, engines)
        sums: dict[str, Tensor] = {}  # the loss and metrics, summed on the device, read once
        tokens = 0
        for i, idx in enumerate(chunks):
            for e in engines:
                e.set_gradient_accumulation_boundary(i == n - 1)
            host_mb = self._filler() if idx is None else host.select(idx)
            policy_loss, value_loss = self._micro_loss(batch, host_mb, program, prep, idx, sums)
            if idx is not None:
                tokens += host_mb.n_tokens
            policy_loss, value_loss = _poison_unless_finite(policy_loss, value_loss)
            self.engine.backward(policy_loss, scale_wrt_gas=False)
            if self.critic_engine is not None and value_loss is not None:
                self.critic_engine.backward(value_loss, scale_wrt_gas=False)
        metrics = read_metrics(sums)
        total = metrics.pop(TOTAL, 0.0)
        add_prepared_metrics(metrics, prep)
        metrics["rows_used"] = float(rows.numel())
        metrics[TOKENS] = float(tokens)
        metrics[TOTAL] = total
        metrics = comm.sum_metrics(metrics)  # one collective for the metrics, tokens and loss
        tokens, total = int(metrics.pop(TOKENS)), metrics.pop(TOTAL)
        norms, skipped = self._step(engines, math.isfinite(total))
        if self.critic_engine is not None:
            metrics["critic_grad_norm"] = norms[1]
        metrics["lr"] = float(self.engine.get_lr()[0])
        return UpdateResult(metrics=metrics, grad_norm=norms[0], skipped=skipped, tokens=tokens)

    def _empty_update(self, prep: Prepared, engines: list[Any]) -> UpdateResult:
        """A step without gradients: parameters and optimizer state stay, the schedule advances."""
        metrics = add_prepared_metrics({}, prep)
        metrics["rows_used"] = 0.0
        metrics = comm.sum_metrics(metrics)
        for e in engines:
            if e.lr_scheduler is not None:
                e.lr_scheduler.step()
        if self.critic_engine is not None:
            metrics["critic_grad_norm"] = 0.0
        metrics["lr"] = float(self.engine.get_lr()[0])
        return UpdateResult(metrics=metrics, grad_norm=0.0, skipped=False, tokens=0)

    def _micro_loss(self, batch: TrainBatch, host_mb: TrainBatch, program: LossProgram, prep: Prepared,
                    idx: Tensor | None, sums: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """(W * policy loss, W * value loss) of one micro-batch (``host_mb``: its rows on the
        CPU); 0-weight for a filler pass. Its loss (under TOTAL) and metrics are added to
        ``sums`` on the device."""
        mb = host_mb if idx is None else batch.select(idx, like=host_mb)
        lp, ent = self._logprobs(self.engine, mb, self.with_entropy, host_mb)
        values = self._values(mb) if self.critic_engine is not None else None
        if idx is None:
            return _zero(lp), None if values is None else _zero(values)
        rows = idx.to(prep.response_mask.device)
        out = program.loss(prep, logprobs=lp, rows=rows, entropy=ent, values=values)
        add_metrics(sums, {TOTAL: out.loss, **out.metrics})
        value_loss = None if out.value_loss is None else out.value_loss * self.world
        return out.loss * self.world, value_loss

    def _step(self, engines: list[Any], finite_loss: bool) -> tuple[list[float], bool]:
        """The optimizer step of every engine, or none when the loss or a gradient norm is not
        finite. Returns (each engine's gradient norm before clipping, skipped)."""
        if self.zero_stage == 0 and not self.bf16:  # a plain torch optimizer: check here
            norms = [float(_module_grad_norm(e.module)) for e in engines]
            if not finite_loss or not all(map(math.isfinite, norms)):
                for e in engines:
                    e.zero_grad()
                return norms, True
            for e in engines:
                e.step()
            return norms, False
        for e in engines:
            e.step()
        return [_norm(e) for e in engines], not all(e.was_step_applied() for e in engines)

    def named_parameters(self) -> Iterator[tuple[str, Tensor]]:
        """The policy's parameters by name. Under ZeRO-3 each is gathered in turn and is whole
        only until the next one is asked for (copy it before); every rank must iterate them
        all, in the same order. The parameter object itself is yielded, so an engine that
        shares the model sees its own tensor and copies nothing."""
        deepspeed = import_deepspeed()
        for name, p in self.model.named_parameters():
            if hasattr(p, "ds_id"):
                with deepspeed.zero.GatheredParameters([p]):
                    yield name, p
            else:
                yield name, p

    # ----- state ------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """DeepSpeed checkpoints (tags ``policy`` and ``critic``) in ``path``; collective: every
        rank calls it with the same ``path``, and it returns once every rank has written."""
        self.engine.save_checkpoint(str(path), tag="policy", save_latest=False)
        if self.critic_engine is not None:
            self.critic_engine.save_checkpoint(str(path), tag="critic", save_latest=False)
        if comm.is_main():
            state = {"world_size": self.world, "zero_stage": self.zero_stage, "bf16": self.bf16}
            (path / STATE_FILE).write_text(json.dumps(state))
        comm.barrier()

    def load(self, path: Path) -> None:
        try:
            saved = json.loads((path / STATE_FILE).read_text())
        except (OSError, ValueError):
            raise ValueError(f"{path}: not a DeepSpeed learner checkpoint (no readable {STATE_FILE}); "
                             "resume with the engine that wrote it") from None
        here = {"world_size": self.world, "zero_stage": self.zero_stage, "bf16": self.bf16}
        if saved != here:
            raise ValueError(f"{path}: written with {saved}, this run has {here}; resume with the same "
                             "number of processes, learner.zero_stage and learner.precision")
        for engine, tag in ((self.engine, "policy"), (self.critic_engine, "critic")):
            if engine is None:
                continue
            loaded, _ = engine.load_checkpoint(str(path), tag=tag, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
            if loaded is None:
                raise ValueError(f"{path}: the DeepSpeed checkpoint '{tag}' is missing or incomplete")

    def full_state_dict(self) -> dict[str, Tensor]:
        """Every weight of the policy at full precision, on CPU, on rank 0 (empty elsewhere);
        collective. Tied weights stay one tensor under both names."""
        deepspeed = import_deepspeed()
        from deepspeed.utils import safe_get_full_fp32_param

        out: dict[str, Tensor] = {}
        done: dict[int, Tensor] = {}
        for name, value in self.model.state_dict(keep_vars=True).items():
            if id(value) not in done:
                full = safe_get_full_fp32_param(value) if isinstance(value, nn.Parameter) else None
                if full is None and hasattr(value, "ds_id"):
                    with deepspeed.zero.GatheredParameters([value]):
                        full = value.detach().clone()
                if full is None:
                    full = value.detach()
                done[id(value)] = full.to("cpu", self.saved_dtype) if comm.is_main() else full.new_empty(0)
            if comm.is_main():
                out[name] = done[id(value)]
        return out

    def save_pretrained(self, path: Path) -> None:
        """The policy as one Hugging Face checkpoint (rank 0 writes; collective)."""
        state = self.full_state_dict()
        if comm.is_main():
            self.model.save_pretrained(path, state_dict=state)
            self.tokenizer.save_pretrained(path)
        comm.barrier()

    def close(self) -> None:
        """Free the engines (the process group stays for the rest of the process)."""
        for e in (self.engine, self.critic_engine):
            if e is not None and hasattr(e, "destroy"):
                e.destroy()


def _partition(deepspeed: Any, module: nn.Module, config: Config) -> None:
    """ZeRO-3: partition ``module``'s parameters across the processes one at a time, each moved
    to the device just before its own partitioning, so that no process ever holds the whole
    model on its device (DeepSpeed's engine would first move the whole module there). The
    parameters are cast to bf16 first when ``bf16.enabled`` (on the host), the buffers (such as
    rotary frequencies) go to the device unpartitioned and uncast, as the engine would leave
    them. A module built under ``deepspeed.zero.Init`` is already partitioned: left as it is."""
    if any(hasattr(p, "ds_id") for p in module.parameters()):
        return
    if config.get("bf16", {}).get("enabled"):
        for p in module.parameters():
            if p.is_floating_point():
                p.data = p.data.to(torch.bfloat16)
    offload = config["zero_optimization"].get("offload_param") or {}
    remote = offload.get("device") if offload.get("device") not in (None, "none") else None
    dtype = next(module.parameters()).dtype
    deepspeed.zero.Init(module=module, config_dict_or_path=config, remote_device=remote,
                        pin_memory=bool(offload.get("pin_memory", False)), dtype=dtype)
    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().device_name(comm.local_rank()))
    for m in module.modules():
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = b.to(device)


def _zero(x: Tensor) -> Tensor:
    """0, with a (zero) gradient path through x: the loss of a filler pass."""
    return x.masked_fill(~torch.isfinite(x), 0.0).sum() * 0.0


def _poison_unless_finite(policy: Tensor, value: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Both losses times 1 when both are finite, else times NaN, so that every gradient is NaN
    and the step is skipped; decided on the device (no host synchronisation per micro-batch).
    Times 1 changes neither a loss nor its gradient."""
    finite = torch.isfinite(policy.detach())
    if value is not None:
        finite = finite & torch.isfinite(value.detach())
    factor = torch.where(finite, 1.0, float("nan"))
    return policy * factor, None if value is None else value * factor


def _module_grad_norm(module: nn.Module) -> Tensor:
    grads = [p.grad.detach().double() for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64, device="cpu")  # read as a float
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def _norm(engine: Any) -> float:
    value = engine.get_global_grad_norm()
    return float("nan") if value is None else float(value)


def make_learner(recipe: Recipe, model: Any, tokenizer: Any) -> DeepSpeedLearner:
    return DeepSpeedLearner(recipe, model, tokenizer)
