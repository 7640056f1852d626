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

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mwjax import masks, probes
from mwjax.interventions import ActivationEdit, Edits
from mwjax.massive import MassiveWeights, SuperWeight
from mwjax.models.base import Attached
from mwjax.models.layers import Linear

MASSIVE_ACTIVATION_MIN = 100.0


def copy(model: nnx.Module) -> nnx.Module:
    """A new model with new Variables over the same arrays (changing its variables leaves `model` as it was)."""
    return nnx.clone(model)


def ffn_projections(model: nnx.Module, layer: int, expert: int | None = None) -> tuple[Linear, Linear]:
    """(gate_proj, up_proj) of a layer's FFN, or of one expert's: the modules whose PyTorch rows are the
    massive weights."""
    _check_layer(model, layer)
    mlp = model.model.layers[layer].mlp
    if hasattr(mlp, "experts"):
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
    """A copy of `model` that applies `ffn_masks` and `edits` in every forward pass."""
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


def _check_layer(model: nnx.Module, layer: int) -> None:
    n = model.config.num_hidden_layers
    if not 0 <= layer < n:
        raise ValueError(f"layer {layer} is out of range: the model has layers 0..{n - 1}")


def _top_k_keep(mw: MassiveWeights, k) -> jax.Array:
    """[len(indices)] 1 for the first k massive rows, 0 after (k may be traced)."""
    return (jnp.arange(len(mw.indices)) < k).astype(jnp.float32)


def top_k_row_scale(mw: MassiveWeights, k, d_ff: int, retain=False) -> jax.Array:
    """Per-row factor [d_ff] of W_gate / W_up: top-k zeroing (0 on the k massive rows, 1 elsewhere) or,
    with `retain`, top-k retaining (the opposite). k and retain may be traced."""
    top = jnp.zeros((d_ff,), jnp.float32).at[jnp.asarray(mw.indices)].set(_top_k_keep(mw, k))
    return jnp.where(retain, top, 1.0 - top)


def zero_top_k_masks(mw: MassiveWeights, k, d_model: int) -> masks.FFNMasks:
    """Row masks for top-k zeroing; sparse (only the rows in `mw`); k may be traced."""
    _check_k(mw, k, allow_zero=False)
    values = jnp.broadcast_to((1.0 - _top_k_keep(mw, k))[:, None], (len(mw.indices), d_model))
    return {mw.layer: masks.RowMask(rows=jnp.asarray(mw.indices, jnp.int32), values=values, expert=mw.expert)}


def row_scale_masks(mw: MassiveWeights, scale: jax.Array, d_model: int) -> masks.FFNMasks:
    """A row mask over every row of W_gate / W_up at `mw.layer` from per-row factors [d_ff].

    Recomputes that layer's whole gate/up projection, so one compiled program serves any factors:
    zeroing, retaining and every k of a sweep."""
    rows = jnp.arange(scale.shape[0], dtype=jnp.int32)
    return {mw.layer: masks.RowMask(rows=rows, values=jnp.broadcast_to(scale[:, None], (scale.shape[0], d_model)),
                                    expert=mw.expert)}


def retain_top_k_masks(mw: MassiveWeights, k, d_ff: int, d_model: int) -> masks.FFNMasks:
    """Row masks for top-k retaining (dense over the layer's rows); k may be traced."""
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
    """Top-k zeroing: the k massive rows of W_gate and W_up at `mw.layer` set to 0 (k may be traced)."""
    _check_k(mw, k, allow_zero=False)
    return _scale_ffn_rows(model, mw.layer, top_k_row_scale(mw, k, model.config.intermediate_size), mw.expert)


def retain_top_k(model: nnx.Module, mw: MassiveWeights, k) -> nnx.Module:
    """Top-k retaining: every row of W_gate and W_up at `mw.layer` but the k massive ones set to 0
    (k = 0 zeroes the whole of W_gate and W_up there)."""
    _check_k(mw, k, allow_zero=True)
    return _scale_ffn_rows(model, mw.layer, top_k_row_scale(mw, k, model.config.intermediate_size, retain=True),
                           mw.expert)


