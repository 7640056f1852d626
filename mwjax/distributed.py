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
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax


def cluster_kind(environ: Mapping[str, str] = os.environ) -> str | None:
    """Which multi-process launch the environment describes ("explicit", "slurm", "mpi", "tpu"), or None."""
    if environ.get("JAX_COORDINATOR_ADDRESS") and int(environ.get("JAX_NUM_PROCESSES", "1")) > 1:
        return "explicit"
    if int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in environ:  # inside srun, not sbatch
        return "slurm"
    if int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "mpi"
    if len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "tpu"
    return None


def initialize(environ: Mapping[str, str] = os.environ) -> bool:
    """Join the cluster the environment describes (module doc); True when this is a multi-process run."""
    kind = cluster_kind(environ)
    if kind is None:
        return False
    if kind == "explicit":
        if "JAX_PROCESS_ID" not in environ:
            raise ValueError("JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES are set but JAX_PROCESS_ID is not: "
                             "set it to this process's rank (0 .. JAX_NUM_PROCESSES - 1)")
        jax.distributed.initialize(coordinator_address=environ["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(environ["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()
    return True


def is_lead() -> bool:
    """The process that logs and writes non-array files."""
    return jax.process_index() == 0
