"""Tensor sources: read a checkpoint one tensor at a time, by its HF key, as numpy.

Every source exposes `keys()`, `shape(key)` and `get(key) -> np.ndarray` in HF layout, so one
key table serves safetensors, torch `.bin` and GGUF files alike.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open

from mwjax.converters.errors import CheckpointError, MissingTensorError

# Checkpoint dtypes a floating-point weight may be stored in (an integer tensor where a weight
# belongs is a corrupt or foreign checkpoint, not something to cast).
FLOAT_DTYPES = frozenset(np.dtype(t) for t in (np.float64, np.float32, np.float16, ml_dtypes.bfloat16,
                                                ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2))


class TensorSource:
    """Base: a mapping from HF keys to lazily read numpy arrays."""

    name: str

    def keys(self) -> Iterable[str]:
        """The checkpoint's tensor names (native names: HF keys, or GGUF names for a GGUF file)."""
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        """The HF-layout shape of a tensor, read without its data where the format allows.

        Args:
          key: an HF checkpoint key.

        Returns:
          The shape.
        """
        raise NotImplementedError

    def get(self, key: str) -> np.ndarray:
        """A tensor in HF layout and its stored dtype (float32 for GGUF).

        Args:
          key: an HF checkpoint key, e.g. "model.layers.0.mlp.up_proj.weight".

        Returns:
          The numpy array.
        """
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())

    def unused(self, used_keys: set[str]) -> list[str]:
        """Checkpoint tensors (native names) that no parameter was read from.

        Args:
          used_keys: the HF keys the parameters were read from.

        Returns:
          The unused tensor names, sorted.
        """
        return sorted(set(self.keys()) - set(used_keys))

    def missing(self, key: str, needed_for: str, also: Iterable[str] = ()) -> MissingTensorError:
        """The error for a parameter none of whose tensors (`key`, or one of `also`) is in the checkpoint.

        Args:
          key: the HF key the parameter is read from first.
          needed_for: the mwjax parameter path (dotted), for the message.
          also: the other HF keys the parameter could have been read from.

        Returns:
          The MissingTensorError (for the caller to raise).
        """
        alternatives = "".join(f" or {k!r}" for k in also)
        return MissingTensorError(
            f"{self.name}: missing tensor {key!r}{alternatives} (needed for mwjax parameter {needed_for}); "
            "the checkpoint is incomplete or was written for a different architecture"
        )


class SafetensorsSource(TensorSource):
    """A HF directory's `*.safetensors`: one file, or the shards listed in `model.safetensors.index.json`.

    Read through the `safetensors` library (`safe_open(framework="numpy")`), which validates the
    header, dtypes and offsets (negative, overlapping or out-of-file extents are refused) and maps
    the file, so one tensor at a time is in host memory. The index must agree with the shards:
    every key it lists is in the shard it names, and every shard tensor is listed; and with the
    directory: no `model*.safetensors` file beside it that it does not list (`check_layout`).
    """

    def __init__(self, directory: str | os.PathLike):
        directory = Path(directory)
        self.name = str(directory)
        index = directory / "model.safetensors.index.json"
        weight_map = _read_index(index) if index.exists() else None
        check_layout(directory, index, weight_map)
        if weight_map is not None:
            files = {name: _open_safetensors(directory / name, index) for name in sorted(set(weight_map.values()))}
            for key, name in weight_map.items():
                if key not in files[name].keys():
                    raise CheckpointError(f"{index}: tensor {key!r} is listed in shard {name}, which does not hold it")
            for name, f in files.items():
                unlisted = sorted(set(f.keys()) - set(weight_map))
                if unlisted:
                    raise CheckpointError(f"{directory / name} holds tensors the index {index.name} does not list: "
                                          f"{unlisted[:5]}; the index and the shards disagree")
            self._where = {key: (files[name], directory / name) for key, name in weight_map.items()}
        else:
            paths = sorted(directory.glob("*.safetensors"))
            if not paths:
                raise CheckpointError(f"{directory} has no *.safetensors files")
            self._where = {}
            for path in paths:
                f = _open_safetensors(path)
                for key in f.keys():
                    if key in self._where:
                        raise CheckpointError(f"{directory}: tensor {key!r} is in both {self._where[key][1].name} and "
                                              f"{path.name}; a stale file? (sharded checkpoints need their index)")
                    self._where[key] = (f, path)

    def keys(self):
        """The tensor names of every file (or shard)."""
        return self._where.keys()

    def __contains__(self, key):
        return key in self._where

    def shape(self, key):
        """The tensor's shape from the safetensors header (no data read).

        Args:
          key: an HF checkpoint key.

        Returns:
          The shape.
        """
        f, _ = self._where[key]
        return tuple(f.get_slice(key).get_shape())

    def get(self, key):
        """The tensor in its stored dtype (bfloat16 as `ml_dtypes.bfloat16`); CheckpointError when unreadable.

        Args:
          key: an HF checkpoint key.

        Returns:
          The numpy array.
        """
        f, path = self._where[key]
        try:
            return f.get_tensor(key)
        except Exception as e:  # SafetensorError, or numpy refusing the bytes
            raise CheckpointError(f"{path}: tensor {key!r} cannot be read ({type(e).__name__}: {e})") from e


SINGLE_FILE = "model.safetensors"
_REEXPORT = ("or export the model again with mwjax's save_hf, which replaces the whole directory (transformers' "
             "save_pretrained leaves old files behind)")


