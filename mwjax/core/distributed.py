"""Multi-host start-up: join the JAX cluster that the launcher described in the environment.

Every process of a multi-host run calls `initialize()` before touching any device. It calls
`jax.distributed.initialize` when the environment says the run has several processes:

- explicit (`launch/local.sh`, any custom launcher): JAX_COORDINATOR_ADDRESS (host:port),
  JAX_NUM_PROCESSES and JAX_PROCESS_ID;
- SLURM (`launch/gpu_slurm.sh`, srun with SLURM_NTASKS > 1), Open MPI (OMPI_COMM_WORLD_SIZE > 1)
  and Cloud TPU pod slices (TPU_WORKER_HOSTNAMES lists several workers): JAX detects the
  coordinator, the process count and the process id itself.

A single-process run (the default everywhere) does nothing, so the same command runs on a laptop
and on a pod. After it, `jax.process_index() == 0` is the process that logs and writes files.

Two guards make a multi-process run fail rather than hang:

- On CPU, jax's persistent compilation cache is turned off. Its cache key includes a fingerprint of
  the process's own devices, so only process 0 ever finds the entries it wrote; on a relaunch process 0
  runs a program deserialized from the cache while the others compile the same program afresh, and on
  jaxlib 0.12 the two do not meet in the cross-process (gloo) collectives: the run deadlocks in its first
  step (jax 0.10.2 happens to tolerate it). GPU keys leave the device assignment out and TPU keys
  fingerprint the whole slice, so there every process reads the same entry and the cache stays on.
- A cross-process collective on CPU that does not complete within `collective_timeout_s` fails
  (`--xla_cpu_collective_timeout_seconds`), and `explain_collective_timeouts` turns that failure into an
  error that says what happened and how to resume.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping

import jax

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_timeout_seconds"
COLLECTIVE_TIMEOUT_S = 600  # > the longest a process waits for another's compilation of a large step on a slow CPU


def cluster_kind(environ: Mapping[str, str] = os.environ) -> str | None:
    """Which multi-process launch the environment describes (module doc).

    Args:
      environ: the environment to read (the process environment by default).

    Returns:
      "explicit", "slurm", "mpi" or "tpu"; None for a single-process run.
    """
    if environ.get("JAX_COORDINATOR_ADDRESS") and int(environ.get("JAX_NUM_PROCESSES", "1")) > 1:
        return "explicit"
    if int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in environ:  # inside srun, not sbatch
        return "slurm"
    if int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "mpi"
    if len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "tpu"
    return None


def initialize(environ: Mapping[str, str] = os.environ, *, collective_timeout_s: int = COLLECTIVE_TIMEOUT_S) -> bool:
    """Join the cluster the environment describes (module doc); True when this is a multi-process run.

    Args:
      environ: where the launcher's variables are read (the process environment by default).
      collective_timeout_s: a CPU collective waiting longer than this fails instead of hanging (sets
        `--xla_cpu_collective_timeout_seconds` in this process's XLA_FLAGS unless it is set there already).

    Returns:
      True when this process joined a multi-process run; then on CPU the persistent compilation cache is
      off for the rest of the process (module doc).
    """
    kind = cluster_kind(environ)
    if kind is None:
        return False
    # read by XLA when the backend starts, which jax.distributed.initialize must precede anyway
    os.environ["XLA_FLAGS"] = with_collective_timeout(os.environ.get("XLA_FLAGS", ""), collective_timeout_s)
    if kind == "explicit":
        if "JAX_PROCESS_ID" not in environ:
            raise ValueError("JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES are set but JAX_PROCESS_ID is not: "
                             "set it to this process's rank (0 .. JAX_NUM_PROCESSES - 1)")
        jax.distributed.initialize(coordinator_address=environ["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(environ["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()
    if jax.default_backend() == "cpu":
        jax.config.update("jax_enable_compilation_cache", False)
        log.info("persistent compilation cache off: on CPU each process keys it differently (mwjax.core.distributed)")
    return True


def with_collective_timeout(xla_flags: str, seconds: int) -> str:
    """`xla_flags` with the CPU collective timeout added, unless it names one already (the user's wins).

    Args:
      xla_flags: an XLA_FLAGS value (space-separated flags, possibly "").
      seconds: the timeout to add (`--xla_cpu_collective_timeout_seconds`).

    Returns:
      The new XLA_FLAGS value.
    """
    if COLLECTIVE_TIMEOUT_FLAG in xla_flags:
        return xla_flags
    return f"{xla_flags} {COLLECTIVE_TIMEOUT_FLAG}={int(seconds)}".strip()


def collective_timeout_s(xla_flags: str | None = None) -> int | None:
    """The CPU collective timeout set in an XLA_FLAGS value.

    Args:
      xla_flags: the flags to read; None for this process's XLA_FLAGS.

    Returns:
      The timeout in seconds, or None when no `--xla_cpu_collective_timeout_seconds` is set.
    """
    flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    for flag in flags.split():
        if flag.startswith(COLLECTIVE_TIMEOUT_FLAG + "="):
            return int(flag.split("=", 1)[1])
    return None


@contextlib.contextmanager
def explain_collective_timeouts() -> Iterator[None]:
    """Re-raise a timed-out cross-process collective as an error that says what it means and what to do."""
    try:
        yield
    except (jax.errors.JaxRuntimeError, ValueError) as e:  # jaxlib raises either, by where the wait failed
        message = str(e).lower()
        if "timed out" not in message or not ("gloo" in message or "collective" in message):
            raise
        raise RuntimeError(
            f"process {jax.process_index()} of {jax.process_count()}: a cross-process collective timed out "
            f"({COLLECTIVE_TIMEOUT_FLAG}={collective_timeout_s()}): another process stopped, is stuck, or runs a "
            "different program (see its log). Checkpoints written so far are whole: relaunch the same command to "
            "resume.") from e


def is_lead() -> bool:
    """The process that logs and writes non-array files."""
    return jax.process_index() == 0
