"""GGUF hooks of Phi-3: llama.cpp's architecture `phi3`.

llama.cpp keeps HF's fused `qkv_proj` / `gate_up_proj` as they are (`attn_qkv`, `ffn_up`); what differs is
the metadata: the rotary dimension (`phi3.rope.dimension_count`: partial rotary) and longrope, whose
per-frequency factors are tensors (`rope_factors_short` / `rope_factors_long`), not config values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mwjax.families.record import GGUFFile, GGUFHooks

LONGROPE_FACTORS = ("rope_factors_short.weight", "rope_factors_long.weight")  # GGUF tensors: [head_dim / 2] each


def read_phi3_gguf(file: GGUFFile, shared: Mapping[str, Any]) -> dict[str, Any]:
    """HF `Phi3Config` keys of a `phi3` file beyond the shared ones.

    Args:
      file: the GGUF file (metadata `phi3.*`, the longrope factor tensors).
      shared: the HF config keys read for every architecture (`head_dim`).

    Returns:
      `sliding_window`; `partial_rotary_factor` where `rope.dimension_count` < head_dim; longrope
      `rope_scaling` (short / long factors, `original_max_position_embeddings`, `attention_factor`) where the
      file holds the factors.
    """
    extra: dict[str, Any] = {"sliding_window": file.field("attention.sliding_window")}
    rotary = file.field("rope.dimension_count")
    if rotary and int(rotary) != shared["head_dim"]:
        extra["partial_rotary_factor"] = int(rotary) / shared["head_dim"]
    if file.has_tensor("rope_factors_long.weight"):
        factors = {kind: file.raw("rope_factors_" + kind + ".weight").tolist() for kind in ("short", "long")}
        extra["rope_scaling"] = {
            "rope_type": "longrope", "short_factor": factors["short"], "long_factor": factors["long"],
            "original_max_position_embeddings": int(file.field("rope.scaling.original_context_length")),
            "attention_factor": float(file.field("rope.scaling.attn_factor", 1.0)),
        }
    return extra


# `rope_scaling=False`: longrope is read here, not as the shared `rope.scaling.type` (linear only)
PHI3_GGUF = GGUFHooks(architecture="phi3", model_type="phi3", config=read_phi3_gguf, rope_scaling=False,
                      metadata_tensors=LONGROPE_FACTORS)
