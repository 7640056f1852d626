"""checkpoint.save refuses a model with adapters (restore rebuilds a plain model) and names both remedies."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from mwjax import models, peft
from mwjax.converters import checkpoint
from mwjax.families.hf_config import read_hf_config

CONFIG = read_hf_config(transformers.LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2).to_dict())


def adapted():
    model = peft.add_adapters(models.build(CONFIG), peft.LoraConfig(rank=2, alpha=4.0))
    for layer in peft.adapters(model).values():  # B = 0 at init: make the adapters change the output
        layer.lora_b[...] = jax.random.normal(jax.random.key(1), layer.lora_b.shape) * 0.1
    return model


def test_save_refuses_adapters_and_names_merge_and_save_adapters(tmp_path):
    with pytest.raises(ValueError, match=re.escape("checkpoint.save: the model carries LoRA/DoRA adapters")) as err:
        checkpoint.save(adapted(), tmp_path / "ckpt")
    assert "peft.merge(model)" in str(err.value) and "peft.save_adapters(model, directory)" in str(err.value)
    assert not (tmp_path / "ckpt").exists()


def test_the_merged_model_saves_and_restores_as_the_adapted_one(tmp_path):
    model = adapted()
    tokens = jnp.arange(6, dtype=jnp.int32)[None]
    restored = checkpoint.restore(checkpoint.save(peft.merge(model), tmp_path / "ckpt"))
    assert not peft.adapters(restored)
    np.testing.assert_allclose(restored(tokens), model(tokens), atol=1e-5)


def test_save_hf_refuses_adapters_too(tmp_path):
    from mwjax.converters import save_hf

    with pytest.raises(ValueError, match=re.escape("save_hf: the model carries LoRA/DoRA adapters")):
        save_hf(adapted(), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
