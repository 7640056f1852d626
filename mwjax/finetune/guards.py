"""What stops a run that went wrong: a non-finite step (the checkpoints of states it poisoned deleted, the error
naming the latest good one), a smoothed loss climbing far above its best, a gradient that vanished."""

from __future__ import annotations

import math


class TrainingDivergedError(RuntimeError):
    """The loss, the gradient or the adapters became NaN / inf, or the DivergenceGuard fired."""


class DivergenceGuard:
    """Stops a run that diverges without NaNs: the loss smoothed as an exponential moving average
    (beta 0.9, bias-corrected) exceeds `factor` x its lowest value so far, or the gradient norm is exactly 0
    on `zero_steps` consecutive steps with tokens (a saturated softmax). Its state rides in the checkpoint
    meta, so a resumed run stops where an uninterrupted one would.

    Args:
      factor: the multiple of the lowest smoothed loss that stops the run (`divergence_factor`; 0: off).
      zero_steps: consecutive zero-gradient steps that stop the run (`zero_grad_steps`; 0: off).
      state: a saved `state()` to continue from (a resumed run); None for a fresh guard.
    """

    BETA = 0.9

    def __init__(self, factor: float, zero_steps: int, state: dict | None = None):
        self.factor, self.zero_steps = factor, zero_steps
        state = state or {}
        self.ema, self.count = state.get("ema", 0.0), state.get("count", 0)
        best = state.get("best")  # None before the first step with tokens (JSON has no inf)
        self.best, self.best_step = math.inf if best is None else best, state.get("best_step", 0)
        self.zeros = state.get("zeros", 0)

    def state(self) -> dict:
        """The guard's state as JSON (for the checkpoint meta); `DivergenceGuard(..., state=...)` reads it back."""
        return {"ema": self.ema, "count": self.count, "best": None if self.best == math.inf else self.best,
                "best_step": self.best_step,
                "zeros": self.zeros}

    def __call__(self, metrics: dict) -> tuple[str, int] | None:
        """Update with one step's metrics; when the run must stop, (why, the step of the first state not to
        trust: the one whose forward first showed the trouble)."""
        if metrics["tokens"] == 0:  # a step of padding only (the end of a fractional epoch)
            return None
        self.ema, self.count = self.BETA * self.ema + (1 - self.BETA) * metrics["loss"], self.count + 1
        smoothed = self.ema / (1 - self.BETA ** self.count)
        if smoothed < self.best:
            self.best, self.best_step = smoothed, metrics["step"]
        self.zeros = self.zeros + 1 if metrics["grad_norm"] == 0 else 0
        if self.factor and smoothed > self.factor * self.best:
            return (f"the smoothed training loss {smoothed:.4g} exceeds divergence_factor={self.factor:g} x its "
                    f"lowest value {self.best:.4g} (step {self.best_step})", metrics["step"] - 1)
        if self.zero_steps and self.zeros >= self.zero_steps:
            return (f"the gradient norm has been exactly 0 for {self.zeros} steps (zero_grad_steps={self.zero_steps})",
                    metrics["step"] - self.zeros)
        return None
