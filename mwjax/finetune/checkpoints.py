"""The training state's checkpoints: orbax, atomic, every `save_every` steps and at the end; the state, data
position, MacDrop key, dropout streams and divergence guard all in them, so a resume is exact."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from mwjax.finetune.step import TrainState
from mwjax.research.macdrop import MacDropState


class Checkpoints:
    """Orbax checkpoints of a run: the train state and a JSON of run facts, written atomically.

    Args:
      directory: a local path or a URL orbax understands (gs://bucket/run: survives a preempted TPU VM).
      keep: how many of the latest checkpoints to keep (`max_to_keep`).
    """

    def __init__(self, directory: str | Path, keep: int):
        # a local path or a URL orbax understands (gs://bucket/run: survives a preempted TPU VM)
        self.directory = epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest(self) -> int | None:
        """The latest complete checkpoint's step; None when there is none."""
        return self.manager.latest_step()

    @classmethod
    def latest_in(cls, directory: str | Path) -> int | None:
        """The latest complete checkpoint's step in `directory`, without creating it.

        Args:
          directory: a run's checkpoint directory (local path or URL).

        Returns:
          The step; None when it holds none, or does not exist.
        """
        if not epath.Path(directory).exists():
            return None
        checkpoints = cls(directory, keep=1)
        try:
            return checkpoints.latest()
        finally:
            checkpoints.close()

    def save(self, state: TrainState, meta: dict) -> None:
        """Save `state` (PRNG keys as raw data) and `meta` as the checkpoint of step `state.step`; returns once written.

        Args:
          state: the training state.
          meta: JSON-serialisable run facts (the step, total steps, the divergence guard's state, ...).
        """
        step = int(state.step)
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_to_saveable(state)),
                                                         meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """Read a checkpoint back onto the structure, dtypes and shardings of `template`.

        Args:
          template: a TrainState of this run (e.g. `Trainer.initial_state`).
          step: the checkpoint's step; None for the latest.

        Returns:
          (the restored TrainState, the meta dict saved with it).
        """
        step = self.latest() if step is None else step
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                              _to_saveable(template))
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                  meta=ocp.args.JsonRestore()))
        return _from_saveable(template, out["state"]), out["meta"]

    def close(self) -> None:
        """Close the orbax CheckpointManager."""
        self.manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _to_saveable(state: TrainState) -> dict:
    """A pytree of plain arrays (PRNG keys as their raw data)."""
    return {"step": state.step, "params": nnx.to_pure_dict(state.params), "opt_state": jax.tree.leaves(state.opt_state),
            "macdrop": None if state.macdrop is None else jax.random.key_data(state.macdrop.key),
            "rngs": _keys_to_data(nnx.to_pure_dict(state.rngs))}


def _from_saveable(template: TrainState, saved: dict) -> TrainState:
    params = jax.tree.map(lambda x: x, template.params)
    nnx.replace_by_pure_dict(params, saved["params"])
    rngs = jax.tree.map(lambda x: x, template.rngs)
    nnx.replace_by_pure_dict(rngs, _data_to_keys(saved["rngs"], nnx.to_pure_dict(template.rngs)))
    opt_state = jax.tree.unflatten(jax.tree.structure(template.opt_state), jax.tree.leaves(saved["opt_state"]))
    macdrop = None if template.macdrop is None else MacDropState(key=jax.random.wrap_key_data(saved["macdrop"]))
    return TrainState(step=saved["step"], params=params, opt_state=opt_state, macdrop=macdrop, rngs=rngs)


def _keys_to_data(tree):
    return jax.tree.map(lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, tree)


def _data_to_keys(saved, template):
    return jax.tree.map(lambda s, t: jax.random.wrap_key_data(s) if jnp.issubdtype(t.dtype, jax.dtypes.prng_key)
                        else s, saved, template)
