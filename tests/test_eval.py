"""Perplexity against a plain PyTorch computation, generation against HF generate, corpus loaders."""

import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import capture_hf, random_tokens, tiny_tokenizer, torch

from mwjax import attacks, converters, massive
from mwjax.data import corpora
from mwjax.eval import chunk_tokens, generate, generate_text, perplexity


@pytest.fixture(scope="module")
def pair(hf_checkpoint):
    hf, path = hf_checkpoint("llama_gqa")
    model, _ = converters.load(path, tokenizer=False)
    return hf, model


def torch_perplexity(hf, stream, seqlen, bos=None):
    """The protocol written out plainly: consecutive chunks, mean next-token NLL per chunk, exp of the mean."""
    nlls = []
    for i in range(len(stream) // seqlen):
        chunk = torch.tensor(stream[i * seqlen:(i + 1) * seqlen]).long()[None]
        inputs = chunk if bos is None else torch.cat([torch.tensor([[bos]]), chunk], dim=1)
        with torch.no_grad():
            logits = hf(inputs).logits[0, :-1]
        targets = chunk[0, 1:] if bos is None else chunk[0]
        nlls.append(torch.nn.functional.cross_entropy(logits, targets).item())
    return float(np.exp(np.mean(nlls))), nlls


def test_perplexity_matches_pytorch(pair):
    hf, model = pair
    stream = random_tokens(5 * 64 + 17, seed=11)[0]  # a remainder that must be dropped
    ref, ref_nlls = torch_perplexity(hf, stream, 64)
    result = perplexity(model, stream, 64, batch_size=2, progress=False)  # 5 chunks: the last batch is padded
    assert result.num_chunks == 5 and result.tokens_scored == 5 * 63
    np.testing.assert_allclose(result.chunk_nll, ref_nlls, rtol=1e-5)
    np.testing.assert_allclose(result.perplexity, ref, rtol=1e-5)
    capped = perplexity(model, stream, 64, max_chunks=2, progress=False)
    np.testing.assert_allclose(capped.chunk_nll, ref_nlls[:2], rtol=1e-5)
    with_bos = perplexity(model, stream, 64, add_bos=True, bos_id=1, progress=False)
    np.testing.assert_allclose(with_bos.perplexity, torch_perplexity(hf, stream, 64, bos=1)[0], rtol=1e-5)


def test_perplexity_with_masks_and_errors(pair):
    _, model = pair
    stream = random_tokens(256, seed=12)[0]
    mw = massive.find_massive_weights(model, first_token=3, k=4)
    masked = perplexity(model, stream, 64, progress=False, ffn_masks=attacks.zero_top_k_masks(mw, 4, 64))
    edited = perplexity(attacks.zero_top_k(model, mw, 4), stream, 64, progress=False)
    np.testing.assert_allclose(masked.perplexity, edited.perplexity, rtol=1e-5)
    with pytest.raises(ValueError, match="fewer than one chunk"):
        perplexity(model, stream[:10], 64)
    with pytest.raises(ValueError, match="no bos_token_id"):
        import dataclasses

        model2 = attacks.copy(model)
        model2.config = dataclasses.replace(model.config, bos_token_id=None)
        perplexity(model2, stream, 64, add_bos=True)


def test_chunking():
    np.testing.assert_array_equal(chunk_tokens(np.arange(10), 3), [[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    np.testing.assert_array_equal(chunk_tokens(np.arange(10), 3, max_chunks=1), [[0, 1, 2]])


@pytest.mark.parametrize("repetition_penalty", [1.0, 3.0])
def test_greedy_generation_matches_hf_generate(pair, repetition_penalty):
    hf, model = pair
    prompts = [random_tokens(7, seed=20)[0].tolist(), random_tokens(12, seed=21)[0].tolist()]
    ours = generate(model, prompts, 16, eos_ids=(), repetition_penalty=repetition_penalty)  # the first left-padded
    for prompt, out in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                              pad_token_id=0, repetition_penalty=repetition_penalty)
        assert out == ref[0, len(prompt):].tolist()
    if repetition_penalty != 1.0:  # the penalty changes what a tiny random model repeats
        assert ours != generate(model, prompts, 16, eos_ids=())


def test_generation_stops_at_eos_and_samples_reproducibly(pair):
    _, model = pair
    prompt = random_tokens(6, seed=22)[0].tolist()
    free = generate(model, [prompt], 12, eos_ids=())[0]
    eos = free[3]
    stopped = generate(model, [prompt], 12, eos_ids=(eos,))[0]
    assert stopped == free[: free.index(eos) + 1]
    a = generate(model, [prompt], 10, temperature=0.8, top_p=0.9, seed=3, eos_ids=())
    b = generate(model, [prompt], 10, temperature=0.8, top_p=0.9, seed=3, eos_ids=())
    assert a == b
    assert generate(model, [prompt], 10, temperature=1.0, top_k=1, eos_ids=()) == [free[:10]]
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], 4)


def test_generate_text_with_a_tokenizer(pair):
    _, model = pair
    out = generate_text(model, tiny_tokenizer(), ["abc", "hello"], 5, eos_ids=())
    assert len(out) == 2 and all(isinstance(o, str) for o in out)


class _FakeDatasets:
    """Stands in for `datasets.load_dataset` with local rows, recording what was asked."""

    def __init__(self, rows):
        self.rows, self.calls = rows, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return {"text": self.rows}


def test_corpus_loaders_follow_the_protocol(monkeypatch, tmp_path):
    import datasets

    tok = tiny_tokenizer()
    tok._tokenizer.post_processor = __import__("tokenizers").processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)])  # a tokenizer that adds bos by default
    fake = _FakeDatasets(["ab", "", "cd"])
    monkeypatch.setattr(datasets, "load_dataset", fake)
    wiki = corpora.wikitext2(tok)
    assert fake.calls[-1] == (("wikitext", "wikitext-2-raw-v1"), {"split": "test"})
    assert wiki.token_ids.tolist() == tok("ab\n\n\n\ncd", add_special_tokens=False).input_ids
    assert 1 not in wiki.token_ids  # no bos anywhere
    c4 = corpora.c4(tok)
    assert fake.calls[-1] == (("NeelNanda/c4-10k",), {"split": "train[:5000]"})
    assert c4.token_ids.tolist() == [1] + tok("ab  cd", add_special_tokens=False).input_ids and c4.max_chunks == 100
    pg = corpora.pg19(tok)
    assert fake.calls[-1] == (("emozilla/pg19",), {"split": "validation[:5]"}) and pg.max_chunks == 100
    (tmp_path / "t.txt").write_text("hello")
    assert corpora.load(str(tmp_path / "t.txt"), tok).token_ids.tolist() == tok("hello", add_special_tokens=False)[
        "input_ids"]
    assert len(corpora.python_docs(tok).token_ids) > 100_000
    with pytest.raises(ValueError, match="unknown corpus"):
        corpora.load("nope", tok)


def test_corpus_loader_offline_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="could not load dataset.*python_docs"):
        corpora.wikitext2(tiny_tokenizer())


def test_activation_stats_match_pytorch(pair):
    hf, model = pair
    seqs = random_tokens(48, batch=3, seed=30)
    stats = massive.activation_stats(model, seqs, top_k=3, batch_size=2, progress=False)
    tops, medians = [], []
    for s in seqs:
        captured, _ = capture_hf(hf, s[None], ("hidden",))
        hidden = [captured[("hidden", i)] for i in range(3)]
        tops.append([h.abs().flatten().topk(3).values.numpy() for h in hidden])
        medians.append([np.median(h.abs().numpy()) for h in hidden])
    np.testing.assert_allclose(stats["hidden"].top, np.mean(tops, axis=0), rtol=1e-4)
    np.testing.assert_allclose(stats["hidden"].median, np.mean(medians, axis=0), rtol=1e-4)
    assert stats["intermediate"].top.shape == (3, 3)


def test_jnp_input_accepted(pair):
    _, model = pair
    r = perplexity(model, jnp.asarray(random_tokens(128, seed=13)[0]), 64, progress=False)
    assert r.num_chunks == 2
