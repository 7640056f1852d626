"""Fine-tuning with LoRA / DoRA and MacDrop: a jitted train step over a device mesh, and the loop.

The model is split into three parts: adapter parameters (`peft.LoRAParam`, float32, replicated,
the only thing differentiated and given optimizer state), dropout RNG streams, and the frozen base
(any dtype, sharded FSDP x tensor-parallel by `mwjax.core.sharding`). One optimizer step consumes
`grad_accum` micro-batches in a `lax.scan`; the loss is the mean next-token cross-entropy over all
label tokens of the step (token-weighted, so accumulation and data parallelism give the loss of
the whole batch; the vocabulary is unembedded in sequence chunks, `TrainConfig.loss_chunk`, so the
[b, t, V] float32 logits never exist whole). MacDrop's mask is drawn once per optimizer step (or per
micro-batch) and enters the forward as an FFN row mask. AdamW (optax; betas and decoupled weight decay
as torch's AdamW) after global-norm clipping, learning rate warmed up linearly then decayed (cosine or
linear) as HF's schedulers do.

The loop runs the step over a stream of micro-batches that spans epochs, evaluates, logs (console
progress bar; JSONL on process 0), checkpoints with orbax (atomic; every `save_every` steps and at
the end), and resumes exactly: step, data position, MacDrop key, dropout streams and the divergence
guard are all in the checkpoint, and metrics.jsonl is cut back to the checkpointed step.

No poisoned state is saved: every step checks its loss, gradient norm and updated adapters in the
compiled step, and a state is trusted only once a forward on it gave a finite loss, so on a
non-finite step the checkpoint of the state that produced it is deleted and the error names the
latest one that really is good. A `DivergenceGuard` also stops runs whose smoothed loss climbs
far above its best or whose gradient vanishes (learning rate far too high, saturated softmax).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx, struct
from jax.sharding import Mesh

from mwjax.adapters.lora import LoRAParam
from mwjax.core import atomic, sharding
from mwjax.finetune.loss import IGNORE, chunked_token_loss, token_loss
from mwjax.finetune.run_log import RunLog
from mwjax.nn.stack import stack_layers, unstack_layers
from mwjax.research.macdrop import MacDrop, MacDropState


class TrainingDivergedError(RuntimeError):
    """The loss, the gradient or the adapters became NaN / inf, or the DivergenceGuard fired."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (LLaMA-Factory / HF TrainingArguments names in comments)."""

    learning_rate: float = 1e-4  # learning_rate
    epochs: float = 3.0  # num_train_epochs
    max_steps: int | None = None  # max_steps (overrides epochs)
    warmup_ratio: float = 0.05  # warmup_ratio
    decay: str = "cosine"  # lr_scheduler_type: cosine | linear | constant
    weight_decay: float = 0.0
    b1: float = 0.9  # adam_beta1
    b2: float = 0.999  # adam_beta2
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    micro_batch_size: int = 8  # sequences per micro-batch, all devices and hosts together
    grad_accum: int = 4  # gradient_accumulation_steps
    remat: str | None = None  # None | "full" | "dots" | "nothing" | "offload" (models.base.REMAT_POLICIES)
    # the decoder layers stacked and run by one lax.scan (mwjax.nn.stack): one layer body to compile and
    # rematerialise, whatever the depth; False runs the unrolled layers (e.g. layers of different structure)
    scan_layers: bool = True
    # positions per chunk of the vocabulary loss (mwjax.finetune.loss.chunked_token_loss): the [b, t, V] float32 logits
    # are never held whole (Llama 3's 128k vocabulary at 8 x 1024 tokens: 4 GiB, and as much for their gradient);
    # None computes them whole
    loss_chunk: int | None = 256
    # a MacDrop mask per "microbatch" (Algorithm 1 wraps HF's training_step, called per micro-batch) or per "step"
    mask_every: str = "microbatch"
    seed: int = 42
    log_every: int = 1
    eval_every: int = 0  # steps between validation losses (0: only at the end)
    eval_batches: int | None = None  # cap on validation batches per evaluation
    save_every: int = 100
    keep_checkpoints: int = 2  # >= 2 keeps a good checkpoint when the latest one turns out poisoned
    divergence_factor: float = 4.0  # stop once the smoothed loss exceeds this multiple of its lowest value (0: off)
    zero_grad_steps: int = 3  # stop after this many consecutive steps whose gradient norm is exactly 0 (0: off)

    def __post_init__(self):
        lr = self.learning_rate
        if not (isinstance(lr, int | float) and 0 < lr <= np.finfo(np.float32).max):  # NaN fails too
            raise ValueError(f"learning_rate must be a finite number > 0 (in float32), got {lr}")
        for name in ("max_grad_norm", "eps"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        for name in ("seed", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_batches is not None and self.eval_batches < 1:
            raise ValueError(f"eval_batches must be >= 1 (or None: all), got {self.eval_batches}")
        if not (0 < self.epochs < math.inf or self.max_steps):
            raise ValueError(f"epochs must be a finite number > 0 (or max_steps given), got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.keep_checkpoints < 1 or self.save_every < 0 or self.log_every < 1:
            raise ValueError("keep_checkpoints and log_every must be >= 1 and save_every >= 0")
        if self.divergence_factor != 0 and not 1 < self.divergence_factor < math.inf:
            raise ValueError(f"divergence_factor must be a finite number > 1 (or 0 to disable), got "
                             f"{self.divergence_factor}")
        if self.zero_grad_steps < 0:
            raise ValueError(f"zero_grad_steps must be >= 0, got {self.zero_grad_steps}")
        if self.decay not in ("cosine", "linear", "constant"):
            raise ValueError(f"unknown learning-rate decay {self.decay!r}; choose cosine, linear or constant")
        if self.mask_every not in ("step", "microbatch"):
            raise ValueError(f"mask_every must be 'step' or 'microbatch', got {self.mask_every!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")
        if self.micro_batch_size < 1 or self.grad_accum < 1:
            raise ValueError("micro_batch_size and grad_accum must be >= 1")
        if self.loss_chunk is not None and self.loss_chunk < 1:
            raise ValueError(f"loss_chunk must be >= 1 positions (or None: whole logits), got {self.loss_chunk}")


def total_steps(config: TrainConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of the run: max_steps, else ceil(epochs x micro-batches per epoch / grad_accum), as the
    HF Trainer counts (House of Cards Table 5: 49,401 alpaca_gpt4_en rows, 64 per micro-batch, 4 accumulated,
    3 epochs = 579 steps)."""
    if config.max_steps:
        return config.max_steps
    return max(1, math.ceil(config.epochs * batches_per_epoch / config.grad_accum))


def lr_schedule(config: TrainConfig, steps: int) -> optax.Schedule:
    """Linear warmup over ceil(warmup_ratio x steps), then cosine / linear decay to 0 (HF's schedules)."""
    warmup = math.ceil(config.warmup_ratio * steps)
    if config.decay == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, max(steps, warmup + 1), 0.0)
    decay = (optax.linear_schedule(config.learning_rate, 0.0, max(steps - warmup, 1)) if config.decay == "linear"
             else optax.constant_schedule(config.learning_rate))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, warmup), decay], [warmup])


def optimizer(config: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                       optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                                   weight_decay=config.weight_decay))


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 []: optimizer steps taken
    params: nnx.State  # the adapters (LoRAParam)
    opt_state: Any
    macdrop: MacDropState | None
    rngs: nnx.State  # dropout RNG streams (empty without LoRA dropout)


