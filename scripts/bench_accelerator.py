"""Throughput of the ``gpu-100m`` model on whatever device JAX finds: tokens/s,
MFU against the device's dense bf16 peak, and peak device memory.

How to run (from the repository root, in the project's environment):

    python scripts/bench_accelerator.py                      # the device JAX picks
    python scripts/bench_accelerator.py --peak-tflops 989    # give the peak yourself
    python scripts/bench_accelerator.py --shape full --steps 3   # gpu-100m even on CPU (slow)
    python scripts/bench_accelerator.py --json /tmp/bench.json

The model, optimizer and step are those of ``qkclip-train --preset gpu-100m``:
MLA, 15 layers, dim 768, ~100M parameters, the blockwise kernel, float32
parameters and optimizer state with bfloat16 compute, MuonClip (mode clip),
batch 64 x seq 1024 (``--batch`` and ``--seq`` change them). On a CPU the
default ``--shape auto`` runs a scaled-down model (2 layers, dim 128, batch 2 x
seq 256) so that the script itself can be exercised; its figures say nothing
about an accelerator.

It compiles the step, runs ``--warmup`` untimed steps, then times ``--steps``
steps one by one (``jax.block_until_ready`` on everything each returns) and
reports the median.

FLOPs per step (what MFU counts; Chowdhery et al. 2022, PaLM, arXiv 2204.02311,
App. B): ``6 N T`` for the N matmul parameters (every weight matrix of the
blocks and the LM head; not the embedding, a gather) over T tokens, plus the
attention matmuls, ``6 * 2 * layers * heads * (d_qk + d_v) * seq / 2`` per
token: Q K^T and P V forward (x1) and backward (x2), the causal mask halving
the work (the blockwise kernel skips the empty tiles). Remat's recomputation is
not counted (it is not model FLOPs). MFU = FLOPs per step / step time / peak.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from qkclip_eqx import RunConfig, Transformer, make_train_step, preset

# Dense (no sparsity) bf16 peak per chip, TFLOP/s, from the vendors' data
# sheets, matched against jax's device_kind (case-insensitive, first match).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h200", 989.0),
    ("h100", 989.0),  # SXM; the PCIe H100 is 756
    ("gh200", 989.0),
    ("b200", 2250.0),
    ("a100", 312.0),
    ("l40s", 362.0),
    ("l4", 121.0),
    ("a10g", 125.0),
    ("tpu v6", 918.0),
    ("tpu v5p", 459.0),
    ("tpu v5 lite", 197.0),
    ("tpu v5e", 197.0),
    ("tpu v4", 275.0),
)

# The scaled-down shape run on a CPU (--shape auto or small).
SMALL = dict(
    n_layers=2,
    dim=128,
    n_heads=4,
    q_lora_rank=64,
    kv_lora_rank=32,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    mlp_hidden=256,
    batch_size=2,
    seq_len=256,
    block_size=128,
)


def default_peak_tflops(device_kind: str) -> float | None:
    """The dense bf16 peak for a device kind, or None when it is not in the table."""
    kind = device_kind.lower()
    for name, peak in PEAK_BF16_TFLOPS:
        if name in kind:
            return peak
    return None


def run_config(shape: str, platform_name: str, batch: int | None, seq: int | None) -> RunConfig:
    """``gpu-100m``, scaled down for ``shape="small"`` (or ``"auto"`` on a CPU)."""
    small = shape == "small" or (shape == "auto" and platform_name == "cpu")
    overrides = dict(SMALL) if small else {}
    if batch is not None:
        overrides["batch_size"] = batch
    if seq is not None:
        overrides["seq_len"] = seq
    return preset("gpu-100m", **overrides)


def flops_per_step(model: Transformer, batch: int, seq: int) -> tuple[float, int]:
    """(model FLOPs of one train step, matmul parameter count N); see the docstring."""
    cfg = model.config
    n = model.lm_head.size + sum(
        x.size for x in jax.tree.leaves(eqx.filter(model.blocks, eqx.is_array)) if x.ndim >= 3
    )  # stacked [layers, ...] leaves: matrices have ndim >= 3, norm gains 2
    att = cfg.attention
    d_qk = att.qk_head_dim if hasattr(att, "qk_head_dim") else att.head_dim
    d_v = att.v_head_dim if hasattr(att, "v_head_dim") else att.head_dim
    tokens = batch * seq
    attention = 6 * 2 * cfg.n_layers * att.n_heads * (d_qk + d_v) * seq / 2 * tokens
    return 6.0 * n * tokens + attention, n


def peak_memory_bytes(device: jax.Device) -> tuple[int | None, str]:
    """Peak bytes in use on the device (``memory_stats``), else the process's
    peak resident set (on a CPU, where the device memory is the host's)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss * (1 if sys.platform == "darwin" else 1024)), "host peak RSS (no device stats)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shape",
        default="auto",
        choices=("auto", "full", "small"),
        help="full: gpu-100m; small: scaled down; auto: small on CPU, else full",
    )
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="dense bf16 peak of one device, TFLOP/s (default: by device kind)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a RunConfig field (int), e.g. --set n_layers=1",
    )
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    device = jax.devices()[0]
    cfg = run_config(a.shape, device.platform, a.batch, a.seq)
    if a.set:
        fields = dict(kv.split("=", 1) for kv in a.set)
        cfg = RunConfig(**{**cfg.__dict__, **{k: int(v) for k, v in fields.items()}})
    model = Transformer(cfg.model_config(256), key=jax.random.key(cfg.seed))
    opt = cfg.make_optimizer()
    state = opt.init(eqx.filter(model, eqx.is_array))
    step = make_train_step(opt, mode=cfg.mode, tau=cfg.tau, alpha=cfg.alpha)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(
        rng.integers(0, 256, size=(cfg.batch_size, cfg.seq_len + 1), dtype=np.int32)
    )

    t0 = time.perf_counter()
    model, state, metrics = jax.block_until_ready(step(model, state, tokens))
    compile_s = time.perf_counter() - t0
    for _ in range(a.warmup):
        model, state, metrics = jax.block_until_ready(step(model, state, tokens))
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        model, state, metrics = jax.block_until_ready(step(model, state, tokens))
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)

    flops, n_matmul = flops_per_step(model, cfg.batch_size, cfg.seq_len)
    n_params = sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    peak = a.peak_tflops if a.peak_tflops is not None else default_peak_tflops(device.device_kind)
    mem, mem_source = peak_memory_bytes(device)
    dtypes = sorted(
        {str(x.dtype) for x in jax.tree.leaves(eqx.filter((model, state), eqx.is_inexact_array))}
    )
    out = {
        "device": f"{device.platform} {device.device_kind}",
        "n_devices_used": 1,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "shape": {
            k: getattr(cfg, k)
            for k in (
                "n_layers",
                "dim",
                "n_heads",
                "mlp_hidden",
                "batch_size",
                "seq_len",
                "kernel",
                "block_size",
                "param_dtype",
                "compute_dtype",
            )
        },
        "params": int(n_params),
        "matmul_params": int(n_matmul),
        "param_and_state_dtypes": dtypes,
        "compile_plus_first_step_s": compile_s,
        "step_s_median": step_s,
        "step_s_all": times,
        "tokens_per_s": cfg.batch_size * cfg.seq_len / step_s,
        "model_tflops_per_step": flops / 1e12,
        "achieved_tflops": flops / step_s / 1e12,
        "peak_bf16_tflops": peak,
        "mfu": None if peak is None else flops / step_s / (peak * 1e12),
        "peak_memory_bytes": mem,
        "peak_memory_source": mem_source,
        "final_loss": float(metrics["loss"]),
    }
    print(f"device {out['device']} | jax {out['jax']} | python {out['python']}")
    print(f"model {n_params / 1e6:.1f}M params ({n_matmul / 1e6:.1f}M in matmuls); {out['shape']}")
    print(
        f"compile + first step {compile_s:.1f} s; median step {step_s * 1e3:.1f} ms over {a.steps}"
    )
    print(f"tokens/s {out['tokens_per_s']:,.0f} | {out['achieved_tflops']:.2f} TFLOP/s achieved")
    if peak is None:
        print("MFU: n/a (no peak known for this device; pass --peak-tflops)")
    else:
        print(f"MFU {100 * out['mfu']:.1f}% of {peak:g} TFLOP/s dense bf16")
    print(f"peak memory {mem / 2**30:.2f} GiB ({mem_source}); loss {out['final_loss']:.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
