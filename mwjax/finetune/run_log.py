"""Where a training run's metrics go: metrics.jsonl, TensorBoard event files, and a progress display a
researcher sees wherever the output lands.

- `metrics.jsonl`: one JSON record per logged step (the run's own record, read back on resume).
- `tensorboard/`: the same scalars as TensorBoard events (tensorboardX: no TensorFlow), for
  `tensorboard --logdir runs/`.
- progress: on a terminal, a tqdm bar that stays on screen; anywhere else (SLURM, nohup, `| tee`), one
  line per logged step on stderr: step, loss, learning rate, MacDrop p, tokens/s over every input token,
  and the time left.

Only process 0 of a multi-host run writes (`lead`).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from mwjax.core.progress import duration, progress

SCALARS = ("loss", "eval_loss", "lr", "p", "grad_norm", "tokens_per_s", "input_tokens_per_s")
TIMINGS = ("step_time", "tokens_per_s", "input_tokens_per_s")  # the record's wall-clock fields (differ per run)


def progress_line(metrics: dict, total: int, eta_s: float | None) -> str:
    """One progress line: 'step 10/579 | loss 2.3100 | lr 1.00e-04 | p 0.790 | 1,234 tok/s | eval_loss 2.2000 |
    ETA 1h02m'; a metric the record lacks is left out.

    Args:
      metrics: one step's record (step, and any of loss, lr, p, input_tokens_per_s, eval_loss).
      total: the run's total steps.
      eta_s: seconds left; None to show no ETA.

    Returns:
      The line, without a newline.
    """
    parts = [f"step {metrics['step']}/{total}"]
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f}")
    if "lr" in metrics:
        parts.append(f"lr {metrics['lr']:.2e}")
    if "p" in metrics:
        parts.append(f"p {metrics['p']:.3f}")
    if "input_tokens_per_s" in metrics:
        parts.append(f"{metrics['input_tokens_per_s']:,.0f} tok/s")
    if "eval_loss" in metrics:
        parts.append(f"eval_loss {metrics['eval_loss']:.4f}")
    if eta_s is not None:
        parts.append(f"ETA {duration(eta_s)}")
    return " | ".join(parts)


class RunLog:
    """metrics.jsonl + TensorBoard + progress for steps start+1 .. total; use as a context manager.

    Args:
      output_dir: the run's directory (metrics.jsonl is appended to, TensorBoard events go to tensorboard/).
      total: the run's total steps.
      start: steps already done (a resumed run); TensorBoard events after it are purged.
      lead: whether this process writes (process 0 of a multi-host run); False only tracks the timing.
      interactive: a tqdm bar (True) or one line per record (False); None: a bar when `stream` is a terminal.
      stream: where progress goes; None for stderr.
    """

    def __init__(self, output_dir: str | Path, *, total: int, start: int, lead: bool = True,
                 interactive: bool | None = None, stream=None):
        self.total, self.lead = total, lead
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self._step_times: list[float] = []
        self._done = start
        self._jsonl = self._tb = self._bar = None
        if not lead:
            return
        output_dir = Path(output_dir)
        self._jsonl = open(output_dir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start + 1 if start else None)
        if self.interactive:
            self._bar = progress(total, "fine-tuning", stream=self.stream, interactive=True, initial=start)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def eta(self) -> float | None:
        """Seconds left at the mean time of the last 20 steps (None before the first)."""
        recent = self._step_times[-20:]
        return None if not recent else (self.total - self._done) * sum(recent) / len(recent)

    def step(self, metrics: dict, *, record: bool) -> None:
        """Take a finished step's metrics: timing for the ETA, the progress bar, and the record when asked.

        Args:
          metrics: the step's record (step, loss, lr, ..., step_time).
          record: also write it to metrics.jsonl, TensorBoard and the progress lines (`record`).
        """
        self._done = metrics["step"]
        if "step_time" in metrics:
            self._step_times.append(metrics["step_time"])
        if not self.lead:
            return
        if self._bar is not None:
            self._bar.update(metrics["step"] - self._bar.n)
            self._bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "lr", "p", "eval_loss") if k in metrics})
        if record:
            self.record(metrics)

    def record(self, metrics: dict) -> None:
        """Write one record (a step's, or the step-0 evaluation) everywhere (process 0 only).

        Args:
          metrics: the record; its finite SCALARS go to TensorBoard at its `step`.
        """
        if not self.lead:
            return
        self._jsonl.write(json.dumps(metrics) + "\n")
        self._jsonl.flush()
        for key in SCALARS:
            if key in metrics and math.isfinite(metrics[key]):
                tag = "eval/loss" if key == "eval_loss" else f"train/{key}"
                self._tb.add_scalar(tag, metrics[key], metrics["step"])
        self._tb.flush()
        if self._bar is None:
            print(progress_line(metrics, self.total, self.eta() if metrics["step"] else None), file=self.stream,
                  flush=True)

    def close(self) -> None:
        """Close the progress bar, the TensorBoard writer and metrics.jsonl."""
        for handle in (self._bar, self._tb, self._jsonl):
            if handle is not None:
                handle.close()
        self._bar = self._tb = self._jsonl = None
