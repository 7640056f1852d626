"""Gemma 1 / 2 / 3 text models (HF `GemmaForCausalLM`, `Gemma2ForCausalLM`, `Gemma3ForCausalLM`).

What sets them apart from Llama, all kept as HF computes it:
- RMSNorm multiplies by `(1 + w)` in float32 before casting back (`RMSNorm(offset=1.0)`).
- The token embedding is multiplied by `sqrt(hidden_size)`, cast to the compute dtype first
  (in bfloat16, sqrt(3072) = 55.43 becomes 55.5).
- gelu-tanh FFN; head_dim independent of hidden_size; tied embeddings.
- Gemma 2 / 3: "sandwich" norms. `post_attention_layernorm` normalises the attention output
  before the residual add (in Gemma 1 and Llama it is the FFN's input norm), and the FFN has its
  own `pre_feedforward_layernorm` / `post_feedforward_layernorm`. Queries are scaled by
  `query_pre_attn_scalar ** -0.5`; sliding-window attention on every other layer (Gemma 2) or on
  five of every six (Gemma 3).
- Gemma 2: attention scores and final logits soft-capped, `cap * tanh(x / cap)`.
- Gemma 3: QK-norm (`self_attn.q_norm` / `k_norm`, over each head, before RoPE); sliding layers
  use their own RoPE base (`rope_local_base_freq`, 10 000), global layers 1 000 000 with rope
  scaling where configured.

Probe points of the sandwich layers: "attn_output" is the `o_proj` output and "down_proj_output"
the `down_proj` output, both before their post-norm; "mlp_input" is `pre_feedforward_layernorm`'s
output (the FFN's input x, as in every family).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mwjax.families.llama.model import DecoderLayer, LlamaForCausalLM
from mwjax.nn.base import Taps
from mwjax.nn.blocks import MLP, Attention
from mwjax.nn.cache import LayerCache
from mwjax.nn.config import ModelConfig
from mwjax.nn.layers import RMSNorm

GEMMA_NORM_OFFSET = 1.0  # Gemma's RMSNorm weight w acts as (1 + w)


class Gemma2DecoderLayer(nnx.Module):
    """HF `Gemma2DecoderLayer` / `Gemma3DecoderLayer`: attention and FFN each wrapped in a pre- and a post-norm."""

    def __init__(self, config: ModelConfig, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layer_idx = layer_idx
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = Attention(config, layer_idx, norm_offset=GEMMA_NORM_OFFSET, **kw)
        self.mlp = MLP(config, layer_idx, **kw)
        norm = functools.partial(RMSNorm, config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype,
                                 offset=GEMMA_NORM_OFFSET)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.post_feedforward_layernorm = norm()

    def __call__(self, x, rope, mask, row_mask, taps: Taps, cache: LayerCache | None = None):
        i = self.layer_idx
        h = taps(self, "attn_input", i, self.input_layernorm(x))
        a, cache = self.self_attn(h, rope, mask, taps, cache)
        x = x + self.post_attention_layernorm(taps(self, "attn_output", i, a))
        taps.record(self, "attn_residual", i, x)
        h = taps(self, "mlp_input", i, self.pre_feedforward_layernorm(x))
        x = x + self.post_feedforward_layernorm(self.mlp(h, row_mask, taps))
        return taps(self, "hidden", i, x), cache


class GemmaForCausalLM(LlamaForCausalLM):
    """HF `GemmaForCausalLM` (model_type "gemma"), `Gemma2ForCausalLM` ("gemma2") and
    `Gemma3ForCausalLM` ("gemma3_text"); the config says which."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs):
        if config.model_type == "gemma":
            layer = functools.partial(DecoderLayer, norm_offset=GEMMA_NORM_OFFSET)
        else:
            layer = Gemma2DecoderLayer
        self.init_model(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, layer=layer,
                        norm_offset=GEMMA_NORM_OFFSET)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """HF `GemmaTextScaledWordEmbedding`: embedding * sqrt(hidden_size), the scale a float32 cast to the dtype.

        Args:
          tokens: int [batch, seq] token ids.

        Returns:
          [batch, seq, d_model] scaled embeddings in the compute dtype.
        """
        x = self.model.embed_tokens(tokens)
        return x * jnp.asarray(np.float32(self.config.hidden_size**0.5)).astype(x.dtype)

    def unembed(self, x: jax.Array) -> jax.Array:
        """Logits, soft-capped by `final_logit_softcapping` where configured (Gemma 2): `cap * tanh(x / cap)`.

        Args:
          x: [batch, seq, d_model] final hidden states (after the final norm).

        Returns:
          Logits [batch, seq, vocab].
        """
        logits = super().unembed(x)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else jnp.tanh(logits / cap) * cap
