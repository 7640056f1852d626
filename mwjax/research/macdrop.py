"""MacDrop (House of Cards, Algorithm 1): curriculum dropout on the pretrained massive weights.

Before fine-tuning, the top-k massive weights are found once with the bos token (rows `indices`
of W_gate and W_up at `layer`). At every training step (Algorithm 1 wraps the HF Trainer's
`training_step`, which runs once per micro-batch: the trainer's default `mask_every="microbatch"`) a mask

    mask = uniform(k, d_model) > p(t)            (1 keeps a weight, 0 drops it; no 1/(1-p) rescaling)

multiplies those k pretrained rows of W_up AND W_gate (one mask for both); the adapters are never
masked. The mask reaches the model as an FFN row mask, so the stored pretrained weights are never
modified and "restoring" them is free.

Curricula p(t) are optax schedules called with the trainer's 0-based optimizer step s; Algorithm 1
counts t = s + 1 = 1..T, so the last step has p = 0 (T = total steps, E = epochs, e = 1-based epoch):

    step           p0 (1 - t / T)                 (the paper's default)
    epoch_before   p0 (1 - (e - 1) / E)
    epoch_after    p0 (1 - e / E)
    exp            p0 exp(-alpha t)
    constant       p0

Scopes (the paper's ablation, Figure 6): "massive" (the k rows), "all" (every row of W_gate /
W_up in the layer), "all_but_massive" (every row except the k).

The transform is optax-style and pure: `init(rng) -> MacDropState`, `masks(state, step) ->
ffn_masks` (sampled from the state's key), `advance(state) -> state`; everything jits, and the
state is a small pytree that checkpoints with the optimizer.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax
from flax import struct

from mwjax.instrument import masks
from mwjax.research.massive import MassiveWeights

CURRICULA = ("step", "epoch_before", "epoch_after", "exp", "constant")
SCOPES = ("massive", "all", "all_but_massive")


def curriculum(name: str, p0: float, *, total_steps: int | None = None, steps_per_epoch: int | None = None,
               epochs: int | None = None, alpha: float = 0.05) -> optax.Schedule:
    """p(t) as an optax schedule (module doc). Raises ValueError for bad names or arguments.

    Args:
      name: one of CURRICULA: "step", "epoch_before", "epoch_after", "exp" or "constant".
      p0: the initial drop probability, in [0, 1].
      total_steps: T, the optimizer steps of the run ("step" needs it).
      steps_per_epoch: optimizer steps per epoch (the epoch curricula need it).
      epochs: E, the number of epochs (the epoch curricula need it).
      alpha: the decay rate of "exp", finite and >= 0.

    Returns:
      The schedule: 0-based optimizer step s -> p (Algorithm 1's t = s + 1).
    """
    if not 0.0 <= p0 <= 1.0:
        raise ValueError(f"MacDrop p0 must lie in [0, 1], got {p0}")
    if name not in CURRICULA:
        raise ValueError(f"unknown MacDrop curriculum {name!r}; choose from {CURRICULA}")
    if name == "constant":
        return optax.constant_schedule(p0)
    if name == "exp":
        if not 0 <= alpha < math.inf:
            raise ValueError(f"the exp curriculum needs a finite alpha >= 0, got {alpha}")
        return lambda s: p0 * jnp.exp(-alpha * (jnp.asarray(s, jnp.float32) + 1.0))  # t = s + 1
    if name == "step":
        if not total_steps or total_steps < 1:
            raise ValueError("the step curriculum needs total_steps >= 1")
        # Algorithm 1: p = p0 (1 - t / T), t = s + 1 = 1..T
        return lambda s: p0 * jnp.clip(1.0 - (jnp.asarray(s, jnp.float32) + 1.0) / total_steps, 0.0, 1.0)
    if not steps_per_epoch or not epochs:
        raise ValueError(f"the {name} curriculum needs steps_per_epoch and epochs")
    shift = 1.0 if name == "epoch_before" else 0.0

    def by_epoch(s):
        epoch = jnp.asarray(s, jnp.int32) // steps_per_epoch + 1  # 1-based
        return p0 * jnp.clip(1.0 - (epoch - shift) / epochs, 0.0, 1.0)

    return by_epoch


@struct.dataclass
class MacDropState:
    """The MacDrop transform's state: a pytree that checkpoints with the optimizer."""

    key: jax.Array  # PRNG key of the next mask


@dataclasses.dataclass(frozen=True)
class MacDrop:
    """The MacDrop transform for one model: which rows, which curriculum, which scope."""

    layer: int
    indices: tuple[int, ...]  # the massive rows (PyTorch rows of W_gate / W_up)
    d_model: int
    d_ff: int
    schedule: optax.Schedule = dataclasses.field(compare=False)
    scope: str = "massive"
    expert: int | None = None  # Mixtral: the expert the massive rows belong to

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"unknown MacDrop scope {self.scope!r}; choose from {SCOPES}")
        if not 1 <= len(self.indices) <= self.d_ff:
            raise ValueError(f"MacDrop needs between 1 and d_ff={self.d_ff} massive rows, got {len(self.indices)}")
        if max(self.indices) >= self.d_ff or min(self.indices) < 0:
            raise ValueError(f"massive rows {self.indices} lie outside [0, d_ff={self.d_ff})")

    @classmethod
    def from_massive_weights(cls, mw: MassiveWeights, k: int, d_model: int, d_ff: int, schedule: optax.Schedule,
                             scope: str = "massive") -> MacDrop:
        """The transform for the first k rows of `mw`, at its layer (and expert).

        Args:
          mw: the massive weights found on the pretrained model (`massive.find_massive_weights`).
          k: how many of them to drop, 1..min(len(mw.indices), d_ff).
          d_model: hidden size.
          d_ff: intermediate size.
          schedule: p(t), e.g. from `curriculum`.
          scope: one of SCOPES: "massive", "all" or "all_but_massive".

        Returns:
          The `MacDrop`.
        """
        if not 1 <= k <= min(len(mw.indices), d_ff):
            raise ValueError(f"MacDrop k={k} must lie in [1, {min(len(mw.indices), d_ff)}] (d_ff={d_ff}; the "
                             f"MassiveWeights result holds {len(mw.indices)} rows)")
        return cls(layer=mw.layer, indices=tuple(mw.indices[:k]), d_model=d_model, d_ff=d_ff, schedule=schedule,
                   scope=scope, expert=mw.expert)

    @property
    def rows(self) -> tuple[int, ...]:
        """The rows the mask covers under this scope."""
        if self.scope == "massive":
            return self.indices
        massive = set(self.indices)
        return tuple(i for i in range(self.d_ff) if self.scope == "all" or i not in massive)

    def init(self, rng: jax.Array) -> MacDropState:
        """The first state.

        Args:
          rng: PRNG key of the first mask.

        Returns:
          A `MacDropState` holding `rng`.
        """
        return MacDropState(key=rng)

    def probability(self, step) -> jax.Array:
        """p of the 0-based optimizer step `step` (Algorithm 1's t = step + 1).

        Args:
          step: the 0-based optimizer step (may be traced).

        Returns:
          float32 [] drop probability.
        """
        return jnp.asarray(self.schedule(step), jnp.float32)

    def masks(self, state: MacDropState, step) -> masks.FFNMasks:
        """The ffn_masks for optimizer step `step`: uniform(k, d_model) > p(step), one mask for W_gate and W_up.

        Args:
          state: the current state (its key draws the mask).
          step: the 0-based optimizer step (may be traced).

        Returns:
          {layer: RowMask} over `rows`, values 1.0 (keep) / 0.0 (drop), [len(rows), d_model].
        """
        rows = jnp.asarray(self.rows, jnp.int32)
        keep = jax.random.uniform(state.key, (len(self.rows), self.d_model)) > self.probability(step)
        return {self.layer: masks.RowMask(rows=rows, values=keep.astype(jnp.float32), expert=self.expert)}

    def advance(self, state: MacDropState) -> MacDropState:
        """The state of the next mask.

        Args:
          state: the current state.

        Returns:
          A `MacDropState` with a new key.
        """
        return MacDropState(key=jax.random.split(state.key)[0])
