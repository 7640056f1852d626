"""finetune.data: LLaMA-Factory's templates, label masking and truncation; synthetic tasks; deterministic batches."""

import json
import string

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from mwjax import models
from mwjax.finetune import data, train
from mwjax.nn.config import ModelConfig

SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>",
            "<start_of_turn>", "<end_of_turn>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
RECORD = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}


@pytest.fixture(scope="module")
def char_tokenizer():
    """One token per printable character, plus the llama3 / mistral / gemma / phi special tokens."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tok_models

    vocab = {"<unk>": 0} | {c: i + 1 for i, c in enumerate(string.printable)}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    out = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                               clean_up_tokenization_spaces=False)
    out.add_special_tokens({"additional_special_tokens": SPECIALS})
    out.bos_token, out.eos_token = "<s>", "</s>"
    return out


def decode(tokenizer, ids):
    return tokenizer.decode([i for i in ids if i != data.IGNORE])


def test_ignore_label_is_the_trainers():
    assert data.IGNORE == train.IGNORE


@pytest.mark.parametrize("source,target,cutoff,expected", [
    (10, 3, 20, (10, 3)),  # fits: nothing cut
    (30, 4, 20, (16, 4)),  # the target fits in half: the source is cut
    (4, 30, 20, (4, 16)),  # the source fits in half: the target is cut
    (30, 30, 20, (10, 10)),  # neither: both in proportion
    (40, 10, 20, (16, 4)),
])
def test_truncation_rule(source, target, cutoff, expected):
    assert data.infer_max_len(source, target, cutoff) == expected


def test_llama3_template(char_tokenizer):
    enc = data.encode(RECORD, char_tokenizer, data.DataConfig(template="llama3"))
    prompt = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nAdd the numbers.\n2 and 3<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert char_tokenizer.decode(enc.input_ids) == prompt + "5<|eot_id|>"
    assert decode(char_tokenizer, enc.labels) == "5<|eot_id|>"  # the end-of-turn token is learned
    n_prompt = enc.labels.index(next(x for x in enc.labels if x != data.IGNORE))
    assert char_tokenizer.decode(enc.input_ids[:n_prompt]) == prompt
    assert enc.input_ids[0] == char_tokenizer.convert_tokens_to_ids("<|begin_of_text|>")  # one special token


def test_mistral_template_and_empty_input(char_tokenizer):
    enc = data.encode({"instruction": "Say hi.", "input": "", "output": "hi"}, char_tokenizer,
                      data.DataConfig(template="mistral"))
    assert char_tokenizer.decode(enc.input_ids) == "<s>[INST] Say hi. [/INST]hi</s>"
    assert decode(char_tokenizer, enc.labels) == "hi</s>"


def split(tokenizer, enc):
    """(decoded prompt, decoded learned tokens) of an encoded example; the prompt is exactly the unlabelled head."""
    n_prompt = next(i for i, x in enumerate(enc.labels) if x != data.IGNORE)
    assert all(x != data.IGNORE for x in enc.labels[n_prompt:]) and enc.labels[n_prompt:] == enc.input_ids[n_prompt:]
    return tokenizer.decode(enc.input_ids[:n_prompt]), decode(tokenizer, enc.labels)


# LLaMA-Factory v0.9.0 (template.py at dfff411e): gemma = bos + "<start_of_turn>user\n{q}<end_of_turn>\n<start_of_turn>
# model\n", response "{a}" + the tokenizer's eos (efficient_eos); a system prompt is bare text after bos.
# phi = bos + ["<|system|>\n{s}<|end|>\n"] + "<|user|>\n{q}<|end|>\n<|assistant|>\n", response "{a}<|end|>".
@pytest.mark.parametrize("template, system, prompt, response", [
    ("gemma", "", "<s><start_of_turn>user\nAdd the numbers.\n2 and 3<end_of_turn>\n<start_of_turn>model\n", "5</s>"),
    ("gemma", "Be brief.", "<s>Be brief.<start_of_turn>user\nAdd the numbers.\n2 and 3<end_of_turn>\n"
                           "<start_of_turn>model\n", "5</s>"),
    ("phi", "", "<s><|user|>\nAdd the numbers.\n2 and 3<|end|>\n<|assistant|>\n", "5<|end|>"),
    ("phi", "Be brief.", "<s><|system|>\nBe brief.<|end|>\n<|user|>\nAdd the numbers.\n2 and 3<|end|>\n"
                         "<|assistant|>\n", "5<|end|>"),
])
def test_gemma_and_phi_templates(char_tokenizer, template, system, prompt, response):
    record = RECORD | ({"system": system} if system else {})
    enc = data.encode(record, char_tokenizer, data.DataConfig(template=template))
    assert split(char_tokenizer, enc) == (prompt, response)
    assert char_tokenizer.decode(enc.input_ids) == prompt + response
    special = {"gemma": "<start_of_turn>", "phi": "<|user|>"}[template]  # one token, not its characters
    assert char_tokenizer.convert_tokens_to_ids(special) in enc.input_ids


def test_gemma_template_with_gemmas_tokenizer(embedded_tokenizer):
    """Gemma's real SentencePiece tokenizer: bos <bos>, the turn markers single tokens, the response ended by
    <eos> (the tokenizer's eos under efficient_eos), not by <end_of_turn>."""
    tokenizer = embedded_tokenizer("gemma3-270m")
    enc = data.encode(RECORD, tokenizer, data.DataConfig(template="gemma"))
    prompt, response = split(tokenizer, enc)
    assert prompt == "<bos><start_of_turn>user\nAdd the numbers.\n2 and 3<end_of_turn>\n<start_of_turn>model\n"
    assert response == "5<eos>"
    turn = [tokenizer.convert_tokens_to_ids(t) for t in ("<start_of_turn>", "<end_of_turn>")]
    assert [enc.input_ids.count(t) for t in turn] == [2, 1]
    assert enc.input_ids[0] == tokenizer.bos_token_id and enc.input_ids[-1] == tokenizer.eos_token_id


def test_gemma_eos_survives_truncation_and_phis_end_does_not(char_tokenizer):
    """efficient_eos (gemma): the eos is reserved out of cutoff_len and appended after the cut; phi's <|end|> is
    part of the response and is cut with it (LLaMA-Factory's `_encode_supervised_example`)."""
    long = {"instruction": "x" * 10, "input": "", "output": "y" * 100}
    gemma = data.encode(long, char_tokenizer, data.DataConfig(template="gemma", cutoff_len=64))
    # prompt: 26 tokens; infer_max_len(26, 100, 63) keeps 37 response tokens, then the eos
    assert len(gemma.input_ids) == 64 and decode(char_tokenizer, gemma.labels) == "y" * 37 + "</s>"
    phi = data.encode(long, char_tokenizer, data.DataConfig(template="phi", cutoff_len=64))
    # prompt: 17 tokens; infer_max_len(17, 101, 64) keeps 47 response tokens: <|end|> is cut away
    assert len(phi.input_ids) == 64 and decode(char_tokenizer, phi.labels) == "y" * 47


def test_truncation_applies_to_encoded_examples(char_tokenizer):
    long = {"instruction": "x" * 200, "input": "", "output": "y" * 10}
    enc = data.encode(long, char_tokenizer, data.DataConfig(template="plain", cutoff_len=64))
    assert len(enc.input_ids) == 64 and decode(char_tokenizer, enc.labels) == "y" * 10 + "</s>"


def test_tokenizer_chat_template(smollm2_tokenizer):
    enc = data.encode(RECORD, smollm2_tokenizer, data.DataConfig(template="tokenizer"))
    text = smollm2_tokenizer.decode(enc.input_ids)
    assert "<|im_start|>user\nAdd the numbers.\n2 and 3<|im_end|>" in text
    assert decode(smollm2_tokenizer, enc.labels).startswith("5<|im_end|>")


def test_template_errors(char_tokenizer, smollm2_tokenizer):
    with pytest.raises(ValueError, match="unknown chat template 'alpaca'"):
        data.DataConfig(template="alpaca")
    with pytest.raises(ValueError, match="no chat template; use 'plain'"):
        data.encode(RECORD, char_tokenizer, data.DataConfig(template="tokenizer"))
    with pytest.raises(ValueError, match="needs the special token '<|begin_of_text|>'"):
        data.encode(RECORD, smollm2_tokenizer, data.DataConfig(template="llama3"))
    with pytest.raises(ValueError, match="template 'gemma' needs the special token '<start_of_turn>'"):
        data.encode(RECORD, smollm2_tokenizer, data.DataConfig(template="gemma"))
    with pytest.raises(ValueError, match=r"template 'phi' needs the special token '<\|end\|>'"):
        data.encode(RECORD, smollm2_tokenizer, data.DataConfig(template="phi"))


def test_local_json_and_missing_columns(tmp_path):
    rows = [RECORD, {"instruction": "b", "output": "c"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for name in ("a.json", "a.jsonl"):
        got = data.load_examples(data.DataConfig(source=str(tmp_path / name)))
        assert got == [RECORD, {"instruction": "b", "input": "", "output": "c"}]
    # numbers are text: an answer of 0 stays "0" (it was dropped as empty), a numeric system prompt a string
    (tmp_path / "n.json").write_text(json.dumps([{"instruction": "1 - 1", "output": 0, "system": 7, "input": None}]))
    assert data.load_examples(data.DataConfig(source=str(tmp_path / "n.json"))) == [
        {"instruction": "1 - 1", "input": "", "output": "0", "system": "7"}]
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "a", "response": "b"}]))
    with pytest.raises(ValueError, match="bad.json, record 0: the record has no 'output' column"):
        data.load_examples(data.DataConfig(source=str(tmp_path / "bad.json")))


