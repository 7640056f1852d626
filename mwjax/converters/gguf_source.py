"""GGUF files (llama.cpp): config, tokenizer and dequantized tensors under their HF names.

Tensor names are translated with the `gguf` package's own HF <-> GGUF name map, tensors are
dequantized to float32 with `gguf.quants`, and what llama.cpp's converter changed is undone, so
the tensors come out exactly in the HF layout the key tables expect.

The metadata every architecture shares (sizes, heads, norm epsilon, RoPE base, token ids) is read here;
what an architecture means beyond it, and what llama.cpp's converter changed in its tensors, the family
that reads the architecture says through its GGUF hooks (`Family.gguf`, `mwjax/families/<family>/gguf.py`):
e.g. llama's Q/K rows un-permuted and the Mistral / Mixtral choice, Gemma's `1 + w` norms and query scale,
Phi-3's longrope factors and partial rotary.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from mwjax import families
from mwjax.converters import gguf_file, gguf_tokenizer
from mwjax.converters.errors import CheckpointError, MissingTensorError, UnsupportedCheckpointError
from mwjax.converters.sources import TensorSource

_ARCH_ENUMS = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}


def read_tokenizer(file: gguf_file.GGUFFile):
    """The tokenizer of a GGUF file's metadata alone (its tensors are not looked at).

    Args:
      file: the parsed GGUF file.

    Returns:
      The HF `PreTrainedTokenizerFast` (`gguf_tokenizer.build_tokenizer`).
    """
    return gguf_tokenizer.build_tokenizer(gguf_tokenizer.read_vocab(file.fields, file.path))


class GGUFSource(TensorSource):
    """A `.gguf` file presented as HF-named, HF-layout float32 tensors (and, to its family's GGUF hooks, as a
    `mwjax.families.record.GGUFFile`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.name = str(self.path)
        self.file = gguf_file.read(self.path)
        self.arch = self.meta("general.architecture")
        if self.arch is None:
            raise CheckpointError(f"{self.path}: GGUF metadata has no general.architecture")
        self.hooks = families.gguf_hooks(self.arch)
        if self.hooks is None:
            raise UnsupportedCheckpointError(f"{self.path}: GGUF architecture {self.arch!r} is not supported; mwjax "
                                             f"reads {list(families.gguf_architectures())}")
        self._tensors = {t.name: t for t in self.file.tensors}
        if len(self._tensors) != len(self.file.tensors):
            raise CheckpointError(f"{self.path}: GGUF tensor names repeat; the file is corrupt")
        self._check_extents()
        n_blocks = self._positive_int(f"{self.arch}.block_count")
        blocks = {int(m.group(1)) for name in self._tensors if (m := re.match(r"blk\.(\d+)\.", name))}
        if len(blocks) != n_blocks or max(blocks, default=-1) != n_blocks - 1:  # blocks 0 .. n-1, each present
            raise CheckpointError(f"{self.path}: GGUF metadata {self.arch}.block_count={n_blocks} but the file holds "
                                  f"tensors of {len(blocks)} blocks (numbered {min(blocks, default=None)} to "
                                  f"{max(blocks, default=None)})")
        name_map = gguf.get_tensor_name_map(_ARCH_ENUMS[self.arch], n_blocks)
        self._hf_to_gguf: dict[str, str] = {}
        self._name_map = name_map

    def _check_extents(self) -> None:
        """The tensors tile the data section as GGUF writers lay them out: back to back, each padded
        only to the file's alignment, none outside the file, none sharing bytes. A shifted offset or a
        changed tensor type would otherwise read a neighbour's bytes, or a part of its own, as weights."""
        end_of_file, align = self.file.size, self.file.alignment
        spans = sorted((t.offset, t.offset + t.n_bytes, t.name) for t in self.file.tensors)
        previous_end, previous = self.file.data_offset, "the start of the data section"
        for start, end, name in [*spans, (end_of_file, end_of_file, "the end of the file")]:
            if end > end_of_file:
                raise CheckpointError(f"{self.path}: GGUF tensor {name!r} spans bytes [{start}, {end}) past the end of "
                                      f"the file ({end_of_file} bytes); the file is corrupt or truncated")
            if not 0 <= start - previous_end < align:
                raise CheckpointError(
                    f"{self.path}: GGUF tensor data is not laid out back to back: {name} starts at byte {start} but "
                    f"{previous} ends at {previous_end} (alignment {align}); a tensor's offset or type is corrupt")
            previous_end, previous = end, f"tensor {name!r}"

    # ------------------------------------------------------------------ metadata

    def meta(self, key: str, default: Any = None) -> Any:
        """The metadata value of `key`, or `default`.

        Args:
          key: the full metadata key, e.g. "general.architecture".
          default: returned when the file lacks `key`.

        Returns:
          The decoded value (str, int, float, bool or a list of them).
        """
        return self.file.fields.get(key, default)

    def field(self, key: str, default: Any = None) -> Any:
        """The architecture's own metadata `{arch}.{key}`, or `default`.

        Args:
          key: the key without the architecture prefix, e.g. "attention.head_count".
          default: returned when the file lacks it.

        Returns:
          The decoded value.
        """
        return self.meta(f"{self.arch}.{key}", default)

    def has_tensor(self, name: str) -> bool:
        """Whether the file holds the tensor of GGUF name `name`.

        Args:
          name: a GGUF tensor name, e.g. "blk.0.attn_q.bias".

        Returns:
          True when the file holds it.
        """
        return name in self._tensors

    def _positive_int(self, key: str, default: Any = None) -> int:
        """A metadata count (layers, heads, sizes): present unless defaulted, an integer > 0."""
        value = self.meta(key, default)
        if value is None:
            raise CheckpointError(f"{self.path}: GGUF metadata has no {key!r}")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"{self.path}: GGUF metadata {key}={value!r} must be a positive integer")
        return value

    def hf_config(self) -> dict[str, Any]:
        """A HF `config.json`-style dict built from the GGUF metadata."""
        m = self.field
        count = lambda key, default=None: self._positive_int(f"{self.arch}.{key}", default)
        heads = count("attention.head_count")
        hidden = count("embedding_length")
        if "rope_freqs.weight" in self._tensors:
            raise UnsupportedCheckpointError(
                f"{self.path}: RoPE frequency factors stored as a tensor (rope_freqs, llama.cpp's form of Llama 3.1 "
                "rope scaling) are not supported; load the HF checkpoint instead"
            )
        config: dict[str, Any] = {
            "model_type": self.hooks.model_type,
            "vocab_size": self.shape("model.embed_tokens.weight")[0],
            "hidden_size": hidden,
            "intermediate_size": count("feed_forward_length"),
            "num_hidden_layers": count("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": count("attention.head_count_kv", heads),
            "head_dim": count("attention.key_length", max(hidden // heads, 1)),
            "rms_norm_eps": float(m("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(m("rope.freq_base", 10000.0)),
            "max_position_embeddings": count("context_length", 2048),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "bos_token_id": self.meta("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.meta("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self.meta("tokenizer.ggml.padding_token_id"),
            "hidden_act": "silu",
        }
        scaling = m("rope.scaling.type")
        if scaling not in (None, "none") and self.hooks.rope_scaling:  # else the family's hook reads it (longrope)
            if scaling != "linear":
                raise UnsupportedCheckpointError(f"{self.path}: GGUF rope scaling {scaling!r} is not supported")
            config["rope_scaling"] = {"rope_type": "linear", "factor": float(m("rope.scaling.factor"))}
        return config | self.hooks.config(self, config)

    def tokenizer(self):
        """The HF fast tokenizer the GGUF metadata describes (built without torch; see `gguf_tokenizer`)."""
        return read_tokenizer(self.file)

    # ------------------------------------------------------------------ tensors

    def _gguf_name(self, key: str) -> str | None:
        if key not in self._hf_to_gguf:
            self._hf_to_gguf[key] = self._name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        return self._hf_to_gguf[key]

    def keys(self):
        """The file's GGUF tensor names (HF names are resolved on demand by `get` / `shape` / `in`)."""
        return self._tensors.keys()  # GGUF names; HF names are resolved on demand

    def unused(self, used_keys):
        """The file's tensors (GGUF names) that no parameter was read from, the family's metadata tensors aside.

        Args:
          used_keys: the HF keys the parameters were read from.

        Returns:
          The unused GGUF tensor names, sorted.
        """
        used = {self._gguf_name(k) for k in used_keys} | set(self.hooks.metadata_tensors)
        return sorted(set(self._tensors) - used)

    def __contains__(self, key):
        return self._gguf_name(key) in self._tensors

    def _tensor(self, key: str):
        name = self._gguf_name(key)
        if name not in self._tensors:
            raise MissingTensorError(f"{self.path}: GGUF has no tensor {name!r} (HF {key!r}); the file is incomplete "
                                     "or was written for a different architecture")
        return self._tensors[name]

    def shape(self, key):
        """The HF-layout shape of the tensor of HF key `key` (MissingTensorError when the file lacks it).

        Args:
          key: an HF checkpoint key, e.g. "model.embed_tokens.weight".

        Returns:
          The shape, slowest-varying first.
        """
        return tuple(reversed(self._tensor(key).dims))  # GGUF lists dims fastest-first

    def raw(self, name: str) -> np.ndarray:
        """A tensor by its GGUF name, dequantized to float32, in HF (slowest-first) layout.

        No family hook is applied (see `get`).

        Args:
          name: a GGUF tensor name, e.g. "blk.0.ffn_down.weight".

        Returns:
          float32 array of the tensor's HF shape; CheckpointError when it cannot be dequantized.
        """
        t = self._tensors[name]
        shape = tuple(reversed(t.dims))
        try:
            flat = gguf.quants.dequantize(self.file.tensor_bytes(t), t.tensor_type)
            return flat.reshape(shape).astype(np.float32, copy=False)
        except Exception as e:  # unsupported type, or bytes that do not make the shape
            raise CheckpointError(f"{self.path}: GGUF tensor {name!r} ({t.tensor_type.name}, {list(shape)}) cannot "
                                  f"be dequantized ({type(e).__name__}: {e})") from e

    def get(self, key):
        """The tensor of HF key `key`, dequantized to float32 and passed through the family's tensor hook.

        The hook undoes what llama.cpp's converter changed (e.g. llama's Q/K rows un-permuted, Gemma's `1 + w`).

        Args:
          key: an HF checkpoint key, e.g. "model.layers.0.self_attn.q_proj.weight".

        Returns:
          float32 array in HF layout.
        """
        w = self.raw(self._tensor(key).name)
        return w if self.hooks.tensor is None else self.hooks.tensor(self, key, w)

