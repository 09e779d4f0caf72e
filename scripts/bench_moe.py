"""Step time of a mixture-of-experts Transformer against the dense one of equal
activated parameters: the ratio MoE / dense, one run.

How to run (from the repository root, in the project's environment, on a QUIET
machine: timings on a loaded one mean nothing):

    python scripts/bench_moe.py
    python scripts/bench_moe.py --experts 64 --top-k 6 --shared 2 --dim 512 --layers 8
    python scripts/bench_moe.py --json /tmp/bench_moe.json

Both models are MLA Transformers with the same attention, depth, width and
first dense layer (`--first-dense`); in the MoE one every later layer has
`--experts` routed SwiGLU experts of hidden size `--expert-hidden`, `--top-k`
of them per token, plus `--shared` shared experts. The dense model's MLP hidden
size in those layers is `(top_k + shared) * expert_hidden`: the same matmul
parameters per token (the router's `experts * dim` aside), so the ratio is the
cost of routing, sorting and the grouped matmuls (`jax.lax.ragged_dot_general`)
over dense matmuls of the same FLOPs. The dense model cannot have a different
hidden size in its first layer and the rest, so its first layer has the larger
one too (noted in the output).

Each step is `qc.make_train_step(qc.muon_adamw(...))` (MuonClip, mode clip);
the script compiles it, runs `--warmup` untimed steps, then times `--steps`
steps one by one (`jax.block_until_ready` on everything each returns) and
reports the medians and their ratio, with the machine, the device and the
versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import equinox as eqx
import jax
import numpy as np

import qkclip_eqx as qc


def _model(args: argparse.Namespace, moe: bool) -> qc.Transformer:
    attention = qc.MLAConfig(
        dim=args.dim,
        n_heads=args.heads,
        kv_lora_rank=args.dim // 4,
        qk_nope_head_dim=args.head_dim,
        qk_rope_head_dim=args.head_dim // 2,
        v_head_dim=args.head_dim,
        kernel="blockwise",
    )
    activated = (args.top_k + args.shared) * args.expert_hidden
    config = qc.TransformerConfig(
        vocab_size=args.vocab,
        n_layers=args.layers,
        mlp_hidden=activated,
        attention=attention,
        compute_dtype=args.compute_dtype,
        moe=qc.MoEConfig(
            n_routed_experts=args.experts,
            num_experts_per_tok=args.top_k,
            moe_intermediate_size=args.expert_hidden,
            n_shared_experts=args.shared,
            first_k_dense_replace=args.first_dense,
        )
        if moe
        else None,
    )
    return qc.Transformer(config, key=jax.random.key(0))


def _time(model: qc.Transformer, args: argparse.Namespace) -> float:
    opt = qc.muon_adamw(1e-3)
    state = opt.init(eqx.filter(model, eqx.is_array))
    step = qc.make_train_step(opt, tau=100.0)
    rng = np.random.default_rng(0)
    batch = jax.numpy.asarray(rng.integers(0, args.vocab, (args.batch, args.seq + 1)), "int32")
    for _ in range(args.warmup + 1):  # the first compiles
        model, state, metrics = step(model, state, batch)
        jax.block_until_ready((model, state, metrics))
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        model, state, metrics = step(model, state, batch)
        jax.block_until_ready((model, state, metrics))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--first-dense", type=int, default=1)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--shared", type=int, default=1)
    parser.add_argument("--expert-hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    dense_s = _time(_model(args, moe=False), args)
    moe_s = _time(_model(args, moe=True), args)
    result = {
        "dense_step_s": dense_s,
        "moe_step_s": moe_s,
        "ratio_moe_over_dense": moe_s / dense_s,
        "note": "the dense model's first layer has the activated hidden size too",
        "args": vars(args),
        "device": str(jax.devices()[0].device_kind),
        "machine": platform.platform(),
        "versions": {"jax": jax.__version__, "numpy": np.__version__},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
