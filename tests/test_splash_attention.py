"""The Pallas TPU splash attention kernel (`attention.splash_attention`) against the eager path, in interpret mode
on this CPU (never run on a TPU here): outputs and gradients per mask, the forward of whole models (unrolled and
stacked), the automatic choice, and the fallbacks to the eager path for what the kernel cannot express."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from hf_reference import TINY_CONFIGS, assert_close_to_scale, random_tokens

from mwjax import models
from mwjax.families.hf_config import read_hf_config
from mwjax.nn import attention
from mwjax.nn.stack import stack_layers

T = 12
LEFT_PADDING = jnp.asarray(np.r_[[0] * 3 + [1] * 9, [1] * 12].reshape(2, T))
PACKED = jnp.asarray(np.r_[[1] * 12, [1] * 5 + [2] * 7].reshape(2, T))
CASES = {  # name -> (sliding window, soft-cap, kv heads, layer_type_masks kwargs)
    "causal_gqa": (None, None, 2, {}),
    "sliding_mqa": (5, None, 1, {}),
    "left_padding_and_packed_segments": (5, None, 2, dict(padding_mask=LEFT_PADDING, segment_ids=PACKED)),
    "softcap_and_left_padding": (None, 2.0, 2, dict(padding_mask=LEFT_PADDING)),  # Gemma 2's tanh soft-capping
}


def random_model(name: str, **overrides):
    cls_name, kwargs = TINY_CONFIGS[name]
    return models.build(read_hf_config(getattr(transformers, cls_name)(**kwargs | overrides).to_dict()),
                        seed=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_splash_equals_eager_with_its_gradients(name):
    window, softcap, h_kv, kwargs = CASES[name]
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, T, 4, 8))
    k, v = (jax.random.normal(key, (2, T, h_kv, 8)) for key in keys[1:])
    mask = attention.layer_type_masks(T, T, {"kind": window}, **kwargs)["kind"]
    assert mask.splash
    real = kwargs.get("padding_mask", jnp.ones((2, T)))[:, :, None, None]  # padded queries: meaningless in both
    paths = (lambda q, k, v: attention.grouped_query_attention(q, k, v, mask.dense, scale=0.3, softcap=softcap)[0],
             lambda q, k, v: attention.splash_attention(q, k, v, mask, scale=0.3, softcap=softcap))

    @jax.jit
    def outputs_and_grads(q, k, v):
        return [jax.value_and_grad(lambda *a, f=f: (lambda y: (jnp.sum(jnp.sin(y) * real), y * real))(f(*a)),
                                   argnums=(0, 1, 2), has_aux=True)(q, k, v) for f in paths]

    ((_, eager), eager_grads), ((_, splash), splash_grads) = outputs_and_grads(q, k, v)
    assert_close_to_scale(splash, eager, 1e-6, what="output")
    for ours, ref, what in zip(splash_grads, eager_grads, "qkv", strict=True):
        assert_close_to_scale(ours, ref, 1e-6, what=f"d/d{what}")


@pytest.mark.parametrize("name", ["llama_gqa", "gemma3", "gemma2"])  # gemma3: sliding and full layers; gemma2: soft-cap
def test_model_forward_with_splash_equals_eager(name):
    model = random_model(name, num_hidden_layers=2 if name == "gemma2" else 3)
    tokens = jnp.asarray(random_tokens(60, batch=2, seed=1))  # longer than the windows (40 / 48)
    padding = jnp.ones_like(tokens).at[1, :7].set(0)  # left padding
    model.set_attributes(attention="eager")
    eager = np.asarray(models.forward(model, tokens, attention_mask=padding))
    model.set_attributes(attention="splash")
    splash = np.asarray(models.forward(model, tokens, attention_mask=padding))
    valid = np.asarray(padding, bool)
    assert_close_to_scale(splash[valid], eager[valid], 1e-5, what=f"{name} logits")


def test_stacked_layers_pick_each_layer_types_kernel_and_train():
    """The scan indexes the masks with a traced layer type: splash switches between its two windows' kernels."""
    model = stack_layers(random_model("gemma3"))  # layers: sliding, sliding, full
    tokens = jnp.asarray(random_tokens(48, batch=1, seed=2))
    segments = jnp.asarray([[1] * 44 + [2] * 4])  # two packed sequences, the first longer than the window (40)

    def loss(model):
        return jnp.mean(jax.nn.logsumexp(model(tokens, segment_ids=segments), axis=-1))

    results = {}
    for implementation in ("eager", "splash"):
        model.set_attributes(attention=implementation)
        results[implementation] = jax.jit(jax.value_and_grad(loss))(model)
    (eager, eager_grads), (splash, splash_grads) = results["eager"], results["splash"]
    assert_close_to_scale(splash, eager, 1e-6, what="loss")
    for ours, ref in zip(jax.tree.leaves(splash_grads), jax.tree.leaves(eager_grads), strict=True):
        assert_close_to_scale(ours, ref, 1e-5, what="gradient")  # (the treedefs differ in the attention attribute)


def test_what_the_kernel_cannot_express_runs_the_eager_path():
    """A KV cache or a per-query [b, t, kv_len] mask (`mwjax.eval.continuations`) under attention="splash":
    `splash_attention` refuses such masks, so these forwards ran the eager path."""
    per_query = attention.layer_type_masks(T, T, {"kind": None}, padding_mask=jnp.ones((1, T, T)))["kind"]
    cached = attention.layer_type_masks(3, T, {"kind": None}, q_offset=6)["kind"]
    assert not per_query.splash and not cached.splash
    q = jnp.ones((1, T, 2, 8))
    with pytest.raises(ValueError, match="no KV cache and no per-query"):
        attention.splash_attention(q, q, q, per_query, scale=1.0)
    model = random_model("llama_gqa", num_hidden_layers=1)
    tokens = jnp.asarray(random_tokens(T, seed=3))
    keys = jnp.asarray(np.tril(np.ones((1, T, T), np.int32)))
    ref = models.forward(model, tokens, attention_mask=keys)
    model.set_attributes(attention="splash")
    assert_close_to_scale(models.forward(model, tokens, attention_mask=keys), ref, 0.0, what="per-query mask")


def test_the_choice_of_splash():
    def choose(requested="auto", backend="tpu", probs=False, softcap=None, cached=False, splash_mask=True):
        return attention.choose_implementation(requested, needs_probs=probs, softcap=softcap, dtype=jnp.bfloat16,
                                               cached=cached, splash_mask=splash_mask, backend=backend)

    assert choose() == "splash" and choose(softcap=50.0) == "splash"  # any dtype, soft-capped or not
    assert choose(cached=True) == "eager" and choose(splash_mask=False) == "eager" and choose(probs=True) == "eager"
    assert choose("xla") == "xla" and choose("eager") == "eager"
    assert choose(backend="gpu") == "cudnn" and choose(backend="cpu") == "eager"  # splash is TPU-only under auto
    for backend in ("cpu", "gpu", "tpu"):  # asked for: anywhere (interpret mode off a TPU) where it can
        assert choose("splash", backend) == "splash" and choose("splash", backend, softcap=30.0) == "splash"
        assert choose("splash", backend, cached=True) == "eager" and choose("splash", backend, probs=True) == "eager"
    assert attention.choose_implementation("auto", needs_probs=False, softcap=None, dtype=jnp.float32,
                                           cached=False, splash_mask=True) == "eager"  # this CPU's own backend
