"""GGUF files of Gemma 1/2/3, Phi-3, Mixtral, OLMo and OLMo 2, written from tiny HF models as llama.cpp writes them
(tests/gguf_files.py): mwjax reads them as the source model, and as transformers' GGUF loader reads
the same file where transformers supports the architecture.

transformers 5.23 reads no `gemma` (1), `olmo` or `olmo2` GGUF, treats a Mixtral GGUF (arch llama + experts) as a dense
Llama, and ignores Phi-3's longrope factors, partial rotary and sliding window in GGUF metadata; for
those the source model is the only reference.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from gguf_files import write_gguf
from hf_reference import SEQ_LEN, assert_logits_close, hf_logits, make_hf_model, random_tokens, torch

from mwjax import converters, models


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """(name, quantize) -> (HF source model, path of its GGUF)."""
    cache = {}

    def get(name: str, quantize: bool = False):
        if (name, quantize) not in cache:
            hf = make_hf_model(name)
            path = write_gguf(hf, tmp_path_factory.mktemp(name) / f"{name}-{'q8_0' if quantize else 'f32'}.gguf",
                              quantize=quantize)
            cache[(name, quantize)] = (hf, path)
        return cache[(name, quantize)]

    return get


def ours(path, tokens):
    model, _ = converters.load(path, tokenizer=False)
    return np.asarray(models.forward(model, jnp.asarray(tokens)), np.float32), model


@pytest.mark.parametrize("name, model_type", [
    ("gemma", "gemma"), ("gemma2_released", "gemma2"), ("gemma3_released", "gemma3_text"), ("phi3", "phi3"),
    ("phi3_longrope", "phi3"), ("phi3_partial_rotary", "phi3"), ("mixtral", "mixtral"),
    ("olmo", "olmo"), ("olmo_clip", "olmo"), ("olmo2", "olmo2"),
])
def test_float32_gguf_reads_as_the_source_model(name, model_type, gguf_file):
    hf, path = gguf_file(name)
    tokens = random_tokens(SEQ_LEN, hf.config.vocab_size)
    logits, model = ours(path, tokens)
    assert model.config.model_type == model_type
    err, scale = assert_logits_close(logits, hf_logits(hf, tokens))
    print(f"{name} GGUF (f32): max abs logit diff {err:.2e} (logit scale {scale:.2f})")


@pytest.mark.parametrize("name", ["gemma2_released", "gemma3_released", "phi3"])
def test_gguf_matches_transformers_gguf_load(name, gguf_file):
    hf, path = gguf_file(name)
    tokens = random_tokens(SEQ_LEN, hf.config.vocab_size)
    load = lambda p: transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                                       dtype=torch.float32).eval()
    # the file follows llama.cpp's conventions as transformers understands them ...
    assert_logits_close(hf_logits(load(path), tokens), hf_logits(hf, tokens))
    # ... and a quantized one (Q8_0) reads the same in mwjax and in transformers
    _, quantized = gguf_file(name, quantize=True)
    ref = hf_logits(load(quantized), tokens)
    err, scale = assert_logits_close(ours(quantized, tokens)[0], ref)
    print(f"{name} GGUF (q8_0) vs transformers: max abs logit diff {err:.2e} (logit scale {scale:.2f})")
    with pytest.raises(AssertionError):  # quantization changed the weights: the comparison can fail
        assert_logits_close(ref, hf_logits(hf, tokens))


def test_olmo_gguf_metadata_and_refusals(gguf_file, tmp_path):
    """OLMo's clip_qkv comes back from `clamp_kqv`, its biases from the tensors; an OLMo LayerNorm epsilon other
    than HF's hard-coded 1e-5 and an `olmo2` file with a sliding window (OLMo 3) are refused by name."""
    from mwjax.converters.errors import InvalidConfigError

    hf, path = gguf_file("olmo_clip")
    model, _ = converters.load(path, tokenizer=False)
    assert (model.config.clip_qkv, model.config.qkv_bias, model.config.o_bias) == (0.8, True, True)
    bad_eps = write_gguf(hf, tmp_path / "eps.gguf", extra=lambda w: w.add_float32("olmo.attention.layer_norm_epsilon",
                                                                                    1e-6))
    with pytest.raises(InvalidConfigError, match="layer_norm_epsilon=.*OlmoLayerNorm hard-codes 1e-05"):
        converters.load(bad_eps, tokenizer=False)
    olmo3 = write_gguf(make_hf_model("olmo2"), tmp_path / "olmo3.gguf", extra=lambda w: w.add_sliding_window(4))
    with pytest.raises(InvalidConfigError, match="sliding window.*OLMo 3"):
        converters.load(olmo3, tokenizer=False)
