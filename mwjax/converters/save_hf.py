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

from mwjax import peft
from mwjax.checkpoint import dotted
from mwjax.converters import keymaps

DEFAULT_SHARD_BYTES = 5 * 2**30


def save_hf(model: nnx.Module, directory: str | os.PathLike, *, tokenizer=None,
            max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write `model` in HF layout: `config.json`, `model.safetensors` (or shards + index), tokenizer.

    Parameters keep their dtype. Each file is written under a temporary name and renamed, so an
    interrupted save never leaves a truncated file behind.
    """
    peft.check_no_adapters(model, "save_hf")  # before anything is written
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    tensors = hf_tensors(model)

    shards = _shard(tensors, max_shard_bytes)
    if len(shards) == 1:
        _atomic(directory / "model.safetensors", lambda p: save_file(shards[0], p, metadata={"format": "pt"}))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic(directory / name, lambda p, shard=shard: save_file(shard, p, metadata={"format": "pt"}))
            weight_map |= dict.fromkeys(shard, name)
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
        _atomic(directory / "model.safetensors.index.json", lambda p: Path(p).write_text(json.dumps(index, indent=2)))
    hf_config = config.to_hf_config() | {"torch_dtype": str(next(iter(tensors.values())).dtype)}
    _atomic(directory / "config.json", lambda p: Path(p).write_text(json.dumps(hf_config, indent=2)))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    else:  # the model does not carry its tokenizer: say so, since AutoTokenizer will fail on this directory
        warnings.warn(f"save_hf: no tokenizer written to {directory} (pass tokenizer=...)", stacklevel=2)
    return directory


def hf_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters as HF tensors, in the first layout of the family's key table
    (fused and stacked tensors assembled from their parts)."""
    params = {dotted(path): np.asarray(jax.device_get(value))
              for path, value in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))}
    plan = keymaps.keymap(model.config.model_type).plan({name: value.shape for name, value in params.items()})
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


def _atomic(target: Path, write) -> None:
    partial = target.with_name(target.name + ".partial")
    write(str(partial))
    os.replace(partial, target)
