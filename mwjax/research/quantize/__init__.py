"""Functional fake quantization around super weights and super activations (The Super Weight, Table 3 and
Figure 7), with SmoothQuant as the calibrated baseline.

    from mwjax import quantize
    q = quantize.apply(model, quantize.WeightQuant(bits=8), quantize.ActivationQuant(bits=8, hold_out=True))
    q = quantize.apply(model, quantize.WeightQuant(4, block=128, symmetric=False, clip="zscore", clip_threshold=9),
                       super_weights=sws)

Modules, one job each:
    rtn          round-to-nearest of one tensor (the reference's blocks, clipping methods; activations)
    linear       QuantizedLinear and `apply` / `update`: a quantized model sharing the float model's arrays
    smoothquant  SmoothQuant's calibration statistic and smoothing factors
    sweep        block-size / bit-width sweeps as one compiled program
"""

from mwjax.research.quantize import rtn, smoothquant, sweep
from mwjax.research.quantize.linear import (
    ActivationQuant,
    QuantizedLinear,
    QuantSetting,
    WeightQuant,
    apply,
    dequantized_kernels,
    materialize,
    quantizable,
    quantized_linears,
    update,
)

__all__ = ["ActivationQuant", "QuantSetting", "QuantizedLinear", "WeightQuant", "apply", "dequantized_kernels",
           "materialize", "quantizable", "quantized_linears", "rtn", "smoothquant", "sweep", "update"]