class Trainer:
    """The split model, the optimizer and the compiled steps of one run."""

    def __init__(self, model: nnx.Module, config: TrainConfig, *, steps: int, mesh: Mesh,
                 macdrop: MacDrop | None = None):
        self.config, self.steps, self.mesh, self.macdrop = config, steps, mesh, macdrop
        self.schedule = lr_schedule(config, steps)
        self.tx = optimizer(config, self.schedule)
        # a copy: the caller's model keeps its remat, train/eval mode and layout (stacking copies the layers' arrays)
        model = stack_layers(model) if config.scan_layers else nnx.clone(model)
        model.remat = config.remat
        model.train()
        self.graphdef, params, rngs, frozen = nnx.split(model, LoRAParam, nnx.RngState, ...)
        model.eval()
        self.eval_graphdef = nnx.split(model, LoRAParam, nnx.RngState, ...)[0]
        if not jax.tree.leaves(params):
            raise ValueError("the model has no adapter parameters: call mwjax.peft.add_adapters first")
        self.replicated = sharding.replicated(mesh)

        def initial_state(params, rngs):
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                              macdrop=macdrop.init(jax.random.key(config.seed)) if macdrop else None, rngs=rngs)

        # an abstract model (nnx.eval_shape) gives an abstract trainer, whose steps lower and compile without
        # weights (benchmarks/compile_memory.py)
        self.abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(frozen))
        place = sharding.shaped if self.abstract else sharding.put
        state = jax.eval_shape(initial_state, params, rngs) if self.abstract else initial_state(params, rngs)
        self.frozen = place(frozen, sharding.state_shardings(frozen, mesh))
        self.initial_state = place(state, self.replicated)
        # the state stays replicated (else XLA may return adapters split along whatever it chose)
        self.step_fn = jax.jit(self._train_step, donate_argnums=0, out_shardings=self.replicated)
        self.eval_fn = jax.jit(self._eval_step)

    # ------------------------------------------------------------------ pure functions

    def _loss(self, model, mb, ffn_masks=None):
        """(NLL sum, label count) of one micro-batch, the vocabulary in chunks when `config.loss_chunk` says so
        (a sequence that one chunk covers takes the whole logits: the same loss, without the scan to compile)."""
        kwargs = dict(positions=mb["positions"], segment_ids=mb["segment_ids"], ffn_masks=ffn_masks)
        chunk = self.config.loss_chunk
        if chunk is None or mb["tokens"].shape[-1] - 1 <= chunk:
            return token_loss(model(mb["tokens"], **kwargs), mb["labels"])
        hidden, _ = model.hidden_states(mb["tokens"], **kwargs)
        return chunked_token_loss(model.unembed, hidden, mb["labels"], chunk)

    def _forward_loss(self, params, rngs, frozen, mb, ffn_masks):
        model = nnx.merge(self.graphdef, params, rngs, frozen, copy=True)
        loss_sum, count = self._loss(model, mb, ffn_masks)
        return loss_sum, (count, nnx.state(model, nnx.RngState))

    def _train_step(self, state: TrainState, frozen, batch):
        """batch: int32 arrays [grad_accum, micro_batch_size, seq_len] -> (new state, metrics)."""
        md = self.macdrop
        per_micro = self.config.mask_every == "microbatch"

        def micro(carry, mb):
            grads, loss_sum, count, md_state, rngs = carry
            ffn_masks = md.masks(md_state, state.step) if md else None
            (loss, (n, rngs)), g = jax.value_and_grad(self._forward_loss, has_aux=True)(
                state.params, rngs, frozen, mb, ffn_masks)
            if md and per_micro:
                md_state = md.advance(md_state)
            return (jax.tree.map(jnp.add, grads, g), loss_sum + loss, count + n, md_state, rngs), None

        init = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32),
                state.macdrop, state.rngs)
        (grads, loss_sum, count, md_state, rngs), _ = jax.lax.scan(micro, init, batch)
        denom = jnp.maximum(count, 1).astype(jnp.float32)  # token-weighted mean over the whole step
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        if md and not per_micro:
            md_state = md.advance(md_state)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss_sum / denom, "grad_norm": optax.global_norm(grads), "lr": self.schedule(state.step),
                   "tokens": count, "params_finite": jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                                                                        for x in jax.tree.leaves(params)]))}
        if md:
            metrics["p"] = md.probability(state.step)
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, macdrop=md_state, rngs=rngs)
        return new, metrics

    def _eval_step(self, params, rngs, frozen, mb):
        return self._loss(nnx.merge(self.eval_graphdef, params, rngs, frozen, copy=True), mb)

    # ------------------------------------------------------------------ host side

    def place_batch(self, arrays: dict[str, np.ndarray], batch_axis: int) -> dict[str, jax.Array]:
        """This process's numpy rows -> global arrays split over ("data", "fsdp") along `batch_axis`."""
        return {key: jax.make_array_from_process_local_data(sharding.batch_sharding(self.mesh, value.ndim, batch_axis),
                                                            np.asarray(value, np.int32))
                for key, value in arrays.items()}

    def model(self, state: TrainState) -> nnx.Module:
        """The model with the state's adapters, in evaluation mode, its layers unrolled (`model.model.layers[i]`)."""
        return unstack_layers(nnx.merge(self.eval_graphdef, state.params, state.rngs, self.frozen, copy=True))

    def evaluate(self, state: TrainState, batches) -> float:
        """Mean token loss over validation batches (no MacDrop mask, no dropout)."""
        total, count = 0.0, 0
        for i, batch in enumerate(batches):
            if self.config.eval_batches is not None and i >= self.config.eval_batches:
                break
            loss, n = self.eval_fn(state.params, state.rngs, self.frozen, self.place_batch(batch, 0))
            total, count = total + float(loss), count + int(n)
        return total / max(count, 1)


