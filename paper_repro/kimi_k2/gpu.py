"""The GPU preset: one command for one lent accelerator for about 10 minutes,
start-up included (prepared and checked on CPU at a tiny size; not yet run
or timed on a GPU).

    python -m paper_repro.kimi_k2.gpu --out DIR            # widths 512 and 1024
    python -m paper_repro.kimi_k2.gpu --tiny --out DIR     # the same code, tiny (width 32), on CPU

Per width (smallest first):

1. Unclipped Muon at 4 lrs around the lr* the CPU map predicts (v3's Muon
   best lr against width, a power law fitted to ``results/summary.json``,
   carried to the width): 0.316, 1, 3.16 and 10 x the prediction.
2. best = the lowest final validation loss of those; MuonClip (tau = 100)
   and AdamW (equal lr: the comparison v3's post-hoc section found natural
   for RMS-matched Muon) at best and at 3.16 x best.

Every run writes a compact log (``DIR/logs/NAME.npz``: the loss and the
largest S per layer at every step, each head's peak S, the clipped-head
count per step, the final validation loss) and ``DIR/summary.json`` is
rewritten after each run, so a run cut off by the lease leaves everything
before it. A deadline (``--deadline-min``, default 9) stops launching runs
once passed. The model is ``settings.GPU``'s (4 layers, heads of 32 + 16
dims, bfloat16 compute, float32 parameters and optimizer state).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import shutil
import tempfile
import time
from typing import Any

import numpy as np

from . import settings as S

HERE = pathlib.Path(__file__).resolve().parent
TAU = 100.0  # K2's production tau
LR_FACTORS = (10**-0.5, 1.0, 10**0.5, 10.0)  # x the predicted lr*
CLIP_FACTORS = (1.0, 10**0.5)  # x the best unclipped lr


@dataclasses.dataclass(frozen=True)
class Preset:
    """The sizes of one GPU-preset invocation."""

    name: str
    widths: tuple[int, ...]
    model_kw: dict[str, Any]
    extra: dict[str, Any]
    batch_size: int
    seq_len: int
    steps: int
    warmup_steps: int
    probe_windows: int
    val_windows: int
    weight_decay: float = 0.1
    decay_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.val_windows % self.probe_windows:
            raise ValueError("Preset.val_windows must be a multiple of probe_windows")
        if not 0 < self.warmup_steps < self.steps:
            raise ValueError(f"Preset.warmup_steps must be in (0, steps), got {self.warmup_steps}")

    def model(self, width: int) -> dict[str, Any]:
        return {**S.model(width, **self.model_kw), **self.extra}

    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


GPU = Preset(
    name="gpu",
    widths=(512, 1024),
    model_kw=S.GPU.model_kw,
    extra=S.GPU.extra,
    batch_size=16,
    seq_len=256,
    steps=600,
    warmup_steps=30,
    probe_windows=64,
    val_windows=512,
)
TINY = Preset(
    name="tiny",
    widths=(32,),
    model_kw=dict(layers=1, head=16, rope=4),
    extra=S.GPU.extra,  # the preset's bfloat16 compute path, on CPU
    batch_size=2,
    seq_len=16,
    steps=6,
    warmup_steps=2,
    probe_windows=4,
    val_windows=8,
)
PRESETS = {"gpu": GPU, "tiny": TINY}


def predicted_lr_star(summary: dict[str, Any], widths: tuple[int, ...]) -> dict[int, float]:
    """lr* = c width^p fitted in log-log to the CPU map's Muon best lr per
    width (``summary["best"]``), evaluated at ``widths``: an extrapolation,
    and the reason the preset brackets it by 0.316-10x."""
    pts = {int(w): b["muon"]["lr"] for w, b in summary["best"].items() if b["muon"]["lr"]}
    if len(pts) < 2:
        raise ValueError(f"predicted_lr_star: the CPU map has {len(pts)} widths with a best lr")
    fit = S.power_fit(list(pts), list(pts.values()))
    return {w: fit["c"] * w ** fit["p"] for w in widths}


def model_params(p: Preset, width: int) -> int:
    """Parameters of the preset's model at ``width`` (byte vocabulary): for
    the 6ND estimate of the plan, counted without building the model."""
    m = p.model(width)
    d, h, L = m["dim"], m["n_heads"], m["n_layers"]
    qk = m["qk_nope_head_dim"] + m["qk_rope_head_dim"]
    r = m["kv_lora_rank"]
    attn = (
        d * h * qk
        + d * (r + m["qk_rope_head_dim"])
        + r * h * (m["qk_nope_head_dim"] + m["v_head_dim"])
    )
    attn += h * m["v_head_dim"] * d + r  # output projection, kv norm
    mlp = 3 * d * m["mlp_hidden"]
    return L * (attn + mlp + 2 * d) + 2 * 256 * d + d


def plan(p: Preset) -> dict[str, Any]:
    """Runs, steps and training FLOPs (6ND) of one invocation."""
    per_width = len(LR_FACTORS) + 2 * len(CLIP_FACTORS)
    flops = sum(
        6 * model_params(p, w) * p.tokens_per_step() * p.steps * per_width for w in p.widths
    )
    return {
        "runs": per_width * len(p.widths),
        "steps": per_width * len(p.widths) * p.steps,
        "flops": flops,
    }


def _compact(log: dict[str, np.ndarray], tau: float) -> dict[str, np.ndarray]:
    s = log["s"]  # [steps, layers, heads]
    return {
        "loss": log["loss"].astype(np.float32),
        "lr": log["lr"].astype(np.float32),
        "s_max": np.max(s, axis=2).astype(np.float32),  # [steps, layers]
        "head_peak": np.max(np.where(np.isfinite(s), s, -np.inf), axis=0).astype(np.float32),
        "clipped_heads": np.sum(s > tau, axis=(1, 2)).astype(np.int16),
        "val_loss": np.float32(log["val_loss"]),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m paper_repro.kimi_k2.gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--out", required=True, help="folder for summary.json and logs/")
    ap.add_argument("--tiny", action="store_true", help="the tiny CPU check of the same code")
    ap.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    ap.add_argument("--deadline-min", type=float, default=9.0, help="launch no run after this")
    ap.add_argument("--summary", default=str(HERE / "results" / "summary.json"),
                    help="the CPU map whose best lrs predict lr*")  # fmt: skip
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    p = TINY if args.tiny else GPU
    if args.steps is not None:
        if args.steps <= p.warmup_steps:
            raise ValueError(f"--steps must exceed the warmup ({p.warmup_steps}), got {args.steps}")
        p = dataclasses.replace(p, steps=args.steps)

    import jax  # after argument checks: the import starts the backend

    from . import runner
    from .corpus import load_corpus

    out = pathlib.Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="kimi_k2_gpu_"))
    data, corpus = load_corpus()
    probe = runner.spread_windows(data.val, p.probe_windows, p.seq_len)
    val = runner.spread_windows(data.val, p.val_windows, p.seq_len)
    pred = predicted_lr_star(json.loads(pathlib.Path(args.summary).read_text()), p.widths)
    summ: dict[str, Any] = {
        "preset": p.name,
        "steps": p.steps,
        "batch": [p.batch_size, p.seq_len],
        "tau": TAU,
        "predicted_lr_star": {str(w): v for w, v in pred.items()},
        "plan": plan(p),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "corpus_matches": corpus["matches"],
        "runs": {},
        "best_lr": {},
        "skipped": [],
    }

    def save() -> None:
        summ["wall_s"] = round(time.perf_counter() - t0, 1)
        summ["compiles"] = runner.COMPILED.compiles
        summ["compile_s"] = round(runner.COMPILED.compile_s, 1)
        (out / "summary.json").write_text(json.dumps(summ, indent=1, default=float) + "\n")

    def one(width: int, optimizer: str, lr: float) -> dict[str, Any] | None:
        tau = TAU if optimizer == "muonclip" else None
        name = f"w{width}_{optimizer}_lr{lr:.3g}"
        if time.perf_counter() - t0 > 60 * args.deadline_min:
            summ["skipped"].append(name)
            save()
            return None
        spec = runner.RunSpec(
            name=name, optimizer=optimizer, width=width, lr=lr, weight_decay=p.weight_decay,
            tau=tau, seed=0, steps=p.steps, warmup_steps=p.warmup_steps,
            decay_fraction=p.decay_fraction, model=p.model(width), batch_size=p.batch_size,
            seq_len=p.seq_len, probe_every=p.steps, probe_pairs=False, stop_loss=S.STOP_LOSS,
            corpus_sha256=corpus["sha256"],
        )  # fmt: skip
        st = runner.run(spec, data, probe, val, scratch / name, log=lambda m: print(m, flush=True))
        log = runner.read_log(scratch / name)
        np.savez_compressed(out / "logs" / f"{name}.npz", **_compact(log, TAU))
        shutil.rmtree(scratch / name)
        row = {
            "width": width,
            "optimizer": optimizer,
            "lr": lr,
            "stopped": st["stopped"],
            "steps_run": st["steps_run"],
            "val_loss": float(log["val_loss"]),
            "peak_s": float(np.nanmax(log["s"])),
            "clip_steps": int(np.sum(np.any(log["s"] > TAU, axis=(1, 2)))),
            "wall_s": st["wall_s"],
        }
        summ["runs"][name] = row
        save()
        return row

    for w in p.widths:
        muon = [one(w, "muon", pred[w] * f) for f in LR_FACTORS]
        done = [r for r in muon if r is not None and math.isfinite(r["val_loss"])]
        if not done:
            continue
        best = min(done, key=lambda r: r["val_loss"])["lr"]
        summ["best_lr"][str(w)] = best
        for f in CLIP_FACTORS:
            for opt in ("muonclip", "adamw"):
                one(w, opt, best * f)
    shutil.rmtree(scratch, ignore_errors=True)
    save()
    print(f"done in {summ['wall_s'] / 60:.1f} min: {len(summ['runs'])} runs, {out}", flush=True)
    return summ


if __name__ == "__main__":
    main()
