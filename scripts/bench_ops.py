"""The benchmark model's operations one by one: XLA:CPU beside PyTorch, on all cores and on one.

Why is a train step of the benchmark model (``scripts/bench_speed.py``) slower
in JAX than in eager PyTorch on the same CPU? This script times, in one run,
the operations that make up that step, at its shapes, in float32:

- the MLP's matmuls (``[tokens, dim] x [dim, hidden]`` and the two backward
  products, dX and dW), which carry most of the model's FLOPs;
- the attention's batched matmuls, one ``seq x seq`` tile per (sequence, head)
  pair: the logits ``Q K^T``, ``P V``, and the backward's ``dS^T Q``;
- elementwise passes of the same sizes: ``exp`` over the attention tiles,
  SiLU over the MLP's hidden activations, and a softmax;
- a square ``n^3`` matmul, the peak that ``bench_speed.py`` measures MFU
  against.

Each operation runs in four worker processes: JAX (XLA:CPU) and PyTorch, each
once with every core of this process's CPU set and once pinned to ONE core
(``os.sched_setaffinity``; Linux). The workers run in rounds, their order
rotating, so that a change in the machine's load hits all of them alike; each
figure is the median over rounds of a worker's median time. The table gives
the times, the ratio XLA / PyTorch on all cores, and each library's speedup
from one core to all: a speedup near 1 means the library ran that operation
on one thread.

How to run (from the repository root, in the project's environment):

    python scripts/bench_ops.py                                     # XLA alone
    python scripts/bench_ops.py --torch-python /tmp/torch/bin/python  # and PyTorch

PyTorch is not a dependency of this project: give the interpreter of a
separate environment that has it (``pip install torch numpy``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="batch x seq of the benchmark model")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=704, help="the SwiGLU's hidden size")
    p.add_argument("--tiles", type=int, default=32, help="sequences x heads: 8 x 4")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dqk", type=int, default=48, help="q/k head size (nope + rope)")
    p.add_argument("--dv", type=int, default=32)
    p.add_argument("--peak-n", type=int, default=2048)
    p.add_argument("--reps", type=int, default=20, help="timed calls per op and worker")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the four workers")
    p.add_argument(
        "--torch-python",
        default=os.environ.get("QKCLIP_TORCH_PYTHON"),
        help="a Python interpreter with torch (default: $QKCLIP_TORCH_PYTHON)",
    )
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--one-core", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def shapes(a) -> dict[str, tuple[tuple[int, ...], ...]]:
    """The operands of each op, in the order the table prints them (the one list of op names)."""
    t, d, h = a.tokens, a.dim, a.hidden
    b, s = a.tiles, a.seq
    return {
        "mlp x @ W^T": ((t, d), (h, d)),
        "mlp dX = dH @ W": ((t, h), (h, d)),
        "mlp dW = dH^T @ X": ((t, h), (t, d)),
        "attn Q K^T (batched)": ((b, s, a.dqk), (b, s, a.dqk)),
        "attn P V (batched)": ((b, s, s), (b, s, a.dv)),
        "attn dS^T Q (batched)": ((b, s, s), (b, s, a.dqk)),
        "exp (attn tiles)": ((b, s, s),),
        "silu (mlp hidden)": ((t, h),),
        "softmax (attn tiles)": ((b, s, s),),
        "matmul n^3": ((a.peak_n, a.peak_n), (a.peak_n, a.peak_n)),
    }


def work(a) -> dict[str, str]:
    """What each op does per call: GFLOP for the matmuls, MB read + written for the rest."""
    t, d, h, b, s = a.tokens, a.dim, a.hidden, a.tiles, a.seq
    gf = lambda n: f"{n / 1e9:.2f} GFLOP"  # noqa: E731
    mb = lambda n: f"{n * 4 / 1e6:.1f} MB"  # noqa: E731
    return {
        "mlp x @ W^T": gf(2 * t * d * h),
        "mlp dX = dH @ W": gf(2 * t * d * h),
        "mlp dW = dH^T @ X": gf(2 * t * d * h),
        "attn Q K^T (batched)": gf(2 * b * s * s * a.dqk),
        "attn P V (batched)": gf(2 * b * s * s * a.dv),
        "attn dS^T Q (batched)": gf(2 * b * s * s * a.dqk),
        "exp (attn tiles)": mb(2 * b * s * s),
        "silu (mlp hidden)": mb(2 * t * h),
        "softmax (attn tiles)": mb(2 * b * s * s),
        "matmul n^3": gf(2 * a.peak_n**3),
    }


def jax_ops(a):
    """name -> (jitted function, operands), in JAX."""
    import jax
    import jax.numpy as jnp

    ops = {
        "mlp x @ W^T": lambda x, w: x @ w.T,
        "mlp dX = dH @ W": lambda dh, w: dh @ w,
        "mlp dW = dH^T @ X": lambda dh, x: dh.T @ x,
        "attn Q K^T (batched)": lambda q, k: jnp.einsum("brd,bsd->brs", q, k),
        "attn P V (batched)": lambda p, v: jnp.einsum("brs,bsd->brd", p, v),
        "attn dS^T Q (batched)": lambda ds, q: jnp.einsum("brs,brd->bsd", ds, q),
        "exp (attn tiles)": jnp.exp,
        "silu (mlp hidden)": jax.nn.silu,
        "softmax (attn tiles)": lambda x: jax.nn.softmax(x, axis=-1),
        "matmul n^3": lambda x, y: x @ y,
    }
    keys = iter(jax.random.split(jax.random.key(0), 32))
    return {
        name: (
            jax.jit(fn),
            [jax.random.normal(next(keys), shape, jnp.float32) for shape in shapes(a)[name]],
        )
        for name, fn in ops.items()
    }


def torch_ops(a):
    """name -> (function, operands), in eager PyTorch."""
    import torch

    ops = {
        "mlp x @ W^T": lambda x, w: x @ w.T,
        "mlp dX = dH @ W": lambda dh, w: dh @ w,
        "mlp dW = dH^T @ X": lambda dh, x: dh.T @ x,
        "attn Q K^T (batched)": lambda q, k: q @ k.transpose(1, 2),
        "attn P V (batched)": lambda p, v: p @ v,
        "attn dS^T Q (batched)": lambda ds, q: ds.transpose(1, 2) @ q,
        "exp (attn tiles)": torch.exp,
        "silu (mlp hidden)": torch.nn.functional.silu,
        "softmax (attn tiles)": lambda x: torch.softmax(x, dim=-1),
        "matmul n^3": lambda x, y: x @ y,
    }
    g = torch.Generator().manual_seed(0)
    return {
        name: (fn, [torch.randn(shape, generator=g) for shape in shapes(a)[name]])
        for name, fn in ops.items()
    }


def _cores() -> list[int]:
    """The CPUs this process may run on (all of them where the OS cannot pin)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def run_worker(a) -> None:
    """Time every op in this process; print one JSON line {op: median seconds}."""
    cores = _cores()
    if a.one_core:
        os.sched_setaffinity(0, {cores[0]})
        cores = cores[:1]
    if a.worker == "jax":
        import jax

        ops, sync = jax_ops(a), jax.block_until_ready
        version = f"jax {jax.__version__}"
    else:
        import torch

        torch.set_num_threads(len(cores))
        ops, sync = torch_ops(a), lambda x: x
        version = f"torch {torch.__version__}"
    times = {}
    for name in shapes(a):
        fn, args = ops[name]
        for _ in range(3):
            sync(fn(*args))
        ts = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            sync(fn(*args))
            ts.append(time.perf_counter() - t0)
        times[name] = statistics.median(ts)
    print(json.dumps({"version": version, "cores": len(cores), "times": times}))


