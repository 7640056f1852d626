"""Rotary embeddings, attention masks and grouped-query attention: eager with HF's numerics, or fused kernels."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from mwjax.config import RopeConfig


def rope_cos_sin(inv_freq: np.ndarray | jax.Array, positions: jax.Array,
                 scaling: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """cos, sin [batch, seq, head_dim] in float32 (HF `LlamaRotaryEmbedding.forward`)."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)  # [b, t, d/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scaling, jnp.sin(emb) * scaling


def rope_table(rope: RopeConfig, head_dim: int, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [batch, seq, rotary_dim] for one RopeConfig (HF `*RotaryEmbedding.forward`).

    longrope picks its long or short frequencies for the whole call from the largest position, as
    HF's `dynamic_rope_update` does (`max(position_ids) + 1 > original_max_position_embeddings`).
    """
    inv_freq = rope.inv_frequencies(head_dim)
    if rope.type == "longrope":
        long = jnp.max(positions) + 1 > rope.original_max_position_embeddings
        inv_freq = jnp.where(long, rope.inv_frequencies(head_dim, long=True), inv_freq)
    return rope_cos_sin(inv_freq, positions, rope.attention_scaling)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [batch, seq, heads, head_dim]; HF `apply_rotary_pos_emb` (half-split, not interleaved).

    When cos / sin cover fewer features than a head (partial rotary), the rest pass unchanged.
    """
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    rotary_dim = cos.shape[-1]
    x, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x * cos + rotated * sin
    return out if passed.shape[-1] == 0 else jnp.concatenate([out, passed], axis=-1)


def causal_mask(
    q_len: int,
    kv_len: int,
    *,
    q_offset: int | jax.Array = 0,
    padding_mask: jax.Array | None = None,
    sliding_window: int | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Boolean mask [batch or 1, 1, q_len, kv_len]: True where a query may attend to a key.

    Causality is by index, as HF builds it from `cache_position` (not from position ids): query i
    (at absolute index q_offset + i) sees keys j <= q_offset + i, and with a sliding window only
    j > q_offset + i - sliding_window. `padding_mask` [batch, kv_len] marks real tokens with 1; a
    [batch, q_len, kv_len] one says which keys each query may see (HF's custom 4-D masks: several
    continuations packed after one shared prefix), on top of causality.
    `segment_ids` [batch, q_len] (q_len == kv_len): packed sequences attend within their segment only.
    """
    q_idx = q_offset + jnp.arange(q_len)[:, None]
    kv_idx = jnp.arange(kv_len)[None, :]
    mask = kv_idx <= q_idx
    if sliding_window is not None:
        mask &= kv_idx > q_idx - sliding_window
    mask = mask[None, None]
    if padding_mask is not None:
        visible = padding_mask.astype(bool)
        mask = mask & (visible[:, None] if visible.ndim == 3 else visible[:, None, None, :])
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return mask


def grouped_query_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    scale: float,
    softcap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Eager attention as HF's `eager_attention_forward` computes it.

    q [b, t, h, d], k / v [b, s, h_kv, d], mask bool [b|1, 1, t, s].
    Returns the output [b, t, h, d] and the probabilities [b, h, t, s]. Scores are formed in the
    compute dtype and normalised in float32.
    """
    b, t, h, d = q.shape
    h_kv = k.shape[2]
    q = q.reshape(b, t, h_kv, h // h_kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k) * jnp.asarray(scale, q.dtype)  # [b, h_kv, g, t, s]
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)
    return out, probs.reshape(b, h, t, -1)


# ------------------------------------------------------------------ fused attention kernels

IMPLEMENTATIONS = ("auto", "eager", "xla", "cudnn")
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)  # cuDNN's flash attention takes no float32


def choose_implementation(requested: str, *, needs_probs: bool, softcap: float | None, dtype,
                          cached: bool) -> str:
    """The attention path of one call: "eager" (`grouped_query_attention`), "xla" or "cudnn"
    (`fused_attention`).

    requested: "auto", "eager", or the kernel to use whenever a kernel can do the job ("xla", "cudnn").
    "auto" takes cuDNN's flash attention on a GPU in bfloat16 / float16 without a KV cache, and the
    eager path elsewhere: XLA's `dot_product_attention` materialises the same [b, h, t, s] probabilities
    (no memory saved on CPU / TPU) but forms the scores in float32, where HF's eager attention (the
    reference of the bfloat16 parity tests) forms them in the compute dtype. The eager path runs whatever
    was requested when the probabilities are probed (`attn_probs`, which no kernel returns) or the
    scores are soft-capped (Gemma 2), which `jax.nn.dot_product_attention` does not do.
    TPU: the Pallas splash attention kernel is not wired in (no TPU to test its selection on).
    """
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {requested!r}; choose from {IMPLEMENTATIONS}")
    if requested == "eager" or needs_probs or softcap is not None:
        return "eager"
    if requested != "auto":
        return requested
    gpu = jax.default_backend() == "gpu"
    return "cudnn" if gpu and not cached and any(dtype == d for d in CUDNN_DTYPES) else "eager"


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float,
                    implementation: str, causal: bool) -> jax.Array:
    """`jax.nn.dot_product_attention` with the same inputs and output as `grouped_query_attention` (no
    probabilities): q [b, t, h, d], k / v [b, s, h_kv, d] (grouped-query heads as they are), mask bool
    [b|1, 1, t, s] (causal, sliding window, padding and packed segments: `causal_mask`).

    causal: the mask is causal by index with t == s (no cache), which lets cuDNN skip the masked blocks.
    cuDNN refusing the shapes (head_dim, GPU generation, cuDNN version) falls back to XLA with a warning.
    Logits in float32 in both (the eager path forms them in the compute dtype, as HF's eager attention).
    """
    dtype = jnp.result_type(q, k, v)  # a float32 cache under a bfloat16 model: as the eager einsum promotes
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    if implementation == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal,
                                                implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError) as error:
            warnings.warn(f"cuDNN flash attention refused q {q.shape} {q.dtype}, k {k.shape} ({error}); "
                          "using XLA's attention", stacklevel=2)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")
