"""scripts/bench_ops.py: each op computes what its name says, and the script runs."""

import numpy as np
import pytest

from builders import load_script

TINY = ["--tokens", "12", "--dim", "8", "--hidden", "20", "--tiles", "3", "--seq", "6"]
TINY += ["--dqk", "5", "--dv", "4", "--peak-n", "16"]


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_ops")


def _numpy(name, *xs):
    """The op, written independently in NumPy (float64)."""
    xs = [np.asarray(x, np.float64) for x in xs]
    if name == "mlp x @ W^T":
        return xs[0] @ xs[1].T
    if name == "mlp dX = dH @ W":
        return xs[0] @ xs[1]
    if name == "mlp dW = dH^T @ X":
        return xs[0].T @ xs[1]
    if name == "attn Q K^T (batched)":
        return np.stack([q @ k.T for q, k in zip(*xs)])
    if name == "attn P V (batched)":
        return np.stack([p @ v for p, v in zip(*xs)])
    if name == "attn dS^T Q (batched)":
        return np.stack([ds.T @ q for ds, q in zip(*xs)])
    if name == "exp (attn tiles)":
        return np.exp(xs[0])
    if name == "silu (mlp hidden)":
        return xs[0] / (1 + np.exp(-xs[0]))
    if name == "softmax (attn tiles)":
        e = np.exp(xs[0] - xs[0].max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    assert name == "matmul n^3"
    return xs[0] @ xs[1]


def test_each_jax_op_is_the_named_operation_at_the_named_shapes(bench):
    a = bench.parse_args(TINY)
    ops = bench.jax_ops(a)
    assert set(ops) == set(bench.shapes(a)) == set(bench.work(a))
    for name, (fn, args) in ops.items():
        assert [x.shape for x in args] == list(bench.shapes(a)[name])
        # measured max |diff| 1.5e-6, 24% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_allclose(fn(*args), _numpy(name, *args), rtol=2e-6, atol=2e-6)


def test_runs_its_workers_and_prints_every_op(bench, capsys):
    med = bench.main([*TINY, "--reps", "1", "--rounds", "1", "--torch-python", ""])
    out = capsys.readouterr().out
    assert "no --torch-python" in out
    for op in bench.shapes(bench.parse_args(TINY)):
        assert op in out
    assert ("XLA", False) in med and ("torch", False) not in med
    assert all(t > 0 for times in med.values() for t in times.values())
