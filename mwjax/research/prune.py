"""Pruning as functional masks: Wanda (Sun et al., thesis chapter 3) and magnitude pruning, and which massive
weights each one removes.

What is pruned: every `Linear` inside the decoder layers (HF `q/k/v/o_proj`, `gate/up/down_proj`), never the
embeddings or `lm_head`, as the thesis does ("skipping the first embedding layer and the final classification
head", §3.5) and as Wanda's `find_layers(layer)` does. Mixture-of-experts layers are refused: an expert's
Wanda statistics would be over the tokens routed to it only, which the per-layer pass here does not follow.

Masks: `Masks = {(layer, "self_attn.q_proj"): keep}`, keep bool [in, out] in the Flax kernel layout (HF
weight.T), True = the weight stays. `apply(model, masks)` returns a copy of the model whose pruned `Linear`s
are `PrunedLinear`s: they hold the SAME kernel arrays as the input model and multiply by the mask inside the
forward pass (`where(keep, W, 0)`, formed one matmul at a time under jit). The stored weights are never
modified, and what a pruned model costs beyond the dense one is one byte per weight (the bool masks), not a
float copy of the model (an 8B model: 8 GB of masks instead of 16 GB of bf16 weights). A float copy through
`nnx.split` / multiply / `nnx.merge` would be as functional, but it doubles the weights in memory.

Methods (scores in PyTorch terms: row i = output feature i, column j = input feature j):

    wanda              S_ij = |W_ij| * ||X_j||_2 (thesis Eq. 3.1), compared per output row (Eq. 3.2)
    magnitude          S_ij = |W_ij|, compared over the whole matrix: the "layer" comparison group of the Wanda
                       repository's `prune_magnitude` (thesis Table 3.3's magnitude baseline, 17.29 on
                       LLaMA-7B; per output row it would be 13.41, Table 3.7)
    magnitude_global   S_ij = |W_ij|, one threshold over every pruned matrix of the model (unstructured only)

Sparsity: unstructured s (the lowest floor(s * group size) scores of each comparison group are pruned:
exactly s of each row for Wanda, of each matrix for magnitude, of all weights for the global variant), or
N:M (`"2:4"`, `"4:8"`): in every M consecutive inputs of an output row, the N largest scores stay (both
methods, as the repository extends magnitude to N:M). Ties go to the lower index (stable sort), as Wanda's
`torch.sort(stable=True)`; the repository's magnitude baseline prunes `|W| <= threshold` instead, which prunes
every tie of the threshold value too (many, in a quantized model): here exactly floor(s * n) go.

Wanda's calibration (`wanda_masks`) follows the repository's `prune_wanda`: decoder layers in order; layer l
runs densely on its calibration inputs while every Linear in it accumulates ||X_j||^2 over all calibration
tokens (their `WrappedGPT.add_batch` keeps that sum divided by the number of sequences, a per-layer constant
that changes no ranking); then all of layer l's Linears are pruned at once, and the layer is run again, pruned,
to give layer l + 1 its inputs (`sequential=False`: all inputs from the dense model instead). The input norms
are those of the thesis' Eq. 3.1 (float32 sums of squares of the layer's compute-dtype inputs).

Protection (`protected`): the top-k massive weights (House of Cards: rows `mw.indices[:k]` of W_gate and W_up
at `mw.layer`, all d_model entries each) and the super weights (`down_proj.weight[row, col]`) are kept on top
of what a method keeps. Protected rows therefore exceed the row's sparsity / N:M budget by what they protect
(Wanda prunes exactly s of each row, so a massive row without protection loses s of its entries). With Wanda,
protecting changes what later layers see, so their masks change too. `removed` counts what a mask prunes of them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mwjax.adapters.lora import LoRALinear
from mwjax.core import paths
from mwjax.core.compiled import jit_model
from mwjax.core.progress import track
from mwjax.instrument import probes
from mwjax.nn.base import Taps
from mwjax.nn.layers import Linear, WrappedLinear
from mwjax.research import attacks
from mwjax.research.defaults import NON_SUPER_WEIGHTS, PRUNE_METHODS
from mwjax.research.massive import MassiveWeights, SuperWeight

Key = tuple[int, str]  # (decoder layer, module path inside it: "self_attn.q_proj", "mlp.down_proj")
Masks = dict[Key, jax.Array]  # bool [in, out] (kernel layout), True = kept


# ----------------------------------------------------------------------------------------------- sparsity


@dataclasses.dataclass(frozen=True)
class Sparsity:
    """Unstructured `fraction` pruned, or N:M (`n` kept of every `m` consecutive inputs; fraction 1 - n/m)."""

    fraction: float
    n: int | None = None
    m: int | None = None

    @property
    def structured(self) -> bool:
        """Whether this is N:M sparsity."""
        return self.m is not None

    @property
    def label(self) -> str:
        """"2:4" for N:M, else the fraction pruned as a percentage ("50%")."""
        return f"{self.n}:{self.m}" if self.structured else f"{self.fraction:.0%}"


def parse_sparsity(spec: str | float) -> Sparsity:
    """"0.5" (or 0.5) -> 50% unstructured; "2:4" / "4:8" -> N:M. ValueError naming the fix.

    Args:
      spec: the fraction pruned in [0, 1) (a number or its string), or "N:M" with integers 0 < N < M.

    Returns:
      The Sparsity.
    """
    if isinstance(spec, str) and ":" in spec:
        n, _, m = spec.partition(":")
        if not (n.isdigit() and m.isdigit()) or not 0 < int(n) < int(m):
            raise ValueError(f"sparsity {spec!r}: write N:M with integers 0 < N < M, e.g. 2:4 or 4:8")
        return Sparsity(1 - int(n) / int(m), int(n), int(m))
    try:
        fraction = float(spec)
    except ValueError:
        raise ValueError(f"sparsity {spec!r}: write a fraction in [0, 1) such as 0.5, or N:M such as 2:4") from None
    if not 0 <= fraction < 1:
        raise ValueError(f"sparsity {spec!r}: the fraction pruned must lie in [0, 1)")
    return Sparsity(fraction)


def check_method(method: str) -> None:
    """ValueError unless `method` is a pruning method this module knows.

    Args:
      method: one of PRUNE_METHODS ("wanda", "magnitude", "magnitude_global").
    """
    if method not in PRUNE_METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose from {PRUNE_METHODS}")


# ----------------------------------------------------------------------------------------------- masks from scores


@functools.partial(jax.jit, static_argnums=1)
def _keep_per_output(score: jax.Array, n_pruned: int) -> jax.Array:
    # lax.top_k (faster than a sort on CPU) ranks equal values by index: the lowest scores, ties lower index first
    _, lowest = jax.lax.top_k(-score.T, n_pruned)  # [out, n_pruned]
    keep = jnp.ones(score.shape[::-1], bool).at[jnp.arange(score.shape[1])[:, None], lowest].set(False)
    return keep.T


def keep_per_output(score: jax.Array, fraction: float) -> jax.Array:
    """bool [in, out]: in each output row (kernel column) the floor(in * fraction) lowest scores pruned (ties: the
    lower input index first, as a stable sort). Wanda's comparison group (thesis Eq. 3.2).

    Args:
      score: the scores [in, out] in kernel layout (e.g. `wanda_score`).
      fraction: the fraction of each output row pruned, in [0, 1).

    Returns:
      The keep-mask, bool [in, out], True = kept.
    """
    n_pruned = int(np.floor(score.shape[0] * fraction))
    if n_pruned == 0:
        return jnp.ones(score.shape, bool)
    return _keep_per_output(jnp.asarray(score, jnp.float32), n_pruned)


def keep_per_matrix(score: jax.Array, fraction: float) -> jax.Array:
    """bool [in, out]: the floor(size * fraction) lowest scores of the whole matrix pruned (ties: row-major order
    of the kernel).

    Args:
      score: the scores [in, out] (ranked by |score|, as `keep_lowest_pruned` does).
      fraction: the fraction of the matrix pruned, in [0, 1).

    Returns:
      The keep-mask, bool [in, out], True = kept.
    """
    return keep_lowest_pruned({0: score}, fraction)[0]


def keep_n_of_m(score: jax.Array, n: int, m: int) -> jax.Array:
    """bool [in, out]: in each output row, the n largest scores of every m consecutive inputs kept.

    Args:
      score: the scores [in, out]; `in` must be a multiple of m (ValueError otherwise).
      n: N, the inputs kept of each group.
      m: M, the size of a group of consecutive inputs.

    Returns:
      The keep-mask, bool [in, out], True = kept.
    """
    n_in, n_out = score.shape
    if n_in % m:
        raise ValueError(f"N:M sparsity {n}:{m} needs the input size to be a multiple of {m}; a layer has {n_in}")
    return _keep_n_of_m(jnp.asarray(score, jnp.float32), n, m)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _keep_n_of_m(score, n, m):
    groups = score.reshape(score.shape[0] // m, m, score.shape[1]).transpose(0, 2, 1)  # [in / m, out, m]
    _, top = jax.lax.top_k(groups, n)  # [in / m, out, n]
    keep = jax.nn.one_hot(top, m, dtype=jnp.int32).sum(-2) > 0  # [in / m, out, m]
    return keep.transpose(0, 2, 1).reshape(score.shape)


def keep_mask(score: jax.Array, sparsity: Sparsity, group: str) -> jax.Array:
    """The keep mask of one matrix's scores.

    Args:
      score: one matrix's scores [in, out].
      sparsity: unstructured, or N:M (always per output row, whatever `group`).
      group: the comparison group of unstructured sparsity: "output" (per output row, Wanda) or "matrix"
        (the whole matrix, magnitude).

    Returns:
      The keep-mask, bool [in, out], True = kept.
    """
    if sparsity.structured:
        return keep_n_of_m(score, sparsity.n, sparsity.m)
    return (keep_per_output if group == "output" else keep_per_matrix)(score, sparsity.fraction)


def wanda_score(kernel: jax.Array, input_norm: jax.Array) -> jax.Array:
    """Thesis Eq. 3.1 in kernel layout: S_ij = |W_ij| * ||X_j||_2.

    Args:
      kernel: a Linear's kernel [in, out] (HF `weight.T`).
      input_norm: ||X_j||_2 [in], the norms of the input features over the calibration tokens.

    Returns:
      The scores S, float32 [in, out].
    """
    return jnp.abs(kernel.astype(jnp.float32)) * input_norm.astype(jnp.float32)[:, None]


# ----------------------------------------------------------------------------------------------- the model's Linears


def _check_prunable(model: nnx.Module) -> None:
    if model.config.num_local_experts is not None:
        raise ValueError("pruning follows a dense decoder layer; this model routes tokens between experts (an "
                         "expert's Wanda statistics would be over its routed tokens only)")
    if getattr(model, "attached", None) is not None:
        raise ValueError("the model carries attached masks / edits (attacks.attach): prune the model itself")


def linears(layer: nnx.Module) -> dict[str, Linear]:
    """The Linears of one decoder layer by path ("self_attn.q_proj", ..., "mlp.down_proj"): Wanda's `find_layers`.

    Args:
      layer: one decoder layer (HF `LlamaDecoderLayer` equivalent); a LoRA Linear in it raises ValueError
        (merge the adapter first).

    Returns:
      {path inside the layer: Linear}.
    """
    out = {}
    for path, node in nnx.iter_graph(layer):
        if isinstance(node, Linear):
            name = ".".join(str(p) for p in path)
            if isinstance(node, LoRALinear):
                raise ValueError(f"{name} carries a LoRA adapter: merge it first (peft.merge), then prune")
            out[name] = node
    return out


def prunable(model: nnx.Module) -> dict[Key, Linear]:
    """Every Linear in the decoder layers, keyed (layer, path): what the thesis prunes.

    Args:
      model: a dense mwjax causal LM; mixture-of-experts, attached masks / edits and LoRA raise ValueError.

    Returns:
      {(layer, path): Linear}.
    """
    _check_prunable(model)
    return {(i, name): lin for i, layer in enumerate(model.model.layers) for name, lin in linears(layer).items()}


class PruneMask(nnx.Variable):
    """bool [in, out] keep-mask of a PrunedLinear. Not a parameter: optimisers and parameter exports skip it."""


class PrunedLinear(WrappedLinear):
    """A Linear whose weight is multiplied by a keep-mask in the forward pass; the kernel Variable is the
    unpruned model's own (shared, unchanged)."""

    def __init__(self, base: Linear, keep: jax.Array):
        super().__init__(base)
        if keep.shape != base.kernel[...].shape:
            raise ValueError(f"a keep-mask of shape {keep.shape} does not fit a kernel of shape "
                             f"{base.kernel[...].shape}")
        self.keep = PruneMask(jnp.asarray(keep, bool))

    def weight(self) -> jax.Array:
        """The kernel [in, out] the forward uses: the shared kernel with the pruned entries zeroed."""
        kernel = self.kernel[...]
        return jnp.where(self.keep[...], kernel, jnp.zeros((), kernel.dtype))


