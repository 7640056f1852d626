"""Every input that meets a model is checked, with an error naming the file and what to do: adapters (finite,
floating point, complete, in range, of this base model), tokenizers (no id past the embedding table), torch
indices (paths inside the checkpoint), tokenizer code (never run)."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
import transformers
from hf_reference import tiny_tokenizer
from safetensors.numpy import load_file, save_file

from mwjax import models, peft
from mwjax.converters import CheckpointError, load, save_hf
from mwjax.converters.hf_export import hf_tensors
from mwjax.families.hf_config import read_hf_config, write_hf_config

HF = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2)
CONFIG = read_hf_config(transformers.LlamaConfig(**HF).to_dict())
WIDE = read_hf_config(transformers.LlamaConfig(**(HF | {"hidden_size": 64})).to_dict())


@pytest.fixture(scope="module")
def base():
    return models.build(CONFIG, seed=0)


@pytest.fixture(scope="module")
def hf_dir(base, tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return save_hf(base, tmp_path_factory.mktemp("hf") / "model", tokenizer=tiny_tokenizer())


def adapted(model, dora: bool = False):
    out = peft.add_adapters(model, peft.LoraConfig(rank=2, alpha=4.0, dora=dora))
    for i, layer in enumerate(peft.adapters(out).values()):
        layer.lora_b[...] = jax.random.normal(jax.random.key(i), layer.lora_b.shape) * 0.1
    return out


@pytest.fixture(scope="module")
def peft_dir(base, tmp_path_factory):
    return peft.export_peft(adapted(base), tmp_path_factory.mktemp("peft") / "adapter")


def copy(directory: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(directory, tmp_path / directory.name))


def edit_tensors(directory: Path, change) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_config(directory: Path, **values) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | values))


B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"

# ------------------------------------------------------------------------------------------------ adapters


@pytest.mark.parametrize("name, corrupt, message", [
    ("NaN lora_B", lambda d: edit_tensors(d, lambda t: t[B0].__setitem__((0, 0), np.nan)),
     r"module model.layers.0.self_attn.q_proj's lora_B.weight holds 1 NaN / inf values"),
    ("inf lora_A", lambda d: edit_tensors(d, lambda t: t[B0.replace("lora_B", "lora_A")].__setitem__((1, 1), np.inf)),
     r"q_proj's lora_A.weight holds 1 NaN / inf values"),
    ("int32 lora_B", lambda d: edit_tensors(d, lambda t: t.__setitem__(B0, t[B0].astype(np.int32))),
     r"q_proj's lora_B.weight is stored as int32, not a floating-point type"),
    ("missing lora_B", lambda d: edit_tensors(d, lambda t: t.pop(B0)),
     r"module model.layers.0.self_attn.q_proj's adapter has no lora_B.weight"),
    ("lora_B of another width", lambda d: edit_tensors(d, lambda t: t.__setitem__(B0, np.zeros((64, 2), np.float32))),
     r"module model.layers.0.self_attn.q_proj: lora_A / lora_B of shapes .* do not fit the layer \[32 -> 32\]"),
    ("an adapter on a module the base lacks", lambda d: edit_tensors(d, lambda t: t.__setitem__(
        B0.replace("layers.0", "layers.7"), t[B0]) or t.__setitem__(B0.replace("layers.0", "layers.7").replace(
            "lora_B", "lora_A"), t[B0.replace("lora_B", "lora_A")])),
     r"module model.layers.7.self_attn.q_proj .* is not a linear layer of the base llama model"),
    ("a bias tensor", lambda d: edit_tensors(d, lambda t: t.__setitem__(B0.replace("lora_B.weight", "bias"),
                                                                        np.zeros(32, np.float32))),
     r"tensor '.*q_proj.bias' is not a LoRA/DoRA tensor"),
    ("lora_alpha NaN", lambda d: (d / "adapter_config.json").write_text(
        (d / "adapter_config.json").read_text().replace('"lora_alpha": 4.0', '"lora_alpha": NaN')),
     r"adapter_config.json: lora_alpha: LoRA alpha must be a finite number > 0, got nan"),
    ("lora_alpha 0", lambda d: edit_config(d, lora_alpha=0), r"lora_alpha: LoRA alpha must be a finite number > 0"),
    ("r 0", lambda d: edit_config(d, r=0), r"adapter_config.json: r: LoRA rank must be an integer >= 1, got 0"),
    ("r 2.5", lambda d: edit_config(d, r=2.5), r"r: LoRA rank must be an integer >= 1, got 2.5"),
    ("r 4 over rank-2 tensors", lambda d: edit_config(d, r=4), r"at r=4 \(adapter_config.json\)"),
    ("lora_dropout 1.5", lambda d: edit_config(d, lora_dropout=1.5),
     r"lora_dropout: LoRA dropout must lie in \[0, 1\)"),
    ("use_dora without magnitudes", lambda d: edit_config(d, use_dora=True),
     r"has no lora_magnitude_vector but adapter_config.json says use_dora=True"),
    ("alpha_pattern", lambda d: edit_config(d, alpha_pattern={"q_proj": 8}), r"alpha_pattern=.* is not implemented"),
    ("invalid JSON", lambda d: (d / "adapter_config.json").write_text("{"), r"adapter_config.json is not valid JSON"),
    ("a truncated safetensors file", lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x10"),
     r"adapter_model.safetensors is not a valid safetensors file"),
])
def test_a_bad_peft_adapter_is_refused_naming_the_file_and_module(base, peft_dir, tmp_path, name, corrupt, message):
    directory = copy(peft_dir, tmp_path)
    corrupt(directory)
    with pytest.raises(peft.AdapterError, match=message) as error:
        peft.load_adapters(base, directory)
    assert str(directory) in str(error.value)


def test_the_clean_adapter_loads(base, peft_dir):
    loaded = peft.load_adapters(base, peft_dir)
    tokens = np.arange(6, dtype=np.int32)[None]
    np.testing.assert_allclose(np.asarray(loaded(tokens)), np.asarray(adapted(base)(tokens)), atol=1e-5)


def test_an_orbax_adapter_of_another_width_names_the_adapter_and_module(tmp_path):
    directory = peft.save_adapters(adapted(models.build(WIDE, seed=0)), tmp_path / "adapter")
    with pytest.raises(peft.AdapterError, match=re.escape(f"{directory}: module model.layers.0.mlp.down_proj's "
                                                          "lora_b is stored with shape (2, 64), but")) as error:
        peft.load_adapters(models.build(CONFIG, seed=0), directory)
    assert "another width" in str(error.value)


def test_an_orbax_adapter_with_nan_values_is_refused(base, tmp_path):
    model = adapted(base)
    layer = peft.adapters(model)["model.layers.1.mlp.up_proj"]
    layer.lora_b[...] = layer.lora_b[...].at[0, 0].set(np.nan)
    directory = peft.save_adapters(model, tmp_path / "adapter")
    with pytest.raises(peft.AdapterError, match=r"module model.layers.1.mlp.up_proj's lora_b holds 1 NaN"):
        peft.load_adapters(base, directory)


def test_an_orbax_adapter_with_a_bad_config_is_refused(base, tmp_path):
    directory = peft.save_adapters(adapted(base), tmp_path / "adapter")
    raw = directory / "lora_config" / "metadata"  # orbax's JsonSave
    raw.write_text(json.dumps(json.loads(raw.read_text()) | {"alpha": float("nan")}))
    with pytest.raises(peft.AdapterError, match=r"lora_config: LoRA alpha must be a finite number > 0"):
        peft.load_adapters(base, directory)


# ------------------------------------------------------------------------------------------------ tokenizers


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_naming_both(hf_dir, embedded_tokenizer):
    embedded_tokenizer("smollm2")  # built once for the session
    with pytest.raises(CheckpointError, match=r"the tokenizer embedded:smollm2 emits ids up to 49151 \(49152 ids\), "
                                              r"but the model .*model has config.vocab_size=64: every id >= 64"):
        load(hf_dir, tokenizer="embedded:smollm2")


def test_a_checkpoint_whose_own_tokenizer_is_too_large_is_refused(hf_dir, tmp_path):
    directory = copy(hf_dir, tmp_path)
    tok = tiny_tokenizer()
    tok.add_tokens([f"extra{i}" for i in range(40)])  # ids up to 68 > 64
    tok.save_pretrained(directory)
    with pytest.raises(CheckpointError, match=r"tokenizer .*model's own tokenizer emits ids up to 68"):
        load(directory)


def test_a_smaller_tokenizer_is_fine(hf_dir):
    model, tok = load(hf_dir)  # 29 ids, 64 embeddings: models pad their vocabulary
    assert len(tok) == 29 and model.config.vocab_size == 64


def test_tokenizer_code_is_never_run(hf_dir, tmp_path):
    directory = copy(hf_dir, tmp_path)
    marker = tmp_path / "ran"
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config |= {"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}, "tokenizer_class": "EvilTokenizer"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                       "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    with pytest.raises(CheckpointError, match=r"its tokenizer is the checkpoint's own Python code .* never runs"):
        load(directory)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ torch indices


@pytest.fixture(scope="module")
def torch_dir(base, tmp_path_factory):
    torch = pytest.importorskip("torch")
    directory = tmp_path_factory.mktemp("torch") / "model"
    directory.mkdir()
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in hf_tensors(base).items()}
    keys = sorted(tensors)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, part in shards.items():
        torch.save({k: tensors[k] for k in part}, directory / name)
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(write_hf_config(base.config)))
    return directory


def edit_torch_index(directory: Path, change) -> None:
    path = directory / "pytorch_model.bin.index.json"
    data = json.loads(path.read_text())
    change(data["weight_map"])
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("name, corrupt, message", [
    ("absolute path", lambda d: edit_torch_index(d, lambda m: m.update({next(iter(m)): "/etc/passwd"})),
     r"names \['/etc/passwd'\], not file names in the checkpoint directory"),
    ("..", lambda d: edit_torch_index(d, lambda m: m.update({next(iter(m)): "../other/pytorch_model.bin"})),
     r"names \['../other/pytorch_model.bin'\], not file names"),
    ("missing shard", lambda d: edit_torch_index(d, lambda m: m.update({next(iter(m)): "nope.bin"})),
     r"names shard nope.bin, which does not exist"),
    ("invalid JSON", lambda d: (d / "pytorch_model.bin.index.json").write_text('{"weight_map": {'),
     r"pytorch_model.bin.index.json is not a JSON object with a weight_map \(JSONDecodeError"),
    ("no weight_map", lambda d: (d / "pytorch_model.bin.index.json").write_text("{}"),
     r"pytorch_model.bin.index.json: 'weight_map' must map every tensor name to a shard file name"),
])
def test_a_bad_torch_index_is_refused_naming_the_file(base, torch_dir, tmp_path, name, corrupt, message):
    directory = copy(torch_dir, tmp_path)
    corrupt(directory)
    with pytest.raises(CheckpointError, match=message) as error:
        load(directory, tokenizer=False)
    assert str(directory) in str(error.value)


def test_the_clean_torch_index_loads(base, torch_dir):
    model, _ = load(torch_dir, tokenizer=False)
    assert all(np.array_equal(a, b) for a, b in zip(hf_tensors(model).values(), hf_tensors(base).values(),
                                                    strict=True))


# ------------------------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize("name, change, message", [
    ("model.safetensors beside an index", lambda d, shards: shutil.copy(d / shards[0], d / "model.safetensors"),
     r"holds both model.safetensors \(a single-file checkpoint\) and model.safetensors.index.json"),
    ("an unlisted shard", lambda d, shards: shutil.copy(d / shards[0], d / "model-00009-of-00009.safetensors"),
     r"model-00009-of-00009.safetensors is not listed in model.safetensors.index.json .* stale files"),
    ("a listed shard missing", lambda d, shards: (d / shards[-1]).unlink(),
     r"names shard model-0000\d-of-0000\d.safetensors, which does not exist"),
])
def test_safetensors_files_that_disagree_with_the_index_are_refused(base, tmp_path, name, change, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        directory = save_hf(base, tmp_path / "model", max_shard_bytes=20_000)
    shards = sorted(p.name for p in directory.glob("model-*.safetensors"))
    change(directory, shards)
    with pytest.raises(CheckpointError, match=message) as error:
        load(directory, tokenizer=False)
    assert "save_hf" in str(error.value) or "does not exist" in str(error.value)


def test_token_ids_past_the_vocabulary_are_refused_by_perplexity_and_generate(base):
    from mwjax.eval import generate, perplexity

    text = np.arange(200) % 64
    with pytest.raises(ValueError, match=r"token id 429 is outside the model's vocabulary \[0, 64\)"):
        perplexity(base, np.concatenate([[429], text]), seqlen=16, progress=False)
    with pytest.raises(ValueError, match=r"seqlen=0: a chunk needs an integer length >= 1"):
        perplexity(base, text, seqlen=0, progress=False)
    with pytest.raises(ValueError, match=r"max_chunks=0: write an integer >= 1"):
        perplexity(base, text, seqlen=16, max_chunks=0, progress=False)
    with pytest.raises(ValueError, match=r"prompt 1: token id 64 is outside"):
        generate(base, [[1, 2], [3, 64]], 2)


def test_a_super_weight_outside_the_model_is_refused(base):
    from mwjax import attacks, massive

    for layer, row, col, message in ((2, 0, 0, "layer"), (0, 32, 0, r"row must lie in \[0, 32\)"),
                                     (0, 0, 48, r"col in \[0, 48\)"), (0, -1, 0, "row must")):
        with pytest.raises(ValueError, match=message):
            massive.super_weight_at(base, layer, row, col)
        sw = massive.SuperWeight(layer, row, col, 0.0, 0.0, 0.0, 0)
        with pytest.raises(ValueError, match=message):
            attacks.scale_super_weight(base, sw, 0.0)
    sw = massive.super_weight_at(base, 1, 31, 47)
    assert sw.weight == float(base.model.layers[1].mlp.down_proj.kernel[47, 31])
