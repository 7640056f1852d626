"""The llama-like family: Llama 2 / 3 / 3.1, SmolLM2, Mistral, Qwen2 (HF `LlamaForCausalLM` & co.).

Module and parameter paths follow HF (`model.layers[i].mlp.up_proj.kernel` <-> HF
`model.layers.{i}.mlp.up_proj.weight`, transposed), so converters, masks, attacks and probes
address the same things by the same names.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from mwjax import masks
from mwjax.config import ModelConfig
from mwjax.models import attention
from mwjax.models.base import CausalLM, Taps
from mwjax.models.cache import LayerCache
from mwjax.models.layers import Embed, Linear, RMSNorm, activation


class Attention(nnx.Module):
    """HF `LlamaAttention`: q/k/v/o projections, RoPE, grouped-query attention."""

    def __init__(self, config: ModelConfig, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        d, hd = config.hidden_size, config.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(d, self.num_heads * hd, use_bias=config.qkv_bias, **kw)
        self.k_proj = Linear(d, self.num_kv_heads * hd, use_bias=config.qkv_bias, **kw)
        self.v_proj = Linear(d, self.num_kv_heads * hd, use_bias=config.qkv_bias, **kw)
        self.o_proj = Linear(self.num_heads * hd, d, use_bias=config.o_bias, **kw)

    def __call__(self, x, rope, mask, taps: Taps, cache: LayerCache | None = None):
        b, t, _ = x.shape
        cos, sin = rope
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = attention.apply_rope(q, cos, sin), attention.apply_rope(k, cos, sin)
        if cache is not None:
            cache = cache.update(k, v)
            k, v = cache.keys, cache.values
        out, probs = attention.grouped_query_attention(q, k, v, mask, scale=self.scale)
        taps(self, "attn_probs", self.layer_idx, probs)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), cache


class MLP(nnx.Module):
    """HF `LlamaMLP`: down_proj(act(gate_proj(x)) * up_proj(x)).

    `row_mask` multiplies the same PyTorch rows of W_gate and W_up (House of Cards, Algorithm 1).
    """

    def __init__(self, config: ModelConfig, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layer_idx = layer_idx
        self.act = activation(config.hidden_act)
        d, f = config.hidden_size, config.intermediate_size
        kw = dict(use_bias=config.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(d, f, **kw)
        self.up_proj = Linear(d, f, **kw)
        self.down_proj = Linear(f, d, **kw)

    def __call__(self, x, row_mask: masks.RowMask | None, taps: Taps):
        h = self.act(self.gate_proj(x, row_mask)) * self.up_proj(x, row_mask)  # [b, t, d_ff]
        h = taps(self, "intermediate", self.layer_idx, h)
        return taps(self, "down_proj_output", self.layer_idx, self.down_proj(h))


class DecoderLayer(nnx.Module):
    """HF `LlamaDecoderLayer`: pre-norm attention and FFN, each with a residual add."""

    def __init__(self, config: ModelConfig, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layer_idx = layer_idx
        self.self_attn = Attention(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(eps=config.rms_norm_eps, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, **norm)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)

    def __call__(self, x, rope, mask, row_mask, taps: Taps, cache: LayerCache | None = None):
        i = self.layer_idx
        h = taps(self, "attn_input", i, self.input_layernorm(x))
        a, cache = self.self_attn(h, rope, mask, taps, cache)
        x = x + taps(self, "attn_output", i, a)
        h = taps(self, "mlp_input", i, self.post_attention_layernorm(x))
        x = x + self.mlp(h, row_mask, taps)
        return taps(self, "hidden", i, x), cache


class LlamaModel(nnx.Module):
    """HF `LlamaModel`: embeddings, decoder layers, final norm."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, **kw)
        self.layers = nnx.List([DecoderLayer(config, i, **kw) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)


class LlamaForCausalLM(CausalLM):
    """HF `LlamaForCausalLM` (also Mistral, Qwen2, SmolLM2)."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs):
        param_dtype = param_dtype or dtype
        self.config = config
        self.dtype = dtype
        self.model = LlamaModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = (
            None if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
                        param_dtype=param_dtype, rngs=rngs)
        )