def _layer_copy(layer: nnx.Module, replace) -> nnx.Module:
    """A copy of one decoder layer for the calibration pass: each Linear replaced by `replace(name, linear)`, and
    `layer_idx` set to 0 throughout. The index addresses only probes and edits (none run here); without it, every
    layer of one structure shares one compiled program instead of compiling its own."""
    out = nnx.clone(layer)
    for name, lin in linears(out).items():
        paths.replace(out, name, replace(name, lin))
    for _, node in nnx.iter_graph(out):
        if isinstance(node, nnx.Module) and hasattr(node, "layer_idx"):
            node.layer_idx = 0
    return out


def apply(model: nnx.Module, masks: Masks) -> nnx.Module:
    """A copy of `model` that prunes by `masks` in every forward pass; `model` and its arrays stay as they are.

    Args:
      model: the dense model (as `prunable` takes it).
      masks: {(layer, path): keep bool [in, out]}; a key that names no prunable Linear raises ValueError.

    Returns:
      The copy, whose masked Linears are `PrunedLinear`s over `model`'s kernels.
    """
    mods = prunable(model)
    if unknown := sorted(set(masks) - set(mods)):
        raise ValueError(f"masks for {unknown[:3]} name no Linear of the decoder layers")
    out = attacks.copy(model)
    for (i, name), keep in masks.items():
        layer = out.model.layers[i]
        paths.replace(layer, name, PrunedLinear(linears(layer)[name], keep))
    return out


