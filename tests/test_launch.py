"""launch/: two cooperating processes on loopback train exactly as one process with all the devices, resume
exactly after being killed, and the TPU / SLURM launchers issue the commands a cluster needs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parent.parent
LOCAL = str(ROOT / "launch" / "local.sh")
STEPS = 8


@pytest.fixture(scope="module")
def tiny_dir(tiny_smol_dir):
    return tiny_smol_dir


def experiment(model: Path, output_dir: Path) -> list[str]:
    """A few MacDrop steps: 8 sequences per micro-batch over 8 devices (one each), 2 micro-batches per step."""
    return [sys.executable, "-m", "experiments.macdrop", "--config=smollm2_135m", f"--config.model={model}",
            f"--config.output_dir={output_dir}", "--config.massive.layer=1", "--config.massive.indices=(3,9,27,81,90)",
            f"--config.train.max_steps={STEPS}", "--config.train.micro_batch_size=8", "--config.train.grad_accum=2",
            "--config.train.save_every=2", "--config.train.eval_every=4", "--config.data.num_synthetic=200",
            "--config.data.val_size=16", "--config.mesh.fsdp=4", "--config.mesh.data=2"]


def cpu_env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    return env | {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}


def two_processes(model: Path, output_dir: Path) -> list[str]:
    return [LOCAL, "--num_processes=2", "--cpu_devices=4", f"--log_dir={output_dir}_logs", "--",
            *experiment(model, output_dir)]


def check(run: subprocess.CompletedProcess):
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def losses(output_dir: Path) -> dict[int, float]:
    """step -> training loss (metrics.jsonl holds each step once, after any number of kills; step 0 has no loss)."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert len({m["step"] for m in records}) == len(records), "a step logged twice"
    return {m["step"]: m["loss"] for m in records if "loss" in m}


def adapters(output_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(output_dir / "adapter_peft" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def one_process(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process") / "run"
    check(subprocess.run(experiment(tiny_dir, out), env=cpu_env(8), capture_output=True, text=True, timeout=900))
    return out


def assert_same_run(ours: Path, reference: Path):
    a, b = losses(ours), losses(reference)
    assert sorted(a) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(b)], rtol=1e-5)
    mine, theirs = adapters(ours), adapters(reference)
    assert mine.keys() == theirs.keys()
    for key in mine:
        np.testing.assert_allclose(mine[key], theirs[key], rtol=1e-4, atol=2e-5, err_msg=key)
    return a, b


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_killed_and_relaunched_train_as_one_with_all_devices(tiny_dir, one_process, tmp_path):
    """Two processes x 4 devices, killed after the first checkpoint and relaunched, end with the losses of every
    step and the adapters of one uninterrupted process with 8 devices (one run proves both: the steps before
    the kill are the two processes' own, the rest the resumed ones)."""
    out = tmp_path / "run"
    job = subprocess.Popen(two_processes(tiny_dir, out), env=cpu_env(4), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not (out / "checkpoints" / "2").is_dir() and job.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)  # the whole job, as a preemption would
    job.wait()
    killed_at = max(losses(out))
    assert killed_at < STEPS, "the run finished before it could be killed"
    check(subprocess.run(two_processes(tiny_dir, out), env=cpu_env(4), capture_output=True, text=True, timeout=900))
    a, b = assert_same_run(out, one_process)
    print(f"killed after step {killed_at} (checkpoints every 2 steps), relaunched:")
    print("step  1 process x 8 devices   2 processes x 4 devices")
    for step in sorted(a):
        print(f"{step:4d}  {b[step]:.7f}              {a[step]:.7f}")
    assert not (tmp_path / "run_logs" / "process_1.log").read_text().count("validation loss")  # only process 0 logs


def dry_run(script: str, *args: str) -> str:
    run = subprocess.run(["bash", str(ROOT / "launch" / script), "--dry_run", *args], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_local_dry_run_sets_each_process_environment():
    out = dry_run("local.sh", "--num_processes=3", "--cpu_devices=2", "--port=1234", "--", "python", "-m", "x")
    lines = out.strip().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        for part in ("JAX_COORDINATOR_ADDRESS=127.0.0.1:1234", "JAX_NUM_PROCESSES=3", f"JAX_PROCESS_ID={i}",
                     "--xla_force_host_platform_device_count=2", "python -m x"):
            assert part in line, (part, line)


def test_tpu_pod_dry_run():
    out = dry_run("tpu_pod.sh", "--tpu=mw-v4", "--zone=us-central2-b", "--accelerator_type=v4-32", "--project=proj",
                  "--bucket=gs://b/runs", "--", "--config=llama3_70b")
    for part in ("gcloud compute tpus tpu-vm create mw-v4", "--accelerator-type=v4-32", "--zone=us-central2-b",
                 "--project=proj", "--worker=all", "pip install -e", "jax[tpu]",
                 "python -m experiments.macdrop --config=llama3_70b", "--config.checkpoint_dir=gs://b/runs/",
                 "tpu-vm scp"):
        assert part in out, part
    assert out.index("tpu-vm create") < out.index("pip install") < out.index("experiments.macdrop")


def test_gpu_slurm_dry_run():
    out = dry_run("gpu_slurm.sh", "--nodes=4", "--gpus_per_node=8", "--partition=gpu", "--", "--config=llama3_8b")
    for part in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "scontrol show hostnames", "JAX_COORDINATOR_ADDRESS", "srun",
                 "JAX_NUM_PROCESSES=$SLURM_NTASKS", "JAX_PROCESS_ID=$SLURM_PROCID",
                 "python -m experiments.macdrop --config=llama3_8b", "sbatch"):
        assert part in out, part
    per_gpu = dry_run("gpu_slurm.sh", "--nodes=2", "--gpus_per_node=8", "--per_gpu", "--", "--config=llama3_8b")
    assert "#SBATCH --ntasks-per-node=8" in per_gpu and "CUDA_VISIBLE_DEVICES=$SLURM_LOCALID" in per_gpu
