"""Native checkpoints: a model's parameters in orbax, its config beside them as JSON.

Both items are written in one orbax save, which is atomic (a temporary directory renamed at the
end), so a crash never leaves a half-written checkpoint. Overwriting is atomic too: the new
checkpoint is written beside the old one and swapped in only when complete, so a kill at any
moment leaves the old or the new checkpoint whole (a kill between the two renames of the swap is
repaired by the next `save` / `restore` / `is_checkpoint`). `restore` can place every array
straight into a sharding (no host holds the whole model) and cast to another dtype.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from mwjax import models, peft
from mwjax.config import ModelConfig
from mwjax.models.layers import declared_axes

# (dotted parameter path, shape) -> where the array should live
# (dotted parameter path, shape, the parameter's declared logical axes or None) -> where its array lives
ShardingFn = Callable[[str, tuple[int, ...], tuple[str | None, ...] | None], jax.sharding.Sharding]

METADATA_ITEM = "mwjax"
STATE_ITEM = "params"


def dotted(path) -> str:
    """('model', 'layers', 0, 'mlp') -> 'model.layers.0.mlp' (jax key paths or plain tuples)."""
    parts = []
    for p in path:
        parts.append(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))))
    return ".".join(parts)


def is_checkpoint(directory: str | os.PathLike) -> bool:
    directory = recover(directory)
    return (directory / METADATA_ITEM).is_dir() and (directory / STATE_ITEM).is_dir()


def _siblings(directory: Path) -> tuple[Path, Path]:
    """Where an overwrite writes the new checkpoint, and where it moves the old one during the swap."""
    return directory.with_name(f".{directory.name}.new"), directory.with_name(f".{directory.name}.old")


def recover(directory: str | os.PathLike) -> Path:
    """Finish or undo an overwrite that was killed mid-swap, drop what a killed overwrite left beside
    it, and return the absolute path."""
    directory = Path(directory).absolute()
    new, old = _siblings(directory)
    if not directory.exists():
        if new.exists():  # orbax renames a save into place only once complete: `new` is whole
            os.replace(new, directory)
        elif old.exists():
            os.replace(old, directory)
    for stale in (new, old):
        if stale.exists():
            shutil.rmtree(stale)
    return directory


def save(model: nnx.Module, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `model`'s parameters and config to `directory` (absolute or relative).

    overwrite: replace an existing checkpoint atomically (written beside it, then swapped in).
    A model with adapters is refused (ValueError): `restore` rebuilds a plain model from the config,
    so save `peft.merge(model)` or the adapters alone with `peft.save_adapters`.
    """
    peft.check_no_adapters(model, "checkpoint.save")  # LoRAParam is an nnx.Param: the filter below would keep it
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
    """One orbax save of several named items (`ocp.args`), atomic, and atomic when it overwrites:
    the new checkpoint is written beside the old one and swapped in when complete."""
    directory = recover(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
    target, old = _siblings(directory) if directory.exists() else (directory, None)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(target, args=ocp.args.Composite(**items))
    if old is not None:  # the swap: two renames, each atomic; `recover` repairs a kill between them
        os.replace(directory, old)
        os.replace(target, directory)
        shutil.rmtree(old)
    return directory


def read_metadata(directory: str | os.PathLike) -> dict:
    directory = Path(directory).absolute()
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        return ckptr.restore(directory, args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()}))[
            METADATA_ITEM
        ]


def restore(directory: str | os.PathLike, *, dtype=None, param_dtype=None,
            shardings: ShardingFn | None = None) -> nnx.Module:
    """Rebuild the model saved by `save`, optionally in another dtype and placed by `shardings`."""
    directory = recover(directory)
    if not is_checkpoint(directory):
        raise FileNotFoundError(f"{directory} is not an mwjax checkpoint (written by mwjax.checkpoint.save)")
    metadata = read_metadata(directory)
    config = ModelConfig.from_dict(metadata["config"])
    if dtype is None:  # as saved
        dtype, param_dtype = metadata["dtype"], param_dtype or metadata["param_dtype"]
    else:
        param_dtype = param_dtype or dtype
    abstract = models.abstract(config, dtype=dtype, param_dtype=param_dtype)
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