def _worker_argv(a, python: str, kind: str, one_core: bool) -> list[str]:
    argv = [python, os.path.abspath(__file__), "--worker", kind]
    for field in ("tokens", "dim", "hidden", "tiles", "seq", "dqk", "dv", "peak_n", "reps"):
        argv += [f"--{field.replace('_', '-')}", str(getattr(a, field))]
    return argv + (["--one-core"] if one_core else [])


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.worker:
        run_worker(a)
        return {}
    pinning = hasattr(os, "sched_setaffinity")
    configs = [("XLA", sys.executable, "jax")]
    if a.torch_python:
        configs.append(("torch", a.torch_python, "torch"))
    workers = {
        (label, one): _worker_argv(a, python, kind, one)
        for label, python, kind in configs
        for one in ((False, True) if pinning else (False,))
    }
    print(
        f"{platform.node()}: {len(_cores())} cores "
        f"available, Python {platform.python_version()}, load {os.getloadavg()}"
    )
    if not a.torch_python:
        print("no --torch-python: timing XLA alone")
    if not pinning:
        print("no os.sched_setaffinity here: all cores only")
    runs: dict = {w: [] for w in workers}
    versions = {}
    names = list(workers)
    for r in range(a.rounds):
        for w in names[r % len(names) :] + names[: r % len(names)]:
            out = subprocess.run(workers[w], capture_output=True, text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            versions[w] = f"{result['version']}, {result['cores']} core(s)"
            runs[w].append(result["times"])
    med = {w: {op: statistics.median(r[op] for r in runs[w]) for op in shapes(a)} for w in workers}
    for w in names:
        print(f"{w[0]} on {'one core' if w[1] else 'all cores'}: {versions[w]}")

    def ms(w, op):
        return f"{med[w][op] * 1e3:8.2f}" if w in med else f"{'-':>8s}"

    def ratio(x, y, op):
        return f"{med[x][op] / med[y][op]:.2f}" if x in med and y in med else "-"

    xla, xla1, torch, torch1 = ("XLA", False), ("XLA", True), ("torch", False), ("torch", True)
    jobs = work(a)
    print(
        f"\n{'op':24s} {'work':>12s} {'XLA ms':>8s} {'1 core':>8s} {'torch ms':>8s} {'1 core':>8s} "
        f"{'XLA/torch':>9s} {'XLA 1->all':>10s} {'torch 1->all':>12s}"
    )
    for op in shapes(a):
        print(
            f"{op:24s} {jobs[op]:>12s} {ms(xla, op)} {ms(xla1, op)} {ms(torch, op)} {ms(torch1, op)} "
            f"{ratio(xla, torch, op):>9s} {ratio(xla1, xla, op):>10s} {ratio(torch1, torch, op):>12s}"
        )
    print(f"load average at the end: {os.getloadavg()}")
    return med


if __name__ == "__main__":
    main()
