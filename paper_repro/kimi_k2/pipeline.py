"""The experiments in order, each later choice made by a rule of
``settings.py`` from earlier logs.

1. Pre-sweep, Muon and AdamW (monitor, seed 0, constant lr after warmup):
   lr* per optimizer (``settings.best_lr``), the grid extended by a half
   decade while lr* is at an end (``settings.extension``).
2. Schedule of every main run from Muon's lr* (``settings.schedule``).
3. Muon (monitor) at each multiple of lr*, every seed.
4. tau per multiple (``settings.choose_tau`` of step 3's peak probe S).
5. MuonClip at each multiple, every seed; MuonClip at 1x with the larger wd.
6. AdamW (monitor) at 1x its own lr*, every seed.
7. Verdicts (``settings.verdict_*``), figures and ``results.md``.

A complete run directory is reused; an incomplete one is rerun.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import platform
import sys
import time
from typing import Any

import numpy as np

from . import analysis as A
from . import report, runner
from . import settings as S
from .corpus import load_corpus

HERE = pathlib.Path(__file__).resolve().parent


class Experiment:
    def __init__(
        self,
        s: S.Settings,
        runs_dir: pathlib.Path,
        data,
        corpus: dict,
        train: bool = True,
        log=print,
    ):
        self.s, self.runs_dir, self.data, self.corpus, self.train, self.log = (
            s,
            runs_dir,
            data,
            corpus,
            train,
            log,
        )
        self.probe = runner.spread_windows(data.val, s.probe_windows, s.seq_len)
        self.val = runner.spread_windows(data.val, s.val_windows, s.seq_len)
        self.logs: dict[str, list] = {}
        self.rows: dict[str, dict] = {}
        self.trained: list[str] = []

    def spec(
        self,
        optimizer: str,
        lr: float,
        seed: int,
        *,
        steps: int,
        decay: float | None,
        tau: float = 1e9,
        wd: float | None = None,
        tag: str = "",
    ) -> runner.RunSpec:
        s = self.s
        wd = s.weight_decay if wd is None else wd
        name = (
            f"{tag}{optimizer}_lr{lr:.4g}_wd{wd:g}"
            + (f"_tau{tau:g}" if optimizer == "muonclip" else "")
            + f"_seed{seed}"
        )
        return runner.RunSpec(
            name=name,
            optimizer=optimizer,
            lr=float(lr),
            weight_decay=wd,
            seed=seed,
            steps=steps,
            warmup_steps=s.warmup_steps,
            decay_fraction=decay,
            tau=float(tau),
            model=s.model,
            batch_size=s.batch_size,
            seq_len=s.seq_len,
            probe_every=s.probe_every,
            norms_every=s.norms_every,
            val_every=s.val_every,
            corpus_sha256=self.corpus["sha256"],
        )

    def get(self, spec: runner.RunSpec) -> dict[str, Any]:
        d = self.runs_dir / spec.name
        st = runner.read_status(d)
        if st is None or not (d / "metrics.jsonl").is_file():
            if not self.train:
                raise FileNotFoundError(f"{d}: run missing (drop --no-train)")
            self.log(f"  run  {spec.name}")
            self.trained.append(spec.name)
        st = runner.run(spec, self.data, self.probe, self.val, d, log=self.log)
        recs = runner.read_log(d)
        self.logs[spec.name] = recs
        self.rows[spec.name] = A.run_row(recs, st, self.s)
        return self.rows[spec.name]

    # ------------------------------------------------------------------
    def presweep(self, opt: str) -> dict[str, Any]:
        s = self.s
        grid = list(s.sweep_grid[opt])
        for k in range(S.MAX_EXTENSIONS + 1):
            rows = [
                self.get(self.spec(opt, lr, 0, steps=s.sweep_steps, decay=None, tag="sweep_"))
                for lr in grid
            ]
            pick = S.best_lr(grid, [r["final_val"] for r in rows], [r["diverged"] for r in rows])
            nxt = S.extension(grid, pick["edge"])
            if nxt is None or k == S.MAX_EXTENSIONS:
                break
            self.log(f"    {opt}: lr* at the {pick['edge']} end of the grid; adding {nxt:.4g}")
            grid = sorted(grid + [nxt])
        return {"grid": grid, "runs": rows, **pick, "bracketed": pick["edge"] is None}

    def run_all(self) -> dict[str, Any]:
        s, log = self.s, self.log
        summ: dict[str, Any] = {"mode": s.name, "corpus": self.corpus}
        log("[1] pre-sweep")
        sweep = {opt: self.presweep(opt) for opt in ("muon", "adamw")}
        summ["sweep"] = sweep
        lr_m = sweep["muon"]["lr"] or min(sweep["muon"]["grid"])
        lr_a = sweep["adamw"]["lr"] or min(sweep["adamw"]["grid"])
        sch = S.schedule(lr_m, s)
        summ["schedule"] = sch
        # the fraction that makes qkclip_eqx's wsd decay over exactly total - decay_start steps
        dec = sch["decay"] / sch["total"]
        kw = dict(steps=sch["total"], decay=dec)
        log(
            f"    lr* Muon {lr_m:.4g}, AdamW {lr_a:.4g}; main runs {sch['total']} steps (flat {sch['flat']})"
        )

        main: dict[str, Any] = {"multipliers": {}}
        for mult in s.lr_multipliers:
            lr = lr_m * mult
            log(f"[2] Muon and MuonClip at {mult:g}x lr* = {lr:.4g}")
            muon = [self.get(self.spec("muon", lr, sd, **kw)) for sd in s.seeds]
            tau = S.choose_tau([r["peak_probe_s"] for r in muon], s)
            clip = [self.get(self.spec("muonclip", lr, sd, tau=tau, **kw)) for sd in s.seeds]
            main["multipliers"][f"{mult:g}"] = {
                "lr": lr,
                "tau": tau,
                "muon": muon,
                "clip": clip,
                "wd_time": S.wd_time(lr, s.weight_decay, sch["flat"]),
            }
        one = main["multipliers"]["1"]
        log(f"[3] MuonClip at 1x lr*, wd {s.weight_decay_large:g}")
        main["wd_large"] = [
            self.get(self.spec("muonclip", lr_m, sd, tau=one["tau"], wd=s.weight_decay_large, **kw))
            for sd in s.seeds
        ]
        log(f"[4] AdamW at 1x its lr* = {lr_a:.4g}")
        main["adamw"] = [self.get(self.spec("adamw", lr_a, sd, **kw)) for sd in s.seeds]
        summ["main"] = main
        summ["verdicts"] = verdicts(summ, s)
        summ["n_runs"] = len(self.rows)
        summ["train_wall_s"] = round(sum(r["wall_s"] for r in self.rows.values()), 1)
        summ["n_steps"] = int(sum(r["steps_run"] for r in self.rows.values()))
        summ["trained_this_invocation"] = list(self.trained)
        return summ


def verdicts(summ: dict[str, Any], s: S.Settings) -> dict[str, Any]:
    """Apply every pre-registered rule to the summary; ``{claim: {word, why, ...}}``."""
    sw, sch, main = summ["sweep"], summ["schedule"], summ["main"]
    br_m = sw["muon"]["bracketed"]
    br_both = br_m and sw["adamw"]["bracketed"]
    out: dict[str, Any] = {}
    for mult, m in main["multipliers"].items():
        tag = f"{mult}x"
        clipped = [r["clip"]["clipped"] for r in m["clip"]]
        v = {}
        v["fig2_left_explosion"] = S.verdict_explosion([r["peak_probe_s"] for r in m["muon"]], br_m)
        v["fig2_left_spikes"] = S.verdict_spikes(
            [len(r["spikes"]) for r in m["muon"]], [len(r["spikes"]) for r in m["clip"]], br_m
        )
        v["fig2_right_cap"] = S.verdict_cap(
            [r["clip"]["overshoot_train"] for r in m["clip"]], clipped
        )
        v["fig2_right_switch_off"] = S.verdict_switch_off(
            [r["clip"]["last"] for r in m["clip"]],
            sch["decay_start"],
            sch["flat"],
            m["wd_time"],
            s.wd_time,
        )
        v["appD_head_fraction"] = S.verdict_head_fraction(
            [r["clip"]["fraction"] for r in m["clip"]], clipped
        )
        diffs = [c["final_val"] - u["final_val"] for u, c in zip(m["muon"], m["clip"])]
        base = float(np.mean([u["final_val"] for u in m["muon"]]))
        v["fig12_negligible"] = S.verdict_negligible(diffs, base, s.equivalence_margin, clipped)
        out[tag] = {k: {"word": w, "why": y} for k, (w, y) in v.items()}
    one = main["multipliers"]["1"]
    limit = sch["decay_start"] - S.OFF_MARGIN * sch["flat"]
    w, y = S.verdict_wd_hypothesis(
        [r["clip"]["last"] for r in one["clip"]],
        [r["clip"]["last"] for r in main["wd_large"]],
        s.warmup_steps,
        s.weight_decay_large / s.weight_decay,
        limit,
    )
    out["wd_hypothesis"] = {"word": w, "why": y}
    lr_ratios = [
        math.log(u["peak_probe_s"] / a["peak_probe_s"]) for u, a in zip(one["muon"], main["adamw"])
    ]
    w, y = S.verdict_muon_faster(lr_ratios, br_both)
    out["appE_muon_faster"] = {"word": w, "why": y}
    rd = [
        u["stable_rank"]["all"] - a["stable_rank"]["all"]
        for u, a in zip(one["muon"], main["adamw"])
    ]
    w, y = S.verdict_update_rank(rd)
    out["appE_update_rank"] = {"word": w, "why": y}
    return out


def versions() -> dict[str, str]:
    import equinox
    import jax
    import optax

    import qkclip_eqx

    return {
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "equinox": equinox.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "backend": jax.default_backend(),
        "qkclip_eqx": _lib_rev(qkclip_eqx.__file__),
    }


def _lib_rev(path: str) -> str:
    """The git commit of the qkclip_eqx sources that ran (+ "uncommitted changes")."""
    import subprocess

    src = pathlib.Path(path).parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return f"git {rev}" + (" + uncommitted changes" if dirty else "")
    except Exception:
        return str(src)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m paper_repro.kimi_k2",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="the same pipeline at test size")
    p.add_argument(
        "--preset",
        choices=sorted(S.MODES),
        default="full",
        help="full (default; CPU), quick, or gpu (for an accelerator; not run)",
    )
    p.add_argument("--out", default=None, help="results folder; runs go to OUT/runs unless --runs")
    p.add_argument("--runs", default=None, help="folder for the run directories")
    p.add_argument(
        "--no-train", action="store_true", help="only rebuild results from complete runs"
    )
    p.add_argument(
        "--stdlib",
        default=None,
        help="read the corpus files from this directory (default: this Python's)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    s = S.QUICK if args.quick else S.MODES[args.preset]
    if args.out is not None:
        out = pathlib.Path(args.out)
    else:
        out = HERE / "results" if s.name == "full" else HERE / "runs" / s.name / "results"
    runs_dir = (
        pathlib.Path(args.runs)
        if args.runs
        else (out / "runs" if args.out else HERE / "runs" / s.name)
    )
    out.mkdir(parents=True, exist_ok=True)
    print(f"kimi_k2, mode {s.name}: runs in {runs_dir}, results in {out}", flush=True)
    t0 = time.perf_counter()
    data, corpus = load_corpus(args.stdlib)
    if not corpus["matches"]:
        print(
            "!" * 72
            + f"\nCORPUS MISMATCH: sha256 {corpus['sha256']}\n  expected {corpus['expected_sha256']}\n"
            + "!" * 72,
            file=sys.stderr,
            flush=True,
        )
    exp = Experiment(
        s, runs_dir, data, corpus, train=not args.no_train, log=lambda m: print(m, flush=True)
    )
    summ = exp.run_all()
    summ["versions"] = versions()
    summ["settings"] = {k: v for k, v in vars(s).items()}
    summ["wall_s_this_invocation"] = round(time.perf_counter() - t0, 1)
    report.write(summ, exp.logs, out)
    print(f"results: {out / 'results.md'} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return summ
