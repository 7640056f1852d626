"""mwjax.quantize against independent numpy implementations of the reference formulas (LLMSuperWeight's
`quantize_blockwise` and its restore, SmoothQuant's fake_quant and smooth_lm), written here from the formulas;
the quantized model against the float model with the dequantized weights substituted; sweeps as one program."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_reference import assert_logits_close, random_tokens

from mwjax import converters, probes, quantize
from mwjax.core.compiled import jit_model
from mwjax.research.massive import SuperWeight
from mwjax.research.quantize import ActivationQuant, WeightQuant, rtn, smoothquant, sweep

TOKENS = random_tokens(48, batch=2, seed=3)
CLIP_THRESHOLDS = {"none": math.inf, "zscore": 2.5, "block_percentage": 0.05, "tensor_percentage": 0.01, "iqr": 1.5}


# ------------------------------------------------------------------------------- numpy references of the formulas


def reference_blockwise(weight: np.ndarray, bits: int, blocksize: int, clip: str, threshold: float):
    """The reference's `quantize_blockwise` on a PyTorch weight [out, in], in float64: (dequantized weight,
    the pre-rounding values (w - min) * scale, the step 1 / scale), each [out, in]."""
    w = np.asarray(weight, np.float64)
    n = w.size
    if n % blocksize == 0:
        w = w.reshape(-1, blocksize)
        a = np.abs(w)
        if clip == "block_percentage":
            t = np.sort(a, axis=1)[:, -max(int(blocksize * threshold + 1), 1)][:, None]
        elif clip == "tensor_percentage":
            t = np.sort(a.ravel())[-max(int(n * threshold), 1)]
        elif clip == "zscore":
            t = threshold * a.std(axis=1, ddof=1, keepdims=True) + a.mean(axis=1, keepdims=True)
        elif clip == "iqr":
            q1, q3 = np.quantile(a, 0.25, axis=1, keepdims=True), np.quantile(a, 0.75, axis=1, keepdims=True)
            t = q3 + threshold * (q3 - q1)
        else:
            t = np.inf
        w = np.clip(w, -t, t)
        lo, hi = w.min(axis=1, keepdims=True), w.max(axis=1, keepdims=True)
    else:  # the reference's fallback: the whole tensor, block percentage read as a tensor percentage
        w = w.reshape(1, -1)
        a = np.abs(w)
        if clip in ("block_percentage", "tensor_percentage"):
            t = np.sort(a.ravel())[-max(int(n * threshold), 1)]
        elif clip == "zscore":
            t = threshold * a.std(ddof=1) + a.mean()
        elif clip == "iqr":
            q1, q3 = np.quantile(a, 0.25), np.quantile(a, 0.75)
            t = q3 + threshold * (q3 - q1)
        else:
            t = np.inf
        w = np.clip(w, -t, t)
        lo, hi = w.min(), w.max()
    scale = (2 ** bits - 1) / (hi - lo)
    pre = (w - lo) * scale
    deq = np.round(pre) / scale + lo
    step = np.broadcast_to(1 / scale, w.shape)
    return deq.reshape(weight.shape), pre.reshape(weight.shape), step.reshape(weight.shape)


def reference_absmax(weight: np.ndarray, bits: int, blocksize: int):
    """SmoothQuant's `quantize_weight_per_tensor_absmax` applied per block of the flattened PyTorch weight."""
    w = np.asarray(weight, np.float64).reshape(-1, blocksize)
    s = np.maximum(np.abs(w).max(axis=1, keepdims=True), 1e-5) / (2 ** (bits - 1) - 1)
    pre = w / s
    return (np.round(pre) * s).reshape(weight.shape), pre.reshape(weight.shape), \
        np.broadcast_to(s, w.shape).reshape(weight.shape)


