"""Peak host memory (and time) of ONE forward + backward of a single MLAttention,
dense vs blockwise kernel.

    python scripts/bench_attention_memory.py            # runs everything, prints a table
    python scripts/bench_attention_memory.py --seq 8192 # another length

Each measurement is a fresh subprocess (``--child``) that builds one
MLAttention (dim 256, 4 heads, q/k head dim 48 + 16 RoPE = 64, v head dim 64,
kv_lora_rank 128, no q LoRA), takes ``jax.value_and_grad`` of ``sum(out**2)``
with respect to the weights and the input ``x: [seq, 256]`` (batch 1), jits it,
runs it once, times ``--runs`` more calls (the median is reported) and exits. Its peak resident set size is read from
``/usr/bin/time -v`` ("Maximum resident set size"); where that program is
missing, from ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a wrapper
process that runs nothing but that one child. The table says which was used.

A baseline child runs the same program at a short sequence (128), where the
attention matrices are negligible: it is the cost of Python, JAX, XLA and
compilation, and is subtracted to give the attention's own share.

The children run JAX on the CPU (``JAX_PLATFORMS=cpu``) unless ``--platform``
says otherwise: on an accelerator host RSS does not measure device memory.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import time

TIME = "/usr/bin/time"


def child(args: argparse.Namespace) -> None:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qkclip_eqx import MLAConfig, MLAttention

    config = MLAConfig(
        dim=256,
        n_heads=4,
        kv_lora_rank=128,
        qk_nope_head_dim=48,
        qk_rope_head_dim=16,
        v_head_dim=64,
        q_lora_rank=None,
        kernel=args.kernel,
        block_size=args.block_size,
    )
    # Weights from NumPy into the constructor's structure: the same module as
    # MLAttention(config, key=...), without compiling a random initialiser.
    shapes = eqx.filter_eval_shape(MLAttention, config, key=jax.random.key(0))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        if "norm" in jax.tree_util.keystr(path):
            return jnp.ones(leaf.shape, leaf.dtype)
        w = rng.standard_normal(leaf.shape, dtype=np.float32) / np.sqrt(leaf.shape[-1])
        return jnp.asarray(w, leaf.dtype)

    module = jax.tree_util.tree_map_with_path(fill, shapes)
    x = jnp.asarray(rng.standard_normal((args.seq, config.dim), dtype=np.float32))

    @eqx.filter_jit
    def step(module, x):
        def loss(module, x):
            out, s = module(x)
            return jnp.sum(out.astype(jnp.float32) ** 2), s

        (value, s), grads = eqx.filter_value_and_grad(loss, has_aux=True)(module, x)
        return value, s, grads

    t0 = time.perf_counter()
    value, s, grads = jax.block_until_ready(step(module, x))
    elapsed = time.perf_counter() - t0
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(s)))
    runs = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        jax.block_until_ready(step(module, x))
        runs.append(time.perf_counter() - t0)
    print(
        f"CHILD kernel={args.kernel} seq={args.seq} loss={float(value):.4g} "
        f"S={np.asarray(s).round(3).tolist()} compile+run={elapsed:.2f}s "
        f"run_ms={1e3 * sorted(runs)[len(runs) // 2]:.1f}",
        flush=True,
    )


def wrapper(cmd: list[str]) -> None:
    """Run one child and report its peak RSS from getrusage (no other children)."""
    subprocess.run(cmd, check=True)
    kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    print(f"WRAPPER maxrss_kib={kib}", flush=True)


def measure(kernel: str, seq: int, args: argparse.Namespace) -> tuple[int, float, str, str]:
    """Returns (peak RSS in KiB, wall seconds, method, child's line)."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        "--kernel",
        kernel,
        "--seq",
        str(seq),
        "--block-size",
        str(args.block_size),
        "--runs",
        str(args.runs),
    ]
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = args.platform
    t0 = time.perf_counter()
    if shutil.which(TIME) or os.path.exists(TIME):
        r = subprocess.run([TIME, "-v", *cmd], capture_output=True, text=True, env=env)
        method = "/usr/bin/time -v (Maximum resident set size)"
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    else:
        r = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--wrap", "--", *cmd],
            capture_output=True,
            text=True,
            env=env,
        )
        method = "resource.getrusage(RUSAGE_CHILDREN).ru_maxrss"
        match = re.search(r"WRAPPER maxrss_kib=(\d+)", r.stdout)
    wall = time.perf_counter() - t0
    if r.returncode != 0 or match is None:
        sys.stderr.write(r.stdout + r.stderr)
        raise SystemExit(f"measurement of kernel={kernel} seq={seq} failed (rc={r.returncode})")
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("CHILD")), "")
    return int(match.group(1)), wall, method, line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", choices=["dense", "blockwise"], default="dense")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--baseline-seq", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3, help="timed runs after the first (median)")
    parser.add_argument("--platform", default="cpu", help="JAX_PLATFORMS for the children")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--wrap", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.wrap:
        return wrapper(args.rest)

    rows = [
        ("baseline (dense)", "dense", args.baseline_seq),
        ("dense", "dense", args.seq),
        ("blockwise", "blockwise", args.seq),
    ]
    results = {}
    for label, kernel, seq in rows:
        kib, wall, method, line = measure(kernel, seq, args)
        run_ms = float(re.search(r"run_ms=([\d.]+)", line).group(1))
        results[label] = (kernel, seq, kib, wall, run_ms)
        print(line, flush=True)
    base = results["baseline (dense)"][2]
    print()
    print(
        f"One forward+backward of MLAttention (dim 256, 4 heads, qk 48+16, v 64, "
        f"kv_lora 128), batch 1, block_size {args.block_size}, JAX_PLATFORMS={args.platform}"
    )
    print(f"peak memory from: {method}")
    print(
        f"{'run':<18}{'seq':>6}{'peak RSS MiB':>14}{'minus baseline':>16}{'wall s':>8}"
        f"{'fwd+bwd ms':>12}"
    )
    for label, (_kernel, seq, kib, wall, run_ms) in results.items():
        print(
            f"{label:<18}{seq:>6}{kib / 1024:>14.1f}{(kib - base) / 1024:>16.1f}{wall:>8.1f}"
            f"{run_ms:>12.1f}"
        )
    dense, block = results["dense"][2], results["blockwise"][2]
    print(
        f"ratio blockwise/dense, fwd+bwd time:       {results['blockwise'][4] / results['dense'][4]:.3f}"
    )
    print(f"ratio blockwise/dense, peak RSS:           {block / dense:.3f}")
    if dense > base:
        print(f"ratio blockwise/dense, minus baseline:     {(block - base) / (dense - base):.3f}")


if __name__ == "__main__":
    main()