# ----------------------------------------------------------------------------------------- super weights


def _down_proj(model: nnx.Module, layer: int) -> Linear:
    _check_layer(model, layer)
    mlp = model.model.layers[layer].mlp
    if hasattr(mlp, "experts"):
        raise ValueError("super-weight attacks address a dense FFN's down_proj; this model routes between experts")
    return mlp.down_proj


def _as_list(sws: SuperWeight | Sequence[SuperWeight]) -> list[SuperWeight]:
    sws = [sws] if isinstance(sws, SuperWeight) else list(sws)
    if not sws:
        raise ValueError("no super weight given")
    return sws


def scale_super_weight(model: nnx.Module, sws: SuperWeight | Sequence[SuperWeight], factor) -> nnx.Module:
    """down_proj.weight[row, col] (HF layout) of one super weight or of a set (jointly, as the Super Weight
    experiments do) multiplied by `factor` (0 prunes; factor may be traced)."""
    out = copy(model)
    for sw in _as_list(sws):
        proj = _down_proj(out, sw.layer)
        kernel = proj.kernel[...]  # [d_ff, d_model]: weight[row, col] = kernel[col, row]
        proj.kernel[...] = kernel.at[sw.col, sw.row].multiply(jnp.asarray(factor, kernel.dtype))
    return out


