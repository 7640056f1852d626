"""HF config reading / writing of Phi-3 (HF `Phi3Config`).

The keys every family shares are read by `mwjax.families.hf_config`; these functions read (and write back)
Phi-3's own (`Family.read_hf` / `write_hf` / `read_rope`), named in `PHI3_HF_KEYS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mwjax.families.hf_readers import read_rope
from mwjax.nn.config import ModelConfig, RopeConfig

PHI3_THETA = 10_000.0  # Phi3Config's default rope_theta

# HF config keys read beyond the shared ones (`Family.hf_keys`)
PHI3_HF_KEYS = frozenset({"sliding_window", "original_max_position_embeddings"})
PHI3_IGNORED_HF_KEYS = frozenset({"attention_bias"})  # Phi-3 configs say false; its modules have no bias


def read_phi3_hf(hf: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """HF `Phi3Config`: no biases (hard-coded in its modules).

    Args:
      hf: the HF config dict.
      fields: the `ModelConfig` fields the shared reader made of it.

    Returns:
      The bias switches, all off.
    """
    return dict(qkv_bias=False, o_bias=False, mlp_bias=False)


def write_phi3_hf(config: ModelConfig, hf: dict[str, Any]) -> dict[str, Any]:
    """The HF `Phi3Config` dict: the shared keys `hf` plus the window and longrope's original context.

    Args:
      config: the model's config.
      hf: the shared HF config keys (`hf_config.write_hf_config`).

    Returns:
      The HF config dict with `sliding_window` and, for longrope, the top-level
      `original_max_position_embeddings`.
    """
    hf = hf | {"sliding_window": config.sliding_window}
    if config.rope.original_max_position_embeddings is not None:
        hf["original_max_position_embeddings"] = config.rope.original_max_position_embeddings
    return hf


def read_phi3_rope(hf: Mapping[str, Any]) -> tuple[RopeConfig, None]:
    """Phi-3's RoPE (HF `Phi3RotaryEmbedding`): `partial_rotary_factor` < 1 allowed; Phi3Config renames "su"
    and "yarn" scaling to longrope (transformers 5.23).

    Args:
      hf: the HF config dict.

    Returns:
      (rope, None): one RoPE for every layer.
    """
    return read_rope("phi3", hf, PHI3_THETA, partial_rotary=True, aliases={"su": "longrope", "yarn": "longrope"}), None
