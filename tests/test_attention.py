"""Fused attention (`jax.nn.dot_product_attention`) against the eager path and HF, and the choice between them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import assert_close_to_scale, assert_logits_close, hf_logits, random_tokens

from mwjax import converters, models, probes
from mwjax.nn import attention


def qkv(b=2, t=12, s=12, h=4, h_kv=2, d=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (b, t, h, d)), jax.random.normal(keys[1], (b, s, h_kv, d)),
            jax.random.normal(keys[2], (b, s, h_kv, d)))


MASKS = {  # name -> (q_len, kv_len, causal_mask kwargs)
    "sliding": (12, 12, dict(sliding_window=4)),
    "padding_and_segments": (12, 12, dict(padding_mask=jnp.asarray(np.r_[[0] * 3 + [1] * 9, [1] * 12].reshape(2, 12)),
                                          segment_ids=jnp.asarray(np.r_[[1] * 12, [1] * 5 + [2] * 7].reshape(2, 12)))),
    "cache": (3, 12, dict(q_offset=6, sliding_window=5)),  # 3 new queries after 6 cached positions
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_fused_attention_equals_eager_with_its_gradients(name):
    t, s, kwargs = MASKS[name]
    q, k, v = qkv(t=t, s=s)
    mask = attention.causal_mask(t, s, **kwargs)
    paths = (lambda q, k, v: attention.grouped_query_attention(q, k, v, mask, scale=0.3)[0],
             lambda q, k, v: attention.fused_attention(q, k, v, mask, scale=0.3, implementation="xla", causal=t == s))

    @jax.jit
    def outputs_and_grads(q, k, v):
        return [jax.value_and_grad(lambda *a, f=f: (lambda y: (jnp.sum(jnp.sin(y)), y))(f(*a)), argnums=(0, 1, 2),
                                   has_aux=True)(q, k, v) for f in paths]

    ((_, eager), eager_grads), ((_, fused), fused_grads) = outputs_and_grads(q, k, v)
    assert_close_to_scale(fused, eager, 1e-6, what="output")
    for ours, ref, what in zip(fused_grads, eager_grads, "qkv", strict=True):
        assert_close_to_scale(ours, ref, 1e-6, what=f"d/d{what}")


def test_the_choice_of_implementation(monkeypatch):
    choose = lambda requested="auto", probs=False, softcap=None, dtype=jnp.bfloat16, cached=False: (
        attention.choose_implementation(requested, needs_probs=probs, softcap=softcap, dtype=dtype, cached=cached))
    assert choose() == "eager" and choose("xla") == "xla"  # on this CPU
    assert choose(probs=True) == "eager" and choose(softcap=50.0) == "eager"
    assert choose("cudnn", probs=True) == "eager" and choose("xla", softcap=50.0) == "eager"  # no kernel does those
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert choose() == "cudnn" and choose(dtype=jnp.float16) == "cudnn" and choose("xla") == "xla"
    assert choose(dtype=jnp.float32) == "eager" and choose(cached=True) == "eager" and choose(softcap=30.0) == "eager"
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        choose("flash")


@pytest.mark.parametrize("implementation", ["eager", "xla"])
@pytest.mark.parametrize("name", ["mistral_sliding", "gemma3"])
def test_both_paths_match_hf_with_sliding_window_and_padding(name, implementation, hf_checkpoint):
    hf, path = hf_checkpoint(name)
    model = converters.load(path, tokenizer=False)[0]
    model.set_attributes(attention=implementation)
    tokens = random_tokens(72, hf.config.vocab_size, batch=2, seed=5)  # longer than the windows (48 / 40)
    mask = np.ones_like(tokens)
    mask[1, :9] = 0  # left padding
    ours = np.asarray(models.forward(model, jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    valid = mask.astype(bool)
    assert_logits_close(ours[valid], hf_logits(hf, tokens, mask)[valid])
    if implementation == "xla":  # probing the probabilities switches to the eager path by itself
        _, result = probes.capture(model, jnp.asarray(tokens[:1, :16]), probes.ProbeConfig(points=("attn_probs",)))
        assert result.attn_probs[0].full.shape == (1, hf.config.num_attention_heads, 16, 16)
