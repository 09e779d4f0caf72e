"""Per-device memory of parameters + optimizer state, and of the compiled train
step, on each mesh; optionally the step time as a ratio to one device.

    python scripts/bench_memory.py              # byte counts only (any machine)
    python scripts/bench_memory.py --time 20    # also the step-time ratio (a QUIET machine)

Uses 8 simulated CPU devices (XLA_FLAGS is set before JAX starts). The model
is an MLA Transformer whose MLP holds most of the weights (the case FSDP and
the tensor-parallel MLP are for). For each mesh it prints:

- `state/dev`: the largest, over devices, of the bytes of the parameter and
  optimizer-state shards that device holds (from the arrays' shardings: each
  addressable shard's `nbytes`), and that as a multiple of total / devices
  (the target on fsdp=8 is at most 1.15);
- the compiled step's `memory_analysis()` per device: `arguments` (the
  donated model and state, and the batch), `temporaries` (gradients,
  gathered layers, activations, Newton-Schulz work) and `outputs`;
- with `--time N`: the median step time over N interleaved rounds, and its
  ratio to one device. On simulated devices the 8 "devices" share the host's
  cores, so the ratio measures the cost of the sharding and the collectives,
  not a speed-up; time it only on an otherwise idle machine.

`--muon` adds, for the two placements of Muon's Newton-Schulz step on sharded
state (`muon_adamw(ns_sharding="owner" | "gather")`), the optimizer update
compiled alone on each mesh: the bytes each device moves (the collectives'
operand sizes, read from the compiled HLO) and the FLOPs per device (XLA's
`cost_analysis()`), against one device's.

`--json PATH` writes the numbers (docs/parallelism.md's largest-model table is
computed from them: bytes per parameter per device).
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import qkclip_eqx as qc  # noqa: E402

MESHES = {
    "1 device": None,
    "fsdp=8": dict(fsdp=8),
    "fsdp=4,model=2": dict(fsdp=4, model=2),
    "data=2,fsdp=2,model=2": dict(data=2, fsdp=2, model=2),
}


def model_config() -> qc.TransformerConfig:
    attn = qc.MLAConfig(
        dim=256,
        n_heads=8,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
    )
    return qc.TransformerConfig(vocab_size=512, n_layers=4, mlp_hidden=2048, attention=attn)


def bytes_per_device(tree) -> dict:
    """Bytes of `tree`'s array shards held by each device."""
    held = defaultdict(int)
    for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array)):
        for shard in x.addressable_shards:
            held[shard.device] += shard.data.nbytes
    return held


DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "f64": 8, "s64": 8}


OPS = ("all-gather", "all-reduce", "all-to-all", "reduce-scatter", "collective-permute")


def _group_size(line: str) -> int:
    """The replica-group size of one collective, in any of XLA's three spellings."""
    if m := re.search(r"replica_groups=\{\{([\d,]*)\}", line):
        return len(m.group(1).split(","))
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line):
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
        return int(np.prod([int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2))]))
    if m := re.search(r"replica_groups=\[\d+,(\d+)\]<=", line):
        return int(m.group(1))
    return 1  # collective-permute: pairs


def collective_bytes(hlo: str, wire: bool = False) -> dict:
    """Bytes per device in each kind of collective, from a compiled SPMD HLO
    module: the operands' size (an all-gather's operand is its result over the
    group size `g`; a reduce-scatter's, its result times `g`), or with `wire`
    the bytes each device receives under ring algorithms ((g-1)/g of an
    all-gather's result, of an all-to-all's or a reduce-scatter's operand,
    twice that of an all-reduce's)."""
    moved = defaultdict(int)
    for line in hlo.splitlines():
        m = re.search(r"= (.*?) (" + "|".join(OPS) + r")(?:-start)?\(", line)
        if m is None or "-done" in line:
            continue
        result, op = m.groups()
        size = sum(
            DTYPE_BYTES.get(t, 4) * int(np.prod([int(d) for d in dims.split(",") if d]))
            for t, dims in re.findall(r"(\w+)\[([\d,]*)\]", result)
        )
        g = _group_size(line)
        if g == 1 and op != "collective-permute":
            continue  # a group of one moves nothing
        operand = size // g if op == "all-gather" else size * g if op == "reduce-scatter" else size
        if wire:
            share = operand * g if op == "all-gather" else operand
            operand = share * (g - 1) // g * (2 if op == "all-reduce" else 1)
        moved[op] += operand
    return dict(moved)


