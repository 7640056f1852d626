"""Attacks on massive weights, super weights and massive activations.

Every attack is a pure function: it returns a new model and leaves its input untouched. The copy
shares every array it does not change (a 70B model is not duplicated to zero five rows), and the
functions trace under `jax.jit` / `jax.vmap` with `k` or `factor` traced, so a whole sweep can
run as one compiled program. Each attack also exists in a form that copies no weight at all:
FFN row masks (`*_masks`) or activation edits, passed to `model(..., ffn_masks=, edits=)` or
attached to a model copy with `attach`.

    zero_top_k        House of Cards "top-k zeroing": rows of W_gate and W_up set to 0
    retain_top_k      House of Cards "top-k retaining": every other row of W_gate / W_up set to 0
    scale_super_weight   The Super Weight: multiply down_proj.weight[row, col] (0 = prune)
    restore_super_activation   prune the super weight but put its super activation back
    set_massive_activations    Massive Activations: set them to zero / their mean / a value
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mwjax.adapters.lora import LoRALinear
from mwjax.core import paths
from mwjax.core.layer_index import check_layer
from mwjax.instrument import masks, probes
from mwjax.instrument.interventions import ActivationEdit, Edits
from mwjax.nn.base import Attached
from mwjax.nn.blocks import RoutedFFN
from mwjax.nn.layers import Linear, WrappedLinear
from mwjax.research import massive
from mwjax.research.defaults import ATTACK_ON, CALIBRATION_CORPUS, CALIBRATION_SEQLEN, CALIBRATION_SEQUENCES
from mwjax.research.massive import MassiveActivations, MassiveWeights, SuperWeight


def copy(model: nnx.Module) -> nnx.Module:
    """A new model with new Variables over the same arrays (changing its variables leaves `model` as it was).

    Args:
      model: the mwjax model to copy (`nnx.clone`).

    Returns:
      The copy, sharing every array with `model`.
    """
    return nnx.clone(model)


def ffn_projections(model: nnx.Module, layer: int, expert: int | None = None) -> tuple[Linear, Linear]:
    """(gate_proj, up_proj) of a layer's FFN, or of one expert's: the modules whose PyTorch rows are the
    massive weights.

    Args:
      model: an mwjax causal LM.
      layer: 0-based decoder layer (HF `model.layers[layer]`).
      expert: the expert of a mixture-of-experts layer (`RoutedFFN`, HF `MixtralSparseMoeBlock`); None for a
        dense FFN. Either mismatch is a ValueError.

    Returns:
      The `Linear` modules W_gate and W_up (HF `mlp.gate_proj`, `mlp.up_proj`), kernels [d_model, d_ff].
    """
    check_layer(model.config, layer)
    mlp = model.model.layers[layer].mlp
    if isinstance(mlp, RoutedFFN):
        if expert is None:
            raise ValueError(f"layer {layer} is a mixture of {len(mlp.experts)} experts: say which expert "
                             "(find_massive_weights picks the one the router chooses for bos)")
        if not 0 <= expert < len(mlp.experts):
            raise ValueError(f"expert {expert} out of range: layer {layer} has experts 0..{len(mlp.experts) - 1}")
        mlp = mlp.experts[expert]
    elif expert is not None:
        raise ValueError(f"expert={expert} given but layer {layer} has a dense FFN (no experts)")
    return mlp.gate_proj, mlp.up_proj


def attach(model: nnx.Module, ffn_masks: masks.FFNMasks | None = None, edits: Edits | None = None) -> nnx.Module:
    """A copy of `model` that applies `ffn_masks` and `edits` in every forward pass.

    They join the interventions `model` already carries; a second one at the same key is a ValueError.

    Args:
      model: an mwjax causal LM.
      ffn_masks: row masks of W_gate / W_up, {layer: `masks.RowMask`}; None for none.
      edits: activation edits, {(point, layer): `ActivationEdit`}; None for none.

    Returns:
      The copy (`copy`), sharing `model`'s arrays.
    """
    out = copy(model)
    current = out.attached.get_value() if out.attached is not None else {"ffn_masks": {}, "edits": {}}
    clash = sorted(set(current["ffn_masks"]) & set(ffn_masks or {})) + sorted(set(current["edits"]) & set(edits or {}))
    if clash:
        raise ValueError(f"the model already carries interventions at {clash}")
    out.attached = Attached({"ffn_masks": current["ffn_masks"] | dict(ffn_masks or {}),
                             "edits": current["edits"] | dict(edits or {})})
    return out


# ----------------------------------------------------------------------------------------- massive weights


def _check_k(mw: MassiveWeights, k, allow_zero: bool) -> None:
    if isinstance(k, jax.core.Tracer):
        return
    low = 0 if allow_zero else 1
    if not low <= int(k) <= len(mw.indices):
        raise ValueError(f"k={k} must lie in [{low}, {len(mw.indices)}]: the MassiveWeights result holds the "
                         f"top {len(mw.indices)} rows (find more with find_massive_weights(..., k=...))")


def _top_k_keep(mw: MassiveWeights, k) -> jax.Array:
    """[len(indices)] 1 for the first k massive rows, 0 after (k may be traced)."""
    return (jnp.arange(len(mw.indices)) < k).astype(jnp.float32)


def top_k_row_scale(mw: MassiveWeights, k, d_ff: int, retain=False) -> jax.Array:
    """Per-row factor [d_ff] of W_gate / W_up: top-k zeroing (0 on the k massive rows, 1 elsewhere) or,
    with `retain`, top-k retaining (the opposite).

    Args:
      mw: the massive weights found (`massive.find_massive_weights`), largest first.
      k: how many of `mw.indices` to attack (may be traced; not range-checked here).
      d_ff: intermediate size (the number of rows of W_gate / W_up).
      retain: False for top-k zeroing, True for top-k retaining (may be traced).

    Returns:
      float32 [d_ff] factors.
    """
    top = jnp.zeros((d_ff,), jnp.float32).at[jnp.asarray(mw.indices)].set(_top_k_keep(mw, k))
    return jnp.where(retain, top, 1.0 - top)


def zero_top_k_masks(mw: MassiveWeights, k, d_model: int) -> masks.FFNMasks:
    """Row masks for top-k zeroing; sparse (only the rows in `mw`).

    Args:
      mw: the massive weights found (`massive.find_massive_weights`).
      k: how many of them to zero, 1..len(mw.indices) (may be traced).
      d_model: hidden size (the length of a PyTorch row of W_gate / W_up).

    Returns:
      `ffn_masks` {mw.layer: RowMask} over the len(mw.indices) rows of `mw`: 0 on the first k, 1 on the rest.
    """
    _check_k(mw, k, allow_zero=False)
    values = jnp.broadcast_to((1.0 - _top_k_keep(mw, k))[:, None], (len(mw.indices), d_model))
    return {mw.layer: masks.RowMask(rows=jnp.asarray(mw.indices, jnp.int32), values=values, expert=mw.expert)}


def row_scale_masks(mw: MassiveWeights, scale: jax.Array, d_model: int) -> masks.FFNMasks:
    """A row mask over every row of W_gate / W_up at `mw.layer` from per-row factors [d_ff].

    Recomputes that layer's whole gate/up projection, so one compiled program serves any factors:
    zeroing, retaining and every k of a sweep.

    Args:
      mw: the massive weights (only their layer and expert are used).
      scale: [d_ff] factor of each row (`top_k_row_scale`).
      d_model: hidden size (the length of a PyTorch row of W_gate / W_up).

    Returns:
      `ffn_masks` {mw.layer: RowMask} over all d_ff rows, values [d_ff, d_model].
    """
    rows = jnp.arange(scale.shape[0], dtype=jnp.int32)
    return {mw.layer: masks.RowMask(rows=rows, values=jnp.broadcast_to(scale[:, None], (scale.shape[0], d_model)),
                                    expert=mw.expert)}


def retain_top_k_masks(mw: MassiveWeights, k, d_ff: int, d_model: int) -> masks.FFNMasks:
    """Row masks for top-k retaining (dense over the layer's rows).

    Args:
      mw: the massive weights found (`massive.find_massive_weights`).
      k: how many of them to keep, 0..len(mw.indices) (may be traced; 0 zeroes every row).
      d_ff: intermediate size.
      d_model: hidden size.

    Returns:
      `ffn_masks` {mw.layer: RowMask} over all d_ff rows (`row_scale_masks`).
    """
    _check_k(mw, k, allow_zero=True)
    return row_scale_masks(mw, top_k_row_scale(mw, k, d_ff, retain=True), d_model)


def _scale_ffn_rows(model: nnx.Module, layer: int, row_scale: jax.Array, expert: int | None = None) -> nnx.Module:
    """Copy of `model` with W_gate and W_up of `layer` (of `expert`) multiplied per PyTorch row ([d_ff] factors)."""
    out = copy(model)
    for proj in ffn_projections(out, layer, expert):
        kernel = proj.kernel[...]
        proj.kernel[...] = kernel * row_scale.astype(kernel.dtype)[None, :]
    return out


def zero_top_k(model: nnx.Module, mw: MassiveWeights, k) -> nnx.Module:
    """House of Cards top-k zeroing: the k massive rows of W_gate and W_up at `mw.layer` set to 0.

    Args:
      model: an mwjax causal LM.
      mw: its massive weights (`massive.find_massive_weights`); of expert `mw.expert` in a mixture of experts.
      k: how many to zero, 1..len(mw.indices) (may be traced).

    Returns:
      A copy of `model` with new W_gate / W_up kernels at that layer; every other array shared.
    """
    _check_k(mw, k, allow_zero=False)
    return _scale_ffn_rows(model, mw.layer, top_k_row_scale(mw, k, model.config.intermediate_size), mw.expert)


def retain_top_k(model: nnx.Module, mw: MassiveWeights, k) -> nnx.Module:
    """House of Cards top-k retaining: every row of W_gate and W_up at `mw.layer` but the k massive ones set to 0.

    Args:
      model: an mwjax causal LM.
      mw: its massive weights (`massive.find_massive_weights`); of expert `mw.expert` in a mixture of experts.
      k: how many to keep, 0..len(mw.indices) (may be traced; 0 zeroes the whole of W_gate and W_up there).

    Returns:
      A copy of `model` with new W_gate / W_up kernels at that layer; every other array shared.
    """
    _check_k(mw, k, allow_zero=True)
    return _scale_ffn_rows(model, mw.layer, top_k_row_scale(mw, k, model.config.intermediate_size, retain=True),
                           mw.expert)


# ----------------------------------------------------------------------------------------- super weights


def _down_proj(model: nnx.Module, layer: int) -> Linear:
    check_layer(model.config, layer)
    mlp = model.model.layers[layer].mlp
    if isinstance(mlp, RoutedFFN):
        raise ValueError("super-weight attacks address a dense FFN's down_proj; this model routes between experts")
    return mlp.down_proj


def _as_list(sws: SuperWeight | Sequence[SuperWeight], config) -> list[SuperWeight]:
    """The super weights given, each addressing a weight of the model (`massive.check_super_weight`)."""
    sws = [sws] if isinstance(sws, SuperWeight) else list(sws)
    if not sws:
        raise ValueError("no super weight given")
    for sw in sws:
        massive.check_super_weight(config, sw)
    return sws


def scale_super_weight(model: nnx.Module, sws: SuperWeight | Sequence[SuperWeight], factor) -> nnx.Module:
    """down_proj.weight[row, col] (HF layout) of one super weight or of a set (jointly, as the Super Weight
    experiments do) multiplied by `factor`.

    Args:
      model: an mwjax causal LM with dense FFNs (a routed one is a ValueError).
      sws: the super weight(s) (`massive.find_super_weights`, `massive.super_weight_at`), checked to lie inside
        the model (`massive.check_super_weight`).
      factor: the multiplier (0 prunes; may be traced).

    Returns:
      A copy of `model` with new down_proj kernels at the super weights' layers; every other array shared.
    """
    out = copy(model)
    for sw in _as_list(sws, model.config):
        proj = _down_proj(out, sw.layer)
        kernel = proj.kernel[...]  # [d_ff, d_model]: weight[row, col] = kernel[col, row]
        proj.kernel[...] = kernel.at[sw.col, sw.row].multiply(jnp.asarray(factor, kernel.dtype))
    return out


class SuperActivationRestored(WrappedLinear):
    """A down_proj whose super weights (one layer's) are pruned but whose super activations are put back.

    Each super weight's output channel `row` gets the unpruned model's value (= pruned value +
    w * x[..., col]) at the position of each sequence where that value's magnitude is largest, as
    the Super Weight reference hook restores it (`min_abs=None`; a cached decoding step sees one
    position), or, with `min_abs`, wherever its magnitude exceeds min_abs; elsewhere the pruned
    value. Computed from the input, so it restores the super activations on any text.

    Args:
      base: the layer's down_proj (HF `LlamaMLP.down_proj`); its kernel Variable is not modified.
      sws: the super weights of that layer.
      min_abs: None: restore at each sequence's argmax position; a magnitude: wherever |unpruned| exceeds it.
    """

    def __init__(self, base: Linear, sws: list[SuperWeight], min_abs: float | None):
        super().__init__(base)
        kernel = base.kernel[...]
        rows, cols = jnp.asarray([sw.row for sw in sws]), jnp.asarray([sw.col for sw in sws])
        self.pruned_weights = tuple(float(w) for w in kernel[cols, rows])  # [n]
        self.kernel = base.kernel.replace(kernel.at[cols, rows].set(0))  # its own kernel; keeps the declared axes
        self.rows, self.cols, self.min_abs = tuple(sw.row for sw in sws), tuple(sw.col for sw in sws), min_abs

    def __call__(self, x: jax.Array, column_mask: masks.RowMask | None = None) -> jax.Array:
        y = super().__call__(x, column_mask)  # [b, t, d_model]
        rows, cols = jnp.asarray(self.rows), jnp.asarray(self.cols)
        pruned = y[..., rows]  # [b, t, n]
        unpruned = pruned + jnp.asarray(self.pruned_weights, y.dtype) * x[..., cols].astype(y.dtype)
        if self.min_abs is None:  # the argmax position of each sequence, per channel
            positions = jnp.arange(unpruned.shape[-2])[:, None]  # [t, 1]
            restore = positions == jnp.argmax(jnp.abs(unpruned), axis=-2)[..., None, :]
        else:
            restore = jnp.abs(unpruned) > self.min_abs
        return y.at[..., rows].set(jnp.where(restore, unpruned, pruned))


def restore_super_activation(model: nnx.Module, sws: SuperWeight | Sequence[SuperWeight],
                             min_abs: float | None = None) -> nnx.Module:
    """The Super Weight paper's "Prune SW, +SA": prune the super weight(s), put their super activations back.

    Each affected layer's down_proj becomes a `SuperActivationRestored`.

    Args:
      model: an mwjax causal LM with dense FFNs; a down_proj carrying a LoRA adapter is refused (merge it first).
      sws: the super weight(s) (`massive.find_super_weights`), checked to lie inside the model.
      min_abs: None (default, the reference hook): restore each channel at its argmax position in each
        sequence; a magnitude: restore every position whose unpruned value exceeds it.

    Returns:
      A copy of `model` with those down_proj modules replaced.
    """
    out = copy(model)
    sws = _as_list(sws, model.config)
    for layer in sorted({sw.layer for sw in sws}):
        if isinstance(_down_proj(out, layer), LoRALinear):  # its kernel would be restored without the adapter
            raise ValueError(f"layer {layer}'s down_proj carries a LoRA adapter: merge it (peft.merge) before "
                             "restoring super activations")
        paths.replace(out, f"model.layers.{layer}.mlp.down_proj", SuperActivationRestored(
            _down_proj(out, layer), [sw for sw in sws if sw.layer == layer], min_abs))
    return out


# ----------------------------------------------------------------------------------------- massive activations


def massive_activation_means(model: nnx.Module, tokens, layer: int, dims: Sequence[int],
                             min_abs: float = massive.MASSIVE_MIN, batch_size: int = 8
                             ) -> tuple[np.ndarray, np.ndarray]:
    """The mean of hidden[..., dims] after `layer` over the entries where |value| > min_abs, per dim and
    position class: the first token (position 0) and every other position (the delimiters).

    `activation_means` of the `massive.hidden_states` on `tokens`.

    Args:
      model: an mwjax causal LM.
      tokens: int [num_sequences, seq] calibration tokens.
      layer: 0-based layer whose output hidden state (HF `hidden_states[layer + 1]`) is read.
      dims: the k feature dims of the massive activations.
      min_abs: only entries with |value| above it count.
      batch_size: sequences per forward pass.

    Returns:
      (first, other), each float64 [k].
    """
    return activation_means(massive.hidden_states(model, tokens, layer, batch_size), layer, dims, min_abs)


def activation_means(hidden: np.ndarray, layer: int, dims: Sequence[int], min_abs: float = massive.MASSIVE_MIN
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The means of `hidden` in `dims` over the entries where |value| > min_abs, per position class: position 0
    and every other position.

    The Massive Activations reference code sets each massive activation to its own constant per (position,
    dim), and the two classes differ (Llama-2-7B dim 2533: ~768 at token 0, ~2547 at the first delimiter).
    A class where a dim is never massive takes the other class's mean (an edit fires only where |x| > min_abs);
    a dim massive in neither class is a ValueError.

    Args:
      hidden: [num_sequences, seq, d_model] hidden state after `layer`, from a calibration set apart from the
        evaluation text (thesis: 100 sequences).
      layer: the 0-based layer `hidden` comes after (named in the error message).
      dims: the k feature dims to average.
      min_abs: only entries with |value| above it count.

    Returns:
      (first, other), each float64 [k]: the means at position 0 and at the other positions.
    """
    dims = np.asarray(dims)
    x = hidden[..., dims].astype(np.float64)  # [n, seq, k]
    large = np.abs(x) > min_abs
    total, count = np.zeros((2, len(dims))), np.zeros((2, len(dims)))  # [first / other, k]
    for cls, part in enumerate((slice(0, 1), slice(1, None))):
        total[cls] = np.where(large[:, part], x[:, part], 0).sum((0, 1))
        count[cls] = large[:, part].sum((0, 1))
    if np.any(count.sum(0) == 0):
        raise ValueError(f"dims {dims[count.sum(0) == 0].tolist()} never exceed |x| > {min_abs} after layer {layer} "
                         "on these sequences: they hold no massive activation there")
    means = total / np.maximum(count, 1)
    first, other = (np.where(count[c] > 0, means[c], means[1 - c]) for c in (0, 1))
    return first, other


def massive_activation_edits(layer: int, dims: Sequence[int], values, min_abs: float = massive.MASSIVE_MIN,
                             first_values=None) -> Edits:
    """Edits setting the massive activations (|x| > min_abs) of `dims` in the hidden state after `layer`.

    Args:
      layer: 0-based layer whose output hidden state is edited.
      dims: the k feature dims.
      values: the replacement, [k] or a scalar.
      min_abs: only entries with |x| above it are replaced.
      first_values: [k] (or a scalar) replacement at the first token (position 0) instead of `values`; None:
        `values` there too.

    Returns:
      `Edits` {("hidden", layer): ActivationEdit}, for `model(..., edits=)` or `attach`.
    """
    dims = jnp.asarray(dims, jnp.int32)
    per_dim = lambda v: None if v is None else jnp.broadcast_to(jnp.asarray(v, jnp.float32), dims.shape)
    return {("hidden", layer): ActivationEdit(dims=dims, values=per_dim(values), min_abs=min_abs,
                                              first_values=per_dim(first_values))}


def set_massive_activations(model: nnx.Module, layer: int, dims: Sequence[int], value="zero", *, tokens=None,
                            min_abs: float = massive.MASSIVE_MIN) -> nnx.Module:
    """Set the massive activations in `dims` of the hidden state after `layer` (wherever |x| > min_abs).

    Args:
      model: an mwjax causal LM.
      layer: 0-based layer whose output hidden state is edited.
      dims: the feature dims of the massive activations.
      value: "zero"; "mean" (their means per position class over `tokens`, computed here:
        `massive_activation_means`); or a number.
      tokens: int [num_sequences, seq] calibration tokens; needed for value="mean" only.
      min_abs: only entries with |x| above it are set.

    Returns:
      A copy of `model` carrying the edit (`attach`); no weight is copied.
    """
    check_layer(model.config, layer)
    first = None
    if isinstance(value, str):
        if value == "zero":
            value = 0.0
        elif value == "mean":
            if tokens is None:
                raise ValueError('value="mean" needs tokens=[num_sequences, seq] to average the activations over')
            first, value = massive_activation_means(model, tokens, layer, dims, min_abs)
        else:
            raise ValueError(f'value must be "zero", "mean" or a number, got {value!r}')
    return attach(model, edits=massive_activation_edits(layer, dims, value, min_abs, first_values=first))


def zero_median_activations(model: nnx.Module, layer: int, count: int, tokens) -> nnx.Module:
    """The thesis' control for "set to zero": zero `count` activations of median magnitude instead of the
    massive ones, at the first token (where massive activations sit; delimiter positions are not covered).

    The dims are those whose mean |x| at position 0 of `tokens` lies nearest the median.

    Args:
      model: an mwjax causal LM.
      layer: 0-based layer whose output hidden state is edited.
      count: how many dims to zero (as many as the massive activations).
      tokens: int [num_sequences, seq] calibration tokens (only position 0 is run).

    Returns:
      A copy of `model` carrying the edit (`attach`).
    """
    check_layer(model.config, layer)
    config = probes.ProbeConfig(points=("hidden",), layers=(layer,))
    first_tokens = jnp.asarray(np.asarray(tokens)[:, :1], jnp.int32)  # position 0 sees only itself
    hidden = probes.record(model, first_tokens, config).hidden[layer].full[:, 0]  # [n, d_model]
    first = np.mean(np.abs(np.asarray(hidden, np.float64)), axis=0)
    dims = np.argsort(np.abs(first - np.median(first)))[:count]
    edit = ActivationEdit(dims=jnp.asarray(dims, jnp.int32), values=None, first_values=jnp.zeros(count))
    return attach(model, edits={("hidden", layer): edit})


INTERVENTIONS = ("zero", "mean", "control")


def massive_activation_interventions(model: nnx.Module, layer: int, calibration,
                                     values: Sequence[str] = INTERVENTIONS
                                     ) -> tuple[dict[str, nnx.Module], MassiveActivations]:
    """The massive activations after `layer` found on `calibration`, and the models intervening on them, from
    one pass over it.

    Args:
      model: an mwjax causal LM.
      layer: 0-based layer whose output hidden state is searched and edited.
      calibration: int [num_sequences, seq] calibration tokens.
      values: the interventions, each of INTERVENTIONS: "zero", "mean" (their means per position class,
        `activation_means`) or "control" (as many median-magnitude ones zeroed); another is a ValueError.

    Returns:
      ({value: attacked model}, the `MassiveActivations` found); no models when no massive activation is found.
    """
    hidden = massive.hidden_states(model, calibration, layer)
    ma = massive.massive_activations_in(hidden, layer)
    if not ma.dims:
        return {}, ma
    models = {}
    for value in values:
        if value == "mean":
            first, other = activation_means(hidden, layer, ma.dims, ma.threshold)
            models[value] = attach(model, edits=massive_activation_edits(layer, ma.dims, other, ma.threshold,
                                                                         first_values=first))
        elif value == "zero":
            models[value] = set_massive_activations(model, layer, ma.dims, value, min_abs=ma.threshold)
        elif value == "control":
            models[value] = zero_median_activations(model, layer, len(ma.dims), calibration)
        else:
            raise ValueError(f"unknown massive-activation intervention {value!r}; choose from {INTERVENTIONS}")
    return models, ma


def intervene_massive_activations(model: nnx.Module, layer: int, value: str, calibration
                                  ) -> tuple[nnx.Module, MassiveActivations]:
    """One intervention on the massive activations after `layer` (`massive_activation_interventions`).

    Args:
      model: an mwjax causal LM.
      layer: 0-based layer whose output hidden state is searched and edited.
      value: "zero" / "mean" (the massive activations set to it), or "control" (as many median-magnitude ones
        zeroed).
      calibration: int [num_sequences, seq] calibration tokens.

    Returns:
      (the attacked model, the `MassiveActivations` found on `calibration` that say which); ValueError when
      none is found.
    """
    models, ma = massive_activation_interventions(model, layer, calibration, (value,))
    if not models:
        raise ValueError(f"no massive activation after layer {layer} on the calibration set (|x| > {ma.threshold:.0f})")
    return models[value], ma


# ---------------------------------------------------------------------------------- Table 1, Figure 4


def table1_settings(model: nnx.Module, mw: MassiveWeights, k: int, calibration=None
                    ) -> tuple[dict[str, nnx.Module], MassiveActivations | None]:
    """House of Cards Table 1's settings (and the thesis' Table 4.3 ones): name -> attacked model.

    Each is a copy sharing the original's arrays: the original, top-k zeroing, top-k retaining and, with
    `calibration`, the massive activations after `mw.layer` set to zero / to their mean (one mean per position
    class) and the control that zeroes as many median-magnitude activations.

    Args:
      model: an mwjax causal LM.
      mw: its massive weights (`massive.find_massive_weights`).
      k: how many massive weights top-k zeroing / retaining attack.
      calibration: int [sequences, seq] bos-led text kept apart from the evaluated text; None leaves out the
        massive-activation settings.

    Returns:
      ({setting name: model}, the `MassiveActivations` found on `calibration`, or None without it).
    """
    out = {"original": model, f"top-{k} zeroing": zero_top_k(model, mw, k),
           f"top-{k} retaining": retain_top_k(model, mw, k)}
    if calibration is None:
        return out, None
    models, ma = massive_activation_interventions(model, mw.layer, calibration)
    names = {"zero": "massive activations = zero", "mean": "massive activations = mean",
             "control": "median activations = zero (control)"}
    return out | {names[value]: attacked for value, attacked in models.items()}, ma


def k_sweep(model: nnx.Module, mw: MassiveWeights, ks: Sequence[int], measure, on_point=None
            ) -> dict[str, list[float]]:
    """House of Cards Figure 4: `measure(attacked model)` under top-k zeroing and top-k retaining for each k.

    The attack is a row mask over the whole layer (`row_scale_masks`), so every point runs one compiled program.

    Args:
      model: an mwjax causal LM.
      mw: its massive weights (`massive.find_massive_weights`).
      ks: the values of k, each in [0, len(mw.indices)] (refused before any point runs otherwise).
      measure: maps an attacked model to a number (e.g. perplexity).
      on_point: called as `on_point(series, k, value)` after each point; None for no call.

    Returns:
      {"top-k zeroing": [value per k], "top-k retaining": [value per k]}.
    """
    for k in ks:  # before any point runs
        _check_k(mw, k, allow_zero=True)
    d_ff, d_model = model.config.intermediate_size, model.config.hidden_size
    series = {}
    for retain, name in ((False, "top-k zeroing"), (True, "top-k retaining")):
        series[name] = []
        for k in ks:
            scale = top_k_row_scale(mw, k, d_ff, retain=retain)
            series[name].append(measure(attach(model, ffn_masks=row_scale_masks(mw, scale, d_model))))
            if on_point is not None:
                on_point(name, k, series[name][-1])
    return series


# ----------------------------------------------------------------------------------------- by name

SPECS = ("zero_top_k:K", "retain_top_k:K", "scale_super_weight:FACTOR", "prune_super_weight",
         "restore_super_activation", "massive_activations:zero", "massive_activations:mean",
         "massive_activations:control")


def calibration_tokens(tokenizer, corpus=CALIBRATION_CORPUS, sequences: int = CALIBRATION_SEQUENCES,
                       seqlen: int = CALIBRATION_SEQLEN) -> np.ndarray:
    """The calibration set: the last chunks of a corpus, each after the bos token (`corpora.calibration_chunks`).

    Args:
      tokenizer: an HF tokenizer; its `bos_token_id` (if any) leads each chunk, and it tokenizes a corpus loaded
        by name.
      corpus: a `corpora.Corpus`, or a corpus name or text file to load.
      sequences: how many chunks.
      seqlen: tokens per chunk, the bos included.

    Returns:
      int32 [sequences, seqlen] token ids.
    """
    from mwjax.data import corpora

    corpus = corpora.load(corpus, tokenizer) if isinstance(corpus, str) else corpus
    return corpora.calibration_chunks(corpus, sequences, seqlen, getattr(tokenizer, "bos_token_id", None))


def parse_spec(spec: str) -> tuple[str, float | None]:
    """Check and split an attack spec as `from_spec` takes it; ValueError naming the fix.

    Needs no model, so command lines check their --attack before loading one.

    Args:
      spec: the attack, one of SPECS, e.g. "zero_top_k:5" or "massive_activations:mean".

    Returns:
      (attack name, its argument): the int K, the float FACTOR, the massive-activation value ("zero" / "mean" /
      "control"), or None for an attack without one.
    """
    name, _, arg = spec.partition(":")
    if name in ("zero_top_k", "retain_top_k"):
        if not arg.isdigit() or int(arg) < 1:
            raise ValueError(f"attack {spec!r}: write {name}:K with an integer K >= 1, e.g. {name}:5")
        return name, int(arg)
    if name == "scale_super_weight":
        try:
            factor = float(arg)
        except ValueError:
            raise ValueError(f"attack {spec!r}: write scale_super_weight:FACTOR, e.g. scale_super_weight:1.5") from None
        if not math.isfinite(factor):
            raise ValueError(f"attack {spec!r}: the factor must be a finite number, e.g. scale_super_weight:1.5")
        return name, factor
    if name in ("prune_super_weight", "restore_super_activation"):
        if arg:
            raise ValueError(f"attack {spec!r}: {name} takes no argument")
        return name, None
    if name == "massive_activations":
        if arg not in ("zero", "mean", "control"):
            raise ValueError(f"attack {spec!r}: write massive_activations:zero, :mean or :control (as many "
                             "median-magnitude activations zeroed)")
        return name, arg
    raise ValueError(f"unknown attack {spec!r}; write one of {SPECS}")


def from_spec(model: nnx.Module, tokenizer, spec: str, first_token: int | str | None = None, *,
              find_on: nnx.Module | None = None) -> nnx.Module:
    """Apply an attack named as on a command line.

    Massive / super weights are found first, on `find_on`; the super-weight attacks take every super weight found,
    jointly.

    Args:
      model: the mwjax causal LM to attack.
      tokenizer: an HF tokenizer: the bos token (massive weights), the detection prompt (super weights) and the
        calibration text (`calibration_tokens`, needed by the massive-activation attacks).
      spec: "zero_top_k:5", "retain_top_k:5", "scale_super_weight:1.5", "prune_super_weight",
        "restore_super_activation", "massive_activations:zero" / ":mean" / ":control" (those after the massive
        weights' layer; means from `calibration_tokens`); checked by `parse_spec`.
      first_token: the token fed alone to find the massive weights (an id or token string); None for bos.
      find_on: the model the massive / super weights are found on (default: `model` itself;
        `after_fine_tuning` passes the pretrained model).

    Returns:
      The attacked copy of `model`.
    """
    find_on = model if find_on is None else find_on
    name, arg = parse_spec(spec)
    if name == "massive_activations":
        if tokenizer is None:
            raise ValueError(f"attack {spec!r} needs the tokenizer (its calibration text)")
        layer = massive.find_massive_weights(find_on, tokenizer, k=1, first_token=first_token).layer
        return intervene_massive_activations(model, layer, arg, calibration_tokens(tokenizer))[0]
    if name in ("zero_top_k", "retain_top_k"):
        mw = massive.find_massive_weights(find_on, tokenizer, k=arg, first_token=first_token)
        return (zero_top_k if name == "zero_top_k" else retain_top_k)(model, mw, arg)
    found = massive.find_super_weights(find_on, tokenizer)  # all of them, attacked jointly
    if not found:
        raise ValueError(f"attack {spec!r}: no super weight found (no down_proj spikes above "
                         f"{massive.SPIKE_THRESHOLD})")
    if name == "restore_super_activation":
        return restore_super_activation(model, found)
    return scale_super_weight(model, found, 0.0 if name == "prune_super_weight" else arg)


def after_fine_tuning(model: nnx.Module, tokenizer, spec: str, adapter: str | os.PathLike, attack_on: str = "merged",
                      first_token: int | str | None = None) -> nnx.Module:
    """House of Cards Table 8: the attack `spec` on the pretrained `model` fine-tuned with an adapter.

    Args:
      model: the pretrained mwjax causal LM (no adapters); not modified.
      tokenizer: an HF tokenizer (`from_spec`).
      spec: the attack, as `from_spec` takes it.
      adapter: the adapter directory: an HF PEFT one or mwjax's adapter/ (`peft.load_adapters`).
      attack_on: either reading of the paper (ATTACK_ON):
        merged: the adapter merged into the weights, then the massive weights found again on the merged model
          and its rows (W0 + BA) attacked.
        base: the massive weights found on the pretrained model (before fine-tuning) and the pretrained rows
          attacked under the live adapter (in eval mode), as MacDrop drops them in training: LoRA keeps its BA
          rows, and DoRA's norm of the attacked rows, recomputed from the attacked weight, rescales the
          adapter's rows.
      first_token: the token fed alone to find the massive weights; None for bos.

    Returns:
      The attacked, fine-tuned model.
    """
    from mwjax.adapters import peft

    if attack_on not in ATTACK_ON:
        raise ValueError(f"attack_on must be one of {ATTACK_ON}, got {attack_on!r}")
    adapted = peft.load_adapters(model, adapter)
    if attack_on == "merged":
        return from_spec(peft.merge(adapted), tokenizer, spec, first_token)
    adapted.eval()  # LoRA dropout off: an evaluated model
    return from_spec(adapted, tokenizer, spec, first_token, find_on=model)
