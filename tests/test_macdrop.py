"""MacDrop: curricula values, mask statistics, scopes, purity, and refusals of bad settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mwjax import macdrop
from mwjax.finetune import data, train
from mwjax.research.massive import MassiveWeights

MW = MassiveWeights(layer=2, indices=(7, 3, 90, 12, 40, 5), values=(1.0,) * 6, median=0.1, token_id=1)


def test_curricula_values():
    step = macdrop.curriculum("step", 0.8, total_steps=100)  # called with the 0-based step s; t = s + 1
    assert float(step(0)) == pytest.approx(0.8 * 0.99) and float(step(49)) == pytest.approx(0.4)
    assert float(step(99)) == 0.0  # the last step of the run (t = T) has p = 0
    before = macdrop.curriculum("epoch_before", 0.8, steps_per_epoch=10, epochs=4)
    after = macdrop.curriculum("epoch_after", 0.8, steps_per_epoch=10, epochs=4)
    # epoch e = 1 for steps 0..9, 2 for 10..19, ...
    assert [round(float(before(t)), 6) for t in (0, 9, 10, 35)] == [0.8, 0.8, 0.6, 0.2]
    assert [round(float(after(t)), 6) for t in (0, 9, 10, 35)] == [0.6, 0.6, 0.4, 0.0]
    exp = macdrop.curriculum("exp", 0.8, alpha=0.05)
    assert float(exp(19)) == pytest.approx(0.8 * np.exp(-1.0), rel=1e-6)
    assert float(macdrop.curriculum("constant", 0.3)(1000)) == pytest.approx(0.3)
    # jittable
    assert float(jax.jit(step)(jnp.int32(24))) == pytest.approx(0.6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="step", p0=1.2, total_steps=10), r"p0 must lie in \[0, 1\]"),
    (dict(name="step", p0=-0.1, total_steps=10), r"p0 must lie in \[0, 1\]"),
    (dict(name="cosine", p0=0.5), "unknown MacDrop curriculum 'cosine'"),
    (dict(name="step", p0=0.5), "needs total_steps"),
    (dict(name="epoch_after", p0=0.5), "needs steps_per_epoch and epochs"),
])
def test_bad_curricula(kwargs, message):
    with pytest.raises(ValueError, match=message):
        macdrop.curriculum(kwargs.pop("name"), kwargs.pop("p0"), **kwargs)


def make(scope="massive", p=0.3, k=5):
    return macdrop.MacDrop.from_massive_weights(MW, k, d_model=512, d_ff=128, schedule=macdrop.curriculum(
        "constant", p), scope=scope)


def test_mask_statistics_and_purity():
    md = make(p=0.3)
    state = md.init(jax.random.key(0))
    masks_a = md.masks(state, 0)
    masks_b = md.masks(state, 0)
    np.testing.assert_array_equal(masks_a[2].values, masks_b[2].values)  # a pure function of the state
    assert masks_a[2].rows.tolist() == [7, 3, 90, 12, 40]
    values = np.asarray(masks_a[2].values)
    assert set(np.unique(values)) <= {0.0, 1.0}  # no 1/(1-p) rescaling
    drops = []
    for _ in range(20):
        drops.append(1 - np.asarray(md.masks(state, 0)[2].values).mean())
        state = md.advance(state)
    assert np.mean(drops) == pytest.approx(0.3, abs=0.02)  # empirical drop rate ~ p
    assert not np.array_equal(values, np.asarray(md.masks(state, 0)[2].values))


def test_probability_follows_the_schedule_in_jit():
    md = macdrop.MacDrop.from_massive_weights(MW, 5, 256, 128, macdrop.curriculum("step", 0.8, total_steps=10))
    state = md.init(jax.random.key(1))
    dropped = jax.jit(lambda t: jnp.sum(md.masks(state, t)[2].values == 0))
    assert int(dropped(0)) / (5 * 256) == pytest.approx(0.72, abs=0.05)  # step 0 is t = 1: p = 0.8 (1 - 1/10)
    assert int(dropped(9)) == 0  # the run's last step (t = T): p = 0, nothing dropped


def test_scopes():
    assert make("massive").rows == (7, 3, 90, 12, 40)
    assert make("all").rows == tuple(range(128))
    rest = make("all_but_massive").rows
    assert len(rest) == 123 and not set(rest) & {7, 3, 90, 12, 40}
    with pytest.raises(ValueError, match="unknown MacDrop scope 'some'"):
        make("some")


def test_k_checks():
    with pytest.raises(ValueError, match=r"k=7 must lie in \[1, 6\]"):
        make(k=7)
    with pytest.raises(ValueError, match=r"must lie in \[1, 6\]"):
        make(k=0)
    with pytest.raises(ValueError, match=r"lie outside \[0, d_ff=64\)"):
        macdrop.MacDrop(layer=0, indices=(70,), d_model=8, d_ff=64, schedule=macdrop.curriculum("constant", 0.5))


def test_total_steps_matches_the_paper():
    # Table 5: alpaca_gpt4_en (52,002 examples), 5% validation, 256 sequences per optimizer step, 3 epochs = 579
    rows = 52002 - data.validation_size(0.05, 52002)  # 49,401 (LLaMA-Factory takes the validation rows by ceil)
    config = train.TrainConfig(epochs=3, micro_batch_size=64, grad_accum=4)
    assert train.total_steps(config, batches_per_epoch=rows // 64) == 579