# ---------------------------------------------------------------------------------------------- the loop

BATCH_KEYS = ("tokens", "labels", "positions", "segment_ids")


def micro_batches(loader, start: int, epochs: float) -> Iterator[dict[str, np.ndarray] | None]:
    """The run's stream of micro-batches from global index `start` on, across epochs; None past the end
    (a fractional last epoch ends mid-way). `loader`: `len()` batches per epoch, `.epoch(e, start_step)`."""
    per_epoch = len(loader)
    end = math.floor(epochs * per_epoch)
    index = start
    while True:
        epoch, offset = divmod(index, per_epoch)
        for batch in loader.epoch(epoch, start_step=offset):
            yield {k: batch[k] for k in BATCH_KEYS} if index < end else None
            index += 1


def _empty_like(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A micro-batch that contributes nothing (every label ignored), to fill the run's last step."""
    return {k: np.full_like(v, IGNORE) if k == "labels" else np.zeros_like(v) for k, v in batch.items()}


def stack_step(stream: Iterator, grad_accum: int, template: dict | None) -> tuple[dict[str, np.ndarray], dict]:
    """The next optimizer step's micro-batches stacked to [grad_accum, ...]."""
    chunk = []
    for _ in range(grad_accum):
        mb = next(stream)
        if mb is None:
            mb = _empty_like(template)
        template = mb
        chunk.append(mb)
    return {k: np.stack([mb[k] for mb in chunk]) for k in BATCH_KEYS}, template


class Checkpoints:
    """Orbax checkpoints of a run: the train state and a JSON of run facts, written atomically."""

    def __init__(self, directory: str | Path, keep: int):
        # a local path or a URL orbax understands (gs://bucket/run: survives a preempted TPU VM)
        self.directory = epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    @classmethod
    def latest_in(cls, directory: str | Path) -> int | None:
        """The latest complete checkpoint's step in `directory` (None: none, or no such directory)."""
        if not epath.Path(directory).exists():
            return None
        checkpoints = cls(directory, keep=1)
        try:
            return checkpoints.latest()
        finally:
            checkpoints.close()

    def save(self, state: TrainState, meta: dict) -> None:
        step = int(state.step)
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_to_saveable(state)),
                                                         meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        step = self.latest() if step is None else step
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                              _to_saveable(template))
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                  meta=ocp.args.JsonRestore()))
        return _from_saveable(template, out["state"]), out["meta"]

    def close(self) -> None:
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


