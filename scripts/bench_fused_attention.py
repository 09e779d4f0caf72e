"""What the exact S costs on top of ``kernel="dot_product_attention"``.

How to run (from the repository root, in the project's environment):

    python scripts/bench_fused_attention.py                       # CPU default shape
    python scripts/bench_fused_attention.py --seq 256 --repeats 5  # quick
    python scripts/bench_fused_attention.py --dtype bfloat16 --batch 8 --seq 4096   # a GPU

One ``attend`` call (``kernel="dot_product_attention"``) on a batch (vmapped),
in three variants, each jitted once, forward and backward of a scalar of the
output (what a train step runs):

- ``no_s``: the output only; S is computed by ``attend`` but not returned,
  so XLA removes its pass as dead code (checked when seq > block_size: the
  compiled program has fewer ``while`` loops than ``exact``'s);
- ``exact``: the output and the exact S (the max-only pass over key tiles);
- ``lse_bound``: the output and the log-sum-exp bound of S.

The variants are timed INTERLEAVED: every round runs each once, the order
rotating from round to round, so drift in the machine's load hits all alike.
Each timing is one call with ``jax.block_until_ready``. It prints the median
time per variant and the overhead ratios exact/no_s and lse_bound/no_s (ratio
of the medians, and the median of the per-round ratios). The implementation
is ``jax.nn.dot_product_attention``'s ``implementation=None``, which in
jax 0.10 and 0.12 is XLA on every backend.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from qkclip_eqx import attend

VARIANTS = ("no_s", "exact", "lse_bound")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=128, help="key tile of the exact S pass")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds (one call per variant)")
    p.add_argument(
        "--warmup", type=int, default=2, help="untimed calls per variant after compiling"
    )
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def build(a: argparse.Namespace):
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(a.dtype)
    q = jnp.asarray(rng.standard_normal((a.batch, a.seq, a.heads, a.head_dim)), dtype)
    k = jnp.asarray(rng.standard_normal((a.batch, a.seq, a.kv_heads, a.head_dim)), dtype)
    v = jnp.asarray(rng.standard_normal((a.batch, a.seq, a.kv_heads, a.head_dim)), dtype)
    w = jnp.asarray(rng.standard_normal((a.batch, a.seq, a.heads, a.head_dim)), jnp.float32)
    pos = jnp.arange(a.seq, dtype=jnp.int32)
    seg = jnp.zeros((a.seq,), jnp.int32)

    def fns(max_logit: str, return_s: bool):
        def one(q, k, v):
            return attend(
                q,
                k,
                v,
                q_pos=pos,
                k_pos=pos,
                q_seg=seg,
                k_seg=seg,
                causal=not a.no_causal,
                scale=1.0 / a.head_dim**0.5,
                kernel="dot_product_attention",
                block_size=a.block_size,
                max_logit=max_logit,
            )

        def loss(q, k, v):
            out, s = jax.vmap(one)(q, k, v)
            return jnp.sum(out.astype(jnp.float32) * w), jnp.max(s, axis=0)

        grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)

        @jax.jit
        def run(q, k, v):
            (value, s), g = grad(q, k, v)
            return (value, g, s) if return_s else (value, g)

        return run

    runs = {
        "no_s": fns("exact", False),
        "exact": fns("exact", True),
        "lse_bound": fns("lse_bound", True),
    }
    return runs, (q, k, v)


def main(argv=None) -> dict:
    a = parse_args(argv)
    runs, args = build(a)
    loops = {}
    for name, fn in runs.items():
        loops[name] = fn.lower(*args).compile().as_text().count(" while(")
        for _ in range(1 + a.warmup):
            jax.block_until_ready(fn(*args))
    # one key tile is one step: XLA unrolls it, and there is no loop to count
    if a.seq > a.block_size and not loops["no_s"] < loops["exact"]:
        raise RuntimeError(f"the S pass was not removed from no_s: while loops {loops}")
    times = {name: [] for name in VARIANTS}
    for r in range(a.repeats):
        order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]
        for name in order:
            t0 = time.perf_counter()
            jax.block_until_ready(runs[name](*args))
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ratios = {
        name: {
            "ratio_of_medians": med[name] / med["no_s"],
            "median_of_ratios": statistics.median(
                x / y for x, y in zip(times[name], times["no_s"])
            ),
        }
        for name in ("exact", "lse_bound")
    }
    shape = dict(
        batch=a.batch,
        seq=a.seq,
        heads=a.heads,
        kv_heads=a.kv_heads,
        head_dim=a.head_dim,
        block_size=a.block_size,
        dtype=a.dtype,
        causal=not a.no_causal,
    )
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({platform.machine()}), "
        f"dot_product_attention implementation=None, fwd+bwd, {shape}"
    )
    print(f"while loops in the compiled programs: {loops}")
    for name in VARIANTS:
        print(f"{name:>10}: median {1e3 * med[name]:9.2f} ms over {a.repeats} interleaved rounds")
    for name, r in ratios.items():
        print(
            f"{name}/no_s: ratio of medians {r['ratio_of_medians']:.3f}, "
            f"median of per-round ratios {r['median_of_ratios']:.3f}"
        )
    result = {
        "shape": shape,
        "median_s": med,
        "ratios": ratios,
        "while_loops": loops,
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
    }
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
