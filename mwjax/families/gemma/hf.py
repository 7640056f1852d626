"""HF config reading / writing of Gemma 1 / 2 / 3 text: HF `GemmaConfig`, `Gemma2Config`, `Gemma3TextConfig`.

The keys every family shares are read by `mwjax.families.hf_config`; these functions read (and write back)
what Gemma means by its own keys (`Family.read_hf` / `write_hf` / `read_rope`), named in `*_HF_KEYS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mwjax.families.hf_readers import float_or_none, rope_from_params
from mwjax.families.llama.hf import read_llama_hf, write_llama_hf
from mwjax.nn.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig, RopeConfig

GEMMA3_GLOBAL_THETA = 1_000_000.0  # Gemma3TextConfig.default_theta["global"] (rope_theta)
GEMMA3_LOCAL_THETA = 10_000.0  # Gemma3TextConfig.default_theta["local"] (rope_local_base_freq)

# HF config keys read beyond the shared ones (`Family.hf_keys`)
GEMMA_HF_KEYS = frozenset({"attention_bias", "mlp_bias"})
GEMMA2_HF_KEYS = GEMMA_HF_KEYS | {"hidden_activation", "sliding_window", "query_pre_attn_scalar",
                                  "attn_logit_softcapping", "final_logit_softcapping"}
GEMMA3_HF_KEYS = GEMMA2_HF_KEYS | {"sliding_window_pattern", "_sliding_window_pattern", "rope_local_base_freq"}
# transformers 4 GemmaConfig's `hidden_activation` (GGUF configs carry it too); HF's modules ignore a window
GEMMA_IGNORED_HF_KEYS = frozenset({"hidden_activation", "sliding_window"})


def read_gemma_hf(hf: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """HF `GemmaConfig`: configs that say "gelu" mean the tanh approximation (GemmaConfig rewrites it,
    transformers#29402); no sliding window.

    Args:
      hf: the HF config dict.
      fields: the `ModelConfig` fields the shared reader made of it (`hidden_act`).

    Returns:
      The llama fields (biases) with `hidden_act` and `sliding_window=None`.
    """
    act = "gelu_pytorch_tanh" if fields["hidden_act"] == "gelu" else fields["hidden_act"]
    return read_llama_hf(hf, fields) | dict(hidden_act=act, sliding_window=None)


def write_gemma_hf(config: ModelConfig, hf: dict[str, Any]) -> dict[str, Any]:
    """The HF `GemmaConfig` dict: the shared keys `hf` plus `attention_bias`.

    Args:
      config: the model's config.
      hf: the shared HF config keys (`hf_config.write_hf_config`).

    Returns:
      The HF config dict.
    """
    return hf | {"attention_bias": config.qkv_bias}


def read_gemma2_hf(hf: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """HF `Gemma2Config` / `Gemma3TextConfig`: `hidden_activation`, the query scale, the soft-caps, and
    sliding attention on every other layer (Gemma 2) or on all but every `sliding_window_pattern`-th (Gemma 3).

    Args:
      hf: the HF config dict.
      fields: the `ModelConfig` fields the shared reader made of it (`num_hidden_layers`, `layer_types`).

    Returns:
      The llama fields with `hidden_act`, `layer_types` [num_hidden_layers], `query_pre_attn_scalar`,
      `final_logit_softcapping`, and `attn_logit_softcapping` (Gemma 2) or `qk_norm=True` (Gemma 3).
    """
    gemma3 = hf.get("model_type") == "gemma3_text"
    layers = fields["num_hidden_layers"]
    types = fields["layer_types"]
    if types is None:
        pattern = int(hf.get("sliding_window_pattern", 6)) if gemma3 else 2
        types = [SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(layers)]
    out = read_llama_hf(hf, fields) | dict(
        hidden_act=hf.get("hidden_activation") or "gelu_pytorch_tanh",
        layer_types=types,
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),  # int in HF's strict config
        final_logit_softcapping=float_or_none(hf.get("final_logit_softcapping")),
    )
    if gemma3:
        out["qk_norm"] = True  # Gemma3Attention never passes `attn_logit_softcapping` on (null in its checkpoints)
    else:
        out["attn_logit_softcapping"] = float_or_none(hf.get("attn_logit_softcapping"))
    return out


def write_gemma2_hf(config: ModelConfig, hf: dict[str, Any]) -> dict[str, Any]:
    """The HF `Gemma2Config` dict: the llama keys, `hidden_activation` for `hidden_act`, soft-caps, layer types.

    Args:
      config: the model's config.
      hf: the shared HF config keys (`hf_config.write_hf_config`).

    Returns:
      The HF config dict (with `query_pre_attn_scalar`, both soft-caps and `layer_types`).
    """
    hf = write_llama_hf(config, hf)
    return hf | {
        "hidden_activation": hf.pop("hidden_act"),
        "query_pre_attn_scalar": config.query_pre_attn_scalar,
        "attn_logit_softcapping": config.attn_logit_softcapping,
        "final_logit_softcapping": config.final_logit_softcapping,
        "layer_types": list(config.layer_types),
    }


def write_gemma3_hf(config: ModelConfig, hf: dict[str, Any]) -> dict[str, Any]:
    """The HF `Gemma3TextConfig` dict: Gemma 2's keys plus the sliding layers' RoPE.

    The sliding layers' RoPE is `rope_local_base_freq`, or, where it is scaled (not expressible in the legacy
    keys), `rope_parameters` per layer type replacing `rope_theta` / `rope_local_base_freq` / `rope_scaling`.

    Args:
      config: the model's config (`rope`, `sliding_rope`).
      hf: the shared HF config keys (`hf_config.write_hf_config`).

    Returns:
      The HF config dict.
    """
    hf = write_gemma2_hf(config, hf)
    local = config.rope_for(SLIDING_ATTENTION)
    hf["rope_local_base_freq"] = local.theta
    if local.to_hf_scaling() is not None:  # not expressible in legacy keys
        for key in ("rope_theta", "rope_local_base_freq", "rope_scaling"):
            hf.pop(key, None)
        hf["rope_parameters"] = {
            kind: {"rope_theta": r.theta, "rope_type": "default"} | (r.to_hf_scaling() or {})
            for kind, r in ((FULL_ATTENTION, config.rope), (SLIDING_ATTENTION, config.sliding_rope))
        }
    return hf


def read_gemma3_rope(hf: Mapping[str, Any]) -> tuple[RopeConfig, RopeConfig]:
    """Gemma 3's two RoPEs (HF `Gemma3RotaryEmbedding` per layer type).

    Args:
      hf: the HF config dict: transformers 5 `rope_parameters` nested per layer type, or transformers 4
        `rope_theta` / `rope_scaling` for the global layers and `rope_local_base_freq` for the sliding ones.

    Returns:
      (global, sliding) `RopeConfig`s; bases 1 000 000 and 10 000 where the config names none.
    """
    params = dict(hf.get("rope_parameters") or {})
    if params.keys() & {FULL_ATTENTION, SLIDING_ATTENTION}:
        full = dict(params.get(FULL_ATTENTION) or {})
        local = dict(params.get(SLIDING_ATTENTION) or {})
    else:  # transformers 4.x: rope_scaling applies to the global (full attention) layers only
        full = dict(hf.get("rope_scaling") or {}) | dict(params)
        full.setdefault("rope_theta", hf.get("rope_theta", GEMMA3_GLOBAL_THETA))
        local = {"rope_theta": hf.get("rope_local_base_freq", GEMMA3_LOCAL_THETA)}
    full.setdefault("rope_theta", GEMMA3_GLOBAL_THETA)
    local.setdefault("rope_theta", GEMMA3_LOCAL_THETA)
    return (rope_from_params("gemma3_text", full, hf, GEMMA3_GLOBAL_THETA),
            rope_from_params("gemma3_text", local, hf, GEMMA3_LOCAL_THETA))
