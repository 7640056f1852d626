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
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mwjax.families.family import Family, register
from mwjax.families.hf_config import float_or_none, rope_from_params
from mwjax.families.llama.model import DecoderLayer, LlamaForCausalLM, read_llama_hf, write_llama_hf
from mwjax.nn.base import Taps
from mwjax.nn.blocks import MLP, Attention
from mwjax.nn.cache import LayerCache
from mwjax.nn.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig, RopeConfig
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
        """HF `GemmaTextScaledWordEmbedding`: embedding * sqrt(hidden_size), the scale a float32 cast to the dtype."""
        x = self.model.embed_tokens(tokens)
        return x * jnp.asarray(np.float32(self.config.hidden_size**0.5)).astype(x.dtype)

    def unembed(self, x: jax.Array) -> jax.Array:
        """Logits, soft-capped by `final_logit_softcapping` where configured (Gemma 2)."""
        logits = super().unembed(x)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else jnp.tanh(logits / cap) * cap


# ------------------------------------------------------------------ family records (`mwjax.families.family`)

GEMMA3_LOCAL_THETA = 10_000.0  # Gemma3TextConfig.default_theta["local"] (rope_local_base_freq)


def read_gemma_hf(hf: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """HF `GemmaConfig`: configs that say "gelu" mean the tanh approximation (GemmaConfig rewrites it,
    transformers#29402); no sliding window."""
    act = "gelu_pytorch_tanh" if fields["hidden_act"] == "gelu" else fields["hidden_act"]
    return read_llama_hf(hf, fields) | dict(hidden_act=act, sliding_window=None)


def write_gemma_hf(config: ModelConfig, hf: dict[str, Any]) -> dict[str, Any]:
    return hf | {"attention_bias": config.qkv_bias}


def read_gemma2_hf(hf: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """HF `Gemma2Config` / `Gemma3TextConfig`: `hidden_activation`, the query scale, the soft-caps, and
    sliding attention on every other layer (Gemma 2) or on all but every `sliding_window_pattern`-th (Gemma 3)."""
    gemma3 = hf.get("model_type") == "gemma3_text"
    layers = fields["num_hidden_layers"]
    types = fields["layer_types"]
    if types is None:
        pattern = int(hf.get("sliding_window_pattern", 6)) if gemma3 else 2
        types = [SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(layers)]
    out = read_llama_hf(hf, fields) | dict(
        hidden_act=hf.get("hidden_activation") or "gelu_pytorch_tanh",
        layer_types=types,
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),  # int in HF's strict config
        final_logit_softcapping=float_or_none(hf.get("final_logit_softcapping")),
    )
    if gemma3:
        out["qk_norm"] = True  # Gemma3Attention never passes `attn_logit_softcapping` on (null in its checkpoints)
    else:
        out["attn_logit_softcapping"] = float_or_none(hf.get("attn_logit_softcapping"))
    return out


def write_gemma2_hf(config: ModelConfig, hf: dict[str, Any]) -> dict[str, Any]:
    hf = write_llama_hf(config, hf)
    return hf | {
        "hidden_activation": hf.pop("hidden_act"),
        "query_pre_attn_scalar": config.query_pre_attn_scalar,
        "attn_logit_softcapping": config.attn_logit_softcapping,
        "final_logit_softcapping": config.final_logit_softcapping,
        "layer_types": list(config.layer_types),
    }


def write_gemma3_hf(config: ModelConfig, hf: dict[str, Any]) -> dict[str, Any]:
    hf = write_gemma2_hf(config, hf)
    local = config.rope_for(SLIDING_ATTENTION)
    hf["rope_local_base_freq"] = local.theta
    if local.to_hf_scaling() is not None:  # not expressible in legacy keys
        for key in ("rope_theta", "rope_local_base_freq", "rope_scaling"):
            hf.pop(key, None)
        hf["rope_parameters"] = {
            kind: {"rope_theta": r.theta, "rope_type": "default"} | (r.to_hf_scaling() or {})
            for kind, r in ((FULL_ATTENTION, config.rope), (SLIDING_ATTENTION, config.sliding_rope))
        }
    return hf


def read_gemma3_rope(hf: Mapping[str, Any]) -> tuple[RopeConfig, RopeConfig]:
    """(global, sliding) RoPE: transformers 5 `rope_parameters` nested per layer type, or transformers 4
    `rope_theta` / `rope_scaling` for the global layers and `rope_local_base_freq` for the sliding ones."""
    default_theta = GEMMA3_TEXT.rope_theta
    params = dict(hf.get("rope_parameters") or {})
    if params.keys() & {FULL_ATTENTION, SLIDING_ATTENTION}:
        full = dict(params.get(FULL_ATTENTION) or {})
        local = dict(params.get(SLIDING_ATTENTION) or {})
    else:  # transformers 4.x: rope_scaling applies to the global (full attention) layers only
        full = dict(hf.get("rope_scaling") or {}) | dict(params)
        full.setdefault("rope_theta", hf.get("rope_theta", default_theta))
        local = {"rope_theta": hf.get("rope_local_base_freq", GEMMA3_LOCAL_THETA)}
    full.setdefault("rope_theta", default_theta)
    local.setdefault("rope_theta", GEMMA3_LOCAL_THETA)
    return (rope_from_params("gemma3_text", full, hf, default_theta),
            rope_from_params("gemma3_text", local, hf, GEMMA3_LOCAL_THETA))


_GEMMA_KEYS = frozenset({"attention_bias", "mlp_bias"})
_GEMMA2_KEYS = _GEMMA_KEYS | {"hidden_activation", "sliding_window", "query_pre_attn_scalar",
                              "attn_logit_softcapping", "final_logit_softcapping"}
GEMMA = register(Family(
    model_type="gemma", architecture="GemmaForCausalLM", model_class=GemmaForCausalLM,
    read_hf=read_gemma_hf, write_hf=write_gemma_hf, hf_keys=_GEMMA_KEYS,
    # transformers 4 GemmaConfig's `hidden_activation` (GGUF configs carry it too); HF's modules ignore a window
    ignored_hf_keys=frozenset({"hidden_activation", "sliding_window"}),
    hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True, gguf_architecture="gemma",
))
GEMMA2 = register(Family(
    model_type="gemma2", architecture="Gemma2ForCausalLM", model_class=GemmaForCausalLM,
    read_hf=read_gemma2_hf, write_hf=write_gemma2_hf, hf_keys=_GEMMA2_KEYS,
    hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True, gguf_architecture="gemma2",
))
GEMMA3_TEXT = register(Family(
    model_type="gemma3_text", architecture="Gemma3ForCausalLM", model_class=GemmaForCausalLM,
    read_hf=read_gemma2_hf, write_hf=write_gemma3_hf, read_rope=read_gemma3_rope,
    hf_keys=_GEMMA2_KEYS | {"sliding_window_pattern", "_sliding_window_pattern", "rope_local_base_freq"},
    hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True, rope_theta=1_000_000.0, gguf_architecture="gemma3",
))
