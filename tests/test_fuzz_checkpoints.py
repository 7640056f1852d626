"""Corrupted checkpoints: every variant is a clean error naming the file, or loads the same model.

Seeded and deterministic. Each variant of a tiny llama (safetensors, single file and sharded; GGUF)
is loaded in-process under an alarm and classified:
  clean error      a CheckpointError whose message names the file or directory
  unclear error    any other exception, or a message that does not name the file
  hang             no answer within the alarm
  loads identical  the logits of a fixed prompt equal the clean checkpoint's
  loads different  anything else: allowed only where the corruption is undetectable by
                   construction (bytes flipped inside tensor data that stay finite), listed as such
"""

from __future__ import annotations

import collections
import contextlib
import json
import shutil
import signal
import struct
from collections.abc import Callable
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from gguf_files import write_gguf_tensors

from mwjax import converters, models
from mwjax.converters.hf_export import hf_tensors
from mwjax.families.hf_config import read_hf_config

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(1, 24)), jnp.int32)
KINDS = ("clean error", "unclear error", "hang", "loads identical", "loads different")


@contextlib.contextmanager
def alarm(seconds: int):
    def timeout(signum, frame):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def classify(path: Path, reference: np.ndarray) -> tuple[str, str]:
    try:
        with alarm(20):
            model, _ = converters.load(path, tokenizer=False)
            logits = np.asarray(models.forward(model, TOKENS))
    except TimeoutError:
        return "hang", ""
    except converters.CheckpointError as e:
        return ("clean error" if str(path) in str(e) else "unclear error"), str(e)
    except Exception as e:  # noqa: BLE001 - anything else is what this test exists to find
        return "unclear error", f"{type(e).__name__}: {e}"
    return ("loads identical" if np.array_equal(logits, reference) else "loads different"), ""


# ------------------------------------------------------------------------------------------ variants
# A variant: (name, undetectable by construction, function writing the corruption into a copy).


def _rewrite_header(f: Path, edit: Callable[[dict], None]) -> None:
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _edit_entry(key: str, change: Callable[[dict], None]) -> Callable[[dict], None]:
    def edit(header):
        change(header[key])
    return edit


def _flip(f: Path, position: int, mask: int) -> None:
    raw = bytearray(f.read_bytes())
    raw[position % len(raw)] ^= mask
    f.write_bytes(bytes(raw))


def _put_value(f: Path, key: str, value) -> None:
    """Write a NaN / inf into a safetensors tensor's first element (F32)."""
    raw = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    start = json.loads(raw[8:8 + n])[key]["data_offsets"][0] + 8 + n
    raw[start:start + 4] = np.float32(value).tobytes()
    f.write_bytes(bytes(raw))