# ----------------------------------------------------------------------------------------------- protection


def protected(model: nnx.Module, mw: MassiveWeights | None = None, k: int = 0,
              super_weights: Sequence[SuperWeight] = ()) -> dict[Key, np.ndarray]:
    """bool [in, out] per matrix: the entries to keep whatever a method decides — the top-k massive rows of
    W_gate and W_up (kernel columns mw.indices[:k]) and each super weight (down_proj kernel[col, row]).

    Args:
      model: the dense model (as `prunable` takes it): the kernels' shapes.
      mw: the massive weights of a dense layer (an expert's raise ValueError); None: no rows protected.
      k: how many of mw's rows to protect, largest first (0: none).
      super_weights: the super weights to protect.

    Returns:
      {(layer, path): bool numpy [in, out]}, only for the matrices with a protected entry.
    """
    mods = prunable(model)
    out: dict[Key, np.ndarray] = {}

    def entries(key: Key) -> np.ndarray:
        if key not in out:
            out[key] = np.zeros(mods[key].kernel[...].shape, bool)
        return out[key]

    if mw is not None and k:
        if mw.expert is not None:
            raise ValueError("protecting an expert's massive weights: this module prunes dense layers only")
        for name in ("mlp.gate_proj", "mlp.up_proj"):
            entries((mw.layer, name))[:, list(mw.top(k))] = True
    for sw in super_weights:
        entries((sw.layer, "mlp.down_proj"))[sw.col, sw.row] = True
    return out


