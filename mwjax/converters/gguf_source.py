"""GGUF files (llama.cpp): config, tokenizer and dequantized tensors under their HF names.

Tensor names are translated with the `gguf` package's own HF <-> GGUF name map, tensors are
dequantized to float32 with `gguf.quants`, and what llama.cpp's converter changed is undone, so
the tensors come out exactly in the HF layout the key tables expect:
- arch `llama` (also Mistral and Mixtral): the Q/K projection rows are permuted (the two RoPE
  halves of every head interleaved);
- `gemma`, `gemma2`, `gemma3`: every RMSNorm weight is stored as `1 + w` (transformers' GGUF
  loader subtracts 1 too);
- `phi3`: `attn_qkv` / `ffn_up` are HF's fused `qkv_proj` / `gate_up_proj` as they are;
  longrope factors are tensors (`rope_factors_short` / `_long`);
- Mixtral (arch `llama` with `expert_count`): each expert projection of a layer is one stacked
  tensor (`ffn_gate_exps` [E, d_ff, d] = HF `block_sparse_moe.experts.w1`, ...).

What GGUF metadata does not store is filled in as llama.cpp does: Gemma 2 / 3 scale queries by
head_dim ** -0.5 (27B: (hidden_size / heads) ** -0.5), Gemma 3's sliding layers use RoPE base
10 000 and every sixth layer is global.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from mwjax.converters import gguf_file, gguf_tokenizer
from mwjax.converters.errors import CheckpointError, MissingTensorError, UnsupportedCheckpointError
from mwjax.converters.sources import TensorSource
from mwjax.families import family as registry
from mwjax.families.llama.model import MISTRAL
from mwjax.families.mixtral.model import MIXTRAL


def gguf_model_types() -> dict[str, str]:
    """GGUF general.architecture -> the HF model_type its files are read as, from the family records'
    `gguf_architecture`. Where several model types share an architecture, the one named like it is the
    default and the others are told apart by metadata in `GGUFSource.hf_config` (llama with experts:
    mixtral; with a sliding window: mistral)."""
    by_arch: dict[str, list[str]] = {}
    for record in registry.families():
        if record.gguf_architecture is not None:
            by_arch.setdefault(record.gguf_architecture, []).append(record.model_type)
    out = {}
    for arch, types in by_arch.items():
        if arch not in types and len(types) > 1:
            raise ValueError(f"GGUF architecture {arch!r} serves {types} and none is named like it: "
                             "say which is the default in gguf_model_types")
        out[arch] = arch if arch in types else types[0]
    return out


GGUF_MODEL_TYPES = gguf_model_types()
# Architectures whose llama.cpp converter permutes the rows of Q and K.
_PERMUTED_QK = {"llama"}
# Architectures whose llama.cpp converter stores RMSNorm weights as 1 + w.
_NORM_PLUS_ONE = {"gemma", "gemma2", "gemma3"}
# Layer count of the 27B Gemma 2 / 3, whose query scale llama.cpp takes from hidden_size / heads.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_ARCH_ENUMS = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}


def read_tokenizer(file: gguf_file.GGUFFile):
    """The tokenizer of a GGUF file's metadata alone (its tensors are not looked at)."""
    return gguf_tokenizer.build_tokenizer(gguf_tokenizer.read_vocab(file.fields, file.path))


