"""The family registry: one `Family` record per HF `model_type`, declared in that family's model module.

A record holds every fact about a family that code outside its module needs: the HF architecture
class, the mwjax model class, the reading / writing of its own HF config keys, the keys it
understands (anything else that is not informational is refused), its defaults, the HF modules
its checkpoints fuse (PEFT export) and its GGUF architecture. Everything else asks `family()`.

Why a top-level leaf module and not `mwjax/models/registry.py`: `mwjax.nn.config` (which the models
import) reads HF configs through the records, so the registry must sit below both; it imports
nothing from mwjax at import time. The built-in records register when `mwjax.families` is imported;
`family()` / `families()` import it on first use.

One record per HF `model_type` (not per model class): the model type is the unit HF's configs,
checkpoints and GGUF metadata name, and the readers differ per type even where the model class is
shared (llama / mistral / qwen2 -> `LlamaForCausalLM`; gemma / gemma2 / gemma3_text -> `GemmaForCausalLM`).

Adding a family touches these files (tests/test_registry.py checks the first three):
1. `mwjax/models/<family>.py`: the model class and its `Family` record(s), passed to `register`
   when the module is imported; import the module in `mwjax/models/__init__.py`.
2. `mwjax/converters/keymaps.py`: its `KeyMap` in `KEYMAPS[model_type]`.
3. `mwjax/converters/gguf_source.py`: only where llama.cpp's converter changed the tensors or the
   metadata needs reading of its own; otherwise give the record `gguf_architecture=None` (no GGUF).
4. tests: a tiny HF config in `tests/hf_reference.py` `FAMILY_CONFIGS` (test_config, test_families and
   test_registry run over it).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any


@dataclasses.dataclass(frozen=True)
class Family:
    """Everything mwjax knows about one HF model type.

    read_hf(hf, fields) -> dict: the `ModelConfig` fields this family reads its own way, given the HF
      config dict and the fields the shared reader (`mwjax.nn.config`) made of it; they replace those.
    write_hf(config, hf) -> dict: the HF config dict, given the shared keys `hf` (may drop some of them).
    read_rope(hf) -> (rope, sliding_rope): for a family whose RoPE keys differ from the shared
      `rope_parameters` / `rope_theta` + `rope_scaling` reading (`mwjax.families.hf_config.read_rope`).
    hf_keys: HF config keys this family reads beyond the shared ones (`mwjax.families.hf_config.SHARED_HF_KEYS`).
    ignored_hf_keys: keys HF's config class has that HF's modules ignore for this family, or use in
      training only: accepted, not read.
    fused_modules: HF fused module -> the mwjax modules in its row order (paths relative to a decoder layer).
    gguf_architecture: llama.cpp's `general.architecture` for files of this model type; None = no GGUF.
    """

    model_type: str  # HF config `model_type`
    architecture: str  # HF class written to `architectures`, e.g. "LlamaForCausalLM"
    model_class: type  # the flax.nnx.Module built for it
    read_hf: Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]
    write_hf: Callable[[Any, dict[str, Any]], dict[str, Any]]
    read_rope: Callable[[Mapping[str, Any]], tuple[Any, Any]] | None = None  # (rope, sliding_rope); None: shared
    hf_keys: frozenset[str] = frozenset()
    ignored_hf_keys: frozenset[str] = frozenset()
    hidden_act: str = "silu"  # when the HF config names none
    tie_word_embeddings: bool = False  # when the HF config says nothing
    rope_theta: float = 10000.0  # HF's `default_theta` when the config omits it
    fused_modules: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    gguf_architecture: str | None = None

    def __post_init__(self):
        # frozen all the way down: a record is shared by every model of its type
        object.__setattr__(self, "fused_modules", MappingProxyType(dict(self.fused_modules)))
        object.__setattr__(self, "hf_keys", frozenset(self.hf_keys))
        object.__setattr__(self, "ignored_hf_keys", frozenset(self.ignored_hf_keys))


_REGISTRY: dict[str, Family] = {}
_BUILTINS = "mwjax.families"  # importing it registers the built-in families


def register(record: Family) -> Family:
    """Add a family; a model type registered twice with a different record is an error."""
    old = _REGISTRY.get(record.model_type)
    if old is not None and old != record:
        raise ValueError(f"model_type {record.model_type!r} is already registered (by {old.model_class.__name__})")
    _REGISTRY[record.model_type] = record
    return record


def get(model_type: str | None) -> Family | None:
    """The record of `model_type`, or None where no family serves it."""
    importlib.import_module(_BUILTINS)
    return _REGISTRY.get(model_type)


def family(model_type: str) -> Family:
    """The record of `model_type`; `KeyError` naming the supported types where none serves it."""
    record = get(model_type)
    if record is None:
        raise KeyError(f"no mwjax family serves model_type {model_type!r}; registered: {sorted(_REGISTRY)}")
    return record


def families() -> tuple[Family, ...]:
    """Every registered record, in registration order."""
    importlib.import_module(_BUILTINS)
    return tuple(_REGISTRY.values())
