"""find_massive_weights against a PyTorch reference computed with transformers hooks."""

import numpy as np
import pytest
from hf_reference import capture_hf, torch

from mwjax import converters, massive


def hf_bos_profile(hf, token_id):
    """(embedding, {layer: intermediate state}, {layer: hidden state}) of `token_id` alone, from HF."""
    captured, _ = capture_hf(hf, np.array([[token_id]]), ("intermediate", "hidden"))
    with torch.no_grad():
        emb = hf.model.embed_tokens(torch.tensor([[token_id]]))[0, 0]
    layers = range(hf.config.num_hidden_layers)
    return emb, {i: captured[("intermediate", i)][0, 0] for i in layers}, {i: captured[("hidden", i)][0, 0]
                                                                          for i in layers}


def test_matches_hf_hooks(hf_checkpoint):
    hf, path = hf_checkpoint("llama_gqa")
    model, _ = converters.load(path, tokenizer=False)
    mw = massive.find_massive_weights(model, first_token=5, k=4)
    emb, inter, outs = hf_bos_profile(hf, 5)
    tops = [outs[i].abs().max().item() for i in range(len(outs))]
    jumps = np.array(tops) - np.array([emb.abs().max().item()] + tops[:-1])
    # random weights: no layer is massive, so the layer of the largest intermediate |x|, and it says so
    assert mw.layer == int(np.argmax([inter[i].abs().max().item() for i in range(len(inter))]))
    assert mw.selected_by.startswith("no layer's intermediate state is massive")
    assert massive.find_massive_weights(model, first_token=5, k=4, layer_rule="hidden_jump").layer == int(
        np.argmax(jumps))
    ref = inter[mw.layer].abs().topk(4)
    assert list(mw.indices) == ref.indices.tolist()
    np.testing.assert_allclose(np.abs(mw.values), ref.values.numpy(), rtol=1e-5)
    assert mw.paper_layer == mw.layer + 1 and mw.token_id == 5
    assert not mw.meets_criterion  # random weights have no massive activations


def profile(hidden_max, intermediate_max, intermediate_median, embed_max=1.0):
    state = lambda top, median: massive.StateTop(np.array(top, float)[:, None], np.zeros((len(top), 1), int),
                                                 np.array(median, float))
    return massive.FirstTokenProfile(hidden=state(hidden_max, np.ones(len(hidden_max))),
                                     intermediate=state(intermediate_max, intermediate_median), embed_max=embed_max)


def test_origin_layer_is_the_earliest_massive_intermediate_state():
    # Gemma-like: the massive intermediate state at layer 1 is damped by post-FFN norms; the hidden state rises
    # most at layer 3 (the former rule's pick)
    p = profile(hidden_max=[5, 8, 9, 60, 61], intermediate_max=[3, 400, 2, 900, 5], intermediate_median=[.1, .2, .1,
                                                                                                       .2, .1])
    assert massive.origin_layer(p) == (1, "earliest layer whose intermediate state is massive (|x| > 100, >= 1000x "
                                          "median)")
    assert massive.origin_layer(p, "hidden_jump")[0] == 3
    # 400 / 0.5 < 1000: not massive; 900 / 0.2 is
    assert massive.origin_layer(profile([5, 8, 9, 60, 61], [3, 400, 2, 900, 5], [.1, .5, .1, .2, .1]))[0] == 3
    none = massive.origin_layer(profile([5, 8, 9, 60, 61], [3, 40, 2, 90, 5], [.1, .2, .1, .2, .1]))
    assert none == (3, "no layer's intermediate state is massive: the largest intermediate |x| instead")
    with pytest.raises(ValueError, match="unknown layer rule 'jump'"):
        massive.origin_layer(p, "jump")


def test_layer_override_and_round_trip(tiny_checkpoint):
    path = tiny_checkpoint("llama_gqa")
    model, _ = converters.load(path, tokenizer=False)
    mw = massive.find_massive_weights(model, first_token=5, k=3, layer=2)
    assert mw.layer == 2 and len(mw.indices) == 3 and mw.selected_by == "given"
    assert massive.MassiveWeights.from_dict(mw.to_dict()) == mw
    mask = mw.row_mask(model.config.hidden_size, k=2)
    assert list(mask) == [2] and mask[2].rows.tolist() == list(mw.indices[:2])


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=0), r"k=0 must lie in \[1, d_ff=96\]"),
    (dict(k=97), r"k=97 must lie in \[1, d_ff=96\]"),
    (dict(layer=3), "layer=3 is out of range"),
    (dict(), "no bos token"),
])
def test_bad_inputs(kwargs, message, tiny_checkpoint):
    import dataclasses

    path = tiny_checkpoint("llama_gqa")
    model, _ = converters.load(path, tokenizer=False)
    if not kwargs:  # a model whose config and tokenizer name no bos token
        model.config = dataclasses.replace(model.config, bos_token_id=None)
    with pytest.raises(ValueError, match=message):
        massive.find_massive_weights(model, None, **kwargs)