def _protect(keep: jax.Array, key: Key, protect: Mapping[Key, np.ndarray] | None) -> jax.Array:
    return keep if not protect or key not in protect else keep | jnp.asarray(protect[key])


# ----------------------------------------------------------------------------------------------- magnitude


def magnitude_masks(model: nnx.Module, sparsity: Sparsity | str | float, *, scope: str = "layer",
                    protect: Mapping[Key, np.ndarray] | None = None) -> Masks:
    """Magnitude pruning of every prunable matrix, S_ij = |W_ij|.

    Args:
      model: the dense model (as `prunable` takes it).
      sparsity: a Sparsity, or a spec for `parse_sparsity` ("0.5", "2:4").
      scope: "layer" (each matrix its own comparison group; N:M per output row) or "global" (one threshold over
        all of them, `keep_lowest_pruned`; unstructured only).
      protect: entries kept on top of what magnitude keeps (`protected`); None: none.

    Returns:
      The Masks {(layer, path): keep bool [in, out]} of every prunable matrix.
    """
    sparsity = sparsity if isinstance(sparsity, Sparsity) else parse_sparsity(sparsity)
    mods = prunable(model)
    if scope == "global":
        if sparsity.structured:
            raise ValueError("N:M sparsity is per group of M inputs; global magnitude pruning is unstructured only")
        keep = keep_lowest_pruned({key: lin.kernel[...] for key, lin in mods.items()}, sparsity.fraction)
        return {key: _protect(mask, key, protect) for key, mask in keep.items()}
    if scope != "layer":
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    return {key: _protect(keep_mask(jnp.abs(lin.kernel[...].astype(jnp.float32)), sparsity, "matrix"), key, protect)
            for key, lin in mods.items()}