def safetensors_variants(clean: Path, rng: np.random.Generator):
    """Corruptions of a single-file safetensors checkpoint directory."""
    st = clean / "model.safetensors"
    raw = st.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    keys = sorted(k for k in header if k != "__metadata__")
    out = []
    f = lambda d: d / "model.safetensors"
    for cut in (0, 4, 8, 8 + n // 2, 8 + n, 9 + n, len(raw) // 2, len(raw) - 4, len(raw) - 1, 20):
        out.append((f"truncated at {cut}", False, lambda d, c=cut: f(d).write_bytes(f(d).read_bytes()[:c])))
    for m in (0, n - 1, n + 1, 2**40, len(raw)):
        out.append((f"header length {m}", False,
                    lambda d, m=m: f(d).write_bytes(struct.pack("<Q", m) + f(d).read_bytes()[8:])))
    for _ in range(40):
        pos, mask = int(rng.integers(8, 8 + n)), int(rng.integers(1, 256))
        out.append((f"header byte {pos} ^ {mask}", False, lambda d, p=pos, k=mask: _flip(f(d), p, k)))
    for key in (keys[0], keys[len(keys) // 2], keys[-1], "model.norm.weight"):
        start, end = header[key]["data_offsets"]
        changes = {
            **{f"dtype {t}": (lambda e, t=t: e.update(dtype=t)) for t in ("I32", "F16", "BF16", "I8", "U8", "XYZ")},
            "shape reversed": lambda e: e.update(shape=e["shape"][::-1]),
            "shape +1": lambda e: e.update(shape=[e["shape"][0] + 1, *e["shape"][1:]]),
            "shape dropped dim": lambda e: e.update(shape=e["shape"][1:] or [1, *e["shape"]]),
            "offsets negative": lambda e: e.update(data_offsets=[-4, e["data_offsets"][1]]),
            "offsets past end": lambda e: e.update(data_offsets=[e["data_offsets"][0], len(raw) * 2]),
            "offsets swapped": lambda e: e.update(data_offsets=e["data_offsets"][::-1]),
            "offsets overlap": lambda e, s=start, t=end: e.update(data_offsets=[max(s - 4, 0), t - 4]),
            "offsets shifted": lambda e, s=start, t=end: e.update(data_offsets=[s + 4, t + 4]),
            "offsets text": lambda e: e.update(data_offsets="0-4"),
        }
        for what, change in changes.items():
            out.append((f"{key}: {what}", False, lambda d, k=key, c=change: _rewrite_header(f(d), _edit_entry(k, c))))
        out.append((f"{key}: deleted", False, lambda d, k=key: _rewrite_header(f(d), lambda h: h.pop(k))))
        out.append((f"{key}: renamed", False,
                    lambda d, k=key: _rewrite_header(f(d), lambda h: h.update({k + "x": h.pop(k)}))))
        out.append((f"{key}: NaN", False, lambda d, k=key: _put_value(f(d), k, np.nan)))
        out.append((f"{key}: inf", False, lambda d, k=key: _put_value(f(d), k, np.inf)))
    data_start = 8 + n
    for _ in range(12):
        pos = int(rng.integers(data_start, len(raw)))
        out.append((f"data byte {pos} flipped", True, lambda d, p=pos: _flip(f(d), p, 0x01)))
    out.append(("extra tensor", False, lambda d: _add_tensor(f(d))))
    out.append(("second file with the same tensors", False, lambda d: shutil.copy(f(d), d / "model-2.safetensors")))
    out.append(("weights removed", False, lambda d: f(d).unlink()))
    out.append(("weights empty", False, lambda d: f(d).write_bytes(b"")))
    return out + config_variants()


def _add_tensor(f: Path) -> None:
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    end = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    header["model.extra.weight"] = {"dtype": "F32", "shape": [2], "data_offsets": [end, end + 8]}
    text = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:] + np.ones(2, np.float32).tobytes())


def config_variants():
    def edit(**changes):
        def apply(d):
            cfg = json.loads((d / "config.json").read_text())
            for k, v in changes.items():
                if v is ...:
                    cfg.pop(k, None)
                else:
                    cfg[k] = v
            (d / "config.json").write_text(json.dumps(cfg))
        return apply

    out = [("config: truncated", False, lambda d: (d / "config.json").write_text('{"model_type": "lla')),
           ("config: not UTF-8", False, lambda d: (d / "config.json").write_bytes(b"\xff\xfe{}")),
           ("config: removed", False, lambda d: (d / "config.json").unlink())]
    for literal in ("null", "[]", '"llama"', "3"):
        out.append((f"config: {literal}", False, lambda d, t=literal: (d / "config.json").write_text(t)))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "model_type"):
        out.append((f"config: no {key}", False, lambda d, k=key: edit(**{k: ...})(d)))
    bad = {"rms_norm_eps": (-1, 0, float("nan"), "x", float("inf")),
           "rope_theta": (0, -5, float("nan"), float("inf"), [1]),
           "num_attention_heads": (0, 3, "4", -4, 4.5),
           "num_key_value_heads": (0, 3, -2),
           "hidden_size": (0, 33, -32), "intermediate_size": (49, 0), "num_hidden_layers": (0, 1, 3, 2.5),
           "vocab_size": (0, 63, 65), "head_dim": (0, 7), "max_position_embeddings": (0, -1, "big"),
           "model_type": ("gpt_neox", 3, None), "tie_word_embeddings": (True,),
           "rope_scaling": ([1, 2], {"rope_type": "yarn", "factor": 2.0}, {"rope_type": "linear", "factor": 0},
                            {"rope_type": "linear", "factor": "x"}, {"rope_type": "linear"})}
    for key, values in bad.items():
        for value in values:
            out.append((f"config: {key}={value!r}", False, lambda d, k=key, v=value: edit(**{k: v})(d)))
    return out


