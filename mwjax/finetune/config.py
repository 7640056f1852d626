"""A fine-tuning run's hyper-parameters (`TrainConfig`) and what they make: the number of steps, the learning
rate schedule (warm-up, then cosine or linear decay, as HF's schedulers) and the optimizer (AdamW after global-norm
clipping, betas and decoupled weight decay as torch's AdamW)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from mwjax.core import lazy

optax = lazy.module("optax")  # with the first schedule: configs and their --help need no jax


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
    3 epochs = 579 steps).

    Args:
      config: the run's settings (max_steps, epochs, grad_accum).
      batches_per_epoch: micro-batches per epoch (`len(BatchLoader)`).

    Returns:
      The number of optimizer steps, >= 1.
    """
    if config.max_steps:
        return config.max_steps
    return max(1, math.ceil(config.epochs * batches_per_epoch / config.grad_accum))


def lr_schedule(config: TrainConfig, steps: int) -> optax.Schedule:
    """Linear warmup over ceil(warmup_ratio x steps), then cosine / linear decay to 0 or a constant rate (HF's
    `get_cosine_schedule_with_warmup` / `get_linear_schedule_with_warmup` / `get_constant_schedule_with_warmup`).

    Args:
      config: learning_rate, warmup_ratio and decay.
      steps: the run's optimizer steps (`total_steps`).

    Returns:
      An optax schedule: optimizer step -> learning rate.
    """
    warmup = math.ceil(config.warmup_ratio * steps)
    if config.decay == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, max(steps, warmup + 1), 0.0)
    decay = (optax.linear_schedule(config.learning_rate, 0.0, max(steps - warmup, 1)) if config.decay == "linear"
             else optax.constant_schedule(config.learning_rate))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, warmup), decay], [warmup])


def optimizer(config: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW after clipping the global gradient norm to `max_grad_norm` (the HF Trainer's `torch.optim.AdamW`).

    Args:
      config: max_grad_norm, b1, b2, eps and weight_decay (decoupled, as torch's AdamW).
      schedule: the learning rate per step (`lr_schedule`).

    Returns:
      The optax GradientTransformation.
    """
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                       optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                                   weight_decay=config.weight_decay))
