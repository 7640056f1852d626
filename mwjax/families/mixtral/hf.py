"""HF config reading / writing of Mixtral (HF `MixtralConfig`).

The keys every family shares are read by `mwjax.families.hf_config`; these functions read (and write back)
the experts and the window (`Family.read_hf` / `write_hf`), named in `MIXTRAL_HF_KEYS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mwjax.nn.config import ModelConfig

MIXTRAL_THETA = 1_000_000.0  # MixtralConfig's default rope_theta

# HF config keys read beyond the shared ones (`Family.hf_keys`)
MIXTRAL_HF_KEYS = frozenset({"sliding_window", "num_local_experts", "num_experts", "num_experts_per_tok"})
# router loss / jitter act in training only; MixtralAttention has no bias (GGUF configs of arch llama say so)
MIXTRAL_IGNORED_HF_KEYS = frozenset({"output_router_logits", "router_aux_loss_coef", "router_jitter_noise",
                                     "attention_bias"})


def read_mixtral_hf(hf: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """HF `MixtralConfig`: no biases (hard-coded); `num_local_experts` (older configs: `num_experts`).

    Args:
      hf: the HF config dict.
      fields: the `ModelConfig` fields the shared reader made of it.

    Returns:
      The bias switches (all off), `num_local_experts` E (default 8) and `num_experts_per_tok` k (default 2).
    """
    return dict(qkv_bias=False, o_bias=False, mlp_bias=False,
                num_local_experts=int(hf.get("num_local_experts", hf.get("num_experts", 8))),
                num_experts_per_tok=int(hf.get("num_experts_per_tok", 2)))


def write_mixtral_hf(config: ModelConfig, hf: dict[str, Any]) -> dict[str, Any]:
    """The HF `MixtralConfig` dict: the shared keys `hf` plus the window and the experts.

    Args:
      config: the model's config.
      hf: the shared HF config keys (`hf_config.write_hf_config`).

    Returns:
      The HF config dict with `sliding_window`, `num_local_experts` E and `num_experts_per_tok` k.
    """
    return hf | {"sliding_window": config.sliding_window, "num_local_experts": config.num_local_experts,
                 "num_experts_per_tok": config.num_experts_per_tok}
