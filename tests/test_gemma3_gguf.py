"""The real Gemma-3-270M (Q4_K_M GGUF shipped on PyPI in four parts) against transformers' own GGUF load."""

import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import LIGHTHOUSE, assert_bos_intermediate_agrees, assert_logits_close, gguf_with_transformers, torch

from mwjax import massive, models
from mwjax.converters import embedded
from mwjax.experiments.probe import growth
from mwjax.nn.config import FULL_ATTENTION, SLIDING_ATTENTION

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def both(embedded_tokenizer):
    return gguf_with_transformers(embedded.PREFIX + "gemma3-270m", embedded.path("gemma3-270m"),
                                  embedded_tokenizer("gemma3-270m"))


def test_config_and_tokenizer(both):
    ours, tokenizer, hf = both
    c = ours.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.intermediate_size) == ("gemma3_text", 18, 640, 2048)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.tie_word_embeddings) == (4, 1, 256, True)
    assert c.layer_types == tuple(hf.config.layer_types) == ((SLIDING_ATTENTION,) * 5 + (FULL_ATTENTION,)) * 3
    assert (c.rope.theta, c.sliding_rope.theta, c.sliding_window, c.query_pre_attn_scalar) == (1e6, 1e4, 512, 256)
    assert c.qk_norm and c.final_logit_softcapping is None
    assert tokenizer.bos_token_id == c.bos_token_id == 2


def test_logits_match_transformers_gguf(both):
    ours, tokenizer, hf = both
    ids = np.asarray([tokenizer(LIGHTHOUSE).input_ids], np.int32)
    assert ids.shape[1] >= 250 and ids[0, 0] == tokenizer.bos_token_id
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids).long()).logits.numpy()
    logits = np.asarray(models.forward(ours, jnp.asarray(ids)))
    err, scale = assert_logits_close(logits, ref)
    print(f"Gemma-3-270M GGUF, {ids.shape[1]} tokens: max abs logit diff {err:.2e} (logit scale {scale:.1f})")
    np.testing.assert_array_equal(logits.argmax(-1), ref.argmax(-1))


def test_bos_intermediate_and_gradual_growth(both):
    ours, tokenizer, hf = both
    captured, _ = assert_bos_intermediate_agrees(ours, tokenizer, hf)
    # Gemma's hidden state grows over many layers instead of exploding in one (contrast SmolLM2)
    assert growth(massive.first_token_profile(ours, tokenizer.bos_token_id, top_k=5)).endswith("gradual growth")
    # Algorithm 1's layer: the earliest whose intermediate state is massive (by HF's own values); the hidden
    # state's largest rise (the former rule) is at HF layers[5], whose intermediate state peaks at |x| ~ 0.3
    massive_ref = [i for i in sorted(captured) if massive.is_massive(captured[i].abs().max().item(),
                                                                       captured[i].abs().median().item())]
    mw = massive.find_massive_weights(ours, tokenizer, k=5)
    assert mw.layer == massive_ref[0] == 0 and mw.meets_criterion and mw.selected_by.startswith("earliest")
    jump = massive.find_massive_weights(ours, tokenizer, k=5, layer_rule="hidden_jump")
    assert jump.layer == 5 and not jump.meets_criterion
