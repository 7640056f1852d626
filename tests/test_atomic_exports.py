"""Every multi-file export is directory-atomic: killed at any of its filesystem steps, a later `load` gives
exactly the old export or exactly the new one, and the directory holds exactly one export's files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
import transformers
from flax import nnx
from hf_reference import tiny_tokenizer
from kill_at import Killed, filesystem_steps

from mwjax import converters, models, peft
from mwjax.converters.hf_export import hf_tensors
from mwjax.converters.to_orbax import convert
from mwjax.core import atomic
from mwjax.families.hf_config import read_hf_config, write_hf_config

CONFIG = read_hf_config(transformers.LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2).to_dict())
SHARD = 20_000  # bytes: the tiny model in 5 shards


@pytest.fixture(autouse=True)
def _no_tokenizer_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="save_hf: no tokenizer written")
        yield


def tiny(seed: int):
    return models.build(CONFIG, seed=seed)


def weights(model) -> dict[str, np.ndarray]:
    return hf_tensors(model)


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def tokenizer(extra: int):
    """tiny_tokenizer with `extra` more tokens: the two exports' tokenizers differ."""
    tok = tiny_tokenizer()
    tok.add_tokens([f"tok{i}" for i in range(extra)])
    return tok


def listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def orbax_listing(directory: Path) -> list[str]:
    """The entries an orbax checkpoint's files are under (its data files have random names) and the tokenizer's."""
    return sorted(p.name for p in directory.iterdir()) + listing(directory / "tokenizer")


def kill_everywhere(tmp_path: Path, write_old, write_new, read, listing=listing) -> list[str]:
    """Write the old export, then the new one killed at each of its filesystem steps in turn; each time
    `read(directory)` must name "old" or "new" and the directory must hold exactly that export's files
    (`listing`). Returns what each kill left, in step order."""
    dry = tmp_path / "dry"
    write_old(dry / "out")
    old_files = listing(dry / "out")
    with filesystem_steps(dry) as steps:
        write_new(dry / "out")
    new_files = listing(dry / "out")
    assert len(steps) >= 5, steps
    seen = []
    for n in range(1, len(steps) + 1):
        root = tmp_path / f"kill{n}"
        write_old(root / "out")
        with pytest.raises(Killed), filesystem_steps(root, kill_at=n):
            write_new(root / "out")
        which = read(root / "out")  # the reader repairs a swap killed between its renames
        assert which in ("old", "new"), f"killed at step {n} ({steps[n - 1]}): {which}"
        assert listing(root / "out") == (old_files if which == "old" else new_files), f"step {n}: {steps[n - 1]}"
        seen.append(which)
    assert seen[0] == "old" and "new" in seen, seen  # the kills reached past the point of no return
    return seen


@pytest.mark.parametrize("old_shards, new_shards", [(SHARD, SHARD), (SHARD, None), (None, SHARD)],
                         ids=["sharded over sharded", "single over sharded", "sharded over single"])
def test_save_hf_killed_at_every_step_leaves_the_old_or_the_new_model(tmp_path, old_shards, new_shards):
    a, b = tiny(0), tiny(1)
    wa, wb = weights(a), weights(b)
    shard = lambda n: {} if n is None else {"max_shard_bytes": n}

    def read(directory):
        model, tok = converters.load(directory)
        got = weights(model)
        return {(True, False): "old", (False, True): "new"}.get((same(got, wa) and len(tok) == 29,
                                                                 same(got, wb) and len(tok) == 31), "a mix")

    kill_everywhere(tmp_path, lambda d: converters.save_hf(a, d, tokenizer=tokenizer(0), **shard(old_shards)),
                    lambda d: converters.save_hf(b, d, tokenizer=tokenizer(2), **shard(new_shards)), read)


