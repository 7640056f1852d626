"""KV-cache decoding equals the full forward; activation edits equal the same edit done by a torch hook."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import assert_logits_close, hf_logits, random_tokens, torch

from mwjax import converters, models, probes
from mwjax.instrument import interventions
from mwjax.instrument.interventions import ActivationEdit
from mwjax.nn.cache import KVCache


@pytest.mark.parametrize("name", ["llama_gqa", "mistral_sliding"])
def test_incremental_decoding_equals_full_forward(name, tiny_checkpoint):
    path = tiny_checkpoint(name)
    model, _ = converters.load(path, tokenizer=False)
    tokens = jnp.asarray(random_tokens(80, batch=2, seed=3))
    full = models.forward(model, tokens)
    cache = KVCache.init(model.config, batch=2, max_len=96)
    step = jax.jit(lambda m, toks, c: m(toks, cache=c))
    logits, cache = step(model, tokens[:, :60], cache)  # prefill
    pieces = [logits]
    for i in range(60, 80):  # then one token at a time
        logits, cache = step(model, tokens[:, i:i + 1], cache)
        pieces.append(logits)
    assert int(cache.length) == 80
    assert_logits_close(jnp.concatenate(pieces, axis=1), full, rel=1e-5)


def test_cache_with_left_padding(tiny_checkpoint):
    path = tiny_checkpoint("llama_gqa")
    model, _ = converters.load(path, tokenizer=False)
    tokens = random_tokens(20, seed=4)[0]
    pad = 5
    padded = np.concatenate([np.zeros(pad, np.int32), tokens])[None]
    mask = np.ones((1, 32), np.int32)
    mask[0, :pad] = 0
    positions = np.maximum(np.cumsum(mask[:, :25], axis=1) - 1, 0).astype(np.int32)
    logits, _ = model(jnp.asarray(padded), positions=jnp.asarray(positions), attention_mask=jnp.asarray(mask),
                      cache=KVCache.init(model.config, 1, 32))
    unpadded = models.forward(model, jnp.asarray(tokens[None]))
    assert_logits_close(logits[:, pad:], unpadded, rel=1e-5)


def test_attention_mask_shape_is_checked(tiny_checkpoint):
    path = tiny_checkpoint("llama_gqa")
    model, _ = converters.load(path, tokenizer=False)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[batch, cache.max_len\]"):
        model(jnp.ones((1, 4), jnp.int32), attention_mask=jnp.ones((1, 4)), cache=KVCache.init(model.config, 1, 8))


@pytest.mark.parametrize("point", ["hidden", "down_proj_output", "intermediate"])
def test_edit_equals_torch_hook(point, hf_checkpoint):
    hf, path = hf_checkpoint("llama_gqa")
    model, _ = converters.load(path, tokenizer=False)
    tokens = random_tokens(40, seed=5)
    layer, dims = 1, jnp.array([3, 17])
    where = np.zeros((1, 40), bool)
    where[0, [0, 7]] = True
    edit = ActivationEdit(dims=dims, values=jnp.array([0.5, -2.0]), where=jnp.asarray(where))

    def hook_out(module, inp, out):
        out = (out[0] if isinstance(out, tuple) else out).clone()
        for pos in (0, 7):
            out[0, pos, [3, 17]] = torch.tensor([0.5, -2.0])
        return out

    def hook_in(module, inp):
        x = inp[0].clone()
        for pos in (0, 7):
            x[0, pos, [3, 17]] = torch.tensor([0.5, -2.0])
        return (x,)

    hf_layer = hf.model.layers[layer]
    handle = {"hidden": lambda: hf_layer.register_forward_hook(hook_out),
              "down_proj_output": lambda: hf_layer.mlp.down_proj.register_forward_hook(hook_out),
              "intermediate": lambda: hf_layer.mlp.down_proj.register_forward_pre_hook(hook_in)}[point]()
    try:
        ref = hf_logits(hf, tokens)
    finally:
        handle.remove()
    config = probes.ProbeConfig(points=(point,), layers=(layer,))
    ours, seen = probes.capture(model, jnp.asarray(tokens), config, edits={(point, layer): edit})
    assert_logits_close(ours, ref)
    np.testing.assert_allclose(seen.point(point)[layer].full[0, 7, jnp.array([3, 17])], [0.5, -2.0])
    with pytest.raises(AssertionError):  # the edit matters
        assert_logits_close(models.forward(model, jnp.asarray(tokens)), ref)


def test_edit_validation(tiny_checkpoint):
    path = tiny_checkpoint("llama_gqa")
    model, _ = converters.load(path, tokenizer=False)
    edit = ActivationEdit(dims=jnp.array([0]), values=jnp.zeros(()))
    with pytest.raises(ValueError, match="cannot be edited"):
        model(jnp.ones((1, 2), jnp.int32), edits={("attn_probs", 0): edit})
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        model(jnp.ones((1, 2), jnp.int32), edits={("hidden", 9): edit})


def test_first_token_values_follow_positions_not_indices():
    x = jnp.full((2, 3, 4), 500.0)  # every entry "massive"
    edit = {("hidden", 0): ActivationEdit(dims=jnp.array([1, 2]), values=jnp.array([7.0, 8.0]), min_abs=100.0,
                                          first_values=jnp.array([1.0, 2.0]))}
    positions = jnp.array([[0, 1, 2], [5, 6, 7]])  # the second row: a later chunk, as in cached decoding
    out = np.asarray(interventions.apply(edit, "hidden", 0, x, positions))
    np.testing.assert_array_equal(out[0, 0, 1:3], [1, 2])  # the first token: its own values
    np.testing.assert_array_equal(out[0, 1:, 1:3], [[7, 8], [7, 8]])
    np.testing.assert_array_equal(out[1, :, 1:3], [[7, 8]] * 3)  # no position 0 in this call
    np.testing.assert_array_equal(out[..., [0, 3]], 500.0)
    assert np.asarray(interventions.apply(edit, "hidden", 0, x))[1, 0, 1] == 1.0  # default positions 0..t-1
