"""`mwjax.converters.gguf_file` reads what the `gguf` package's writer writes exactly as its own reader does."""

from pathlib import Path

import gguf
import numpy as np
import pytest

from mwjax.converters import CheckpointError, gguf_file

T = gguf.GGUFValueType


def _write(path: Path, alignment: int | None = None) -> Path:
    """A GGUF with a field of every value type (arrays of strings, numbers and arrays) and tensors of
    three storage types, the second one not a multiple of the alignment long."""
    writer = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for kind, value in ((T.UINT8, 200), (T.INT8, -100), (T.UINT16, 60000), (T.INT16, -30000), (T.UINT32, 2**32 - 1),
                        (T.INT32, -(2**31)), (T.UINT64, 2**64 - 1), (T.INT64, -(2**63)), (T.FLOAT32, 0.1),
                        (T.FLOAT64, 1e-300), (T.BOOL, True), (T.STRING, "héllo ▁ 世界")):
        writer.add_key_value(f"test.{kind.name.lower()}", value, kind)
    writer.add_array("test.strings", ["", "a", "▁b", "<0x0A>"] * 50)
    writer.add_array("test.floats", [0.5, -2.25, 1e30])
    writer.add_key_value("test.int32s", [1, -2, 3], T.ARRAY, T.INT32)
    writer.add_key_value("test.nested", [[1, 2], [3]], T.ARRAY, T.ARRAY)
    rng = np.random.default_rng(0)
    writer.add_tensor("a.weight", rng.standard_normal((3, 64)).astype(np.float32))
    writer.add_tensor("b.weight", rng.standard_normal((5, 7)).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("c.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("alignment", [None, 64])
def test_reads_as_ggufs_own_reader(tmp_path, alignment):
    path = _write(tmp_path / "all.gguf", alignment)
    ours, theirs = gguf_file.read(path), gguf.GGUFReader(path)
    expected = {}
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):  # the reader's own entries for the header
            continue
        value = field.contents()
        expected[key] = value.item() if isinstance(value, np.generic) else value
    assert ours.fields["test.nested"] == [[1, 2], [3]]
    del expected["test.nested"]  # gguf's reader does not decode nested arrays (its contents() FIXME)
    assert {k: v for k, v in ours.fields.items() if k != "test.nested"} == expected
    assert {k: type(v) for k, v in ours.fields.items() if k in expected} == {k: type(v) for k, v in expected.items()}
    assert (ours.alignment, ours.data_offset, ours.version) == (theirs.alignment, theirs.data_offset, 3)
    for info, t in zip(ours.tensors, theirs.tensors, strict=True):
        assert (info.name, info.dims, info.tensor_type) == (t.name, tuple(int(d) for d in t.shape), t.tensor_type)
        assert (info.offset, info.n_bytes) == (int(t.data_offset), int(t.n_bytes))
        np.testing.assert_array_equal(
            gguf.quants.dequantize(ours.tensor_bytes(info), info.tensor_type).reshape(tuple(reversed(info.dims))),
            gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(info.dims))))


def test_corrupt_headers_name_the_entry(tmp_path):
    raw = bytearray(_write(tmp_path / "all.gguf").read_bytes())
    start = raw.index(b"test.strings") + len(b"test.strings")  # then: type u32, item type u32, count u64
    bad = raw.copy()
    bad[start + 8:start + 16] = (2**62).to_bytes(8, "little")
    (tmp_path / "count.gguf").write_bytes(bad)
    with pytest.raises(CheckpointError, match="metadata 'test.strings' claims 4611686018427387904 elements"):
        gguf_file.read(tmp_path / "count.gguf")
    bad = raw.copy()
    bad[start:start + 4] = (99).to_bytes(4, "little")
    (tmp_path / "type.gguf").write_bytes(bad)
    with pytest.raises(CheckpointError, match="'test.strings' has value type 99"):
        gguf_file.read(tmp_path / "type.gguf")
    text = raw.index("héllo".encode())
    bad = raw.copy()
    bad[text] = 0xFF
    (tmp_path / "utf8.gguf").write_bytes(bad)
    with pytest.raises(CheckpointError, match="'test.string' is not UTF-8"):
        gguf_file.read(tmp_path / "utf8.gguf")
    (tmp_path / "cut.gguf").write_bytes(raw[:start + 30])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        gguf_file.read(tmp_path / "cut.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a valid GGUF file"):
        gguf_file.read(tmp_path / "empty.gguf")
