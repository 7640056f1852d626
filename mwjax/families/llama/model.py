"""The llama-like family: Llama 2 / 3 / 3.1, SmolLM2, Mistral, Qwen2 (HF `LlamaForCausalLM` & co.).

Module and parameter paths follow HF (`model.layers[i].mlp.up_proj.kernel` <-> HF
`model.layers.{i}.mlp.up_proj.weight`, transposed), so converters, masks, attacks and probes
address the same things by the same names. Gemma 1, Mixtral and Phi-3 reuse these classes with
their own norm, FFN or decoder layer.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from mwjax.nn.base import CausalLM, Taps
from mwjax.nn.blocks import MLP, Attention
from mwjax.nn.cache import LayerCache
from mwjax.nn.config import ModelConfig
from mwjax.nn.layers import Embed, Linear, RMSNorm

__all__ = ["MLP", "Attention", "DecoderLayer", "LlamaForCausalLM", "LlamaModel"]


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
                 norm_offset: float = 0.0, final_norm=None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, **kw)
        self.layers = nnx.List([layer(config, i, **kw) for i in range(config.num_hidden_layers)])
        self.norm = (RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype, offset=norm_offset)
                     if final_norm is None else final_norm(config, param_dtype))


class LlamaForCausalLM(CausalLM):
    """HF `LlamaForCausalLM` (also Mistral, Qwen2, SmolLM2)."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs):
        self.init_model(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def init_model(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs, layer=DecoderLayer,
                   norm_offset: float = 0.0, final_norm=None) -> None:
        """Set `config`, `model` (with `layer` as decoder layer) and `lm_head` (None when tied).

        Args:
          config: the model's config.
          dtype: compute dtype.
          param_dtype: dtype of the parameters; None for `dtype`.
          rngs: the initialisers' random streams.
          layer: builds decoder layer i (`layer(config, i, dtype=, param_dtype=, rngs=)`); HF `LlamaDecoderLayer`
            by default.
          norm_offset: the final norm's weight offset (1.0 for Gemma's `(1 + w)`).
          final_norm: builds the final norm instead (`final_norm(config, param_dtype)`; OLMo's LayerNorm); None: an
            RMSNorm.
        """
        param_dtype = param_dtype or dtype
        self.config = config
        self.dtype = dtype
        self.model = LlamaModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, layer=layer,
                                norm_offset=norm_offset, final_norm=final_norm)
        self.lm_head = (
            None if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, axes=("embed", "vocab"), use_bias=False, dtype=dtype,
                        param_dtype=param_dtype, rngs=rngs)
        )