GOOD = json.dumps({"instruction": "a", "output": "b"})


@pytest.mark.parametrize("name, text, message", [
    ("empty.jsonl", "", "empty.jsonl holds no records"),
    ("blank.jsonl", "\n \n", "blank.jsonl holds no records"),
    ("empty.json", "[]", "empty.json holds no records"),
    ("second.jsonl", f"{GOOD}\n{{'instruction': 1}}\n", r"second.jsonl, line 2 column 2: not JSON \(Expecting"),
    ("third.jsonl", f"{GOOD}\n\n[1, 2]\n", "third.jsonl, line 3: a record is a JSON object .* got list"),
    ("nested.jsonl", f'{GOOD}\n{{"instruction": ["a"], "output": "b"}}', "nested.jsonl, line 2: 'instruction' is a "
                                                                           "list, not text"),
    ("broken.json", "[\n" + GOOD + ",\n  {oops}\n]", r"broken.json, line 3 column 4: not JSON"),
    ("object.json", GOOD, "object.json: expected a JSON list of alpaca records, got dict .*jsonl"),
    ("latin1.jsonl", None, "latin1.jsonl: not UTF-8 text"),
])
def test_bad_data_files_are_named_with_the_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_bytes("é".encode("latin-1")) if text is None else path.write_text(text)
    with pytest.raises(ValueError, match=message):
        data.load_examples(data.DataConfig(source=str(path)))
    with pytest.raises(FileNotFoundError, match="nothing.jsonl: no such data file"):
        data.load_examples(data.DataConfig(source=str(tmp_path / "nothing.jsonl")))


