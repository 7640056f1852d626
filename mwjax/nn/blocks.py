"""Attention and gated FFN blocks shared by every family (HF `LlamaAttention` / `LlamaMLP` and kin).

The families differ only in parameters these blocks take from the config: the attention scale
(`query_pre_attn_scalar` in Gemma 2 / 3), logit soft-capping (Gemma 2), QK-norm (Gemma 3 over each head, whose
RMSNorm multiplies by `1 + w`; OLMo 2 over the whole projection), q/k/v clipping (OLMo), biases (Qwen2, Llama),
and partial rotary embeddings (Phi-3 family); and in how a family's HF code casts (the norms' and RoPE's
float32 steps, keyword arguments of `Attention`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mwjax.instrument import masks
from mwjax.nn import attention
from mwjax.nn.base import Taps
from mwjax.nn.cache import LayerCache
from mwjax.nn.config import ModelConfig
from mwjax.nn.layers import Linear, RMSNorm, activation
from mwjax.nn.rope import apply_rope


class Attention(nnx.Module):
    """HF `LlamaAttention` (also Gemma / Gemma 2 / Gemma 3 / Mixtral / Phi-3 / OLMo / OLMo 2 attention).

    q/k/v/o projections, optionally clipped to [-clip_qkv, clip_qkv] (OLMo), optional QK-norm (`q_norm` /
    `k_norm`) over each head (Gemma 3) or over the whole projection before the split into heads (OLMo 2,
    `config.qk_norm_scope == "all_heads"`), RoPE, grouped-query attention with `config.attention_scale` and
    optional soft-capping of the scores: a fused kernel (`jax.nn.dot_product_attention`, or the Pallas splash
    attention kernel on TPU) or HF's eager computation (`attention.choose_implementation`).
    mask: an `attention.AttentionMask`. Phi-3's fused `qkv_proj` is split into q/k/v_proj by the converters.

    norm_offset: the QK-norm's weight offset (1.0 for Gemma's `(1 + w)`); norm_scale_in_float32: the QK-norm
    multiplies by its weight before casting back (OLMo 2's `Olmo2RMSNorm`); rope_in_float32: RoPE rotates in
    float32 and casts back (OLMo / OLMo 2's `apply_rotary_pos_emb` with float32 cos / sin).
    """

    def __init__(self, config: ModelConfig, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs,
                 norm_offset: float = 0.0, norm_scale_in_float32: bool = False, rope_in_float32: bool = False):
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.attention_scale
        self.softcap = config.attn_logit_softcapping
        self.clip_qkv = config.clip_qkv
        self.rope_in_float32 = rope_in_float32
        # attention.IMPLEMENTATIONS: "auto" (splash on TPU, cuDNN on GPU where they can, else eager:
        # `choose_implementation`), "eager", "xla", "cudnn" or "splash" (`model.set_attributes(attention="xla")`)
        self.attention = "auto"
        d, hd = config.hidden_size, config.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        qkv = dict(axes=("embed", "heads"), use_bias=config.qkv_bias, **kw)  # heads: the head-major feature axis
        self.q_proj = Linear(d, self.num_heads * hd, **qkv)
        self.k_proj = Linear(d, self.num_kv_heads * hd, **qkv)
        self.v_proj = Linear(d, self.num_kv_heads * hd, **qkv)
        self.o_proj = Linear(self.num_heads * hd, d, axes=("heads", "embed"), use_bias=config.o_bias, **kw)
        self.qk_norm_per_head = config.qk_norm_scope == "head"
        if config.qk_norm:
            norm = dict(eps=config.rms_norm_eps, param_dtype=param_dtype, offset=norm_offset,
                        scale_in_float32=norm_scale_in_float32)
            q_width, k_width = (hd, hd) if self.qk_norm_per_head else (self.num_heads * hd, self.num_kv_heads * hd)
            self.q_norm, self.k_norm = RMSNorm(q_width, **norm), RMSNorm(k_width, **norm)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x, rope, mask, taps: Taps, cache: LayerCache | None = None):
        b, t, _ = x.shape
        cos, sin = rope
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [b, t, heads * head_dim] (kv heads for k, v)
        if self.clip_qkv is not None:
            q, k, v = (jnp.clip(y, -self.clip_qkv, self.clip_qkv) for y in (q, k, v))
        if self.q_norm is not None and not self.qk_norm_per_head:  # over the whole projection (OLMo 2)
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(b, t, self.num_heads, self.head_dim)
        k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
        v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.qk_norm_per_head:  # over each head (Gemma 3)
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, cos, sin, in_float32=self.rope_in_float32)
        k = apply_rope(k, cos, sin, in_float32=self.rope_in_float32)
        if cache is not None:
            cache = cache.update(k, v)
            k, v = cache.keys, cache.values
        how = attention.choose_implementation(self.attention, needs_probs=taps.touches("attn_probs", self.layer_idx),
                                              softcap=self.softcap, dtype=q.dtype, cached=cache is not None,
                                              splash_mask=mask.splash)
        if how == "eager":
            out, probs = attention.grouped_query_attention(q, k, v, mask.dense, scale=self.scale, softcap=self.softcap)
            taps(self, "attn_probs", self.layer_idx, probs)
        elif how == "splash":
            out = attention.splash_attention(q, k, v, mask, scale=self.scale, softcap=self.softcap)
        else:
            out = attention.fused_attention(q, k, v, mask.dense, scale=self.scale, implementation=how,
                                            causal=cache is None)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), cache


class MLP(nnx.Module):
    """HF `LlamaMLP` (also Gemma's, Phi-3's after the gate_up split, and one Mixtral expert):
    down_proj(act(gate_proj(x)) * up_proj(x)).

    `row_mask` multiplies the same PyTorch rows of W_gate and W_up (House of Cards, Algorithm 1).
    """

    def __init__(self, config: ModelConfig, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layer_idx = layer_idx
        self.act = activation(config.hidden_act)
        d, f = config.hidden_size, config.intermediate_size
        kw = dict(use_bias=config.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(d, f, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(d, f, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(f, d, axes=("mlp", "embed"), **kw)

    def gate_and_up(self, x: jax.Array, row_mask: masks.RowMask | None = None) -> tuple[jax.Array, jax.Array]:
        """The two factors of the intermediate state, act(x W_gate) and x W_up: [..., d_ff] each.

        Args:
          x: the FFN's input [..., d_model] (the normed residual stream, probe point `mlp_input`).
          row_mask: multiplies the same PyTorch rows of W_gate and W_up (House of Cards, Algorithm 1); None: no mask.

        Returns:
          (act(x W_gate), x W_up), [..., d_ff] each.
        """
        return self.act(self.gate_proj(x, row_mask)), self.up_proj(x, row_mask)

    def intermediate(self, x: jax.Array, row_mask: masks.RowMask | None = None) -> jax.Array:
        """The paper's intermediate state act(x W_gate) * (x W_up): [..., d_ff].

        Args:
          x: the FFN's input [..., d_model].
          row_mask: multiplies the same PyTorch rows of W_gate and W_up; None: no mask.

        Returns:
          The intermediate state [..., d_ff] (the input of `down_proj`).
        """
        gate, up = self.gate_and_up(x, row_mask)
        return gate * up

    def __call__(self, x, row_mask: masks.RowMask | None, taps: Taps):
        i = self.layer_idx
        gate, up = self.gate_and_up(x, row_mask)  # [b, t, d_ff] each
        taps.record(self, "gate_activation", i, gate)
        taps.record(self, "up_proj_output", i, up)
        h = taps(self, "intermediate", i, gate * up)
        return taps(self, "down_proj_output", i, self.down_proj(h))


class RoutedFFN(nnx.Module):
    """An FFN that routes each token among `experts` (a list of `MLP`s) by a `gate` Linear (HF
    `MixtralSparseMoeBlock`): the mixture-of-experts blocks subclass it, and the methods that address one
    expert's rows (the massive weights) or refuse a routed FFN (super-weight attacks) recognise it by type.

    Subclasses set `gate` (Linear [d_model, num_experts]) and `experts` (nnx.List of MLP).
    """

