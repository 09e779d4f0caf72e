"""Two local processes whose mesh has the ``model``, the ``seq`` or the
``fsdp`` axis spanning both processes: every device of a model (seq) group sits
in another process, so each process must place the rows of the global batch
that its own devices hold; under FSDP each parameter's shards lie in both
processes, gathered layer by layer across them. Step by step the run matches
one process on one device."""

import os
import pathlib
import sys

import numpy as np
import pytest

from launch import run_processes
from parallel_scenario import run_scenario
from test_parallel import _assert_same_run


@pytest.fixture(scope="module")
def reference():
    return run_scenario(None, "mla")


@pytest.mark.parametrize("layout", ["model", "seq", "fsdp"])
def test_axis_spanning_processes_matches_one_process(reference, tmp_path, layout):
    tests = pathlib.Path(__file__).parent
    out = tmp_path / "mp.npz"
    env = {**os.environ, "PYTHONPATH": str(tests) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XLA_FLAGS", None)
    worker = str(tests / "_multiprocess_worker.py")
    run_processes(
        lambda address, i: [sys.executable, worker, address, str(i), str(out), layout], env=env
    )
    got = np.load(out)
    ref_params, ref_m = reference
    params = [got[f"arr_{i}"] for i in range(len(ref_params))]
    _assert_same_run(reference, (params, {k: got[k] for k in ref_m}))
