"""Sweeps over quantization settings as one compiled program (as `attacks.k_sweep` does for top-k attacks).

A `Point` is one setting: the weight and activation specs, whether the super weights are restored and whether
SmoothQuant's factors apply. `run` builds ONE quantized model (`linear.apply`, the block size traced when the
points' block sizes differ) and moves it from point to point with `linear.update`: bits, block sizes, clipping
thresholds (inf: off), restore on / off, hold-out on / off and smoothing on / off are all traced, so every point
runs the program compiled for the first. The points must share the static choices (symmetric or not, clipping
method, activation granularity, weight / activation quantization present).

    The Super Weight, Table 3: `table3_points` (naive W8A8, SmoothQuant, the super activation held out)
    The Super Weight, Figure 7: `block_sweep` (round-to-nearest vs clipped + super weights restored, per block size)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mwjax.research.defaults import CLIPPED, CURVES, HANDLED, HELD_OUT, ROUND_TO_NEAREST  # noqa: F401 (Figure 7's)
from mwjax.research.massive import SuperWeight
from mwjax.research.quantize import linear, rtn
from mwjax.research.quantize.linear import ActivationQuant, WeightQuant


@dataclasses.dataclass(frozen=True)
class Point:
    """One setting of a sweep.

    Args:
      weights: the weight spec; None: weights not quantized.
      activations: the activation spec; None: inputs not quantized.
      restore: restore the super weights in full precision after quantization.
      hold_out: keep the super weights out of their blocks' range (needs restore).
      smooth: apply SmoothQuant's factors (else factors of one, in the same program).
    """

    weights: WeightQuant | None = None
    activations: ActivationQuant | None = None
    restore: bool = False
    hold_out: bool = False  # the super weights kept out of their blocks' range (restored)
    smooth: bool = False


def _static(point: Point) -> tuple:
    w, a = point.weights, point.activations
    return (None if w is None else (w.symmetric, w.clip), None if a is None else a.granularity)


def models(model: nnx.Module, points: Sequence[Point], *, super_weights: Sequence[SuperWeight] = (),
           smoothing: Mapping | None = None):
    """Yield the quantized model of each point, all of one structure (module doc).

    Args:
      model: the float model; untouched.
      points: the settings, sharing their static choices (ValueError otherwise).
      super_weights: the super weights to restore, needed when a point restores.
      smoothing: SmoothQuant's factors {(layer, path): s [in]} (`smoothquant.factors`), needed when a point
        smooths; a point that does not gets factors of one.

    Yields:
      The quantized model of each point in turn (`linear.update` of one `linear.apply`).
    """
    if not points:
        return
    if len({_static(p) for p in points}) > 1:
        raise ValueError("the points differ in their static choices (symmetric, clipping method, granularity, "
                         "which quantizers): sweep each structure on its own")
    if any(p.smooth for p in points) and smoothing is None:
        raise ValueError("a point smooths but no smoothing factors were given")
    if any(p.restore for p in points) and not super_weights:
        raise ValueError("a point restores the super weights but none were given")
    blocks = {p.weights.block for p in points if p.weights is not None}
    ones = None if smoothing is None else {k: jnp.ones_like(v) for k, v in smoothing.items()}
    first = points[0]
    base = linear.apply(model, first.weights, first.activations, super_weights=super_weights, smoothing=smoothing,
                        traced_block=len(blocks) > 1)
    for point in points:
        yield linear.update(base, point.weights, point.activations, restore=point.restore, hold_out=point.hold_out,
                            smoothing=None if smoothing is None else (smoothing if point.smooth else ones))


def run(model: nnx.Module, points: Sequence[Point], measure: Callable[[nnx.Module], float], *,
        super_weights: Sequence[SuperWeight] = (), smoothing: Mapping | None = None,
        on_point: Callable[[Point, float], None] | None = None) -> list[float]:
    """`measure(quantized model)` at every point, one compiled program for all (`models`).

    Args:
      model: the float model; untouched.
      points: the settings (as `models` takes them).
      measure: quantized model -> a number (e.g. perplexity).
      super_weights: the super weights to restore (`models`).
      smoothing: SmoothQuant's factors (`models`).
      on_point: called as on_point(point, value) after each point; None: not called.

    Returns:
      The measure at each point, in order.
    """
    values = []
    for point, quantized in zip(points, models(model, points, super_weights=super_weights, smoothing=smoothing),
                                strict=True):
        values.append(measure(quantized))
        if on_point is not None:
            on_point(point, values[-1])
    return values


NAIVE, SMOOTHQUANT, SUPER_ACTIVATION = "naive W8A8", "SmoothQuant", "W8A8, super activation held out"


def table3_points(w_bits: int = 8, a_bits: int = 8, weight_block: int | str = "tensor",
                  granularity: str = "tensor") -> dict[str, Point]:
    """The Super Weight's Table 3 as points of one structure.

    Args:
      w_bits: the weights' bits (W8).
      a_bits: the activations' bits (A8).
      weight_block: the weights' scale: "tensor", "channel" or a block size.
      granularity: the activations' scale: "tensor" (one per sequence) or "token".

    Returns:
      {NAIVE: symmetric round-to-nearest of the weights and of every Linear's input, SMOOTHQUANT: the same after
      smoothing, SUPER_ACTIVATION: naive with the super activation held out of each input tensor's scale and
      restored (no calibration data)}.
    """
    w = WeightQuant(bits=w_bits, block=weight_block, symmetric=True)
    a = ActivationQuant(bits=a_bits, granularity=granularity)
    return {NAIVE: Point(w, a), SMOOTHQUANT: Point(w, a, smooth=True),
            SUPER_ACTIVATION: Point(w, dataclasses.replace(a, hold_out=True))}


def share_of_gain(naive: float, smoothquant: float, ours: float) -> float | None:
    """Table 3's parenthesised percentage: how much of SmoothQuant's improvement over naive W8A8 a method keeps.

    Args:
      naive: naive W8A8's perplexity.
      smoothquant: SmoothQuant's perplexity.
      ours: the method's perplexity.

    Returns:
      100 * (naive - ours) / (naive - smoothquant); None when SmoothQuant improves nothing.
    """
    gain = naive - smoothquant
    return None if not gain > 0 else 100.0 * (naive - ours) / gain


def block_sweep_points(blocks: Sequence[int | str], *, bits: int = 4, clip: str = "zscore",
                       clip_threshold: float = 9.0, curves: Sequence[str] = (ROUND_TO_NEAREST, HELD_OUT, HANDLED)
                       ) -> dict[str, list[Point]]:
    """The Super Weight's Figure 7 as points: weight-only asymmetric round-to-nearest per block of `blocks`.

    ROUND_TO_NEAREST  the reference's `minmax_<bits>_<block>`: nothing handled
    HELD_OUT          only the super weights handled: kept out of their blocks' range and restored (the caption's
                      "just handling the single scalar-valued super weight"; Table 3's handling, for weights)
    HANDLED           the reference's `clip_<bits>_<block>_<method>_<threshold>` with restore_and_scale_GO=1.0:
                      every weight clipped by `clip` at `clip_threshold`, then the super weights restored
    CLIPPED           the clipping alone (the restore's share)
    All curves are one structure (round-to-nearest clips at an infinite threshold).

    Args:
      blocks: the block sizes (ints, "channel" or "tensor"); each curve has a point at each.
      bits: the weights' bits (the reference's INT4).
      clip: the clipping method of HANDLED and CLIPPED (`rtn.CLIP_METHODS`).
      clip_threshold: its threshold (the reference's z-score 9).
      curves: which of the curves above (ValueError for another name).

    Returns:
      {curve: [Point per block of `blocks`]}, in the order of `curves`.
    """
    spec = lambda block, threshold: WeightQuant(bits=bits, block=block, symmetric=False, clip=clip,
                                                clip_threshold=threshold)
    settings = {ROUND_TO_NEAREST: (math.inf, False, False), HELD_OUT: (math.inf, True, True),
                HANDLED: (clip_threshold, True, False), CLIPPED: (clip_threshold, False, False)}
    unknown = [c for c in curves if c not in settings]
    if unknown:
        raise ValueError(f"unknown curves {unknown}; choose from {list(settings)}")
    return {c: [Point(spec(b, settings[c][0]), restore=settings[c][1], hold_out=settings[c][2]) for b in blocks]
            for c in curves}


def block_sweep(model: nnx.Module, blocks: Sequence[int | str], measure: Callable[[nnx.Module], float], *,
                super_weights: Sequence[SuperWeight], bits: int = 4, clip: str = "zscore", clip_threshold: float = 9.0,
                curves: Sequence[str] = (ROUND_TO_NEAREST, HELD_OUT, HANDLED),
                on_point: Callable[[str, int | str, float], None] | None = None) -> dict[str, list[float]]:
    """The Super Weight, Figure 7: the measure at each block size per curve, every point one compiled program.

    Args:
      model: the float model; untouched.
      blocks: the block sizes (`block_sweep_points`).
      measure: quantized model -> a number (perplexity, zero-shot accuracy).
      super_weights: the super weights the handled curves restore.
      bits: the weights' bits.
      clip: the clipping method of the clipped curves.
      clip_threshold: its threshold.
      curves: the curves (`block_sweep_points`).
      on_point: called as on_point(curve, block, value) after each point; None: not called.

    Returns:
      {curve: [measure at each block of `blocks`]}.
    """
    per_curve = block_sweep_points(blocks, bits=bits, clip=clip, clip_threshold=clip_threshold, curves=curves)
    flat = [(c, b, p) for c, ps in per_curve.items() for b, p in zip(blocks, ps, strict=True)]
    out: dict[str, list[float]] = {c: [] for c in per_curve}
    labels = iter(flat)

    def record(point: Point, value: float) -> None:
        curve, block, _ = next(labels)
        out[curve].append(value)
        if on_point is not None:
            on_point(curve, block, value)

    run(model, [p for _, _, p in flat], measure, super_weights=super_weights, on_point=record)
    return out


def bits_sweep(model: nnx.Module, bits: Sequence[int], measure: Callable[[nnx.Module], float], *,
               weights: WeightQuant | None = None, activations: ActivationQuant | None = None,
               super_weights: Sequence[SuperWeight] = (), restore: bool = False) -> list[float]:
    """`measure` at each bit width (of the weights and, when given, the activations too): one compiled program.

    Args:
      model: the float model; untouched.
      bits: the bit widths.
      measure: quantized model -> a number.
      weights: the weight spec whose bits are swept; None: weights not quantized.
      activations: the activation spec whose bits are swept too; None: inputs not quantized.
      super_weights: the super weights to restore.
      restore: restore them at every point.

    Returns:
      The measure at each bit width, in order.
    """
    points = [Point(None if weights is None else dataclasses.replace(weights, bits=b),
                    None if activations is None else dataclasses.replace(activations, bits=b), restore=restore)
              for b in bits]
    return run(model, points, measure, super_weights=super_weights)


def whole_tensor_fallbacks(model: nnx.Module, blocks: Sequence[int | str]) -> dict[str, int]:
    """How many of the quantized tensors each block size does not divide: the reference quantizes those whole.

    Args:
      model: the float model (as `linear.quantizable` takes it).
      blocks: the block sizes (ints, "channel" or "tensor").

    Returns:
      {str(block): the number of decoder-layer Linears whose size the int block does not divide}.
    """
    shapes = [tuple(lin.kernel[...].shape) for lin in linear.quantizable(model).values()]
    return {str(b): sum(rtn.effective_block(s, b)[1] for s in shapes) for b in blocks}


def super_weight_ratios(model: nnx.Module, super_weights: Sequence[SuperWeight]) -> dict[str, float]:
    """Each super weight's |w| against the largest |w| of the other weights of its down_proj.

    Above 1 the super weight alone sets its tensor's quantization range (Llama-7B's does); below 1 another weight
    is larger, and holding the super weight out of the range changes nothing at the tensor's scale.

    Args:
      model: the float model (as `linear.quantizable` takes it).
      super_weights: the super weights (`massive.find_super_weights`).

    Returns:
      {super weight's label (`SuperWeight.label`): the ratio}.
    """
    out = {}
    for sw in super_weights:
        kernel = np.abs(np.asarray(linear.quantizable(model)[(sw.layer, "mlp.down_proj")].kernel[...], np.float64))
        value = kernel[sw.col, sw.row]
        kernel[sw.col, sw.row] = 0.0
        out[sw.label] = float(value / kernel.max())
    return out