def reference_activation(x: np.ndarray, bits: int, per_token: bool, hold_out: bool) -> np.ndarray:
    """SmoothQuant's absmax fake quant of x [b, t, in] per sequence or per token; with hold_out, The Super Weight's
    REPLACE (the largest |x| by the median) -> quantize -> RESTORE."""
    x = np.asarray(x, np.float64)
    groups = x.reshape(-1, x.shape[-1]) if per_token else x.reshape(x.shape[0], -1)
    out = np.empty_like(groups)
    for g, row in enumerate(groups):
        replaced = row.copy()
        top = int(np.argmax(np.abs(row)))
        if hold_out:
            replaced[top] = np.median(row)
        s = max(np.abs(replaced).max(), 1e-5) / (2 ** (bits - 1) - 1)
        out[g] = np.round(replaced / s) * s
        if hold_out:
            out[g, top] = row[top]
    return out.reshape(x.shape)


def assert_rounding_equal(got, ref, pre, step, what: str):
    """got == ref up to float32 noise, except where the reference's value before rounding sits within 1e-3 of a
    tie (x.5), where float32 and float64 may round apart: there the two differ by at most one step."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    tol = 1e-5 * np.abs(ref).max()
    tie = np.abs(pre - np.floor(pre) - 0.5) < 1e-3
    assert tie.mean() < 0.01, f"{what}: too many near-ties ({tie.mean():.2%}) for the test to mean anything"
    np.testing.assert_allclose(got[~tie], ref[~tie], rtol=0, atol=tol, err_msg=what)
    assert np.all(np.abs(got - ref)[tie] <= step[tie] + tol), what


def weight_with_outliers(shape=(24, 40), seed=0) -> np.ndarray:
    """A PyTorch weight [out, in] with heavy tails and one planted super weight."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(df=4, size=shape).astype(np.float32) * 0.02
    w[5, 3] = 1.5
    return w


def ours(weight: np.ndarray, bits: int, block, clip: str, threshold: float, symmetric=False, traced=False):
    """mwjax's fake quantization of the same weight given as a Flax kernel (weight.T), back in PyTorch layout."""
    kernel = jnp.asarray(weight.T)
    size, whole = rtn.effective_block(kernel.shape, block)
    settings = dict(symmetric=symmetric, clip=clip, clip_scale=threshold if clip in ("zscore", "iqr") else math.inf,
                    clip_k=rtn.clip_count(clip, threshold, size, weight.size, whole))
    if traced:
        fn = jax.jit(lambda k, b, bits: rtn.fake_quant_weight(k, bits=bits, block=b, traced_block=True, **settings))
        out = fn(kernel, jnp.int32(size), jnp.float32(bits))
    else:
        out = rtn.fake_quant_weight(kernel, bits=bits, block=size, **settings)
    return np.asarray(out).T


# ------------------------------------------------------------------------------- one tensor


@pytest.mark.parametrize("traced", [False, True], ids=["static_block", "traced_block"])
@pytest.mark.parametrize("clip", list(CLIP_THRESHOLDS))
@pytest.mark.parametrize("block", [8, 40, 120, 7, "channel", "tensor"])
def test_blockwise_matches_the_reference_formulas(block, clip, traced):
    """Blocks within a row (8 of 40 inputs), one row (40, "channel"), across rows (120 = 3 rows), a size that does
    not divide the tensor (7: the reference's whole-tensor fallback) and the tensor; every clipping method."""
    weight = weight_with_outliers()
    size = {"channel": 40, "tensor": weight.size}.get(block, block)
    ref, pre, step = reference_blockwise(weight, 4, size, clip, CLIP_THRESHOLDS[clip])
    got = ours(weight, 4, block, clip, CLIP_THRESHOLDS[clip], traced=traced)
    assert_rounding_equal(got, ref, pre, step, f"block {block}, clip {clip}")
    if clip != "none" and block == "tensor":  # the planted outlier is clipped (the restore is tested below)
        assert abs(got[5, 3]) < 0.5


