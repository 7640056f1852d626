"""The compiled training and evaluation steps (`Trainer`) over a device mesh, and their state (`TrainState`).

The model is split into three parts: adapter parameters (`LoRAParam`, float32, replicated, the only thing
differentiated and given optimizer state), dropout RNG streams, and the frozen base (any dtype, sharded FSDP x
tensor-parallel by `mwjax.core.sharding`). One optimizer step consumes `grad_accum` micro-batches in a `lax.scan`;
the loss is the mean next-token cross-entropy over all label tokens of the step (token-weighted, so accumulation and
data parallelism give the loss of the whole batch; the vocabulary is unembedded in sequence chunks,
`TrainConfig.loss_chunk`, so the [b, t, V] float32 logits never exist whole). MacDrop's mask is drawn once per
optimizer step (or per micro-batch) and enters the forward as an FFN row mask. Every step checks its loss, gradient
norm and updated adapters in the compiled step (`params_finite`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from mwjax.adapters.lora import LoRAParam
from mwjax.core import sharding
from mwjax.finetune.config import TrainConfig, lr_schedule, optimizer
from mwjax.finetune.loss import chunked_token_loss, token_loss
from mwjax.nn.stack import stack_layers, unstack_layers
from mwjax.research.macdrop import MacDrop, MacDropState


@struct.dataclass
class TrainState:
    """What a training step carries from one step to the next (a pytree, replicated): the step, the adapters,
    the optimizer state (optax AdamW's), MacDrop's key and the dropout streams; all checkpointed."""

    step: jax.Array  # int32 []: optimizer steps taken
    params: nnx.State  # the adapters (LoRAParam)
    opt_state: Any
    macdrop: MacDropState | None
    rngs: nnx.State  # dropout RNG streams (empty without LoRA dropout)


class Trainer:
    """The split model, the optimizer and the compiled steps of one run.

    Args:
      model: a model carrying adapters (`peft.add_adapters`); copied (stacked when config.scan_layers), the
        caller's left as it is. An abstract one (`nnx.eval_shape`) gives an abstract trainer that only compiles.
      config: the optimisation settings.
      steps: the run's optimizer steps (`total_steps`): the schedule's length.
      mesh: the device mesh ("data", "fsdp", "tensor") the base is sharded and the batches split over.
      macdrop: MacDrop's masks and curriculum; None trains without MacDrop.
    """

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
        """batch: int32 arrays [grad_accum, micro_batch_size, seq_len] -> (new state, metrics); traced on the
        mesh, so the model's activation constraints (`sharding.constrain`) apply."""
        with sharding.traced_on(self.mesh):
            return self._train_step_on_mesh(state, frozen, batch)

    def _train_step_on_mesh(self, state: TrainState, frozen, batch):
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
        with sharding.traced_on(self.mesh):
            return self._loss(nnx.merge(self.eval_graphdef, params, rngs, frozen, copy=True), mb)

    # ------------------------------------------------------------------ host side

    def place_batch(self, arrays: dict[str, np.ndarray], batch_axis: int) -> dict[str, jax.Array]:
        """This process's numpy rows -> global arrays split over ("data", "fsdp") along `batch_axis`.

        Args:
          arrays: name -> this process's rows (cast to int32).
          batch_axis: the axis of the rows (1 for a step's [grad_accum, batch, seq], 0 for one micro-batch).

        Returns:
          name -> the global jax.Array.
        """
        return {key: jax.make_array_from_process_local_data(sharding.batch_sharding(self.mesh, value.ndim, batch_axis),
                                                            np.asarray(value, np.int32))
                for key, value in arrays.items()}

    def model(self, state: TrainState) -> nnx.Module:
        """The model with the state's adapters, in evaluation mode, its layers unrolled (`model.model.layers[i]`).

        Args:
          state: a training state of this trainer (e.g. `RunResult.state`).

        Returns:
          The mwjax model carrying the adapters (for `peft.save_adapters`, `export_peft`, `merge`, evaluation).
        """
        return unstack_layers(nnx.merge(self.eval_graphdef, state.params, state.rngs, self.frozen, copy=True))

    def evaluate(self, state: TrainState, batches) -> float:
        """Mean token loss over validation batches (no MacDrop mask, no dropout).

        Args:
          state: the training state whose adapters are evaluated.
          batches: an iterable of micro-batches (`BatchLoader.epoch`); at most config.eval_batches are used.

        Returns:
          The NLL per label token over all the batches (0.0 when they hold none).
        """
        total, count = 0.0, 0
        for i, batch in enumerate(batches):
            if self.config.eval_batches is not None and i >= self.config.eval_batches:
                break
            loss, n = self.eval_fn(state.params, state.rngs, self.frozen, self.place_batch(batch, 0))
            total, count = total + float(loss), count + int(n)
        return total / max(count, 1)
