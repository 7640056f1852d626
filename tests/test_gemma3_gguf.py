"""The real Gemma-3-270M (Q4_K_M GGUF shipped on PyPI in four parts) against transformers' own GGUF load."""

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from hf_reference import assert_logits_close, capture_hf, needs_torch, torch

import converters
from converters import embedded
from experiments.probe import growth, probe_first_token
from mwjax import massive, models
from mwjax.config import FULL_ATTENTION, SLIDING_ATTENTION

pytestmark = pytest.mark.slow

TEXT = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk. He wound the clockwork, "
    "trimmed the wick and polished the great lens until it shone. Ships passing the rocky headland "
    "counted on that beam, and in forty years he had never once let it go dark. One winter a storm tore "
    "the shutters from the windows and flooded the oil store, yet he carried the last dry cans up two "
    "hundred steps in the dark and kept the light burning until morning. "
) * 3


@pytest.fixture(scope="module")
def both():
    needs_torch()  # transformers' own GGUF load is the reference
    path = embedded.path("gemma3-270m")
    ours, tokenizer = converters.load(embedded.PREFIX + "gemma3-270m", dtype=jnp.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    return ours, tokenizer, hf


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
    ids = np.asarray([tokenizer(TEXT).input_ids], np.int32)
    assert ids.shape[1] >= 250 and ids[0, 0] == tokenizer.bos_token_id
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids).long()).logits.numpy()
    logits = np.asarray(models.forward(ours, jnp.asarray(ids)))
    err, scale = assert_logits_close(logits, ref)
    print(f"Gemma-3-270M GGUF, {ids.shape[1]} tokens: max abs logit diff {err:.2e} (logit scale {scale:.1f})")
    np.testing.assert_array_equal(logits.argmax(-1), ref.argmax(-1))


def test_bos_intermediate_and_gradual_growth(both):
    ours, tokenizer, hf = both
    states, _ = capture_hf(hf, np.array([[tokenizer.bos_token_id]]), ("intermediate",))
    captured = {layer: x[0, 0] for (_, layer), x in states.items()}  # the bos token's intermediate state
    ref_layer = max(captured, key=lambda i: captured[i].abs().max().item())
    ref_top = captured[ref_layer].abs().topk(5)
    rows = probe_first_token(ours, tokenizer.bos_token_id, top_k=5)
    top = max(rows, key=lambda r: abs(r["intermediate"]["top_values"][0]))
    assert top["layer"] == ref_layer
    assert top["intermediate"]["top_indices"] == ref_top.indices.tolist()
    np.testing.assert_allclose(np.abs(top["intermediate"]["top_values"]), ref_top.values.numpy(), rtol=1e-4)
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
