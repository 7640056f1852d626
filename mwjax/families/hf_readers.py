"""Helpers the families' HF config readers share (`mwjax/families/<family>/hf.py`), so that every family parses
RoPE the same way: transformers 5 `rope_parameters` or transformers 4 `rope_theta` / `rope_scaling`, anything
mwjax does not compute exactly as HF does refused by name (`ConfigError`).

The reader of a whole `config.json` is `mwjax.families.hf_config` (it asks the family records); this module
knows no family and no record.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from mwjax.nn.config import FULL_ATTENTION, SLIDING_ATTENTION, SUPPORTED_ROPE_TYPES, ConfigError, RopeConfig


def float_or_none(x) -> float | None:
    """`float(x)`, None kept (HF configs write null for an absent soft-cap).

    Args:
      x: a number or None.

    Returns:
      The float, or None.
    """
    return None if x is None else float(x)


def read_rope(model_type: str, hf: Mapping[str, Any], default_theta: float, *, partial_rotary: bool = False,
              aliases: Mapping[str, str] | None = None) -> RopeConfig:
    """The RoPE of a family with one RoPE for every layer.

    Read from transformers 5 `rope_parameters` (flat; per-layer-type ones are refused) or transformers 4
    `rope_theta` / `rope_scaling`.

    Args:
      model_type: HF `model_type`, named in the errors.
      hf: the HF config dict.
      default_theta: the RoPE base when the config gives none.
      partial_rotary: the family implements `partial_rotary_factor` < 1 (else it is refused).
      aliases: rope type names the family's HF config renames -> mwjax's (Phi-3: "su" -> "longrope").

    Returns:
      The `RopeConfig`; `ConfigError` for a rope type mwjax does not compute as HF does.
    """
    params = dict(hf.get("rope_parameters") or {})
    if params.keys() & {FULL_ATTENTION, SLIDING_ATTENTION}:
        raise ConfigError(f"{model_type}: per-layer-type rope_parameters are not implemented for this family")
    if not params:  # transformers 4.x layout
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", default_theta))
    return rope_from_params(model_type, params, hf, default_theta, partial_rotary=partial_rotary, aliases=aliases)


def rope_from_params(model_type: str, params: Mapping[str, Any], hf: Mapping[str, Any], default_theta: float, *,
                     partial_rotary: bool = False, aliases: Mapping[str, str] | None = None) -> RopeConfig:
    """One `RopeConfig` from a HF rope parameter dict (`rope_type` + its keys).

    Args:
      model_type: HF `model_type`, named in the errors.
      params: the rope parameters (`rope_type` or `type`, `rope_theta`, and the type's keys: factor, ...).
      hf: the whole HF config dict (top-level `partial_rotary_factor`, head sizes, longrope's
        `original_max_position_embeddings`).
      default_theta: the RoPE base when `params` gives none.
      partial_rotary: the family implements `partial_rotary_factor` < 1 (else it is refused).
      aliases: rope type names the family's HF config renames -> mwjax's.

    Returns:
      The `RopeConfig` (default, linear, llama3 or longrope).
    """
    rope_type = params.get("rope_type", params.get("type", "default"))
    rope_type = (aliases or {}).get(rope_type, rope_type)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{model_type}: rope type {rope_type!r} is not implemented; mwjax supports {SUPPORTED_ROPE_TYPES}"
        )
    partial = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor") or 1.0))
    if partial != 1.0 and not partial_rotary:
        raise ConfigError(f"{model_type}: partial_rotary_factor={partial} is not implemented")
    rope = RopeConfig(theta=float(params.get("rope_theta", default_theta)), type=rope_type,
                      partial_rotary_factor=partial)
    if rope_type == "linear":
        rope = dataclasses.replace(rope, factor=float(params["factor"]))
    elif rope_type == "llama3":
        rope = dataclasses.replace(
            rope,
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    elif rope_type == "longrope":
        rope = _longrope(model_type, params, hf, rope)
    return rope


def _longrope(model_type: str, params: Mapping[str, Any], hf: Mapping[str, Any], rope: RopeConfig) -> RopeConfig:
    """HF `_compute_longrope_parameters`: Phi-3's top-level `original_max_position_embeddings` wins;
    without `factor` the scale is max_position_embeddings / original; the cos / sin factor defaults to
    sqrt(1 + ln(factor) / ln(original))."""
    original = hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
    original = int(original or hf.get("max_position_embeddings", 2048))
    missing = [k for k in ("short_factor", "long_factor") if not params.get(k)]
    if missing:
        raise ConfigError(f"{model_type}: longrope scaling lacks {missing}")
    half = rope.rotary_dim(int(hf.get("head_dim") or int(hf["hidden_size"]) // int(hf["num_attention_heads"]))) // 2
    for key in ("short_factor", "long_factor"):
        if len(params[key]) != half:
            raise ConfigError(f"{model_type}: longrope {key} has {len(params[key])} entries, expected {half}")
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        factor = params.get("factor") or int(hf.get("max_position_embeddings", original)) / original
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return dataclasses.replace(
        rope,
        original_max_position_embeddings=original,
        short_factor=tuple(float(x) for x in params["short_factor"]),
        long_factor=tuple(float(x) for x in params["long_factor"]),
        attention_factor=float(attention_factor),
    )
