"""SmoothQuant (Xiao et al.), the calibrated baseline of The Super Weight's Table 3: per-channel smoothing factors
from calibration activations, folded into the quantized Linears (`mwjax.research.quantize.linear`).

    act_max = input_max(model, calibration)          # max |X_j| per input channel of every decoder Linear
    s = factors(model, act_max, alpha=0.5)           # {(layer, path): s [in]}
    q = quantize.apply(model, WeightQuant(8), ActivationQuant(8), smoothing=s)

As the SmoothQuant repository (smoothquant/calibration.py `get_act_scales`, smooth.py `smooth_lm`):
the statistic is the largest |x| per input channel over every calibration token (a forward hook on every
nn.Linear); a norm and the Linears it feeds share one factor per channel,

    s_j = max(|X_j|)^alpha / max_i(|W_ij|)^(1 - alpha),  clamped at 1e-5,

where max_i |W_ij| is over the output rows of all the Linears fed (q/k/v_proj after `input_layernorm`,
gate/up_proj after the FFN's norm) and each weight max is clamped at 1e-5 first. The repository divides the
norm's weight by s and multiplies the Linears' input columns (PyTorch layout) by s; here the quantized Linear
divides its input by s and multiplies its kernel's input rows by s (the same product, computed in place).
o_proj and down_proj, which no norm precedes, are not smoothed (as the repository does for Llama-like models).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mwjax.core.compiled import jit_model
from mwjax.core.progress import track
from mwjax.nn.layers import Linear
from mwjax.research.defaults import SMOOTHQUANT_ALPHA
from mwjax.research.quantize import linear

Key = linear.Key
# the Linears that read one norm's output, so share its factors (the repository's smooth_lm for Llama-like models)
GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))
DEFAULT_ALPHA = SMOOTHQUANT_ALPHA


class LinearInputMax(nnx.Intermediate):
    """max |x_j| over all tokens of a Linear's input, per input feature j [in] (SmoothQuant's act_scales)."""


class _MaxRecorder(Linear):
    """A Linear that records its input's per-channel max |x| (SmoothQuant's `stat_input_hook`), then computes as
    the Linear it wraps (same Variables)."""

    def __init__(self, base: Linear):
        self.in_features, self.out_features, self.dtype = base.in_features, base.out_features, base.dtype
        self.kernel, self.bias = base.kernel, base.bias

    def __call__(self, x: jax.Array, column_mask=None) -> jax.Array:
        mag = jnp.abs(x.astype(jnp.float32))
        self.sow(LinearInputMax, "input_max", jnp.max(mag, axis=tuple(range(x.ndim - 1))))
        return super().__call__(x, column_mask)


@jit_model
def _record(model, tokens):
    _, state = nnx.capture(model, LinearInputMax)(tokens)
    out = {}
    for path, value in nnx.to_flat_state(state):
        sown = value.get_value() if hasattr(value, "get_value") else value.value
        out[path[:-1]] = jnp.max(jnp.stack(sown), axis=0)  # a Linear called twice: the max of both calls
    return out


def input_max(model: nnx.Module, calibration, batch_size: int = 8, progress: bool = True) -> dict[Key, np.ndarray]:
    """The largest |x_j| per input channel of every decoder-layer Linear over the calibration tokens.

    SmoothQuant's `get_act_scales` (a forward hook on every nn.Linear).

    Args:
      model: the float model (as `linear.quantizable` takes it); untouched.
      calibration: int token ids [num_sequences, seq] (SmoothQuant: 512 sequences of 512 tokens of the Pile's
        validation set).
      batch_size: sequences per forward pass.
      progress: show a progress bar.

    Returns:
      {(layer, path): float32 max |x_j| [in]}, the max over every token of `calibration`.
    """
    tokens = np.asarray(calibration, np.int32)
    if tokens.ndim != 2:
        raise ValueError(f"calibration must be tokens [num_sequences, seq], got shape {tokens.shape}")
    split = nnx.split(linear.replace_linears(model, lambda key, lin: _MaxRecorder(lin)))
    result: dict[Key, np.ndarray] = {}
    starts = range(0, len(tokens), batch_size)
    for start in track(starts, len(starts), f"SmoothQuant calibration ({len(tokens)}x{tokens.shape[1]} tokens)",
                       enabled=progress):
        batch = tokens[start:start + batch_size]
        for path, value in _record.on_state(*split, jnp.asarray(batch)).items():
            i = int(path[path.index("layers") + 1])
            key = (i, ".".join(str(p) for p in path[path.index("layers") + 2:]))
            value = np.asarray(value, np.float32)
            result[key] = value if key not in result else np.maximum(result[key], value)
    return result


def factors(model: nnx.Module, act_max: Mapping[Key, np.ndarray], alpha: float = DEFAULT_ALPHA
            ) -> dict[Key, jax.Array]:
    """SmoothQuant's factors s [in] (module doc) for every Linear of GROUPS, from `input_max`'s statistics.

    Args:
      model: the float model whose weights give max_i |W_ij| (as `linear.quantizable` takes it).
      act_max: {(layer, path): max |X_j| [in]} (the first Linear of each group is read: they share an input).
      alpha: the migration strength (SmoothQuant's alpha, in [0, 1]; 0.5 default).

    Returns:
      {(layer, path): s [in]} (float32), the same array for the Linears of one group.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    mods = linear.quantizable(model)
    out: dict[Key, jax.Array] = {}
    for i in range(model.config.num_hidden_layers):
        for group in GROUPS:
            names = [n for n in group if (i, n) in mods]
            if not names:
                continue
            if (i, names[0]) not in act_max:
                raise ValueError(f"no calibration statistic for {(i, names[0])}")
            act = jnp.asarray(act_max[(i, names[0])], jnp.float32)
            weight_max = jnp.stack([jnp.maximum(jnp.max(jnp.abs(mods[(i, n)].kernel[...].astype(jnp.float32)), axis=1),
                                                1e-5) for n in names]).max(0)  # [in]
            s = jnp.maximum(act ** alpha / weight_max ** (1 - alpha), 1e-5)
            out.update({(i, n): s for n in names})
    return out
