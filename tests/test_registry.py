"""The family registry (`families.family`): every record complete, one list of families, unknown HF keys refused."""

import dataclasses
import inspect
import sys
from pathlib import Path

import gguf
import pytest
import transformers
from flax import nnx
from hf_reference import TINY_CONFIGS

import mwjax.families.family
from mwjax import models
from mwjax.converters.gguf_source import GGUF_MODEL_TYPES
from mwjax.families import family as registry
from mwjax.families.hf_config import read_hf_config, write_hf_config
from mwjax.families.keymaps import KEYMAPS, KeyMap
from mwjax.nn.config import ConfigError

FAMILIES = registry.families()
ROOT = Path(__file__).resolve().parents[1]


def _hf(name: str) -> dict:
    cls_name, kwargs = TINY_CONFIGS[name]
    return getattr(transformers, cls_name)(**kwargs).to_dict()


def _tiny_configs_of(model_type: str) -> list[str]:
    return [name for name in sorted(TINY_CONFIGS) if _hf(name)["model_type"] == model_type]


def test_the_built_in_families_are_registered():
    assert [f.model_type for f in FAMILIES] == [
        "llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text", "mixtral", "phi3"]
    assert models.FAMILIES == {f.model_type: f.model_class for f in FAMILIES}
    assert models.FUSED_MODULES == {"phi3": dict(registry.family("phi3").fused_modules)}


@pytest.mark.parametrize("record", FAMILIES, ids=lambda f: f.model_type)
def test_every_family_is_complete(record):
    assert registry.family(record.model_type) is record
    assert issubclass(record.model_class, nnx.Module)
    assert record.architecture.endswith("ForCausalLM")
    assert callable(record.read_hf) and callable(record.write_hf)
    # the converters' key table, and a GGUF mapping or an explicit "no GGUF" (None)
    assert isinstance(KEYMAPS[record.model_type], KeyMap)
    if record.gguf_architecture is not None:
        assert record.gguf_architecture in gguf.MODEL_ARCH_NAMES.values()
        assert record.gguf_architecture in GGUF_MODEL_TYPES
    # its tiny HF config(s) read and write back to the same ModelConfig
    names = _tiny_configs_of(record.model_type)
    assert names, f"tests/hf_reference.py TINY_CONFIGS has no config of {record.model_type}"
    for name in names:
        config = read_hf_config(_hf(name))
        assert registry.family(config.model_type) is record
        assert read_hf_config(write_hf_config(config)) == config


def test_one_list_of_families():
    assert set(KEYMAPS) == {f.model_type for f in FAMILIES}
    assert set(GGUF_MODEL_TYPES.values()) <= set(KEYMAPS)
    assert GGUF_MODEL_TYPES == {"llama": "llama", "qwen2": "qwen2", "gemma": "gemma", "gemma2": "gemma2",
                                "gemma3": "gemma3_text", "phi3": "phi3"}


def test_records_are_frozen_and_registered_once():
    record = registry.family("llama")
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.architecture = "X"
    with pytest.raises(TypeError):
        record.fused_modules["x"] = ("y",)
    assert registry.register(record) is record  # the same record again is harmless
    with pytest.raises(ValueError, match="'llama' is already registered"):
        registry.register(dataclasses.replace(record, architecture="OtherForCausalLM"))
    with pytest.raises(KeyError, match="no mwjax family serves model_type 'bert'"):
        registry.family("bert")
    assert registry.get("bert") is None


@pytest.mark.parametrize("key, value", [("some_new_attention_trick", True), ("quantization_config", {"bits": 4}),
                                        ("num_local_experts", 4), ("sliding_window_pattern", 6)])
def test_unknown_math_keys_are_refused_by_name(key, value):
    hf = _hf("llama_gqa") | {key: value}
    with pytest.raises(ConfigError, match=rf"mwjax does not implement '{key}' for llama.*refused, not ignored"):
        read_hf_config(hf)


def test_the_loader_names_the_file_of_a_refused_key(tiny_checkpoint, tmp_path):
    import json

    from mwjax import converters

    cfg = json.loads((tiny_checkpoint("mixtral") / "config.json").read_text()) | {"moe_shared_expert": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json.*'moe_shared_expert' for mixtral.*mwjax\.models\.mixtral"):
        converters.load(tmp_path)


@pytest.mark.parametrize("key, value", [("transformers_version", "5.23.0"), ("torch_dtype", "bfloat16"),
                                        ("use_cache", False), ("initializer_range", 0.02), ("pretraining_tp", 1),
                                        ("_name_or_path", "x"), ("some_new_attention_trick", None)])
def test_informational_keys_pass(key, value):
    assert read_hf_config(_hf("llama_gqa") | {key: value}) == read_hf_config(_hf("llama_gqa"))


def test_family_keys_pass_only_in_their_family():
    mixtral = _hf("mixtral") | {"router_aux_loss_coef": 0.02, "output_router_logits": True}
    assert read_hf_config(mixtral).num_local_experts == 4
    with pytest.raises(ConfigError, match="'router_aux_loss_coef' for qwen2"):
        read_hf_config(_hf("qwen2_bias") | {"router_aux_loss_coef": 0.02})


@pytest.mark.parametrize("cls_name", ["LlamaConfig", "MistralConfig", "Qwen2Config", "GemmaConfig", "Gemma2Config",
                                      "Gemma3TextConfig", "MixtralConfig", "Phi3Config"])
def test_transformers_default_configs_load(cls_name):
    """Every key transformers writes for a family is understood or known to be informational."""
    hf = getattr(transformers, cls_name)(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2).to_dict()
    assert read_hf_config(hf).model_type == hf["model_type"]


def test_the_files_a_new_family_needs():
    """The registry's docstring lists them; each built-in family has its record in its model class's module."""
    doc = inspect.getdoc(mwjax.families.family)
    for path in ("mwjax/models/<family>.py", "mwjax/models/__init__.py", "mwjax/converters/keymaps.py",
                 "mwjax/converters/gguf_source.py", "tests/hf_reference.py"):
        assert path in doc
        if "<" not in path:
            assert (ROOT / path).is_file()
    for record in FAMILIES:
        module = sys.modules[record.model_class.__module__]
        assert module.__name__.startswith("mwjax.families.")
        assert f'model_type="{record.model_type}"' in Path(module.__file__).read_text()
