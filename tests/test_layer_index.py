"""One layer range check and one label for both numberings (papers from 1, HF / mwjax from 0)."""

from __future__ import annotations

import types

import pytest

from mwjax.core.layer_index import check_layer, layer_label, layer_numbers


def test_label_names_both_numberings():
    assert layer_label(11) == "layer 12 (HF layers[11])"
    assert layer_numbers(0) == "1 (HF layers[0])"


def test_check_layer_takes_a_count_or_a_config():
    assert check_layer(4, 3) == 3
    assert check_layer(types.SimpleNamespace(num_hidden_layers=4), 0) == 0
    with pytest.raises(ValueError, match=r"^layer -1 is out of range: the model has layers 0\.\.3$"):
        check_layer(4, -1)
    with pytest.raises(ValueError, match=r"^edits: layer 9 is out of range: the model has layers 0\.\.3$"):
        check_layer(4, 9, what="edits: layer 9")


def test_the_papers_number_of_the_last_layer_gets_a_hint():
    with pytest.raises(ValueError, match=r"layers 0\.\.3 \(0-based as in HF: the papers' layer 4 is 3\)"):
        check_layer(4, 4)
