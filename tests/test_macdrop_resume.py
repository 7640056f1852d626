"""experiments.macdrop killed (SIGKILL) inside a checkpoint save, between checkpoints and while exporting, then
relaunched each time: the same metrics.jsonl (each step once), adapters and results as an uninterrupted run.
Relaunching a finished run reports it; a changed config is refused unless resumed or overwritten explicitly."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ml_collections import ConfigDict

from mwjax.experiments.configs import smollm2_135m
from mwjax.finetune import job, run_log

ROOT = Path(__file__).parent
TIMINGS = run_log.TIMINGS  # differ from run to run


def command(model: Path, output_dir: Path, *extra: str, kill_at: str | None = None) -> list[str]:
    """8 MacDrop steps of 2 micro-batches, checkpoints every 2 steps, evaluations at 0, 4 and 8."""
    prefix = [sys.executable, str(ROOT / "kill_at.py"), kill_at, "--"] if kill_at else [sys.executable, "-m",
                                                                                          "experiments.macdrop"]
    return [*prefix, "--config=smollm2_135m", f"--config.model={model}", f"--config.output_dir={output_dir}",
            "--config.massive.layer=1", "--config.massive.indices=(3,9,27,81,90)", "--config.train.max_steps=8",
            "--config.train.micro_batch_size=4", "--config.train.grad_accum=2", "--config.train.save_every=2",
            "--config.train.eval_every=4", "--config.data.num_synthetic=100", "--config.data.val_size=8", *extra]


def launch(cmd: list[str], killed: bool = False) -> subprocess.CompletedProcess:
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT.parent)
    expected = -9 if killed else 0
    assert run.returncode == expected, f"exit {run.returncode}, expected {expected}:\n{run.stderr[-3000:]}"
    return run


def metrics(output_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
            for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def adapters(output_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(output_dir / "adapter_peft" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_smol_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    launch(command(tiny_smol_dir, out))
    return out


@pytest.mark.slow
def test_killed_three_times_the_run_ends_as_an_uninterrupted_one(tiny_smol_dir, uninterrupted, tmp_path):
    out = tmp_path / "run"
    launch(command(tiny_smol_dir, out, kill_at="save:4"), killed=True)
    assert job.train.Checkpoints.latest_in(out / "checkpoints") == 2  # step 4's save never committed
    assert [m["step"] for m in metrics(out)] == [0, 1, 2, 3, 4]
    launch(command(tiny_smol_dir, out, kill_at="step:4"), killed=True)  # resumed at 2: dies starting step 6
    assert job.train.Checkpoints.latest_in(out / "checkpoints") == 4
    assert [m["step"] for m in metrics(out)] == [0, 1, 2, 3, 4, 5]
    launch(command(tiny_smol_dir, out, kill_at="export"), killed=True)
    assert (out / "adapter").is_dir() and not (out / "results.json").exists()
    launch(command(tiny_smol_dir, out))

    assert metrics(out) == metrics(uninterrupted)  # every step once, the same numbers
    assert [m["step"] for m in metrics(out)] == list(range(9))
    ours, reference = adapters(out), adapters(uninterrupted)
    assert ours.keys() == reference.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], reference[key], err_msg=key)
    assert json.loads((out / "results.json").read_text()) | {"adapter": "", "adapter_peft": ""} == json.loads(
        (uninterrupted / "results.json").read_text()) | {"adapter": "", "adapter_peft": ""}
    print("killed inside the save of checkpoint 4, as step 6 began and while exporting the adapter; relaunched "
          "each time: metrics.jsonl, adapters and results.json equal the uninterrupted run's")


@pytest.mark.slow
def test_a_finished_run_is_reported_and_a_changed_config_refused(tiny_smol_dir, uninterrupted, tmp_path):
    finished = launch(command(tiny_smol_dir, uninterrupted))
    assert "fine-tuning" not in finished.stderr and "validation loss: before" in finished.stdout
    refused = subprocess.run(command(tiny_smol_dir, uninterrupted, "--config.train.learning_rate=0.01"),
                             capture_output=True, text=True, timeout=600, cwd=ROOT.parent)
    assert refused.returncode != 0
    assert ("holds a run (checkpoint step 8, finished) with another config: train.learning_rate: 0.001 -> 0.01. "
            "Pass --config.resume=True") in refused.stderr
    assert json.loads((uninterrupted / "config.json").read_text())["train"]["learning_rate"] == 0.001


def config(output_dir: Path, **fields) -> ConfigDict:
    """The SmolLM2 config writing to output_dir, with `section__field=value` (or `field=value`) changes."""
    c = smollm2_135m.get_config()
    c.output_dir = str(output_dir)
    for dotted, value in fields.items():
        section, _, name = dotted.partition("__")
        if name:
            c[section][name] = value
        else:
            c[section] = value
    return c


def test_output_dir_rules(tmp_path):
    out = tmp_path / "run"
    assert job.prepare_output_dir(config(out), out, out / "checkpoints") is None  # fresh: config.json written
    assert json.loads((out / "config.json").read_text())["train"]["learning_rate"] == 0.001
    # nothing checkpointed yet: a changed config simply starts over
    assert job.prepare_output_dir(config(out, train__learning_rate=0.01), out, out / "checkpoints") is None
    (out / "checkpoints" / "4").mkdir(parents=True)  # stands for a committed checkpoint
    with pytest.raises(ValueError, match=r"checkpoint step 4\) with another config: train.learning_rate: 0.01 -> "
                                         r"0.002; train.seed: 42 -> 1\. Pass --config.resume=True"):
        job.prepare_output_dir(config(out, train__learning_rate=0.002, train__seed=1), out, out / "checkpoints")
    resumed = config(out, train__learning_rate=0.002, resume=True)
    assert job.prepare_output_dir(resumed, out, out / "checkpoints") is None
    assert json.loads((out / "config.step4.json").read_text())["train"]["learning_rate"] == 0.01  # kept
    (out / "results.json").write_text('{"done": true}')
    assert job.prepare_output_dir(config(out, train__learning_rate=0.002), out, out / "checkpoints") == {
        "done": True}
    (out / "metrics.jsonl").write_text("{}\n")
    assert job.prepare_output_dir(config(out, overwrite_output_dir=True), out, out / "checkpoints") is None
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "config.step4.json"]
    with pytest.raises(ValueError, match="exclude each other"):
        job.prepare_output_dir(config(out, resume=True, overwrite_output_dir=True), out, out / "checkpoints")


def test_unwritable_output_dir_fails_before_the_model_loads(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr("mwjax.converters.load", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match="cannot write to output_dir .*file/run"):
        job.run(config(blocker / "run"))


def test_bad_data_file_fails_before_the_model_loads(tmp_path, monkeypatch):
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a" "output": "b"}\n')
    monkeypatch.setattr("mwjax.converters.load", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match="data.jsonl, line 2 column 21: not JSON \\(Expecting ','"):
        job.run(config(tmp_path / "run", data__source=str(data)))
