"""What QK-Clip costs per train step: step-time ratios clip/off and monitor/off.

How to run (from the repository root, in the project's environment):

    python scripts/bench_step.py                     # reference model, both kernels
    python scripts/bench_step.py --layers 2 --dim 128 --seq 128 --repeats 10   # quick
    python scripts/bench_step.py --kernels dense --json /tmp/bench.json

The reference model is an MLA Transformer (4 layers, dim 256, 4 heads, seq 256,
batch 8, byte vocabulary) trained with ``muon_adamw`` and QK-Clip. For each attention kernel
(dense, blockwise) it builds three ``make_train_step`` functions (``clip``,
``monitor``, ``off``), compiles and warms each up, then times them
INTERLEAVED: every round runs one step of each mode, the order rotating from
round to round, so drift in the machine's load hits all modes alike. Each
timing is one step with ``jax.block_until_ready`` on everything it returns; the
step donates the model and optimizer state, so each mode keeps the ones its
step returns. It prints the median step time per mode and two ratios against
``off``: the ratio of the medians, and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from qkclip_eqx import MLAConfig, Transformer, TransformerConfig, make_train_step, muon_adamw

MODES = ("clip", "monitor", "off")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument(
        "--q-lora-rank",
        type=int,
        default=None,
        help="MLA query LoRA rank (default: none, a direct W_q)",
    )
    p.add_argument("--block-size", type=int, default=128, help="blockwise kernel block")
    p.add_argument("--kernels", default="dense,blockwise")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="compute dtype (parameters and optimizer state stay float32)",
    )
    p.add_argument("--repeats", type=int, default=30, help="timed rounds (one step per mode)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per mode after compiling")
    p.add_argument("--tau", type=float, default=100.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def model_config(a: argparse.Namespace, kernel: str) -> TransformerConfig:
    head = a.dim // a.heads
    att = MLAConfig(
        dim=a.dim,
        n_heads=a.heads,
        kv_lora_rank=max(a.dim // 2, 2),
        qk_nope_head_dim=head,
        qk_rope_head_dim=max(2, head // 2 // 2 * 2),
        v_head_dim=head,
        q_lora_rank=a.q_lora_rank,
        kernel=kernel,
        block_size=a.block_size,
    )
    hidden = -(-8 * a.dim // 3 // 64) * 64  # SwiGLU's 8/3 * dim, rounded up to 64
    return TransformerConfig(
        vocab_size=a.vocab,
        n_layers=a.layers,
        mlp_hidden=hidden,
        attention=att,
        compute_dtype=a.dtype,
    )


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, tree)


def bench_kernel(a: argparse.Namespace, kernel: str, tokens) -> dict:
    cfg = model_config(a, kernel)
    model = eqx.filter_jit(lambda k: Transformer(cfg, key=k))(jax.random.key(0))
    optimizer = muon_adamw(a.lr, weight_decay=0.1)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    n_params = sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))

    steps, state, compile_s = {}, {}, {}
    for mode in MODES:
        steps[mode] = make_train_step(optimizer, mode=mode, tau=a.tau)
        m, s = _copy(model), _copy(opt_state)
        t0 = time.perf_counter()
        m, s, metrics = steps[mode](m, s, tokens)
        jax.block_until_ready((m, s, metrics))
        compile_s[mode] = time.perf_counter() - t0
        for _ in range(a.warmup):
            m, s, metrics = steps[mode](m, s, tokens)
        jax.block_until_ready((m, s, metrics))
        state[mode] = (m, s)

    times = {mode: [] for mode in MODES}
    for r in range(a.repeats):
        order = MODES[r % 3 :] + MODES[: r % 3]
        for mode in order:
            m, s = state[mode]
            t0 = time.perf_counter()
            m, s, metrics = steps[mode](m, s, tokens)
            jax.block_until_ready((m, s, metrics))
            times[mode].append(time.perf_counter() - t0)
            state[mode] = (m, s)

    med = {mode: statistics.median(times[mode]) for mode in MODES}
    out = {
        "kernel": kernel,
        "n_params": int(n_params),
        "compile_s": compile_s,
        "median_s": med,
        "times_s": times,
    }
    for mode in ("clip", "monitor"):
        paired = [t / o for t, o in zip(times[mode], times["off"])]
        out[f"{mode}/off"] = med[mode] / med["off"]
        out[f"{mode}/off_paired"] = statistics.median(paired)
    return out


def main(argv=None) -> None:
    a = parse_args(argv)
    dev = jax.devices()[0]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(
        f"backend {jax.default_backend()} ({dev.device_kind}), {os.cpu_count()} CPUs, "
        f"load {load}, jax {jax.__version__}, {platform.python_version()}"
    )
    print(
        f"MLA Transformer: layers {a.layers}, dim {a.dim}, heads {a.heads}, seq {a.seq}, "
        f"batch {a.batch}, vocab {a.vocab}, q_lora {a.q_lora_rank}, {a.dtype}; "
        f"muonclip lr {a.lr}, tau {a.tau}; {a.repeats} interleaved rounds, {a.warmup} warm-up"
    )
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, a.vocab, (a.batch, a.seq + 1)), jnp.int32)
    results = []
    for kernel in a.kernels.split(","):
        r = bench_kernel(a, kernel.strip(), tokens)
        results.append(r)
        print(
            f"  {kernel}: {r['n_params'] / 1e6:.2f}M params, compile (s) "
            + ", ".join(f"{m} {r['compile_s'][m]:.1f}" for m in MODES),
            flush=True,
        )

    print()
    header = (
        f"{'kernel':<10} {'off ms':>9} {'monitor ms':>11} {'clip ms':>9} "
        f"{'monitor/off':>12} {'clip/off':>9} {'(paired)':>17}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        med = r["median_s"]
        print(
            f"{r['kernel']:<10} {med['off'] * 1e3:9.1f} {med['monitor'] * 1e3:11.1f} "
            f"{med['clip'] * 1e3:9.1f} {r['monitor/off']:12.3f} {r['clip/off']:9.3f} "
            f"{r['monitor/off_paired']:8.3f} {r['clip/off_paired']:8.3f}"
        )
    print(
        "\nratios: of the medians; (paired): median over rounds of the round's ratio "
        "(monitor, clip)"
    )
    if load is not None:
        print(f"load average at the end: {os.getloadavg()}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {"args": vars(a), "backend": jax.default_backend(), "results": results}, f, indent=1
            )


if __name__ == "__main__":
    main()
