"""Probes and activation edits inside the stacked layers' scan (`mwjax.nn.stack`): `probes.capture` and
edited forwards (and their gradients under remat) of a stacked model equal the unrolled model's, from one
`jax.lax.scan` whose body is one decoder layer whatever the depth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from hf_reference import TINY_CONFIGS, assert_close_to_scale, random_tokens

from mwjax import attacks, masks, models, probes
from mwjax.families.hf_config import read_hf_config
from mwjax.instrument.interventions import ActivationEdit
from mwjax.nn.stack import stack_layers

TOKENS = jnp.asarray(random_tokens(24, batch=2, seed=7))
PADDING = jnp.asarray(np.arange(24)[None] >= np.array([[0], [5]]), jnp.int32)  # row 1 left-padded by 5
POSITIONS = jnp.maximum(jnp.cumsum(PADDING, axis=1) - 1, 0).astype(jnp.int32)
DENSE_POINTS = tuple(point for point in probes.POINTS if point != "router_probs")


def tiny(name: str, **overrides) -> nnx.Module:
    """A random mwjax model of one of the tiny HF configs (3 layers unless overridden)."""
    cls_name, kwargs = TINY_CONFIGS[name]
    return models.build(read_hf_config(getattr(transformers, cls_name)(**kwargs | overrides).to_dict()))


def assert_same_probes(got: probes.ProbeResult, ref: probes.ProbeResult, what: str) -> None:
    """The same points, layers, statistics, shapes and dtypes; floats equal to float32 noise, indices equal."""
    assert jax.tree.structure(got) == jax.tree.structure(ref), what  # points, layers, statistics recorded
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(ref), strict=True):
        where = f"{what} {jax.tree_util.keystr(path)}"
        assert (g.shape, g.dtype) == (r.shape, r.dtype), where
        if jnp.issubdtype(r.dtype, jnp.integer):
            np.testing.assert_array_equal(g, r, err_msg=where)
        else:
            assert_close_to_scale(g, r, 5e-6, what=where)


# (family, probe config, model kwargs): every point, each statistic and scope, all layers and subsets
PROBE_CASES = {
    "llama_gqa": (probes.ProbeConfig(points=DENSE_POINTS), dict(attention_mask=PADDING, positions=POSITIONS)),
    "gemma3": (probes.ProbeConfig(points=("attn_probs", "attn_residual", "hidden", "intermediate"), layers=(0, 2),
                                  top_k=3, median=True), dict(attention_mask=PADDING)),  # sliding + full layers
    "gemma2": (probes.ProbeConfig(points=("attn_probs", "mlp_input"), layers=(1, 9), full=False, top_k=4,
                                  median=True, scope="sequence"), {}),  # soft-capped scores; layer 9 absent
    "mixtral": (probes.ProbeConfig(points=("router_probs", "gate_activation", "intermediate", "down_proj_output"),
                                   layers=(2,)), {}),  # + row masks on expert 1 below
    "olmo2": (probes.ProbeConfig(points=("attn_input", "attn_output", "attn_residual", "mlp_input", "down_proj_output",
                                         "hidden")), dict(attention_mask=PADDING)),  # post-norm layers' points
}


@pytest.mark.parametrize("name", PROBE_CASES)
def test_stacked_probes_equal_unrolled(name):
    model = tiny(name)
    # the kernel and the routed experts unless a probe needs eager attention / every expert (`Taps.touches`)
    model.set_attributes(attention="xla")
    config, kwargs = PROBE_CASES[name]
    if model.config.num_local_experts:
        model.set_attributes(dispatch="routed")
        kwargs = dict(ffn_masks={1: masks.zero_rows([2, 5], model.config.hidden_size, expert=1)})
    ref_logits, ref = probes.capture(model, TOKENS, config, **kwargs)
    logits, got = probes.capture(stack_layers(model), TOKENS, config, **kwargs)
    assert_close_to_scale(logits, ref_logits, 5e-6, what=f"{name} logits")
    assert_same_probes(got, ref, name)
    assert sorted(p for p in probes.POINTS if ref.point(p)) == sorted(config.points)
    assert all(list(ref.point(p)) == list(config.layers_of(3)) for p in config.points)


EDITS = {  # different shapes at one point (a scan switches between them), a min_abs edit of the FFN state
    ("hidden", 0): ActivationEdit(dims=jnp.asarray([1, 5]), values=jnp.asarray([30.0, -20.0])),
    ("hidden", 1): ActivationEdit(dims=jnp.asarray([2, 3, 7]), values=jnp.ones(3), first_values=jnp.full(3, 9.0)),
    ("intermediate", 2): ActivationEdit(dims=jnp.asarray([4, 8]), values=jnp.zeros(2), min_abs=0.01),
}


@pytest.mark.parametrize("name, attach", [("gemma3", True), ("mixtral", False)])
def test_stacked_edits_equal_unrolled(name, attach):
    """Edits given at the call or attached to the model (`attacks.attach`), probes watching the edited values."""
    model = tiny(name)
    kwargs = {"edits": EDITS}
    if attach:
        model, kwargs = attacks.attach(model, edits=EDITS), {}
    config = probes.ProbeConfig(points=("hidden", "intermediate"), layers=(1, 2))
    ref_logits, ref = probes.capture(model, TOKENS, config, **kwargs)
    logits, got = probes.capture(stack_layers(model), TOKENS, config, **kwargs)
    assert_close_to_scale(logits, ref_logits, 5e-6, what=f"{name} logits")
    assert_same_probes(got, ref, name)
    np.testing.assert_array_equal(ref.hidden[1].full[:, 0, jnp.asarray([2, 3, 7])], 9.0)  # edited


def test_attached_edit_gradients_under_remat_equal_unrolled():
    """Training with edits attached, layers rematerialised: the gradient through the scan's switched edits."""
    model = attacks.attach(tiny("llama_gqa"), edits=EDITS)
    model.remat = "full"

    def grads(m):
        graphdef, params, rest = nnx.split(m, nnx.Param, ...)

        def loss(params):
            logits = nnx.merge(graphdef, params, rest)(TOKENS)
            return jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0])

        return jax.jit(jax.grad(loss))(params)

    ref, got = grads(model), grads(stack_layers(model))
    for path, g in nnx.to_flat_state(got["model"]["layers"]["layer"]):
        for i in range(3):
            r = ref["model"]["layers"][i]
            for key in path:
                r = r[key]
            assert_close_to_scale(g.get_value()[i], r.get_value(), 1e-5, what=f"layer {i} {path}")


