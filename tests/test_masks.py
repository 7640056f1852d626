"""The functional FFN row mask: equal to the dense edit, to HF with the same rows edited,
jittable, differentiable, and free when absent."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_reference import assert_close_to_scale, assert_logits_close, hf_logits, random_tokens, torch

from mwjax import converters, masks, models

LAYER, ROWS = 1, [7, 3, 50, 91, 12]


@pytest.fixture(scope="module")
def loaded(hf_checkpoint):
    hf, path = hf_checkpoint("llama_gqa")
    model, _ = converters.load(path, tokenizer=False)
    return hf, model


def random_mask(d_model, seed=0):
    values = jax.random.uniform(jax.random.key(seed), (len(ROWS), d_model)) > 0.5
    return masks.RowMask(rows=jnp.asarray(ROWS, jnp.int32), values=values.astype(jnp.float32))


def dense_edit_state(state, mask, d_ff):
    """Multiply W_gate and W_up of LAYER by the dense mask (kernel = PyTorch weight transposed)."""
    full = masks.dense(mask, d_ff).T  # [d_model, d_ff]
    mlp = state["model"]["layers"][LAYER]["mlp"]
    for proj in ("gate_proj", "up_proj"):
        mlp[proj]["kernel"] = mlp[proj]["kernel"] * full
    return state


def test_sparse_mask_equals_dense_edit(loaded):
    _, model = loaded
    cfg = model.config
    mask = random_mask(cfg.hidden_size)
    tokens = jnp.asarray(random_tokens(128))
    sparse = models.forward(model, tokens, ffn_masks={LAYER: mask})
    graphdef, state = nnx.split(model)
    pure = dense_edit_state(nnx.to_pure_dict(state), mask, cfg.intermediate_size)
    nnx.replace_by_pure_dict(state, pure)
    dense = models.forward(nnx.merge(graphdef, state), tokens)
    assert_logits_close(sparse, dense, rel=1e-6)
    # and the mask does change the output
    with pytest.raises(AssertionError):
        assert_logits_close(sparse, models.forward(model, tokens), rel=1e-3)


def test_original_model_untouched(loaded):
    _, model = loaded
    before = np.asarray(model.model.layers[LAYER].mlp.up_proj.kernel[...]).copy()
    models.forward(model, jnp.asarray(random_tokens(8)), ffn_masks={LAYER: masks.zero_rows(ROWS, 64)})
    np.testing.assert_array_equal(model.model.layers[LAYER].mlp.up_proj.kernel[...], before)


def test_zeroed_rows_match_hf_with_rows_zeroed(loaded, hf_checkpoint):
    hf, model = loaded
    tokens = random_tokens(256)
    ours = models.forward(model, jnp.asarray(tokens), ffn_masks={LAYER: masks.zero_rows(ROWS, 64)})
    edited = type(hf)(hf.config).eval()
    edited.load_state_dict(hf.state_dict())
    with torch.no_grad():
        for proj in (edited.model.layers[LAYER].mlp.up_proj, edited.model.layers[LAYER].mlp.gate_proj):
            proj.weight[ROWS] = 0.0
    assert_logits_close(ours, hf_logits(edited, tokens))


def test_mask_is_jittable_and_differentiable(loaded):
    _, model = loaded
    cfg = model.config
    mask = random_mask(cfg.hidden_size, seed=1)
    tokens = jnp.asarray(random_tokens(32))
    graphdef, state = nnx.split(model)

    def loss(state, dense: bool):
        if dense:
            pure = dense_edit_state(nnx.to_pure_dict(state), mask, cfg.intermediate_size)
            nnx.replace_by_pure_dict(state, pure)
            logits = nnx.merge(graphdef, state)(tokens)
        else:
            logits = nnx.merge(graphdef, state)(tokens, ffn_masks={LAYER: mask})
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0])

    g_sparse = jax.jit(jax.grad(loss), static_argnums=1)(state, False)
    g_dense = jax.jit(jax.grad(loss), static_argnums=1)(state, True)
    for (path, a), (_, b) in zip(nnx.to_flat_state(g_sparse), nnx.to_flat_state(g_dense), strict=True):
        a, b = np.asarray(a.get_value()), np.asarray(b.get_value())
        assert np.all(np.isfinite(a)), path
        assert_close_to_scale(a, b, 1e-5, rtol=1e-4, what=str(path))
    kernel_grad = nnx.to_pure_dict(g_sparse)["model"]["layers"][LAYER]["mlp"]["up_proj"]["kernel"]
    dropped = np.asarray(masks.dense(mask, cfg.intermediate_size).T) == 0
    assert np.all(np.asarray(kernel_grad)[dropped] == 0)  # masked weights get no gradient



def test_absent_mask_costs_nothing(loaded):
    _, model = loaded
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(random_tokens(8))
    trace = lambda m: jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens, ffn_masks=m))(state)
    plain = trace(None)
    assert str(plain) == str(trace({}))
    with_mask = trace({LAYER: masks.zero_rows(ROWS, 64)})
    assert str(with_mask).count("dot_general") == str(plain).count("dot_general") + 2


def test_mask_validation(loaded):
    _, model = loaded
    tokens = jnp.asarray(random_tokens(4))
    with pytest.raises(ValueError, match="layer 7 is out of range"):
        model(tokens, ffn_masks={7: masks.zero_rows([1], 64)})
    with pytest.raises(ValueError, match=r"values must have shape \[k, d_model\]"):
        model(tokens, ffn_masks={0: masks.RowMask(rows=jnp.array([1, 2]), values=jnp.ones((2, 63)))})
    with pytest.raises(ValueError, match=r"row indices must lie in \[0, d_ff=96\)"):
        model(tokens, ffn_masks={0: masks.zero_rows([96], 64)})
    with pytest.raises(ValueError, match="no experts"):
        model(tokens, ffn_masks={0: masks.zero_rows([1], 64, expert=0)})


def test_dense_mask_layout():
    mask = masks.row_mask([2, 0], jnp.array([[0.0, 1.0, 0.5], [2.0, 2.0, 2.0]]), 3)
    full = np.asarray(masks.dense(mask, 4))
    np.testing.assert_array_equal(full, [[2, 2, 2], [1, 1, 1], [0, 1, 0.5], [1, 1, 1]])
    kernel = jnp.arange(12.0).reshape(3, 4)  # [d_model, d_ff]: PyTorch row i = kernel[:, i]
    np.testing.assert_array_equal(masks.pytorch_rows(kernel, jnp.array([2])), kernel[:, 2:3])
