"""The policy's output head, for the fused log-prob path (``hpt_dsl.fused_logprob``).

A causal LM computes ``logits = lm_head(decoder(inputs).last_hidden_state)``. The fused path
runs the model as usual (every hook of the model and of a DeepSpeed engine fires) but asks
for the logits of no position (``logits_to_keep`` = an empty index), reads the decoder's
last hidden states with a forward hook, and computes the log-probs from them and the head's
weight in chunks of tokens:

    hidden = decoder(prompt + response).last_hidden_state[:, P - 1 : P - 1 + T]
    log pi(y_t), H_t = fused_token_logprobs(hidden, W, y, tau, bias=b)

A model has a fused head when it exposes ``get_output_embeddings()`` (an ``nn.Linear``, tied
to the input embedding or not) and ``get_decoder()``, and its config names no transform of
the logits after the head (``final_logit_softcapping``, ``logit_scale``, ...). The first
forward pass checks it once more, by value: it keeps the logits of one position and
compares them with the head applied to the captured hidden state; a model whose forward
does something else to its logits gets the plain path from then on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpt_dsl.fused_logprob import Gather

LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale",
                    "mup_width_scale")  # fmt: skip
"""Config fields of Hugging Face models whose forward changes the logits after the head."""


@dataclass
class FusedHead:
    """The decoder whose output is the head's input, the head, and how to gather it (ZeRO-3).
    ``checked``: the first forward has compared the head's logits with the model's own."""

    decoder: nn.Module
    head: nn.Linear
    gather: Gather
    checked: bool = False

    @property
    def weight(self) -> Tensor:
        return self.head.weight

    @property
    def bias(self) -> Tensor | None:
        return self.head.bias


def find_head(model: Any, gather_for: Callable[[list[Tensor]], Gather | None] | None = None) -> FusedHead | None:
    """The fused head of ``model`` (a Hugging Face causal LM, or a DeepSpeed engine around one),
    or None when it has none the fused path can use. ``gather_for(parameters)``: how to make
    the head's parameters whole (ZeRO-3); None: they are."""
    module = getattr(model, "module", model)
    get_head = getattr(module, "get_output_embeddings", None)
    get_decoder = getattr(module, "get_decoder", None)
    if not callable(get_head) or not callable(get_decoder):
        return None
    head, decoder = get_head(), get_decoder()
    if not isinstance(head, nn.Linear) or not isinstance(decoder, nn.Module) or decoder is module:
        return None
    config = getattr(module, "config", None)
    for name in LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 0, 1, 1.0, False):
            return None
    params = [p for p in (head.weight, head.bias) if p is not None]
    gather = gather_for(params) if gather_for is not None else None
    return FusedHead(decoder, head, gather if gather is not None else contextlib.nullcontext)


@contextlib.contextmanager
def _captured(decoder: nn.Module) -> Iterator[list[Tensor]]:
    """The decoder's last hidden state of each call inside the block."""
    seen: list[Tensor] = []
    handle = decoder.register_forward_hook(lambda mod, args, out: seen.append(out[0]))
    try:
        yield seen
    finally:
        handle.remove()


def run(model: Any, head: FusedHead | None, keep: int, **inputs: Any) -> tuple[Tensor, Any]:
    """(the logits of the last ``keep`` positions, or with ``head`` the last hidden states
    there, the model's output). With ``head``, the model computes the logits of no position,
    except at the first call, which checks them at one position (``head.checked``; a
    mismatch raises ``HeadMismatch``)."""
    if head is None:
        out = model(**inputs, logits_to_keep=keep)
        return out.logits, out
    device = inputs["input_ids"].device
    check = not head.checked
    positions = torch.full((1 if check else 0,), inputs["input_ids"].shape[1] - 1, dtype=torch.long, device=device)
    with _captured(head.decoder) as seen:
        out = model(**inputs, logits_to_keep=positions)
    hidden = seen[-1]
    if check:
        with torch.no_grad(), head.gather():
            mine = F.linear(hidden[:, -1:].detach(), head.weight, head.bias).float()
        exact = out.logits.dtype in (torch.float32, torch.float64)
        theirs = out.logits.detach().float()
        tol = 1e-4 if exact else 1e-2
        scale = max(1.0, float(theirs.abs().max()))
        if mine.shape != theirs.shape or not torch.allclose(mine, theirs, rtol=tol, atol=tol * scale):
            raise HeadMismatch
        head.checked = True
    return hidden[:, hidden.shape[1] - keep :], out


class HeadMismatch(Exception):
    """The model's logits are not its head applied to its decoder's last hidden state."""