@pytest.mark.slow
def test_smollm2_massive_weights(smollm2_path):
    model, tokenizer = converters.load(smollm2_path)
    mw = massive.find_massive_weights(model, tokenizer, k=5)
    assert mw.label == "layer 12 (HF layers[11])"
    assert mw.indices[:2] == (1229, 1487) and mw.meets_criterion


def test_super_weight_coordinates_match_hook_argmax(hf_checkpoint):
    hf, path = hf_checkpoint("llama_gqa")
    model, _ = converters.load(path, tokenizer=False)
    tokens = np.random.default_rng(3).integers(0, 160, (1, 40)).astype(np.int32)
    found = massive.find_super_weights(model, tokens=tokens, threshold=0.0)  # every layer is a candidate
    captured, _ = capture_hf(hf, tokens, ("intermediate", "down_proj_output"))
    io = {i: (captured[("intermediate", i)], captured[("down_proj_output", i)]) for i in range(3)}
    assert sorted({sw.layer for sw in found}) == [0, 1, 2]
    for layer in range(3):
        x, y = io[layer]
        col = int(x.abs().flatten().argmax()) % x.shape[-1]
        row = int(y.abs().flatten().argmax()) % y.shape[-1]
        weight = hf.model.layers[layer].mlp.down_proj.weight
        # the argmax row, then every row whose own contribution w[r, col] * x_col is >= half the largest output
        contribution = (weight[:, col] * x.flatten()[x.abs().flatten().argmax()]).abs()
        others = [r for r in contribution.argsort(descending=True).tolist()
                  if r != row and contribution[r] >= massive.SUPER_RATIO * y.abs().max()]
        ours = [sw for sw in found if sw.layer == layer]
        assert [(sw.row, sw.col) for sw in ours] == [(r, col) for r in [row, *others]]
        for sw in ours:
            assert sw.weight == pytest.approx(weight[sw.row, col].item())
            assert abs(sw.output_value) == pytest.approx(y.abs().max().item(), rel=1e-5)
    assert any(len([sw for sw in found if sw.layer == layer]) > 1 for layer in range(3))  # the rule was exercised
    assert massive.find_super_weights(model, tokens=tokens) == []  # random weights do not spike above 50


def test_find_massive_activations_threshold(tiny_checkpoint):
    path = tiny_checkpoint("llama_gqa")
    model, _ = converters.load(path, tokenizer=False)
    tokens = np.random.default_rng(4).integers(0, 160, (2, 32)).astype(np.int32)
    none = massive.find_massive_activations(model, tokens, 1)
    assert none.dims == () and none.threshold >= 100
    some = massive.find_massive_activations(model, tokens, 1, min_abs=0.0, ratio=3.0)
    assert len(some.dims) > 0 and some.threshold == pytest.approx(3.0 * some.median)


@pytest.mark.slow
def test_smollm2_super_weight_and_massive_activations(smollm2_path):
    model, tokenizer = converters.load(smollm2_path)
    found = massive.find_super_weights(model, tokenizer)
    strongest = max(found, key=lambda s: abs(s.output_value))
    # the super weight's column is the top massive-weight row: the two papers point at one weight
    assert (strongest.layer, strongest.row, strongest.col) == (11, 507, 1229)
    # all of them: layer 27 has three rows at one column; layer 11's ~280 outputs above 50 yield one
    assert [(s.layer, s.row, s.col) for s in found] == [(2, 507, 90), (9, 507, 200), (11, 507, 1229), (27, 199, 903),
                                                        (27, 299, 903), (27, 243, 903), (28, 507, 678), (29, 507, 999)]
    tokens = np.asarray([tokenizer("The sea was calm. Boats rested in the harbour.").input_ids])
    ma = massive.find_massive_activations(model, tokens, 11)
    assert ma.dims[0] == 507 and ma.positions == (0,)