def _as_ordered_bits(x: jax.Array) -> jax.Array:
    """|x| in float32 as int32 whose order is the values' order (non-negative floats sort as their bit patterns)."""
    return jax.lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.int32)


@jax.jit
def _count_at_most(w: jax.Array, bits: jax.Array) -> jax.Array:
    return jnp.sum(_as_ordered_bits(w) <= bits)  # one matrix: < 2^31 entries


def keep_lowest_pruned(kernels: Mapping[Any, jax.Array], fraction: float) -> dict[Any, jax.Array]:
    """Keep-masks pruning exactly floor(fraction * total) of all entries of `kernels` by |value|, lowest first
    (ties: matrix order, then row-major order): global magnitude pruning, or one matrix's. The threshold is found
    by bisection over float32 bit patterns (31 counting passes), so no sorted copy of the weights is ever formed:
    memory stays one matrix at a time (and no sort runs, slow on CPU).

    Args:
      kernels: {key: matrix}, ranked together by |value| in float32.
      fraction: the fraction of all their entries pruned, in [0, 1).

    Returns:
      {key: keep bool of the matrix's shape}, True = kept.
    """
    total = sum(int(np.prod(w.shape)) for w in kernels.values())
    target = int(np.floor(total * fraction))
    count = lambda t: sum(int(_count_at_most(w, jnp.int32(t))) for w in kernels.values())
    lo, hi = -1, int(np.iinfo(np.int32).max)  # count(lo) < target <= count(hi) (for target > 0)
    if target == 0:
        return {key: jnp.ones(w.shape, bool) for key, w in kernels.items()}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if count(mid) >= target else (mid, hi)
    threshold = jnp.int32(hi)  # the smallest bit pattern with at least `target` weights at or below it
    ties_left = target - count(hi - 1)  # how many weights equal to the threshold are pruned
    out = {}
    for key, w in kernels.items():
        bits = _as_ordered_bits(w)
        tie = bits == threshold
        tie_rank = jnp.cumsum(tie.reshape(-1)).reshape(w.shape)  # 1-based among this matrix's ties
        out[key] = ~((bits < threshold) | (tie & (tie_rank <= ties_left)))
        ties_left = max(0, ties_left - int(jnp.sum(tie)))
    return out


# ------------------------------------------------------------------------------------ The Super Weight's control


