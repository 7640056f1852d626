"""Tensor sources: read a checkpoint one tensor at a time, by its HF key, as numpy.

Every source exposes `keys()`, `shape(key)` and `get(key) -> np.ndarray` in HF layout, so one
key table serves safetensors, torch `.bin` and GGUF files alike.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

from converters.errors import CheckpointError, MissingTensorError

# safetensors dtype codes; the `safetensors` package's numpy backend cannot return bfloat16, which
# most LLM checkpoints use, so the (simple, documented) format is read here with a memory map.
SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class TensorSource:
    """Base: a mapping from HF keys to lazily read numpy arrays."""

    name: str

    def keys(self) -> Iterable[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())

    def unused(self, used_keys: set[str]) -> list[str]:
        """Checkpoint tensors (native names) that no parameter was read from."""
        return sorted(set(self.keys()) - set(used_keys))

    def missing(self, key: str, needed_for: str, also: Iterable[str] = ()) -> MissingTensorError:
        """The error for a parameter none of whose tensors (`key`, or one of `also`) is in the checkpoint."""
        alternatives = "".join(f" or {k!r}" for k in also)
        return MissingTensorError(
            f"{self.name}: missing tensor {key!r}{alternatives} (needed for mwjax parameter {needed_for}); "
            "the checkpoint is incomplete or was written for a different architecture"
        )


class SafetensorsFile:
    """One `.safetensors` file, memory-mapped: `get` returns a zero-copy read-only view."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if not 2 <= n <= size - 8:
                    raise ValueError(f"header length {n} does not fit a file of {size} bytes")
                header = json.loads(f.read(n))
        except (ValueError, struct.error, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path} is not a valid safetensors file (corrupt or truncated): {e}") from e
        header.pop("__metadata__", None)
        self.entries: dict[str, dict] = header
        self._data_start = 8 + n
        self._size = size
        self._mmap: np.memmap | None = None

    def get(self, key: str) -> np.ndarray:
        entry = self.entries[key]
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if end - start != nbytes or self._data_start + end > self._size:
            raise CheckpointError(
                f"{self.path}: tensor {key!r} ({entry['dtype']} {list(shape)}) has inconsistent offsets "
                f"[{start}, {end}) in a file of {self._size} bytes: the file is corrupt or truncated"
            )
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mmap[self._data_start + start : self._data_start + end].view(dtype).reshape(shape)


class SafetensorsSource(TensorSource):
    """A HF directory's `*.safetensors` (one file, or shards listed in `model.safetensors.index.json`)."""

    def __init__(self, directory: str | os.PathLike):
        directory = Path(directory)
        self.name = str(directory)
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: SafetensorsFile(directory / name) for name in sorted(set(weight_map.values()))}
            self._where = {key: files[name] for key, name in weight_map.items()}
        else:
            paths = sorted(directory.glob("*.safetensors"))
            if not paths:
                raise CheckpointError(f"{directory} has no *.safetensors files")
            self._where = {key: f for f in map(SafetensorsFile, paths) for key in f.entries}

    def keys(self):
        return self._where.keys()

    def __contains__(self, key):
        return key in self._where

    def shape(self, key):
        return tuple(self._where[key].entries[key]["shape"])

    def get(self, key):
        return self._where[key].get(key)


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
            weight_map = json.loads(index.read_text())["weight_map"]
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
        return self._weight_map.keys()

    def __contains__(self, key):
        return key in self._weight_map

    def shape(self, key):
        return tuple(self.get(key).shape)

    def get(self, key):
        t = self._load(self._files[self._weight_map[key]])[key]
        if t.dtype == self._torch.bfloat16:
            return t.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
