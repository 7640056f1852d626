"""Rotary position embeddings as HF computes them: inverse frequencies per rope type, cos / sin tables, rotation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mwjax.nn.config import RopeConfig


def inv_frequencies(rope: RopeConfig, head_dim: int, *, long: bool = False) -> np.ndarray:
    """Inverse frequencies, as HF's `ROPE_INIT_FUNCTIONS[rope.type]` computes them.

    Args:
      rope: the RoPE parameters (type "default", "linear", "llama3" or "longrope").
      head_dim: the attention head size (`rope.rotary_dim(head_dim)` features are rotated).
      long: longrope only, the set used once a sequence is longer than `original_max_position_embeddings`.

    Returns:
      float32 numpy [rotary_dim // 2].
    """
    dim = rope.rotary_dim(head_dim)
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    if rope.type == "longrope":
        ext = np.asarray(rope.long_factor if long else rope.short_factor, np.float32)
        return (np.float32(1.0) / (ext * np.float32(rope.theta) ** exponent)).astype(np.float32)
    inv_freq = (np.float32(1.0) / (np.float32(rope.theta) ** exponent)).astype(np.float32)
    if rope.type == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32)
    if rope.type == "llama3":
        # Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.
        old_ctx = rope.original_max_position_embeddings
        low_wavelen = old_ctx / rope.low_freq_factor
        high_wavelen = old_ctx / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_ctx / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq



def rope_cos_sin(inv_freq: np.ndarray | jax.Array, positions: jax.Array,
                 scaling: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """The cos / sin tables of given inverse frequencies at given positions (HF `LlamaRotaryEmbedding.forward`).

    Args:
      inv_freq: inverse frequencies [rotary_dim // 2] (`inv_frequencies`).
      positions: int [batch, seq] position ids.
      scaling: factor on cos and sin (`RopeConfig.attention_scaling`).

    Returns:
      (cos, sin), each float32 [batch, seq, rotary_dim] (the frequencies repeated, half-split).
    """
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)  # [b, t, d/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scaling, jnp.sin(emb) * scaling


def rope_table(rope: RopeConfig, head_dim: int, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [batch, seq, rotary_dim] for one RopeConfig (HF `*RotaryEmbedding.forward`).

    longrope picks its long or short frequencies for the whole call from the largest position, as
    HF's `dynamic_rope_update` does (`max(position_ids) + 1 > original_max_position_embeddings`).

    Args:
      rope: the RoPE parameters of the layer type.
      head_dim: the attention head size.
      positions: int [batch, seq] position ids.

    Returns:
      (cos, sin), each float32 [batch, seq, rotary_dim], scaled by `rope.attention_scaling`.
    """
    inv_freq = inv_frequencies(rope, head_dim)
    if rope.type == "longrope":
        long = jnp.max(positions) + 1 > rope.original_max_position_embeddings
        inv_freq = jnp.where(long, inv_frequencies(rope, head_dim, long=True), inv_freq)
    return rope_cos_sin(inv_freq, positions, rope.attention_scaling)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, *, in_float32: bool = False) -> jax.Array:
    """Rotate queries or keys by their positions: HF `apply_rotary_pos_emb` (half-split, not interleaved).

    When cos / sin cover fewer features than a head (partial rotary), the rest pass unchanged.

    Args:
      x: queries or keys [batch, seq, heads, head_dim].
      cos: [batch, seq, rotary_dim] (`rope_table`).
      sin: [batch, seq, rotary_dim].
      in_float32: rotate in float32 and cast the result back (HF OLMo / OLMo 2, whose rotary embedding hands
        float32 cos / sin to `x * cos`); False: cos / sin are cast to x's dtype first (HF Llama and kin).

    Returns:
      The rotated x [batch, seq, heads, head_dim], in x's dtype.
    """
    dtype = x.dtype
    if in_float32:
        x = x.astype(jnp.float32)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    rotary_dim = cos.shape[-1]
    x, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x * cos + rotated * sin
    out = out if passed.shape[-1] == 0 else jnp.concatenate([out, passed], axis=-1)
    return out.astype(dtype)
