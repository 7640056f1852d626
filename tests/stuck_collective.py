"""Run by tests/test_distributed.py under launch/local.sh: both processes run one collective, then process 1 skips
the next one that process 0 waits in (as a stuck or diverged process would): process 0 must fail with a clear
error after the timeout, not hang."""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mwjax.core import compiled, distributed

distributed.initialize(collective_timeout_s=int(sys.argv[1]))
print(f"cache {compiled.keep_compiled_programs('/nonexistent-cache')}", flush=True)  # off in a multi-process CPU run
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
x = jax.make_array_from_process_local_data(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")),
                                          np.ones((1,), np.float32))
total = jax.jit(jnp.sum, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
with distributed.explain_collective_timeouts():
    print(f"first sum {float(total(x))}", flush=True)  # both processes: the collectives are set up
    if jax.process_index() == 1:
        time.sleep(45)  # alive but absent from the next collective; then it leaves, ending process 0's shutdown wait
        sys.exit(0)
    print(f"second sum {float(total(x + 1))}", flush=True)
