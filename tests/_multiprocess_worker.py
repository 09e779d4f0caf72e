"""One process of a two-process test (launched by tests/test_parallel.py and
tests/test_multiprocess_mesh.py).

argv: coordinator_address process_id out_file [layout]. Each process has 4 CPU
devices. ``layout`` (default ``data``) says which mesh axis spans the two
processes: ``data`` (a data=8 mesh), ``fsdp`` (fsdp=4, model=2: each
parameter's fsdp shards lie in both processes), ``model`` (data=4, model=2 with
each model pair made of one device of each process) or ``seq`` (data=4, seq=2,
likewise).
The processes run the shared scenario; process 0 writes the resulting
parameters and metrics.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_cpu_collectives_implementation", "gloo")

address, process_id, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
layout = sys.argv[4] if len(sys.argv) > 4 else "data"
jax.distributed.initialize(address, num_processes=2, process_id=process_id)

import numpy as np  # noqa: E402
from jax.sharding import AxisType, Mesh  # noqa: E402

from parallel_scenario import run_scenario  # noqa: E402
from qkclip_eqx import make_mesh  # noqa: E402
from qkclip_eqx._parallel import AXES  # noqa: E402

assert jax.device_count() == 8 and jax.local_device_count() == 4
if layout == "data":
    mesh = make_mesh(data=8)
elif layout == "fsdp":
    mesh = make_mesh(fsdp=4, model=2)
    groups = np.moveaxis(mesh.devices, 1, -1).reshape(-1, 4)  # the devices of each fsdp group
    assert all(len({d.process_index for d in g}) == 2 for g in groups), "fsdp must span both"
else:
    # devices[d, i] = device d of process i: the last mesh axis (model or seq,
    # size 2) joins the two processes
    by_process = (
        np.array(sorted(jax.devices(), key=lambda d: (d.process_index, d.id))).reshape(2, 4).T
    )
    shape = (4, 1, 2, 1) if layout == "model" else (4, 1, 1, 2)
    mesh = Mesh(by_process.reshape(shape), AXES, axis_types=(AxisType.Auto,) * 4)
    axis = mesh.devices.shape.index(2)
    pairs = np.moveaxis(mesh.devices, axis, -1).reshape(-1, 2)
    assert all(a.process_index != b.process_index for a, b in pairs), (
        "the axis must span the processes"
    )
params, metrics = run_scenario(mesh)
if process_id == 0:
    np.savez(out, *params, **metrics)
jax.distributed.shutdown()
