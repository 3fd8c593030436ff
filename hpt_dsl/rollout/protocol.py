"""What hpt-dsl's rollout-server client (``hpt_dsl.rollout.server``) and its worker extension in
the vLLM server (``hpt_dsl.rollout.server_ext``) agree on, and the server's address. Imports
nothing heavy: the recipe checker uses it too."""

from __future__ import annotations

from urllib.parse import urlsplit

PROTOCOL = 1
"""Bumped whenever an extension method's arguments or answer change; client and server must agree."""

EXTENSION = "hpt_dsl.rollout.server_ext.WeightSync"
"""The value of the server's ``--worker-extension-cls``."""

CONFIG_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "intermediate_size", "tie_word_embeddings")  # fmt: skip
"""The checkpoint's config entries the client compares with the policy's."""


def server_url(address: str) -> str:
    """``host:port`` (or a URL) as the server's base URL."""
    address = address.strip().rstrip("/")
    return address if "://" in address else f"http://{address}"


def valid_address(address: str) -> bool:
    """True for ``host:port`` or ``http(s)://host:port``."""
    try:
        parts = urlsplit(server_url(address))
        return bool(parts.hostname) and parts.port is not None and parts.scheme in ("http", "https")
    except ValueError:  # a port that is not a number, or out of range
        return False
