"""The chunked vocabulary loss equals the whole-logits loss, value and gradients, to float32 noise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from hf_reference import TINY_CONFIGS, assert_close_to_scale, random_tokens

from mwjax import models
from mwjax.families.hf_config import read_hf_config
from mwjax.finetune.loss import IGNORE, chunked_token_loss, token_loss
from mwjax.nn.config import ModelConfig


def tiny_model(name: str):
    cls_name, kwargs = TINY_CONFIGS[name]
    kwargs = kwargs | dict(num_hidden_layers=1)  # the loss sits after the layers: one is enough (and compiles fast)
    return models.build(read_hf_config(getattr(transformers, cls_name)(**kwargs).to_dict()), seed=0)


# llama_gqa: its own lm_head; gemma2: tied embedding and final logit soft-capping (both inside `unembed`)
@pytest.mark.parametrize("name", ["llama_gqa", "gemma2"])
def test_chunked_loss_and_gradients_equal_the_whole_logits(name):
    model = tiny_model(name)
    tokens = jnp.asarray(random_tokens(24, batch=2))
    labels = tokens.at[:, :5].set(IGNORE).at[1, 20:].set(IGNORE)  # a prompt and padding without loss
    graphdef, params = nnx.split(model)

    def whole(params):
        return token_loss(nnx.merge(graphdef, params)(tokens), labels)

    def chunked(params, chunk):
        model = nnx.merge(graphdef, params)
        return chunked_token_loss(model.unembed, model.hidden_states(tokens)[0], labels, chunk)

    grad = lambda f, *args: jax.jit(jax.value_and_grad(lambda p: f(p, *args), has_aux=True))(params)
    (ref, ref_count), ref_grads = grad(whole)
    ref_grads = dict(nnx.to_flat_state(ref_grads))
    for chunk in (5, 64):  # 5 does not divide the 23 predicted positions; 64 > 23 pads one chunk
        (value, count), grads = grad(chunked, chunk)
        assert int(count) == int(ref_count) == 2 * 23 - 4 - 4 - 4
        np.testing.assert_allclose(float(value), float(ref), rtol=2e-6)
        for path, g in nnx.to_flat_state(grads):
            assert_close_to_scale(g[...], ref_grads[path][...], 1e-5, what=f"{path} chunk {chunk}")


def test_a_bad_chunk_is_refused():
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        chunked_token_loss(lambda h: h, jnp.zeros((1, 4, 2)), jnp.zeros((1, 4), jnp.int32), 0)


def test_the_trainer_with_the_chunked_loss_compiles_to_less_memory():
    """The abstract trainer (an nnx.eval_shape model: no weights) compiles its step; chunking the loss over a
    vocabulary much wider than the model shrinks the step's temp memory (benchmarks/compile_memory.py at scale)."""
    from mwjax import peft
    from mwjax.core import sharding
    from mwjax.finetune import train

    config = ModelConfig(model_type="llama", vocab_size=8192, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = nnx.eval_shape(lambda: peft.add_adapters(models.build(config), peft.LoraConfig(rank=2)))

    def temp_bytes(loss_chunk):
        tc = train.TrainConfig(micro_batch_size=2, grad_accum=1, max_steps=1, loss_chunk=loss_chunk)
        trainer = train.Trainer(model, tc, steps=1, mesh=sharding.make_mesh())
        assert trainer.abstract
        batch = {k: jax.ShapeDtypeStruct((1, 2, 64), jnp.int32, sharding=sharding.batch_sharding(trainer.mesh, 3))
                 for k in train.BATCH_KEYS}
        compiled = trainer.step_fn.lower(trainer.initial_state, trainer.frozen, batch).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = 2 * 64 * 8192 * 4  # [b, t, V] float32
    assert temp_bytes(None) - temp_bytes(8) > logits_bytes
