"""Checkpoint formats in and out: safetensors (single / sharded), torch .bin, save_hf, orbax; clear errors."""

import json
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from hf_reference import assert_logits_close, hf_logits, make_hf_model, our_logits, random_tokens, tiny_tokenizer, torch
from safetensors.numpy import load_file, save_file

from mwjax import converters
from mwjax.converters import checkpoint, embedded
from mwjax.converters.sources import SafetensorsSource
from mwjax.nn.config import ConfigError


@pytest.mark.parametrize("name", ["llama_gqa", "llama_mqa_tied", "qwen2_sliding", "llama_bias_headdim", "gemma",
                                  "gemma2",
                                  "gemma3", "mixtral", "phi3_longrope", "phi3_partial_rotary", "olmo", "olmo_clip",
                                  "olmo2"])
def test_save_hf_round_trip(name, hf_checkpoint, tmp_path):
    hf, path = hf_checkpoint(name)
    model, _ = converters.load(path, tokenizer=False)
    converters.save_hf(model, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(reloaded) is type(hf)
    tokens = random_tokens(200, hf.config.vocab_size)
    assert_logits_close(our_logits(model, tokens), hf_logits(reloaded, tokens))
    for key, value in hf.state_dict().items():  # the exported weights are the original ones
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
    # and back into mwjax, bit for bit
    again, _ = converters.load(tmp_path, tokenizer=False)
    np.testing.assert_array_equal(our_logits(again, tokens), our_logits(model, tokens))


def test_save_hf_sharded_bfloat16(hf_checkpoint, tmp_path):
    hf, path = hf_checkpoint("llama_gqa")
    model, _ = converters.load(path, dtype=jnp.bfloat16, tokenizer=False)
    converters.save_hf(model, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.dtype == torch.bfloat16
    ref = reloaded.model.layers[1].mlp.up_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(ref, np.asarray(model.model.layers[1].mlp.up_proj.kernel[...], np.float32).T)
    again, _ = converters.load(tmp_path, dtype=jnp.bfloat16, tokenizer=False)
    tokens = random_tokens(32)
    np.testing.assert_array_equal(our_logits(again, tokens), our_logits(model, tokens))


def test_sharded_hf_checkpoint_and_torch_bin(hf_checkpoint, tmp_path):
    hf, _ = hf_checkpoint("llama_gqa")
    tokens = random_tokens(128)
    ref = hf_logits(hf, tokens)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    model, _ = converters.load(tmp_path / "sharded", tokenizer=False)
    assert_logits_close(our_logits(model, tokens), ref)
    for legacy in (False, True):  # zip format (torch >= 1.6), and the older pickle format, read without mmap
        directory = tmp_path / f"bin_legacy{legacy}"
        directory.mkdir()
        torch.save(hf.state_dict(), directory / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
        hf.config.save_pretrained(directory)
        model, _ = converters.load(directory, tokenizer=False)
        assert_logits_close(our_logits(model, tokens), ref)


def test_bfloat16_safetensors_are_read(tmp_path):
    hf = make_hf_model("llama_gqa").to(torch.bfloat16)  # not the shared fixture: this one changes dtype
    hf.save_pretrained(tmp_path)
    model, _ = converters.load(tmp_path, dtype=jnp.float32, tokenizer=False)
    expected = hf.model.layers[0].self_attn.q_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(np.asarray(model.model.layers[0].self_attn.q_proj.kernel[...]), expected)


def test_orbax_checkpoint_and_cli(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("qwen2_bias")
    model, _ = converters.load(path, tokenizer=False)
    tokens = random_tokens(64)
    checkpoint.save(model, tmp_path / "ckpt")
    with pytest.raises(FileExistsError):
        checkpoint.save(model, tmp_path / "ckpt")
    restored = checkpoint.restore(tmp_path / "ckpt")
    assert restored.config == model.config
    np.testing.assert_array_equal(our_logits(restored, tokens), our_logits(model, tokens))
    as_bf16 = checkpoint.restore(tmp_path / "ckpt", dtype=jnp.bfloat16)
    assert as_bf16.model.norm.scale[...].dtype == jnp.bfloat16

    # the CLI, with a tokenizer carried along
    tok_src = tmp_path / "with_tok"
    shutil.copytree(path, tok_src)
    tiny_tokenizer().save_pretrained(tok_src)
    out = subprocess.run([sys.executable, "-m", "converters.to_orbax", f"--src={tok_src}", f"--dst={tmp_path / 'cli'}"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    model2, tok2 = converters.load(tmp_path / "cli")
    assert tok2 is not None and tok2.bos_token == "<s>"
    np.testing.assert_array_equal(our_logits(model2, tokens), our_logits(model, tokens))
    assert "orbax" not in out.stderr.lower()  # no INFO chatter per save
    again = subprocess.run([sys.executable, "-m", "converters.to_orbax", "--src=/nonexistent",
                            f"--dst={tmp_path / 'cli'}"], capture_output=True, text=True, timeout=300)
    # refused before loading the (missing) source
    assert again.returncode != 0 and "pass --overwrite to replace it" in again.stderr, again.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- errors


def _copy(path, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(path, dst)
    return dst


def test_unknown_architecture_is_named(tiny_checkpoint, tmp_path):
    dst = _copy(tiny_checkpoint("llama_gqa"), tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    cfg |= {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"unsupported model_type 'gpt_neox'.*GPTNeoXForCausalLM"):
        converters.load(dst)


def test_unsupported_rope_type_is_named(tiny_checkpoint, tmp_path):
    dst = _copy(tiny_checkpoint("llama_gqa"), tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg |= {"rope_theta": 10000.0, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="rope type 'yarn' is not implemented"):
        converters.load(dst)


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    dst = _copy(tiny_checkpoint("llama_gqa"), tmp_path)
    tensors = load_file(dst / "model.safetensors")
    del tensors["model.layers.2.mlp.down_proj.weight"]
    save_file(tensors, dst / "model.safetensors")
    with pytest.raises(converters.MissingTensorError, match=r"'model\.layers\.2\.mlp\.down_proj\.weight'"):
        converters.load(dst, tokenizer=False)


def test_wrong_shape_is_named(tiny_checkpoint, tmp_path):
    dst = _copy(tiny_checkpoint("llama_gqa"), tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(converters.ShapeMismatchError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight' has shape "
                                                              r"\[64, 96\] but the config implies \[64, 100\]"):
        converters.load(dst, tokenizer=False)


def test_corrupt_files_are_reported(tiny_checkpoint, tmp_path):
    dst = _copy(tiny_checkpoint("llama_gqa"), tmp_path)
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(converters.CheckpointError, match="corrupt or truncated"):
        converters.load(dst, tokenizer=False)
    (dst / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(converters.CheckpointError, match="not a valid safetensors file"):
        SafetensorsSource(dst)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 100)
    with pytest.raises(converters.CheckpointError, match="not a valid GGUF file"):
        converters.load(bad)
    (dst / "config.json").write_text("{not json")
    with pytest.raises(converters.CheckpointError, match="not valid JSON"):
        converters.load(dst)


def test_paths_that_are_not_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        converters.load(tmp_path / "nope")
    with pytest.raises(converters.UnsupportedCheckpointError, match="no config.json"):
        converters.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match=r"llama config lacks required keys \['vocab_size'"):
        converters.load(tmp_path)
    with pytest.raises(ValueError, match="unknown embedded model"):
        converters.load("embedded:gpt5")


def test_hub_id_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(converters.CheckpointError, match="could not download 'someone/some-model'.*local directory"):
        converters.load("someone/some-model")


def test_embedded_model_resolves_to_a_gguf():
    path = embedded.path("smollm2")
    assert path.suffix == ".gguf" and path.stat().st_size > 90_000_000
