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

The pieces, one job each:

    finetune/config.py       TrainConfig, total_steps, lr_schedule, optimizer
    finetune/step.py         TrainState, Trainer: the compiled training and evaluation steps
    finetune/loop.py         fit: micro-batches, evaluation, logging, checkpoints, resume
    finetune/checkpoints.py  Checkpoints: the training state in orbax
    finetune/guards.py       TrainingDivergedError, DivergenceGuard
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
