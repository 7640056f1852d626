"""Model configuration: one frozen dataclass for every supported family (`ModelConfig`, `RopeConfig`),
range-checked on construction. Reading and writing HF `config.json` is `mwjax.families.hf_config`'s job; the
RoPE frequencies are `mwjax.nn.rope`'s.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from mwjax.core import layer_index

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"

SUPPORTED_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
# what a QK-norm normalises: each head's features (Gemma 3) or the whole projection, every head at once (OLMo 2)
QK_NORM_SCOPES = ("head", "all_heads")


class ConfigError(ValueError):
    """A checkpoint's configuration asks for something mwjax does not implement."""


def _check_positive(name: str, value, *, finite: bool = False) -> None:
    """`value` is None or a number > 0 (and finite): eps, RoPE bases, scales and caps of 0, < 0 or NaN
    make every logit NaN or meaningless."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 or (
            finite and not math.isfinite(value)):
        raise ConfigError(f"{name}={value!r} must be a positive{' finite' if finite else ''} number")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (HF `rope_parameters`, formerly `rope_theta` + `rope_scaling`).

    `longrope` (Phi-3's "su" scaling) divides the frequencies by `short_factor` while the sequence
    fits in `original_max_position_embeddings` and by `long_factor` beyond it, and multiplies cos /
    sin by `attention_factor` (HF `_compute_longrope_parameters` + `dynamic_rope_update`).
    `partial_rotary_factor` < 1 rotates only the first `rotary_dim` features of every head (Phi-3 family).
    """

    theta: float = 10000.0
    type: str = "default"  # "default" | "linear" | "llama3" | "longrope"
    factor: float = 1.0  # linear, llama3
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int | None = None  # llama3, longrope
    short_factor: tuple[float, ...] | None = None  # longrope: [rotary_dim // 2]
    long_factor: tuple[float, ...] | None = None  # longrope: [rotary_dim // 2]
    attention_factor: float | None = None  # longrope: cos / sin scale
    partial_rotary_factor: float = 1.0

    def __post_init__(self):
        for name in ("theta", "factor", "low_freq_factor", "high_freq_factor", "attention_factor"):
            _check_positive(f"rope {name}", getattr(self, name), finite=True)
        if not 0 < self.partial_rotary_factor <= 1:
            raise ConfigError(f"partial_rotary_factor={self.partial_rotary_factor} must lie in (0, 1]")
        for name in ("short_factor", "long_factor"):
            if getattr(self, name) is not None and not all(math.isfinite(x) and x > 0 for x in getattr(self, name)):
                raise ConfigError(f"rope {name} must hold positive finite numbers")

    def rotary_dim(self, head_dim: int) -> int:
        """How many features of a head are rotated (HF: `int(head_dim * partial_rotary_factor)`).

        Args:
          head_dim: the attention head size.

        Returns:
          The rotary dimension (head_dim unless partial rotary, Phi-3 family).
        """
        return int(head_dim * self.partial_rotary_factor)

    @property
    def attention_scaling(self) -> float:
        """Factor on cos and sin (HF's `attention_scaling`; 1 except for longrope)."""
        return 1.0 if self.attention_factor is None else self.attention_factor

    def to_hf_scaling(self) -> dict[str, Any] | None:
        """The HF `rope_scaling` dict (None for plain RoPE); `rope_theta` is written beside it."""
        if self.type == "default":
            return None
        scaling: dict[str, Any] = {"rope_type": self.type}
        if self.type in ("linear", "llama3"):
            scaling["factor"] = self.factor
        if self.type == "llama3":
            scaling |= {"low_freq_factor": self.low_freq_factor, "high_freq_factor": self.high_freq_factor}
        if self.type in ("llama3", "longrope"):
            scaling["original_max_position_embeddings"] = self.original_max_position_embeddings
        if self.type == "longrope":
            scaling |= {"short_factor": list(self.short_factor), "long_factor": list(self.long_factor),
                        "attention_factor": self.attention_factor}
        return scaling

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RopeConfig:
        """The inverse of `dataclasses.asdict` (the native orbax checkpoint's config): factor lists as tuples.

        Args:
          d: the fields by name.

        Returns:
          The RopeConfig (range-checked).
        """
        d = dict(d)
        for key in ("short_factor", "long_factor"):
            if d.get(key) is not None:
                d[key] = tuple(float(x) for x in d[key])
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters, named as in HF configs.

    Attributes mirror `transformers.LlamaConfig` & co.; the few mwjax-specific ones are
    `qkv_bias` / `o_bias` (Llama's `attention_bias` sets both, Qwen2 has only the first),
    `layer_types` (per-layer "full_attention" / "sliding_attention", as transformers 5 spells it),
    `sliding_rope` (the RoPE of sliding layers when it differs from `rope`: Gemma 3's
    `rope_local_base_freq`), `qk_norm` (RMSNorm of the queries / keys before RoPE: Gemma 3, OLMo 2) with
    `qk_norm_scope` ("head": over each head, Gemma 3; "all_heads": over the whole q / k projection before it is
    split into heads, OLMo 2) and `clip_qkv` (q, k and v projections clamped to [-clip_qkv, clip_qkv]: OLMo).
    Gemma 2 / 3 add `query_pre_attn_scalar` and the soft-caps; Mixtral `num_local_experts` and
    `num_experts_per_tok` (None for dense models).

    Fields and derived properties only: what a family means by its HF keys is its `Family` record's
    (`mwjax.families.family(model_type)`), read and written by `mwjax.families.hf_config`.
    """

    model_type: str
    vocab_size: int
    hidden_size: int  # d_model
    intermediate_size: int  # d_ff: the length of the paper's "intermediate state"
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    sliding_rope: RopeConfig | None = None
    qk_norm: bool = False
    qk_norm_scope: str = "head"  # QK_NORM_SCOPES
    clip_qkv: float | None = None  # q, k, v := clip(., -clip_qkv, clip_qkv) (HF OlmoConfig.clip_qkv)
    query_pre_attn_scalar: int | float | None = None  # attention scale = query_pre_attn_scalar ** -0.5
    attn_logit_softcapping: float | None = None  # scores := cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # logits := cap * tanh(logits / cap)
    num_local_experts: int | None = None
    num_experts_per_tok: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        _check_positive("rms_norm_eps", self.rms_norm_eps, finite=True)
        for name in ("sliding_window", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                     "clip_qkv"):
            _check_positive(name, getattr(self, name), finite=True)
        if self.qk_norm_scope not in QK_NORM_SCOPES:
            raise ConfigError(f"qk_norm_scope={self.qk_norm_scope!r} must be one of {QK_NORM_SCOPES}")
        if not self.layer_types:
            kind = SLIDING_ATTENTION if self.sliding_window else FULL_ATTENTION
            object.__setattr__(self, "layer_types", (kind,) * self.num_hidden_layers)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if (self.num_local_experts is None) != (self.num_experts_per_tok is None):
            raise ConfigError("num_local_experts and num_experts_per_tok must be given together")
        if self.num_local_experts is not None and not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} must lie in "
                              f"[1, num_local_experts={self.num_local_experts}]")

    @property
    def attention_scale(self) -> float:
        """Multiplier of q.k: `query_pre_attn_scalar ** -0.5` (Gemma 2 / 3), else `head_dim ** -0.5`."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def rope_for(self, layer_type: str) -> RopeConfig:
        """The RoPE parameters of layers of one type (HF `rope_parameters[layer_type]`).

        Args:
          layer_type: FULL_ATTENTION or SLIDING_ATTENTION (an entry of `layer_types`).

        Returns:
          `sliding_rope` for sliding layers when set (Gemma 3), else `rope`.
        """
        if layer_type == SLIDING_ATTENTION and self.sliding_rope is not None:
            return self.sliding_rope
        return self.rope

    def layer_label(self, layer: int) -> str:
        """'layer 12 (HF layers[11])': the papers number layers from 1, HF and mwjax from 0.

        Args:
          layer: the 0-based layer index.

        Returns:
          The label (`mwjax.core.layer_index.layer_label`).
        """
        return layer_index.layer_label(layer)

    # ------------------------------------------------------------------ native (orbax) serialisation

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain Python values (`dataclasses.asdict`), for the native (orbax) checkpoint."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """The inverse of `to_dict` (whose tuples may come back as lists from a JSON / orbax round trip).

        Args:
          d: the fields by name, `rope` / `sliding_rope` as dicts.

        Returns:
          The ModelConfig (range-checked).
        """
        d = dict(d)
        d["rope"] = RopeConfig.from_dict(d["rope"])
        if d.get("sliding_rope") is not None:
            d["sliding_rope"] = RopeConfig.from_dict(d["sliding_rope"])
        d["layer_types"] = tuple(d["layer_types"])
        d["eos_token_id"] = int_or_tuple(d.get("eos_token_id"))
        return cls(**d)


def int_or_tuple(x):
    """A list (or tuple) as a tuple, anything else as it is: `eos_token_id` as HF configs give it.

    Args:
      x: an int, a list / tuple of ints, or None.

    Returns:
      `x`, lists as tuples.
    """
    return tuple(x) if isinstance(x, list | tuple) else x


