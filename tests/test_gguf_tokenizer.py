"""GGUF tokenizers built without torch equal transformers' own GGUF tokenizers, token for token."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
from hf_reference import gguf_parsed_once, needs_torch

from mwjax import converters, models
from mwjax.converters import embedded, save_hf
from mwjax.families.hf_config import read_hf_config

# A few thousand characters of what tokenizers get wrong: code, accents, digits, whitespace runs,
# emoji, CJK, special-token strings inside text.
VARIED_TEXT = "\n".join([
    Path(converters.__file__).read_text()[:1500],
    "Ünïcödé façade naïve crème brûlée, Ærøskøbing, ıİ ß ẞ — «quotes» “curly” ‘single’…",
    "日本語のテキスト、中文文本，한국어 텍스트. Ελληνικά, русский, עברית, العربية.",
    "digits 0 7 42 1234567890 3.14159 -2.5e-10 1,000,000 0x1F 2024-11-23 12:30:59",
    "whitespace:  two   three    four\t\ttabs\t \n\n\n   \r\n trailing   ",
    "emoji 🙂🚀👍🏽 👨‍👩‍👧‍👦 🇫🇷 ✔️ ∑∫√∞ ≠ ≤ ≥",
    "specials inside text: <|im_start|>user\nhi<|im_end|> <bos><eos><pad> <s></s> <unk>",
    "def f(x: int) -> int:\n    return x ** 2  # comment\n\tif x != 0 { y = x >> 1; }",
    "URLs https://example.org/a?b=c&d=e#f and emails a.b@c.de, paths C:\\Users\\x /usr/lib/x.so",
] * 2)
assert 2000 < len(VARIED_TEXT) < 8000


def _reference(path: Path):
    """transformers' own GGUF tokenizer (its GGUF reader needs torch)."""
    needs_torch()
    from transformers import AutoTokenizer

    with gguf_parsed_once():
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def assert_same_tokenizer(ours, ref, text: str = VARIED_TEXT):
    backend = lambda t: json.loads(t.backend_tokenizer.to_str())
    assert backend(ours) == backend(ref)  # vocabulary, merges, normalizer, pre-tokenizer, decoder, post-processor
    ids = ours(text).input_ids
    assert ids == ref(text).input_ids
    assert ours.decode(ids) == ref.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token", "add_eos_token"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert ours.chat_template == ref.chat_template
    if ref.chat_template:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                    {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]
        render = lambda t: t.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render(ours) == render(ref)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3-270m"])  # byte-level BPE; SentencePiece (Gemma)
def test_real_gguf_tokenizers_match_transformers(name, embedded_tokenizer):
    path = embedded.path(name)
    assert_same_tokenizer(embedded_tokenizer(name), _reference(path))


@pytest.mark.slow
def test_embedded_tokenizers_load_without_the_reference(embedded_tokenizer):
    """What the README's main job relies on, on any machine: bos, the chat template, lossless round trips."""
    smol = embedded_tokenizer("smollm2")
    ids = smol("The capital of France is").input_ids
    assert ids == [504, 3575, 282, 4649, 314]  # transformers' GGUF tokenizer gives these ids
    assert smol.decode(smol(VARIED_TEXT).input_ids) == VARIED_TEXT  # byte-level: lossless
    chat = smol.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    gemma = embedded_tokenizer("gemma3-270m")
    assert gemma("Hello").input_ids[0] == gemma.bos_token_id == 2  # Gemma adds bos


# ----------------------------------------------------------------------------- SentencePiece kinds

