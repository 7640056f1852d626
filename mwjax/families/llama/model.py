"""The llama-like family: Llama 2 / 3 / 3.1, SmolLM2, Mistral, Qwen2 (HF `LlamaForCausalLM` & co.).

Module and parameter paths follow HF (`model.layers[i].mlp.up_proj.kernel` <-> HF
`model.layers.{i}.mlp.up_proj.weight`, transposed), so converters, masks, attacks and probes
address the same things by the same names. Gemma 1, Mixtral and Phi-3 reuse these classes with
their own norm, FFN or decoder layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from mwjax.families.family import Family, register
from mwjax.nn.base import CausalLM, Taps
from mwjax.nn.blocks import MLP, Attention
from mwjax.nn.cache import LayerCache
from mwjax.nn.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig
from mwjax.nn.layers import Embed, Linear, RMSNorm

__all__ = ["LLAMA", "MISTRAL", "MLP", "QWEN2", "Attention", "DecoderLayer", "LlamaForCausalLM", "LlamaModel"]


class DecoderLayer(nnx.Module):
    """HF `LlamaDecoderLayer`: pre-norm attention and FFN, each with a residual add.

    mlp_cls: the FFN block (Mixtral: its sparse MoE block); norm_offset: 1.0 for Gemma's `(1 + w)`.
    """

    def __init__(self, config: ModelConfig, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs,
                 mlp_cls: type[nnx.Module] = MLP, norm_offset: float = 0.0):
        self.layer_idx = layer_idx
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = Attention(config, layer_idx, norm_offset=norm_offset, **kw)
        self.mlp = mlp_cls(config, layer_idx, **kw)
        norm = dict(eps=config.rms_norm_eps, param_dtype=param_dtype, offset=norm_offset)
        self.input_layernorm = RMSNorm(config.hidden_size, **norm)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)

    def __call__(self, x, rope, mask, row_mask, taps: Taps, cache: LayerCache | None = None):
        i = self.layer_idx
        h = taps(self, "attn_input", i, self.input_layernorm(x))
        a, cache = self.self_attn(h, rope, mask, taps, cache)
        x = x + taps(self, "attn_output", i, a)
        taps.record(self, "attn_residual", i, x)
        h = taps(self, "mlp_input", i, self.post_attention_layernorm(x))
        x = x + self.mlp(h, row_mask, taps)
        return taps(self, "hidden", i, x), cache


class LlamaModel(nnx.Module):
    """HF `LlamaModel`: embeddings, decoder layers, final norm.

    layer: builds decoder layer i (`layer(config, i, dtype=, param_dtype=, rngs=)`).
    """

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs, layer=DecoderLayer,
                 norm_offset: float = 0.0):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, **kw)
        self.layers = nnx.List([layer(config, i, **kw) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype, offset=norm_offset)


class LlamaForCausalLM(CausalLM):
    """HF `LlamaForCausalLM` (also Mistral, Qwen2, SmolLM2)."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs):
        self.init_model(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def init_model(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs, layer=DecoderLayer,
                   norm_offset: float = 0.0) -> None:
        """Set `config`, `model` (with `layer` as decoder layer) and `lm_head` (None when tied)."""
        param_dtype = param_dtype or dtype
        self.config = config
        self.dtype = dtype
        self.model = LlamaModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, layer=layer,
                                norm_offset=norm_offset)
        self.lm_head = (
            None if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, axes=("embed", "vocab"), use_bias=False, dtype=dtype,
                        param_dtype=param_dtype, rngs=rngs)
        )


# ------------------------------------------------------------------ family records (`mwjax.families.family`)


def read_llama_hf(hf: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """HF `LlamaConfig` / `MistralConfig`: `attention_bias` on q, k, v and o; `mlp_bias` on the FFN."""
    attention_bias = bool(hf.get("attention_bias", False))
    out = dict(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=bool(hf.get("mlp_bias", False)))
    if hf.get("model_type") == "llama":
        out["sliding_window"] = None  # LlamaConfig has no sliding window (HF's attention ignores the key)
    return out


def write_llama_hf(config: ModelConfig, hf: dict[str, Any]) -> dict[str, Any]:
    return hf | {"attention_bias": config.qkv_bias, "mlp_bias": config.mlp_bias,
                 "sliding_window": config.sliding_window}


def read_qwen2_hf(hf: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """HF `Qwen2Config`: biases on q, k, v only (hard-coded); a sliding window only with `use_sliding_window`,
    on layers from `max_window_layers` on."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    types = fields["layer_types"]
    if types is None and window is not None:
        first = int(hf.get("max_window_layers", fields["num_hidden_layers"]))
        types = [SLIDING_ATTENTION if i >= first else FULL_ATTENTION for i in range(fields["num_hidden_layers"])]
    return dict(qkv_bias=True, o_bias=False, mlp_bias=False, sliding_window=window, layer_types=types)


def write_qwen2_hf(config: ModelConfig, hf: dict[str, Any]) -> dict[str, Any]:
    sliding = [i for i, t in enumerate(config.layer_types) if t == SLIDING_ATTENTION]
    return hf | {
        "use_sliding_window": bool(sliding),
        "sliding_window": config.sliding_window,
        "max_window_layers": sliding[0] if sliding else config.num_hidden_layers,
        "layer_types": list(config.layer_types),
    }


_LLAMA_KEYS = frozenset({"attention_bias", "mlp_bias", "sliding_window"})
LLAMA = register(Family(
    model_type="llama", architecture="LlamaForCausalLM", model_class=LlamaForCausalLM,
    read_hf=read_llama_hf, write_hf=write_llama_hf, hf_keys=_LLAMA_KEYS, gguf_architecture="llama",
))
MISTRAL = register(Family(
    model_type="mistral", architecture="MistralForCausalLM", model_class=LlamaForCausalLM,
    read_hf=read_llama_hf, write_hf=write_llama_hf, hf_keys=_LLAMA_KEYS,
    gguf_architecture="llama",  # llama.cpp writes Mistral as arch llama with a sliding window
))
QWEN2 = register(Family(
    model_type="qwen2", architecture="Qwen2ForCausalLM", model_class=LlamaForCausalLM,
    read_hf=read_qwen2_hf, write_hf=write_qwen2_hf,
    hf_keys=frozenset({"use_sliding_window", "sliding_window", "max_window_layers"}), gguf_architecture="qwen2",
))
