"""Attention and gated FFN blocks shared by every family (HF `LlamaAttention` / `LlamaMLP` and kin).

The families differ only in parameters these blocks take from the config: the attention scale
(`query_pre_attn_scalar` in Gemma 2 / 3), logit soft-capping (Gemma 2), QK-norm (Gemma 3, whose
RMSNorm multiplies by `1 + w`), biases (Qwen2, Llama), and partial rotary embeddings (Phi-3 family).
"""

from __future__ import annotations

import jax
from flax import nnx

from mwjax.instrument import masks
from mwjax.nn import attention
from mwjax.nn.base import Taps
from mwjax.nn.cache import LayerCache
from mwjax.nn.config import ModelConfig
from mwjax.nn.layers import Linear, RMSNorm, activation
from mwjax.nn.rope import apply_rope


class Attention(nnx.Module):
    """HF `LlamaAttention` (also Gemma / Gemma 2 / Gemma 3 / Mixtral / Phi-3 attention).

    q/k/v/o projections, optional QK-norm over each head (`q_norm` / `k_norm`, Gemma 3), RoPE,
    grouped-query attention with `config.attention_scale` and optional soft-capping of the scores: a fused
    kernel (`jax.nn.dot_product_attention`, or the Pallas splash attention kernel on TPU) or HF's eager
    computation (`attention.choose_implementation`). mask: an `attention.AttentionMask`.
    Phi-3's fused `qkv_proj` is split into q/k/v_proj by the converters.
    """

    def __init__(self, config: ModelConfig, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs,
                 norm_offset: float = 0.0):
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.attention_scale
        self.softcap = config.attn_logit_softcapping
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
        if config.qk_norm:
            norm = dict(eps=config.rms_norm_eps, param_dtype=param_dtype, offset=norm_offset)
            self.q_norm, self.k_norm = RMSNorm(hd, **norm), RMSNorm(hd, **norm)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x, rope, mask, taps: Taps, cache: LayerCache | None = None):
        b, t, _ = x.shape
        cos, sin = rope
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
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