def largest_weights(model: nnx.Module, n: int, exclude: Sequence[SuperWeight] = ()) -> dict[Key, np.ndarray]:
    """The n largest-magnitude weights of every Linear of the decoder layers taken together, `exclude` left out:
    The Super Weight's Table 1 control ("Prune Non-SW": the 7,000 largest weights other than the super weight).
    The paper does not say which tensors its 7,000 come from; here every projection of every decoder layer (what
    `prunable` prunes), the embeddings, `lm_head` and norms never. Ties go to the lower (layer, path, index).

    Args:
      model: a dense mwjax causal LM (as `prunable` takes it).
      n: how many weights (The Super Weight: 7000).
      exclude: weights never chosen: the super weights (`massive.find_super_weights`).

    Returns:
      {(layer, path): kernel coordinates int32 [k, 2] (input, output; HF weight[output, input])} of the tensors
      holding any of the n, their counts summing to n (fewer only if the model has fewer weights).
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"n={n!r}: the number of weights to choose is an integer >= 0")
    kept = {(sw.layer, "mlp.down_proj", sw.col, sw.row) for sw in exclude}  # kernel[col, row] = weight[row, col]
    keys, values, flat = [], [], []
    for key, lin in prunable(model).items():
        w = jnp.abs(lin.kernel[...].astype(jnp.float32))
        for layer, path, i, o in kept:
            if (layer, path) == key:
                w = w.at[i, o].set(-1.0)  # below every magnitude: never among the largest
        top, index = jax.lax.top_k(w.reshape(-1), min(n, w.size))  # this tensor's candidates
        keys += [key] * len(index)
        values.append(np.asarray(top))
        flat.append(np.asarray(index))
    if not keys or n == 0:
        return {}
    values, flat = np.concatenate(values), np.concatenate(flat)
    chosen = np.argsort(-values, kind="stable")[:n]
    chosen = chosen[values[chosen] >= 0]  # an excluded weight is never chosen, even where n exceeds the rest
    out: dict[Key, list] = {}
    for c in chosen:
        out.setdefault(keys[c], []).append(flat[c])
    mods = prunable(model)
    return {key: np.stack(np.unravel_index(np.sort(idx), mods[key].kernel[...].shape), axis=1).astype(np.int32)
            for key, idx in out.items()}


def prune_largest_weights(model: nnx.Module, n: int = NON_SUPER_WEIGHTS,
                          exclude: Sequence[SuperWeight] = ()) -> nnx.Module:
    """The Super Weight's "Prune Non-SW": the n largest-magnitude decoder weights other than `exclude` set to zero,
    functionally (`apply` with keep-masks on the tensors that hold them).

    Args:
      model: a dense mwjax causal LM.
      n: how many weights (Table 1: 7000).
      exclude: weights kept whatever their magnitude: the super weights.

    Returns:
      A copy of `model` that prunes those weights in its forward pass; `model` and its arrays unchanged.
    """
    mods = prunable(model)
    masks = {}
    for key, coords in largest_weights(model, n, exclude).items():
        keep = np.ones(mods[key].kernel[...].shape, bool)
        keep[coords[:, 0], coords[:, 1]] = False
        masks[key] = jnp.asarray(keep)
    return apply(model, masks)


# ----------------------------------------------------------------------------------------------- Wanda


class LinearInputSumSq(nnx.Intermediate):
    """Sum over tokens of x_j^2 for each input feature j of a Linear [in] (Wanda's ||X_j||_2^2)."""


class _InputRecorder(WrappedLinear):
    """A Linear that records the sum of squares of its inputs over all tokens (the forward hook of Wanda's
    `WrappedGPT.add_batch`), then computes as the Linear it wraps (same Variables)."""

    def __call__(self, x: jax.Array, column_mask=None) -> jax.Array:
        x32 = x.astype(self.dtype).astype(jnp.float32)
        self.sow(LinearInputSumSq, "sumsq", jnp.sum(x32 * x32, axis=tuple(range(x.ndim - 1))))
        return super().__call__(x, column_mask)


@jit_model
def _run_layer(layer, x, rope, mask):
    return layer(x, rope, mask, None, Taps(), None)[0]


@jit_model
def _record_layer(layer, x, rope, mask):
    (y, _), state = nnx.capture(layer, LinearInputSumSq)(x, rope, mask, None, Taps(), None)
    sums = {}
    for path, value in nnx.to_flat_state(state):
        sown = value.get_value() if hasattr(value, "get_value") else value.value
        sums[".".join(str(p) for p in path[:-1])] = sum(sown)  # a Linear called twice sums both calls
    return y, sums


@jit_model
def _embed(model, tokens):
    return model.embed(tokens)


def input_norms(layer: nnx.Module, xs: Sequence[jax.Array], rope, mask) -> tuple[dict[str, jax.Array], list]:
    """The input norms ||X_j||_2 of every Linear of one dense decoder layer over all calibration tokens, and the
    layer's outputs.

    Args:
      layer: the decoder layer (run as a copy whose Linears record their inputs).
      xs: the layer's input batches, [b, t, d_model] each.
      rope: the layer type's (cos, sin) tables.
      mask: the layer type's `attention.AttentionMask`.

    Returns:
      ({Linear path: ||X_j||_2 float32 [in]}, [the layer's dense output [b, t, d_model] per batch]).
    """
    split = nnx.split(_layer_copy(layer, lambda name, lin: _InputRecorder(lin)))
    sums, outs = None, []
    for x in xs:
        y, s = _record_layer.on_state(*split, x, rope, mask)
        sums = s if sums is None else jax.tree.map(jnp.add, sums, s)
        outs.append(y)
    return {name: jnp.sqrt(v) for name, v in sums.items()}, outs


def wanda_masks(model: nnx.Module, calibration, sparsity: Sparsity | str | float, *,
                protect: Mapping[Key, np.ndarray] | None = None, sequential: bool = True, batch_size: int = 8,
                progress: bool = True) -> tuple[Masks, dict[Key, np.ndarray]]:
    """Wanda (thesis §3.3, the repository's `prune_wanda`; module doc): keep-masks and input norms.

    Args:
      model: the dense model (as `prunable` takes it).
      calibration: int tokens [num_sequences, seq] (thesis: 128 x 2048 from C4's training set).
      sparsity: a Sparsity, or a spec for `parse_sparsity`; unstructured s is per output row (Eq. 3.2).
      protect: entries kept on top of what Wanda keeps (`protected`); with `sequential`, later layers see them.
      sequential: layer l's inputs come from layers < l already pruned (the reference), else from the dense
        model.
      batch_size: calibration sequences per forward pass.
      progress: show progress over the layers (`mwjax.core.progress.track`).

    Returns:
      (the Masks, {(layer, path): the input norms ||X_j||_2 [in] as numpy}) for every Linear.
    """
    sparsity = sparsity if isinstance(sparsity, Sparsity) else parse_sparsity(sparsity)
    _check_prunable(model)
    tokens = np.asarray(calibration, np.int32)
    if tokens.ndim != 2:
        raise ValueError(f"calibration must be tokens [num_sequences, seq], got shape {tokens.shape}")
    t = tokens.shape[1]
    ropes = model.rope_tables(jnp.arange(t, dtype=jnp.int32)[None])  # [1, t, ...]: broadcast over the batch
    attn_masks = model.attention_masks(t, t)
    xs = [_embed(model, jnp.asarray(tokens[s:s + batch_size])) for s in range(0, len(tokens), batch_size)]
    masks, norms = {}, {}
    layers = model.model.layers
    for i in track(range(len(layers)), len(layers), f"wanda ({len(tokens)}x{t} calibration tokens)",
                   enabled=progress):
        layer, kind = layers[i], model.config.layer_types[i]
        layer_norms, dense_outs = input_norms(layer, xs, ropes[kind], attn_masks[kind])
        keep = {}
        for name, lin in linears(layer).items():
            norms[(i, name)] = np.asarray(layer_norms[name])
            score = wanda_score(lin.kernel[...], layer_norms[name])
            keep[name] = masks[(i, name)] = _protect(keep_mask(score, sparsity, "output"), (i, name), protect)
        if sequential:
            split = nnx.split(_layer_copy(layer, lambda name, lin, keep=keep: PrunedLinear(lin, keep[name])))
            xs = [_run_layer.on_state(*split, x, ropes[kind], attn_masks[kind]) for x in xs]
        else:
            xs = dense_outs
    return masks, norms


def masks_for(model: nnx.Module, method: str, sparsity: Sparsity | str | float, *, calibration=None,
              protect: Mapping[Key, np.ndarray] | None = None, sequential: bool = True, batch_size: int = 8,
              progress: bool = True) -> Masks:
    """The keep-masks of `method` at `sparsity`.

    Args:
      model: the dense model (as `prunable` takes it).
      method: one of PRUNE_METHODS: "wanda", "magnitude" (per matrix) or "magnitude_global".
      sparsity: a Sparsity, or a spec for `parse_sparsity` ("0.5", "2:4").
      calibration: Wanda only, and required there: int tokens [num_sequences, seq].
      protect: entries kept whatever the method decides (`protected`); None: none.
      sequential: Wanda only, as `wanda_masks`.
      batch_size: Wanda only, as `wanda_masks`.
      progress: Wanda only, as `wanda_masks`.

    Returns:
      The Masks {(layer, path): keep bool [in, out]}.
    """
    check_method(method)
    if method == "wanda":
        if calibration is None:
            raise ValueError("Wanda needs calibration tokens [num_sequences, seq]")
        return wanda_masks(model, calibration, sparsity, protect=protect, sequential=sequential,
                           batch_size=batch_size, progress=progress)[0]
    return magnitude_masks(model, sparsity, scope="global" if method == "magnitude_global" else "layer",
                           protect=protect)


# ----------------------------------------------------------------------------------------------- what was removed


def sparsity_of(masks: Masks) -> dict[str, Any]:
    """Fraction pruned: overall and per decoder layer (0-based).

    Args:
      masks: the keep-masks.

    Returns:
      {"overall": the fraction of all masked entries pruned, "per_layer": [the fraction of each layer with masks,
        ascending]}.
    """
    pruned, total = {}, {}
    for (i, _), keep in masks.items():
        pruned[i] = pruned.get(i, 0) + int(keep.size - jnp.sum(keep))
        total[i] = total.get(i, 0) + int(keep.size)
    return {"overall": sum(pruned.values()) / max(sum(total.values()), 1),
            "per_layer": [pruned[i] / total[i] for i in sorted(total)]}


def removed(masks: Masks, mw: MassiveWeights | None = None, k: int = 0,
            super_weights: Sequence[SuperWeight] = ()) -> dict[str, Any]:
    """What a mask prunes of the massive weights: per top-k row (mw.indices[:k]) the entries pruned in W_gate and
    in W_up (of d_model each), and which super weights are pruned.

    Args:
      masks: the keep-masks; they must hold mw.layer's gate / up_proj and the super weights' down_proj.
      mw: the massive weights; None: no rows counted.
      k: how many of mw's rows to count (0: none).
      super_weights: the super weights to look up.

    Returns:
      {"massive_rows": {layer, k, per_row [{row, gate_pruned, up_pruned}], entries, entries_pruned,
        fraction_pruned, rows_untouched}, "super_weights": {count, pruned, which (labels)}}, each when asked for.
    """
    out: dict[str, Any] = {}
    if mw is not None and k:
        rows = list(mw.top(k))
        gate, up = (np.asarray(masks[(mw.layer, n)])[:, rows] for n in ("mlp.gate_proj", "mlp.up_proj"))
        per_row = [{"row": r, "gate_pruned": int((~gate[:, j]).sum()), "up_pruned": int((~up[:, j]).sum())}
                   for j, r in enumerate(rows)]
        entries = 2 * gate.shape[0] * len(rows)
        pruned = sum(r["gate_pruned"] + r["up_pruned"] for r in per_row)
        out["massive_rows"] = {"layer": mw.layer, "k": k, "per_row": per_row, "entries": entries,
                               "entries_pruned": pruned, "fraction_pruned": pruned / entries,
                               "rows_untouched": sum(r["gate_pruned"] + r["up_pruned"] == 0 for r in per_row)}
    if super_weights:
        hit = [bool(~np.asarray(masks[(sw.layer, "mlp.down_proj")])[sw.col, sw.row]) for sw in super_weights]
        out["super_weights"] = {"count": len(hit), "pruned": int(sum(hit)),
                                "which": [sw.label for sw, h in zip(super_weights, hit, strict=True) if h]}
    return out


def massive_values(model: nnx.Module, mw: MassiveWeights, k: int) -> list[float]:
    """The intermediate state at the top-k massive indices of `mw.layer` for `mw.token_id` alone (House of Cards'
    bos probe), e.g. of a pruned model: how much of the massive activation the pruning left.

    Args:
      model: an mwjax causal LM, e.g. `apply(model, masks)`.
      mw: the massive weights (their layer, indices and token).
      k: how many of the top indices to read.

    Returns:
      The k signed values, in the order of `mw.indices`.
    """
    config = probes.ProbeConfig(points=("intermediate",), layers=(mw.layer,))
    result = probes.record(model, jnp.asarray([[mw.token_id]], jnp.int32), config)
    values = np.asarray(result.intermediate[mw.layer].full[0, 0], np.float64)
    return [float(values[i]) for i in mw.top(k)]