def _spm_vocab(size: int = 400):
    """A SentencePiece-BPE vocabulary as llama.cpp's converter writes one: <unk> <s> </s>, the 256
    byte-fallback tokens, then the pieces best first with score -rank."""
    from tokenizers import SentencePieceBPETokenizer

    trainer = SentencePieceBPETokenizer()
    trainer.train_from_iterator([VARIED_TEXT.replace("<", "(")] * 3, vocab_size=size, min_frequency=1,
                                special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    learned = sorted(trainer.get_vocab().items(), key=lambda kv: kv[1])
    pieces = [t for t, _ in learned if t not in ("<unk>", "<s>", "</s>")]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, [int(t) for t in types], scores


def write_vocab_gguf(path: Path, arch: str = "llama", model: str = "llama", **overrides) -> Path:
    """A GGUF that carries only a tokenizer (and the few fields every GGUF of `arch` has).
    `overrides`: tokenizer field -> value (None: leave the field out)."""
    tokens, types, scores = _spm_vocab()
    fields = {"tokenizer.ggml.model": model, "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
              "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": scores,
              "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
              "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True} | overrides
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch", ["llama", "phi3"])  # Llama 2 / Mistral; Phi-3's normalizer variant
def test_sentencepiece_gguf_matches_transformers(arch, tmp_path):
    path = write_vocab_gguf(tmp_path / f"{arch}.gguf", arch)
    ours = converters.load_tokenizer(path)
    assert ours("Hello world").input_ids[0] == 1  # bos
    assert "€" not in VARIED_TEXT and "<0xE2>" in ours.convert_ids_to_tokens(ours("€").input_ids)  # byte fallback
    assert_same_tokenizer(ours, _reference(path))


@pytest.mark.parametrize("change, field", [
    ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.model": None}, "tokenizer.ggml.model"),
    ({"tokenizer.ggml.model": "bert"}, "tokenizer.ggml.model='bert'"),
    ({"tokenizer.ggml.token_type": [1, 1, 1]}, "tokenizer.ggml.token_type"),
    ({"tokenizer.ggml.scores": [0.5] * 10}, "tokenizer.ggml.scores"),
    ({"tokenizer.ggml.bos_token_id": 100000}, "tokenizer.ggml.bos_token_id"),
    ({"tokenizer.ggml.add_bos_token": "yes"}, "tokenizer.ggml.add_bos_token"),
    ({"tokenizer.ggml.scores": None}, "tokenizer.ggml.scores"),
    ({"tokenizer.ggml.merges": ["▁ a", "nonsense"]}, "tokenizer.ggml.merges"),
    ({"tokenizer.ggml.model": "gpt2"}, "tokenizer.ggml.merges"),  # byte-level BPE needs merges
])
def test_corrupt_tokenizer_metadata_is_named(change, field, tmp_path):
    path = write_vocab_gguf(tmp_path / "bad.gguf", **change)
    with pytest.raises(converters.CheckpointError) as error:
        converters.load_tokenizer(path)
    assert str(path) in str(error.value) and field in str(error.value)


def test_a_checkpoint_without_a_tokenizer_is_an_error_unless_asked(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("llama_gqa")
    with pytest.raises(converters.CheckpointError, match="carries no tokenizer.*tokenizer=False"):
        converters.load(path)
    model, tokenizer = converters.load(path, tokenizer=False)
    assert tokenizer is None
    vocab = write_vocab_gguf(tmp_path / "vocab.gguf")  # 656 ids: more than the model's 160 embeddings
    with pytest.raises(converters.CheckpointError, match=r"emits ids up to 655.*config\.vocab_size=160"):
        converters.load(path, tokenizer=vocab)
    config = json.loads((path / "config.json").read_text()) | {"vocab_size": 656}
    wide = save_hf(models.build(read_hf_config(config), seed=0), tmp_path / "wide")
    _, tokenizer = converters.load(wide, tokenizer=vocab)
    assert tokenizer("a b").input_ids[0] == 1


@pytest.mark.parametrize("pre, like", [("dbrx", "llama-bpe"), ("olmo", "gpt2"), ("smaug-bpe", "llama-bpe")])
def test_byte_level_pre_tokenizers_follow_llama_cpp(pre, like):
    """llama.cpp splits `dbrx` (cl100k-based vocabularies: DBRX, OLMo 2 files) as llama3 does and `olmo` (OLMo 1.7)
    as GPT-2 does: digits in threes, or in one run."""
    from mwjax.converters import gguf_tokenizer as gt

    alphabet = sorted(set(gt._bytes_to_unicode().values()))  # one token per byte, no merges

    def tokenizer(pre_name):
        vocab = gt.GGUFVocab(path="x.gguf", arch="olmo2", model="gpt2", pre=pre_name, tokens=alphabet + ["<|eos|>"],
                             token_types=None, scores=None, merges=[], special_ids={"eos_token": len(alphabet)},
                             add_bos=False, add_eos=False, chat_template=None)
        return gt.build_tokenizer(vocab).backend_tokenizer.pre_tokenizer

    words = [w for w, _ in tokenizer(pre).pre_tokenize_str("Año 1234567 it's")]
    assert words == [w for w, _ in tokenizer(like).pre_tokenize_str("Año 1234567 it's")]
    assert ("Ġ1234567" in words) == (like == "gpt2")  # GPT-2: one run of digits; llama3: " ", "123", "456", "7"
