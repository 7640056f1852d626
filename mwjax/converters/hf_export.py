"""mwjax model -> HF directory (`config.json` + safetensors) that transformers loads as is."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from mwjax import families
from mwjax.converters import checkpoint
from mwjax.core import atomic
from mwjax.core.paths import dotted
from mwjax.families.hf_config import write_hf_config

DEFAULT_SHARD_BYTES = 5 * 2**30


HF_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin*")  # an HF export


def save_hf(model: nnx.Module, directory: str | os.PathLike, *, tokenizer=None,
            max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write `model` in HF layout: `config.json`, `model.safetensors` (or shards + index), tokenizer.

    Parameters keep their dtype. The directory is written atomically as a whole (`mwjax.core.atomic`): built beside
    `directory` and swapped in, so a kill leaves the previous export or this one, and no file of an earlier
    export survives (the old shards of a sharded model overwritten by a single-file one). An existing
    non-empty directory is replaced only when it holds an HF checkpoint (`config.json`, safetensors or torch
    weights); anything else is refused before a byte is written.

    Args:
      model: a plain mwjax model (adapters refused: merge them first).
      directory: the export directory.
      tokenizer: written beside the weights (`save_pretrained`) when given.
      max_shard_bytes: shard the weights above this size (HF's `model-0000i-of-0000n.safetensors` + index).

    Returns:
      The directory.
    """
    checkpoint.check_no_adapters(model, "save_hf")  # before anything is written
    directory = Path(directory)
    atomic.check_replaceable(directory, HF_FILES, "an HF checkpoint")  # before the tensors are gathered
    tensors = hf_tensors(model)
    hf_config = write_hf_config(model.config) | {"torch_dtype": str(next(iter(tensors.values())).dtype)}
    with atomic.atomic_directory(directory, replaces=HF_FILES, what="an HF checkpoint") as staging:
        _write_weights(staging, tensors, max_shard_bytes)
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
    if tokenizer is None:  # the model does not carry its tokenizer: say so, since AutoTokenizer will fail here
        warnings.warn(f"save_hf: no tokenizer written to {directory} (pass tokenizer=...)", stacklevel=2)
    return directory


def _write_weights(directory: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> None:
    """`model.safetensors`, or shards and their index when the tensors exceed `max_shard_bytes`."""
    shards = _shard(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def hf_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters as HF tensors, in the first layout of the family's key table.

    Fused and stacked tensors are assembled from their parts; every parameter keeps its dtype.

    Args:
      model: a plain mwjax model (its parameters are gathered to the host).

    Returns:
      HF checkpoint key -> numpy array in HF layout (e.g. "model.layers.0.mlp.down_proj.weight" [out, in]).
    """
    params = {dotted(path): np.asarray(jax.device_get(value))
              for path, value in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))}
    plan = families.family(model.config.model_type).keymap.plan({name: value.shape for name, value in params.items()})
    tensors: dict[str, np.ndarray] = {}
    for name, value in params.items():
        location = plan[name][0]
        if location.index:  # one piece of a fused / stacked tensor
            whole = tensors.setdefault(location.hf_key, np.empty(location.hf_shape, value.dtype))
            whole[location.index] = location.rule.to_hf(value)
        else:
            tensors[location.hf_key] = np.ascontiguousarray(location.rule.to_hf(value))
    return tensors


def _shard(tensors: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += t.nbytes
    return shards
