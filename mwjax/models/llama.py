"""The llama-like family: Llama 2 / 3 / 3.1, SmolLM2, Mistral, Qwen2 (HF `LlamaForCausalLM` & co.).

Module and parameter paths follow HF (`model.layers[i].mlp.up_proj.kernel` <-> HF
`model.layers.{i}.mlp.up_proj.weight`, transposed), so converters, masks, attacks and probes
address the same things by the same names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mwjax import masks, probes
from mwjax.config import SLIDING_ATTENTION, ModelConfig
from mwjax.models import attention
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

    def __call__(self, x, cos, sin, mask, probe_config=None):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = attention.apply_rope(q, cos, sin), attention.apply_rope(k, cos, sin)
        out, probs = attention.grouped_query_attention(q, k, v, mask, scale=self.scale)
        probes.sow(self, "attn_probs", self.layer_idx, probs, probe_config)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))


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

    def __call__(self, x, row_mask: masks.RowMask | None = None, probe_config=None):
        h = self.act(self.gate_proj(x, row_mask)) * self.up_proj(x, row_mask)  # [b, t, d_ff]
        probes.sow(self, "intermediate", self.layer_idx, h, probe_config)
        y = self.down_proj(h)
        probes.sow(self, "down_proj_output", self.layer_idx, y, probe_config)
        return y


class DecoderLayer(nnx.Module):
    """HF `LlamaDecoderLayer`: pre-norm attention and FFN, each with a residual add."""

    def __init__(self, config: ModelConfig, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layer_idx = layer_idx
        self.self_attn = Attention(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(eps=config.rms_norm_eps, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, **norm)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)

    def __call__(self, x, cos, sin, mask, row_mask=None, probe_config=None):
        i = self.layer_idx
        h = self.input_layernorm(x)
        probes.sow(self, "attn_input", i, h, probe_config)
        a = self.self_attn(h, cos, sin, mask, probe_config)
        probes.sow(self, "attn_output", i, a, probe_config)
        x = x + a
        h = self.post_attention_layernorm(x)
        probes.sow(self, "mlp_input", i, h, probe_config)
        x = x + self.mlp(h, row_mask, probe_config)
        probes.sow(self, "hidden", i, x, probe_config)
        return x


class LlamaModel(nnx.Module):
    """HF `LlamaModel`: embeddings, decoder layers, final norm."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)
        self.layers = nnx.List(
            [DecoderLayer(config, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
             for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)


class LlamaForCausalLM(nnx.Module):
    """HF `LlamaForCausalLM` (also Mistral, Qwen2, SmolLM2): tokens [b, t] -> logits [b, t, vocab]."""

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

    def __call__(
        self,
        tokens: jax.Array,  # int32 [b, t]
        positions: jax.Array | None = None,  # int32 [b, t]; default 0..t-1
        attention_mask: jax.Array | None = None,  # [b, t], 1 = real token, 0 = padding
        ffn_masks: masks.FFNMasks | None = None,  # {layer: RowMask}
        probes: probes.ProbeConfig | None = None,
    ) -> jax.Array:
        cfg = self.config
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        ffn_masks = ffn_masks or {}
        masks.validate(ffn_masks, num_layers=cfg.num_hidden_layers, d_ff=cfg.intermediate_size,
                       d_model=cfg.hidden_size)
        cos, sin = attention.rope_cos_sin(cfg.rope.inv_frequencies(cfg.head_dim), positions)
        layer_masks = {
            kind: attention.causal_mask(
                t, t, padding_mask=attention_mask,
                sliding_window=cfg.sliding_window if kind == SLIDING_ATTENTION else None)
            for kind in set(cfg.layer_types)
        }
        x = self.model.embed_tokens(tokens)
        for i, layer in enumerate(self.model.layers):
            with jax.named_scope(f"layer_{i}"):
                x = layer(x, cos, sin, layer_masks[cfg.layer_types[i]], ffn_masks.get(i), probes)
        x = self.model.norm(x)
        return self.model.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