def test_the_block_layout_is_the_flattened_pytorch_weight():
    """A block of 8 is 8 consecutive inputs of one output row (a kernel column), not 8 outputs of one input."""
    weight = np.zeros((4, 16), np.float32)
    weight[0, :8] = np.linspace(-1, 1, 8)  # block 0: one output row's first 8 inputs, range [-1, 1]
    weight[1, :8] = np.linspace(0, 0.01, 8)  # block 2: a narrow range, exact at 4 bits only if not mixed with block 0
    got = ours(weight, 4, 8, "none", math.inf)
    with np.errstate(divide="ignore", invalid="ignore"):  # the all-zero blocks: the reference divides by 0 there
        ref = reference_blockwise(weight, 4, 8, "none", math.inf)[0]
    np.testing.assert_allclose(got[1, :8], ref[1, :8], atol=1e-8)
    assert np.all(got[2:] == 0)  # constant blocks stay as they are
    assert np.abs(got[1, :8] - weight[1, :8]).max() < 0.01 / 15 / 2 + 1e-8


@pytest.mark.parametrize("block", [8, "channel", "tensor"])
def test_symmetric_absmax_matches_smoothquant(block):
    weight = weight_with_outliers(seed=1)
    size = {"channel": 40, "tensor": weight.size}.get(block, block)
    ref, pre, step = reference_absmax(weight, 8, size)
    assert_rounding_equal(ours(weight, 8, block, "none", math.inf, symmetric=True), ref, pre, step, f"absmax {block}")


def test_bits_and_block_are_traced_in_one_program():
    weight = weight_with_outliers(seed=2)
    fn = jax.jit(lambda k, b, bits: rtn.fake_quant_weight(k, bits=bits, block=b, symmetric=False, traced_block=True))
    for bits, block in ((3, 8), (4, 120), (8, 960)):
        ref, pre, step = reference_blockwise(weight, bits, block, "none", math.inf)
        got = np.asarray(fn(jnp.asarray(weight.T), jnp.int32(block), jnp.float32(bits))).T
        assert_rounding_equal(got, ref, pre, step, f"{bits} bits, block {block}")
    assert fn._cache_size() == 1


@pytest.mark.parametrize("per_token", [False, True], ids=["per_tensor", "per_token"])
@pytest.mark.parametrize("hold_out", [False, True])
def test_activation_quantization_and_super_activation_hold_out(per_token, hold_out):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 6, 32)).astype(np.float32)
    x[0, 0, 7] = 300.0  # a super activation in sequence 0 (and in its token 0)
    x[1, 4, 2] = -250.0
    ref = reference_activation(x, 8, per_token, hold_out)
    got = np.asarray(rtn.fake_quant_activation(jnp.asarray(x), bits=8, granularity="token" if per_token else "tensor",
                                               hold_out=hold_out))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    if hold_out:
        assert got[0, 0, 7] == 300.0 and got[1, 4, 2] == -250.0  # restored exactly
        if not per_token:  # the other values keep their resolution: a step of (their max) / 127, not 300 / 127
            assert np.abs(got[0] - x[0]).max() < np.abs(np.delete(x[0].ravel(), 7)).max() / 127


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown clipping method"):
        rtn.check_clip("sigma", 3.0)
    with pytest.raises(ValueError, match="must lie in \\(0, 1\\)"):
        rtn.check_clip("block_percentage", 5.0)
    with pytest.raises(ValueError, match="bits must lie in"):
        WeightQuant(bits=1).check()
    with pytest.raises(ValueError, match="block must be"):
        WeightQuant(block="row").check()
    with pytest.raises(ValueError, match="granularity"):
        ActivationQuant(granularity="channel").check()


# ------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    """The tiny Llama with one planted super weight: layer 1's down_proj.weight[5, 17] = 40x its tensor's max."""
    model, _ = converters.load(tiny_checkpoint("llama_gqa"), tokenizer=False)
    down = model.model.layers[1].mlp.down_proj.kernel
    down[...] = down[...].at[17, 5].set(40 * jnp.abs(down[...]).max())
    return model


SW = SuperWeight(layer=1, row=5, col=17, weight=0.0, input_value=0.0, output_value=0.0, position=0)


def logits(model) -> np.ndarray:
    return np.asarray(model(jnp.asarray(TOKENS)), np.float32)