class SuperActivationRestored(Linear):
    """A down_proj whose super weights (one layer's) are pruned but whose super activations are put back.

    Each super weight's output channel `row` gets the unpruned model's value (= pruned value +
    w * x[..., col]) at the position of each sequence where that value's magnitude is largest, as
    the Super Weight reference hook restores it (`min_abs=None`; a cached decoding step sees one
    position), or, with `min_abs`, wherever its magnitude exceeds min_abs; elsewhere the pruned
    value. Computed from the input, so it restores the super activations on any text.
    """

    def __init__(self, base: Linear, sws: list[SuperWeight], min_abs: float | None):
        self.in_features, self.out_features, self.dtype = base.in_features, base.out_features, base.dtype
        kernel = base.kernel[...]
        rows, cols = jnp.asarray([sw.row for sw in sws]), jnp.asarray([sw.col for sw in sws])
        self.pruned_weights = tuple(float(w) for w in kernel[cols, rows])  # [n]
        self.kernel = nnx.Param(kernel.at[cols, rows].set(0))
        self.bias = base.bias
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

    min_abs: None (default, the reference hook): restore each channel at its argmax position in each
    sequence; a magnitude: restore every position whose unpruned value exceeds it.
    """
    out = copy(model)
    sws = _as_list(sws)
    for layer in sorted({sw.layer for sw in sws}):
        mlp = out.model.layers[layer].mlp
        mlp.down_proj = SuperActivationRestored(_down_proj(out, layer), [sw for sw in sws if sw.layer == layer],
                                                min_abs)
    return out


# ----------------------------------------------------------------------------------------- massive activations


def massive_activation_means(model: nnx.Module, tokens, layer: int, dims: Sequence[int],
                             min_abs: float = MASSIVE_ACTIVATION_MIN, batch_size: int = 8) -> np.ndarray:
    """Mean of hidden[..., dims] after `layer` over the entries where |value| > min_abs, per dim."""
    tokens = np.asarray(tokens, np.int32)
    dims = np.asarray(dims)
    config = probes.ProbeConfig(points=("hidden",), layers=(layer,))
    total, count = np.zeros(len(dims)), np.zeros(len(dims))
    for start in range(0, len(tokens), batch_size):
        _, result = probes.capture(model, jnp.asarray(tokens[start:start + batch_size]), config)
        x = np.asarray(result["hidden"][layer]["full"][..., dims], np.float64).reshape(-1, len(dims))
        large = np.abs(x) > min_abs
        total += np.where(large, x, 0).sum(0)
        count += large.sum(0)
    if np.any(count == 0):
        raise ValueError(f"dims {dims[count == 0].tolist()} never exceed |x| > {min_abs} after layer {layer} on "
                         "these sequences: they hold no massive activation there")
    return total / count


def massive_activation_edits(layer: int, dims: Sequence[int], values, min_abs: float = MASSIVE_ACTIVATION_MIN
                             ) -> Edits:
    """Edits setting the massive activations (|x| > min_abs) of `dims` in the hidden state after `layer`."""
    dims = jnp.asarray(dims, jnp.int32)
    return {("hidden", layer): ActivationEdit(dims=dims, values=jnp.broadcast_to(jnp.asarray(values), dims.shape),
                                              min_abs=min_abs)}


def set_massive_activations(model: nnx.Module, layer: int, dims: Sequence[int], value="zero", *, tokens=None,
                            min_abs: float = MASSIVE_ACTIVATION_MIN) -> nnx.Module:
    """Set the massive activations in `dims` of the hidden state after `layer` (wherever |x| > min_abs).

    value: "zero"; "mean" (their mean over `tokens` [num_sequences, seq], computed here); or a number.
    """
    _check_layer(model, layer)
    if isinstance(value, str):
        if value == "zero":
            value = 0.0
        elif value == "mean":
            if tokens is None:
                raise ValueError('value="mean" needs tokens=[num_sequences, seq] to average the activations over')
            value = massive_activation_means(model, tokens, layer, dims, min_abs)
        else:
            raise ValueError(f'value must be "zero", "mean" or a number, got {value!r}')
    return attach(model, edits=massive_activation_edits(layer, dims, value, min_abs))


# ----------------------------------------------------------------------------------------- by name

SPECS = ("zero_top_k:K", "retain_top_k:K", "scale_super_weight:FACTOR", "prune_super_weight",
         "restore_super_activation")


def parse_spec(spec: str) -> tuple[str, float | None]:
    """(attack name, its number or None) of a spec as `from_spec` takes it; ValueError naming the fix. Needs no
    model, so command lines check their --attack before loading one."""
    name, _, arg = spec.partition(":")
    if name in ("zero_top_k", "retain_top_k"):
        if not arg.isdigit() or int(arg) < 1:
            raise ValueError(f"attack {spec!r}: write {name}:K with an integer K >= 1, e.g. {name}:5")
        return name, int(arg)
    if name == "scale_super_weight":
        try:
            return name, float(arg)
        except ValueError:
            raise ValueError(f"attack {spec!r}: write scale_super_weight:FACTOR, e.g. scale_super_weight:1.5") from None
    if name in ("prune_super_weight", "restore_super_activation"):
        if arg:
            raise ValueError(f"attack {spec!r}: {name} takes no argument")
        return name, None
    raise ValueError(f"unknown attack {spec!r}; write one of {SPECS}")


def from_spec(model: nnx.Module, tokenizer, spec: str, first_token: int | str | None = None) -> nnx.Module:
    """Apply an attack named as on a command line: "zero_top_k:5", "retain_top_k:5", "scale_super_weight:1.5",
    "prune_super_weight", "restore_super_activation". Massive / super weights are found first."""
    from mwjax import massive

    name, arg = parse_spec(spec)
    if name in ("zero_top_k", "retain_top_k"):
        mw = massive.find_massive_weights(model, tokenizer, k=arg, first_token=first_token)
        return (zero_top_k if name == "zero_top_k" else retain_top_k)(model, mw, arg)
    found = massive.find_super_weights(model, tokenizer)  # all of them, attacked jointly
    if not found:
        raise ValueError(f"attack {spec!r}: no super weight found (no down_proj spikes above "
                         f"{massive.SPIKE_THRESHOLD})")
    if name == "restore_super_activation":
        return restore_super_activation(model, found)
    return scale_super_weight(model, found, 0.0 if name == "prune_super_weight" else arg)