def test_a_single_file_save_over_a_sharded_one_loads_the_new_model(tmp_path):
    """The stale-shard case: the old shards and index used to stay and win over the new model.safetensors."""
    a, b = tiny(0), tiny(1)
    converters.save_hf(a, tmp_path / "m", max_shard_bytes=SHARD)
    converters.save_hf(b, tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    assert same(weights(converters.load(tmp_path / "m", tokenizer=False)[0]), weights(b))


def adapted(seed: int, dora: bool):
    model = peft.add_adapters(tiny(0), peft.LoraConfig(rank=2 + 2 * seed, alpha=4.0 + seed, dora=dora))
    for i, layer in enumerate(peft.adapters(model).values()):  # B = 0 at init: make each adapter its own
        layer.lora_b[...] = jax.random.normal(jax.random.key(seed * 100 + i), layer.lora_b.shape) * 0.1
    return model


def adapter_weights(model) -> dict[str, np.ndarray]:
    state = nnx.to_pure_dict(nnx.state(model, peft.LoRAParam))
    return {"/".join(map(str, path)): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(state)}


def test_export_peft_killed_at_every_step_leaves_the_old_or_the_new_adapter(tmp_path):
    old, new = adapted(0, dora=False), adapted(1, dora=True)  # another rank, alpha and kind: a mix cannot load
    wold, wnew = adapter_weights(old), adapter_weights(new)
    base = tiny(0)

    def read(directory):
        got = adapter_weights(peft.load_adapters(base, directory))
        return "old" if same(got, wold) else "new" if same(got, wnew) else "a mix"

    kill_everywhere(tmp_path, lambda d: peft.export_peft(old, d), lambda d: peft.export_peft(new, d), read)


def test_to_orbax_killed_at_every_step_leaves_the_old_or_the_new_checkpoint(tmp_path):
    a, b = tiny(0), tiny(1)
    src_a = converters.save_hf(a, tmp_path / "src_a", tokenizer=tokenizer(0))
    src_b = converters.save_hf(b, tmp_path / "src_b", tokenizer=tokenizer(2))
    wa, wb = weights(a), weights(b)

    def read(directory):
        model, tok = converters.load(directory)
        got = weights(model)
        return "old" if same(got, wa) and len(tok) == 29 else "new" if same(got, wb) and len(tok) == 31 else "a mix"

    kill_everywhere(tmp_path / "runs", lambda d: convert(str(src_a), d),
                    lambda d: convert(str(src_b), d, overwrite=True), read, listing=orbax_listing)


def test_an_export_refuses_to_replace_a_directory_of_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds notes.txt, which is not an HF checkpoint.*refuses"):
        converters.save_hf(tiny(0), tmp_path)
    with pytest.raises(FileExistsError, match="which is not an HF PEFT adapter"):
        peft.export_peft(adapted(0, dora=False), tmp_path)
    with pytest.raises(FileExistsError, match="which is not an mwjax orbax checkpoint"):
        convert("embedded:smollm2", tmp_path, overwrite=True)
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_a_failed_export_leaves_nothing_behind(tmp_path):
    converters.save_hf(tiny(0), tmp_path / "m")

    class Broken:
        def save_pretrained(self, directory):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        converters.save_hf(tiny(1), tmp_path / "m", tokenizer=Broken())
    assert os.listdir(tmp_path) == ["m"]  # no staging directory, no .partial file
    assert same(weights(converters.load(tmp_path / "m", tokenizer=False)[0]), weights(tiny(0)))


def test_a_dead_writers_staging_directory_is_removed_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    staging = atomic.staging_path(tmp_path / "m").with_name(
        atomic.staging_path(tmp_path / "m").name.replace(f"-{os.getpid()}-", f"-{dead.stdout.strip()}-"))
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"half")
    converters.save_hf(tiny(0), tmp_path / "m")
    assert os.listdir(tmp_path) == ["m"]


CHILD = textwrap.dedent("""
    import json, sys, warnings
    warnings.simplefilter("ignore")
    from mwjax import models
    from mwjax.converters import save_hf
    from mwjax.families.hf_config import read_hf_config
    config = read_hf_config(json.loads({config!r}))
    m = [models.build(config, seed=1), models.build(config, seed=2)]
    print("ready", flush=True)
    sys.stdin.readline()  # go
    for i in range(1000):
        save_hf(m[i % 2], {directory!r}, **({{"max_shard_bytes": {shard}}} if i % 2 else {{}}))
""")


def test_save_hf_overwrite_survives_sigkill(tmp_path):
    """A real SIGKILL at several moments into a loop of overwrites, sharded and single in turn (one child process
    per moment, started together)."""
    delays = (0.01, 0.1, 0.5)
    directories = [tmp_path / f"m{i}" for i in range(len(delays))]
    for directory in directories:
        converters.save_hf(tiny(0), directory, max_shard_bytes=SHARD)
    config = json.dumps(write_hf_config(CONFIG))
    children = [subprocess.Popen([sys.executable, "-c", CHILD.format(config=config, directory=str(d), shard=SHARD)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for d in directories]
    assert all(child.stdout.readline().strip() == "ready" for child in children)
    for child, delay in zip(children, delays, strict=True):
        child.stdin.write("go\n")
        child.stdin.flush()
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
    expected = {seed: weights(tiny(seed)) for seed in range(3)}
    seen = set()
    for directory in directories:
        got = weights(converters.load(directory, tokenizer=False)[0])
        seeds = [s for s, w in expected.items() if same(got, w)]
        assert len(seeds) == 1, f"{directory} holds none of the saved models"
        seen.add(seeds[0])
    assert seen - {0}, "no overwrite completed: the kills proved nothing"
