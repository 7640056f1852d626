"""Model configuration: one frozen dataclass for every supported family.

`ModelConfig.from_hf_config` reads a Hugging Face `config.json` dict (transformers 4.x layout with
`rope_theta` / `rope_scaling`, or transformers 5.x layout with `rope_parameters`) and refuses, by
name, anything mwjax does not compute exactly as HF does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"

# model_type -> HF architecture class written back by `to_hf_config`.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
SUPPORTED_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


class ConfigError(ValueError):
    """A checkpoint's configuration asks for something mwjax does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (HF `rope_parameters`, formerly `rope_theta` + `rope_scaling`)."""

    theta: float = 10000.0
    type: str = "default"  # "default" | "linear" | "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int | None = None  # llama3 only

    def inv_frequencies(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies [head_dim // 2], float32, as HF's `ROPE_INIT_FUNCTIONS[type]` computes them."""
        exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
        inv_freq = (np.float32(1.0) / (np.float32(self.theta) ** exponent)).astype(np.float32)
        if self.type == "linear":
            return (inv_freq / np.float32(self.factor)).astype(np.float32)
        if self.type == "llama3":
            # Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.
            old_ctx = self.original_max_position_embeddings
            low_wavelen = old_ctx / self.low_freq_factor
            high_wavelen = old_ctx / self.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = np.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
            smooth = (old_ctx / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return np.where(medium, smoothed, scaled).astype(np.float32)
        return inv_freq


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters, named as in HF configs.

    Attributes mirror `transformers.LlamaConfig` & co.; the few mwjax-specific ones are
    `qkv_bias` / `o_bias` (Llama's `attention_bias` sets both, Qwen2 has only the first) and
    `layer_types` (per-layer "full_attention" / "sliding_attention", as transformers 5 spells it).
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

    def __post_init__(self):
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

    @property
    def architecture(self) -> str:
        return ARCHITECTURES[self.model_type]

    def layer_label(self, layer: int) -> str:
        """'layer 12 (HF layers[11])': the papers number layers from 1, HF and mwjax from 0."""
        return f"layer {layer + 1} (HF layers[{layer}])"

    # ------------------------------------------------------------------ HF <-> mwjax

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """Build from a HF `config.json` dict. Raises `ConfigError` naming what is unsupported."""
        model_type = hf.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ConfigError(
                f"unknown or unsupported model_type {model_type!r} "
                f"(architectures={hf.get('architectures')}); mwjax supports {sorted(ARCHITECTURES)}"
            )
        missing = [k for k in _REQUIRED_KEYS if hf.get(k) is None]
        if missing:
            raise ConfigError(f"{model_type} config lacks required keys {missing}")
        act = hf.get("hidden_act", "silu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"{model_type}: hidden_act {act!r} is not implemented; supported: {SUPPORTED_ACTIVATIONS}"
            )
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        layers = int(hf["num_hidden_layers"])
        head_dim = hf.get("head_dim") or hidden // heads

        sliding_window, layer_types = _attention_layout(model_type, hf, layers)
        if model_type == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        else:
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
            mlp_bias = bool(hf.get("mlp_bias", False))

        return cls(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            hidden_act=act,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=_rope_from_hf(model_type, hf),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            sliding_window=sliding_window,
            layer_types=layer_types,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=_int_or_tuple(hf.get("eos_token_id")),
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The HF `config.json` dict (legacy `rope_theta` / `rope_scaling` keys, read by transformers 4 and 5)."""
        hf: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope.theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.rope.type != "default":
            scaling: dict[str, Any] = {"rope_type": self.rope.type, "factor": self.rope.factor}
            if self.rope.type == "llama3":
                scaling |= {
                    "low_freq_factor": self.rope.low_freq_factor,
                    "high_freq_factor": self.rope.high_freq_factor,
                    "original_max_position_embeddings": self.rope.original_max_position_embeddings,
                }
            hf["rope_scaling"] = scaling
        if self.model_type == "qwen2":
            sliding = [i for i, t in enumerate(self.layer_types) if t == SLIDING_ATTENTION]
            hf |= {
                "use_sliding_window": bool(sliding),
                "sliding_window": self.sliding_window,
                "max_window_layers": sliding[0] if sliding else self.num_hidden_layers,
                "layer_types": list(self.layer_types),
            }
        else:
            hf |= {"attention_bias": self.qkv_bias, "mlp_bias": self.mlp_bias, "sliding_window": self.sliding_window}
        return hf

    # ------------------------------------------------------------------ native (orbax) serialisation

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        d = dict(d)
        d["rope"] = RopeConfig(**d["rope"])
        d["layer_types"] = tuple(d["layer_types"])
        d["eos_token_id"] = _int_or_tuple(d.get("eos_token_id"))
        return cls(**d)


def _int_or_tuple(x):
    return tuple(x) if isinstance(x, list | tuple) else x


def _rope_from_hf(model_type: str, hf: Mapping[str, Any]) -> RopeConfig:
    params = dict(hf.get("rope_parameters") or {})
    if not params:  # transformers 4.x layout
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{model_type}: rope type {rope_type!r} is not implemented; mwjax supports {SUPPORTED_ROPE_TYPES}"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{model_type}: partial_rotary_factor={params['partial_rotary_factor']} is not implemented")
    rope = RopeConfig(theta=float(params.get("rope_theta", hf.get("rope_theta", 10000.0))), type=rope_type)
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
    return rope


def _attention_layout(model_type: str, hf: Mapping[str, Any], layers: int) -> tuple[int | None, tuple[str, ...]]:
    """(sliding_window, layer_types) with HF's rules: Mistral slides on every layer when
    `sliding_window` is set; Qwen2 only with `use_sliding_window`, from `max_window_layers` on."""
    window = hf.get("sliding_window")
    if model_type == "llama":
        window = None  # LlamaConfig has no sliding window
    if model_type == "qwen2" and not hf.get("use_sliding_window", False):
        window = None
    types = hf.get("layer_types")
    if types is None:
        if model_type == "qwen2" and window is not None:
            first = int(hf.get("max_window_layers", layers))
            types = [SLIDING_ATTENTION if i >= first else FULL_ATTENTION for i in range(layers)]
        else:
            types = [SLIDING_ATTENTION if window else FULL_ATTENTION] * layers
    types = tuple(types)
    unknown = set(types) - {FULL_ATTENTION, SLIDING_ATTENTION}
    if unknown:
        raise ConfigError(f"{model_type}: layer_types {sorted(unknown)} are not implemented")
    if window is None and SLIDING_ATTENTION in types:
        # HF maps sliding layers without a window to full attention.
        types = (FULL_ATTENTION,) * layers
    return (int(window) if window else None), types