def sharded_variants(clean: Path, rng: np.random.Generator):
    index = lambda d: d / "model.safetensors.index.json"
    shards = sorted(p.name for p in clean.glob("*.safetensors"))
    weight_map = json.loads(index(clean).read_text())["weight_map"]
    key = sorted(weight_map)[3]
    other = next(s for s in shards if s != weight_map[key])

    def rewrite(change):
        def apply(d):
            data = json.loads(index(d).read_text())
            change(data)
            index(d).write_text(json.dumps(data))
        return apply

    out = [("index: truncated", False, lambda d: index(d).write_text('{"weight_map": {"a')),
           ("index: null", False, lambda d: index(d).write_text("null")),
           ("index: list", False, lambda d: index(d).write_text("[]")),
           ("index: no weight_map", False, rewrite(lambda x: x.pop("weight_map"))),
           ("index: weight_map null", False, rewrite(lambda x: x.update(weight_map=None))),
           ("index: weight_map empty", False, rewrite(lambda x: x.update(weight_map={}))),
           ("index: shard is a number", False, rewrite(lambda x: x["weight_map"].update({key: 3}))),
           ("index: wrong shard", False, rewrite(lambda x: x["weight_map"].update({key: other}))),
           ("index: missing shard file", False, rewrite(lambda x: x["weight_map"].update({key: "nope.safetensors"}))),
           ("index: shard outside the directory", False,
            rewrite(lambda x: x["weight_map"].update({key: "../model.safetensors"}))),
           ("index: entry dropped", False, rewrite(lambda x: x["weight_map"].pop(key))),
           ("index: entry nobody holds", False,
            rewrite(lambda x: x["weight_map"].update({"model.extra.weight": shards[0]}))),
           ("shard removed", False, lambda d: (d / shards[-1]).unlink()),
           ("index removed", False, lambda d: index(d).unlink()),
           ("a stale model.safetensors beside the index", False,
            lambda d: shutil.copy(d / shards[0], d / "model.safetensors")),
           ("a stale shard the index does not list", False,
            lambda d: shutil.copy(d / shards[0], d / "model-00009-of-00009.safetensors")),
           ("shard truncated", False, lambda d: (d / shards[0]).write_bytes((d / shards[0]).read_bytes()[:100]))]
    for _ in range(6):
        pos, mask = int(rng.integers(8, 200)), int(rng.integers(1, 256))
        out.append((f"shard header byte {pos} ^ {mask}", False, lambda d, p=pos, k=mask: _flip(d / shards[-1], p, k)))
    return out


def _gguf_edit(path: Path, edit: Callable[[gguf.GGUFReader], None]) -> None:
    reader = gguf.GGUFReader(path, "r+")
    edit(reader)
    reader.data.flush()
    del reader


def _set_field(key: str, value):
    def edit(reader):
        field = reader.fields[key]
        field.parts[field.data[0]][0] = value
    return edit


def _set_tensor_info(name: str, part: str, change):
    """Edit one tensor's info: its GGML type or its data offset (parts [.., dims, type, offset])."""
    def edit(reader):
        t = next(t for t in reader.tensors if t.name == name)
        index = {"dims": 3, "type": 4, "offset": 5}[part]
        values = t.field.parts[index]
        values[0] = change(int(values[0]))
    return edit


