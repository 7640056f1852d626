"""The trainer: exact resume, gradient accumulation, NaN stop, and 8 fake devices against 1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from train_helpers import ArrayLoader, tiny_setup

from mwjax import macdrop, peft
from mwjax.core import sharding
from mwjax.finetune import train


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
    assert [h["step"] for h in second.history] == [1, 2, 3, 4, 5, 6]  # steps 1-3 read back from metrics.jsonl
    for a, b in zip(leaves(whole.state), leaves(second.state), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal([h["loss"] for h in whole.history], [h["loss"] for h in second.history])
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]


class Killed(Exception):
    pass


class DyingLoader(ArrayLoader):
    """Raises after yielding `die_after` micro-batches in this process: a crash between two checkpoints."""

    def __init__(self, *args, die_after: int):
        super().__init__(*args)
        self.left = die_after

    def epoch(self, epoch, start_step=0):
        for batch in super().epoch(epoch, start_step):
            if self.left == 0:
                raise Killed
            self.left -= 1
            yield batch


def test_a_crash_between_checkpoints_logs_each_step_once(tmp_path):
    steps = 6
    whole = train.fit(make_trainer(steps), ArrayLoader(24, 4, 16), output_dir=tmp_path / "whole")
    with pytest.raises(Killed):  # steps 1-3 logged, checkpoint at 2 (save_every=2), dies in step 4
        train.fit(make_trainer(steps), DyingLoader(24, 4, 16, die_after=7), output_dir=tmp_path / "cut")
    with (tmp_path / "cut" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss": 0.')  # and a line torn by the kill
    resumed = train.fit(make_trainer(steps), ArrayLoader(24, 4, 16), output_dir=tmp_path / "cut")
    logged = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal([m["loss"] for m in logged], [h["loss"] for h in whole.history])
    for a, b in zip(leaves(whole.state), leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(a, b)


def tensorboard_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the TensorBoard event files under `directory` (TFRecord framing: length,
    its crc, the Event proto, its crc), read with tensorboardX's compiled protos."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in sorted(Path(directory).rglob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_loss_falls_and_eval_runs(tmp_path, capsys):
    loader = ArrayLoader(8, 4, 16)  # the same 8 rows again and again: the adapters can memorise them
    trainer = make_trainer(12, max_steps=12, learning_rate=2e-2, eval_every=6)
    result = train.fit(trainer, loader, ArrayLoader(8, 4, 16), output_dir=tmp_path)
    # off a terminal (here: captured) a line per logged step, and TensorBoard events beside metrics.jsonl
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert len(lines) == 12 and lines[-1].startswith("step 12/12 | loss ") and " tok/s | eval_loss " in lines[-1]
    assert "ETA" in lines[0]
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 13))
    assert [s for s, _ in scalars["eval/loss"]] == [6, 12]
    assert scalars["train/loss"][-1][1] == pytest.approx(result.history[-1]["loss"], rel=1e-6)
    assert result.history[0]["input_tokens_per_s"] > result.history[0]["tokens_per_s"]  # the prompt counts too
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] - 0.3
    assert [s for s, _ in result.eval_losses] == [6, 12] and result.eval_losses[1][1] < result.eval_losses[0][1]
    assert result.history[0]["p"] == pytest.approx(0.8 * 11 / 12) and result.history[-1]["p"] == 0.0  # t = 1..T


def test_the_trainer_leaves_the_given_model_as_it_was():
    model, tc, _, _ = tiny_setup(max_steps=1, remat="full")
    with_dropout = peft.add_adapters(peft.merge(model), peft.LoraConfig(rank=4, alpha=8.0, dropout=0.1), seed=2)
    for given, mode in ((model, "eval"), (with_dropout, "train")):
        given.remat = "dots"  # what the caller chose, not the run's "full"
        getattr(given, mode)()
        before = nnx.graphdef(given)
        train.Trainer(given, tc, steps=1, mesh=sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
        assert given.remat == "dots" and nnx.graphdef(given) == before  # remat and train/eval flags untouched


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


def test_divergence_deletes_the_poisoned_checkpoint_and_resumes_from_the_good_one(tmp_path):
    # warmup makes step 1's learning rate 0; step 2's update puts the adapters near 1e37: finite, so the state
    # is saved, but the next forward overflows. That checkpoint is deleted; step 1's is named and works.
    crazy = dict(max_steps=8, learning_rate=1e37, warmup_ratio=0.1, save_every=1, keep_checkpoints=3)
    with pytest.raises(train.TrainingDivergedError, match="diverged at step 3: loss=.*last good checkpoint is step "
                                                           "1 in .*lower the learning rate and resume"):
        train.fit(make_trainer(8, **crazy), ArrayLoader(16, 4, 16), output_dir=tmp_path)
    assert train.Checkpoints.latest_in(tmp_path / "checkpoints") == 1
    sane = make_trainer(8, **crazy | {"learning_rate": 1e-3})
    result = train.fit(sane, ArrayLoader(16, 4, 16), output_dir=tmp_path)
    assert [h["step"] for h in result.history] == list(range(1, 9))
    assert all(np.all(np.isfinite(x)) for x in leaves(result.state))


def test_divergence_guard_stops_a_blown_up_run(tmp_path):
    # lr 1e4 (after a warmup step at lr 0): one update saturates the softmax, the loss sits at ln(vocab) and the
    # gradient is exactly 0 from step 3 on; the states after step 1 are distrusted
    trainer = make_trainer(10, max_steps=10, learning_rate=1e4, warmup_ratio=0.1, save_every=1, keep_checkpoints=5)
    with pytest.raises(train.TrainingDivergedError, match="diverged at step 5: the gradient norm has been exactly 0 "
                                                          "for 3 steps .* last good checkpoint is step 1 in"):
        train.fit(trainer, ArrayLoader(16, 4, 16), output_dir=tmp_path)


def test_divergence_guard_rules():
    guard = train.DivergenceGuard(factor=4.0, zero_steps=3)
    step = lambda n, loss, grad=1.0, tokens=10: guard({"step": n, "loss": loss, "grad_norm": grad, "tokens": tokens})
    assert all(step(n, 2.0 - 0.01 * n) is None for n in range(1, 30))  # a falling loss
    assert step(30, 50.0, tokens=0) is None  # a padding-only step is not counted
    assert step(30, 8.0) is None  # one bad batch moves the average by a tenth
    restored = train.DivergenceGuard(4.0, 3, json.loads(json.dumps(guard.state())))
    assert restored.state() == guard.state()
    messages = [step(n, 40.0) for n in range(31, 40)]
    first = next(m for m in messages if m)
    assert messages[0] is None and "exceeds divergence_factor=4 x its lowest value 1.7" in first[0]
    assert first[1] == 31 + messages.index(first) - 1  # the state that gave the tripping loss
    zeros = train.DivergenceGuard(factor=0.0, zero_steps=3)
    assert [zeros({"step": n, "loss": 1.0, "grad_norm": 0.0, "tokens": 5}) for n in (1, 2)] == [None, None]
    assert zeros({"step": 3, "loss": 1.0, "grad_norm": 0.0, "tokens": 5})[1] == 0  # from the initial state on


@pytest.mark.parametrize("lr", [float("inf"), float("nan"), 0.0, -1e-4, 1e39])  # 1e39 overflows float32
def test_unusable_learning_rates_are_refused_up_front(lr):
    with pytest.raises(ValueError, match="learning_rate must be a finite number > 0"):
        train.TrainConfig(learning_rate=lr)


def test_bad_train_configs():
    with pytest.raises(ValueError, match="unknown learning-rate decay 'step'"):
        train.TrainConfig(decay="step")
    with pytest.raises(ValueError, match="mask_every must be"):
        train.TrainConfig(mask_every="epoch")
    with pytest.raises(ValueError, match=r"warmup_ratio must lie in \[0, 1\)"):
        train.TrainConfig(warmup_ratio=1.5)
    with pytest.raises(ValueError, match="divergence_factor must be a finite number > 1"):
        train.TrainConfig(divergence_factor=0.5)


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
    constraints = result["placement"].pop("constraints")
    assert result["placement"] == {"base_up_proj": "P(None, 'fsdp', 'tensor')", "lora_a": "P()"}
    # the residual stream [b, t, d] after the embedding and after the scanned layer: rows over data x fsdp, the rest
    # whole (`sharding.constrain`), in the lowered step and its gradient
    assert len(constraints) >= 2 and all(c.startswith('mesh, [{"data", "fsdp"}, {}, {}]>') for c in constraints), \
        constraints
    print(f"single-device losses {result['single']}\n8-device (2x2x2 mesh) losses {result['sharded']}")


def test_a_step_past_the_end_of_the_data_is_filled_with_empty_micro_batches():
    """A fractional last epoch (2 batches an epoch, 4.25 epochs = 8 micro-batches, grad_accum 4: a third step of
    nothing but filler) read from a resume at that step: the filler takes the real batches' shapes, contributes no
    label, and needs no micro-batch seen before it (it did: a resume there crashed)."""
    loader = ArrayLoader(8, 4, 24)
    full = train.stack_step(train.micro_batches(loader, 0, 4.25), 4)
    resumed = train.stack_step(train.micro_batches(loader, 8, 4.25), 4)
    assert {k: v.shape for k, v in resumed.items()} == {k: v.shape for k, v in full.items()}
    assert (resumed["labels"] == -100).all() and (full["labels"] != -100).any()
    assert (resumed["tokens"] == 0).all() and (resumed["segment_ids"] == 0).all()
    halfway = train.stack_step(train.micro_batches(loader, 6, 4.25), 4)  # 2 real micro-batches, then filler
    assert (halfway["labels"][:2] != -100).any() and (halfway["labels"][2:] == -100).all()


def run_steps(trainer, steps: int):
    state, losses = trainer.initial_state, []
    stream = train.micro_batches(ArrayLoader(32, 4, 24), 0, 1e9)
    for _ in range(steps):
        arrays = train.stack_step(stream, trainer.config.grad_accum)
        state, metrics = trainer.step_fn(state, trainer.frozen, trainer.place_batch(arrays, 1))
        losses.append(float(metrics["loss"]))
    return state, losses


def test_scanned_layers_train_as_the_unrolled_ones():
    """Three MacDrop steps with remat: the same losses, and the trained model comes back with its layers unrolled."""
    trainers = {scan: make_trainer(3, max_steps=3, remat="full", scan_layers=scan) for scan in (False, True)}
    runs = {scan: run_steps(trainer, 3) for scan, trainer in trainers.items()}
    np.testing.assert_allclose(runs[True][1], runs[False][1], rtol=1e-5)
    unrolled, scanned = (trainers[s].model(runs[s][0]) for s in (False, True))
    assert len(scanned.model.layers) == 2
    for a, b in zip(jax.tree.leaves(nnx.state(scanned, peft.LoRAParam)),
                    jax.tree.leaves(nnx.state(unrolled, peft.LoRAParam)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def rng_counts(rngs) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(rngs) if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]


def test_lora_dropout_draws_new_masks_every_step_under_remat():
    """Each layer's dropout stream advances through the scanned, rematerialised step (the state carries it)."""
    model, tc, _, _ = tiny_setup(max_steps=2, remat="full")
    with_dropout = peft.add_adapters(peft.merge(model), peft.LoraConfig(rank=4, alpha=8.0, dropout=0.3), seed=2)
    trainer = train.Trainer(with_dropout, tc, steps=2, mesh=sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    initial = rng_counts(trainer.initial_state.rngs)  # (the step donates the state it is given)
    state, _ = run_steps(trainer, 1)
    counts = rng_counts(state.rngs)
    assert counts and all(np.all(c > i) for c, i in zip(counts, initial, strict=True))
