"""The experiments in order, each later choice made by a rule of
``settings.py`` from earlier logs.

1. Sweep, seed 0: per width (smallest first), Muon, MuonClip (tau = 100)
   and AdamW over their lr grids.
2. From the sweep: per width, lr_1000 (Muon's lowest lr with S >= 1000) and
   Muon's best lr; lr_fit (the largest lr at which no width's Muon diverged).
3. The cure: Muon and MuonClip at each lr_1000, the other seeds.
4. Fig. 12: Muon and MuonClip (tau = 30) at the middle width's best Muon lr,
   six seeds.
5. Weight decay: Muon at the middle width and lr_fit, the other wds.
6. The summary, the verdicts, the figures and ``results.md``; then, in a
   separate section labelled post hoc, ``posthoc.py``'s re-analysis.

A complete run directory is reused; an incomplete one is rerun.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import subprocess
import sys
import time
from typing import Any

import numpy as np

from . import analysis as A
from . import posthoc, report, runner
from . import settings as S
from .corpus import load_corpus

HERE = pathlib.Path(__file__).resolve().parent
K2_WIDTH = 7168  # Kimi K2's hidden size (arXiv 2507.20534, Table 2)


def run_name(width: int, optimizer: str, lr: float, wd: float, tau: float | None, seed: int) -> str:
    t = "" if tau is None else f"_tau{tau:g}"
    return f"w{width}_{optimizer}_lr{lr:.3g}_wd{wd:g}{t}_s{seed}"


class Experiment:
    """The runs of one mode, trained on demand (or only read, ``train=False``)."""

    def __init__(
        self,
        s: S.Settings,
        runs_dir: pathlib.Path,
        data,
        corpus: dict,
        pilot: dict,
        *,
        train: bool = True,
        log=print,
    ):
        self.s, self.runs_dir, self.data, self.corpus, self.pilot = s, runs_dir, data, corpus, pilot
        self.train, self.log = train, log
        self.probe = runner.spread_windows(data.val, s.probe_windows, s.seq_len)
        self.val = runner.spread_windows(data.val, s.val_windows, s.seq_len)
        self.rows: dict[str, dict] = {}
        self.logs: dict[str, A.Log] = {}
        self.trained = 0

    def run(
        self,
        width: int,
        optimizer: str,
        lr: float,
        *,
        seed: int = 0,
        wd: float | None = None,
        tau: float | None = None,
    ) -> dict[str, Any]:
        s = self.s
        wd = s.weight_decay if wd is None else wd
        if optimizer == "muonclip" and tau is None:
            tau = s.tau
        name = run_name(width, optimizer, lr, wd, tau, seed)
        if name in self.rows:
            return self.rows[name]
        spec = runner.RunSpec(
            name=name,
            optimizer=optimizer,
            width=width,
            lr=lr,
            weight_decay=wd,
            tau=tau,
            seed=seed,
            steps=s.steps,
            warmup_steps=s.warmup_steps,
            decay_fraction=s.decay_fraction,
            model=s.model(width),
            batch_size=s.batch_size,
            seq_len=s.seq_len,
            probe_every=s.probe_every,
            probe_pairs=False,
            stop_loss=S.STOP_LOSS,
            corpus_sha256=self.corpus["sha256"],
        )
        d = self.runs_dir / name
        if self.train:
            before = runner.read_status(d)
            st = runner.run(spec, self.data, self.probe, self.val, d, log=self.log)
            self.trained += before is None
        else:
            st = runner.read_status(d)
            if st is None:
                raise FileNotFoundError(f"--no-train: {d} holds no complete run")
        self.logs[name] = runner.read_log(d)
        self.rows[name] = A.run_row(self.logs[name], st)
        return self.rows[name]

    def run_all(self) -> dict[str, Any]:
        s = self.s
        sweep: dict[int, dict[str, list[str]]] = {}
        for w in s.widths:
            self.log(f"sweep, width {w}")
            sweep[w] = {
                opt: [
                    self.run(w, opt, lr)["name"]
                    for lr in s.grid["adamw" if opt == "adamw" else "muon"]
                ]
                for opt in ("muon", "muonclip", "adamw")
            }
        best = {
            w: {f: self._best(sweep[w], f) for f in ("muon", "muonclip", "adamw")} for w in s.widths
        }
        for w in s.widths:
            fam_best = min(best[w]["muon"]["val_loss"], best[w]["muonclip"]["val_loss"])
            for opt in ("muon", "muonclip", "adamw"):
                b = fam_best if opt != "adamw" else best[w]["adamw"]["val_loss"]
                for n in sweep[w][opt]:
                    self.rows[n]["diverged"] = S.diverged(self.rows[n]["val_loss"], b)
        lr_1000 = {}
        for w in s.widths:
            hit = [
                self.rows[n]["lr"]
                for n in sweep[w]["muon"]
                if self.rows[n]["peak_s"] >= s.explosion
            ]
            lr_1000[w] = min(hit) if hit else None
        healthy_lrs = [
            lr
            for lr in s.grid["muon"]
            if all(
                not self.rows[run_name(w, "muon", lr, s.weight_decay, None, 0)]["diverged"]
                for w in s.widths
            )
        ]
        lr_fit = max(healthy_lrs) if healthy_lrs else None

        self.log("the cure: Muon and MuonClip at each lr_1000")
        cure = {}
        for w in s.widths:
            if lr_1000[w] is None:
                continue
            pairs = [
                (
                    self.run(w, "muon", lr_1000[w], seed=k),
                    self.run(w, "muonclip", lr_1000[w], seed=k),
                )
                for k in s.cure_seeds
            ]
            cure[w] = {
                "lr": lr_1000[w],
                "muon": [p[0]["name"] for p in pairs],
                "muonclip": [p[1]["name"] for p in pairs],
                "diffs": [A.capped_val(c) - A.capped_val(m) for m, c in pairs],
                "muon_stopped": sum(m["stopped"] != "done" for m, _ in pairs),
                "muonclip_stopped": sum(c["stopped"] != "done" for _, c in pairs),
            }

        self.log(f"Fig. 12: MuonClip at tau = {s.tau_fig12:g}, {len(s.fig12_seeds)} seeds")
        w12 = s.fig12_width
        lr12 = best[w12]["muon"]["lr"]
        f12 = [
            (
                self.run(w12, "muon", lr12, seed=k),
                self.run(w12, "muonclip", lr12, seed=k, tau=s.tau_fig12),
            )
            for k in s.fig12_seeds
        ]
        fig12 = {
            "width": w12,
            "lr": lr12,
            "tau": s.tau_fig12,
            "muon": [m["name"] for m, _ in f12],
            "muonclip": [c["name"] for _, c in f12],
            "diffs": [c["val_loss"] - m["val_loss"] for m, c in f12],
            "base": float(np.mean([m["val_loss"] for m, _ in f12])),
            "acted": [c["clip"]["acted"] for _, c in f12],
            "clip_fraction_steps": [
                float(
                    np.mean(
                        np.any(self.logs[c["name"]]["s"].reshape(s.steps, -1) > s.tau_fig12, axis=1)
                    )
                )
                if c["steps_run"] == s.steps
                else math.nan
                for _, c in f12
            ],
        }

        wd_runs = {}
        if lr_fit is not None:
            self.log(f"weight decay at lr_fit = {lr_fit:.3g}")
            for wd in sorted((*s.wd_axis, s.weight_decay)):
                wd_runs[wd] = self.run(w12, "muon", lr_fit, wd=wd)["name"]
        return self.summarise(sweep, best, lr_1000, lr_fit, cure, fig12, wd_runs)

    def _best(self, names: dict[str, list[str]], opt: str) -> dict[str, Any]:
        rows = [self.rows[n] for n in names[opt] if math.isfinite(self.rows[n]["val_loss"])]
        if not rows:
            return {"name": None, "lr": None, "val_loss": math.nan}
        b = min(rows, key=lambda r: r["val_loss"])
        return {"name": b["name"], "lr": b["lr"], "val_loss": b["val_loss"]}

    def summarise(self, sweep, best, lr_1000, lr_fit, cure, fig12, wd_runs) -> dict[str, Any]:
        s, pilot = self.s, self.pilot
        tol = {
            "cap_tolerance": S.cap_tolerance(pilot),
            "spike_delta": S.spike_delta(pilot),
            "sensitivity_margin": S.sensitivity_margin(pilot),
        }
        R = self.rows
        sens, spikes, slopes_s, slopes_w = {}, [], {}, {}
        for w in s.widths:
            ref = min(best[w]["muon"]["val_loss"], best[w]["muonclip"]["val_loss"])
            sens[w] = {
                opt: S.sensitivity([R[n]["val_loss"] for n in sweep[w][opt]], ref)
                for opt in ("muon", "muonclip")
            }
            for nm, nc in zip(sweep[w]["muon"], sweep[w]["muonclip"]):
                if R[nm]["peak_s"] >= s.explosion:
                    c = A.spike_counts(self.logs[nm], self.logs[nc], tol["spike_delta"])
                    spikes.append({"width": w, "lr": R[nm]["lr"], **c})
            slopes_s[w], slopes_w[w] = {}, {}
            for opt in ("muon", "adamw"):
                star = best[w][opt]["lr"]
                pts = [
                    R[n]
                    for n in sweep[w][opt]
                    if star is not None and R[n]["lr"] >= star and R[n]["stopped"] == "done"
                ]
                x = [math.log(r["lr"] / star) for r in pts]
                slopes_s[w][opt] = S.slope(x, [math.log(r["peak_s"]) for r in pts])
                slopes_w[w][opt] = S.slope(x, [math.log(r["peak_norm_product"]) for r in pts])
        clip_rows = [
            R[n]
            for w in s.widths
            for n in sweep[w]["muonclip"]
            if not R[n]["diverged"] and R[n]["clip"]["acted"]
        ]
        settled_w = (
            {
                w: R[run_name(w, "muon", lr_fit, s.weight_decay, None, 0)]["settled_s"]
                for w in s.widths
            }
            if lr_fit
            else {}
        )
        settled_wd = {wd: R[n]["settled_s"] for wd, n in wd_runs.items()}
        fit_w = (
            S.power_fit(list(settled_w), list(settled_w.values()))
            if len(settled_w) >= 2 and all(v > 0 for v in settled_w.values())
            else None
        )
        fit_wd = (
            S.power_fit(list(settled_wd), list(settled_wd.values()))
            if len(settled_wd) >= 2 and all(v > 0 for v in settled_wd.values())
            else None
        )
        v = {
            "fig2_left_explosion": S.verdict_explosion(lr_1000, s.explosion),
            "fig2_left_spikes": S.verdict_spikes(spikes),
            "cure": S.verdict_cure({w: c["diffs"] for w, c in cure.items()}),
            "stable_range": S.verdict_stable_range(sens, tol["sensitivity_margin"]),
            "fig2_right_cap": S.verdict_cap(
                [r["clip"]["q99_ratio"] for r in clip_rows], tol["cap_tolerance"]
            ),
            "fig2_right_switch_off": S.verdict_switch_off(
                [r["clip"]["window_rate"] for r in clip_rows]
            ),
            "appD_head_fraction": S.verdict_head_fraction(
                [r["clip"]["fraction"] for r in clip_rows]
            ),
            "fig12_negligible": S.verdict_negligible(fig12["diffs"], fig12["base"], fig12["acted"]),
            "appE_muon_faster": S.verdict_muon_faster(slopes_s),
            "appE_weight_growth": S.verdict_weight_growth(slopes_w),
        }
        return {
            "mode": s.name,
            "explosion": s.explosion,
            "tau": s.tau,
            "tolerances": tol,
            "sweep": {str(w): sweep[w] for w in s.widths},
            "best": {str(w): best[w] for w in s.widths},
            "lr_1000": {str(w): lr_1000[w] for w in s.widths},
            "lr_diverged": {  # the lowest lr of each optimizer that diverged (the rule of diverged)
                str(w): {
                    opt: min((R[n]["lr"] for n in sweep[w][opt] if R[n]["diverged"]), default=None)
                    for opt in ("muon", "muonclip", "adamw")
                }
                for w in s.widths
            },
            "lr_fit": lr_fit,
            "sensitivity": {str(w): sens[w] for w in s.widths},
            "spikes": spikes,
            "slopes_s": {str(w): slopes_s[w] for w in s.widths},
            "slopes_norm": {str(w): slopes_w[w] for w in s.widths},
            "clip_runs": [r["name"] for r in clip_rows],
            "cure": {str(w): c for w, c in cure.items()},
            "fig12": fig12,
            "settled_vs_width": {str(w): x for w, x in settled_w.items()},
            "settled_vs_wd": {str(k): x for k, x in settled_wd.items()},
            "fit_width": fit_w,
            "fit_wd": fit_wd,
            "prediction_k2_width": None if fit_w is None else fit_w["c"] * K2_WIDTH ** fit_w["p"],
            "verdicts": {k: {"word": a, "why": b} for k, (a, b) in v.items()},
            "runs": self.rows,
        }


def versions() -> dict[str, str]:
    import equinox
    import jax
    import optax

    import qkclip_eqx

    src = pathlib.Path(qkclip_eqx.__file__).parent
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
        lib = f"git {rev}" + (" + uncommitted changes" if dirty else "")
    except Exception:
        lib = str(src)
    return {
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "equinox": equinox.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpus": str(len(__import__("os").sched_getaffinity(0)))
        if hasattr(__import__("os"), "sched_getaffinity")
        else "?",
        "backend": jax.default_backend(),
        "qkclip_eqx": lib,
    }


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
        help="full (default; 2 CPU cores), quick, or gpu (one accelerator; not run)",
    )
    p.add_argument("--out", default=None, help="results folder; runs go to OUT/runs unless --runs")
    p.add_argument("--runs", default=None, help="folder for the run directories")
    p.add_argument(
        "--no-train", action="store_true", help="only rebuild the results from complete runs"
    )
    p.add_argument("--stdlib", default=None, help="read the corpus files from this directory")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    s = S.QUICK if args.quick else S.MODES[args.preset]
    if args.out is not None:
        out = pathlib.Path(args.out)
    else:
        out = HERE / "results" if s.name == "full" else HERE / "runs" / s.name / "results"
    if args.runs:
        runs_dir = pathlib.Path(args.runs)
    elif s.name == "full" and args.out is None:
        runs_dir = out / "logs"  # the full run's logs are committed beside its results
    else:
        runs_dir = out / "runs" if args.out else HERE / "runs" / s.name
    out.mkdir(parents=True, exist_ok=True)
    print(f"kimi_k2, mode {s.name}: runs in {runs_dir}, results in {out}", flush=True)
    t0 = time.perf_counter()
    c0, cs0 = runner.COMPILED.compiles, runner.COMPILED.compile_s
    data, corpus = load_corpus(args.stdlib)
    if not corpus["matches"]:
        print(
            "!" * 72 + f"\nCORPUS MISMATCH: sha256 {corpus['sha256']}\n" + "!" * 72,
            file=sys.stderr,
            flush=True,
        )
    exp = Experiment(
        s,
        runs_dir,
        data,
        corpus,
        S.load_pilot(),
        train=not args.no_train,
        log=lambda m: print(m, flush=True),
    )
    summ = exp.run_all()
    wall = time.perf_counter() - t0
    pilot = exp.pilot["widths"]
    train_s = sum(r["wall_s"] for r in exp.rows.values())
    bare_s = None  # the same steps at the pilot's bare-step times (the full mode's widths)
    if all(str(w) in pilot for w in s.widths):
        bare_s = sum(
            r["steps_run"]
            * pilot[str(r["width"])][f"bare_ms_{'adamw' if r['optimizer'] == 'adamw' else 'muon'}"]
            / 1000
            for r in exp.rows.values()
        )
    timing = {
        "wall_s": round(wall, 1),
        "runs": len(exp.rows),
        "steps": sum(r["steps_run"] for r in exp.rows.values()),
        "train_s": round(train_s, 1),
        "loop_over_bare": None if bare_s is None else round(train_s / bare_s, 3),
        "compiles": runner.COMPILED.compiles - c0,
        "compile_s": round(runner.COMPILED.compile_s - cs0, 1),
    }
    # the invocation that trained is the one whose wall time and compiles count
    record = runs_dir / "timing.json"
    if exp.trained:
        timing.update(trained=exp.trained, versions=versions())
        record.write_text(json.dumps(timing, indent=1) + "\n")
    elif record.is_file():
        timing = json.loads(record.read_text())
    summ["versions"] = timing.pop("versions", None) or versions()  # those that trained
    summ["timing"] = {**timing, "trained_now": exp.trained}
    summ["corpus"] = {
        k: corpus[k] for k in ("sha256", "expected_sha256", "matches", "files", "bytes")
    }
    summ["settings"] = {
        "widths": list(s.widths),
        "steps": s.steps,
        "grid": s.grid,
        "batch": [s.batch_size, s.seq_len],
        "cure_seeds": len(s.cure_seeds),
    }
    report.write(summ, exp.logs, out, s)
    posthoc.write(posthoc.analyse(summ, exp.logs), out)  # post hoc, labelled as such
    print(f"done in {wall / 60:.1f} min ({exp.trained} runs trained); results in {out}", flush=True)
    return summ