class DivergenceGuard:
    """Stops a run that diverges without NaNs: the loss smoothed as an exponential moving average
    (beta 0.9, bias-corrected) exceeds `factor` x its lowest value so far, or the gradient norm is exactly 0
    on `zero_steps` consecutive steps with tokens (a saturated softmax). Its state rides in the checkpoint
    meta, so a resumed run stops where an uninterrupted one would."""

    BETA = 0.9

    def __init__(self, factor: float, zero_steps: int, state: dict | None = None):
        self.factor, self.zero_steps = factor, zero_steps
        state = state or {}
        self.ema, self.count = state.get("ema", 0.0), state.get("count", 0)
        best = state.get("best")  # None before the first step with tokens (JSON has no inf)
        self.best, self.best_step = math.inf if best is None else best, state.get("best_step", 0)
        self.zeros = state.get("zeros", 0)

    def state(self) -> dict:
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


@dataclasses.dataclass
class RunResult:
    state: TrainState
    history: list[dict]  # logged metrics of every step, earlier (resumed-from) runs' included
    eval_losses: list[tuple[int, float]]  # (step, validation loss); step 0: before fine-tuning


def resume_log(path: Path, step: int) -> list[dict]:
    """Cut metrics.jsonl back to the records of steps <= `step` (the checkpoint a run resumes from; 0: none,
    so nothing is kept) and return them. A line torn by a kill is dropped. Rewritten atomically."""
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


