"""The training loop (`fit`): the step over a stream of micro-batches that spans epochs, evaluation, logging
(console progress; JSONL on process 0), checkpoints, an exact resume (metrics.jsonl cut back to the checkpointed
step). No poisoned state is saved: a state is trusted only once a forward on it gave a finite loss."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np

from mwjax.core import atomic
from mwjax.finetune.checkpoints import Checkpoints
from mwjax.finetune.guards import DivergenceGuard, TrainingDivergedError
from mwjax.finetune.loss import IGNORE
from mwjax.finetune.run_log import RunLog
from mwjax.finetune.step import Trainer, TrainState

BATCH_KEYS = ("tokens", "labels", "positions", "segment_ids")


def _empty_like(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A micro-batch that contributes nothing (every label ignored), to fill the run's last step."""
    return {k: np.full_like(v, IGNORE) if k == "labels" else np.zeros_like(v) for k, v in batch.items()}


def micro_batches(loader, start: int, epochs: float) -> Iterator[dict[str, np.ndarray]]:
    """The run's stream of micro-batches from global index `start` on, across epochs (endless).

    Args:
      loader: a `data.BatchLoader` or alike: `len()` batches per epoch, `.epoch(e, start_step)`.
      start: the global index (over all epochs) of the first micro-batch (a resume: steps done x grad_accum).
      epochs: epochs of data (fractional: the last one ends mid-way).

    Yields:
      Each micro-batch's BATCH_KEYS arrays (int32 [local_batch, seq_len]); past the end of the data, micro-batches
      of the same shapes that contribute nothing (every label IGNORE), to fill the run's last step.
    """
    per_epoch = len(loader)
    end = math.floor(epochs * per_epoch)
    index = start
    while True:
        epoch, offset = divmod(index, per_epoch)
        for batch in loader.epoch(epoch, start_step=offset):
            mb = {k: batch[k] for k in BATCH_KEYS}
            yield mb if index < end else _empty_like(mb)
            index += 1


def stack_step(stream: Iterator, grad_accum: int) -> dict[str, np.ndarray]:
    """The next optimizer step's micro-batches stacked to [grad_accum, ...].

    Args:
      stream: the `micro_batches` iterator (past the data's end, its micro-batches contribute nothing).
      grad_accum: micro-batches per optimizer step.

    Returns:
      BATCH_KEYS -> int32 [grad_accum, local_batch, seq_len].
    """
    chunk = [next(stream) for _ in range(grad_accum)]
    return {k: np.stack([mb[k] for mb in chunk]) for k in BATCH_KEYS}


@dataclasses.dataclass
class RunResult:
    """What `fit` returns: the final training state, the logged metrics and the validation losses."""

    state: TrainState
    history: list[dict]  # logged metrics of every step, earlier (resumed-from) runs' included
    eval_losses: list[tuple[int, float]]  # (step, validation loss); step 0: before fine-tuning


def resume_log(path: Path, step: int) -> list[dict]:
    """Cut metrics.jsonl back to the records of steps <= `step` and return them. A line torn by a kill is dropped.
    Rewritten atomically.

    Args:
      path: the run's metrics.jsonl (absent: nothing to cut).
      step: the checkpoint a run resumes from; 0: none, so nothing is kept.

    Returns:
      The records kept, in file order.
    """
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and 0 < step and record["step"] <= step:
            records.append(record)
    atomic.write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in records))
    return records


def diverged(checkpoints: Checkpoints, bad_from: int, reason: str, step: int) -> TrainingDivergedError:
    """Delete the checkpoints of steps >= bad_from (states a forward has shown to be poisoned) and name the
    latest good one.

    Args:
      checkpoints: the run's checkpoints.
      bad_from: the step of the first state not to trust.
      reason: what went wrong, for the message.
      step: the step that found it (1-based), for the message.

    Returns:
      The TrainingDivergedError to raise, naming the last good checkpoint (or saying none is left).
    """
    for saved in checkpoints.manager.all_steps():
        if saved >= bad_from:
            checkpoints.manager.delete(saved)
    good = checkpoints.latest()
    where = (f"the last good checkpoint is step {good} in {checkpoints.directory}: lower the learning rate and "
             "resume from it" if good is not None else
             f"no good checkpoint is left in {checkpoints.directory}: lower the learning rate and start again")
    return TrainingDivergedError(f"training diverged at step {step}: {reason}; {where}.")


def input_tokens(arrays: dict) -> int:
    """The tokens a host fed in one step, padding left out (segment id 0, `mwjax.finetune.data`).

    Args:
      arrays: one step's host-local batch (`stack_step`), with "segment_ids".

    Returns:
      The number of non-padding tokens.
    """
    return int(np.count_nonzero(arrays["segment_ids"]))