class GGUFSource(TensorSource):
    """A `.gguf` file presented as HF-named, HF-layout float32 tensors."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.name = str(self.path)
        self.file = gguf_file.read(self.path)
        self.arch = self.meta("general.architecture")
        if self.arch is None:
            raise CheckpointError(f"{self.path}: GGUF metadata has no general.architecture")
        if self.arch not in GGUF_MODEL_TYPES:
            raise UnsupportedCheckpointError(
                f"{self.path}: GGUF architecture {self.arch!r} is not supported; mwjax reads {sorted(GGUF_MODEL_TYPES)}"
            )
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
        return self.file.fields.get(key, default)

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
        a = self.arch
        m = lambda key, default=None: self.meta(f"{a}.{key}", default)
        count = lambda key, default=None: self._positive_int(f"{a}.{key}", default)
        heads = count("attention.head_count")
        hidden = count("embedding_length")
        if "rope_freqs.weight" in self._tensors:
            raise UnsupportedCheckpointError(
                f"{self.path}: RoPE frequency factors stored as a tensor (rope_freqs, llama.cpp's form of Llama 3.1 "
                "rope scaling) are not supported; load the HF checkpoint instead"
            )
        config: dict[str, Any] = {
            "model_type": GGUF_MODEL_TYPES[a],
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
        if scaling not in (None, "none") and a != "phi3":  # Phi-3's longrope: see _phi3_config
            if scaling != "linear":
                raise UnsupportedCheckpointError(f"{self.path}: GGUF rope scaling {scaling!r} is not supported")
            config["rope_scaling"] = {"rope_type": "linear", "factor": float(m("rope.scaling.factor"))}
        if a == "llama":
            config["attention_bias"] = "blk.0.attn_q.bias" in self._tensors
            window = m("attention.sliding_window")
            if window:
                config |= {"model_type": MISTRAL.model_type, "sliding_window": int(window)}
            if m("expert_count"):
                config |= {"model_type": MIXTRAL.model_type, "num_local_experts": int(m("expert_count")),
                           "num_experts_per_tok": int(m("expert_used_count"))}
        elif a in _NORM_PLUS_ONE:
            config |= self._gemma_config(m, config)
        elif a == "phi3":
            config |= self._phi3_config(m, config)
        return config

    def _gemma_config(self, m, config: dict[str, Any]) -> dict[str, Any]:
        """Gemma 1 / 2 / 3: activation, sliding layers, query scale, soft-caps, Gemma 3's local RoPE."""
        extra: dict[str, Any] = {"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh"}
        if self.arch == "gemma":
            return extra
        layers = config["num_hidden_layers"]
        scale = m("attention.scale")
        if scale:  # HF keeps query_pre_attn_scalar an int where it is one
            scalar = float(scale) ** -2
            extra["query_pre_attn_scalar"] = round(scalar) if abs(scalar - round(scalar)) < 1e-3 else scalar
        elif layers == _GEMMA_27B_LAYERS[self.arch]:
            extra["query_pre_attn_scalar"] = config["hidden_size"] // config["num_attention_heads"]
        else:
            extra["query_pre_attn_scalar"] = config["head_dim"]
        extra["sliding_window"] = m("attention.sliding_window")
        extra["final_logit_softcapping"] = m("final_logit_softcapping", 30.0 if self.arch == "gemma2" else None)
        if self.arch == "gemma2":
            extra["attn_logit_softcapping"] = m("attn_logit_softcapping", 50.0)
        else:
            extra["rope_local_base_freq"] = float(m("rope.freq_base_swa", 10000.0))
            pattern = m("attention.sliding_window_pattern")
            if isinstance(pattern, list):  # one flag per layer: True = sliding
                extra["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
            elif pattern:
                extra["sliding_window_pattern"] = int(pattern)
        return extra

    def _phi3_config(self, m, config: dict[str, Any]) -> dict[str, Any]:
        """Phi-3: partial rotary from rope.dimension_count, sliding window, longrope factors from tensors."""
        extra: dict[str, Any] = {"sliding_window": m("attention.sliding_window")}
        rotary = m("rope.dimension_count")
        if rotary and int(rotary) != config["head_dim"]:
            extra["partial_rotary_factor"] = int(rotary) / config["head_dim"]
        if "rope_factors_long.weight" in self._tensors:
            factors = {kind: self._raw("rope_factors_" + kind + ".weight").tolist() for kind in ("short", "long")}
            extra["rope_scaling"] = {
                "rope_type": "longrope", "short_factor": factors["short"], "long_factor": factors["long"],
                "original_max_position_embeddings": int(m("rope.scaling.original_context_length")),
                "attention_factor": float(m("rope.scaling.attn_factor", 1.0)),
            }
        return extra

    def tokenizer(self):
        """The HF fast tokenizer the GGUF metadata describes (built without torch; see `gguf_tokenizer`)."""
        return read_tokenizer(self.file)

    # ------------------------------------------------------------------ tensors

    def _gguf_name(self, key: str) -> str | None:
        if key not in self._hf_to_gguf:
            self._hf_to_gguf[key] = self._name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        return self._hf_to_gguf[key]

    def keys(self):
        return self._tensors.keys()  # GGUF names; HF names are resolved on demand

    def unused(self, used_keys):
        used = {self._gguf_name(k) for k in used_keys} | {"rope_factors_short.weight", "rope_factors_long.weight"}
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
        return tuple(reversed(self._tensor(key).dims))  # GGUF lists dims fastest-first

    def _raw(self, name: str) -> np.ndarray:
        """A tensor by its GGUF name, dequantized to float32, in HF (slowest-first) layout."""
        t = self._tensors[name]
        shape = tuple(reversed(t.dims))
        try:
            flat = gguf.quants.dequantize(self.file.tensor_bytes(t), t.tensor_type)
            return flat.reshape(shape).astype(np.float32, copy=False)
        except Exception as e:  # unsupported type, or bytes that do not make the shape
            raise CheckpointError(f"{self.path}: GGUF tensor {name!r} ({t.tensor_type.name}, {list(shape)}) cannot "
                                  f"be dequantized ({type(e).__name__}: {e})") from e

    def get(self, key):
        w = self._raw(self._tensor(key).name)
        if self.arch in _NORM_PLUS_ONE and key.endswith("norm.weight"):
            w = w - np.float32(1.0)
        if self.arch in _PERMUTED_QK:
            if key.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
                w = _unpermute(w, int(self.meta(f"{self.arch}.attention.head_count")))
            elif key.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
                heads = self.meta(f"{self.arch}.attention.head_count")
                w = _unpermute(w, int(self.meta(f"{self.arch}.attention.head_count_kv", heads)))
        return w


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: per head, rows (2, d/2) interleaved back to (d/2, 2) halves."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
