"""Fine-tuning with LoRA / DoRA and MacDrop: a jitted train step over a device mesh, and the loop.

AdamW after global-norm clipping with HF's warm-up / decay schedules, a compiled step over a device mesh
(adapters trained, the base frozen and sharded), and a loop that evaluates, logs, checkpoints and resumes exactly;
no poisoned state is ever saved. Each piece's own docstring says how.

The pieces, one job each:

    finetune/config.py       TrainConfig, total_steps, lr_schedule, optimizer
    finetune/step.py         TrainState, Trainer: the compiled training and evaluation steps
    finetune/loop.py         fit: micro-batches, evaluation, logging, checkpoints, resume
    finetune/checkpoints.py  Checkpoints: the training state in orbax
    finetune/guards.py       TrainingDivergedError, DivergenceGuard
    finetune/job.py          plan, run: one whole MacDrop run from a config (output directory, model, adapters)
"""

from mwjax.finetune.checkpoints import Checkpoints
from mwjax.finetune.config import TrainConfig, lr_schedule, optimizer, total_steps
from mwjax.finetune.guards import DivergenceGuard, TrainingDivergedError
from mwjax.finetune.loop import BATCH_KEYS, RunResult, fit, input_tokens, micro_batches, resume_log, stack_step
from mwjax.finetune.loss import IGNORE
from mwjax.finetune.step import Trainer, TrainState

__all__ = ["BATCH_KEYS", "IGNORE", "Checkpoints", "DivergenceGuard", "RunResult", "TrainConfig", "TrainState",
           "Trainer", "TrainingDivergedError", "fit", "input_tokens", "lr_schedule", "micro_batches", "optimizer",
           "resume_log", "stack_step", "total_steps"]
