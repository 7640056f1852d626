"""The trainer: exact resume, gradient accumulation, NaN stop, and 8 fake devices against 1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from train_helpers import ArrayLoader, tiny_setup

from mwjax import macdrop, sharding, train


def make_trainer(steps, **kwargs):
    model, tc, mw, scope = tiny_setup(**kwargs)
    md = macdrop.MacDrop.from_massive_weights(mw, 5, 64, 128, macdrop.curriculum("step", 0.8, total_steps=steps),
                                              scope=scope)
    return train.Trainer(model, tc, steps=steps, mesh=sharding.make_mesh(), macdrop=md)


def leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


@pytest.mark.parametrize("dora, mask_every", [(False, "step"), (True, "microbatch")])
def test_interrupted_and_resumed_run_ends_with_the_same_adapters(tmp_path, dora, mask_every):
    loader = ArrayLoader(24, 4, 16)  # 6 micro-batches per epoch, 2 epochs, accumulation 2 -> 6 steps
    steps = train.total_steps(tiny_setup()[1], len(loader))
    assert steps == 6
    whole = train.fit(make_trainer(steps, dora=dora, mask_every=mask_every), loader, output_dir=tmp_path / "whole")
    first = train.fit(make_trainer(steps, dora=dora, mask_every=mask_every), loader, output_dir=tmp_path / "cut",
                      stop_after=3)  # 3 steps: mid-epoch, between two checkpoints
    assert len(first.history) == 3
    second = train.fit(make_trainer(steps, dora=dora, mask_every=mask_every), loader, output_dir=tmp_path / "cut")
    assert [h["step"] for h in second.history] == [4, 5, 6]
    for a, b in zip(leaves(whole.state), leaves(second.state), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal([h["loss"] for h in whole.history[3:]], [h["loss"] for h in second.history])
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]


def test_loss_falls_and_eval_runs(tmp_path):
    loader = ArrayLoader(8, 4, 16)  # the same 8 rows again and again: the adapters can memorise them
    trainer = make_trainer(12, max_steps=12, learning_rate=2e-2, eval_every=6)
    result = train.fit(trainer, loader, ArrayLoader(8, 4, 16), output_dir=tmp_path)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] - 0.3
    assert [s for s, _ in result.eval_losses] == [6, 12] and result.eval_losses[1][1] < result.eval_losses[0][1]
    assert result.history[0]["p"] == pytest.approx(0.8) and result.history[-1]["p"] < 0.1


def test_accumulation_equals_one_big_batch():
    big = make_trainer(1, micro_batch_size=8, grad_accum=1, max_steps=1)
    small = make_trainer(1, micro_batch_size=4, grad_accum=2, max_steps=1)
    rows = next(ArrayLoader(8, 8, 16).epoch(0))
    batch_big = {k: rows[k][None] for k in train.BATCH_KEYS}
    batch_small = {k: rows[k].reshape(2, 4, -1) for k in train.BATCH_KEYS}
    a, ma = big.step_fn(big.initial_state, big.frozen, big.place_batch(batch_big, 1))
    b, mb = small.step_fn(small.initial_state, small.frozen, small.place_batch(batch_small, 1))
    np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-6)
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7)


def test_divergence_stops_with_the_last_good_checkpoint(tmp_path):
    trainer = make_trainer(20, max_steps=20, learning_rate=1e12, max_grad_norm=1e30, warmup_ratio=0.0,
                           save_every=1)
    with pytest.raises(train.TrainingDivergedError, match="non-finite loss or gradient at step .* last good "
                                                           "checkpoint is step"):
        train.fit(trainer, ArrayLoader(16, 4, 16), output_dir=tmp_path)
    checkpoints = train.Checkpoints(tmp_path / "checkpoints", 2)
    restored, meta = checkpoints.restore(make_trainer(20, max_steps=20).initial_state)
    assert all(np.all(np.isfinite(x)) for x in leaves(restored)) and meta["step"] == int(restored.step)


def test_bad_train_configs():
    with pytest.raises(ValueError, match="unknown learning-rate decay 'step'"):
        train.TrainConfig(decay="step")
    with pytest.raises(ValueError, match="mask_every must be"):
        train.TrainConfig(mask_every="epoch")
    with pytest.raises(ValueError, match=r"warmup_ratio must lie in \[0, 1\)"):
        train.TrainConfig(warmup_ratio=1.5)


def test_lr_schedule_is_hf_like():
    tc = train.TrainConfig(learning_rate=1e-4, warmup_ratio=0.1)
    schedule = train.lr_schedule(tc, 100)
    assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(1e-4)
    assert float(schedule(55)) == pytest.approx(0.5e-4, rel=1e-4)  # half-way through the cosine
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-12)
    linear = train.lr_schedule(train.TrainConfig(learning_rate=1e-4, warmup_ratio=0.1, decay="linear"), 100)
    assert float(linear(55)) == pytest.approx(0.5e-4, rel=1e-4)


def test_eight_devices_give_the_losses_of_one():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    script = Path(__file__).parent / "train_helpers.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    np.testing.assert_allclose(result["sharded"], result["single"], rtol=2e-5)
    # the frozen base is split FSDP x tensor, the adapters replicated
    assert result["placement"] == {"base_up_proj": "P('fsdp', 'tensor')", "lora_a": "P()"}
    print(f"single-device losses {result['single']}\n8-device (2x2x2 mesh) losses {result['sharded']}")
