"""The GGUF container (llama.cpp's format, versions 2 and 3): metadata and tensor directory.

Read straight from a memory map with `struct`, every metadata value decoded once into Python values.
The `gguf` package's `GGUFReader` builds a numpy view per array element, which takes 3 s for
SmolLM2's 49k-token vocabulary and 15 s for Gemma 3's 262k; this reads both in well under a second.
What the bytes mean (value types, quantization block sizes) still comes from the `gguf` package, and
its `gguf.quants` dequantizes the tensor bytes this module hands out.

Layout (little-endian): magic "GGUF", version u32, tensor count u64, metadata count u64; the metadata
(key string, value type u32, value); one entry per tensor (name, n_dims u32, dims u64 [n_dims],
fastest-varying first, GGML type u32, offset u64 from the start of the data section); padding to
`general.alignment` (default 32); the data section. A string is a u64 byte length and UTF-8 bytes.
Every length and count is checked against the bytes that remain, so a corrupt header is a
`CheckpointError` naming the file and the entry, never a huge allocation or a garbage value.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from mwjax.converters.errors import CheckpointError, UnsupportedCheckpointError

VERSIONS = (2, 3)  # v1 (u32 counts) predates every file llama.cpp has written since August 2023
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
_T = gguf.GGUFValueType
_SCALARS = {_T.UINT8: "B", _T.INT8: "b", _T.UINT16: "H", _T.INT16: "h", _T.UINT32: "I", _T.INT32: "i",
            _T.UINT64: "Q", _T.INT64: "q", _T.FLOAT32: "f", _T.FLOAT64: "d", _T.BOOL: "?"}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One entry of a GGUF tensor directory: name, GGUF dims, GGML type and where its bytes lie."""

    name: str
    dims: tuple[int, ...]  # GGUF order, fastest-varying first (reversed: the HF / numpy shape)
    tensor_type: gguf.GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    n_bytes: int


