"""Sharding is declared where each parameter is created: every parameter of every family names the logical
axes of its dimensions, and the large ones of an 8B-shape model are split over the mesh."""

import jax
import numpy as np
import pytest
import transformers
from flax import nnx
from hf_reference import TINY_CONFIGS

from mwjax import models, peft
from mwjax.core import sharding
from mwjax.core.sharding import declared_axes
from mwjax.families.hf_config import read_hf_config
from mwjax.nn.config import ModelConfig

# the 8B shape of benchmarks/train_step.py (Llama-3-8B)
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                 num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0)


def model_config(cls_name: str, kwargs: dict) -> ModelConfig:
    return read_hf_config(getattr(transformers, cls_name)(**kwargs).to_dict())


def params_of(model) -> dict[str, tuple[int, ...]]:
    """{dotted path: shape} of every parameter (base and adapters)."""
    return {".".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_every_parameter_declares_its_axes(name):
    config = model_config(*TINY_CONFIGS[name])
    model = nnx.eval_shape(lambda: peft.add_adapters(models.build(config), peft.LoraConfig(rank=2, dora=True)))
    shapes, axes = params_of(model), declared_axes(nnx.state(model))
    assert set(shapes) - set(axes) == set(), "parameters created without logical axes"
    for path, shape in shapes.items():
        assert len(axes[path]) == len(shape), path
        assert all(a is None or a in sharding.LOGICAL_RULES for a in axes[path]), (path, axes[path])


def test_large_parameters_are_sharded_on_a_mesh():
    """On an fsdp x tensor mesh every parameter above 1M elements of an 8B-shape layer is split; adapters and
    norms stay whole. A module created without axes (or with a name the rules lack) fails here."""
    model = nnx.eval_shape(lambda: peft.add_adapters(models.build(model_config("LlamaConfig", LLAMA3_8B)),
                                                     peft.LoraConfig(rank=16)))
    mesh = jax.sharding.AbstractMesh((1, 4, 2), sharding.MESH_AXES)
    axes = declared_axes(nnx.state(model))
    for path, shape in params_of(model).items():
        spec = sharding.spec(axes[path], shape, mesh)
        if np.prod(shape) > 1_000_000:
            assert any(part is not None for part in spec), (path, shape, spec)
        if ".lora_" in path or path.endswith("scale"):
            assert all(part is None for part in spec), (path, spec)
    assert sharding.spec(axes["model.layers.0.mlp.up_proj.kernel"], (4096, 14336), mesh) == jax.sharding.PartitionSpec(
        "fsdp", "tensor")


def test_a_misspelt_logical_axis_is_refused_where_it_is_declared():
    """A name the rules table lacks would leave its dimension replicated on every device: refused by name, both
    where a parameter declares it and where a constraint or a placement asks for it."""
    with pytest.raises(ValueError, match="unknown logical axis 'mpl'.*knows"):
        sharding.param(np.zeros((2, 3)), ("embed", "mpl"))
    with pytest.raises(ValueError, match="unknown logical axis 'btach'"):
        sharding.spec(("btach", None), (8, 2), jax.sharding.AbstractMesh((2, 1, 1), sharding.MESH_AXES))


def test_flax_reads_the_declared_shardings():
    """The declarations are Flax's own sharding metadata: `nnx.get_partition_spec` (what `nnx.get_named_sharding`
    builds on) gives every parameter of an 8B-shape layer, adapters included, the spec mwjax places it with."""
    model = nnx.eval_shape(lambda: peft.add_adapters(models.build(model_config("LlamaConfig", LLAMA3_8B)),
                                                     peft.LoraConfig(rank=16, dora=True)))
    mesh = jax.sharding.AbstractMesh((1, 4, 2), sharding.MESH_AXES)  # divides every 8B dimension it shards
    state = nnx.state(model, nnx.Param)
    axes, shapes = declared_axes(state), params_of(model)
    flax_specs = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.get_partition_spec(state))}
    assert flax_specs.keys() == shapes.keys()
    for path, shape in shapes.items():
        assert flax_specs[path] == sharding.spec(axes[path], shape, mesh), path
    assert flax_specs["model.layers.0.mlp.up_proj.kernel"] == jax.sharding.PartitionSpec("fsdp", "tensor")
