"""mwjax.research.attacks against HF with the same weights edited; purity, jit/vmap, and what each one touches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import assert_logits_close, capture_hf, hf_logits, random_tokens, torch

from mwjax import attacks, converters, massive, models, probes, prune
from mwjax.research.massive import MassiveWeights, SuperWeight

TOKENS = random_tokens(128, seed=7)


@pytest.fixture(scope="module")
def setup(hf_checkpoint):
    hf, path = hf_checkpoint("llama_gqa")
    model, _ = converters.load(path, tokenizer=False)
    mw = massive.find_massive_weights(model, first_token=5, k=6, layer=1)
    return hf, model, mw


def hf_edited(hf, edit):
    clone = type(hf)(hf.config).eval()
    clone.load_state_dict(hf.state_dict())
    with torch.no_grad():
        edit(clone)
    return clone


def ours(model, **kw):
    return np.asarray(models.forward(model, jnp.asarray(TOKENS), **kw))


def test_zero_top_k_matches_hf(setup):
    hf, model, mw = setup
    rows = list(mw.indices[:3])

    def edit(m):
        m.model.layers[1].mlp.up_proj.weight[rows] = 0
        m.model.layers[1].mlp.gate_proj.weight[rows] = 0

    before = ours(model)
    attacked = attacks.zero_top_k(model, mw, 3)
    assert_logits_close(ours(attacked), hf_logits(hf_edited(hf, edit), TOKENS))
    np.testing.assert_array_equal(ours(model), before)  # the input model is untouched
    assert_logits_close(ours(model, ffn_masks=attacks.zero_top_k_masks(mw, 3, 64)), ours(attacked), rel=1e-5)
    # unchanged arrays are shared, not copied
    assert attacked.model.layers[0].mlp.up_proj.kernel[...] is model.model.layers[0].mlp.up_proj.kernel[...]


def test_retain_top_k_matches_hf(setup):
    hf, model, mw = setup
    keep = list(mw.indices[:2])
    others = [i for i in range(96) if i not in keep]

    def edit(m):
        m.model.layers[1].mlp.up_proj.weight[others] = 0
        m.model.layers[1].mlp.gate_proj.weight[others] = 0

    ref = hf_logits(hf_edited(hf, edit), TOKENS)
    assert_logits_close(ours(attacks.retain_top_k(model, mw, 2)), ref)
    assert_logits_close(ours(model, ffn_masks=attacks.retain_top_k_masks(mw, 2, 96, 64)), ref)


def test_k_is_traceable_under_jit_and_vmap(setup):
    _, model, mw = setup
    tokens = jnp.asarray(TOKENS[:, :32])
    ks = jnp.array([1, 2, 4])

    def logits_for(k):
        return attacks.zero_top_k(model, mw, k)(tokens)

    batched = jax.jit(jax.vmap(logits_for))(ks)
    for i, k in enumerate([1, 2, 4]):
        assert_logits_close(batched[i], models.forward(attacks.zero_top_k(model, mw, k), tokens), rel=1e-5)
    # one compiled program for zeroing and retaining at every k
    d_ff = model.config.intermediate_size
    step = jax.jit(lambda k, retain: models.forward(model, tokens, ffn_masks=attacks.row_scale_masks(
        mw, attacks.top_k_row_scale(mw, k, d_ff, retain=retain), 64)))
    assert_logits_close(step(2, False), models.forward(attacks.zero_top_k(model, mw, 2), tokens), rel=1e-5)
    assert_logits_close(step(2, True), models.forward(attacks.retain_top_k(model, mw, 2), tokens), rel=1e-5)
    assert step._cache_size() == 1


def test_scale_super_weight_matches_hf(setup):
    hf, model, _ = setup
    sw = SuperWeight(layer=2, row=10, col=33, weight=0.0, input_value=0.0, output_value=0.0, position=0)

    def edit(m):
        m.model.layers[2].mlp.down_proj.weight[10, 33] *= 3.0

    assert_logits_close(ours(attacks.scale_super_weight(model, sw, 3.0)), hf_logits(hf_edited(hf, edit), TOKENS))
    factors = jnp.array([0.0, 1.0])
    scaled = jax.vmap(lambda f: attacks.scale_super_weight(model, sw, f).model.layers[2].mlp.down_proj.kernel[...])(
        factors)
    assert float(scaled[0, 33, 10]) == 0.0 and float(scaled[1, 33, 10]) == float(
        model.model.layers[2].mlp.down_proj.kernel[33, 10])


def torch_largest(hf, n: int, exclude=()) -> set:
    """{(layer, module path, row, col)} of the n largest |weight| over every Linear of HF's decoder layers."""
    flat, tensors = [], []  # tensors: (layer, path, columns, first flat index)
    for i, layer in enumerate(hf.model.layers):
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                w = mod.weight.detach().abs().clone()
                for li, ln, r, c in exclude:
                    if (li, ln) == (i, name):
                        w[r, c] = -1.0
                tensors.append((i, name, w.shape[1], sum(len(f) for f in flat)))
                flat.append(w.reshape(-1))
    out = set()
    for index in torch.topk(torch.cat(flat), n).indices.tolist():
        i, name, cols, start = max((t for t in tensors if t[3] <= index), key=lambda t: t[3])  # the one holding it
        out.add((i, name, *divmod(index - start, cols)))
    return out


