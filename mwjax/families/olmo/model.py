"""OLMo and OLMo 2 (HF `OlmoForCausalLM`, `Olmo2ForCausalLM`): llama's attention and gated FFN with other norms.

What sets them apart from Llama, all kept as HF computes it:
- Both: RoPE rotates in float32 and casts back (HF's OLMo rotary embedding hands float32 cos / sin to
  `apply_rotary_pos_emb`; Llama's casts them to the compute dtype first); `attention_bias` on q, k, v and o.
- OLMo: every norm (`input_layernorm`, `post_attention_layernorm`, the final `model.norm`) is a LayerNorm
  without weight or bias (`OlmoLayerNorm`, eps 1e-5, in float32, then cast back): no norm parameters at all;
  `clip_qkv` clamps the q, k and v projections to [-clip_qkv, clip_qkv] before the split into heads.
- OLMo 2: no pre-norms. RMSNorm after each sublayer (`post_attention_layernorm` on the attention output,
  `post_feedforward_layernorm` on the FFN output), before the residual add; QK-norm (`self_attn.q_norm` /
  `k_norm`) over the whole q / k projection (num_heads * head_dim, num_kv_heads * head_dim) before the split
  into heads and before RoPE. `Olmo2RMSNorm` multiplies by its weight in float32 before casting back.

Probe points: OLMo's layer is Llama's (pre-norm): "attn_input" is `input_layernorm`'s output, "mlp_input"
`post_attention_layernorm`'s. OLMo 2's post-norm layer has no norm in front of its sublayers:
- "attn_input": the attention's input, the layer's input (the residual stream itself);
- "attn_output": the `o_proj` output, before `post_attention_layernorm`;
- "attn_residual": the residual stream after the attention's residual add (of the normed attention output);
- "mlp_input": the FFN's input x, that same residual stream (an edit here changes what the FFN sees, not the
  residual it is added to, as in every family);
- "down_proj_output": the `down_proj` output, before `post_feedforward_layernorm`;
- "hidden": the layer's output.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from mwjax.families.llama.model import DecoderLayer, LlamaForCausalLM
from mwjax.nn.base import Taps
from mwjax.nn.blocks import MLP, Attention
from mwjax.nn.cache import LayerCache
from mwjax.nn.config import ModelConfig
from mwjax.nn.layers import NonParametricLayerNorm, RMSNorm


class OlmoDecoderLayer(DecoderLayer):
    """HF `OlmoDecoderLayer`: Llama's pre-norm layer (its forward, inherited) with parameter-free LayerNorms, clipped
    q, k, v and RoPE in float32."""

    def __init__(self, config: ModelConfig, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layer_idx = layer_idx
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = Attention(config, layer_idx, rope_in_float32=True, **kw)
        self.mlp = MLP(config, layer_idx, **kw)
        self.input_layernorm = olmo_norm(config)
        self.post_attention_layernorm = olmo_norm(config)


class Olmo2DecoderLayer(nnx.Module):
    """HF `Olmo2DecoderLayer`: attention and FFN each followed by an RMSNorm before its residual add."""

    def __init__(self, config: ModelConfig, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layer_idx = layer_idx
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = Attention(config, layer_idx, norm_scale_in_float32=True, rope_in_float32=True, **kw)
        self.mlp = MLP(config, layer_idx, **kw)
        self.post_attention_layernorm = olmo2_norm(config, param_dtype)
        self.post_feedforward_layernorm = olmo2_norm(config, param_dtype)

    def __call__(self, x, rope, mask, row_mask, taps: Taps, cache: LayerCache | None = None):
        i = self.layer_idx
        h = taps(self, "attn_input", i, x)
        a, cache = self.self_attn(h, rope, mask, taps, cache)
        x = x + self.post_attention_layernorm(taps(self, "attn_output", i, a))
        taps.record(self, "attn_residual", i, x)
        h = taps(self, "mlp_input", i, x)
        x = x + self.post_feedforward_layernorm(self.mlp(h, row_mask, taps))
        return taps(self, "hidden", i, x), cache


def olmo_norm(config: ModelConfig, param_dtype=None) -> NonParametricLayerNorm:
    """HF `OlmoLayerNorm` over d_model: no parameters, epsilon `config.rms_norm_eps` (1e-5 as HF reads it).

    Args:
      config: the model's config.
      param_dtype: unused (the norm has no parameters); the signature of `olmo2_norm`.

    Returns:
      The norm module.
    """
    return NonParametricLayerNorm(config.hidden_size, eps=config.rms_norm_eps)


def olmo2_norm(config: ModelConfig, param_dtype) -> RMSNorm:
    """HF `Olmo2RMSNorm` over d_model: the weight multiplies in float32, before the cast back.

    Args:
      config: the model's config (`hidden_size`, `rms_norm_eps`).
      param_dtype: the weight's dtype.

    Returns:
      The norm module.
    """
    return RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype, scale_in_float32=True)


class OlmoForCausalLM(LlamaForCausalLM):
    """HF `OlmoForCausalLM` (model_type "olmo"): Llama's model with OLMo's layers and final LayerNorm."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs):
        self.init_model(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, layer=OlmoDecoderLayer,
                        final_norm=olmo_norm)


class Olmo2ForCausalLM(OlmoForCausalLM):
    """HF `Olmo2ForCausalLM` (model_type "olmo2")."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs):
        self.init_model(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, layer=Olmo2DecoderLayer,
                        final_norm=olmo2_norm)
