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
    """'step 10/579 | loss 2.3100 | lr 1.00e-04 | p 0.79 | 1,234 tok/s | eval_loss 2.2 | ETA 1h02m'."""
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
    """metrics.jsonl + TensorBoard + progress for steps start+1 .. total; use as a context manager."""

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
        """A finished step's metrics (`record`: written to metrics.jsonl, TensorBoard and the progress lines)."""
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
        """Write one record (a step's, or the step-0 evaluation) everywhere."""
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
        for handle in (self._bar, self._tb, self._jsonl):
            if handle is not None:
                handle.close()
        self._bar = self._tb = self._jsonl = None
