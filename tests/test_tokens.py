"""The first token fed alone at position 0."""

import pytest

from mwjax.converters.tokens import first_token_id
from mwjax.nn.config import ModelConfig

CONFIG = ModelConfig(model_type="llama", vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=2, head_dim=4, bos_token_id=7)


class Tok:
    def __init__(self, bos=None):
        self.bos_token_id, self.unk_token_id = bos, 0

    def convert_tokens_to_ids(self, token):
        return {"<eos>": 3}.get(token, 0)


def test_defaults_and_overrides():
    assert first_token_id(Tok(bos=1), CONFIG) == 1
    assert first_token_id(Tok(), CONFIG) == 7
    assert first_token_id(None, CONFIG) == 7
    assert first_token_id(Tok(bos=1), CONFIG, first_token=12) == 12
    assert first_token_id(Tok(), CONFIG, first_token="<eos>") == 3


def test_missing_bos_says_what_to_do():
    import dataclasses

    no_bos = dataclasses.replace(CONFIG, bos_token_id=None)
    with pytest.raises(ValueError, match="no bos token.*first_token="):
        first_token_id(Tok(), no_bos)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        first_token_id(Tok(), CONFIG, first_token=50)
    with pytest.raises(ValueError, match="not a token of this tokenizer"):
        first_token_id(Tok(), CONFIG, first_token="<nope>")
