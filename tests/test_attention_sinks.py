"""mwjax.research.attention_sinks (House of Cards Figure 2): bos placements, and the probed states against HF."""

import types

import numpy as np
import pytest
from hf_reference import needs_torch, random_tokens, torch

from mwjax import converters, massive
from mwjax.research import attention_sinks

BOS = 1


def test_place_bos_puts_it_where_the_paper_does():
    ids = [5, 6, 7, 8]
    assert attention_sinks.place_bos(ids, BOS, "absent") == ([5, 6, 7, 8], None)
    assert attention_sinks.place_bos(ids, BOS, "start") == ([1, 5, 6, 7, 8], 0)
    assert attention_sinks.place_bos(ids, BOS, "middle") == ([5, 6, 1, 7, 8], 2)
    assert attention_sinks.place_bos(ids, BOS, "middle", middle=3) == ([5, 6, 7, 1, 8], 3)
    assert attention_sinks.place_bos(ids, BOS, "end") == ([5, 6, 7, 8, 1], 4)
    with pytest.raises(ValueError, match="already hold the bos token"):
        attention_sinks.place_bos([1, 5], BOS, "start")
    with pytest.raises(ValueError, match="unknown bos placement 'front'"):
        attention_sinks.place_bos(ids, BOS, "front")
    # "Summer is warm. <bos> Winter is cold.": after the first delimiter with words on both sides
    texts = ["Summer", " is", " warm", ".", " Winter", " is", " cold", "."]
    assert attention_sinks.middle_position(texts) == 4
    assert attention_sinks.middle_position([".", "a", "b", "c"]) == 2  # a leading delimiter does not count


def test_bos_placements_match_hf_hidden_states_and_attentions(hf_checkpoint):
    """|h| after `layer` = |HF hidden_states[layer + 1]|; the attention = HF attentions[layer + 1] averaged over
    heads, for every placement; the summary statistics follow from them."""
    needs_torch()
    hf, path = hf_checkpoint("llama_gqa")
    model = converters.load(path, tokenizer=False)[0]
    ids = [int(t) for t in random_tokens(10, seed=4)[0] if t != BOS]
    layer = 0
    result = attention_sinks.bos_placements(model, ids, BOS, layer)
    assert [p.placement for p in result.placements] == list(attention_sinks.PLACEMENTS)
    assert result.attention_layer == 1
    for p in result.placements:
        with torch.no_grad():
            out = hf(torch.tensor([p.token_ids]), output_hidden_states=True, output_attentions=True)
        hidden = out.hidden_states[layer + 1][0].abs().numpy()
        attention = out.attentions[layer + 1][0].mean(0).numpy()
        np.testing.assert_allclose(p.magnitudes, hidden, rtol=1e-4, atol=1e-5 * hidden.max(), err_msg=p.placement)
        np.testing.assert_allclose(p.attention, attention, rtol=1e-4, atol=1e-6, err_msg=p.placement)
        seq = len(p.token_ids)
        assert np.isnan(p.attention_received[-1])  # no later token sees the last one
        np.testing.assert_allclose(p.attention_received[0], attention[1:, 0].mean(), rtol=1e-5)  # every later query
        np.testing.assert_allclose(p.attention_received[seq - 2], attention[-1, -2], rtol=1e-5)
        assert p.top_sink == int(np.argmax([attention[k + 1:, k].mean() for k in range(seq - 1)]))
        summary = p.summary(top_k=2)
        assert summary["attention_received"][-1] is None
        median = np.median(hidden)
        assert p.massive_positions == [t for t in range(seq) if hidden[t].max() > max(100, 1000 * median)]
        assert np.asarray(summary["hidden_top_values"]).shape == (seq, 2)
        assert summary["hidden_top_dims"][0][0] == int(hidden[0].argmax())
    assert result["start"].token_ids[0] == BOS and result["absent"].bos_position is None
    with pytest.raises(ValueError, match="the attention layer after layer=2 is out of range"):
        attention_sinks.bos_placements(model, ids, BOS, 2)  # the last layer has no next layer


@pytest.mark.parametrize("origin, expected", [(3, 15), (20, 20), (31, 30)])
def test_default_layer_is_the_middle_unless_massive_activations_appear_later(origin, expected, monkeypatch):
    """32 layers: the paper's h_16 (HF layers[15]), the origin layer when deeper, never the last layer."""
    def profile(model, token_id, top_k):  # bos alone: a massive intermediate value at `origin` only
        top = np.ones((32, top_k))
        top[origin] = 5000.0
        state = massive.StateTop(top, np.zeros((32, top_k), int), np.full(32, 0.1))
        return massive.FirstTokenProfile(hidden=state, intermediate=state, embed_max=1.0)

    monkeypatch.setattr(attention_sinks.massive, "first_token_profile", profile)
    model = types.SimpleNamespace(config=types.SimpleNamespace(num_hidden_layers=32))
    assert attention_sinks.default_layer(model, BOS) == expected
