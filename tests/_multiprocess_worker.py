"""One process of the two-process test (launched by tests/test_parallel.py).

argv: coordinator_address process_id out_dir. Each process has 4 CPU devices;
together they form a data=8 mesh and run the shared scenario; process 0 writes
the resulting parameters and metrics.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_cpu_collectives_implementation", "gloo")

address, process_id, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(address, num_processes=2, process_id=process_id)

import numpy as np  # noqa: E402

from qkclip_eqx import make_mesh  # noqa: E402
from parallel_scenario import run_scenario  # noqa: E402

assert jax.device_count() == 8 and jax.local_device_count() == 4
params, metrics = run_scenario(make_mesh(data=8), rows=slice(4 * process_id, 4 * process_id + 4))
if process_id == 0:
    np.savez(out, *params, **metrics)
jax.distributed.shutdown()