def _diverged(checkpoints: Checkpoints, bad_from: int, reason: str, step: int) -> TrainingDivergedError:
    """Delete the checkpoints of steps >= bad_from (states a forward has shown to be poisoned) and name the
    latest good one."""
    for saved in checkpoints.manager.all_steps():
        if saved >= bad_from:
            checkpoints.manager.delete(saved)
    good = checkpoints.latest()
    where = (f"the last good checkpoint is step {good} in {checkpoints.directory}: lower the learning rate and "
             "resume from it" if good is not None else
             f"no good checkpoint is left in {checkpoints.directory}: lower the learning rate and start again")
    return TrainingDivergedError(f"training diverged at step {step}: {reason}; {where}.")


def input_tokens(arrays: dict) -> int:
    """The tokens a host fed in one step, padding left out (segment id 0, `mwjax.finetune.data`)."""
    return int(np.count_nonzero(arrays["segment_ids"]))


def fit(trainer: Trainer, train_loader, val_loader=None, *, output_dir: str | Path, meta: dict | None = None,
        resume: bool = True, stop_after: int | None = None, on_eval: Callable[[int, float], None] | None = None,
        checkpoint_dir: str | Path | None = None, eval_before: bool = False) -> RunResult:
    """Train to `trainer.steps`, resuming from the latest checkpoint in checkpoint_dir (default
    output_dir/checkpoints; may be a gs:// URL); metrics.jsonl is cut back to that checkpoint's step.

    eval_before: on a fresh start, the validation loss of the untouched model is logged as step 0.
    stop_after: stop (after checkpointing) once this many steps are done, as an interruption would.
    Only process 0 writes metrics.jsonl; every process takes part in checkpoints (orbax coordinates).
    Raises TrainingDivergedError (module doc) with the checkpoints of poisoned states deleted.
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

    template = None
    with RunLog(output_dir, total=trainer.steps, start=start, lead=lead) as run_log, checkpoints:
        if eval_before and start == 0 and val_loader is not None:
            evaluate(0, before := {"step": 0})
            run_log.record(before)
        last_time = time.perf_counter()
        if start < trainer.steps:
            announce("training step")
        for step in range(start, trainer.steps):
            arrays, template = stack_step(stream, config.grad_accum, template)
            batch = trainer.place_batch(arrays, 1)
            state, metrics = trainer.step_fn(state, trainer.frozen, batch)
            params_finite = bool(metrics.pop("params_finite"))
            metrics = {k: float(v) for k, v in metrics.items()} | {"step": step + 1}
            # a loss is the verdict on the state before the step (S_step): if it is bad, so is S_step's checkpoint
            if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                raise _diverged(checkpoints, step, f"loss={metrics['loss']}, grad_norm={metrics['grad_norm']}",
                                step + 1)
            if not params_finite:
                raise _diverged(checkpoints, step + 1, "the update made the adapters non-finite", step + 1)
            if stop := guard(metrics):
                raise _diverged(checkpoints, stop[1], stop[0], step + 1)
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
