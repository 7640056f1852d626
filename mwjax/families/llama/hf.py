"""HF config reading / writing of the llama-like family: HF `LlamaConfig`, `MistralConfig`, `Qwen2Config`.

The keys every family shares are read by `mwjax.families.hf_config`; these functions read (and write back)
what the family means by its own keys (`Family.read_hf` / `write_hf`), named in `*_HF_KEYS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mwjax.nn.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig

# HF config keys read beyond the shared ones (`Family.hf_keys`)
LLAMA_HF_KEYS = frozenset({"attention_bias", "mlp_bias", "sliding_window"})  # llama, mistral
QWEN2_HF_KEYS = frozenset({"use_sliding_window", "sliding_window", "max_window_layers"})


def read_llama_hf(hf: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """HF `LlamaConfig` / `MistralConfig`: `attention_bias` on q, k, v and o; `mlp_bias` on the FFN.

    Args:
      hf: the HF config dict (`config.json`).
      fields: the `ModelConfig` fields the shared reader made of it.

    Returns:
      The fields read here: `qkv_bias`, `o_bias`, `mlp_bias` (and `sliding_window=None` for llama,
      whose attention ignores the key).
    """
    attention_bias = bool(hf.get("attention_bias", False))
    out = dict(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=bool(hf.get("mlp_bias", False)))
    if hf.get("model_type") == "llama":
        out["sliding_window"] = None  # LlamaConfig has no sliding window (HF's attention ignores the key)
    return out


def write_llama_hf(config: ModelConfig, hf: dict[str, Any]) -> dict[str, Any]:
    """The HF `LlamaConfig` / `MistralConfig` dict: the shared keys `hf` plus the biases and the window.

    Args:
      config: the model's config.
      hf: the shared HF config keys (`hf_config.write_hf_config`).

    Returns:
      The HF config dict with `attention_bias`, `mlp_bias` and `sliding_window`.
    """
    return hf | {"attention_bias": config.qkv_bias, "mlp_bias": config.mlp_bias,
                 "sliding_window": config.sliding_window}


def read_qwen2_hf(hf: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """HF `Qwen2Config`: biases on q, k, v only (hard-coded in `Qwen2Attention`); a sliding window only with
    `use_sliding_window`, on the layers from `max_window_layers` on.

    Args:
      hf: the HF config dict.
      fields: the `ModelConfig` fields the shared reader made of it (`layer_types`, `num_hidden_layers`).

    Returns:
      The bias switches, `sliding_window` and `layer_types` ([num_hidden_layers] "full_attention" /
      "sliding_attention"; None where the config has neither list nor window).
    """
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    types = fields["layer_types"]
    if types is None and window is not None:
        first = int(hf.get("max_window_layers", fields["num_hidden_layers"]))
        types = [SLIDING_ATTENTION if i >= first else FULL_ATTENTION for i in range(fields["num_hidden_layers"])]
    return dict(qkv_bias=True, o_bias=False, mlp_bias=False, sliding_window=window, layer_types=types)


def write_qwen2_hf(config: ModelConfig, hf: dict[str, Any]) -> dict[str, Any]:
    """The HF `Qwen2Config` dict: the shared keys `hf` plus the window.

    The window is written both as `layer_types` and as `use_sliding_window` / `max_window_layers` (the first
    sliding layer).

    Args:
      config: the model's config.
      hf: the shared HF config keys (`hf_config.write_hf_config`).

    Returns:
      The HF config dict.
    """
    sliding = [i for i, t in enumerate(config.layer_types) if t == SLIDING_ATTENTION]
    return hf | {
        "use_sliding_window": bool(sliding),
        "sliding_window": config.sliding_window,
        "max_window_layers": sliding[0] if sliding else config.num_hidden_layers,
        "layer_types": list(config.layer_types),
    }
