"""The `Family` record: everything code outside a family's folder needs to know about one HF model type.

Each family folder (`mwjax/families/<family>/__init__.py`) declares its record(s) from its own modules: the
model class (`model.py`), the HF config reading / writing (`hf.py`), the key table (`keys.py`) and the GGUF
hooks (`gguf.py`). The registry (`mwjax.families`) is the one explicit list of the records; everything else
asks it (`families.family(model_type)`).

One record per HF `model_type` (not per model class): the model type is the unit HF's configs, checkpoints
and GGUF metadata name, and the readers differ per type even where the model class is shared
(llama / mistral / qwen2 -> `LlamaForCausalLM`; gemma / gemma2 / gemma3_text -> `GemmaForCausalLM`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

    from mwjax.families.keymap import KeyMap


class GGUFFile(Protocol):
    """What GGUF hooks may read of a file (`mwjax.converters.gguf_source.GGUFSource` is one)."""

    arch: str  # llama.cpp's `general.architecture`

    def field(self, key: str, default: Any = None) -> Any:
        """The architecture's own metadata `{arch}.{key}`, or `default`.

        Args:
          key: the key without the architecture prefix, e.g. "attention.head_count".
          default: returned when the file lacks it.

        Returns:
          The decoded value.
        """

    def has_tensor(self, name: str) -> bool:
        """Whether the file holds the tensor of GGUF name `name`.

        Args:
          name: a GGUF tensor name, e.g. "blk.0.attn_q.bias".

        Returns:
          True when the file holds it.
        """

    def raw(self, name: str) -> np.ndarray:
        """The tensor of GGUF name `name` dequantized to float32, in HF (slowest-first) layout.

        Args:
          name: a GGUF tensor name, e.g. "rope_factors_long.weight".

        Returns:
          The float32 array.
        """


@dataclasses.dataclass(frozen=True)
class GGUFHooks:
    """How a family reads the GGUF files of one llama.cpp architecture: what the metadata means beyond the
    keys every architecture shares, and what llama.cpp's converter changed in the tensors, undone.

    Several records may share one hooks object (llama.cpp writes Llama, Mistral and Mixtral as arch `llama`;
    `config` tells them apart); one architecture has one hooks object.

    config(file, shared) -> dict: HF config keys beyond the shared ones `shared` (the `config.json`-style dict
      `mwjax.converters.gguf_source` built); they replace those (`model_type` included).
    tensor(file, hf_key, w) -> w: the HF tensor from the dequantized GGUF tensor `w` of HF key `hf_key`
      (HF layout); None: every tensor is stored as HF has it.
    """

    architecture: str  # llama.cpp's `general.architecture`, e.g. "gemma3"
    model_type: str  # the HF model_type its files are read as unless `config` names another
    config: Callable[[GGUFFile, Mapping[str, Any]], dict[str, Any]]
    tensor: Callable[[GGUFFile, str, np.ndarray], np.ndarray] | None = None
    rope_scaling: bool = True  # the shared reader takes `rope.scaling.type` (linear only); False: `config` does
    metadata_tensors: tuple[str, ...] = ()  # GGUF tensors `config` reads (not weights), e.g. longrope factors


@dataclasses.dataclass(frozen=True)
class Family:
    """Everything mwjax knows about one HF model type.

    read_hf(hf, fields) -> dict: the `ModelConfig` fields this family reads its own way, given the HF
      config dict and the fields the shared reader (`mwjax.families.hf_config`) made of it; they replace those.
    write_hf(config, hf) -> dict: the HF config dict, given the shared keys `hf` (may drop some of them).
    keymap: the HF checkpoint key <-> mwjax parameter path table (`mwjax.families.keymap.KeyMap`).
    gguf: the GGUF hooks of its files; None = no GGUF support (required, so that a record says so).
    read_rope(hf) -> (rope, sliding_rope): for a family whose RoPE keys differ from the shared
      `rope_parameters` / `rope_theta` + `rope_scaling` reading (`mwjax.families.hf_readers.read_rope`).
    hf_keys: HF config keys this family reads beyond the shared ones (`mwjax.families.hf_config.SHARED_HF_KEYS`).
    ignored_hf_keys: keys HF's config class has that HF's modules ignore for this family, or use in
      training only: accepted, not read.
    fused_modules: HF fused module -> the mwjax modules in its row order (paths relative to a decoder layer).
    """

    model_type: str  # HF config `model_type`
    architecture: str  # HF class written to `architectures`, e.g. "LlamaForCausalLM"
    model_class: type  # the flax.nnx.Module built for it
    read_hf: Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]
    write_hf: Callable[[Any, dict[str, Any]], dict[str, Any]]
    keymap: KeyMap
    gguf: GGUFHooks | None
    read_rope: Callable[[Mapping[str, Any]], tuple[Any, Any]] | None = None  # (rope, sliding_rope); None: shared
    hf_keys: frozenset[str] = frozenset()
    ignored_hf_keys: frozenset[str] = frozenset()
    hidden_act: str = "silu"  # when the HF config names none
    tie_word_embeddings: bool = False  # when the HF config says nothing
    rope_theta: float = 10000.0  # HF's `default_theta` when the config omits it
    fused_modules: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        # frozen all the way down: a record is shared by every model of its type
        object.__setattr__(self, "fused_modules", MappingProxyType(dict(self.fused_modules)))
        object.__setattr__(self, "hf_keys", frozenset(self.hf_keys))
        object.__setattr__(self, "ignored_hf_keys", frozenset(self.ignored_hf_keys))

    @property
    def package(self) -> str:
        """The family's folder as a module name, e.g. "mwjax.families.mixtral": the package of its model class,
        where the record is declared (a family that computes as another subclasses its model class, as Phi-3's
        does; tests/test_registry.py checks)."""
        return self.model_class.__module__.rpartition(".")[0]
