"""mwjax.core.distributed: the guards that make a multi-process run fail instead of hanging."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from mwjax.core import distributed

ROOT = Path(__file__).parent.parent


def test_collective_timeout_is_added_once_and_the_users_own_wins():
    flags = distributed.with_collective_timeout("--xla_force_host_platform_device_count=4", 30)
    assert flags == "--xla_force_host_platform_device_count=4 --xla_cpu_collective_timeout_seconds=30"
    assert distributed.with_collective_timeout(flags, 600) == flags
    assert distributed.collective_timeout_s(flags) == 30
    assert distributed.with_collective_timeout("", 5) == "--xla_cpu_collective_timeout_seconds=5"
    assert distributed.collective_timeout_s("--xla_force_host_platform_device_count=4") is None


def test_cluster_kind_reads_each_launcher():
    assert distributed.cluster_kind({}) is None
    assert distributed.cluster_kind({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}) == "explicit"
    assert distributed.cluster_kind({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1"}) is None
    assert distributed.cluster_kind({"SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"}) == "slurm"
    assert distributed.cluster_kind({"SLURM_NTASKS": "4"}) is None  # the sbatch script itself, not an srun task
    assert distributed.cluster_kind({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"


@pytest.mark.multiprocess
def test_a_collective_that_never_completes_fails_with_a_clear_error(tmp_path):
    """Process 1 never joins process 0's all-reduce: process 0 fails after the timeout, naming it and saying how
    to resume, and the compilation cache is off in both processes (the cause of the jax 0.12 relaunch hang). The
    timeout (20 s) leaves room for one process to reach the first collective late on a loaded CI machine."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla")}
    start = time.time()
    script = str(ROOT / "tests" / "stuck_collective.py")
    run = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), "--num_processes=2", "--cpu_devices=1",
                          f"--log_dir={tmp_path / 'logs'}", "--", sys.executable, script, "20"],
                         env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    elapsed = time.time() - start
    out = run.stdout + run.stderr
    assert run.returncode != 0, out[-3000:]
    assert "first sum 2.0" in out and "second sum 4.0" not in out, out[-3000:]
    assert "a cross-process collective timed out (--xla_cpu_collective_timeout_seconds=20)" in out, out[-3000:]
    assert "relaunch the same command to resume" in out
    assert "cache None" in out and "cache None" in (tmp_path / "logs" / "process_1.log").read_text()
    assert elapsed < 180, f"took {elapsed:.0f} s"
