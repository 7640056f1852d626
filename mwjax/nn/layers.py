"""Building blocks shared by every family: Linear, Embed, RMSNorm, NonParametricLayerNorm, activations.

Parameters keep HF's numerics: a `Linear.kernel` is HF's `weight` transposed ([in, out]), so the
paper's "row i of W_up" (PyTorch layout [d_ff, d_model]) is `up_proj.kernel[:, i]`
(see `mwjax.instrument.masks.pytorch_rows`).

Every parameter declares the logical axes of its dimensions where it is created (Flax's sharding metadata,
e.g. ("embed", "mlp") for W_up's kernel; None: never sharded); `mwjax.core.sharding` maps them onto a mesh
through its one rules table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mwjax.core.sharding import AXES, Axes, param
from mwjax.instrument import masks

_INIT = nnx.initializers.normal(stddev=0.02)  # HF `initializer_range` default

def _gelu_erf(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


# one function object per name: a layer's graph (nnx.graphdef) holds it, and stacked layers must share it
_ACTIVATIONS = {"silu": jax.nn.silu, "swish": jax.nn.silu, "gelu": _gelu_erf, "gelu_pytorch_tanh": _gelu_tanh,
                "gelu_new": _gelu_tanh, "relu": jax.nn.relu}


def activation(name: str):
    """HF `ACT2FN[name]` in JAX.

    Args:
      name: the HF `hidden_act` (one of `config.SUPPORTED_ACTIVATIONS`).

    Returns:
      The activation function (one shared object per name, so stacked layers' graphs match).
    """
    return _ACTIVATIONS[name]


class Linear(nnx.Module):
    """`torch.nn.Linear` with `kernel = weight.T` ([in_features, out_features]).

    `column_mask` multiplies chosen PyTorch rows of the weight (kernel columns) without touching the
    stored kernel; only those k output columns are recomputed, so an absent mask costs nothing.
    Subclasses that add adapters (LoRA, DoRA) override `columns` so the mask reaches the base weight
    only; `weight` is the kernel the forward multiplies by (`mwjax.research.prune.PrunedLinear` masks it).
    A layer that changes another's computation subclasses `WrappedLinear`.
    """

    def __init__(self, in_features: int, out_features: int, *, axes: Axes, use_bias: bool, dtype, param_dtype,
                 rngs: nnx.Rngs):
        """A Linear initialised as HF does (normal, stddev 0.02; bias zeros).

        Args:
          in_features: input size (PyTorch `in_features`).
          out_features: output size (PyTorch `out_features`).
          axes: the logical axes of the kernel [in, out] (the bias takes the output's).
          use_bias: whether the layer has a bias [out].
          dtype: the compute dtype.
          param_dtype: the parameters' dtype.
          rngs: the nnx random streams (`params` initialises the kernel).
        """
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.kernel = param(_INIT(rngs.params(), (in_features, out_features), param_dtype), axes)
        self.bias = param(jnp.zeros((out_features,), param_dtype), axes[1:]) if use_bias else None

    @property
    def axes(self) -> Axes:
        """The kernel's declared logical axes [in, out] (e.g. ("embed", "mlp") for W_up)."""
        return self.kernel.get_metadata()[AXES]

    def __call__(self, x: jax.Array, column_mask: masks.RowMask | None = None) -> jax.Array:
        x = x.astype(self.dtype)
        y = x @ self.weight().astype(self.dtype)  # [..., out]
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if column_mask is not None:
            y = y.at[..., column_mask.rows].set(self.columns(x, column_mask))
        return y

    def weight(self) -> jax.Array:
        """The kernel [in, out] the forward uses: the stored one."""
        return self.kernel[...]

    def columns(self, x: jax.Array, mask: masks.RowMask) -> jax.Array:
        """Outputs [..., k] of the k masked PyTorch rows: x @ (W[rows] * values).T (+ bias[rows]).

        Args:
          x: the input [..., in], in the compute dtype.
          mask: the RowMask (rows [k], values [k, in]).

        Returns:
          [..., k], written over those output columns by `__call__`.
        """
        kernel = masks.masked_columns(self.weight(), mask).astype(self.dtype)  # [in, k]
        y = x @ kernel
        if self.bias is not None:
            y = y + self.bias[...][mask.rows].astype(self.dtype)
        return y

    def masked_kernel(self, mask: masks.RowMask | None) -> jax.Array:
        """The kernel [in, out] with the masked PyTorch rows multiplied by the mask (the stored one without).

        Args:
          mask: a RowMask (rows [k], values [k, in]), or None.

        Returns:
          The kernel [in, out].
        """
        kernel = self.kernel[...]
        return kernel if mask is None else kernel.at[:, mask.rows].set(masks.masked_columns(kernel, mask))

    @classmethod
    def grouped(cls, layers, x: jax.Array, group_sizes: jax.Array, groups: jax.Array,
                column_masks) -> jax.Array:
        """Row r of x through `layers[groups[r]]` (with `column_masks[groups[r]]`): one `jax.lax.ragged_dot` over
        the stacked kernels [g, in, out] instead of g dense matmuls (Mixtral's routed experts).

        Equal to `layers[g](x[r], column_masks[g])` per row.

        Args:
          layers: g Linears of one shape and dtype (one per expert).
          x: [n, in], the rows sorted by group.
          group_sizes: int32 [g], how many rows each group has.
          groups: int [n], the group of each row (for the bias).
          column_masks: g entries, a RowMask or None each.

        Returns:
          [n, out] in the layers' compute dtype.
        """
        dtype = layers[0].dtype
        kernels = jnp.stack([layer.masked_kernel(m).astype(dtype) for layer, m in zip(layers, column_masks,
                                                                                        strict=True)])
        y = jax.lax.ragged_dot(x.astype(dtype), kernels, group_sizes)  # [n, out]
        if layers[0].bias is not None:
            y = y + jnp.stack([layer.bias[...] for layer in layers]).astype(dtype)[groups]
        return y


class WrappedLinear(Linear):
    """A Linear built on another whose Variables it shares (the same kernel and bias Variables, not copies): the
    one way mwjax changes what a projection computes without touching the model's arrays. LoRA / DoRA
    (`adapters.lora.LoRALinear`), pruning (`research.prune.PrunedLinear`) and restored super activations
    (`research.attacks.SuperActivationRestored`) subclass it and override `weight`, `columns` or `__call__`.

    Args:
      base: the Linear wrapped; its shapes and compute dtype are this one's.
    """

    def __init__(self, base: Linear):
        self.in_features, self.out_features, self.dtype = base.in_features, base.out_features, base.dtype
        self.kernel, self.bias = base.kernel, base.bias


class Embed(nnx.Module):
    """`torch.nn.Embedding`; `attend` is the tied `lm_head` (x @ embedding.T)."""

    def __init__(self, num_embeddings: int, features: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = param(_INIT(rngs.params(), (num_embeddings, features), param_dtype), ("vocab", "embed"))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """The tied LM head: x @ embedding.T.

        Args:
          x: [..., features] (the final norm's output).

        Returns:
          Logits [..., num_embeddings] in the compute dtype.
        """
        return x.astype(self.dtype) @ self.embedding[...].astype(self.dtype).T


class RMSNorm(nnx.Module):
    """HF `LlamaRMSNorm`: normalise in float32, cast back, then multiply by the weight.

    `offset=1.0` gives Gemma's `(1 + w)` variant (which multiplies before casting back); `scale_in_float32=True`
    multiplies by w before casting back too (HF `Olmo2RMSNorm`: `(weight * x_f32).to(dtype)`). In float32 the
    three orders agree; in bfloat16 they round differently, as HF's do.
    """

    def __init__(self, features: int, *, eps: float, param_dtype, offset: float = 0.0, scale_in_float32: bool = False):
        self.eps, self.offset, self.scale_in_float32 = eps, offset, scale_in_float32
        init = jnp.zeros if offset else jnp.ones
        self.scale = param(init((features,), param_dtype), (None,))  # small: replicated

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        if self.scale_in_float32:
            return (self.scale[...].astype(jnp.float32) * normed).astype(x.dtype)
        return self.scale[...] * normed.astype(x.dtype)


class NonParametricLayerNorm(nnx.Module):
    """HF `OlmoLayerNorm`: `F.layer_norm` without weight or bias (no parameters), computed in float32 and cast
    back: (x - mean(x)) / sqrt(var(x) + eps) over the feature axis, the biased variance.

    Args:
      features: the size of the normalised (last) axis.
      eps: added to the variance (OLMo: 1e-5, hard-coded in HF).
    """

    def __init__(self, features: int, *, eps: float):
        self.features, self.eps = features, eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        centered = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        variance = jnp.mean(centered * centered, axis=-1, keepdims=True)
        return (centered * jax.lax.rsqrt(variance + self.eps)).astype(x.dtype)