def fit(trainer: Trainer, train_loader, val_loader=None, *, output_dir: str | Path, meta: dict | None = None,
        resume: bool = True, stop_after: int | None = None, on_eval: Callable[[int, float], None] | None = None,
        checkpoint_dir: str | Path | None = None, eval_before: bool = False) -> RunResult:
    """Train to `trainer.steps`, resuming from the latest checkpoint in checkpoint_dir; metrics.jsonl is cut back
    to that checkpoint's step.

    Only process 0 writes metrics.jsonl; every process takes part in checkpoints (orbax coordinates).

    Args:
      trainer: the compiled steps, the initial state and the run's TrainConfig.
      train_loader: the training `data.BatchLoader`.
      val_loader: the validation `data.BatchLoader`; None for no evaluation.
      output_dir: where metrics.jsonl and tensorboard/ go (created).
      meta: run facts saved with every checkpoint (the total steps, step and guard state are added).
      resume: continue from the latest checkpoint when there is one; False starts afresh.
      stop_after: stop (after checkpointing) once this many steps are done, as an interruption would.
      on_eval: called with (step, validation loss) after each evaluation.
      checkpoint_dir: the checkpoints' directory (may be a gs:// URL); None for output_dir/checkpoints.
      eval_before: on a fresh start, the validation loss of the untouched model is logged as step 0.

    Returns:
      The `RunResult`: the final state, the logged metrics and the validation losses (earlier runs' included).

    Raises:
      TrainingDivergedError: (module doc) with the checkpoints of poisoned states deleted.
    """
    config = trainer.config
    output_dir = Path(output_dir)
    lead = jax.process_index() == 0
    if lead:
        output_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = Checkpoints(checkpoint_dir or output_dir / "checkpoints", config.keep_checkpoints)
    state, start, saved_meta = trainer.initial_state, 0, {}
    if resume and checkpoints.latest() is not None:
        state, saved_meta = checkpoints.restore(state)
        start = int(state.step)
    guard = DivergenceGuard(config.divergence_factor, config.zero_grad_steps, saved_meta.get("guard"))
    meta = dict(meta or {}) | {"total_steps": trainer.steps}
    stream = micro_batches(train_loader, start * config.grad_accum, config.epochs if not config.max_steps else 1e9)
    earlier = resume_log(output_dir / "metrics.jsonl", start) if lead else []
    history = [r for r in earlier if "loss" in r]
    eval_losses = [(r["step"], r["eval_loss"]) for r in earlier if "eval_loss" in r]

    announced = set()

    def announce(what: str) -> None:  # the first call of a compiled step is silent for a while: say why
        if lead and what not in announced:
            announced.add(what)
            print(f"compiling the {what} (once per run; minutes at 8B+ scale, seconds from a warm compilation cache)",
                  file=sys.stderr, flush=True)

    def evaluate(step: int, metrics: dict) -> None:
        announce("evaluation step")
        metrics["eval_loss"] = trainer.evaluate(state, val_loader.epoch(0))
        eval_losses.append((step, metrics["eval_loss"]))
        if on_eval:
            on_eval(step, metrics["eval_loss"])

    with RunLog(output_dir, total=trainer.steps, start=start, lead=lead) as run_log, checkpoints:
        if eval_before and start == 0 and val_loader is not None:
            evaluate(0, before := {"step": 0})
            run_log.record(before)
        last_time = time.perf_counter()
        if start < trainer.steps:
            announce("training step")
        for step in range(start, trainer.steps):
            arrays = stack_step(stream, config.grad_accum)
            batch = trainer.place_batch(arrays, 1)
            state, metrics = trainer.step_fn(state, trainer.frozen, batch)
            params_finite = bool(metrics.pop("params_finite"))
            metrics = {k: float(v) for k, v in metrics.items()} | {"step": step + 1}
            # a loss is the verdict on the state before the step (S_step): if it is bad, so is S_step's checkpoint
            if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                raise diverged(checkpoints, step, f"loss={metrics['loss']}, grad_norm={metrics['grad_norm']}",
                                step + 1)
            if not params_finite:
                raise diverged(checkpoints, step + 1, "the update made the adapters non-finite", step + 1)
            if stop := guard(metrics):
                raise diverged(checkpoints, stop[1], stop[0], step + 1)
            elapsed = max(time.perf_counter() - last_time, 1e-9)
            # tokens: label tokens (the loss's); input tokens: every non-padding token fed, on all hosts
            metrics |= {"step_time": elapsed, "tokens_per_s": metrics["tokens"] / elapsed,
                        "input_tokens_per_s": input_tokens(arrays) * jax.process_count() / elapsed}
            history.append(metrics)
            at_end = step + 1 == trainer.steps
            if val_loader is not None and (at_end or (config.eval_every and (step + 1) % config.eval_every == 0)):
                evaluate(step + 1, metrics)
            run_log.step(metrics, record=(step + 1) % config.log_every == 0 or "eval_loss" in metrics or at_end)
            stopping = stop_after is not None and step + 1 >= stop_after
            if at_end or stopping or (config.save_every and (step + 1) % config.save_every == 0):
                checkpoints.save(state, meta | {"step": step + 1, "guard": guard.state()})
            if stopping:
                break
            last_time = time.perf_counter()  # step time leaves out evaluation and checkpointing
    return RunResult(state=state, history=history, eval_losses=eval_losses)
