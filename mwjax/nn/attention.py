"""Attention masks and grouped-query attention: eager with HF's numerics, or fused kernels."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np


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
    j > q_offset + i - sliding_window.

    Args:
      q_len: number of queries.
      kv_len: number of keys (q_len, or the KV cache's max_len).
      q_offset: absolute index of the first query (the cache's length); an int or an int32 [] array.
      padding_mask: [batch, kv_len], 1 marks real tokens; or [batch, q_len, kv_len], which keys each query may
        see (HF's custom 4-D masks: several continuations packed after one shared prefix), on top of causality.
      sliding_window: keys per query (itself included) of a sliding-window layer; None for full attention.
      segment_ids: [batch, q_len] (q_len == kv_len): packed sequences attend within their segment only.

    Returns:
      The bool mask [batch or 1, 1, q_len, kv_len].
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


@functools.partial(jax.tree_util.register_dataclass, data_fields=("dense", "segment_ids", "kind"),
                   meta_fields=("windows", "splash"))
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """One layer type's attention mask in the forms the attention paths take (`layer_type_masks`).

    dense: bool [b|1, 1, t, kv_len] (`causal_mask`), what the eager / XLA / cuDNN paths take.
    The splash kernel takes a static causal or local mask and segment ids instead:
    segment_ids: int32 [b, t] or None: padding and packed sequences as segments (`splash_segments`);
    kind: the index of this layer type's window in `windows` (an int, or an int32 array [] once stacked
    for `mwjax.nn.stack`'s scan, which indexes the masks of all types with a traced layer type);
    windows: the sliding window of every layer type (None: full causal attention), the same for all types;
    splash: whether the kernel can express the mask (no KV cache, no per-query [b, t, kv_len] mask).
    """

    dense: jax.Array
    segment_ids: jax.Array | None
    kind: int | jax.Array
    windows: tuple[int | None, ...]
    splash: bool


def splash_segments(padding_mask: jax.Array | None, segment_ids: jax.Array | None) -> jax.Array | None:
    """Segment ids [b, t] equivalent, for real queries, to `causal_mask`'s padding and packing.

    Padded queries then attend to padded keys where the dense mask hides every key from them: their
    outputs differ between the paths, and are meaningless in both.

    Args:
      padding_mask: [b, t], 1 marks real tokens; or None.
      segment_ids: [b, t] packed-sequence ids; or None.

    Returns:
      int32 [b, t]: the packed `segment_ids` (0 where absent), with padded keys in a segment of their own (below
      every real one); None when both arguments are None.
    """
    if padding_mask is None and segment_ids is None:
        return None
    if segment_ids is None:
        return jnp.where(padding_mask.astype(bool), 0, -1).astype(jnp.int32)
    segments = segment_ids.astype(jnp.int32)
    if padding_mask is None:
        return segments
    return jnp.where(padding_mask.astype(bool), segments, jnp.min(segments) - 1)


def layer_type_masks(t: int, kv_len: int, windows: Mapping[str, int | None], *, q_offset: int | jax.Array = 0,
                     padding_mask: jax.Array | None = None,
                     segment_ids: jax.Array | None = None) -> dict[str, AttentionMask]:
    """The attention mask of every layer type for t queries over kv_len keys.

    Args:
      t: number of queries.
      kv_len: number of keys (t, or the KV cache's max_len).
      windows: {layer type: sliding window or None}.
      q_offset: absolute index of the first query, as for `causal_mask`.
      padding_mask: [b, kv_len] or [b, t, kv_len], as for `causal_mask`.
      segment_ids: [b, t] packed-sequence ids, as for `causal_mask`.

    Returns:
      {layer type: AttentionMask}; `splash` is True only without a cache (kv_len == t, q_offset the int 0) and
      without a per-query mask.
    """
    kinds = sorted(windows)
    splash = (kv_len == t and isinstance(q_offset, int) and q_offset == 0
              and (padding_mask is None or padding_mask.ndim == 2))
    segments = splash_segments(padding_mask, segment_ids) if splash else None
    return {kind: AttentionMask(causal_mask(t, kv_len, q_offset=q_offset, padding_mask=padding_mask,
                                            sliding_window=windows[kind], segment_ids=segment_ids),
                                segments, i, tuple(windows[k] for k in kinds), splash)
            for i, kind in enumerate(kinds)}


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

    Scores are formed in the compute dtype and normalised in float32.

    Args:
      q: queries [b, t, h, d].
      k: keys [b, s, h_kv, d] (h a multiple of h_kv: grouped-query attention).
      v: values [b, s, h_kv, d].
      mask: bool [b|1, 1, t, s], True where a query sees a key (`causal_mask`).
      scale: multiplier of q.k (`ModelConfig.attention_scale`).
      softcap: scores := softcap * tanh(scores / softcap) (Gemma 2); None for none.

    Returns:
      (the output [b, t, h, d], the probabilities [b, h, t, s]).
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

IMPLEMENTATIONS = ("auto", "eager", "xla", "cudnn", "splash")
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)  # cuDNN's flash attention takes no float32


def choose_implementation(requested: str, *, needs_probs: bool, softcap: float | None, dtype, cached: bool,
                          splash_mask: bool = False, backend: str | None = None) -> str:
    """The attention path of one call: "eager" (`grouped_query_attention`), "xla" or "cudnn"
    (`fused_attention`), or "splash" (`splash_attention`).

    "auto" takes, without a KV cache, the Pallas splash attention kernel on a TPU (any dtype: it never
    materialises the [b, h, t, s] probabilities) and cuDNN's flash attention on a GPU in bfloat16 / float16;
    the eager path elsewhere: XLA's `dot_product_attention` materialises the same probabilities (no memory
    saved on CPU / TPU) but forms the scores in float32, where HF's eager attention (the reference of the
    bfloat16 parity tests) forms them in the compute dtype. The eager path runs whatever was requested when
    the probabilities are probed (`attn_probs`, which no kernel returns), when the scores are soft-capped
    (Gemma 2) on any kernel but splash (`jax.nn.dot_product_attention` does not soft-cap), and, for splash,
    with a KV cache or a per-query [b, t, s] mask (`mwjax.eval.continuations`).

    Args:
      requested: "auto", "eager", or the kernel to use whenever a kernel can do the job ("xla", "cudnn",
        "splash").
      needs_probs: the attention probabilities are probed (only the eager path returns them).
      softcap: the attention logits' soft cap (Gemma 2), or None.
      dtype: the compute dtype (cuDNN takes bfloat16 / float16 only).
      cached: the call runs with a KV cache.
      splash_mask: the mask is one the splash kernel expresses (`AttentionMask.splash`).
      backend: `jax.default_backend()` unless given (the tests choose for a TPU or a GPU on a CPU).

    Returns:
      "eager", "xla", "cudnn" or "splash".
    """
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {requested!r}; choose from {IMPLEMENTATIONS}")
    backend = backend or jax.default_backend()
    if requested == "eager" or needs_probs:
        return "eager"
    if requested == "splash" or (requested == "auto" and backend == "tpu"):
        return "splash" if splash_mask and not cached else "eager"
    if softcap is not None:
        return "eager"
    if requested != "auto":
        return requested
    return "cudnn" if backend == "gpu" and not cached and any(dtype == d for d in CUDNN_DTYPES) else "eager"


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float,
                    implementation: str, causal: bool) -> jax.Array:
    """`jax.nn.dot_product_attention` with the same inputs and output as `grouped_query_attention` (no
    probabilities).

    cuDNN refusing the shapes (head_dim, GPU generation, cuDNN version) falls back to XLA with a warning.
    Logits in float32 in both (the eager path forms them in the compute dtype, as HF's eager attention).

    Args:
      q: queries [b, t, h, d].
      k: keys [b, s, h_kv, d] (grouped-query heads as they are).
      v: values [b, s, h_kv, d].
      mask: bool [b|1, 1, t, s] (causal, sliding window, padding and packed segments: `causal_mask`).
      scale: multiplier of q.k.
      implementation: "cudnn" or "xla" (`choose_implementation`).
      causal: the mask is causal by index with t == s (no cache), which lets cuDNN skip the masked blocks.

    Returns:
      The output [b, t, h, d] in the promoted dtype of q, k and v.
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


SPLASH_BLOCK = 128  # the kernel's default block sizes (`BlockSizes.get_default`); sequences are padded to a multiple


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, scale: float,
                     softcap: float | None = None, interpret: bool | None = None) -> jax.Array:
    """JAX's Pallas TPU splash attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) with the
    inputs and output of `grouped_query_attention`, without the probabilities.

    The kernel takes a static mask (`CausalMask`, or `LocalMask` for a sliding window of w keys: j > i - w)
    and `SegmentIds` for padding and packed sequences (`splash_segments`); Gemma 2's soft-capping is its
    `attn_logits_soft_cap` applied to q.k * scale (it does not scale: q is multiplied first). Grouped-query
    heads run the MQA kernel once per kv head (vmapped over kv heads and the batch): the g = h / h_kv query
    heads of a group share one K / V, which is then never repeated in memory. The sequence is padded at its
    end to a multiple of SPLASH_BLOCK; causality keeps the real queries from the appended keys, and their
    outputs are sliced back. Logits in float32, as XLA's attention. Under a traced layer type (the stacked
    layers' scan) `jax.lax.switch` picks the kernel of that type's window. Differentiable (the kernel's own
    backward kernels) and jittable. Interpret mode is slow, for tests only; this path was tested in interpret
    mode on CPU, never on a TPU.

    Args:
      q: queries [b, t, h, d].
      k: keys [b, t, h_kv, d] (no KV cache).
      v: values [b, t, h_kv, d].
      mask: an `AttentionMask` whose `splash` is True.
      scale: multiplier of q.k.
      softcap: the kernel's `attn_logits_soft_cap` (Gemma 2), or None.
      interpret: run the Pallas kernel in interpret mode; None: everywhere but on a TPU.

    Returns:
      The output [b, t, h, d] in the promoted dtype of q, k and v.
    """
    # imported here: Pallas loads only where splash attention runs
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask_lib

    if not mask.splash:
        raise ValueError("the splash attention kernel takes no KV cache and no per-query [b, t, kv_len] mask; "
                         "choose_implementation sends those to the eager path")
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    b, t, h, d = q.shape
    h_kv = k.shape[2]
    dtype = jnp.result_type(q, k, v)
    padded = -(-t // SPLASH_BLOCK) * SPLASH_BLOCK
    pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - t)] + [(0, 0)] * (x.ndim - 2))
    q = pad(q.astype(dtype) * jnp.asarray(scale, dtype))
    q = q.reshape(b, padded, h_kv, h // h_kv, d).transpose(0, 2, 3, 1, 4)  # [b, h_kv, g, T, d]
    k, v = (pad(x.astype(dtype)).transpose(0, 2, 1, 3) for x in (k, v))  # [b, h_kv, T, d]
    segments = None if mask.segment_ids is None else pad(mask.segment_ids)  # [b, T]

    def run(window: int | None, q, k, v, segments):
        shape = (padded, padded)
        one = splash_mask_lib.CausalMask(shape) if window is None else splash_mask_lib.LocalMask(
            shape, window_size=(window - 1, 0), offset=0)
        kernel = splash.make_splash_mqa(splash_mask_lib.MultiHeadMask([one] * (h // h_kv)), head_shards=1,
                                        q_seq_shards=1, attn_logits_soft_cap=softcap, interpret=interpret)

        def example(q, k, v, segments):  # q [h_kv, g, T, d], k / v [h_kv, T, d], segments [T]
            ids = None if segments is None else splash.SegmentIds(q=segments, kv=segments)
            return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q, k, v)

        return jax.vmap(example)(q, k, v, segments)

    if isinstance(mask.kind, int | np.integer):
        out = run(mask.windows[mask.kind], q, k, v, segments)
    else:
        out = jax.lax.switch(mask.kind, [functools.partial(run, w) for w in mask.windows], q, k, v, segments)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, padded, h, d)[:, :t]  # [b, t, h, d]