def gguf_variants(clean: Path, rng: np.random.Generator):
    raw = clean.read_bytes()
    reader = gguf.GGUFReader(clean)
    data_start = reader.data_offset
    names = [t.name for t in reader.tensors]
    del reader
    out = []
    for cut in (0, 4, 16, 100, data_start // 2, data_start, data_start + 10, len(raw) // 2, len(raw) - 4,
                len(raw) - 1):
        out.append((f"truncated at {cut}", False, lambda p, c=cut: p.write_bytes(p.read_bytes()[:c])))
    for _ in range(30):
        pos, mask = int(rng.integers(4, data_start)), int(rng.integers(1, 256))
        out.append((f"metadata byte {pos} ^ {mask}", False, lambda p, q=pos, k=mask: _flip(p, q, k)))
    fields = {"llama.block_count": (0, 1, 3, 2**31), "llama.attention.head_count": (0, 3),
              "llama.attention.head_count_kv": (0, 3), "llama.embedding_length": (0, 31),
              "llama.feed_forward_length": (0, 47), "llama.context_length": (0,),
              "llama.attention.layer_norm_rms_epsilon": (np.nan, -1.0, 0.0, np.inf),
              "llama.rope.freq_base": (0.0, np.nan, -1.0), "tokenizer.ggml.bos_token_id": (2**31,)}
    for key, values in fields.items():
        for value in values:
            out.append((f"{key} = {value}", False, lambda p, k=key, v=value: _gguf_edit(p, _set_field(k, v))))
    for name in (names[0], names[len(names) // 2], names[-1]):
        for what, part, change in (("type F16", "type", lambda v: int(gguf.GGMLQuantizationType.F16)),
                                   ("type Q8_0", "type", lambda v: int(gguf.GGMLQuantizationType.Q8_0)),
                                   ("type I32", "type", lambda v: int(gguf.GGMLQuantizationType.I32)),
                                   ("offset +32", "offset", lambda v: v + 32),
                                   ("offset -32", "offset", lambda v: max(v - 32, 0)),
                                   ("offset huge", "offset", lambda v: v + 2**40),
                                   ("dim +1", "dims", lambda v: v + 1)):
            out.append((f"{name}: {what}", False, lambda p, n=name, a=part, c=change: _gguf_edit(
                p, _set_tensor_info(n, a, c))))
    for _ in range(8):
        pos = int(rng.integers(data_start, len(raw)))
        out.append((f"data byte {pos} flipped", True, lambda p, q=pos: _flip(p, q, 0x01)))
    return out


# ------------------------------------------------------------------------------------------ the test


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The tiny llama as a safetensors dir, a sharded one and a GGUF, and its reference logits."""
    hf_config = transformers.LlamaConfig(**TINY)
    model = models.build(read_hf_config(hf_config.to_dict()), seed=0)
    root = tmp_path_factory.mktemp("clean")
    single = converters.save_hf(model, root / "single")
    sharded = converters.save_hf(model, root / "sharded", max_shard_bytes=20_000)
    assert len(list(sharded.glob("*.safetensors"))) > 2
    tensors = {k: np.asarray(v, np.float32) for k, v in hf_tensors(model).items()}
    gguf_path = write_gguf_tensors(tensors, hf_config, root / "tiny.gguf")
    reference = np.asarray(models.forward(model, TOKENS))
    for path in (single, sharded, gguf_path):
        assert classify(path, reference)[0] == "loads identical", path
    return single, sharded, gguf_path, reference


def run_variants(clean_path: Path, variants, tmp_path: Path, reference: np.ndarray):
    counts, problems, undetectable = collections.Counter(), [], []
    for i, (name, by_construction, corrupt) in enumerate(variants):
        target = tmp_path / f"v{i}{clean_path.suffix}"
        tmp_path.mkdir(parents=True, exist_ok=True)
        if clean_path.is_dir():
            shutil.copytree(clean_path, target)
        else:
            shutil.copy(clean_path, target)
        corrupt(target)
        kind, message = classify(target, reference)
        counts[kind] += 1
        if kind in ("unclear error", "hang") or (kind == "loads different" and not by_construction):
            problems.append(f"{kind}: {name}: {message[:300]}")
        elif kind == "loads different":
            undetectable.append(name)
    return counts, problems, undetectable


def test_corrupt_checkpoints_fail_cleanly(clean, tmp_path, capsys):
    single, sharded, gguf_path, reference = clean
    rng = np.random.default_rng(2026)
    suites = {"safetensors (single file)": (single, safetensors_variants(single, rng)),
              "safetensors (sharded)": (sharded, sharded_variants(sharded, rng)),
              "GGUF": (gguf_path, gguf_variants(gguf_path, rng))}
    rows, all_problems = [], []
    for n, (label, (path, variants)) in enumerate(suites.items()):
        counts, problems, undetectable = run_variants(path, variants, tmp_path / f"suite{n}", reference)
        rows.append((label, len(variants), counts, undetectable))
        all_problems += [f"{label}: {p}" for p in problems]
    with capsys.disabled():
        print("\n\ncorrupted checkpoints (tests/test_fuzz_checkpoints.py):")
        print("| format | variants | " + " | ".join(KINDS) + " |")
        for label, n, counts, _ in rows:
            print(f"| {label} | {n} | " + " | ".join(str(counts[k]) for k in KINDS) + " |")
        for label, _, _, undetectable in rows:
            if undetectable:
                print(f"{label}: loads different, undetectable by construction (finite data bytes flipped): "
                      f"{len(undetectable)}")
    safetensors_total = rows[0][1] + rows[1][1]
    assert safetensors_total >= 150 and rows[2][1] >= 60
    assert not all_problems, "\n".join(all_problems)
