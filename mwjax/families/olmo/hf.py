"""HF config reading / writing of OLMo and OLMo 2: HF `OlmoConfig`, `Olmo2Config`.

The keys every family shares are read by `mwjax.families.hf_config`; these functions read (and write back)
what OLMo means by its own keys (`Family.read_hf` / `write_hf`), named in `*_HF_KEYS`, and set what HF's
OLMo modules hard-code: OLMo's LayerNorm epsilon (1e-5, `OlmoLayerNorm`), OLMo 2's QK-norm over the whole
projection (`Olmo2Attention.q_norm` / `k_norm`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mwjax.families.hf_readers import float_or_none
from mwjax.nn.config import ModelConfig

OLMO_LAYER_NORM_EPS = 1e-5  # HF `OlmoLayerNorm`: F.layer_norm(..., eps=1e-5), not a config key
OLMO2_RMS_NORM_EPS = 1e-5  # Olmo2Config's default rms_norm_eps

# HF config keys read beyond the shared ones (`Family.hf_keys`)
OLMO_HF_KEYS = frozenset({"attention_bias", "clip_qkv"})
OLMO2_HF_KEYS = frozenset({"attention_bias"})


def read_olmo_hf(hf: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """HF `OlmoConfig`: `attention_bias` on q, k, v and o (no FFN bias), `clip_qkv`, and the LayerNorm epsilon
    HF hard-codes (an `rms_norm_eps` in the config is ignored, as HF's `OlmoLayerNorm` ignores it).

    Args:
      hf: the HF config dict (`config.json`).
      fields: the `ModelConfig` fields the shared reader made of it.

    Returns:
      The fields read here: `qkv_bias`, `o_bias`, `mlp_bias`, `clip_qkv` (None: no clipping) and
      `rms_norm_eps` (the LayerNorms' epsilon, 1e-5).
    """
    attention_bias = bool(hf.get("attention_bias", False))
    return dict(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=False,
                clip_qkv=float_or_none(hf.get("clip_qkv")), rms_norm_eps=OLMO_LAYER_NORM_EPS)


def write_olmo_hf(config: ModelConfig, hf: dict[str, Any]) -> dict[str, Any]:
    """The HF `OlmoConfig` dict: the shared keys `hf` without `rms_norm_eps` (OlmoConfig has none), plus
    `attention_bias` and `clip_qkv`.

    Args:
      config: the model's config.
      hf: the shared HF config keys (`hf_config.write_hf_config`).

    Returns:
      The HF config dict.
    """
    hf = {k: v for k, v in hf.items() if k != "rms_norm_eps"}
    return hf | {"attention_bias": config.qkv_bias, "clip_qkv": config.clip_qkv}


def read_olmo2_hf(hf: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """HF `Olmo2Config`: `attention_bias` on q, k, v and o (no FFN bias), `rms_norm_eps` (Olmo2Config's default
    1e-5), and the QK-norm `Olmo2Attention` always has, over the whole q / k projection.

    Args:
      hf: the HF config dict (`config.json`).
      fields: the `ModelConfig` fields the shared reader made of it.

    Returns:
      The fields read here: `qkv_bias`, `o_bias`, `mlp_bias`, `rms_norm_eps`, `qk_norm=True` and
      `qk_norm_scope="all_heads"`.
    """
    attention_bias = bool(hf.get("attention_bias", False))
    return dict(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=False,
                rms_norm_eps=float(hf.get("rms_norm_eps", OLMO2_RMS_NORM_EPS)), qk_norm=True,
                qk_norm_scope="all_heads")


def write_olmo2_hf(config: ModelConfig, hf: dict[str, Any]) -> dict[str, Any]:
    """The HF `Olmo2Config` dict: the shared keys `hf` plus `attention_bias`.

    Args:
      config: the model's config.
      hf: the shared HF config keys (`hf_config.write_hf_config`).

    Returns:
      The HF config dict.
    """
    return hf | {"attention_bias": config.qkv_bias}