def traced_program(layers: int) -> str:
    """The jaxpr of probing (three points, a layer subset, top-k) a stacked llama of `layers` layers, edited."""
    stacked = stack_layers(tiny("llama_gqa", num_hidden_layers=layers))
    config = probes.ProbeConfig(points=("hidden", "attn_probs", "intermediate"), layers=(1,), full=False, top_k=2)
    graphdef, state = nnx.split(stacked)
    return str(jax.make_jaxpr(lambda state: probes.capture(nnx.merge(graphdef, state), TOKENS, config,
                                                           edits=EDITS))(state))


def test_probes_and_edits_run_in_one_scan_whatever_the_depth():
    """One scan holds one layer body: the traced programs of 3 and 7 layers have the same matmuls."""
    shallow, deep = traced_program(3), traced_program(7)
    assert shallow.count("scan[") == deep.count("scan[") == 1
    assert shallow.count("dot_general") == deep.count("dot_general") > 0


def test_a_layer_subset_keeps_only_its_slots():
    """Probing one layer keeps two slots (its own and a scratch one the other layers overwrite): XLA's temp
    memory stays the same from 4 to 12 layers, where recording every layer keeps them all."""
    tokens = jnp.zeros((2, 64), jnp.int32)

    def temp_bytes(layers, depth):
        model = lambda: stack_layers(tiny("llama_gqa", num_hidden_layers=depth, intermediate_size=512))
        graphdef, state = nnx.split(nnx.eval_shape(model))  # no weights: XLA's plan only
        config = probes.ProbeConfig(points=("intermediate",), layers=layers)
        lowered = jax.jit(lambda state: probes.capture(nnx.merge(graphdef, state), tokens, config)).lower(state)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    one_layer = tokens.size * 512 * 4  # float32 [2, 64, d_ff]
    assert temp_bytes((1,), 4) == temp_bytes((1,), 12)
    assert temp_bytes(None, 12) > temp_bytes((1,), 12) + 4 * one_layer


def test_probes_need_the_scan_and_no_remat():
    model = tiny("mixtral")
    stacked = stack_layers(model)
    different_experts = {0: masks.zero_rows([1], 64, expert=0), 1: masks.zero_rows([1], 64, expert=2)}
    config = probes.ProbeConfig(points=("hidden",))
    with pytest.raises(ValueError, match="unstack_layers"):
        probes.capture(stacked, TOKENS, config, ffn_masks=different_experts)
    stacked.remat = "full"
    with pytest.raises(ValueError, match="probes and remat do not combine"):
        probes.capture(stacked, TOKENS, config)