def test_prune_non_super_weights_matches_hf(setup):
    """The Super Weight's Table 1 control "Prune Non-SW": the n largest decoder weights other than the super weight,
    chosen and zeroed as a torch reference does it over HF's Linears; the logits agree with HF's edited model."""
    hf, model, _ = setup
    w = hf.model.layers[1].mlp.down_proj.weight.detach()
    row, col = divmod(int(w.abs().argmax()), w.shape[1])
    sw = SuperWeight(layer=1, row=row, col=col, weight=float(w[row, col]), input_value=0.0, output_value=0.0,
                     position=0)
    n = 300
    assert (1, "mlp.down_proj", row, col) in torch_largest(hf, n)  # so excluding it changes what is chosen
    expected = torch_largest(hf, n, exclude=[(1, "mlp.down_proj", row, col)])
    chosen = prune.largest_weights(model, n, exclude=[sw])
    got = {(i, name, int(o), int(c)) for (i, name), coords in chosen.items() for c, o in coords}
    assert got == expected and sum(len(c) for c in chosen.values()) == n

    def edit(m):
        for i, name, r, c in expected:
            m.model.layers[i].get_submodule(name).weight[r, c] = 0.0

    pruned = prune.prune_largest_weights(model, n, exclude=[sw])
    assert_logits_close(ours(pruned), hf_logits(hf_edited(hf, edit), TOKENS))
    assert float(pruned.model.layers[1].mlp.down_proj.weight()[col, row]) == sw.weight  # the super weight stays
    assert prune.largest_weights(model, 0) == {}