def substituted(model, kernels) -> nnx.Module:
    """A copy of the float model with each decoder Linear's kernel replaced."""
    out = nnx.clone(model)
    for (i, name), kernel in kernels.items():
        lin = quantize.quantizable(out)[(i, name)]
        lin.kernel = nnx.Param(jnp.asarray(kernel))
    return out


def test_restore_puts_the_super_weights_back(model):
    w = WeightQuant(bits=4, block=64, symmetric=False, clip="zscore", clip_threshold=2.5)
    q = quantize.apply(model, w, super_weights=[SW])
    kernel = np.asarray(model.model.layers[1].mlp.down_proj.kernel[...])
    ref, pre, step = reference_blockwise(kernel.T, 4, 64, "zscore", 2.5)
    ref = ref.copy()
    ref[5, 17] = kernel[17, 5]  # restored in full precision
    got = np.asarray(quantize.dequantized_kernels(q)[(1, "mlp.down_proj")]).T
    assert_rounding_equal(got, ref, pre, step, "restored down_proj")
    assert got[5, 17] == kernel[17, 5]
    off = np.asarray(quantize.dequantized_kernels(quantize.update(q, w, restore=False))[(1, "mlp.down_proj")]).T
    assert abs(off[5, 17]) < 0.5 * abs(kernel[17, 5])  # clipped, not restored
    others = np.asarray(quantize.dequantized_kernels(q)[(0, "mlp.down_proj")])  # no super weight there: untouched
    assert_rounding_equal(others.T, *reference_blockwise(np.asarray(model.model.layers[0].mlp.down_proj.kernel[...]).T,
                                                         4, 64, "zscore", 2.5), "layer 0 down_proj")


def test_held_out_super_weight_leaves_its_block_the_range_of_the_others(model):
    """REPLACE (the super weight by its block's median, inside the others' range) -> quantize -> RESTORE."""
    w = WeightQuant(bits=4, block=96, symmetric=False)  # blocks of 96 = one output row of down_proj (in = 96)
    q = quantize.update(quantize.apply(model, w, super_weights=[SW]), w, restore=True, hold_out=True)
    weight = np.asarray(model.model.layers[1].mlp.down_proj.kernel[...]).T.copy()  # [out, in]; SW at [5, 17]
    replaced = weight.copy()
    replaced[5, 17] = np.median(weight[5])
    ref, pre, step = reference_blockwise(replaced, 4, 96, "none", math.inf)
    ref[5, 17] = weight[5, 17]
    got = np.asarray(quantize.dequantized_kernels(q)[(1, "mlp.down_proj")]).T
    assert_rounding_equal(got, ref, pre, step, "held-out super weight")
    plain = np.asarray(quantize.dequantized_kernels(quantize.apply(model, w))[(1, "mlp.down_proj")]).T
    row_error = lambda x: np.abs(np.delete(x[5] - weight[5], 17)).max()
    assert row_error(got) < row_error(plain) / 10  # its row keeps its resolution
    with pytest.raises(ValueError, match="must be restored"):
        quantize.update(q, w, restore=False)


def test_quantized_forward_equals_the_dequantized_weights_substituted(model):
    before = logits(model)
    q = quantize.apply(model, WeightQuant(bits=4, block=32, symmetric=False, clip="iqr", clip_threshold=3.0),
                       super_weights=[SW])
    kernels = quantize.dequantized_kernels(q)
    assert set(kernels) == set(quantize.quantizable(model)) and len(kernels) == 3 * 7
    assert_logits_close(logits(q), logits(substituted(model, kernels)), rel=1e-5)
    assert_logits_close(logits(quantize.materialize(q)), logits(q), rel=1e-5)
    np.testing.assert_array_equal(logits(model), before)  # the float model is untouched
    lin = q.model.layers[2].mlp.up_proj
    assert lin.kernel[...] is model.model.layers[2].mlp.up_proj.kernel[...]  # its arrays are shared
    assert not np.allclose(logits(q), before, atol=1e-3 * np.abs(before).max())  # 4 bits changed something


