"""jit_model: one compiled program per model structure and static arguments, the weights traced."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx

from mwjax import models
from mwjax.core import compiled
from mwjax.core.compiled import jit_model
from mwjax.families.hf_config import read_hf_config

CONFIG = read_hf_config(transformers.LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2).to_dict())


def test_models_of_one_structure_share_a_program_and_static_args_stay_static():
    @jit_model(static_argnums=1)
    def last_logits(model, tokens, scale):
        assert isinstance(scale, float)  # static: a Python value while tracing
        return model(tokens)[:, -1] * scale

    tokens = jnp.arange(5, dtype=jnp.int32)[None]
    a, b = models.build(CONFIG, seed=0), models.build(CONFIG, seed=1)
    out_a, out_b = last_logits(a, tokens, 2.0), last_logits(b, tokens, 2.0)
    assert last_logits._cache_size() == 1  # b has other weights, same structure: no recompilation
    np.testing.assert_allclose(out_a, a(tokens)[:, -1] * 2.0, atol=1e-5)  # jit vs eager
    assert not np.allclose(out_a, out_b)
    np.testing.assert_array_equal(last_logits.on_state(*nnx.split(a), tokens, 2.0), out_a)
    last_logits(a, tokens, 3.0)
    assert last_logits._cache_size() == 2  # a new static value compiles anew
    assert last_logits.__name__ == "last_logits"


def test_plain_decorator_traces_everything_but_the_graphdef():
    @jit_model
    def logits(model, tokens, kwargs):
        return model(tokens, **kwargs)

    model = models.build(CONFIG, seed=0)
    np.testing.assert_allclose(logits(model, jnp.ones((1, 3), jnp.int32), {}), model(jnp.ones((1, 3), jnp.int32)),
                               atol=1e-5)


def test_keep_compiled_programs_sets_a_cache_once(tmp_path):
    before = jax.config.jax_compilation_cache_dir  # the suite's own (conftest)
    assert compiled.keep_compiled_programs(tmp_path / "a") == before  # a cache already set stays
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert compiled.keep_compiled_programs("") is None and jax.config.jax_compilation_cache_dir is None
        assert compiled.keep_compiled_programs(tmp_path / "a") == str(tmp_path / "a")
        assert compiled.keep_compiled_programs(tmp_path / "b") == str(tmp_path / "a")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "a")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
