"""The model families: one folder per family, and the registry, one explicit list of their `Family` records.

    record.py      the `Family` record and its `GGUFHooks`
    keymap.py      the key-table machinery (rules, HF key <-> parameter path) and the rules every family shares
    hf_readers.py  helpers the families' HF config readers share (RoPE)
    hf_config.py   HF `config.json` <-> `ModelConfig`: the shared keys, a family's own through its record
    <family>/      llama, gemma, mixtral, phi3, olmo; each holds
                     model.py     the Flax NNX model (HF module names)
                     hf.py        its HF config reading / writing (`read_*_hf`, `write_*_hf`, `read_*_rope`)
                     keys.py      its key table (`KEYMAP`)
                     gguf.py      its GGUF hooks (llama.cpp metadata -> HF config, tensors restored)
                     __init__.py  its `Family` record(s), `RECORDS`

Imports inside a family folder point at `record`, `keymap`, `hf_readers`, `mwjax.nn` and the folders it builds
on (gemma, mixtral and olmo on llama), never at this registry or `hf_config` (which look the records up).

Adding a family touches (tests/test_registry.py checks every record and every folder):
1. `mwjax/families/<family>/`: a new folder with `model.py`, `hf.py`, `keys.py`, `gguf.py` (or `gguf=None` in
   the record: no GGUF) and `__init__.py` declaring its record(s) in `RECORDS`;
2. `mwjax/families/__init__.py`: its `RECORDS` added to the list below;
3. `tests/hf_reference.py`: a tiny HF config in `FAMILY_CONFIGS` (test_config, test_families and
   test_registry run over it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mwjax.core.compiled import jit_model
from mwjax.families import gemma, llama, mixtral, olmo, phi3
from mwjax.families.gemma.model import GemmaForCausalLM
from mwjax.families.llama.model import LlamaForCausalLM
from mwjax.families.mixtral.model import MixtralForCausalLM
from mwjax.families.olmo.model import Olmo2ForCausalLM, OlmoForCausalLM
from mwjax.families.phi3.model import Phi3ForCausalLM
from mwjax.families.record import Family, GGUFHooks
from mwjax.nn.config import ModelConfig

__all__ = ["RECORDS", "Family", "GGUFHooks", "GemmaForCausalLM", "LlamaForCausalLM", "MixtralForCausalLM",
           "Olmo2ForCausalLM", "OlmoForCausalLM", "Phi3ForCausalLM", "abstract", "build", "families", "family",
           "forward", "get", "gguf_architectures", "gguf_hooks"]

# The registry: every family mwjax serves, one record per HF model_type.
RECORDS: tuple[Family, ...] = (*llama.RECORDS, *gemma.RECORDS, *mixtral.RECORDS, *phi3.RECORDS, *olmo.RECORDS)


def _by_model_type(records: tuple[Family, ...]) -> dict[str, Family]:
    out: dict[str, Family] = {}
    for record in records:
        if record.model_type in out:
            raise ValueError(f"model_type {record.model_type!r} has two records in mwjax.families.RECORDS")
        out[record.model_type] = record
    return out


_BY_MODEL_TYPE = _by_model_type(RECORDS)


def get(model_type: str | None) -> Family | None:
    """The record of HF `model_type`, or None where no family serves it.

    Args:
      model_type: HF config `model_type`, e.g. "llama"; None gives None.

    Returns:
      Its `Family` record, or None.
    """
    return _BY_MODEL_TYPE.get(model_type)


def family(model_type: str) -> Family:
    """The record of HF `model_type`.

    Args:
      model_type: HF config `model_type`, e.g. "gemma3_text".

    Returns:
      Its `Family` record; `KeyError` naming the supported model types where none serves it.
    """
    record = get(model_type)
    if record is None:
        raise KeyError(f"no mwjax family serves model_type {model_type!r}; registered: {sorted(_BY_MODEL_TYPE)}")
    return record


def families() -> tuple[Family, ...]:
    """Every record, in the registry's order."""
    return RECORDS


def gguf_hooks(architecture: str) -> GGUFHooks | None:
    """The GGUF hooks of llama.cpp's `general.architecture`, shared by the records whose files it writes.

    Args:
      architecture: llama.cpp's `general.architecture`, e.g. "llama" (Llama, Mistral, Mixtral) or "gemma3".

    Returns:
      The `GGUFHooks`, or None where no family reads it; `ValueError` where two records' hooks differ.
    """
    hooks = {id(r.gguf): r.gguf for r in RECORDS if r.gguf is not None and r.gguf.architecture == architecture}
    if len(hooks) > 1:
        raise ValueError(f"GGUF architecture {architecture!r} has {len(hooks)} different hooks in the registry")
    return next(iter(hooks.values()), None)


def gguf_architectures() -> tuple[str, ...]:
    """llama.cpp architectures some family reads, sorted."""
    return tuple(sorted({r.gguf.architecture for r in RECORDS if r.gguf is not None}))


def build(config: ModelConfig, *, dtype=jnp.float32, param_dtype=None, seed: int = 0) -> nnx.Module:
    """A randomly initialised model (normal(0.02) weights, as HF initialises them).

    Args:
      config: the model's config; its `model_type` picks the family's model class.
      dtype: compute dtype.
      param_dtype: dtype of the parameters; None for `dtype`.
      seed: seed of the `nnx.Rngs` the weights are drawn from.

    Returns:
      The model (e.g. `LlamaForCausalLM`).
    """
    model_class = family(config.model_type).model_class
    return model_class(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))


def abstract(config: ModelConfig, *, dtype=jnp.float32, param_dtype=None) -> nnx.Module:
    """The model with `jax.ShapeDtypeStruct` leaves: no memory is allocated (for loading checkpoints).

    Args:
      config: the model's config.
      dtype: compute dtype.
      param_dtype: dtype of the parameters; None for `dtype`.

    Returns:
      The abstract model (`nnx.eval_shape` of `build`).
    """
    return nnx.eval_shape(lambda: build(config, dtype=dtype, param_dtype=param_dtype))


def forward(model: nnx.Module, tokens: jax.Array, **kwargs) -> jax.Array:
    """`model(tokens, **kwargs)` compiled with `jax.jit` (positions, attention_mask, ffn_masks are traced).

    Args:
      model: an mwjax causal LM.
      tokens: int32 [batch, seq] token ids.
      kwargs: keyword arguments of the model's `__call__` (positions, attention_mask, ffn_masks, probes, edits,
        cache, segment_ids).

    Returns:
      Logits [batch, seq, vocab] (with a cache: (logits, the advanced cache)).
    """
    return _forward(model, tokens, kwargs)


@jit_model
def _forward(model, tokens, kwargs):
    return model(tokens, **kwargs)
