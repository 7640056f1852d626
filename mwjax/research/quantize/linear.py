"""A quantized model: every decoder-layer Linear wrapped so it fake-quantizes its weight and its input.

    q = apply(model, WeightQuant(bits=8), ActivationQuant(bits=8))          # W8A8, per tensor
    q = apply(model, WeightQuant(bits=4, block=128, symmetric=False))       # weight-only, blocks of 128
    q = apply(model, w, a, super_weights=sws, smoothing=factors)            # + restore, + SmoothQuant
    q2 = update(q, dataclasses.replace(w, bits=3))                          # same structure: same program

What is quantized: every `Linear` of the decoder layers (HF q/k/v/o_proj, gate/up/down_proj), never the
embeddings or `lm_head`, as the reference quantizes every `weight` but the norms, `embed_tokens` and `lm_head`,
and SmoothQuant's `quantize_llama_like` every projection of the decoder layers (attention's matmul inputs are
not quantized here). Mixture-of-experts models are refused (their experts run through a grouped matmul).

Functional, as `mwjax.prune`: `apply` returns a copy whose Linears are `QuantizedLinear`s holding the SAME kernel
arrays as the input model; the quantization happens inside the forward pass. Every number of a setting (bits,
block size, clipping threshold, restore on / off, hold-out on / off, smoothing factors) is a `QuantSetting`
Variable, traced by the compiled forward; only the method's shape is static (symmetric or not, the clipping
method, the activation granularity, a fixed block size unless `traced_block`, which Linears smooth or restore).
So `update` to another setting of one structure reuses the compiled program: a sweep over bits, block sizes
(`traced_block=True`), clipping thresholds, or between naive W8A8 and its super-activation-handled variant.

Super weights (`super_weights=`): their entries of down_proj (kernel[col, row]) are restored in full precision
after quantization (the reference's `restore_and_scale_GO=1.0`: clip, quantize, then put the super weight's
original value back); `update(..., restore=False)` turns the restore off in the same program, and
`update(..., hold_out=True)` also keeps them out of their blocks' min / max before quantizing (the weights'
counterpart of Table 3's super-activation handling: only the super weights are "clipped", nothing else).
SmoothQuant (`smoothing=` {(layer, path): s [in]}, `quantize.smoothquant`): the Linear divides its input by
s and multiplies its weight's input rows by s before quantizing both, which is SmoothQuant's folding of s into the
preceding norm computed in place (the norm's arrays stay shared; any family's norm works, Gemma's 1 + w too).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mwjax.core import paths
from mwjax.core.compiled import jit_model
from mwjax.core.sharding import param
from mwjax.instrument import masks
from mwjax.nn.layers import Linear, WrappedLinear
from mwjax.nn.stack import LayerStack
from mwjax.research import attacks, prune
from mwjax.research.massive import SuperWeight
from mwjax.research.quantize import rtn

Key = prune.Key  # (decoder layer, module path inside it: "self_attn.q_proj", "mlp.down_proj")


@dataclasses.dataclass(frozen=True)
class WeightQuant:
    """Round-to-nearest of a weight (`mwjax.research.quantize.rtn`).

    Args:
      bits: the paper's b, in [2, 16].
      block: an int (consecutive elements of the flattened PyTorch weight), "channel" (one output row) or "tensor".
      symmetric: True: absmax (SmoothQuant); False: min/max (the reference's asymmetric `quantize_blockwise`).
      clip: a method of `rtn.CLIP_METHODS`, applied before quantizing ("none": no clipping).
      clip_threshold: the clipping threshold (z, IQR multiplier or fraction); inf: no clipping in the same program.
    """

    bits: int = 8
    block: int | str = "tensor"
    symmetric: bool = True
    clip: str = "none"
    clip_threshold: float = math.inf

    def check(self) -> None:
        """Refuse bits outside [2, 16], a block that is neither a positive int nor "channel" / "tensor", and a
        clipping threshold the method cannot use (`rtn.check_clip`).

        Raises:
          ValueError naming the setting.
        """
        if not 2 <= int(self.bits) <= 16:
            raise ValueError(f"weight bits must lie in [2, 16], got {self.bits}")
        if self.block not in ("channel", "tensor") and (isinstance(self.block, str) or int(self.block) < 1):
            raise ValueError(f"block must be a positive int, 'channel' or 'tensor', got {self.block!r}")
        rtn.check_clip(self.clip, self.clip_threshold)


@dataclasses.dataclass(frozen=True)
class ActivationQuant:
    """Dynamic symmetric round-to-nearest of every Linear's input (SmoothQuant's dynamic `fake_quant`).

    Args:
      bits: the activations' bit width, in [2, 16].
      granularity: "tensor" (one scale per sequence) or "token" (one per token).
      hold_out: keep each tensor's largest |x| (the super activation) out of the scale and restore it (Table 3).
    """

    bits: int = 8
    granularity: str = "tensor"
    hold_out: bool = False

    def check(self) -> None:
        """Refuse bits outside [2, 16] and a granularity not in `rtn.GRANULARITIES`.

        Raises:
          ValueError naming the setting.
        """
        if not 2 <= int(self.bits) <= 16:
            raise ValueError(f"activation bits must lie in [2, 16], got {self.bits}")
        if self.granularity not in rtn.GRANULARITIES:
            raise ValueError(f"activation granularity must be one of {rtn.GRANULARITIES}, got {self.granularity!r}")


class QuantSetting(nnx.Variable):
    """A traced number of a quantizer (bits, block size, clipping, restore, smoothing). Not a parameter: optimisers
    and parameter exports skip it."""


def _setting(value, dtype) -> QuantSetting:
    return QuantSetting(jnp.asarray(value, dtype))


class QuantizedLinear(WrappedLinear):
    """A Linear that fake-quantizes its input and its weight in the forward pass (module doc); the kernel and
    bias Variables are the unquantized model's own (shared, unchanged).

    Args:
      base: the plain `Linear` wrapped (a LoRA or pruned Linear is refused: merge adapters, quantize before pruning).
      weights: the weight quantizer; None: the weight stays float.
      activations: the input quantizer; None: weight-only.
      traced_block: the block size is a traced setting (a block-size sweep in one program) rather than compiled in.
      restore_at: kernel coordinates int [k, 2] (input, output) restored after quantization (the super weights);
        None: nothing restored.
      smooth: SmoothQuant's factors s [in]; None: no smoothing.
    """

    def __init__(self, base: Linear, weights: WeightQuant | None, activations: ActivationQuant | None, *,
                 traced_block: bool = False, restore_at: np.ndarray | None = None, smooth: jax.Array | None = None):
        if type(base) is not Linear:
            raise ValueError(f"quantize a plain Linear, not a {type(base).__name__} (merge adapters, quantize before "
                             "pruning)")
        super().__init__(base)
        shape = tuple(base.kernel[...].shape)
        # static: the structure of the computation (part of the compiled program)
        self.quantize_weight, self.quantize_input = weights is not None, activations is not None
        self.symmetric = weights.symmetric if weights else True
        self.clip = weights.clip if weights else "none"
        self.traced_block = traced_block
        self.granularity = activations.granularity if activations else "tensor"
        # traced: the numbers
        self.w_bits, self.w_block = _setting(8, jnp.float32), _setting(shape[0] * shape[1], jnp.int32)
        self.clip_k, self.clip_scale = _setting(0, jnp.int32), _setting(jnp.inf, jnp.float32)
        self.a_bits, self.hold_out = _setting(8, jnp.float32), _setting(False, bool)
        self.static_block = None
        self.materialized = False  # the kernel holds the dequantized weight already (`materialize`)
        self.restore_at = None if restore_at is None else _setting(np.asarray(restore_at, np.int32).reshape(-1, 2),
                                                                   jnp.int32)
        self.restore_on = _setting(restore_at is not None, bool)
        self.hold_out_weights = _setting(False, bool)  # the restored weights kept out of their blocks' range
        self.smooth = None if smooth is None else _setting(smooth, jnp.float32)
        self.set(weights, activations)

    def set(self, weights: WeightQuant | None, activations: ActivationQuant | None) -> None:
        """Fill the traced settings from the specs (in place; `update` calls it on a copy).

        The static choices must match the ones the module was built with: ValueError otherwise, and for a
        materialized module.

        Args:
          weights: the weight spec (its symmetric and clip as built; its block size too unless `traced_block`);
            None exactly when the module quantizes no weight.
          activations: the input spec (its granularity as built); None exactly when the module quantizes no input.
        """
        if self.materialized:
            raise ValueError("a materialized model's weights are fixed: update the model `apply` made, then "
                             "materialize that")
        if (weights is not None) != self.quantize_weight or (activations is not None) != self.quantize_input:
            raise ValueError("update cannot add or remove weight / activation quantization: apply() again")
        shape = tuple(self.kernel[...].shape)
        if weights is not None:
            weights.check()
            if (weights.symmetric, weights.clip) != (self.symmetric, self.clip):
                raise ValueError(f"symmetric={weights.symmetric}, clip={weights.clip!r} differ from the structure this "
                                 f"model was built with ({self.symmetric}, {self.clip!r}): apply() again")
            block, whole = rtn.effective_block(shape, weights.block)
            if not self.traced_block:
                if self.static_block is not None and block != self.static_block:
                    raise ValueError("this model's block size is compiled in: to sweep it, apply(..., "
                                     "traced_block=True)")
                self.static_block = block
            self.w_bits[...] = jnp.float32(weights.bits)
            self.w_block[...] = jnp.int32(block)
            self.clip_k[...] = jnp.int32(rtn.clip_count(weights.clip, weights.clip_threshold, block,
                                                        shape[0] * shape[1], whole))
            self.clip_scale[...] = jnp.float32(weights.clip_threshold if weights.clip in ("zscore", "iqr")
                                               else math.inf)
        if activations is not None:
            activations.check()
            if activations.granularity != self.granularity:
                raise ValueError(f"granularity {activations.granularity!r} differs from the structure this model was "
                                 f"built with ({self.granularity!r}): apply() again")
            self.a_bits[...] = jnp.float32(activations.bits)
            self.hold_out[...] = jnp.bool_(activations.hold_out)

    def weight(self) -> jax.Array:
        """The kernel [in, out] the forward multiplies by: smoothed (kernel * s[:, None]), fake-quantized, the
        super weights restored."""
        if self.materialized:
            return self.kernel[...].astype(self.dtype)
        w = self.kernel[...].astype(jnp.float32)
        if self.smooth is not None:
            w = w * self.smooth[...][:, None]
        if not self.quantize_weight:
            return w.astype(self.dtype)
        block = self.w_block[...] if self.traced_block else self.static_block
        exclude = None
        if self.restore_at is not None:
            rows, cols = self.restore_at[...][:, 0], self.restore_at[...][:, 1]
            exclude = jnp.zeros(w.shape, bool).at[rows, cols].set(self.hold_out_weights[...])
        q = rtn.fake_quant_weight(w, bits=self.w_bits[...], block=block, symmetric=self.symmetric, clip=self.clip,
                                  clip_k=self.clip_k[...], clip_scale=self.clip_scale[...],
                                  traced_block=self.traced_block, exclude=exclude)
        if self.restore_at is not None:
            q = q.at[rows, cols].set(jnp.where(self.restore_on[...], w[rows, cols], q[rows, cols]))
        return q.astype(self.dtype)

    def __call__(self, x: jax.Array, column_mask: masks.RowMask | None = None) -> jax.Array:
        """x [..., in] divided by the smoothing factors and fake-quantized, then the Linear on the quantized weight."""
        if self.smooth is not None:
            x = (x.astype(jnp.float32) / self.smooth[...]).astype(self.dtype)
        if self.quantize_input:
            x = rtn.fake_quant_activation(x, bits=self.a_bits[...], granularity=self.granularity,
                                          hold_out=self.hold_out[...]).astype(self.dtype)
        return super().__call__(x, column_mask)


def quantizable(model: nnx.Module) -> dict[Key, Linear]:
    """Every Linear of the decoder layers, keyed (layer, path); refuses mixture-of-experts models.

    Args:
      model: an mwjax causal LM with unstacked decoder layers (a scanned `LayerStack` is refused:
        `mwjax.nn.stack.unstack_layers` first).

    Returns:
      {(layer, path inside it, e.g. "mlp.down_proj"): Linear} (`prune.linears` of each decoder layer).
    """
    if model.config.num_local_experts is not None:
        raise ValueError("quantization wraps each dense Linear; this model routes tokens between experts, whose "
                         "weights run through a grouped matmul")
    if isinstance(model.model.layers, LayerStack):
        raise ValueError("the decoder layers are stacked for a scan: quantize mwjax.nn.stack.unstack_layers(model)")
    return {(i, name): lin for i, layer in enumerate(model.model.layers) for name, lin in prune.linears(layer).items()}


def replace_linears(model: nnx.Module, make: Callable[[Key, Linear], nnx.Module]) -> nnx.Module:
    """A copy of `model` (arrays shared) with each decoder-layer Linear replaced by `make((layer, path), linear)`.

    Args:
      model: the model, as `quantizable` takes it; untouched.
      make: ((layer, path), Linear of the copy) -> the module put in that Linear's place.

    Returns:
      The copy (`attacks.copy`) with the replacements made.
    """
    keys = list(quantizable(model))
    out = attacks.copy(model)
    for i, name in keys:
        layer = out.model.layers[i]
        paths.replace(layer, name, make((i, name), paths.get(layer, name)))
    return out


def restore_coordinates(super_weights: Sequence[SuperWeight]) -> dict[Key, np.ndarray]:
    """The kernel coordinates of the super weights, per down_proj (HF weight[row, col] is kernel[col, row]).

    Args:
      super_weights: the super weights (`massive.find_super_weights`).

    Returns:
      {(layer, "mlp.down_proj"): int32 [k, 2] kernel coordinates (col, row) of that layer's k super weights}.
    """
    out: dict[Key, list] = {}
    for sw in super_weights:
        out.setdefault((sw.layer, "mlp.down_proj"), []).append((sw.col, sw.row))
    return {key: np.asarray(coords, np.int32) for key, coords in out.items()}


def apply(model: nnx.Module, weights: WeightQuant | None = None, activations: ActivationQuant | None = None, *,
          super_weights: Sequence[SuperWeight] = (), smoothing: Mapping[Key, jax.Array] | None = None,
          traced_block: bool = False) -> nnx.Module:
    """A copy of `model` whose decoder-layer Linears fake-quantize (module doc); `model` is untouched and its
    arrays are shared.

    Args:
      model: the float model (as `quantizable` takes it).
      weights: the weight quantizer (None: weights stay float).
      activations: the quantizer of every Linear's input (None: weight-only).
      super_weights: restored in full precision after quantization (The Super Weight's "restore").
      smoothing: SmoothQuant's factors {(layer, path): s [in]} (`smoothquant.factors`); None: no smoothing.
      traced_block: the block size is traced (a block-size sweep in one program) rather than compiled in.

    Returns:
      The quantized model (QuantizedLinear in place of each Linear).
    """
    mods = quantizable(model)
    restore = restore_coordinates(super_weights)
    smoothing = dict(smoothing or {})
    if unknown := sorted(set(restore) - set(mods)) + sorted(set(smoothing) - set(mods)):
        raise ValueError(f"super weights / smoothing factors for {unknown[:3]} name no Linear of the decoder layers")
    for key, smooth in smoothing.items():
        if tuple(np.shape(smooth)) != (mods[key].in_features,):
            raise ValueError(f"smoothing factors for {key} have shape {np.shape(smooth)}, not "
                             f"({mods[key].in_features},)")
    return replace_linears(model, lambda key, lin: QuantizedLinear(
        lin, weights, activations, traced_block=traced_block, restore_at=restore.get(key), smooth=smoothing.get(key)))


def quantized_linears(model: nnx.Module) -> dict[Key, QuantizedLinear]:
    """The QuantizedLinears of a model made by `apply`, keyed (layer, path).

    Args:
      model: a model made by `apply` (or `update` / `materialize`); ValueError when it holds no QuantizedLinear.

    Returns:
      {(layer, path inside it): QuantizedLinear}.
    """
    out = {}
    for i, layer in enumerate(model.model.layers):
        for path, node in nnx.iter_graph(layer):
            if isinstance(node, QuantizedLinear):
                out[(i, paths.dotted(path))] = node
    if not out:
        raise ValueError("the model holds no QuantizedLinear: make it with mwjax.research.quantize.apply")
    return out


def update(model: nnx.Module, weights: WeightQuant | None = None, activations: ActivationQuant | None = None, *,
           restore: bool | None = None, hold_out: bool | None = None, smoothing: Mapping[Key, jax.Array] | None = None
           ) -> nnx.Module:
    """A copy of a quantized model with other settings of the same structure (one compiled program for all).

    Args:
      model: a quantized model (`apply`); untouched.
      weights: the new weight spec (its static parts as the model was built; None where it has none).
      activations: the new activation spec (likewise).
      restore: turn the super weights' restore on / off (None: as it is).
      hold_out: keep the super weights out of their blocks' range before quantizing (then restored: needs
        restore on), as Table 3 holds the super activation out (None: as it is).
      smoothing: new factors {(layer, path): s [in]} for the Linears that smooth (e.g. ones: no smoothing, same
        program); None: as they are.

    Returns:
      The updated copy.
    """
    out = nnx.clone(model)
    for key, lin in quantized_linears(out).items():
        lin.set(weights, activations)
        if lin.restore_at is not None:
            if restore is not None:
                lin.restore_on[...] = jnp.bool_(restore)
            if hold_out is not None:
                lin.hold_out_weights[...] = jnp.bool_(hold_out)
            if bool(lin.hold_out_weights[...]) and not bool(lin.restore_on[...]):
                raise ValueError("super weights held out of the range must be restored (restore=True)")
        if smoothing is not None and lin.smooth is not None:
            if key not in smoothing:
                raise ValueError(f"no smoothing factors for {key}, which this model smooths")
            lin.smooth[...] = jnp.asarray(smoothing[key], jnp.float32)
    return out


@jit_model
def dequantized_kernels(model: nnx.Module) -> dict[Key, jax.Array]:
    """The kernel each QuantizedLinear multiplies by, in one compiled program per structure (the settings traced).

    Args:
      model: a quantized model (`apply` / `update`).

    Returns:
      {(layer, path): the kernel [in, out] of `QuantizedLinear.weight`, in the compute dtype}.
    """
    return {key: lin.weight() for key, lin in quantized_linears(model).items()}


def materialize(model: nnx.Module) -> nnx.Module:
    """A copy of a quantized model whose QuantizedLinears hold their dequantized kernels.

    The kernels are computed once (`dequantized_kernels`) instead of quantizing the weights in every forward pass:
    for evaluations of many forward passes (zero-shot tasks, many perplexity batches). Inputs are still smoothed and
    quantized in the forward pass. Costs a float copy of the decoder layers' weights.

    Args:
      model: a quantized model (`apply` / `update`); it and the float model stay as they were.

    Returns:
      The materialized copy (its settings can no longer be changed by `update`).
    """
    kernels = dequantized_kernels(model)
    out = nnx.clone(model)
    for key, lin in quantized_linears(out).items():
        lin.kernel = param(kernels[key], lin.axes)
        lin.materialized = True
    return out
