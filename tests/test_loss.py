"""The chunked vocabulary loss equals the whole-logits loss, value and gradients, to float32 noise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from hf_reference import TINY_CONFIGS, assert_close_to_scale, random_tokens

from mwjax import models
from mwjax.config import ModelConfig
from mwjax.loss import IGNORE, chunked_token_loss, token_loss


def tiny_model(name: str):
    cls_name, kwargs = TINY_CONFIGS[name]
    kwargs = kwargs | dict(num_hidden_layers=1)  # the loss sits after the layers: one is enough (and compiles fast)
    return models.build(ModelConfig.from_hf_config(getattr(transformers, cls_name)(**kwargs).to_dict()), seed=0)


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