def test_validation_split_rounds_up_as_datasets_does():
    assert data.validation_size(0.05, 52002) == 2601  # alpaca_gpt4_en under LLaMA-Factory's val_size 0.05
    assert data.validation_size(0.05, 100) == 5 and data.validation_size(64, 600) == 64


def test_synthetic_tasks_are_checkable():
    rows = data.synthetic_examples(300, seed=1)
    assert rows == data.synthetic_examples(300, seed=1) and rows != data.synthetic_examples(300, seed=2)
    assert {r["task"] for r in rows} == {"add", "subtract", "reverse", "upper", "length", "sort", "next_letter"}
    for row in rows:
        assert data.check_answer(row, f" {row['output']}.\nmore text")
        assert not data.check_answer(row, row["output"] + "0")
    upper = next(r for r in rows if r["task"] == "upper")
    assert not data.check_answer(upper, upper["output"].lower())


def test_build_splits_deterministically(char_tokenizer):
    cfg = data.DataConfig(source="synthetic", template="plain", num_synthetic=100, val_size=0.1, seed=3)
    train_a, val_a = data.build(cfg, char_tokenizer)
    train_b, val_b = data.build(cfg, char_tokenizer)
    assert (len(train_a), len(val_a)) == (90, 10) and train_a == train_b and val_a == val_b
    assert len(data.build(data.DataConfig(num_synthetic=100, template="plain", val_size=7), char_tokenizer)[1]) == 7
    with pytest.raises(ValueError, match="leaves no training data"):
        data.build(data.DataConfig(num_synthetic=5, template="plain", val_size=5), char_tokenizer)


