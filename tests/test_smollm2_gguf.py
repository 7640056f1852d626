"""The real SmolLM2-135M-Instruct (Q4_1 GGUF shipped on PyPI) against transformers' own GGUF load."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import LIGHTHOUSE, assert_bos_intermediate_agrees, assert_logits_close, gguf_with_transformers, torch

from mwjax import models

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def both(smollm2_path):
    return gguf_with_transformers(smollm2_path, smollm2_path)


def test_config_and_tokenizer(both):
    ours, tokenizer, hf = both
    c = ours.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.tie_word_embeddings) == (9, 3, True)
    assert c.rope.theta == hf.config.rope_parameters["rope_theta"] == 100000.0
    assert tokenizer.bos_token_id == 1


def test_logits_match_transformers_gguf(both):
    ours, tokenizer, hf = both
    ids = np.asarray([tokenizer(LIGHTHOUSE).input_ids], np.int32)
    assert ids.shape[1] >= 250
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids).long()).logits.numpy()
    err, scale = assert_logits_close(models.forward(ours, jnp.asarray(ids)), ref)
    print(f"SmolLM2-135M GGUF, {ids.shape[1]} tokens: max abs logit diff {err:.2e} (logit scale {scale:.1f})")
    np.testing.assert_array_equal(np.asarray(models.forward(ours, jnp.asarray(ids))).argmax(-1), ref.argmax(-1))


def test_bos_massive_intermediate_agrees(both):
    ours, tokenizer, hf = both
    _, layer = assert_bos_intermediate_agrees(ours, tokenizer, hf)
    assert layer["layer"] == 11  # "layer 12" in the papers' numbering
    assert abs(layer["intermediate"]["top_values"][0]) > 1000 * layer["intermediate"]["median"]


def test_probe_cli_on_the_embedded_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "experiments.probe", f"--output_dir={tmp_path}"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert ("massive weights' layer: 12 (HF layers[11]) (earliest layer whose intermediate state is massive"
            in out.stdout)
    assert "dim 1229, |x| = 3064.8" in out.stdout
    assert (tmp_path / "probe.json").exists()
    assert (tmp_path / "bos_hidden.png").stat().st_size > 0 and (tmp_path / "bos_intermediate.png").stat().st_size > 0
