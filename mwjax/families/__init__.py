"""Flax NNX causal language models with HF module names, one file per family."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mwjax.core.compiled import jit_model
from mwjax.families import family as registry
from mwjax.families.gemma.model import GemmaForCausalLM
from mwjax.families.llama.model import LlamaForCausalLM
from mwjax.families.mixtral.model import MixtralForCausalLM
from mwjax.families.phi3.model import Phi3ForCausalLM
from mwjax.nn.config import ModelConfig

# (importing a family's module above registered its records)
__all__ = ["FAMILIES", "FUSED_MODULES", "GemmaForCausalLM", "LlamaForCausalLM", "MixtralForCausalLM",
           "Phi3ForCausalLM", "abstract", "build", "forward"]

# model_type -> model class (the registry's view; `mwjax.families.family.family(model_type).model_class`)
FAMILIES: dict[str, type[nnx.Module]] = {f.model_type: f.model_class for f in registry.families()}

# model_type -> {HF fused module: mwjax modules in its row order}, for families whose HF checkpoints and
# modules fuse projections that mwjax keeps apart (module paths relative to a decoder layer)
FUSED_MODULES: dict[str, dict[str, tuple[str, ...]]] = {
    f.model_type: dict(f.fused_modules) for f in registry.families() if f.fused_modules
}


def build(config: ModelConfig, *, dtype=jnp.float32, param_dtype=None, seed: int = 0) -> nnx.Module:
    """A randomly initialised model (normal(0.02) weights, as HF initialises them)."""
    model_class = registry.family(config.model_type).model_class
    return model_class(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))


def abstract(config: ModelConfig, *, dtype=jnp.float32, param_dtype=None) -> nnx.Module:
    """The model with `jax.ShapeDtypeStruct` leaves: no memory is allocated (for loading checkpoints)."""
    return nnx.eval_shape(lambda: build(config, dtype=dtype, param_dtype=param_dtype))


def forward(model: nnx.Module, tokens: jax.Array, **kwargs) -> jax.Array:
    """`model(tokens, **kwargs)` compiled with `jax.jit` (positions, attention_mask, ffn_masks are traced)."""
    return _forward(model, tokens, kwargs)


@jit_model
def _forward(model, tokens, kwargs):
    return model(tokens, **kwargs)