def test_w8a8_linear_quantizes_its_input_and_its_weight(model):
    """One W8A8 Linear on a batch against the numpy formulas: Q(x) @ Q(W) (+ hold-out of the super activation)."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 5, 96)).astype(np.float32)
    x[1, 2, 17] = 500.0
    for hold_out in (False, True):
        q = quantize.apply(model, WeightQuant(bits=8), ActivationQuant(bits=8, hold_out=hold_out))
        lin = q.model.layers[1].mlp.down_proj
        kernel = np.asarray(model.model.layers[1].mlp.down_proj.kernel[...])
        w_ref = reference_absmax(kernel.T, 8, kernel.size)[0].T
        ref = reference_activation(x, 8, False, hold_out) @ w_ref
        np.testing.assert_allclose(np.asarray(lin(jnp.asarray(x))), ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_smoothquant_statistics_factors_and_folding(model):
    model = nnx.clone(model)  # with an outlier channel (3) in layer 0's attention input, as LLMs have
    norm = model.model.layers[0].input_layernorm.scale
    norm[...] = norm[...].at[3].multiply(30.0)
    calibration = random_tokens(32, batch=3, seed=9)
    act_max = smoothquant.input_max(model, calibration, batch_size=2, progress=False)
    # the statistic is the max |x| per channel of each Linear's input over every calibration token
    config = probes.ProbeConfig(points=("attn_input", "mlp_input", "intermediate"))
    recorded = probes.record(model, jnp.asarray(calibration), config)
    for point, name in (("attn_input", "self_attn.k_proj"), ("mlp_input", "mlp.up_proj"),
                        ("intermediate", "mlp.down_proj")):
        for layer in range(3):
            full = np.abs(np.asarray(recorded.point(point)[layer].full)).max(axis=(0, 1))
            np.testing.assert_allclose(act_max[(layer, name)], full, rtol=1e-5)
    s = smoothquant.factors(model, act_max, alpha=0.5)
    assert set(s) == {(i, n) for i in range(3) for g in smoothquant.GROUPS for n in g}
    # s_j = max|X_j|^0.5 / max over the group's output rows |W_ij|^0.5 (PyTorch: W.abs().max(dim=0) per fc)
    fcs = [np.asarray(model.model.layers[2].mlp.gate_proj.kernel[...]).T,
           np.asarray(model.model.layers[2].mlp.up_proj.kernel[...]).T]  # [out, in]
    w_max = np.maximum(np.max([np.abs(w).max(axis=0) for w in fcs], axis=0), 1e-5)
    expected = np.maximum(act_max[(2, "mlp.gate_proj")] ** 0.5 / w_max ** 0.5, 1e-5)
    np.testing.assert_allclose(np.asarray(s[(2, "mlp.up_proj")]), expected, rtol=1e-5)
    assert s[(2, "mlp.up_proj")] is s[(2, "mlp.gate_proj")]
    # folding alone (no quantizer) leaves the float model's outputs unchanged to float32 noise
    smoothed = quantize.apply(model, smoothing=s)
    assert np.abs(np.log(np.asarray(s[(0, "self_attn.q_proj")]))).min() > 1  # the factors are far from 1
    assert_logits_close(logits(smoothed), logits(model), rel=1e-5)
    # and it narrows the quantized inputs' range: the smoothed q_proj input's max |x| per channel is flatter
    lin = smoothed.model.layers[0].self_attn.q_proj
    flattened = act_max[(0, "self_attn.q_proj")] / np.asarray(lin.smooth[...])
    assert flattened.max() / np.median(flattened) < act_max[(0, "self_attn.q_proj")].max() / np.median(
        act_max[(0, "self_attn.q_proj")])


@jit_model
def _logits(model, tokens):
    return model(tokens)


def test_block_sweep_is_one_program_equal_to_one_program_per_block(model):
    blocks = [16, 64, 2048, "channel", "tensor"]  # 2048 divides q/k/v/o (4096, 2048) but not the FFN's 6144
    points = sweep.block_sweep_points(blocks, bits=4, clip="zscore", clip_threshold=2.0,
                                      curves=[sweep.ROUND_TO_NEAREST, sweep.HANDLED, sweep.HELD_OUT])
    before = _logits._cache_size()
    swept = sweep.run(model, [p for ps in points.values() for p in ps],
                      lambda m: np.asarray(_logits(m, jnp.asarray(TOKENS))), super_weights=[SW])
    assert _logits._cache_size() == before + 1  # every block size of both curves: one program
    flat = [p for ps in points.values() for p in ps]
    for p, one in zip(flat, sweep.models(model, flat, super_weights=[SW]), strict=True):
        clip = "none" if math.isinf(p.weights.clip_threshold) else "zscore"
        spec = dataclasses.replace(p.weights, clip=clip)
        alone = quantize.apply(model, spec, super_weights=[SW] if p.restore else ())  # a static block size
        if p.hold_out:
            alone = quantize.update(alone, spec, hold_out=True)
        # the traced block size reduces over segments, the static one over a reshape: float32 sums in another
        # order, so the z-score threshold and the scales may differ in their last bits, and a weight lying on a
        # rounding boundary may land one step apart (seen with jax 0.12); everything else is the same number
        got, want = quantize.dequantized_kernels(one), quantize.dequantized_kernels(alone)
        for key, w in want.items():
            w, g = np.asarray(w), np.asarray(got[key])
            float_kernel = np.asarray(quantize.quantizable(model)[key].kernel[...])
            step = (float_kernel.max() - float_kernel.min()) / (2 ** p.weights.bits - 1)  # the widest block's step
            apart = np.abs(g - w) > 1e-5 * np.abs(w).max()  # above float32 noise (measured: 1.1e-6 of the scale)
            assert apart.mean() <= 1e-3 and np.abs(g - w).max() <= step * 1.001, (p, key, apart.mean())
    assert not np.allclose(swept[1], swept[len(blocks) + 1])  # the curves differ
    assert not np.allclose(swept[1], swept[2 * len(blocks) + 1])


def test_bits_sweep_and_table3_settings_share_one_program(model):
    w, a = WeightQuant(bits=8), ActivationQuant(bits=8)
    values = sweep.bits_sweep(model, [3, 4, 8], lambda m: logits(m), weights=w, activations=a)
    for bits, value in zip([3, 4, 8], values, strict=True):
        spec = (dataclasses.replace(w, bits=bits), dataclasses.replace(a, bits=bits))
        assert_logits_close(value, logits(quantize.apply(model, *spec)), rel=1e-5)
    # Table 3: naive, super activation held out, SmoothQuant: one structure, one program
    s = smoothquant.factors(model, smoothquant.input_max(model, random_tokens(32, batch=2, seed=1), progress=False))
    points = [sweep.Point(w, a), sweep.Point(w, dataclasses.replace(a, hold_out=True)), sweep.Point(w, a, smooth=True)]
    before = _logits._cache_size()
    got = sweep.run(model, points, lambda m: np.asarray(_logits(m, jnp.asarray(TOKENS))), smoothing=s)
    assert _logits._cache_size() == before + 1
    assert_logits_close(got[0], logits(quantize.apply(model, w, a)), rel=1e-5)
    assert_logits_close(got[1], logits(quantize.apply(model, w, dataclasses.replace(a, hold_out=True))), rel=1e-5)
    assert_logits_close(got[2], logits(quantize.apply(model, w, a, smoothing=s)), rel=1e-5)


def test_update_refuses_a_change_of_structure(model):
    q = quantize.apply(model, WeightQuant(bits=4, block=64, symmetric=False))
    with pytest.raises(ValueError, match="compiled in"):
        quantize.update(q, WeightQuant(bits=4, block=32, symmetric=False))
    with pytest.raises(ValueError, match="symmetric"):
        quantize.update(q, WeightQuant(bits=4, block=64, symmetric=True))
    with pytest.raises(ValueError, match="add or remove"):
        quantize.update(q, WeightQuant(bits=4, block=64, symmetric=False), ActivationQuant())
    with pytest.raises(ValueError, match="materialized"):
        quantize.update(quantize.materialize(q), WeightQuant(bits=3, block=64, symmetric=False))
