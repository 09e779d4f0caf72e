"""Two local processes whose mesh has the ``model`` (or the ``seq``) axis
spanning both processes: every device of a model (seq) group sits in another
process, so each process must place the rows of the global batch that its own
devices hold. Step by step the run matches one process on one device."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from parallel_scenario import run_scenario
from test_parallel import _assert_same_run, _reserved_port


@pytest.fixture(scope="module")
def reference():
    return run_scenario(None, "mla")


@pytest.mark.parametrize("layout", ["model", "seq"])
def test_axis_spanning_processes_matches_one_process(reference, tmp_path, layout):
    tests = pathlib.Path(__file__).parent
    out = tmp_path / "mp.npz"
    env = {**os.environ, "PYTHONPATH": str(tests) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XLA_FLAGS", None)
    with _reserved_port() as port:
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(tests / "_multiprocess_worker.py"),
                    f"127.0.0.1:{port}",
                    str(i),
                    str(out),
                    layout,
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(2)
        ]
        try:
            logs = [p.communicate(timeout=300)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
    got = np.load(out)
    ref_params, ref_m = reference
    params = [got[f"arr_{i}"] for i in range(len(ref_params))]
    _assert_same_run(reference, (params, {k: got[k] for k in ref_m}))
