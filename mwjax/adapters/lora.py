"""LoRA and DoRA on one Linear, computed as HF PEFT computes them (House of Cards fine-tunes with both).

In mwjax's kernel layout (kernel = weight.T, [in, out]) with s = alpha / r (rsLoRA: alpha / sqrt(r)):

    LoRA  y = x W + b + s (x A) B                       A: lora_a [in, r] (PEFT lora_A.weight.T), kaiming-uniform
                                                        B: lora_b [r, out] (PEFT lora_B.weight.T), zeros
    DoRA  y = (m / n) * (x W + s (x A) B) + b,          m: lora_magnitude [out], initialised to n
          n = || W + s A B || over the input axis, recomputed from the current base weight every call
          and detached (no gradient), as PEFT's `DoraLinearLayer` does.

With LoRA dropout p > 0 in training, the adapter path sees dropout(x) (DoRA: PEFT's exact
three-term form). The base weights stay `nnx.Param` and are never trained; adapter weights are
`LoRAParam`, float32 by default.

Fused HF modules (`LoraConfig(fuse=True)`): HF Phi-3 computes q, k, v with one `qkv_proj` and
W_gate, W_up with one `gate_up_proj`, so PEFT (and LLaMA-Factory) put ONE adapter on each: lora_A
[r, in] shared, lora_B [q+k+v, r] (or [2 d_ff, r]) and DoRA's magnitude over the fused output rows.
mwjax keeps the projections apart (the family record's `fused_modules`); under fuse the adapters of one
fused module hold the same `lora_a` Variable (NNX keeps one copy in `nnx.state`, sums its gradient
over the uses, saves and restores it once) and each its rows of B and m. DoRA's norm is per output
row, so the fused module's norm is the split modules' norms side by side: the computation is PEFT's.

MacDrop: the FFN row mask reaches `columns`, which multiplies the masked PyTorch rows of the *base*
weight only (adapters are never masked) and, for DoRA, recomputes those rows' norm from the masked
weight.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from mwjax.adapters.config import LoraConfig
from mwjax.core.sharding import param
from mwjax.instrument import masks
from mwjax.nn.layers import Linear, WrappedLinear

# An adapter parameter: the only kind the trainer differentiates and the optimizer updates. Flax's own, so that
# anything that knows Flax's LoRA (nnx.LoRA, nnx.state(model, nnx.LoRAParam)) sees mwjax's adapters too.
LoRAParam = nnx.LoRAParam

ADAPTER_AXES = (None, None)  # A [in, r] and B [r, out] are small: replicated on every device


class LoRALinear(WrappedLinear):
    """A `Linear` whose base weight is frozen and whose output gains a LoRA (or DoRA) update (PEFT `lora.Linear`).

    Args:
      base: the Linear adapted; its kernel and bias Variables are shared, not copied.
      config: rank r, alpha, dropout, DoRA / rsLoRA and the adapters' param_dtype.
      rngs: `params` draws A, `dropout` the LoRA dropout masks.
      lora_a: an A [in, r] to share (the other projections of a fused HF module); None makes a new one.
    """

    def __init__(self, base: Linear, config: LoraConfig, *, rngs: nnx.Rngs, lora_a: LoRAParam | None = None):
        """lora_a: an A [in, r] to share (the other projections of a fused HF module); default a new one."""
        super().__init__(base)  # the base's Variables are reused, not copied
        self.rank, self.scaling, self.use_dora = config.rank, config.scaling, config.dora
        pdtype = jnp.dtype(config.param_dtype)
        if lora_a is None:
            bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on lora_A.weight [r, in]
            lora_a = param(jax.random.uniform(rngs.params(), (self.in_features, self.rank), pdtype, -bound, bound),
                           ADAPTER_AXES, LoRAParam)
        elif lora_a[...].shape != (self.in_features, self.rank):
            raise ValueError(f"a shared lora_a of shape {lora_a[...].shape} does not fit a layer of "
                             f"{self.in_features} inputs at rank {self.rank}")
        self.lora_a = lora_a
        self.lora_b = param(jnp.zeros((self.rank, self.out_features), pdtype), ADAPTER_AXES, LoRAParam)
        self.lora_magnitude = param(self.weight_norm().astype(pdtype), (None,), LoRAParam) if self.use_dora else None
        self.lora_dropout = nnx.Dropout(config.dropout, rngs=rngs) if config.dropout > 0 else None

    # ---------------------------------------------------------------- pieces

    def _adapter_input(self, x: jax.Array) -> jax.Array:
        """PEFT casts the input to the adapters' dtype and applies dropout to it."""
        x = x.astype(self.lora_a[...].dtype)
        return x if self.lora_dropout is None else self.lora_dropout(x)

    def _lora(self, x: jax.Array, columns: jax.Array | None = None) -> jax.Array:
        """s (x A) B, for all outputs or only `columns` [k]."""
        b = self.lora_b[...] if columns is None else self.lora_b[...][:, columns]
        return (x @ self.lora_a[...]) @ b * self.scaling

    def weight_norm(self, kernel: jax.Array | None = None, columns: jax.Array | None = None) -> jax.Array:
        """|| W + s A B || per output feature [out] (or per `columns`), detached, float32.

        Expanded as ||w||^2 + 2 s <w, A b> + s^2 ||A b||^2 so that W + s A B is never materialised.

        Args:
          kernel: the base kernel's columns to use ([in, out] or [in, k]); None for the stored one.
          columns: int [k] output features (PyTorch rows) to take the norm of; None for all.

        Returns:
          float32 [out] (or [k]) norms n, with no gradient (`stop_gradient`), as PEFT's DoRA detaches them.
        """
        w = (self.kernel[...] if kernel is None else kernel).astype(jnp.float32)
        a = self.lora_a[...].astype(jnp.float32)
        b = self.lora_b[...].astype(jnp.float32)
        if columns is not None:
            b = b[:, columns]
        s = self.scaling
        sq = jnp.sum(w * w, axis=0) + 2 * s * jnp.sum((w.T @ a) * b.T, axis=-1) + s * s * jnp.sum((a.T @ a) @ b * b, 0)
        return jax.lax.stop_gradient(jnp.sqrt(jnp.maximum(sq, 0.0)))

    # ---------------------------------------------------------------- forward

    def _update(self, x: jax.Array, base: jax.Array, kernel: jax.Array, columns: jax.Array | None,
                norm_kernel: jax.Array | None = None) -> jax.Array:
        """What PEFT adds to the base layer's output (float32) for all outputs or `columns`.

        base: the base layer's output without bias [..., out|k]; kernel: the base kernel's columns in use.
        """
        xa = self._adapter_input(x)
        lora = self._lora(xa, columns)
        if not self.use_dora:
            return lora
        magnitude = self.lora_magnitude[...] if columns is None else self.lora_magnitude[...][columns]
        scale = magnitude / self.weight_norm(norm_kernel, columns)  # [out|k]
        if self.lora_dropout is not None and not self.lora_dropout.deterministic:
            base = xa @ kernel.astype(xa.dtype)  # PEFT recomputes the base term from dropout(x)
        return (scale - 1) * base.astype(jnp.float32) + scale * lora

    def _with_bias(self, y: jax.Array, columns: jax.Array | None = None) -> jax.Array:
        if self.bias is None:
            return y
        return y + (self.bias[...] if columns is None else self.bias[...][columns]).astype(y.dtype)

    def __call__(self, x: jax.Array, column_mask: masks.RowMask | None = None) -> jax.Array:
        x = x.astype(self.dtype)
        kernel = self.kernel[...]
        base = x @ kernel.astype(self.dtype)  # [..., out]
        y = self._with_bias(base)  # the base layer's output, in the compute dtype
        y = (y.astype(jnp.float32) + self._update(x, base, kernel, None)).astype(y.dtype)
        if column_mask is not None:
            y = y.at[..., column_mask.rows].set(self.columns(x, column_mask))
        return y

    def columns(self, x: jax.Array, mask: masks.RowMask) -> jax.Array:
        """The k masked outputs: the mask multiplies the base weight's rows only, never the adapters; DoRA's
        norm of those rows comes from the masked weight.

        Args:
          x: inputs [..., in].
          mask: the FFN row mask (MacDrop's): k PyTorch rows of W and their multipliers.

        Returns:
          Outputs [..., k] of the masked rows, in the compute dtype.
        """
        kernel = masks.masked_columns(self.kernel[...], mask)  # [in, k]
        base = x @ kernel.astype(self.dtype)
        y = self._with_bias(base, mask.rows)
        return (y.astype(jnp.float32) + self._update(x, base, kernel, mask.rows, kernel)).astype(y.dtype)

    @classmethod
    def grouped(cls, layers, x: jax.Array, group_sizes: jax.Array, groups: jax.Array, column_masks) -> jax.Array:
        """`Linear.grouped` with each layer's adapter (Mixtral's routed experts): the base, A and B products as
        ragged matmuls over the stacked weights; per row what `layers[groups[r]]` computes with its mask
        (dropout from that layer's own stream, DoRA's norm from its masked weight).

        Args:
          layers: the g LoRALinear layers (one per expert), all of one config.
          x: inputs [n, in], the rows sorted by group.
          group_sizes: int [g], the rows of each group (`jax.lax.ragged_dot`).
          groups: int [n], the group (layer) of each row.
          column_masks: one `masks.RowMask` or None per layer.

        Returns:
          Outputs [n, out] in the compute dtype.
        """
        first, n = layers[0], len(layers)
        x = x.astype(first.dtype)
        kernels = [layer.masked_kernel(m) for layer, m in zip(layers, column_masks, strict=True)]  # [in, out] each
        ragged = lambda lhs, rhs: jax.lax.ragged_dot(lhs, jnp.stack(rhs).astype(lhs.dtype), group_sizes)
        per_row = lambda values: jnp.stack(values)[groups]  # [g, ...] -> [n, ...]
        base = ragged(x, kernels)  # [n, out]
        y = base if first.bias is None else base + per_row([layer.bias[...] for layer in layers]).astype(base.dtype)
        xa = x.astype(first.lora_a[...].dtype)
        dropping = first.lora_dropout is not None and not first.lora_dropout.deterministic
        if dropping:  # each row takes the dropout of its own layer's stream
            xa = functools.reduce(lambda acc, e: jnp.where((groups == e)[:, None], layers[e].lora_dropout(xa), acc),
                                  range(n), xa)
        update = ragged(ragged(xa, [layer.lora_a[...] for layer in layers]),
                        [layer.lora_b[...] for layer in layers]) * first.scaling
        if first.use_dora:
            scale = per_row([layer.lora_magnitude[...] / layer.weight_norm(k) for layer, k in zip(layers, kernels,
                                                                                                strict=True)])
            if dropping:
                base = ragged(xa, kernels)  # PEFT recomputes the base term from dropout(x)
            update = (scale - 1) * base.astype(jnp.float32) + scale * update
        return (y.astype(jnp.float32) + update).astype(y.dtype)

    def merged_kernel(self) -> jax.Array:
        """W + s A B (LoRA) or (m / n) * (W + s A B) (DoRA), in the base kernel's dtype."""
        delta = self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32) * self.scaling
        w = self.kernel[...].astype(jnp.float32) + delta
        if self.use_dora:
            w = w * (self.lora_magnitude[...] / self.weight_norm())[None, :]
        return w.astype(self.kernel[...].dtype)
