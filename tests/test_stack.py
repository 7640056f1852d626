"""Scanned decoder layers (`mwjax.nn.stack`): the stacked layout computes what the unrolled one does —
logits, FFN row masks, KV-cache decoding, gradients with and without remat, LoRA/DoRA — for every family, and
converts back to the very same arrays (probes and activation edits: tests/test_stack_probes.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_reference import TINY_CONFIGS, assert_close_to_scale, random_tokens

from mwjax import masks, models, peft
from mwjax.core.sharding import declared_axes
from mwjax.eval.decoding import generate
from mwjax.families.hf_config import read_hf_config
from mwjax.nn.config import ModelConfig
from mwjax.nn.stack import LayerStack, stack_layers, unstack_layers

# plain, two layer types, experts, partial RoPE, parameter-free norms, post-norm layers
FAMILIES = ("llama_gqa", "gemma3", "mixtral", "phi3_partial_rotary", "olmo_clip", "olmo2")
TOKENS = jnp.asarray(random_tokens(48, batch=2))


def tiny(name: str) -> nnx.Module:
    return models.build(read_hf_config(TINY_CONFIGS[name][1] | {"model_type": _model_type(name)}))


def _model_type(name: str) -> str:
    return {"LlamaConfig": "llama", "MistralConfig": "mistral", "Qwen2Config": "qwen2", "GemmaConfig": "gemma",
            "Gemma2Config": "gemma2", "Gemma3TextConfig": "gemma3_text", "MixtralConfig": "mixtral",
            "Phi3Config": "phi3", "OlmoConfig": "olmo", "Olmo2Config": "olmo2"}[TINY_CONFIGS[name][0]]


def row_masks(model) -> dict[int, masks.RowMask]:
    """Two layers masked with different k (the stack pads), on expert 1 for Mixtral."""
    cfg = model.config
    expert = 1 if cfg.num_local_experts else None
    return {0: masks.zero_rows([3, 7, 11], cfg.hidden_size, expert=expert),
            2: masks.row_mask([5], 0.5, cfg.hidden_size, expert=expert)}


@pytest.mark.parametrize("name", FAMILIES)
def test_stacked_forward_equals_unrolled(name):
    model = tiny(name)
    stacked = stack_layers(model)
    assert isinstance(stacked.model.layers, LayerStack) and not isinstance(model.model.layers, LayerStack)
    ffn = row_masks(model)
    for kwargs in ({}, {"ffn_masks": ffn}):
        ref = models.forward(model, TOKENS, **kwargs)
        got = models.forward(stacked, TOKENS, **kwargs)
        assert_close_to_scale(got, ref, 5e-6, what=f"{name} {sorted(kwargs)}")
    # a mask changes the logits, so the comparison above saw it
    assert not np.allclose(models.forward(model, TOKENS, ffn_masks=ffn), models.forward(model, TOKENS))


def test_cache_runs_layer_by_layer():
    """A KV cache runs the layers one by one over slices of the stack (probes and edits in the scan:
    tests/test_stack_probes.py)."""
    model = tiny("gemma3")
    prompts = [TOKENS[0, :8].tolist()]
    np.testing.assert_array_equal(generate(stack_layers(model), prompts, 6), generate(model, prompts, 6))


@pytest.mark.parametrize("name", ["llama_gqa", "mixtral"])
def test_unstack_gives_back_the_same_arrays(name):
    model = tiny(name)
    back = unstack_layers(stack_layers(model))
    ref, got = nnx.state(model), nnx.state(back)
    assert jax.tree.structure(ref) == jax.tree.structure(got)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert declared_axes(got) == declared_axes(ref)
    assert [layer.layer_idx for layer in back.model.layers] == [layer.layer_idx for layer in model.model.layers]


def test_stacked_parameters_declare_the_layer_axis():
    stack = stack_layers(tiny("llama_gqa")).model.layers
    kernel = stack.layer.mlp.up_proj.kernel
    assert kernel.shape[0] == 3 and stack.layer.mlp.up_proj.axes == ("layers", "embed", "mlp")


@pytest.mark.parametrize("adapter, remat", [("lora", None), ("lora", "full"), ("dora", "dots"), ("lora", "offload")])
def test_adapter_gradients_equal_unrolled(adapter, remat):
    """The gradient of the loss w.r.t. LoRA / DoRA parameters, with a MacDrop-like row mask on one layer."""
    model = peft.add_adapters(tiny("llama_gqa"), peft.LoraConfig(rank=4, alpha=8.0, dora=adapter == "dora"),
                              seed=1)
    model.remat = remat
    ffn = {1: masks.row_mask([2, 9], 0.5, model.config.hidden_size)}  # (a zeroed row leaves DoRA a zero norm)

    def grads(m):
        graphdef, params, rest = nnx.split(m, peft.LoRAParam, ...)

        def loss(params):
            logits = nnx.merge(graphdef, params, rest)(TOKENS, ffn_masks=ffn)
            return jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0])

        return jax.jit(jax.grad(loss))(params)

    ref, got = grads(model), grads(stack_layers(model))
    ref_layers = ref["model"]["layers"]
    for path, g in nnx.to_flat_state(got["model"]["layers"]["layer"]):
        for i in range(3):
            r = ref_layers[i]
            for key in path:
                r = r[key]
            assert_close_to_scale(g.get_value()[i], r.get_value(), 1e-5, what=f"layer {i} {path}")


def lowered_step(layers: int, remat: str | None = "full", scan: bool = True):
    """The trainer's step for an abstract LoRA model of `layers` layers, lowered (no weights allocated)."""
    from mwjax.core import sharding
    from mwjax.finetune import train

    config = ModelConfig(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=512,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = nnx.eval_shape(lambda: peft.add_adapters(models.build(config), peft.LoraConfig(rank=2)))
    tc = train.TrainConfig(micro_batch_size=4, grad_accum=1, max_steps=1, remat=remat, scan_layers=scan)
    trainer = train.Trainer(model, tc, steps=1, mesh=sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    batch = {k: jax.ShapeDtypeStruct((1, 4, 128), jnp.int32) for k in train.BATCH_KEYS}
    return trainer.step_fn.lower(trainer.initial_state, trainer.frozen, batch)


def test_the_scanned_step_compiles_one_layer_body_whatever_the_depth():
    """Compile time flat in depth: the program holds the same matmuls for 2 and 6 layers (unrolled: 3x)."""
    def matmuls(layers, scan):
        return lowered_step(layers, scan=scan).as_text().count("dot_general")

    assert matmuls(6, scan=True) == matmuls(2, scan=True)
    assert matmuls(6, scan=False) > 2 * matmuls(2, scan=False)


def test_offload_moves_the_saved_matmul_outputs_to_host_memory():
    """remat="offload" marks every saved matmul output for the host's pinned memory (XLA's CPU compiler, whose
    device memory is the host's, then drops the marks; a GPU / TPU copies them out and back)."""
    placements = {remat: lowered_step(2, remat).as_text().count("annotate_device_placement")
                  for remat in ("dots", "offload")}
    assert placements["dots"] == 0 and placements["offload"] > 0, placements


def test_scanned_remat_keeps_one_layer_of_activations():
    """XLA's plan for the step: rematerialised layers keep a fraction of the activations (an unrolled loop of
    checkpointed layers kept them all: benchmarks/compile_memory.py)."""
    temp = {remat: lowered_step(6, remat).compile().memory_analysis().temp_size_in_bytes for remat in (None, "full")}
    assert temp["full"] < 0.4 * temp[None], temp
