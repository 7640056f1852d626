"""Activation edits: overwrite chosen features of an activation inside the forward pass.

`edits` maps (point, layer) to an `ActivationEdit`; the model applies it where the probe of the
same name records (so a probe at that point sees the edited value). Points: "hidden" (residual
stream after the layer), "intermediate", "down_proj_output", "attn_output". This is how the
massive-activation interventions (set to zero / to the mean) and the super weight's "restore the
super activation" run without copying any weight.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import struct

from mwjax.core.layer_index import check_layer

EDITABLE_POINTS = ("hidden", "intermediate", "down_proj_output", "attn_output")


@struct.dataclass
class ActivationEdit:
    """x[..., dims] := values where `where` is true and |x[..., dims]| > min_abs.

    dims:    int32 [k], feature indices (last axis)
    values:  broadcastable to [batch, seq, k]: the replacement values (None: unchanged, with first_values)
    where:   bool, broadcastable to [batch, seq] (None = every token)
    min_abs: static; only entries whose magnitude exceeds it are replaced (e.g. 100 selects the
             massive activations of those dims, wherever in the sequence they occur)
    first_values: [k] or None: the replacement at the sequence's first position (position 0) instead
             of `values` (the first token's massive activations differ from the delimiters')
    """

    dims: jax.Array
    values: jax.Array | None
    where: jax.Array | None = None
    min_abs: float | None = struct.field(pytree_node=False, default=None)
    first_values: jax.Array | None = None


Edits = Mapping[tuple[str, int], ActivationEdit]


def apply(edits: Edits | None, point: str, layer: int | jax.Array, x: jax.Array,
          positions: jax.Array | None = None) -> jax.Array:
    """`x` with the edit registered for (point, layer) applied; x itself when there is none.

    Args:
      edits: the edits, {(point, layer): ActivationEdit}; None or empty for none.
      point: the point `x` comes from, e.g. "hidden" (edits exist at EDITABLE_POINTS).
      layer: a static int, or a traced int32 [] (the layer index of `mwjax.nn.stack`'s scan): then
        `jax.lax.switch` runs the edit of that layer among the layers edited at `point` (none at the others), so
        the scan body holds one branch per edit at `point` (whatever their shapes), not one per layer.
      x: [b, t, d] the activation.
      positions: int [b, t] token positions (default 0..t-1), locating the first token for `first_values`.

    Returns:
      [b, t, d] the edited activation.
    """
    if not edits:
        return x
    if not isinstance(layer, jax.Array):
        return x if (point, layer) not in edits else apply_edit(edits[(point, layer)], x, positions)
    edited = sorted(edited_layer for edited_point, edited_layer in edits if edited_point == point)
    if not edited:
        return x
    # branch 0: no edit at this layer; branch j: the edit of layer edited[j - 1]
    branch = jnp.sum(jnp.where(layer == jnp.asarray(edited), jnp.arange(1, len(edited) + 1), 0))
    edit_of = lambda edit: lambda x: apply_edit(edit, x, positions)
    return jax.lax.switch(branch, [lambda x: x, *(edit_of(edits[(point, lay)]) for lay in edited)], x)


def apply_edit(edit: ActivationEdit, x: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """`x` with `edit` applied (`apply` finds the edit of a point and layer).

    Args:
      edit: the `ActivationEdit`.
      x: [b, t, d] the activation.
      positions: int [b, t] (or [t]) token positions; None: 0..t-1. Position 0 takes `first_values`.

    Returns:
      [b, t, d] the edited activation.
    """
    current = x[..., edit.dims]  # [b, t, k]
    new = current if edit.values is None else jnp.broadcast_to(jnp.asarray(edit.values, x.dtype), current.shape)
    if edit.first_values is not None:
        first = (jnp.arange(x.shape[-2]) if positions is None else positions) == 0  # [(b,) t]
        new = jnp.where(first[..., None], jnp.asarray(edit.first_values, x.dtype), new)
    selected = None
    if edit.where is not None:
        selected = jnp.broadcast_to(jnp.asarray(edit.where, bool)[..., None], current.shape)
    if edit.min_abs is not None:
        large = jnp.abs(current) > edit.min_abs
        selected = large if selected is None else selected & large
    if selected is not None:
        new = jnp.where(selected, new, current)
    return x.at[..., edit.dims].set(new)


def validate(edits: Edits | None, num_layers: int) -> None:
    """Check that every edit is at an editable point and an existing layer; ValueError otherwise.

    Args:
      edits: the edits, {(point, layer): ActivationEdit}; None for none.
      num_layers: the model's number of decoder layers.
    """
    for point, layer in edits or {}:
        if point not in EDITABLE_POINTS:
            raise ValueError(f"edits: point {point!r} cannot be edited; choose from {EDITABLE_POINTS}")
        check_layer(num_layers, layer, what=f"edits: layer {layer}")
