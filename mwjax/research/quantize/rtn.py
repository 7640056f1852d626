"""Round-to-nearest fake quantization of one tensor: a weight in blocks, an activation per tensor or per token.

Pure functions of arrays (no model): `mwjax.research.quantize.linear` calls them inside the forward pass.

Weight layout. The Super Weight's reference `quantize_blockwise` (LLMSuperWeight, outliers/functional/
quantization.py) takes a PyTorch `nn.Linear.weight` [out, in] and cuts `weight.reshape(-1, blocksize)`: a block
is `blocksize` consecutive elements of the row-major flattened weight, i.e. consecutive INPUT features of one
output row, and a block longer than a row spans whole rows (and may end inside one). A Flax kernel is that
weight transposed ([in, out]), so the reference's flattened order is `kernel.T.reshape(-1)`: a block runs down a
kernel column and continues at the top of the next column. `pytorch_flat` / `from_pytorch_flat` hold this fact.
When the block size does not divide the tensor's size the reference quantizes the whole tensor as one block
(and its block-percentage clipping becomes tensor-percentage: `effective_block`, `clip_count`); "channel" is one
output row (block = in_features), "tensor" the whole tensor.

Weight quantizer (per block; `fake_quant_weight`):
    asymmetric (the reference's minmax):  scale = (2^b - 1) / (max - min),  w' = round((w - min) * scale) / scale + min
    symmetric (SmoothQuant's absmax):     s = max(max|w|, 1e-5) / (2^(b-1) - 1),  w' = round(w / s) * s
    before either, optional clipping of w to [-t, t], t per block (the reference's methods):
        zscore             t = z * std(|w|) + mean(|w|)          (std unbiased, as torch.std)
        block_percentage   t = the k-th largest |w| of the block, k = max(int(block * p + 1), 1)
        tensor_percentage  t = the k-th largest |w| of the tensor, k = max(int(numel * p), 1)
        iqr                t = q3 + m * (q3 - q1) of |w|         (linear interpolation, as torch.quantile)
A block whose max equals its min (constant) is left as it is (the reference divides by zero there).

Activation quantizer (`fake_quant_activation`; SmoothQuant's fake_quant, dynamic): s = max(max|x|, 1e-5) /
(2^(b-1) - 1), x' = round(x / s) * s, one s per tensor (here: per sequence, all its tokens and features) or per
token. The Super Weight's handling (Table 3): the largest-|x| element of each tensor, the super activation, is
held out of the scale (the paper replaces it before computing the scale) and restored in full precision after.
Whatever it is replaced by, as long as it lies within the other elements' range (the paper's median does), the
scale is the largest |x| of the others: that is what is computed here, and the held-out element is then
restored exactly.

Every setting but the method's name (bits, block size, clipping threshold / count, hold-out) may be traced, so
one compiled program serves a whole sweep: a traced block size uses segment reductions over block ids
(`traced_block=True`) instead of a reshape into [blocks, block].
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mwjax.research.defaults import CLIP_METHODS, GRANULARITIES, check_clip  # noqa: F401 (this module's names)

SCALE_FLOOR = 1e-5  # SmoothQuant's clamp of an absmax scale before dividing by q_max


# ------------------------------------------------------------------------------------------------ layout


def pytorch_flat(kernel: jax.Array) -> jax.Array:
    """A Flax kernel [in, out] as the reference's flattened PyTorch weight (row-major over [out, in]).

    Args:
      kernel: [in, out] (the transpose of PyTorch's `nn.Linear.weight`).

    Returns:
      [out * in]: `kernel.T.reshape(-1)`.
    """
    return kernel.T.reshape(-1)


def from_pytorch_flat(flat: jax.Array, kernel_shape: tuple[int, int]) -> jax.Array:
    """The inverse of `pytorch_flat`: [out * in] -> kernel [in, out].

    Args:
      flat: [out * in] in the PyTorch weight's row-major order.
      kernel_shape: (in, out) of the kernel.

    Returns:
      The kernel [in, out].
    """
    n_in, n_out = kernel_shape
    return flat.reshape(n_out, n_in).T


def effective_block(kernel_shape: tuple[int, int], block: int | str) -> tuple[int, bool]:
    """The block size the reference applies to a kernel [in, out] for a requested `block`.

    Args:
      kernel_shape: (in, out) of the kernel.
      block: "channel" (-> in_features, one PyTorch output row), "tensor" (-> the whole tensor) or a positive int
        (-> itself when it divides the tensor's size, else the whole tensor); anything else raises ValueError.

    Returns:
      (block size, whole): whole is True only for an int that does not divide the tensor's size (the reference's
      fallback branch, whose block percentage is a tensor percentage).
    """
    n_in, n_out = kernel_shape
    numel = n_in * n_out
    if block == "channel":
        return n_in, False
    if block == "tensor":
        return numel, False
    if isinstance(block, str) or int(block) < 1:
        raise ValueError(f"block must be a positive int, 'channel' or 'tensor', got {block!r}")
    return (int(block), False) if numel % int(block) == 0 else (numel, True)


def clip_count(method: str, threshold: float, block: int, numel: int, whole: bool) -> int:
    """k of the percentage methods (the k-th largest |w| is the clipping threshold), as the reference computes it.

    Args:
      method: a clipping method of CLIP_METHODS.
      threshold: the clipped fraction p (inf: no clipping).
      block: the effective block size (`effective_block`).
      numel: the tensor's number of elements.
      whole: `effective_block`'s fallback flag (block_percentage then counts over the tensor).

    Returns:
      k = max(int(block * p + 1), 1) for block_percentage, max(int(numel * p), 1) for tensor_percentage (and
      block_percentage when whole); 0 for an infinite threshold and for the other methods.
    """
    if method not in ("block_percentage", "tensor_percentage") or math.isinf(threshold):
        return 0
    if method == "block_percentage" and not whole:
        return max(int(block * threshold + 1), 1)
    return max(int(numel * threshold), 1)


# ------------------------------------------------------------------------------------------------ blocks


class _Blocks:
    """Per-block statistics of a flat tensor [n] in blocks of `size` consecutive elements, broadcast back to [n].

    size: a Python int (a reshape into [n / size, size]) or a traced int32 (segment reductions over block ids,
    one compiled program for every size; `size` must divide n, which `effective_block` ensures)."""

    def __init__(self, n: int, size, traced: bool):
        self.n, self.size, self.traced = n, size, traced
        index = jnp.arange(n, dtype=jnp.int32)
        self.ids = index // size  # [n] block of each element
        self.start = self.ids * size  # [n] first element of its block

    def reduce(self, op: str, x: jax.Array) -> jax.Array:
        """op ("max" / "min" / "sum") over each element's block, [n]."""
        if not self.traced:
            rows = x.reshape(self.n // self.size, self.size)
            r = {"max": jnp.max, "min": jnp.min, "sum": jnp.sum}[op](rows, axis=1, keepdims=True)
            return jnp.broadcast_to(r, rows.shape).reshape(self.n)
        segment = {"max": jax.ops.segment_max, "min": jax.ops.segment_min, "sum": jax.ops.segment_sum}[op]
        return segment(x, self.ids, num_segments=self.n, indices_are_sorted=True)[self.ids]

    def sort(self, x: jax.Array) -> jax.Array:
        """x sorted ascending within each block, [n] (blocks stay in place)."""
        if not self.traced:
            return jnp.sort(x.reshape(self.n // self.size, self.size), axis=1).reshape(self.n)
        return jax.lax.sort((self.ids, x), num_keys=2)[1]

    def quantile(self, ordered: jax.Array, q: float) -> jax.Array:
        """The q-quantile of each element's block by linear interpolation (torch.quantile's default), from the
        block-sorted values `ordered`, [n]."""
        pos = q * (self.size - 1)
        lo = jnp.floor(jnp.asarray(pos, jnp.float32)).astype(jnp.int32)
        frac = jnp.asarray(pos, jnp.float32) - lo
        hi = jnp.minimum(lo + 1, self.size - 1)
        a, b = ordered[self.start + lo], ordered[self.start + hi]
        return a + frac * (b - a)


def clip_threshold(w: jax.Array, blocks: _Blocks, method: str, k, scale) -> jax.Array:
    """The clipping threshold t of each element (module doc).

    Args:
      w: the flat weight [n] (PyTorch order).
      blocks: its blocks (`_Blocks`).
      method: zscore, iqr, block_percentage or tensor_percentage (anything else raises ValueError).
      k: the percentage methods' k (`clip_count`; may be traced); 0: clipping off.
      scale: zscore's z or iqr's multiplier m (may be traced); inf: clipping off.

    Returns:
      t [n], in w's dtype; +inf where clipping is off.
    """
    a = jnp.abs(w)
    inf = jnp.asarray(jnp.inf, w.dtype)
    if method == "zscore":
        count = jnp.asarray(blocks.size, w.dtype)
        mean = blocks.reduce("sum", a) / count
        std = jnp.sqrt(blocks.reduce("sum", (a - mean) ** 2) / (count - 1))
        return jnp.where(jnp.isinf(scale), inf, scale * std + mean)
    if method == "iqr":
        ordered = blocks.sort(a)
        q1, q3 = blocks.quantile(ordered, 0.25), blocks.quantile(ordered, 0.75)
        return jnp.where(jnp.isinf(scale), inf, q3 + scale * (q3 - q1))
    if method == "block_percentage":
        t = blocks.sort(a)[blocks.start + blocks.size - jnp.maximum(k, 1)]
    elif method == "tensor_percentage":
        t = jnp.sort(a)[a.shape[0] - jnp.maximum(k, 1)]
    else:
        raise ValueError(f"unknown clipping method {method!r}; choose from {CLIP_METHODS}")
    return jnp.where(k > 0, t, inf)


def fake_quant_flat(w: jax.Array, *, bits, block, symmetric: bool, clip: str = "none", clip_k=0,
                    clip_scale=jnp.inf, traced_block: bool = False, exclude: jax.Array | None = None) -> jax.Array:
    """The reference's per-block round-to-nearest of a flat PyTorch-order weight (module doc), dequantized.

    Args:
      w: the flat weight [n] (`pytorch_flat`).
      bits: the paper's b (may be traced).
      block: the effective block size, dividing n (`effective_block`); may be traced with `traced_block`.
      symmetric: absmax (SmoothQuant) rather than the reference's asymmetric min/max.
      clip: the clipping method applied first (CLIP_METHODS; "none": no clipping).
      clip_k: the percentage methods' k (`clip_count`; may be traced).
      clip_scale: zscore's z / iqr's multiplier (may be traced; inf: no clipping).
      traced_block: `block` is a traced int32 (segment reductions) rather than a Python int (a reshape).
      exclude: bool [n], elements kept out of their block's range (min / max / absmax), which the caller restores
        (a super weight held out as the super activation is: the block's scale is that of the other weights);
        None: none.

    Returns:
      float32 [n], the dequantized weight.
    """
    w = w.astype(jnp.float32)
    blocks = _Blocks(w.shape[0], block, traced_block)
    if clip != "none":
        t = clip_threshold(w, blocks, clip, clip_k, clip_scale)
        w = jnp.clip(w, -t, t)
    out = lambda x, fill: x if exclude is None else jnp.where(exclude, fill, x)
    bits = jnp.asarray(bits, jnp.float32)
    if symmetric:
        s = jnp.maximum(blocks.reduce("max", out(jnp.abs(w), 0.0)), SCALE_FLOOR) / (jnp.exp2(bits - 1) - 1)
        return jnp.round(w / s) * s
    lo, hi = blocks.reduce("min", out(w, jnp.inf)), blocks.reduce("max", out(w, -jnp.inf))
    constant = hi <= lo
    scale = (jnp.exp2(bits) - 1) / jnp.where(constant, 1.0, hi - lo)
    return jnp.where(constant, w, jnp.round((w - lo) * scale) / scale + lo)


def fake_quant_weight(kernel: jax.Array, *, exclude: jax.Array | None = None, **settings) -> jax.Array:
    """`fake_quant_flat` of a Flax kernel [in, out] in the reference's PyTorch layout, back as a kernel.

    Args:
      kernel: [in, out].
      exclude: bool [in, out] in the kernel's layout, elements kept out of their block's range; None: none.
      settings: `fake_quant_flat`'s keyword arguments (bits, block, symmetric, clip, ...).

    Returns:
      float32 [in, out], the dequantized kernel.
    """
    flat_exclude = None if exclude is None else pytorch_flat(exclude)
    return from_pytorch_flat(fake_quant_flat(pytorch_flat(kernel), exclude=flat_exclude, **settings), kernel.shape)


# ------------------------------------------------------------------------------------------------ activations


def fake_quant_activation(x: jax.Array, *, bits, granularity: str = "tensor", hold_out=False) -> jax.Array:
    """SmoothQuant's dynamic symmetric fake quantization of a Linear's input.

    Args:
      x: the Linear's input [..., in].
      bits: the bit width (may be traced).
      granularity: "tensor" (one scale per sequence: x [b, t, in] -> b scales; a 2-D x is one tensor) or "token"
        (one per token).
      hold_out: the largest |x| of each tensor / token is kept out of the scale and restored exactly afterwards
        (The Super Weight's super-activation handling, module doc); may be traced.

    Returns:
      float32, x's shape: the dequantized input.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"activation granularity must be one of {GRANULARITIES}, got {granularity!r}")
    x = x.astype(jnp.float32)
    if granularity == "token":
        groups = x.reshape(-1, x.shape[-1])  # [tokens, in]
    else:
        groups = x.reshape(x.shape[0] if x.ndim > 2 else 1, -1)  # [sequences, t * in]
    mag = jnp.abs(groups)
    held = jnp.argmax(mag, axis=1)  # [g] the largest |x| of each group (lax.top_k is a sort on CPU: 10x slower)
    is_held = jnp.arange(groups.shape[1])[None, :] == held[:, None]  # [g, n]
    hold_out = jnp.asarray(hold_out, bool)
    amax = jnp.max(jnp.where(hold_out & is_held, 0.0, mag), axis=1, keepdims=True)  # [g, 1]
    s = jnp.maximum(amax, SCALE_FLOOR) / (jnp.exp2(jnp.asarray(bits, jnp.float32) - 1) - 1)
    q = jnp.round(groups / s) * s
    return jnp.where(hold_out & is_held, groups, q).reshape(x.shape)
