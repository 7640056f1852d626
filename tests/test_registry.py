"""The family registry (`mwjax.families`): every record complete, one list of families, one folder per family,
unknown HF keys refused."""

import dataclasses
import importlib
import inspect
from pathlib import Path

import gguf
import pytest
import transformers
from flax import nnx
from hf_reference import TINY_CONFIGS
from test_layering import imports, modules

import mwjax.families
from mwjax import families as registry
from mwjax import models
from mwjax.families.hf_config import read_hf_config, write_hf_config
from mwjax.families.keymap import KeyMap
from mwjax.families.record import Family, GGUFHooks
from mwjax.nn.config import ConfigError

FAMILIES = registry.families()
ROOT = Path(__file__).resolve().parents[1]
FOLDERS = sorted(p.parent for p in (ROOT / "mwjax" / "families").glob("*/__init__.py"))
FOLDER_FILES = ("__init__.py", "model.py", "hf.py", "keys.py", "gguf.py")


def _hf(name: str) -> dict:
    cls_name, kwargs = TINY_CONFIGS[name]
    return getattr(transformers, cls_name)(**kwargs).to_dict()


def _tiny_configs_of(model_type: str) -> list[str]:
    return [name for name in sorted(TINY_CONFIGS) if _hf(name)["model_type"] == model_type]


def test_the_built_in_families_are_registered():
    assert [f.model_type for f in FAMILIES] == [
        "llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text", "mixtral", "phi3", "olmo", "olmo2"]
    assert FAMILIES == models.RECORDS
    assert [f.model_class for f in FAMILIES] == [models.LlamaForCausalLM] * 3 + [models.GemmaForCausalLM] * 3 + [
        models.MixtralForCausalLM, models.Phi3ForCausalLM, models.OlmoForCausalLM, models.Olmo2ForCausalLM]
    assert {f.model_type: dict(f.fused_modules) for f in FAMILIES if f.fused_modules} == {
        "phi3": dict(registry.family("phi3").fused_modules)}
    for derived in ("FAMILIES", "FUSED_MODULES", "register"):  # the registry is the list, nothing derived from it
        assert not hasattr(models, derived)


@pytest.mark.parametrize("record", FAMILIES, ids=lambda f: f.model_type)
def test_every_family_is_complete(record):
    assert registry.family(record.model_type) is record
    assert issubclass(record.model_class, nnx.Module)
    assert record.architecture.endswith("ForCausalLM")
    assert callable(record.read_hf) and callable(record.write_hf)
    # the converters' key table, and GGUF hooks or an explicit "no GGUF" (None)
    assert isinstance(record.keymap, KeyMap)
    if record.gguf is not None:
        hooks = record.gguf
        assert isinstance(hooks, GGUFHooks)
        assert hooks.architecture in gguf.MODEL_ARCH_NAMES.values()
        assert registry.gguf_hooks(hooks.architecture) is hooks  # one set of hooks per architecture
        assert registry.family(hooks.model_type).gguf is hooks
        assert callable(hooks.config) and (hooks.tensor is None or callable(hooks.tensor))
    # its tiny HF config(s) read and write back to the same ModelConfig
    names = _tiny_configs_of(record.model_type)
    assert names, f"tests/hf_reference.py TINY_CONFIGS has no config of {record.model_type}"
    for name in names:
        config = read_hf_config(_hf(name))
        assert registry.family(config.model_type) is record
        assert read_hf_config(write_hf_config(config)) == config


def test_a_record_must_say_whether_it_reads_gguf():
    fields = {f.name: f for f in dataclasses.fields(Family)}
    for name in ("model_class", "read_hf", "write_hf", "keymap", "gguf"):  # no default: every record says it
        assert fields[name].default is dataclasses.MISSING and fields[name].default_factory is dataclasses.MISSING


def test_one_list_of_families():
    assert len({f.model_type for f in FAMILIES}) == len(FAMILIES)
    gguf_types = {arch: registry.gguf_hooks(arch).model_type for arch in registry.gguf_architectures()}
    assert set(gguf_types.values()) <= {f.model_type for f in FAMILIES}
    assert gguf_types == {"llama": "llama", "qwen2": "qwen2", "gemma": "gemma", "gemma2": "gemma2",
                          "gemma3": "gemma3_text", "phi3": "phi3", "olmo": "olmo", "olmo2": "olmo2"}
    assert registry.gguf_hooks("bert") is None


def test_one_folder_per_family_and_every_folder_registered():
    """Each folder under mwjax/families holds a model, its HF config reading, key table, GGUF hooks and records;
    the registry lists exactly the folders' records, each declared in the folder of its model class."""
    assert [p.name for p in FOLDERS] == ["gemma", "llama", "mixtral", "olmo", "phi3"]
    in_folders = []
    for folder in FOLDERS:
        assert sorted(p.name for p in folder.glob("*.py")) == sorted(FOLDER_FILES), folder
        package = importlib.import_module(f"mwjax.families.{folder.name}")
        assert package.RECORDS, f"{folder} declares no records"
        for record in package.RECORDS:
            assert record.package == package.__name__
            assert f'model_type="{record.model_type}"' in (folder / "__init__.py").read_text()
        in_folders += package.RECORDS
    assert sorted(in_folders, key=FAMILIES.index) == list(FAMILIES)


def test_family_folders_import_neither_the_registry_nor_the_config_reader():
    """Inside a folder: the record, key-table machinery, shared readers, mwjax.nn and the families it builds on."""
    known = modules(ROOT)
    for module, path in known.items():
        if module.startswith("mwjax.families.") and module.count(".") >= 2 and path.parent in FOLDERS:
            upward = imports(path, module, set(known)) & {"mwjax.families", "mwjax.families.hf_config"}
            assert not upward, f"{module} imports {upward}"


def test_records_are_frozen_and_registered_once():
    record = registry.family("llama")
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.architecture = "X"
    with pytest.raises(TypeError):
        record.fused_modules["x"] = ("y",)
    assert registry._by_model_type((record,))["llama"] is record
    with pytest.raises(ValueError, match="'llama' has two records"):
        registry._by_model_type((record, dataclasses.replace(record, architecture="OtherForCausalLM")))
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
    with pytest.raises(ConfigError, match=r"config\.json.*'moe_shared_expert' for mixtral.*mwjax\.families\.mixtral"):
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
                                      "Gemma3TextConfig", "MixtralConfig", "Phi3Config", "OlmoConfig", "Olmo2Config"])
def test_transformers_default_configs_load(cls_name):
    """Every key transformers writes for a family is understood or known to be informational."""
    hf = getattr(transformers, cls_name)(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2).to_dict()
    assert read_hf_config(hf).model_type == hf["model_type"]


def test_the_files_a_new_family_needs():
    """The registry's docstring lists them: a new folder, its records in the list, a tiny test config."""
    doc = inspect.getdoc(mwjax.families)
    for path in ("mwjax/families/<family>/", "mwjax/families/__init__.py", "tests/hf_reference.py"):
        assert path in doc
        if "<" not in path:
            assert (ROOT / path).is_file()
    for name in FOLDER_FILES:
        assert name in doc
