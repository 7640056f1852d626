"""Model configuration: one frozen dataclass for every supported family.

`ModelConfig.from_hf_config` reads a Hugging Face `config.json` dict (transformers 4.x layout with
`rope_theta` / `rope_scaling`, or transformers 5.x layout with `rope_parameters`) and refuses, by
name, anything mwjax does not compute exactly as HF does. The keys every family shares are read
here; a family's own keys, defaults and RoPE peculiarities by its `Family` record (`mwjax.family`,
declared in the family's model module), and a key neither understands is refused unless it is
known to be informational (`INFORMATIONAL_HF_KEYS`). The readers' helpers (`read_rope`,
`rope_from_params`) live here so every family parses RoPE the same way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from mwjax import family as registry
from mwjax import layer_index

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"

SUPPORTED_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
# HF config keys the shared reader understands for every family (a family's own: `Family.hf_keys`).
SHARED_HF_KEYS = frozenset({
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "max_position_embeddings",
    "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
    "layer_types", "bos_token_id", "eos_token_id", "pad_token_id", "use_bidirectional_attention",
})
# Keys that never change a forward pass in inference: bookkeeping, token ids, initialisation, dropout,
# generation defaults, output switches (transformers' `PretrainedConfig` base attributes, 4.x and 5.x).
INFORMATIONAL_HF_KEYS = frozenset({
    "architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
    "auto_map", "tokenizer_class", "prefix", "id2label", "label2id", "num_labels", "problem_type",
    "finetuning_task", "task_specific_params", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "tie_encoder_decoder", "chunk_size_feed_forward", "pruned_heads",
    "torchscript", "use_bfloat16", "tf_legacy_loss", "return_dict", "output_attentions", "output_hidden_states",
    "use_cache", "cache_implementation", "attn_implementation", "_attn_implementation",
    "_attn_implementation_autoset", "initializer_range", "pretraining_tp",  # pretraining_tp: same math, sliced
    "attention_dropout", "hidden_dropout", "embd_pdrop", "resid_pdrop",  # dropout: training only
    "sep_token_id", "decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
})
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# HF config keys read as numbers: checked for type before any arithmetic, so a corrupt value is named.
_INT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window", "max_window_layers",
             "sliding_window_pattern", "num_local_experts", "num_experts", "num_experts_per_tok",
             "original_max_position_embeddings")
_FLOAT_KEYS = ("rms_norm_eps", "rope_theta", "rope_local_base_freq", "partial_rotary_factor", "query_pre_attn_scalar",
               "attn_logit_softcapping", "final_logit_softcapping")


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


def _check_numbers(hf: Mapping[str, Any]) -> None:
    """The numeric keys of a HF config have numeric values, integral where they count something, and
    the sizes that divide others are positive (before anything divides by them)."""
    for key in _INT_KEYS + _FLOAT_KEYS:
        value = hf.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}={value!r} must be a number")
        if key in _INT_KEYS and not float(value).is_integer():
            raise ConfigError(f"{key}={value!r} must be an integer")
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
        if hf.get(key) is not None and hf[key] <= 0:
            raise ConfigError(f"{key}={hf[key]!r} must be positive")


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
        """How many features of a head are rotated (HF: `int(head_dim * partial_rotary_factor)`)."""
        return int(head_dim * self.partial_rotary_factor)

    @property
    def attention_scaling(self) -> float:
        """Factor on cos and sin (HF's `attention_scaling`; 1 except for longrope)."""
        return 1.0 if self.attention_factor is None else self.attention_factor

    def inv_frequencies(self, head_dim: int, *, long: bool = False) -> np.ndarray:
        """Inverse frequencies [rotary_dim // 2], float32, as HF's `ROPE_INIT_FUNCTIONS[type]` computes them.

        long: longrope only, the set used once a sequence is longer than `original_max_position_embeddings`.
        """
        dim = self.rotary_dim(head_dim)
        exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        if self.type == "longrope":
            ext = np.asarray(self.long_factor if long else self.short_factor, np.float32)
            return (np.float32(1.0) / (ext * np.float32(self.theta) ** exponent)).astype(np.float32)
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
    `rope_local_base_freq`) and `qk_norm` (RMSNorm of every query / key head before RoPE: Gemma 3).
    Gemma 2 / 3 add `query_pre_attn_scalar` and the soft-caps; Mixtral `num_local_experts` and
    `num_experts_per_tok` (None for dense models).

    Fields and derived properties only: what a family means by its HF keys is its `Family` record's
    (`self.family`); `from_hf_config` / `to_hf_config` handle the shared keys and hand over to it.
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
        for name in ("sliding_window", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
            _check_positive(name, getattr(self, name), finite=True)
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
    def family(self) -> registry.Family:
        """The registry record of this config's model type (`mwjax.family`)."""
        return registry.family(self.model_type)

    @property
    def architecture(self) -> str:
        return self.family.architecture

    @property
    def attention_scale(self) -> float:
        """Multiplier of q.k: `query_pre_attn_scalar ** -0.5` (Gemma 2 / 3), else `head_dim ** -0.5`."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def rope_for(self, layer_type: str) -> RopeConfig:
        """The RoPE parameters of layers of one type (HF `rope_parameters[layer_type]`)."""
        if layer_type == SLIDING_ATTENTION and self.sliding_rope is not None:
            return self.sliding_rope
        return self.rope

    def layer_label(self, layer: int) -> str:
        """'layer 12 (HF layers[11])': the papers number layers from 1, HF and mwjax from 0."""
        return layer_index.layer_label(layer)

    # ------------------------------------------------------------------ HF <-> mwjax

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """Build from a HF `config.json` dict: the shared keys here, the family's own through its
        `Family.read_hf`. Raises `ConfigError` naming what is unsupported or out of range."""
        _check_numbers(hf)
        try:
            return cls._from_hf_config(hf)
        except ConfigError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError) as e:  # a malformed nested value
            raise ConfigError(f"malformed {hf.get('model_type')} config ({type(e).__name__}: {e})") from e

    @classmethod
    def _from_hf_config(cls, hf: Mapping[str, Any]) -> ModelConfig:
        model_type = hf.get("model_type")
        _refuse_multimodal(hf)
        fam = registry.get(model_type) if isinstance(model_type, str) else None
        if fam is None:
            raise ConfigError(
                f"unknown or unsupported model_type {model_type!r} "
                f"(architectures={hf.get('architectures')}); mwjax supports "
                f"{sorted(f.model_type for f in registry.families())}"
            )
        missing = [k for k in _REQUIRED_KEYS if hf.get(k) is None]
        if missing:
            raise ConfigError(f"{model_type} config lacks required keys {missing}")
        refuse_unknown_keys(fam, hf)
        if hf.get("use_bidirectional_attention"):
            raise ConfigError(f"{model_type}: use_bidirectional_attention=True (an encoder variant) is not implemented")
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        layers = int(hf["num_hidden_layers"])
        if fam.read_rope is not None:
            rope, sliding_rope = fam.read_rope(hf)
        else:
            rope, sliding_rope = read_rope(model_type, hf, fam.rope_theta), None
        fields: dict[str, Any] = dict(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            hidden_act=hf.get("hidden_act", fam.hidden_act),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=rope,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", fam.tie_word_embeddings)),
            sliding_window=hf.get("sliding_window"),
            layer_types=hf.get("layer_types"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=_int_or_tuple(hf.get("eos_token_id")),
            pad_token_id=hf.get("pad_token_id"),
            sliding_rope=sliding_rope,
        )
        fields |= fam.read_hf(hf, fields)
        if fields["hidden_act"] not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"{model_type}: hidden_act {fields['hidden_act']!r} is not implemented; "
                              f"supported: {SUPPORTED_ACTIVATIONS}")
        fields["sliding_window"], fields["layer_types"] = _layer_layout(
            model_type, fields["sliding_window"], fields["layer_types"], layers)
        return cls(**fields)

    def to_hf_config(self) -> dict[str, Any]:
        """The HF `config.json` dict (legacy `rope_theta` / `rope_scaling` keys, read by transformers 4 and 5):
        the shared keys here, the family's own through its `Family.write_hf`."""
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
        if (scaling := self.rope.to_hf_scaling()) is not None:
            hf["rope_scaling"] = scaling
        if self.rope.partial_rotary_factor != 1.0:
            hf["partial_rotary_factor"] = self.rope.partial_rotary_factor
        return self.family.write_hf(self, hf)

    # ------------------------------------------------------------------ native (orbax) serialisation

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        d = dict(d)
        d["rope"] = RopeConfig.from_dict(d["rope"])
        if d.get("sliding_rope") is not None:
            d["sliding_rope"] = RopeConfig.from_dict(d["sliding_rope"])
        d["layer_types"] = tuple(d["layer_types"])
        d["eos_token_id"] = _int_or_tuple(d.get("eos_token_id"))
        return cls(**d)


def _int_or_tuple(x):
    return tuple(x) if isinstance(x, list | tuple) else x


def _refuse_multimodal(hf: Mapping[str, Any]) -> None:
    """Gemma 3 4B+ checkpoints (model_type "gemma3") are image-text models: name what is missing."""
    if hf.get("model_type") == "gemma3" or hf.get("vision_config") is not None:
        parts = [p for p in ("vision_config", "text_config") if hf.get(p) is not None]
        raise ConfigError(
            f"model_type {hf.get('model_type')!r} (architectures={hf.get('architectures')}, with {parts}) is a "
            "multimodal image-text checkpoint: its vision tower (SigLIP) and image-token projector are not "
            "implemented. mwjax reads the text-only Gemma 3 (model_type 'gemma3_text', Gemma3ForCausalLM), "
            "e.g. gemma-3-1b / gemma-3-270m, or a GGUF of the text model"
        )


def refuse_unknown_keys(fam: registry.Family, hf: Mapping[str, Any]) -> None:
    """Refuse HF config keys that neither the shared reader nor the family understands and that are not
    known to be informational: an unread key may change the computation, so it is an error, not a warning.
    A key set to null asks for nothing and passes."""
    known = SHARED_HF_KEYS | INFORMATIONAL_HF_KEYS | fam.hf_keys | fam.ignored_hf_keys
    unknown = sorted(k for k, v in hf.items() if k not in known and v is not None)
    if unknown:
        raise ConfigError(
            f"mwjax does not implement {', '.join(map(repr, unknown))} for {fam.model_type}: a HF config key that "
            "mwjax does not read may change the computation, so it is refused, not ignored. If it does not "
            f"change the math, add it to `ignored_hf_keys` of the {fam.model_type} record "
            f"({fam.model_class.__module__}) or to `INFORMATIONAL_HF_KEYS` (mwjax/config.py); otherwise implement it"
        )


def float_or_none(x) -> float | None:
    return None if x is None else float(x)


def read_rope(model_type: str, hf: Mapping[str, Any], default_theta: float, *, partial_rotary: bool = False,
              aliases: Mapping[str, str] | None = None) -> RopeConfig:
    """The RoPE of a family with one RoPE for every layer: transformers 5 `rope_parameters` (flat) or
    transformers 4 `rope_theta` / `rope_scaling`. partial_rotary: the family implements
    `partial_rotary_factor` < 1; aliases: rope type names the family's HF config renames."""
    params = dict(hf.get("rope_parameters") or {})
    if params.keys() & {FULL_ATTENTION, SLIDING_ATTENTION}:
        raise ConfigError(f"{model_type}: per-layer-type rope_parameters are not implemented for this family")
    if not params:  # transformers 4.x layout
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", default_theta))
    return rope_from_params(model_type, params, hf, default_theta, partial_rotary=partial_rotary, aliases=aliases)


def rope_from_params(model_type: str, params: Mapping[str, Any], hf: Mapping[str, Any], default_theta: float, *,
                     partial_rotary: bool = False, aliases: Mapping[str, str] | None = None) -> RopeConfig:
    """One `RopeConfig` from a HF rope parameter dict (`rope_type` + its keys)."""
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


def _layer_layout(model_type: str, window, types, layers: int) -> tuple[int | None, tuple[str, ...]]:
    """(sliding_window, layer_types) from what the family's reader made of them: without layer types,
    every layer slides when there is a window (Mistral, Mixtral, Phi-3); HF maps sliding layers without
    a window to full attention."""
    if types is None:
        types = [SLIDING_ATTENTION if window else FULL_ATTENTION] * layers
    types = tuple(types)
    unknown = set(types) - {FULL_ATTENTION, SLIDING_ATTENTION}
    if unknown:
        raise ConfigError(f"{model_type}: layer_types {sorted(unknown)} are not implemented")
    if window is None and SLIDING_ATTENTION in types:
        types = (FULL_ATTENTION,) * layers
    return (int(window) if window else None), types