def test_restore_super_activation_touches_only_the_super_activation(setup):
    _, model, _ = setup
    layer, row, col = 1, 5, 40
    kernel = model.model.layers[layer].mlp.down_proj.kernel[...]
    sw = SuperWeight(layer, row, col, float(kernel[col, row]), 0.0, 0.0, 0)
    config = probes.ProbeConfig(points=("down_proj_output",), layers=(layer,))
    tokens = jnp.asarray(TOKENS)
    get = lambda m: np.asarray(probes.capture(m, tokens, config)[1].down_proj_output[layer].full)
    original = get(model)
    pruned = get(attacks.scale_super_weight(model, sw, 0.0))
    threshold = float(np.quantile(np.abs(original[..., row]), 0.9))  # the top tenth of positions count as "super"
    restored = get(attacks.restore_super_activation(model, sw, min_abs=threshold))
    big = np.abs(original[..., row]) > threshold
    assert 0 < big.sum() < big.size
    np.testing.assert_allclose(restored[..., row][big], original[..., row][big], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(restored[..., row][~big], pruned[..., row][~big], rtol=1e-5, atol=1e-6)
    others = np.arange(64) != row
    np.testing.assert_allclose(restored[..., others], original[..., others], rtol=1e-5, atol=1e-6)
    # the default, as the reference hook: only the position of each sequence where |value| is largest
    at_argmax = get(attacks.restore_super_activation(model, sw))[..., row]
    peak = np.arange(original.shape[1]) == np.argmax(np.abs(original[..., row]), axis=1)[:, None]
    np.testing.assert_allclose(at_argmax[peak], original[..., row][peak], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(at_argmax[~peak], pruned[..., row][~peak], rtol=1e-5, atol=1e-6)
    assert peak.sum() == original.shape[0] and not np.allclose(original[..., row][peak], pruned[..., row][peak])


def test_a_set_of_super_weights_is_attacked_jointly(setup):
    _, model, _ = setup
    kernel = lambda m, layer: np.asarray(m.model.layers[layer].mlp.down_proj.kernel[...])
    sws = [SuperWeight(1, row, col, float(kernel(model, 1)[col, row]), 0.0, 0.0, 0) for row, col in ((5, 40), (7, 40))]
    sws.append(SuperWeight(2, 3, 11, float(kernel(model, 2)[11, 3]), 0.0, 0.0, 0))
    pruned = attacks.scale_super_weight(model, sws, 0.0)
    for layer in (1, 2):
        zeroed = np.zeros_like(kernel(model, layer), bool)
        for sw in sws:
            zeroed[sw.col, sw.row] |= sw.layer == layer
        assert np.all(kernel(pruned, layer)[zeroed] == 0)
        np.testing.assert_array_equal(kernel(pruned, layer)[~zeroed], kernel(model, layer)[~zeroed])
    config = probes.ProbeConfig(points=("down_proj_output",), layers=(1, 2))
    get = lambda m: probes.capture(m, jnp.asarray(TOKENS), config)[1].down_proj_output
    layer1 = sws[:2]  # (a later layer's values change with the earlier layer's pruned positions)
    original, cut = get(model), get(attacks.scale_super_weight(model, layer1, 0.0))
    restored = get(attacks.restore_super_activation(model, layer1))
    for sw in layer1:  # each channel back at its own argmax position, pruned elsewhere
        a, b, c = (np.asarray(r[sw.layer].full[0, :, sw.row]) for r in (original, cut, restored))
        peak = np.arange(len(a)) == np.argmax(np.abs(a))
        np.testing.assert_allclose(c[peak], a[peak], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(c[~peak], b[~peak], rtol=1e-5, atol=1e-6)


def test_median_control_zeroes_as_many_median_entries_at_the_first_token(setup):
    _, model, _ = setup
    config = probes.ProbeConfig(points=("hidden",), layers=(1,))
    get = lambda m: np.asarray(probes.capture(m, jnp.asarray(TOKENS), config)[1].hidden[1].full)
    original, edited = get(model), get(attacks.zero_median_activations(model, 1, 3, TOKENS))
    changed = np.argwhere(edited != original)
    assert len(changed) == 3 and set(changed[:, 1]) == {0}  # three entries, all at the first token
    magnitudes = np.abs(original[0, 0])
    assert all(abs(magnitudes[d] - np.median(magnitudes)) <= np.sort(np.abs(magnitudes - np.median(magnitudes)))[2]
               for d in changed[:, 2])
    assert np.all(edited[0, 0, changed[:, 2]] == 0)
    with pytest.raises(ValueError, match="no massive activation after layer 1 on the calibration set"):
        attacks.intervene_massive_activations(model, 1, "control", TOKENS)


def test_set_massive_activations_edits_only_large_entries(setup):
    _, model, _ = setup
    tokens = jnp.asarray(TOKENS)
    config = probes.ProbeConfig(points=("hidden",), layers=(1,))
    original = np.asarray(probes.capture(model, tokens, config)[1].hidden[1].full)
    dims = [3, 9]
    threshold = float(np.quantile(np.abs(original[..., dims]), 0.8))
    edited_model = attacks.set_massive_activations(model, 1, dims, "zero", min_abs=threshold)
    edited = np.asarray(probes.capture(edited_model, tokens, config)[1].hidden[1].full)
    large = np.abs(original[..., dims]) > threshold
    assert np.all(edited[..., dims][large] == 0)
    np.testing.assert_array_equal(edited[..., dims][~large], original[..., dims][~large])
    np.testing.assert_array_equal(np.delete(edited, dims, axis=-1), np.delete(original, dims, axis=-1))
    # "mean": per position class (the first token, the others), the mean of exactly those entries
    first, other = attacks.massive_activation_means(model, TOKENS, 1, dims, threshold)
    head, rest = original[:, :1], original[:, 1:]
    expected_other = [rest[..., d][np.abs(rest[..., d]) > threshold].mean() for d in dims]
    expected_first = [head[..., d][np.abs(head[..., d]) > threshold].mean() if np.any(np.abs(head[..., d]) > threshold)
                      else expected_other[j] for j, d in enumerate(dims)]  # never massive there: the other mean
    np.testing.assert_allclose(other, expected_other, rtol=1e-5)
    np.testing.assert_allclose(first, expected_first, rtol=1e-5)
    meaned = attacks.set_massive_activations(model, 1, dims, "mean", tokens=TOKENS, min_abs=threshold)
    after = np.asarray(probes.capture(meaned, tokens, config)[1].hidden[1].full)
    for j, d in enumerate(dims):
        np.testing.assert_allclose(after[:, 1:, d][large[:, 1:, j]], other[j], rtol=1e-5)
        np.testing.assert_allclose(after[:, :1, d][large[:, :1, j]], first[j], rtol=1e-5)
    # attached edits travel with the copy, not the original
    np.testing.assert_array_equal(ours(model), ours(model))
    assert model.attached is None and edited_model.attached is not None


@pytest.mark.parametrize("call, message", [
    (lambda m, mw: attacks.zero_top_k(m, mw, 0), r"k=0 must lie in \[1, 6\]"),
    (lambda m, mw: attacks.zero_top_k(m, mw, 7), r"k=7 must lie in \[1, 6\].*find_massive_weights"),
    (lambda m, mw: attacks.retain_top_k(m, mw, 9), r"k=9 must lie in \[0, 6\]"),
    (lambda m, mw: attacks.k_sweep(m, mw, [0, 7], lambda _: 0.0), r"k=7 must lie in \[0, 6\]"),
    (lambda m, mw: attacks.zero_top_k(m, MassiveWeights(5, (1,), (1.0,), 0.1, 1), 1), "layer 5 is out of range"),
    (lambda m, mw: attacks.scale_super_weight(m, SuperWeight(3, 0, 0, 0.0, 0.0, 0.0, 0), 0.0), "layer 3 is out"),
    (lambda m, mw: attacks.set_massive_activations(m, 0, [1], "mean"), "needs tokens="),
    (lambda m, mw: attacks.set_massive_activations(m, 0, [1], "median"), 'value must be "zero", "mean"'),
    (lambda m, mw: attacks.attach(attacks.zero_top_k(m, mw, 1), ffn_masks=attacks.zero_top_k_masks(mw, 1, 64))(
        jnp.ones((1, 2), jnp.int32), ffn_masks=attacks.zero_top_k_masks(mw, 1, 64)), "already attached"),
])
def test_bad_inputs(setup, call, message):
    _, model, mw = setup
    with pytest.raises(ValueError, match=message):
        call(model, mw)


@pytest.mark.parametrize("spec, parsed", [("zero_top_k:5", ("zero_top_k", 5)), ("retain_top_k:1", ("retain_top_k", 1)),
                                           ("scale_super_weight:1.5", ("scale_super_weight", 1.5)),
                                           ("prune_super_weight", ("prune_super_weight", None)),
                                           ("massive_activations:mean", ("massive_activations", "mean"))])
def test_attack_specs_parse_without_a_model(spec, parsed):
    assert attacks.parse_spec(spec) == parsed


@pytest.mark.parametrize("spec, message", [
    ("zero_top_k", r"write zero_top_k:K with an integer K >= 1"), ("retain_top_k:0", "integer K >= 1"),
    ("scale_super_weight:big", "write scale_super_weight:FACTOR"), ("prune_super_weight:3", "takes no argument"),
    ("zero_top:5", r"unknown attack 'zero_top:5'; write one of"),
    ("massive_activations:median", "write massive_activations:zero, :mean or :control"),
])
def test_bad_attack_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        attacks.parse_spec(spec)


# ------------------------------------------------------------------------------------------ other families


@pytest.mark.parametrize("name", ["gemma2", "phi3"])
def test_zero_top_k_matches_hf_in_dense_families(name, hf_checkpoint):
    hf, path = hf_checkpoint(name)
    model, _ = converters.load(path, tokenizer=False)
    mw = massive.find_massive_weights(model, first_token=5, k=4, layer=1)
    rows = list(mw.indices[:4])
    tokens = random_tokens(96, hf.config.vocab_size, seed=8)

    def edit(m):
        mlp = m.model.layers[1].mlp
        if hasattr(mlp, "gate_up_proj"):  # Phi-3 fuses [W_gate; W_up]
            f = hf.config.intermediate_size
            mlp.gate_up_proj.weight[rows] = 0
            mlp.gate_up_proj.weight[[f + r for r in rows]] = 0
        else:
            mlp.up_proj.weight[rows] = 0
            mlp.gate_proj.weight[rows] = 0

    assert_logits_close(models.forward(attacks.zero_top_k(model, mw, 4), jnp.asarray(tokens)),
                        hf_logits(hf_edited(hf, edit), tokens))


def test_mixtral_massive_weights_sit_in_the_routed_expert(hf_checkpoint):
    hf, path = hf_checkpoint("mixtral")
    model, _ = converters.load(path, tokenizer=False)
    mw = massive.find_massive_weights(model, first_token=5, k=3, layer=1)
    # the reference, in torch: bos alone, the router's first choice at layer 1 and that expert's state
    states, out = capture_hf(hf, np.array([[5]]), ("mlp_input",), output_router_logits=True)
    captured = {"x": states[("mlp_input", 1)]}  # the FFN's input at layer 1
    expert = int(out.router_logits[1].float().softmax(-1).reshape(-1).argmax())
    f = hf.config.intermediate_size
    experts = hf.model.layers[1].mlp.experts
    with torch.no_grad():
        gate, up = experts.gate_up_proj[expert, :f], experts.gate_up_proj[expert, f:]
        h = (torch.nn.functional.silu(captured["x"] @ gate.T) * (captured["x"] @ up.T)).reshape(-1)
    assert mw.expert == expert
    assert list(mw.indices) == h.abs().topk(3).indices.tolist()

    tokens = random_tokens(96, hf.config.vocab_size, seed=9)

    def edit(m):
        gate_up = m.model.layers[1].mlp.experts.gate_up_proj
        gate_up[expert, list(mw.indices)] = 0
        gate_up[expert, [f + r for r in mw.indices]] = 0

    ref = hf_logits(hf_edited(hf, edit), tokens)
    assert_logits_close(models.forward(attacks.zero_top_k(model, mw, 3), jnp.asarray(tokens)), ref)
    assert_logits_close(models.forward(model, jnp.asarray(tokens), ffn_masks=attacks.zero_top_k_masks(mw, 3, 64)),
                        ref)
    with pytest.raises(ValueError, match="say which expert"):
        attacks.ffn_projections(model, 1)
    with pytest.raises(ValueError, match="expert 7 out of range"):
        attacks.zero_top_k(model, MassiveWeights(1, (1,), (1.0,), 0.1, 5, expert=7), 1)
    with pytest.raises(ValueError, match="routes between experts"):
        massive.find_super_weights(model, tokens=tokens[:, :8])
