"""Native checkpoints: a model's parameters in orbax, its config beside them as JSON.

Both items are written in one orbax save, directory-atomic like every multi-file output (`mwjax.core.atomic`):
orbax writes the checkpoint under a temporary name and renames it to `.<name>.new` once complete, which is
then swapped in; so a kill at any moment leaves the old or the new checkpoint whole, also when overwriting (a
kill between the two renames of the swap is repaired by the next `save` / `restore` / `is_checkpoint`).
`restore` can place every array straight into a sharding (no host holds the whole model) and cast to
another dtype.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from mwjax import families
from mwjax.core import atomic
from mwjax.core.paths import dotted
from mwjax.core.sharding import ShardingFn, declared_axes
from mwjax.nn.config import ModelConfig

METADATA_ITEM = "mwjax"
STATE_ITEM = "params"


def check_no_adapters(model: nnx.Module, action: str) -> None:
    """Raise ValueError if `model` carries LoRA / DoRA adapters (`nnx.LoRAParam`s).

    `action` stores plain models, whose parameters a model rebuilt from the config has a place for; adapter
    weights it has none for.

    Args:
      model: the mwjax model about to be stored.
      action: the caller's name for the error message (e.g. "checkpoint.save", "save_hf").
    """
    modules = sorted({dotted(path[:-1]) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))})
    if modules:
        raise ValueError(
            f"{action}: the model carries LoRA/DoRA adapters on {len(modules)} layers (e.g. {modules[0]}), which a "
            "model rebuilt from its config has no place for. Save peft.merge(model) to keep the adapted model "
            "(adapters folded into the base weights), or peft.save_adapters(model, directory) to keep only the "
            "adapters (peft.load_adapters(base_model, directory) puts them back).")


def is_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds an mwjax checkpoint (both orbax items), after repairing a killed swap.

    Args:
      directory: the candidate checkpoint directory.

    Returns:
      True when it holds the metadata and the parameters item written by `save`.
    """
    directory = recover(directory)
    return (directory / METADATA_ITEM).is_dir() and (directory / STATE_ITEM).is_dir()


def recover(directory: str | os.PathLike) -> Path:
    """Finish or undo an overwrite that was killed mid-swap (`atomic.recover`).

    Args:
      directory: the checkpoint directory (absolute or relative).

    Returns:
      Its absolute path.
    """
    return atomic.recover(directory)


def save(model: nnx.Module, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `model`'s parameters and config to `directory`.

    A model with adapters is refused (ValueError): `restore` rebuilds a plain model from the config,
    so save `peft.merge(model)` or the adapters alone with `peft.save_adapters`.

    Args:
      model: a plain mwjax model; its config, compute dtype and parameter dtype go into the metadata.
      directory: the checkpoint directory (absolute or relative).
      overwrite: replace an existing checkpoint atomically (written beside it, then swapped in).

    Returns:
      The checkpoint's absolute path.
    """
    check_no_adapters(model, "checkpoint.save")  # LoRAParam is an nnx.Param: the filter below would keep it
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    kernel = jax.tree.leaves(params)[0]
    metadata = {
        "config": model.config.to_dict(),
        "dtype": jnp.dtype(model.dtype).name,
        "param_dtype": jnp.dtype(kernel.dtype).name,
    }
    items = {STATE_ITEM: ocp.args.StandardSave(params), METADATA_ITEM: ocp.args.JsonSave(metadata)}
    return save_items(directory, items, overwrite=overwrite)


def save_items(directory: str | os.PathLike, items: dict, *, overwrite: bool) -> Path:
    """One orbax save of several named items (`ocp.args`), directory-atomic (module doc).

    Every process of a multi-host run calls it (orbax writes each process's shards); process 0 alone repairs,
    clears and swaps, between barriers.

    Args:
      directory: the checkpoint directory (absolute or relative).
      items: item name -> `ocp.args` save argument (e.g. `StandardSave(params)`, `JsonSave(metadata)`).
      overwrite: replace an existing directory, allowed only when it holds one of the items already (an
        earlier checkpoint of this kind); FileExistsError otherwise.

    Returns:
      The checkpoint's absolute path.
    """
    directory = Path(directory).absolute()
    lead = jax.process_index() == 0
    if lead:
        atomic.recover(directory)
    _sync("checkpoint: recovered")
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
    atomic.check_replaceable(directory, tuple(items), "an mwjax orbax checkpoint")
    if lead:
        atomic.remove_stale(directory)
    _sync("checkpoint: cleared")
    new, _ = atomic.siblings(directory)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(new, args=ocp.args.Composite(**items))  # renamed to `new` by orbax once complete
    if lead:
        atomic.swap_in(new, directory)
    _sync("checkpoint: swapped in")
    return directory


def _sync(name: str) -> None:
    """A barrier over the processes of a multi-host run (nothing in a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def read_metadata(directory: str | os.PathLike) -> dict:
    """The JSON metadata item of a checkpoint written by `save`, without restoring the parameters.

    Args:
      directory: the checkpoint directory.

    Returns:
      A dict with "config" (`ModelConfig.to_dict()`), "dtype" and "param_dtype" (dtype names).
    """
    directory = Path(directory).absolute()
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        return ckptr.restore(directory, args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()}))[
            METADATA_ITEM
        ]


def restore(directory: str | os.PathLike, *, dtype=None, param_dtype=None,
            shardings: ShardingFn | None = None) -> nnx.Module:
    """Rebuild the model saved by `save`, optionally in another dtype and placed by `shardings`.

    Args:
      directory: the checkpoint directory; FileNotFoundError when it holds no mwjax checkpoint.
      dtype: compute dtype; None keeps the saved dtype and parameter dtype.
      param_dtype: dtype the parameters are cast to; None for the saved one (or `dtype` when that is given).
      shardings: (dotted parameter path, shape, declared logical axes) -> sharding each array is restored into
        (e.g. `sharding.param_sharding_fn(mesh)`); None puts everything on the first device.

    Returns:
      The rebuilt mwjax model (family chosen by the saved config's model_type).
    """
    directory = recover(directory)
    if not is_checkpoint(directory):
        raise FileNotFoundError(f"{directory} is not an mwjax checkpoint (written by mwjax.checkpoint.save)")
    metadata = read_metadata(directory)
    config = ModelConfig.from_dict(metadata["config"])
    if dtype is None:  # as saved
        dtype, param_dtype = metadata["dtype"], param_dtype or metadata["param_dtype"]
    else:
        param_dtype = param_dtype or dtype
    abstract = families.abstract(config, dtype=dtype, param_dtype=param_dtype)
    graphdef, state = nnx.split(abstract)
    axes = declared_axes(state)

    def target(path, leaf):
        name = dotted(path)
        sharding = shardings(name, leaf.shape, axes.get(name)) if shardings else jax.sharding.SingleDeviceSharding(
            jax.devices()[0])
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    targets = jax.tree_util.tree_map_with_path(target, nnx.to_pure_dict(state))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(directory, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(targets)}))
    nnx.replace_by_pure_dict(state, restored[STATE_ITEM])
    return nnx.merge(graphdef, state)
