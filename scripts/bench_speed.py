"""Train-step speed of qkclip_eqx beside the same model in PyTorch, measured in one run.

How to run (from the repository root, in the project's environment):

    python scripts/bench_speed.py                                   # ours only
    python scripts/bench_speed.py --torch-python /tmp/torch/bin/python   # and PyTorch
    python scripts/bench_speed.py --torch-python ... --torch-compile    # and torch.compile

PyTorch is never a dependency of this project: give the interpreter of a
separate environment that has it (``python3 -m venv /tmp/torch &&
/tmp/torch/bin/pip install torch numpy``). It runs ``scripts/torch_twin.py``,
the same model and optimizer written in eager PyTorch, as a worker process.

The benchmark model: MLA, dim 256, 4 layers, 4 heads, q LoRA rank 96, kv LoRA
rank 64, qk_nope 32, qk_rope 16, v 32, SwiGLU hidden 704, vocab 256, seq 256,
batch 8 (2,048 tokens per step), float32, the dense kernel, Muon + AdamW
(lr 2e-3, wd 0.1) with QK-Clip at tau = 100 (``make_train_step(mode="clip")``).

Every piece is compiled and warmed up first; then the implementations are timed
INTERLEAVED, one call of each per round, so that a change in the machine's load
hits all of them alike. It prints, per implementation, the median ms/step and
tokens/s, the ratios ours / PyTorch, the times of the forward (loss), forward +
backward and optimizer update, and the model FLOPs per step with the MFU
against the float32 matmul peak measured in the same run (a 2048^3 matmul),
and each process's minor page faults and system CPU time per step: XLA:CPU
allocates a step's scratch memory (146 MiB here) afresh at every call, and
glibc maps blocks that large from the kernel each time (docs/benchmarks.md,
"Page faults and the allocator"). Allocator settings in the environment (``LD_PRELOAD``,
``GLIBC_TUNABLES``) apply to both implementations, since the PyTorch workers
inherit them.

Model FLOPs per step: 6 x (parameters in matmuls) x tokens, plus the attention
matmuls (4 x T^2 x (d_qk + d_v) / 2 per head and sequence forward, causal half,
times 3 for forward + backward), plus Newton-Schulz (per m x n matrix, m <= n:
5 x (4 m^2 n + 2 m^3) and 4 m n for the final product's scale).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from qkclip_eqx import (
    MLAConfig,
    Transformer,
    TransformerConfig,
    make_train_step,
    muon_adamw,
    next_token_loss,
)

HERE = pathlib.Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--q-lora", type=int, default=96)
    p.add_argument("--kv-lora", type=int, default=64)
    p.add_argument("--nope", type=int, default=32)
    p.add_argument("--rope", type=int, default=16)
    p.add_argument("--v", type=int, default=32)
    p.add_argument("--mlp", type=int, default=704)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--kernel", default="dense", choices=("dense", "blockwise"))
    p.add_argument("--rounds", type=int, default=20, help="timed rounds of whole steps")
    p.add_argument("--piece-rounds", type=int, default=8, help="timed rounds of each piece")
    p.add_argument(
        "--torch-python",
        default=os.environ.get("QKCLIP_TORCH_PYTHON"),
        help="a Python interpreter with torch (default: $QKCLIP_TORCH_PYTHON)",
    )
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile")
    p.add_argument("--peak-n", type=int, default=2048, help="size of the matmul timed for the peak")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def model_config(a) -> TransformerConfig:
    att = MLAConfig(
        dim=a.dim,
        n_heads=a.heads,
        q_lora_rank=a.q_lora,
        kv_lora_rank=a.kv_lora,
        qk_nope_head_dim=a.nope,
        qk_rope_head_dim=a.rope,
        v_head_dim=a.v,
        kernel=a.kernel,
    )
    return TransformerConfig(vocab_size=a.vocab, n_layers=a.layers, mlp_hidden=a.mlp, attention=att)


def model_flops(a) -> dict:
    """FLOPs of one train step, by part (see the module docstring)."""
    mats = [  # per layer, (out, in)
        (a.q_lora, a.dim),
        (a.heads * (a.nope + a.rope), a.q_lora),
        (a.kv_lora + a.rope, a.dim),
        (a.heads * (a.nope + a.v), a.kv_lora),
        (a.dim, a.heads * a.v),
        (a.mlp, a.dim),
        (a.mlp, a.dim),
        (a.dim, a.mlp),
    ]
    tokens = a.batch * a.seq
    matmul_params = a.layers * sum(o * i for o, i in mats) + a.vocab * a.dim  # + LM head
    dense = 6 * matmul_params * tokens
    attn_fwd = a.batch * a.layers * a.heads * 2 * a.seq**2 * ((a.nope + a.rope) + a.v) / 2
    ns = 0
    for o, i in mats:
        m, n = min(o, i), max(o, i)
        ns += a.layers * (5 * (4 * m * m * n + 2 * m**3) + 4 * m * n)
    return {
        "matmuls": dense,
        "attention": 3 * attn_fwd,
        "newton_schulz": ns,
        "total": dense + 3 * attn_fwd + ns,
    }


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Float32 FLOP/s of one n^3 matmul, the best of ``reps``."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(x, x).block_until_ready()
    best = min(_timed(lambda: f(x, x).block_until_ready()) for _ in range(reps))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _timed_with_faults(fn) -> tuple[float, int, float]:
    """Seconds, minor page faults and system CPU seconds of one call of ``fn``
    (the faults and system time of the whole process, all its threads)."""
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    dt = _timed(fn)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return dt, r1.ru_minflt - r0.ru_minflt, r1.ru_stime - r0.ru_stime


class Ours:
    """The public API as a user calls it, one jitted piece per timing."""

    def __init__(self, a):
        self.model = Transformer(model_config(a), key=jax.random.key(0))
        rng = np.random.default_rng(0)
        self.tokens = [
            jnp.asarray(rng.integers(0, a.vocab, (a.batch, a.seq + 1)), jnp.int32) for _ in range(4)
        ]
        self.optimizer = muon_adamw(2e-3, weight_decay=0.1)
        self.opt_state = self.optimizer.init(eqx.filter(self.model, eqx.is_array))
        self.train_step = make_train_step(self.optimizer, mode="clip", tau=100.0)
        self._fwd = eqx.filter_jit(lambda m, t: next_token_loss(m, t)[0])
        self._fwdbwd = eqx.filter_jit(
            lambda m, t: eqx.filter_value_and_grad(lambda m: next_token_loss(m, t)[0])(m)
        )
        # the update piece works on copies: the step donates the model and its state
        copy = lambda tree: jax.tree.map(jnp.copy, eqx.filter(tree, eqx.is_array))  # noqa: E731
        self.params, self.update_state = copy(self.model), copy(self.opt_state)
        self.grads = self._fwdbwd(self.model, self.tokens[0])[1]
        self._update = eqx.filter_jit(
            lambda g, s, p: eqx.apply_updates(p, self.optimizer.update(g, s, p)[0])
        )
        self.i = 0

    def _batch(self):
        self.i += 1
        return self.tokens[self.i % 4]

    def step(self):
        # the step donates the model and optimizer state: keep what it returns
        self.model, self.opt_state, metrics = self.train_step(
            self.model, self.opt_state, self._batch()
        )
        jax.block_until_ready((self.model, self.opt_state, metrics))

    def fwd(self):
        jax.block_until_ready(self._fwd(self.model, self._batch()))

    def fwdbwd(self):
        jax.block_until_ready(self._fwdbwd(self.model, self._batch()))

    def update(self):
        jax.block_until_ready(self._update(self.grads, self.update_state, self.params))


class TorchWorker:
    """``scripts/torch_twin.py --serve`` in another interpreter; one piece per request."""

    def __init__(self, python: str, a, compile: bool):
        args = [
            python,
            str(HERE / "torch_twin.py"),
            "--serve",
            "--dim",
            str(a.dim),
            "--layers",
            str(a.layers),
            "--heads",
            str(a.heads),
            "--q-lora",
            str(a.q_lora),
            "--kv-lora",
            str(a.kv_lora),
            "--nope",
            str(a.nope),
            "--rope",
            str(a.rope),
            "--v",
            str(a.v),
            "--mlp",
            str(a.mlp),
            "--vocab",
            str(a.vocab),
            "--seq",
            str(a.seq),
            "--batch",
            str(a.batch),
        ]
        if compile:
            args.append("--compile")
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.version = self.proc.stdout.readline().strip()
        if not self.version.startswith("ready"):
            raise RuntimeError(f"the torch worker did not start: {self.version!r}")

    def __call__(self, piece: str) -> tuple[float, int, float]:
        self.proc.stdin.write(piece + "\n")
        self.proc.stdin.flush()
        seconds, faults, system = self.proc.stdout.readline().split()
        return float(seconds), int(faults), float(system)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def interleave(impls: dict, piece: str, rounds: int) -> dict[str, list[tuple[float, int, float]]]:
    """``rounds`` rounds of one call of ``piece`` per implementation, order
    rotating; each call gives (seconds, minor page faults, system seconds)."""
    names = list(impls)
    calls = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            calls[n].append(impls[n](piece))
    return calls


def main(argv=None) -> None:
    a = parse_args(argv)
    print(
        f"{platform.node()}: {os.cpu_count()} CPUs, {jax.default_backend()}, jax {jax.__version__}, "
        f"Python {platform.python_version()}, load {os.getloadavg()}"
    )
    allocator = {k: os.environ[k] for k in ("LD_PRELOAD", "GLIBC_TUNABLES") if k in os.environ}
    print(f"allocator settings (the torch workers inherit them): {allocator or 'none (glibc)'}")
    ours = Ours(a)
    for piece in ("step", "fwd", "fwdbwd", "update"):  # compile and warm up
        for _ in range(3):
            getattr(ours, piece)()
    impls = {"qkclip_eqx": lambda piece: _timed_with_faults(getattr(ours, piece))}
    workers = []
    if a.torch_python:
        workers.append(("pytorch eager", TorchWorker(a.torch_python, a, compile=False)))
        if a.torch_compile:
            workers.append(("torch.compile", TorchWorker(a.torch_python, a, compile=True)))
        for name, w in workers:
            for _ in range(3):
                w("step")
            impls[name] = w
            print(f"{name}: {w.version[len('ready ') :]}")
    else:
        print("no --torch-python: timing qkclip_eqx alone")

    peak_before = matmul_peak(a.peak_n)
    calls = {"step": interleave(impls, "step", a.rounds)}
    for piece in ("fwd", "fwdbwd", "update"):
        calls[piece] = interleave(impls, piece, a.piece_rounds)
    peak = max(peak_before, matmul_peak(a.peak_n))
    for _, w in workers:
        w.close()

    tokens = a.batch * a.seq
    flops = model_flops(a)
    results = {p: {n: [c[0] for c in cs] for n, cs in r.items()} for p, r in calls.items()}
    med = {p: {n: statistics.median(t) for n, t in r.items()} for p, r in results.items()}
    print(
        f"\nbenchmark model: MLA dim {a.dim}, {a.layers} layers, {a.heads} heads, seq {a.seq}, "
        f"batch {a.batch} ({tokens} tokens/step), {a.kernel} kernel, float32, clip mode"
    )
    print(
        f"model FLOPs/step {flops['total'] / 1e9:.1f} G (matmuls {flops['matmuls'] / 1e9:.1f}, "
        f"attention {flops['attention'] / 1e9:.1f}, Newton-Schulz {flops['newton_schulz'] / 1e9:.1f}); "
        f"float32 matmul peak {peak / 1e9:.0f} GFLOP/s ({a.peak_n}^3, this run)"
    )
    head = (
        f"{'':16s} {'ms/step':>8s} {'tokens/s':>9s} {'MFU':>6s} {'fwd ms':>7s} {'fwd+bwd':>8s} "
        f"{'bwd/fwd':>8s} {'update':>7s} {'faults':>7s} {'sys ms':>7s}"
    )
    print(head)
    for n in impls:
        st = med["step"][n]
        faults = statistics.median(c[1] for c in calls["step"][n])
        system = statistics.median(c[2] for c in calls["step"][n])
        print(
            f"{n:16s} {st * 1e3:8.1f} {tokens / st:9.0f} {flops['total'] / st / peak:6.1%} "
            f"{med['fwd'][n] * 1e3:7.1f} {med['fwdbwd'][n] * 1e3:8.1f} "
            f"{med['fwdbwd'][n] / med['fwd'][n]:8.2f} {med['update'][n] * 1e3:7.1f} "
            f"{faults:7.0f} {system * 1e3:7.1f}"
        )
    print(
        "faults, sys ms: minor page faults and system CPU time of one step (median), the "
        "process's own; see docs/benchmarks.md on XLA:CPU's scratch memory and the allocator"
    )
    for n in impls:
        if n != "qkclip_eqx":
            paired = statistics.median(
                [t / o for o, t in zip(results["step"]["qkclip_eqx"], results["step"][n])]
            )
            print(
                f"tokens/s qkclip_eqx / {n}: {med['step'][n] / med['step']['qkclip_eqx']:.2f} "
                f"(median of per-round ratios {paired:.2f})"
            )
    print(f"load average at the end: {os.getloadavg()}")
    if a.json:
        pathlib.Path(a.json).write_text(
            json.dumps(
                {
                    "args": vars(a),
                    "flops": flops,
                    "peak": peak,
                    "times_s": results,
                    "step_page_faults": {n: [c[1] for c in cs] for n, cs in calls["step"].items()},
                    "step_system_s": {n: [c[2] for c in cs] for n, cs in calls["step"].items()},
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
