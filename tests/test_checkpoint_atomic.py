"""Overwriting a checkpoint is atomic: a kill at any moment leaves the old or the new one whole."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import transformers

from mwjax import models
from mwjax.converters import checkpoint
from mwjax.core import atomic
from mwjax.families.hf_config import read_hf_config

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)


def tiny(seed: int):
    return models.build(read_hf_config(transformers.LlamaConfig(**CONFIG).to_dict()), seed=seed)


def embedding(model) -> np.ndarray:
    return np.asarray(model.model.embed_tokens.embedding[...])


@functools.cache
def seed_embedding(seed: int) -> np.ndarray:
    return embedding(tiny(seed))


def which_seed(directory) -> int:
    """The seed of the model `directory` holds (restore fails on a damaged checkpoint)."""
    restored = embedding(checkpoint.restore(directory))
    seeds = [s for s in range(3) if np.array_equal(restored, seed_embedding(s))]
    assert len(seeds) == 1, "the checkpoint holds none of the saved models"
    return seeds[0]


@pytest.mark.parametrize("state", ["old moved aside", "new written, old in place", "both moved"])
def test_a_swap_killed_midway_is_repaired(state, tmp_path):
    directory = tmp_path / "ckpt"
    checkpoint.save(tiny(0), directory)
    new, old = atomic.siblings(directory)
    checkpoint.save(tiny(1), new)
    if state == "old moved aside":  # killed between the two renames
        os.replace(directory, old)
        expected = 1
    elif state == "new written, old in place":  # killed before the swap began
        expected = 0
    else:  # killed between the renames with nothing new: only the old copy exists
        os.replace(directory, old)
        shutil.rmtree(new)
        expected = 0
    assert checkpoint.is_checkpoint(directory)
    assert which_seed(directory) == expected
    assert not old.exists()
    # a reader leaves a .new beside a whole checkpoint alone (a writer may be about to swap it in); the next
    # write clears it
    assert new.exists() == (state == "new written, old in place")
    checkpoint.save(tiny(2), directory, overwrite=True)
    assert which_seed(directory) == 2 and not new.exists() and not old.exists()


CHILD = textwrap.dedent("""
    import sys, transformers
    sys.path.insert(0, {tests!r})
    from test_checkpoint_atomic import tiny
    from mwjax.converters import checkpoint
    m = [tiny(1), tiny(2)]
    print("ready", flush=True)
    for i in range(1000):
        checkpoint.save(m[i % 2], {directory!r}, overwrite=True)
""")


def test_overwrite_survives_sigkill(tmp_path):
    """SIGKILL a process that overwrites one checkpoint in a loop, at several moments into its saves."""
    directory = tmp_path / "ckpt"
    checkpoint.save(tiny(0), directory)
    script = CHILD.format(tests=os.path.dirname(__file__), directory=str(directory))
    seen = set()
    for delay in (0.0, 0.2, 0.5, 3.0):  # 3 s: past several complete overwrites
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        seen.add(which_seed(directory))
    assert seen - {0}, "no overwrite completed: the kills proved nothing"