def encoded(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(4, 12))
        ids = rng.integers(1, 50, length).tolist()
        out.append(data.Encoded(ids, [data.IGNORE] * 2 + ids[2:]))
    return out


def test_batches_pad_and_shard_over_hosts():
    examples = encoded(20)
    whole = data.BatchLoader(examples, 4, 16, seed=1, pad_id=0, process_index=0, process_count=1)
    halves = [data.BatchLoader(examples, 4, 16, seed=1, pad_id=0, process_index=i, process_count=2) for i in (0, 1)]
    assert len(whole) == len(halves[0]) == 5
    for full, a, b in zip(whole.epoch(2), halves[0].epoch(2), halves[1].epoch(2), strict=True):
        for key in data.BatchLoader.KEYS:
            assert full[key].dtype == np.int32 and full[key].shape == (4, 16)
            np.testing.assert_array_equal(full[key], np.concatenate([a[key], b[key]]))
        pad = full["attention_mask"] == 0
        assert np.all(full["labels"][pad] == data.IGNORE) and np.all(full["segment_ids"][pad] == 0)
    first = next(whole.epoch(0))["tokens"]
    assert not np.array_equal(first, next(whole.epoch(1))["tokens"])  # a new order each epoch
    with pytest.raises(ValueError, match="cannot be split evenly over 3 hosts"):
        data.BatchLoader(examples, 4, 16, process_index=0, process_count=3)


def test_resume_reproduces_the_batches():
    loader = data.BatchLoader(encoded(30), 4, 16, seed=5, process_index=0, process_count=1)
    full = list(loader.epoch(1))
    resumed = list(loader.epoch(1, start_step=3))
    for a, b in zip(full[3:], resumed, strict=True):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_last_partial_batch_is_padded_when_kept():
    loader = data.BatchLoader(encoded(10), 4, 16, process_index=0, process_count=1, drop_last=False)
    last = list(loader.epoch(0))[-1]
    assert len(loader) == 3 and np.all(last["labels"][2:] == data.IGNORE)


def test_packing_keeps_examples_apart():
    examples = encoded(12, seed=2)
    loader = data.BatchLoader(examples, 2, 32, packing=True, process_index=0, process_count=1)
    batch = next(loader.epoch(0))
    row = 0
    segments = batch["segment_ids"][row]
    assert segments.max() >= 2
    for s in range(1, segments.max() + 1):
        where = np.flatnonzero(segments == s)
        np.testing.assert_array_equal(batch["positions"][row, where], np.arange(len(where)))
        assert batch["labels"][row, where[0]] == data.IGNORE

    config = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = models.build(config, seed=0)
    packed = models.forward(model, jnp.asarray(batch["tokens"][row:row + 1]),
                            positions=jnp.asarray(batch["positions"][row:row + 1]),
                            segment_ids=jnp.asarray(batch["segment_ids"][row:row + 1]))
    for s in range(1, segments.max() + 1):
        where = np.flatnonzero(segments == s)
        alone = models.forward(model, jnp.asarray(batch["tokens"][row:row + 1, where]))
        np.testing.assert_allclose(packed[0, where], alone[0], rtol=1e-5, atol=1e-5)
