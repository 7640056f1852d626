"""mwjax.research.super_mechanism (The Super Weight Figures 2 III, 4, 11) and the down_proj maxima of Figures 3 / 10
(`massive.down_proj_spikes`) against PyTorch on a tiny HF model with a planted super weight."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import assert_close_to_scale, capture_hf, hf_logits, make_hf_model, random_tokens, tiny_tokenizer

from mwjax import attacks, converters, massive
from mwjax.data import stopwords
from mwjax.research import super_mechanism

LAYER, ROW, COL = 1, 10, 33  # the planted super weight: HF layers[1].mlp.down_proj.weight[10, 33]
PROMPT = random_tokens(48, seed=5)


def clone_with(hf, edit):
    """A copy of the HF model with `edit(copy)` applied under no_grad."""
    import torch

    copy = type(hf)(hf.config).eval()
    copy.load_state_dict(hf.state_dict())
    with torch.no_grad():
        edit(copy)
    return copy


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(HF model with a planted super weight, the same model pruned there, the mwjax model loaded from it).

    down_proj.weight[ROW, COL] = 20 and up_proj's row COL x40 make the intermediate channel COL spike (~80) and
    the output channel ROW carry a super activation (~1600) that the residual stream keeps."""
    def plant(m):
        mlp = m.model.layers[LAYER].mlp
        mlp.down_proj.weight[ROW, COL] = 20.0
        mlp.up_proj.weight[COL] *= 40.0

    hf = clone_with(make_hf_model("llama_gqa", seed=3), plant)
    path = tmp_path_factory.mktemp("planted_super_weight")
    hf.save_pretrained(path)
    model, _ = converters.load(path, tokenizer=False)

    def prune(m):
        m.model.layers[LAYER].mlp.down_proj.weight[ROW, COL] = 0.0

    return hf, clone_with(hf, prune), model


def hf_hidden(hf, tokens):
    """[L, seq, d_model]: each decoder layer's output (HF `hidden_states[l + 1]`, before the final norm)."""
    captured, _ = capture_hf(hf, tokens, ("hidden",))
    return np.stack([captured[("hidden", i)][0].numpy() for i in range(hf.config.num_hidden_layers)])


def test_super_activation_trace_and_down_proj_maxima_match_torch(planted):
    hf, hf_pruned, model = planted
    found = massive.find_super_weights(model, tokens=PROMPT)
    assert [(sw.layer, sw.row, sw.col) for sw in found] == [(LAYER, ROW, COL)]  # only the planted one spikes > 50

    # Figures 3 / 10: per layer the max |down_proj input| and |output| over the prompt, their channels and tokens
    spikes = massive.down_proj_spikes(model, jnp.asarray(PROMPT))
    captured, _ = capture_hf(hf, PROMPT, ("intermediate", "down_proj_output"))
    for ours, point in ((spikes.input, "intermediate"), (spikes.output, "down_proj_output")):
        for layer in range(3):
            x = captured[(point, layer)][0].numpy()  # [seq, features]
            position, channel = np.unravel_index(np.argmax(np.abs(x)), x.shape)
            assert (ours.position[layer], ours.channel[layer]) == (position, channel)
            assert_close_to_scale(abs(ours.value[layer]), np.abs(x).max(), 1e-5, what=f"{point} max, layer {layer}")
    assert np.argmax(np.abs(spikes.input.value)) == np.argmax(np.abs(spikes.output.value)) == LAYER

    # Figure 4: the hidden state at (token, ROW) after every layer, with the super weight and pruned
    (trace,) = super_mechanism.super_activation_traces(model, PROMPT, found)
    original, pruned = hf_hidden(hf, PROMPT), hf_hidden(hf_pruned, PROMPT)
    position = int(np.argmax(np.abs(original[LAYER, :, ROW])))
    assert (trace.layer, trace.row, trace.position) == (LAYER, ROW, position) == (LAYER, ROW, found[0].position)
    for ours, ref in ((trace.original, original), (trace.pruned, pruned)):
        for layer in range(3):  # each value within float32 noise of its layer's hidden-state scale
            got = ref[layer].copy()
            got[position, ROW] = ours[layer]
            assert_close_to_scale(got, ref[layer], 1e-5, what=f"trace, layer {layer}")
    assert abs(trace.original[LAYER]) > 1000 and abs(trace.original[LAYER - 1]) < 10  # the super activation appears
    ref_drop = 1 - abs(pruned[LAYER, position, ROW]) / abs(original[LAYER, position, ROW])
    assert trace.drop == pytest.approx(ref_drop, abs=1e-5) and trace.drop > 0.9
    assert trace.to_dict()["original"] == trace.original.tolist()

    # a weight named without a position takes the token where its channel is largest; the same trace
    named = massive.super_weight_at(model, LAYER, ROW, COL)
    (again,) = super_mechanism.super_activation_traces(model, PROMPT, named)
    assert again.position == position
    np.testing.assert_array_equal(again.pruned, trace.pruned)
    # a channel written at one token by several super weights: one trace, owned by the largest output spike
    weaker = dataclasses.replace(found[0], layer=0, output_value=found[0].output_value / 100)
    assert [t.layer for t in super_mechanism.super_activation_traces(model, PROMPT, [weaker, found[0]])] == [LAYER]


