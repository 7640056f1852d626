"""Adapter checkpoints: only the adapters (and their LoraConfig) as an orbax checkpoint, read back onto the same base
model, or an HF PEFT directory read by `peft_io.load_peft`."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mwjax.adapters.errors import AdapterError, check_tensor
from mwjax.adapters.lora import LoraConfig, LoRAParam
from mwjax.adapters.peft_io import load_peft
from mwjax.adapters.targets import adapters, add_adapters
from mwjax.core.paths import dotted

ADAPTER_ITEM, LORA_CONFIG_ITEM = "adapters", "lora_config"


def save_adapters(model: nnx.Module, directory: str | os.PathLike) -> Path:
    """Write only the adapters (and their LoraConfig, with the adapted paths) as an orbax checkpoint,
    atomically; `load_adapters` puts them back on the same base model.

    Args:
      model: an mwjax model carrying adapters (`add_adapters`; its `lora_config` is saved with them).
      directory: the checkpoint directory; one holding an earlier adapter checkpoint is replaced, any other
        non-empty one refused.

    Returns:
      The directory's absolute path.
    """
    import orbax.checkpoint as ocp

    from mwjax.converters import checkpoint

    config = dataclasses.replace(model.lora_config, targets=tuple(adapters(model)))
    params = nnx.to_pure_dict(nnx.state(model, LoRAParam))
    return checkpoint.save_items(directory, {ADAPTER_ITEM: ocp.args.StandardSave(params),
                                             LORA_CONFIG_ITEM: ocp.args.JsonSave(dataclasses.asdict(config))},
                                 overwrite=True)


def load_adapters(model: nnx.Module, directory: str | os.PathLike) -> nnx.Module:
    """`model` with the adapters of `directory`: an HF PEFT directory (`load_peft`) or one written by
    `save_adapters` (orbax).

    Checked as `load_peft` checks: a LoraConfig in range, adapted modules the base model has, every stored array
    of the shape this base needs (before orbax reads it), floating point and finite; an AdapterError names the
    directory and the module otherwise.

    Args:
      model: the base model (no adapters); it is not modified.
      directory: an HF PEFT adapter directory (adapter_config.json) or an orbax one from `save_adapters`.

    Returns:
      A copy of `model` carrying the stored adapters (`LoRALinear` layers, `lora_config` set).
    """
    import orbax.checkpoint as ocp

    from mwjax.converters import checkpoint

    directory = checkpoint.recover(directory)
    if (directory / "adapter_config.json").is_file():
        return load_peft(model, directory)
    if not (directory / ADAPTER_ITEM).is_dir():
        raise FileNotFoundError(f"{directory} holds neither a PEFT adapter (adapter_config.json) nor mwjax "
                                "adapters (written by mwjax.peft.save_adapters)")
    handler = ocp.CompositeCheckpointHandler(**{ADAPTER_ITEM: ocp.StandardCheckpointHandler(),
                                                LORA_CONFIG_ITEM: ocp.JsonCheckpointHandler()})
    with ocp.Checkpointer(handler) as ckptr:
        raw = ckptr.restore(directory, args=ocp.args.Composite(**{LORA_CONFIG_ITEM: ocp.args.JsonRestore()}))
        config = _orbax_config(raw[LORA_CONFIG_ITEM], directory)
        try:
            out = add_adapters(model, config)
        except ValueError as e:  # a target the base model lacks, a fused group it splits otherwise
            raise AdapterError(f"{directory}: its adapters do not fit the base {model.config.model_type} model ({e}):"
                               " adapters of another base model?") from e
        state = nnx.state(out, LoRAParam)
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
        _check_stored(ckptr.metadata(directory).item_metadata[ADAPTER_ITEM], target, directory)
        restored = ckptr.restore(directory, args=ocp.args.Composite(**{ADAPTER_ITEM: ocp.args.StandardRestore(target)}))
    for path, value in jax.tree_util.tree_leaves_with_path(restored[ADAPTER_ITEM]):
        module, _, name = dotted(path).rpartition(".")
        check_tensor(np.asarray(value), f"{directory}: module {module}'s {name}", value.ndim)
    nnx.replace_by_pure_dict(state, restored[ADAPTER_ITEM])
    nnx.update(out, state)
    return out


def _orbax_config(raw, directory: Path) -> LoraConfig:
    """The LoraConfig stored by `save_adapters`, checked (AdapterError naming the directory)."""
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    if not isinstance(raw, dict) or set(raw) - fields:
        extra = sorted(set(raw) - fields) if isinstance(raw, dict) else type(raw).__name__
        raise AdapterError(f"{directory}/{LORA_CONFIG_ITEM}: not a LoraConfig written by mwjax.peft.save_adapters "
                           f"(unknown {extra})")
    try:
        return LoraConfig(**raw)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{directory}/{LORA_CONFIG_ITEM}: {e}") from e


def _check_stored(stored, target, directory: Path) -> None:
    """Every adapter array the base model needs (`target`: ShapeDtypeStructs) is stored, with its shape and a
    floating-point dtype, and nothing else is (`stored`: orbax's metadata tree); AdapterError naming the module."""

    have = {dotted(path): meta for path, meta in jax.tree_util.tree_leaves_with_path(stored)}
    need = {dotted(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(target)}
    for name in sorted(set(need) | set(have)):
        module, _, part = name.rpartition(".")
        if name not in have or name not in need:
            why = "is missing" if name not in have else "is stored, but the base model has no such adapter"
            raise AdapterError(f"{directory}: module {module}'s {part} {why}: adapters of another base model?")
        shape, want = tuple(have[name].shape), tuple(need[name].shape)
        if shape != want:
            raise AdapterError(f"{directory}: module {module}'s {part} is stored with shape {shape}, but this base "
                               f"model's layer needs {want}: adapters of another base model (another width)?")
        if not jnp.issubdtype(have[name].dtype, jnp.floating):
            raise AdapterError(f"{directory}: module {module}'s {part} is stored as {have[name].dtype}, not a "
                               "floating-point type; the adapter is corrupt")
