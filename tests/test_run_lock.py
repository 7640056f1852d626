"""One run per output directory (mwjax.core.run_lock), and an experiment's results published as one atomic output."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from mwjax.core import run_lock
from mwjax.experiments import common
from mwjax.experiments.configs import smollm2_135m
from mwjax.finetune import job

HOLDER = textwrap.dedent("""
    import sys, time
    from mwjax.core import run_lock
    with run_lock.hold(sys.argv[1], what="test run"):
        print("held", flush=True)
        time.sleep(600)
""")


@pytest.fixture
def held(tmp_path):
    """Another process holding tmp_path/run's lock: (its Popen, the directory)."""
    directory = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    yield child, directory
    child.kill()
    child.wait()


def test_a_second_run_is_refused_naming_the_first(held):
    child, directory = held
    with pytest.raises(run_lock.DirectoryLockedError, match=rf"{directory} is in use by another run \(test run, pid "
                                                            rf"{child.pid} on .*, started \d{{4}}-\d\d-\d\dT"):
        with run_lock.hold(directory, what="macdrop run"):
            pass


def test_the_lock_of_a_dead_run_is_taken_over_with_a_message(held, caplog):
    child, directory = held
    child.send_signal(signal.SIGKILL)  # a preemption: the kernel drops its lock, its record stays
    child.wait()
    with caplog.at_level(logging.WARNING, logger="mwjax.core.run_lock"), run_lock.hold(directory, what="test run"):
        record = json.loads(run_lock.lock_path(directory).read_text())
        assert record["pid"] == os.getpid()
    assert f"taking over the lock of a run that is no longer running (test run, pid {child.pid}" in caplog.text
    assert json.loads(run_lock.lock_path(directory).read_text()) == {}  # released cleanly: nothing to take over


def test_one_process_cannot_hold_a_directory_twice(tmp_path):
    with run_lock.hold(tmp_path / "run"):
        with pytest.raises(run_lock.DirectoryLockedError, match=f"pid {os.getpid()}"):
            with run_lock.hold(tmp_path / "run"):
                pass
    with run_lock.hold(tmp_path / "run"):  # released
        pass


def test_macdrop_refuses_a_held_output_dir_before_touching_it(held, monkeypatch):
    child, directory = held
    monkeypatch.setattr("mwjax.converters.load", lambda *a, **k: pytest.fail("loaded a model"))
    config = smollm2_135m.get_config()
    config.output_dir = str(directory)
    with pytest.raises(run_lock.DirectoryLockedError, match=rf"in use by another run \(test run, pid {child.pid} .*so "
                                                            "this experiments.macdrop run cannot use it"):
        job.run(config)
    assert not directory.exists()  # no config.json written, nothing adopted


def test_a_link_to_a_held_directory_is_the_held_directory(held, tmp_path):
    _, directory = held
    (tmp_path / "link").symlink_to(directory, target_is_directory=True)
    with pytest.raises(run_lock.DirectoryLockedError, match="test run"):
        with run_lock.hold(tmp_path / "link"):
            pass


@pytest.mark.parametrize("inside", [False, True])
def test_macdrop_refuses_a_checkpoint_dir_another_run_holds(held, tmp_path, monkeypatch, inside):
    """Two runs with different output_dirs and one checkpoint_dir would adopt each other's steps: the other run's
    checkpoint_dir, or its output_dir's default checkpoints/ inside it."""
    child, directory = held
    monkeypatch.setattr("mwjax.converters.load", lambda *a, **k: pytest.fail("loaded a model"))
    config = smollm2_135m.get_config()
    config.output_dir = str(tmp_path / "other")
    config.checkpoint_dir = str(directory / "checkpoints" if inside else directory)
    with pytest.raises(run_lock.DirectoryLockedError, match=rf"{'lies inside .* ' if inside else ''}in use by another "
                                                            rf"run \(test run, pid {child.pid}"):
        job.run(config)
    assert not (tmp_path / "other").exists()


def test_results_are_published_whole_keeping_other_experiments_files(tmp_path):
    out = tmp_path / "outputs"
    first = common.stage(out, "attacks")
    for name in ("attacks.json", "k_sweep.png", "k_sweep_zeroshot.png"):
        (first / name).write_text("old")
    assert not out.exists()  # nothing visible before the run publishes
    common.publish(first)
    (out / "notes.txt").write_text("mine")  # not mwjax's: kept
    probe = common.stage(out, "probe")
    (probe / "probe.json").write_text("probe")
    common.publish(probe)

    again = common.stage(out, "attacks")
    for name in ("attacks.json", "k_sweep.png"):
        (again / name).write_text("new")
    assert (out / "attacks.json").read_text() == "old"  # the old results stay whole until the new ones are complete
    assert common.publish(again) == out.absolute()
    assert sorted(os.listdir(out)) == [common.MANIFEST, "attacks.json", "k_sweep.png", "notes.txt", "probe.json"]
    assert (out / "attacks.json").read_text() == "new"  # and k_sweep_zeroshot.png of the earlier run is gone
    assert json.loads((out / common.MANIFEST).read_text()) == {"attacks": ["attacks.json", "k_sweep.png"],
                                                               "probe": ["probe.json"]}
    assert sorted(os.listdir(tmp_path)) == [".outputs.lock", "outputs"]


def test_a_run_that_fails_leaves_the_previous_results(tmp_path):
    out = tmp_path / "outputs"
    done = common.stage(out, "zeroshot")
    (done / "zeroshot.json").write_text("old")
    common.publish(done)
    failed = common.stage(out, "zeroshot")
    (failed / "zeroshot.json").write_text("half")
    with pytest.raises(SystemExit, match=r"in use by another run \(experiments.zeroshot run, pid"):
        common.stage(out, "zeroshot")  # one run per output directory, in-process too
    common._STAGED.pop(failed)[2].close()  # what the end of the failed process does
    assert sorted(os.listdir(out)) == [common.MANIFEST, "zeroshot.json"]
    assert (out / "zeroshot.json").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == [".outputs.lock", "outputs"]


def test_an_output_dir_holding_the_working_directory_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="holds the current directory"):
        common.stage(tmp_path, "attacks")