def check_layout(directory: Path, index: Path, weight_map: dict[str, str] | None) -> None:
    """With an index, the model weight files (`model*.safetensors`) of `directory` are exactly the shards it lists.

    No `model.safetensors` beside the index and no unlisted shard (stale files of an earlier export, which
    would be silently left out); CheckpointError naming the files otherwise. Without an index every
    `*.safetensors` file is read, and a tensor in two of them is refused (`SafetensorsSource`).

    Args:
      directory: an HF checkpoint directory.
      index: its `model.safetensors.index.json` path.
      weight_map: the index's weight_map, tensor name -> shard file name (None: no index, nothing checked).
    """
    if weight_map is None:
        return
    weights = sorted(p.name for p in directory.glob("model*.safetensors"))
    listed = set(weight_map.values())
    shown = f"{', '.join(sorted(listed)[:3])}{', ...' if len(listed) > 3 else ''}"
    if SINGLE_FILE in weights and SINGLE_FILE not in listed:
        raise CheckpointError(
            f"{directory} holds both {SINGLE_FILE} (a single-file checkpoint) and {index.name} (a sharded one, "
            f"listing {shown}): files of two exports, one of them stale. Delete the layout you do not want, "
            f"{_REEXPORT}")
    unlisted = [name for name in weights if name not in listed]
    if unlisted:
        raise CheckpointError(
            f"{directory}: {', '.join(unlisted[:4])} {'is' if len(unlisted) == 1 else 'are'} not listed in "
            f"{index.name} (which lists {shown}): stale files of an earlier export? Delete them, {_REEXPORT}")


def _open_safetensors(path: Path, index: Path | None = None):
    if not path.is_file():
        raise CheckpointError(f"{index}: names shard {path.name}, which does not exist in {path.parent}")
    try:
        return safe_open(str(path), framework="numpy")
    except Exception as e:  # SafetensorError (header, offsets, dtype), OSError
        raise CheckpointError(f"{path} is not a valid safetensors file (corrupt or truncated): "
                              f"{type(e).__name__}: {e}") from e


def _read_index(index: Path) -> dict[str, str]:
    """The `weight_map` of a sharded checkpoint's index, checked to be {tensor name: shard file name}."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (ValueError, AttributeError) as e:  # JSONDecodeError / UnicodeDecodeError; a top level that is no object
        raise CheckpointError(f"{index} is not a JSON object with a weight_map ({type(e).__name__}: {e})") from e
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: 'weight_map' must map every tensor name to a shard file name in the same "
                              "directory")
    outside = sorted({v for v in weight_map.values() if not _plain_name(v)})
    if outside:
        raise CheckpointError(f"{index}: 'weight_map' names {outside[:3]}, not file names in the checkpoint "
                              f"directory {index.parent} (a path, an absolute path or '..' is never followed); the "
                              "index is corrupt or crafted")
    return weight_map


def _plain_name(name: str) -> bool:
    """A file name of the directory itself: no separator, not '', '.' or '..'."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


class TorchBinSource(TensorSource):
    """A HF directory of `pytorch_model*.bin` shards (needs torch; weights only; memory-mapped in zip format)."""

    def __init__(self, directory: str | os.PathLike):
        try:
            import torch
        except ImportError as e:
            raise CheckpointError(
                f"{directory} holds torch .bin weights; reading them needs torch (pip install 'mwjax[torch]'), "
                "or convert them to safetensors first"
            ) from e
        self._torch = torch
        self._cache: dict[str, dict] = {}
        directory = Path(directory)
        self.name = str(directory)
        index = directory / "pytorch_model.bin.index.json"
        if index.exists():
            weight_map = _read_index(index)
            for name in sorted(set(weight_map.values())):
                if not (directory / name).is_file():
                    raise CheckpointError(f"{index}: names shard {name}, which does not exist in {directory}")
        else:
            paths = sorted(directory.glob("pytorch_model*.bin"))
            if not paths:
                raise CheckpointError(f"{directory} has no pytorch_model*.bin files")
            weight_map = {key: p.name for p in paths for key in self._load(p)}
        self._files = {name: directory / name for name in set(weight_map.values())}
        self._weight_map = weight_map

    def _load(self, path: Path) -> dict:
        key = str(path)
        if key not in self._cache:
            try:
                # mmap needs the zip format (torch >= 1.6); older pickle-format files are read whole
                self._cache[key] = self._torch.load(path, map_location="cpu", weights_only=True,
                                                    mmap=zipfile.is_zipfile(path))
            except Exception as e:  # torch raises many kinds on a corrupt file
                raise CheckpointError(f"{path} could not be read as a torch checkpoint: {e}") from e
        return self._cache[key]

    def keys(self):
        """The tensor names of every shard (from the index, or from loading each shard)."""
        return self._weight_map.keys()

    def __contains__(self, key):
        return key in self._weight_map

    def shape(self, key):
        """The tensor's shape (its shard is loaded, memory-mapped where the zip format allows).

        Args:
          key: an HF checkpoint key.

        Returns:
          The shape.
        """
        return tuple(self.get(key).shape)

    def get(self, key):
        """The tensor as numpy in its stored dtype (torch bfloat16 as `ml_dtypes.bfloat16`).

        Args:
          key: an HF checkpoint key.

        Returns:
          The numpy array.
        """
        t = self._load(self._files[self._weight_map[key]])[key]
        if t.dtype == self._torch.bfloat16:
            return t.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