def muon_table(cfg: qc.TransformerConfig) -> dict:
    """The optimizer update alone, compiled per mesh and Newton-Schulz placement."""
    out = {}
    for name, shape in MESHES.items():
        for scheme in ("owner", "gather") if shape else ("owner",):
            mesh = None if shape is None else qc.make_mesh(**shape)
            opt = qc.muon_adamw(1e-3, ns_sharding=scheme)
            m = qc.Transformer(cfg, key=jax.random.key(0))
            state = opt.init(eqx.filter(m, eqx.is_array))
            if mesh is not None:
                m, state = qc.shard_train_state(m, state, opt, mesh)
            params = eqx.filter(m, eqx.is_array)

            def update(grads, state, params, mesh=mesh, opt=opt):
                if mesh is None:
                    return opt.update(grads, state, params)
                with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                    return opt.update(grads, state, params)

            compiled = jax.jit(update).lower(params, state, params).compile()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            moved = collective_bytes(compiled.as_text())
            wire = collective_bytes(compiled.as_text(), wire=True)
            out[f"{name} {scheme}" if shape else name] = dict(
                flops=float(cost.get("flops", 0.0)),
                operand_bytes=sum(moved.values()),
                wire_bytes=sum(wire.values()),
                by_op=moved,
            )
    base = out["1 device"]["flops"]
    print(
        f"{'mesh, Newton-Schulz':>30} {'operands MB':>12} {'received MB':>12} {'GFLOP/dev':>10} "
        f"{'x 1 device':>11}"
    )
    for name, r in out.items():
        print(
            f"{name:>30} {r['operand_bytes'] / 1e6:12.2f} {r['wire_bytes'] / 1e6:12.2f} "
            f"{r['flops'] / 1e9:10.3f} {r['flops'] / base:11.3f}   {r['by_op']}"
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--time", type=int, default=0, metavar="N", help="time N rounds (quiet box)")
    p.add_argument("--json", default=None, help="write the numbers here")
    p.add_argument("--muon", action="store_true", help="Newton-Schulz placements: bytes, FLOPs")
    p.add_argument("--skip-state", action="store_true", help="only --muon")
    args = p.parse_args()
    cfg = model_config()
    tokens = np.random.default_rng(0).integers(
        0, cfg.vocab_size, (args.batch, args.seq + 1), dtype=np.int32
    )
    model = qc.Transformer(cfg, key=jax.random.key(0))
    params = eqx.filter(model, eqx.is_array)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    mlp = sum(x.size for x in jax.tree.leaves(eqx.filter(model.blocks.mlp, eqx.is_array)))
    print(
        f"MLA Transformer: {n_params:,} parameters ({mlp / n_params:.0%} in the MLP), "
        f"{cfg.n_layers} layers, dim {cfg.attention.dim}, MLP {cfg.mlp_hidden}; MuonClip "
        f"(Muon + AdamW), float32; batch {args.batch} x seq {args.seq}; "
        f"{jax.device_count()} simulated CPU devices; jax {jax.__version__}"
    )
    rows, runs = {}, {}
    if args.muon:
        rows["muon"] = muon_table(cfg)
    for name, shape in {} if args.skip_state else MESHES.items():
        mesh = None if shape is None else qc.make_mesh(**shape)
        n_dev = 1 if mesh is None else mesh.size
        opt = qc.muon_adamw(1e-3)
        m = qc.Transformer(cfg, key=jax.random.key(0))
        state = opt.init(eqx.filter(m, eqx.is_array))
        if mesh is not None:
            m, state = qc.shard_train_state(m, state, opt, mesh)
        batch = jax.numpy.asarray(tokens) if mesh is None else qc.shard_batch(tokens, mesh)
        held = bytes_per_device((m, state))
        total = sum(x.nbytes for x in jax.tree.leaves(eqx.filter((m, state), eqx.is_array)))
        if mesh is None:
            total = max(held.values())
        step = qc.make_train_step(opt, mesh=mesh)
        mem = step.lower(m, state, batch).compile().compiled.memory_analysis()
        rows[name] = dict(
            devices=n_dev,
            parameters=n_params,
            state_total=total,
            state_per_device=max(held.values()),
            state_ratio=max(held.values()) / (total / n_dev),
            arguments=mem.argument_size_in_bytes,
            temporaries=mem.temp_size_in_bytes,
            outputs=mem.output_size_in_bytes,
            aliased=mem.alias_size_in_bytes,
        )
        runs[name] = [step, m, state, batch]
    if args.skip_state:
        rows = {"muon": rows.get("muon", {})}
    else:
        print(
            f"{'mesh':>22} {'state/dev MB':>13} {'x total/dev':>12} {'arguments MB':>13} "
            f"{'temporaries MB':>15} {'outputs MB':>11}"
        )
    for name, r in rows.items():
        if name == "muon":
            continue
        print(
            f"{name:>22} {r['state_per_device'] / 1e6:13.2f} {r['state_ratio']:12.3f} "
            f"{r['arguments'] / 1e6:13.2f} {r['temporaries'] / 1e6:15.2f} "
            f"{r['outputs'] / 1e6:11.2f}"
        )
    if args.time:
        times = {name: [] for name in runs}
        for rep in range(args.time + 2):  # round-robin; the first 2 rounds warm up
            for name, run in runs.items():
                step, m, state, batch = run
                t = time.perf_counter()
                m, state, metrics = step(m, state, batch)
                jax.block_until_ready((m, metrics))
                run[1:3] = m, state
                if rep >= 2:
                    times[name].append(time.perf_counter() - t)
        base = statistics.median(times["1 device"])
        print(f"{'mesh':>22} {'median ms':>10} {'vs 1 device':>12}")
        for name, ts in times.items():
            rows[name]["step_s"] = statistics.median(ts)
            print(
                f"{name:>22} {1e3 * statistics.median(ts):10.1f} {rows[name]['step_s'] / base:12.2f}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
