"""Step time on each mesh relative to one device, measured interleaved in one run.

    python scripts/bench_mesh.py [--repeats 20]

Uses 8 simulated CPU devices (XLA_FLAGS is set before JAX starts). On one CPU
these "devices" share the same cores, so the ratios measure the overhead of
sharding and collectives, not a speed-up; on real accelerators each device has
its own compute and the data axis divides the per-device work.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import qkclip_eqx as qc  # noqa: E402

MESHES = {
    "1 device": None,
    "data=8": dict(data=8),
    "data=4,model=2": dict(data=4, model=2),
    "data=2,seq=4": dict(data=2, seq=4),
    "data=2,model=2,seq=2": dict(data=2, model=2, seq=2),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args()
    attn = qc.MLAConfig(
        dim=128, n_heads=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32
    )
    cfg = qc.TransformerConfig(vocab_size=256, n_layers=4, mlp_hidden=384, attention=attn)
    tokens = np.random.default_rng(0).integers(0, 256, (args.batch, args.seq + 1), dtype=np.int32)
    runs = {}
    for name, shape in MESHES.items():
        mesh = None if shape is None else qc.make_mesh(**shape)
        model = qc.Transformer(cfg, key=jax.random.key(0))
        opt = qc.muon_adamw(1e-3)
        state = opt.init(eqx.filter(model, eqx.is_array))
        if mesh is not None:
            model, state = qc.shard_train_state(model, state, opt, mesh)
        batch = jax.numpy.asarray(tokens) if mesh is None else qc.shard_batch(tokens, mesh)
        runs[name] = [qc.make_train_step(opt, mesh=mesh), model, state, batch]
    times = {name: [] for name in runs}
    for rep in range(args.repeats + 2):  # round-robin; the first 2 rounds warm up
        for name, run in runs.items():
            step, model, state, batch = run
            t = time.perf_counter()
            model, state, m = step(model, state, batch)
            jax.block_until_ready((model, m))
            run[1:3] = model, state
            if rep >= 2:
                times[name].append(time.perf_counter() - t)
    base = statistics.median(times["1 device"])
    print(
        f"MLA Transformer (4 layers, dim 128, 4 heads), batch {args.batch}, seq {args.seq}, "
        f"{args.repeats} interleaved repeats, {jax.device_count()} simulated CPU devices"
    )
    print(f"{'mesh':>22} {'median ms':>10} {'vs 1 device':>12}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:>22} {1e3 * med:10.1f} {med / base:12.2f}")


if __name__ == "__main__":
    main()