@dataclasses.dataclass
class GGUFFile:
    """A parsed GGUF file; `tensor_bytes` reads a tensor's bytes from the memory map (no copy)."""

    path: Path
    version: int
    fields: dict[str, Any]  # key -> str | int | float | bool | list of them
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int  # where the data section starts
    size: int  # bytes in the file
    _map: mmap.mmap | None

    def tensor_bytes(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes as stored (what `gguf.quants.dequantize` takes), a view of the memory map.

        Args:
          info: one of `tensors`; CheckpointError when its bytes lie outside the file.

        Returns:
          uint8 [n_bytes].
        """
        if self._map is None or info.offset + info.n_bytes > self.size:
            raise CheckpointError(f"{self.path}: GGUF tensor {info.name!r} lies outside the file")
        return np.frombuffer(self._map, dtype=np.uint8, count=info.n_bytes, offset=info.offset)


class _Cursor:
    """Sequential little-endian reads from a buffer, each checked against its end."""

    def __init__(self, buffer, path: Path):
        self.buffer, self.pos, self.end, self.path = buffer, 0, len(buffer), path

    def take(self, n: int, what: str) -> int:
        """Advance by n bytes; the position before."""
        if n < 0 or self.pos + n > self.end:
            raise CheckpointError(f"{self.path}: GGUF {what} needs {n} bytes at byte {self.pos} but the file has "
                                  f"{self.end} bytes; the file is corrupt or truncated")
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, fmt: str, what: str):
        return struct.unpack_from("<" + fmt, self.buffer, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("Q", what)
        start = self.take(n, what)
        try:
            return self.buffer[start:start + n].decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{self.path}: GGUF {what} is not UTF-8 text ({e}); the file is corrupt") from e

    def value(self, kind: int, what: str) -> Any:
        kind = self.value_type(kind, what)
        if kind == _T.STRING:
            return self.string(what)
        if kind != _T.ARRAY:
            return self.scalar(_SCALARS[kind], what)
        item = self.value_type(self.scalar("I", what), what)
        count = self.scalar("Q", what)
        if item in _SCALARS:  # one numpy read, then Python values
            dtype = np.dtype(_SCALARS[item]).newbyteorder("<")
            start = self.take(count * dtype.itemsize, what)
            return np.frombuffer(self.buffer, dtype=dtype, count=count, offset=start).tolist()
        if count > self.end - self.pos:  # every element takes at least one byte
            raise CheckpointError(f"{self.path}: GGUF {what} claims {count} elements in {self.end - self.pos} bytes; "
                                  "the file is corrupt or truncated")
        if item == _T.STRING:  # vocabularies: hundreds of thousands of strings
            return [self.string(what) for _ in range(count)]
        return [self.value(item, what) for _ in range(count)]  # arrays of arrays

    def value_type(self, kind: int, what: str) -> gguf.GGUFValueType:
        try:
            return _T(kind)
        except ValueError:
            raise CheckpointError(f"{self.path}: GGUF {what} has value type {kind}, which GGUF does not define; "
                                  "the file is corrupt") from None


def read(path: str | Path) -> GGUFFile:
    """Parse `path`'s header, metadata and tensor directory; the tensors stay on disk (memory-mapped).

    Args:
      path: the .gguf file (versions 2 and 3, little-endian).

    Returns:
      The `GGUFFile`; CheckpointError (UnsupportedCheckpointError for v1 / big-endian) when it cannot be read.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the GGUF file ({e})") from e
    cursor = _Cursor(mapped if mapped is not None else b"", path)
    if cursor.end < 4 or cursor.buffer[:4] != b"GGUF":
        raise CheckpointError(f"{path} is not a valid GGUF file (it does not start with the bytes 'GGUF')")
    cursor.take(4, "magic")
    version = cursor.scalar("I", "version")
    if version not in VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        hint = " (a big-endian file, which mwjax does not read)" if swapped in VERSIONS else ""
        error = UnsupportedCheckpointError if version == 1 or hint else CheckpointError
        raise error(f"{path} is not a valid GGUF file for mwjax: version {version}{hint}; mwjax reads versions "
                    f"{VERSIONS}")
    n_tensors = cursor.scalar("Q", "tensor count")
    n_fields = cursor.scalar("Q", "metadata count")
    fields: dict[str, Any] = {}
    for i in range(n_fields):
        if cursor.pos >= cursor.end:
            raise CheckpointError(f"{path}: GGUF metadata count {n_fields} but the file ends after {i} entries")
        key = cursor.string(f"metadata key {i}")
        if key in fields:
            raise CheckpointError(f"{path}: GGUF metadata key {key!r} appears twice; the file is corrupt")
        fields[key] = cursor.value(cursor.scalar("I", f"metadata {key!r}"), f"metadata {key!r}")
    infos = []
    for i in range(n_tensors):
        if cursor.pos >= cursor.end:
            raise CheckpointError(f"{path}: GGUF tensor count {n_tensors} but the file ends after {i} entries")
        name = cursor.string(f"tensor {i}'s name")
        what = f"tensor {name!r}"
        n_dims = cursor.scalar("I", what)
        if not 1 <= n_dims <= MAX_DIMS:
            raise CheckpointError(f"{path}: GGUF {what} has {n_dims} dimensions (1 to {MAX_DIMS}); the file is corrupt")
        dims = tuple(cursor.scalar("Q", what) for _ in range(n_dims))
        infos.append((name, dims, cursor.scalar("I", what), cursor.scalar("Q", what)))
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(f"{path}: GGUF metadata general.alignment={alignment!r} must be a power of two")
    data_offset = -(-cursor.pos // alignment) * alignment
    tensors = [_tensor_info(path, name, dims, kind, data_offset + offset) for name, dims, kind, offset in infos]
    return GGUFFile(path, version, fields, tensors, alignment, data_offset, size, mapped)


def _tensor_info(path: Path, name: str, dims: tuple[int, ...], kind: int, offset: int) -> TensorInfo:
    try:
        tensor_type = gguf.GGMLQuantizationType(kind)
        block, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
    except (ValueError, KeyError):
        raise CheckpointError(f"{path}: GGUF tensor {name!r} has type {kind}, which GGML does not define; "
                              "the file is corrupt") from None
    if dims[0] % block:
        raise CheckpointError(f"{path}: GGUF tensor {name!r} ({tensor_type.name}, dims {list(dims)}): a row of "
                              f"{dims[0]} is not whole blocks of {block}; the file is corrupt")
    return TensorInfo(name, dims, tensor_type, offset, math.prod(dims) // block * type_size)