def test_stopword_shift_matches_torch(planted):
    hf, hf_pruned, model = planted
    tokenizer = tiny_tokenizer()  # one letter per token: "a" (id 3) and "i" (id 11) are the stopwords
    assert stopwords.token_ids(tokenizer) == (3, 11)
    chunks = random_tokens(32, batch=3, seed=9)
    pruned = attacks.scale_super_weight(model, massive.super_weight_at(model, LAYER, ROW, COL), 0.0)
    shift = super_mechanism.stopword_shift(model, pruned, chunks, tokenizer, top_k=4, batch_size=2,
                                           progress=False)  # 3 chunks in batches of 2: the last one padded

    def mean_probs(hf_model):  # the next-token distributions with a target, averaged
        logits = hf_logits(hf_model, chunks)[:, :-1].astype(np.float64)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        return (p / p.sum(-1, keepdims=True)).mean((0, 1))

    before, after = mean_probs(hf), mean_probs(hf_pruned)
    stop = np.isin(np.arange(len(before)), [3, 11])
    for got, ref in ((shift.stopword_before, before[stop].sum()), (shift.stopword_after, after[stop].sum()),
                     (shift.other_before, before[~stop].sum()), (shift.other_after, after[~stop].sum())):
        assert got == pytest.approx(ref, rel=1e-5)
    assert shift.stopword_ratio == pytest.approx(after[stop].sum() / before[stop].sum(), rel=1e-5)
    assert shift.stopword_tokens == 2 and shift.predictions == 3 * 31
    # the rising tokens: the largest rises of the reference, in order, within float32 noise
    rises = np.sort(after - before)[::-1]
    for t, rise in zip(shift.rising, rises[:4], strict=True):
        assert t.after - t.before == pytest.approx(rise, abs=1e-6)
        assert t.before == pytest.approx(before[t.token_id], abs=1e-6) and t.stopword == stop[t.token_id]
    assert np.asarray(super_mechanism.mean_next_token_probs(model, chunks, progress=False)).sum() == pytest.approx(1)


def test_stopword_tokens_of_a_bpe_vocabulary(embedded_tokenizer):
    tokenizer = embedded_tokenizer("smollm2")
    ids = set(stopwords.token_ids(tokenizer))
    for word in (" the", "The", " and", " I", " of"):
        assert set(tokenizer(word).input_ids) <= ids, word
    for word in (" cat", " lighthouse", ","):
        assert not set(tokenizer(word).input_ids) & ids, word
    assert stopwords.normalize("\u0120The ") == stopwords.normalize("\u2581the") == "the"
    assert len(stopwords.STOPWORDS) == len(set(stopwords.STOPWORDS)) >= 150
    assert all(w == w.lower() and w.isalpha() for w in stopwords.STOPWORDS)


def torch_iterative(hf, tokens, threshold: float, late_from: int):
    """The paper's detection loop on the HF model: scan down_proj's input / output with hooks, take the earliest
    spiking layer before `late_from` (argmax row and column), zero that weight, scan again; ([found], [late])."""
    found = []
    while True:
        def prune(m):
            for layer, row, col in found:
                m.model.layers[layer].mlp.down_proj.weight[row, col] = 0.0

        captured, _ = capture_hf(clone_with(hf, prune), tokens, ("intermediate", "down_proj_output"))
        spiking = []
        for layer in range(hf.config.num_hidden_layers):
            x, y = captured[("intermediate", layer)][0], captured[("down_proj_output", layer)][0]  # [seq, features]
            xi, yi = int(x.abs().argmax()), int(y.abs().argmax())
            if float(x.flatten()[xi].abs()) > threshold and float(y.flatten()[yi].abs()) > threshold:
                spiking.append((layer, yi % y.shape[-1], xi % x.shape[-1]))
        early = [s for s in spiking if s[0] < late_from]
        if not early or early[0] in found:
            return found, [s for s in spiking if s[0] >= late_from]
        found.append(early[0])


def test_iterative_detection_takes_the_early_super_weights_one_by_one_and_reports_the_late_spike(tmp_path):
    """Two super weights planted in layer 0 (rows 10 and 25 of column 33: Phi-3's shape) and a spike in the last
    layer (late: the last eighth of 3 layers is layer 2): the paper's rule takes row 10, then row 25, and only
    reports layer 2; the every-spike rule takes layer 2 too. Both against the same loop run on the HF model."""
    def plant(m):
        early, late = m.model.layers[0].mlp, m.model.layers[2].mlp
        early.down_proj.weight[10, 33], early.down_proj.weight[25, 33] = 20.0, 15.0
        early.up_proj.weight[33] *= 100.0  # intermediate channel 33 ~ -90 (spikes > 50)
        late.down_proj.weight[40, 50] = 20.0
        late.up_proj.weight[50] *= 400.0  # ~ -125

    hf = clone_with(make_hf_model("llama_gqa", seed=3), plant)
    hf.save_pretrained(tmp_path)
    model, _ = converters.load(tmp_path, tokenizer=False)
    found = massive.find_super_weights_iteratively(model, tokens=PROMPT)
    expected, late = torch_iterative(hf, PROMPT, massive.SPIKE_THRESHOLD, found.late_from)
    assert found.late_from == 2 and expected[:2] == [(0, 10, 33), (0, 25, 33)] and (2, 40, 50) in late  # planted
    assert [(sw.layer, sw.row, sw.col) for sw in found.super_weights] == expected
    assert [(sw.layer, sw.row, sw.col) for sw in found.late_spikes] == late
    assert found.rounds == len(expected) + 1 and found.super_weights[1].weight == pytest.approx(15.0)
    every = {(sw.layer, sw.row, sw.col) for sw in massive.find_super_weights(model, tokens=PROMPT)}
    assert (2, 40, 50) in every and (0, 10, 33) in every
