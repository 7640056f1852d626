"""A tiny model and an in-memory loader for the trainer's tests (also run as a script for the
multi-device comparison, which needs XLA_FLAGS set before jax starts)."""

import json
import sys

import numpy as np


class ArrayLoader:
    """`mwjax.finetune.data.BatchLoader`'s interface over random token rows: a fresh permutation per epoch."""

    def __init__(self, rows: int, batch_size: int, seq_len: int, seed: int = 0, vocab: int = 100):
        rng = np.random.default_rng(seed)
        self.tokens = rng.integers(3, vocab, (rows, seq_len)).astype(np.int32)
        self.batch_size = batch_size

    def __len__(self):
        return len(self.tokens) // self.batch_size

    def epoch(self, epoch: int, start_step: int = 0):
        order = np.random.default_rng(1000 + epoch).permutation(len(self.tokens))
        for i in range(start_step, len(self)):
            tokens = self.tokens[order[i * self.batch_size:(i + 1) * self.batch_size]]
            labels = tokens.copy()
            labels[:, :4] = -100  # a "prompt" without loss
            yield {"tokens": tokens, "labels": labels, "attention_mask": np.ones_like(tokens),
                   "positions": np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape).copy(),
                   "segment_ids": np.ones_like(tokens)}


def tiny_setup(*, dora=False, macdrop_scope="massive", mask_every="step", **train_kwargs):
    from mwjax import models, peft
    from mwjax.finetune import train
    from mwjax.nn.config import ModelConfig
    from mwjax.research.massive import MassiveWeights

    config = ModelConfig(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = peft.add_adapters(models.build(config, seed=1), peft.LoraConfig(rank=4, alpha=8.0, dora=dora), seed=2)
    for layer in peft.adapters(model).values():  # start from B != 0 so every adapter gets a gradient at once
        layer.lora_b[...] = layer.lora_b[...] + 0.01
    kwargs = dict(learning_rate=5e-3, epochs=2, micro_batch_size=4, grad_accum=2, save_every=2, seed=3,
                  mask_every=mask_every) | train_kwargs
    tc = train.TrainConfig(**kwargs)
    mw = MassiveWeights(layer=1, indices=(3, 9, 27, 81, 100), values=(1.0,) * 5, median=0.1, token_id=1)
    return model, tc, mw, macdrop_scope


def run(mesh_shape, steps=4):
    """Train `steps` steps on a mesh; return the per-step losses and how the base and adapters are placed."""
    import jax

    from mwjax import macdrop
    from mwjax.core import sharding
    from mwjax.finetune import train

    model, tc, mw, scope = tiny_setup(max_steps=steps)
    md = macdrop.MacDrop.from_massive_weights(mw, 5, 64, 128, macdrop.curriculum("step", 0.8, total_steps=steps),
                                              scope=scope)
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    trainer = train.Trainer(model, tc, steps=steps, mesh=sharding.make_mesh(*mesh_shape, devices=devices), macdrop=md)
    state = trainer.initial_state
    losses, constraints = [], []
    stream = train.micro_batches(ArrayLoader(32, 4, 24), 0, 1e9)
    for _ in range(steps):
        arrays = train.stack_step(stream, tc.grad_accum)
        batch = trainer.place_batch(arrays, 1)
        if not constraints:  # the activation constraints of the lowered step (Shardy's, as jax lowers today)
            text = trainer.step_fn.lower(state, trainer.frozen, batch).as_text()
            constraints = [line.split("<@", 1)[1] for line in text.splitlines() if "sdy.sharding_constraint" in line]
        state, metrics = trainer.step_fn(state, trainer.frozen, batch)
        losses.append(float(metrics["loss"]))
    layer = trainer.frozen["model"]["layers"]["layer"]["mlp"]["up_proj"]  # stacked [L, in, out]
    placement = {"base_up_proj": str(layer["kernel"].get_value().sharding.spec),
                 "lora_a": str(jax.tree.leaves(state.params)[0].sharding.spec), "constraints": constraints}
    return losses, placement


if __name__ == "__main__":  # python tests/train_helpers.py -> {"single": [...], "sharded": [...]}
    import jax

    single, _ = run((1, 1, 1))
    sharded, placement = run((2, 2, 2))
    print(json.dumps({"devices": len(jax.devices()), "single": single, "sharded": sharded, "placement": placement}))
    sys.exit(0)
