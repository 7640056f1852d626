"""Functional row masks on the FFN's W_gate and W_up (House of Cards, Algorithm 1).

A PyTorch `nn.Linear` weight is [out, in]; the paper's "row i of W_up" is output feature i, which
in a Flax kernel ([in, out] = weight.T) is column `kernel[:, i]`. `pytorch_rows` is the one place
that states this; everything else goes through it.

A mask is sparse: the k rows it touches and a multiplicative value for every entry of those rows,

    RowMask(rows=int32[k], values=float[k, d_model])

so an 8B model does not carry a [d_ff, d_model] tensor per layer. `ffn_masks` maps a layer index
(0-based, HF numbering) to one RowMask; the MLP applies the same mask to W_gate and W_up. Applying
it recomputes only the k affected columns of the gate/up projections:

    h[..., rows] = act(x @ (Wg[:, rows] * values.T)) * (x @ (Wu[:, rows] * values.T))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mwjax.core.layer_index import check_layer


@struct.dataclass
class RowMask:
    """Multiplicative mask on k PyTorch rows of W_gate and W_up.

    rows:   int32 [k], indices into d_ff (the intermediate state's dimensions)
    values: [k, d_model], multiplied elementwise into those rows; 0 removes a weight, 1 keeps it
    expert: Mixtral only (static): which expert's W_gate / W_up the mask targets
    """

    rows: jax.Array
    values: jax.Array
    expert: int | None = struct.field(pytree_node=False, default=None)

    @property
    def k(self) -> int:
        """How many rows the mask touches."""
        return self.rows.shape[0]


FFNMasks = Mapping[int, RowMask]


def pytorch_rows(kernel: jax.Array, rows: jax.Array) -> jax.Array:
    """The PyTorch rows `rows` of a Flax kernel [in, out] -> kernel columns [in, k].

    Args:
      kernel: a Flax kernel [in, out] (HF `weight.T`).
      rows: int [k] PyTorch row indices (output features, e.g. intermediate dimensions of W_up).

    Returns:
      `kernel[:, rows]`, [in, k].
    """
    return kernel[:, rows]


def masked_columns(kernel: jax.Array, mask: RowMask) -> jax.Array:
    """Kernel columns [in, k] of the masked rows, multiplied by the mask values.

    Args:
      kernel: a Flax kernel [in, out], e.g. W_gate's or W_up's [d_model, d_ff].
      mask: the RowMask; its values [k, d_model] are cast to the kernel's dtype.

    Returns:
      `kernel[:, rows] * values.T`, [in, k].
    """
    return pytorch_rows(kernel, mask.rows) * mask.values.T.astype(kernel.dtype)


def row_mask(rows: Sequence[int] | jax.Array, values: jax.Array | float, d_model: int, *, expert: int | None = None,
             dtype=jnp.float32) -> RowMask:
    """A RowMask on `rows` with `values` broadcast to [k, d_model] (e.g. 0.0 zeroes the rows).

    Args:
      rows: int [k] intermediate indices (PyTorch rows of W_gate / W_up); not 1-D: ValueError.
      values: the multipliers, anything that broadcasts to [k, d_model] (a scalar, [d_model], [k, 1]).
      d_model: the hidden size (HF `hidden_size`).
      expert: Mixtral only: the expert whose W_gate / W_up the mask targets.
      dtype: dtype of the values.

    Returns:
      The RowMask.
    """
    rows = jnp.asarray(rows, jnp.int32)
    if rows.ndim != 1:
        raise ValueError(f"rows must be a 1-D list of intermediate indices, got shape {rows.shape}")
    values = jnp.broadcast_to(jnp.asarray(values, dtype), (rows.shape[0], d_model))
    return RowMask(rows=rows, values=values, expert=expert)


def zero_rows(rows: Sequence[int] | jax.Array, d_model: int, *, expert: int | None = None) -> RowMask:
    """The mask of top-k zeroing: rows set to 0 in W_gate and W_up.

    Args:
      rows: int [k] intermediate indices (e.g. the top-k massive weights' `MassiveWeights.indices[:k]`).
      d_model: the hidden size.
      expert: Mixtral only: the expert whose rows are zeroed.

    Returns:
      A float32 RowMask whose values [k, d_model] are all 0.
    """
    return row_mask(rows, 0.0, d_model, expert=expert)


def dense(mask: RowMask, d_ff: int) -> jax.Array:
    """The dense equivalent [d_ff, d_model] in PyTorch layout (ones outside `rows`).

    Rows listed twice multiply, as repeated application would; the sparse path writes the last value.

    Args:
      mask: the RowMask.
      d_ff: the intermediate size (HF `intermediate_size`).

    Returns:
      [d_ff, d_model] in the values' dtype.
    """
    full = jnp.ones((d_ff, mask.values.shape[1]), mask.values.dtype)
    return full.at[mask.rows].multiply(mask.values)


def validate(ffn_masks: FFNMasks, *, num_layers: int, d_ff: int, d_model: int,
             num_experts: int | None = None) -> None:
    """Check layer indices and shapes (row indices too when they are concrete). Raises ValueError.

    Args:
      ffn_masks: {layer (0-based): RowMask}, as the models take them.
      num_layers: the model's decoder layers.
      d_ff: the intermediate size: row indices must lie in [0, d_ff).
      d_model: the hidden size: values must be [k, d_model].
      num_experts: experts per layer (Mixtral: every mask must name one); None for a dense model (no mask may).
    """
    for layer, mask in ffn_masks.items():
        check_layer(num_layers, layer, what=f"ffn_masks: layer {layer}")
        if mask.values.shape != (mask.rows.shape[0], d_model):
            raise ValueError(
                f"ffn_masks[{layer}]: values must have shape [k, d_model] = [{mask.rows.shape[0]}, {d_model}], "
                f"got {tuple(mask.values.shape)}"
            )
        if mask.expert is not None:
            if num_experts is None:
                raise ValueError(f"ffn_masks[{layer}] names expert {mask.expert} but the model has no experts")
            if not 0 <= mask.expert < num_experts:
                raise ValueError(
                    f"ffn_masks[{layer}]: expert {mask.expert} out of range (the model has {num_experts} experts)"
                )
        elif num_experts is not None:
            raise ValueError(f"ffn_masks[{layer}]: this is a mixture-of-experts model; say which expert= to mask")
        if not isinstance(mask.rows, jax.core.Tracer):
            rows = np.asarray(mask.rows)
            if rows.size and (rows.min() < 0 or rows.max() >= d_ff):
                raise ValueError(
                    f"ffn_masks[{layer}]: row indices must lie in [0, d_ff={d_ff}), "
                    f"got min {rows.min()} max {rows.max()}"
                )
