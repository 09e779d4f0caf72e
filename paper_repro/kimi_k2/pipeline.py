"""The experiments, in order; each later choice is made from earlier run logs.

1. lr sweep (Muon and AdamW, monitor only) -> lr* = the lr with the largest
   max logit among the Muon runs that did not diverge (App. E, Fig. 2 left).
2. Fig. 2 left: vanilla Muon (monitor) at lr*, a full-length run.
3. Fig. 2 right: MuonClip at lr*, tau = 100 and tau_low (``settings.choose_tau_low``
   applied to step 2's largest S).
4. App. D: heads that ever clipped, by layer, from step 3's runs.
5. Fig. 12: Muon vs MuonClip (tau_low, i.e. 30 when S allows), every seed, at
   every stable swept lr where Muon's S exceeded tau.
6. App. E: MuonClip and AdamW + QK-Clip (both tau_low) added to the sweep.
7. Overshoot: the largest S / tau after the first clip, over every MuonClip run
   (the AdamW + QK-Clip sweep runs report theirs in App. E).

A run whose directory is complete is skipped, a partial one resumed; so the
pipeline can be stopped and restarted at any point.
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

from qkclip_eqx import RunConfig, load_data, read_metrics

from . import analysis as A
from . import report, runner
from .settings import MODES, QUICK, Settings, choose_tau_low

HERE = pathlib.Path(__file__).resolve().parent


def _arm(optimizer: str, tau: float, mode: str | None = None) -> str:
    """The run-name prefix: ``muon``, ``adamw`` (monitor), ``muonclip_tau30``,
    ``adamwclip_tau30`` (AdamW with QK-Clip)."""
    if optimizer == "muonclip":
        return f"muonclip_tau{tau:g}"
    if optimizer == "adamw" and mode == "clip":
        return f"adamwclip_tau{tau:g}"
    return optimizer


class Experiment:
    def __init__(self, s: Settings, runs_dir: pathlib.Path, train: bool = True, log=print):
        self.s, self.runs_dir, self.train, self.log = s, runs_dir, train, log
        self.data = None
        self.metrics: dict[str, Any] = {}  # run name -> RunMetrics
        self.status: dict[str, Any] = {}  # run name -> status.json
        self.configs: dict[str, Any] = {}
        self.trained: list[str] = []  # runs trained (or continued) by this invocation

    def config(
        self, optimizer: str, lr: float, seed: int = 0, tau: float = 100.0, mode: str | None = None
    ) -> tuple[str, RunConfig]:
        """Every run has the main schedule; the sweep is the first sweep_steps of it.
        ``mode`` None is RunConfig's default (clip for muonclip, else monitor)."""
        s = self.s
        name = f"{_arm(optimizer, tau, mode)}_lr{lr:g}_seed{seed}"
        cfg = RunConfig(
            **s.run_fields(),
            optimizer=optimizer,
            mode=mode,
            lr=lr,
            seed=seed,
            tau=tau,
            schedule="wsd",
            warmup_steps=s.warmup_steps,
            decay_fraction=s.decay_fraction,
            steps=s.steps,
            eval_every=s.eval_every,
            ckpt_every=s.ckpt_every,
            out=str(self.runs_dir / name),
            label=name,
        )
        return name, cfg

    def get(
        self,
        optimizer: str,
        lr: float,
        seed: int = 0,
        tau: float = 100.0,
        until: int | None = None,
        mode: str | None = None,
    ) -> str:
        """Run (or skip, or continue) one run to ``until`` (default: the end); load its metrics."""
        name, cfg = self.config(optimizer, lr, seed, tau, mode)
        target = cfg.steps if until is None else until
        status = runner.read_status(cfg.out)
        if not runner.finished(status, target):
            if not self.train:
                raise FileNotFoundError(f"{cfg.out}: run not at step {target} (drop --no-train)")
            if self.data is None:
                self.data = load_data(None, max_bytes=self.s.max_bytes)
            status = runner.run(cfg, self.data, until=until, log=self.log)
            self.trained.append(name)
        self.status[name] = status
        self.metrics[name] = read_metrics(cfg.out)
        self.configs[name] = status["config"]
        return name

    # ------------------------------------------------------------------
    def run_all(self) -> dict[str, Any]:
        s, log = self.s, self.log
        t_start = time.perf_counter()
        summ: dict[str, Any] = {"mode": s.name}

        # 1. lr sweep, Muon and AdamW (monitor) -----------------------------
        log("[1] lr sweep: Muon and AdamW, monitor")
        sweep: dict[str, dict[str, Any]] = {"muon": {}, "adamw": {}}
        for lr in s.sweep_lrs:
            for opt in ("muon", "adamw"):
                n = self.get(opt, lr, until=s.sweep_steps)
                sweep[opt][f"{lr:g}"] = self._sweep_row(n)
        ok = [lr for lr in s.sweep_lrs if not sweep["muon"][f"{lr:g}"]["diverged"]]
        if ok:
            lr_star = max(ok, key=lambda lr: sweep["muon"][f"{lr:g}"]["peak_s"])
            why = "largest max logit among the Muon sweep runs that did not diverge"
        else:
            lr_star = min(s.sweep_lrs)
            why = "every Muon sweep run diverged; the smallest lr"
        summ["lr_star"], summ["lr_star_why"] = lr_star, why
        log(f"    lr* = {lr_star:g} ({why})")

        # 2. Fig. 2 left: vanilla Muon at lr* --------------------------------
        log("[2] Fig. 2 left: vanilla Muon at lr*")
        mon = self.get("muon", lr_star)
        summ["fig2_left"] = self._main_row(mon)
        peak = summ["fig2_left"]["peak_s"]
        tau_low = choose_tau_low(peak, s.tau_ablation) if math.isfinite(peak) else s.tau_ablation
        summ["tau_low"] = tau_low

        # 3. App. E: MuonClip and AdamW + QK-Clip in the sweep ----------------
        log(f"[3] App. E: MuonClip and AdamW + QK-Clip (tau = {tau_low:g}) in the lr sweep")
        sweep["muonclip"], sweep["adamw_clip"] = {}, {}
        for lr in s.sweep_lrs:
            for arm, opt, mode in (("muonclip", "muonclip", None), ("adamw_clip", "adamw", "clip")):
                n = self.get(opt, lr, tau=tau_low, until=s.sweep_steps, mode=mode)
                row = self._sweep_row(n)
                row["clip"] = A.clip_summary(
                    A.prefix(self.metrics[n], s.sweep_steps), tau_low, s.sweep_steps
                )
                sweep[arm][f"{lr:g}"] = row
        both = [
            lr
            for lr in s.sweep_lrs
            if not sweep["muon"][f"{lr:g}"]["diverged"]
            and not sweep["adamw"][f"{lr:g}"]["diverged"]
        ]
        faster = [
            lr
            for lr in both
            if sweep["muon"][f"{lr:g}"]["s_fixed"] > sweep["adamw"][f"{lr:g}"]["s_fixed"]
        ]
        summ["sweep"] = {
            "lrs": list(s.sweep_lrs),
            "fixed_step": s.sweep_steps - 1,
            "tau": tau_low,
            "runs": sweep,
            "lrs_both_ok": both,
            "lrs_muon_above_adamw": faster,
        }

        # 4. Fig. 2 right: MuonClip at lr*, tau = 100 and tau_low ------------
        log(f"[4] Fig. 2 right: MuonClip at lr*, tau = {s.tau_k2:g} and {tau_low:g}")
        summ["fig2_right"] = {}
        for tau in dict.fromkeys((s.tau_k2, tau_low)):
            if tau > peak:
                # Nothing would ever clip: MuonClip is then bit-identical to the
                # monitor run (tests/test_repro.py checks this identity), so the
                # monitor run stands for it rather than a second, identical run.
                n = mon
                row = self._main_row(n)
                row["identical_to_monitor_run"] = True
            else:
                n = self.get("muonclip", lr_star, tau=tau)
                row = self._main_row(n)
            row["clip"] = A.clip_summary(self.metrics[n], tau, s.steps)
            summ["fig2_right"][f"{tau:g}"] = row

        # 5. Fig. 12: Muon vs MuonClip(tau4), every seed, at every stable swept
        # lr where the clip acts (the Muon sweep run's S exceeded tau), from
        # the largest down. (The first full run compared at the largest such
        # lr only; that was lr*, where vanilla Muon's S is ~1000 and its loss
        # is already degraded, not the regime of K2's ablation, so the lower
        # lrs were added, by this rule, rather than by picking one.)
        tau4 = tau_low
        acting = [
            lr
            for lr in s.sweep_lrs
            if self._stable(sweep, lr, lr_star, summ["fig2_left"])
            and sweep["muon"][f"{lr:g}"]["peak_s"] > tau4
        ]
        if acting:
            lrs4 = [
                (
                    lr,
                    f"a stable lr (no divergence, no loss spike) whose Muon max logit exceeded "
                    f"tau = {tau4:g} in the sweep",
                )
                for lr in sorted(acting, reverse=True)
            ]
        else:
            lrs4 = [self._stable_lr(sweep, lr_star, summ["fig2_left"], tau4)]
        summ["fig12"] = []
        for lr4, why4 in lrs4:
            log(
                f"[5] Fig. 12: Muon vs MuonClip tau = {tau4:g} at lr {lr4:g}, seeds {list(s.seeds)}"
            )
            summ["fig12"].append(self._fig12(lr4, why4, tau4))

        # 6. overshoot over every clip run -----------------------------------
        ov = []
        for name, m in self.metrics.items():
            cfg = self.configs[name]
            if cfg["optimizer"] != "muonclip":
                continue
            c = A.clip_summary(m, cfg["tau"], cfg["steps"])
            if c["first_clip_step"] >= 0:
                ov.append(
                    {
                        "run": name,
                        "tau": cfg["tau"],
                        "first_clip_step": c["first_clip_step"],
                        "overshoot": c["overshoot"],
                        "overshoot_step": c["overshoot_step"],
                    }
                )
        summ["overshoot"] = {"runs": ov, "max": max((r["overshoot"] for r in ov), default=math.nan)}

        summ["wall_s_this_invocation"] = round(time.perf_counter() - t_start, 1)
        summ["train_wall_s_total"] = round(
            sum(st.get("wall_s", 0.0) for st in self.status.values()), 1
        )
        summ["n_runs"] = len(self.metrics)
        summ["runs_trained_this_invocation"] = list(self.trained)
        summ["n_steps_total"] = int(sum(len(m.steps) for m in self.metrics.values()))
        return summ

    # ------------------------------------------------------------------
    def _sweep_row(self, n: str) -> dict[str, Any]:
        """Numbers of the first sweep_steps steps (the run may go on further)."""
        m, st = A.prefix(self.metrics[n], self.s.sweep_steps), dict(self.status[n])
        if st["stopped"] == "nan" and st["step"] >= self.s.sweep_steps:
            st["stopped"] = "partial"
        pk, pk_step = A.peak_s(m)
        return {
            "run": n,
            "peak_s": pk,
            "peak_step": pk_step,
            "s_fixed": A.s_at(m, self.s.sweep_steps - 1),
            "diverged": A.diverged(m, st),
            "stopped": st["stopped"],
            "steps_run": min(st["step"], self.s.sweep_steps),
            "final_train_loss": A.final_train_loss(m),
            "spikes": len(A.spikes(m, self.s.spike_window, self.s.spike_factor)),
        }

    def _main_row(self, n: str) -> dict[str, Any]:
        m, st = self.metrics[n], self.status[n]
        pk, pk_step = A.peak_s(m)
        sp = A.spikes(m, self.s.spike_window, self.s.spike_factor)
        return {
            "run": n,
            "peak_s": pk,
            "peak_step": pk_step,
            "stopped": st["stopped"],
            "steps_run": st["step"],
            "diverged": A.diverged(m, st),
            "spikes": sp,
            "max_loss_ratio": A.max_loss_ratio(m, self.s.spike_window),
            "loss_regression": A.loss_regression(m, self.s.spike_window),
            "peak_s_by_layer": [float(x) for x in np.nanmax(m.max_logits, axis=(0, 2))],
            "first_step_over": {
                f"{t:g}": A.first_step_over(m, t)
                for t in (self.s.tau_ablation, self.s.tau_k2, 1000.0)
            },
            "final_val_loss": A.final_val_loss(m),
            "final_train_loss": A.final_train_loss(m),
            "s_final": float(A.global_s(m)[-1]) if len(m.steps) else math.nan,
        }

    def _fig12(self, lr4: float, why4: str, tau4: float) -> dict[str, Any]:
        s = self.s
        rows = []
        for seed in s.seeds:
            a = self.get("muon", lr4, seed=seed)
            b = self.get("muonclip", lr4, seed=seed, tau=tau4)
            ma, mb = self.metrics[a], self.metrics[b]
            va, vb = A.final_val_loss(ma), A.final_val_loss(mb)
            cb = A.clip_summary(mb, tau4, s.steps)
            rows.append(
                {
                    "seed": seed,
                    "muon_run": a,
                    "clip_run": b,
                    "val_muon": va,
                    "val_clip": vb,
                    "diff": vb - va,
                    "clip_ever": cb["ever_clipped"],
                    "clip_steps": cb["steps_clipping"],
                    "clip_last": cb["last_clip_step"],
                    "clip_off_fraction": cb["clip_off_fraction"],
                    "clip_by_layer": cb["ever_clipped_by_layer"],
                    "overshoot": cb["overshoot"],
                    "peak_s_muon": A.peak_s(ma)[0],
                    "peak_s_clip": A.peak_s(mb)[0],
                    "spikes_muon": len(A.spikes(ma, s.spike_window, s.spike_factor)),
                    "spikes_clip": len(A.spikes(mb, s.spike_window, s.spike_factor)),
                    "diverged_muon": A.diverged(ma, self.status[a]),
                    "diverged_clip": A.diverged(mb, self.status[b]),
                }
            )
        dm, ds = A.mean_std([r["diff"] for r in rows])
        mm, ms = A.mean_std([r["val_muon"] for r in rows])
        cm, cs = A.mean_std([r["val_clip"] for r in rows])
        return {
            "lr": lr4,
            "lr_why": why4,
            "tau": tau4,
            "seeds": rows,
            "diff_mean": dm,
            "diff_std": ds,
            "muon_mean": mm,
            "muon_std": ms,
            "clip_mean": cm,
            "clip_std": cs,
            "negligible": bool(math.isfinite(ms) and abs(dm) <= ms),
        }

    def _stable(self, sweep, lr, lr_star, mon_row) -> bool:
        r = sweep["muon"][f"{lr:g}"]
        ok = not r["diverged"] and r["spikes"] == 0
        if lr == lr_star:
            ok = ok and not mon_row["diverged"] and not mon_row["spikes"]
        return ok

    def _stable_lr(self, sweep, lr_star, mon_row, tau) -> tuple[float, str]:
        """The largest swept lr whose Muon sweep run neither diverged nor
        spiked (and, for lr*, whose full-length monitor run did neither) and
        whose max logit exceeded tau, so that the clip acts; failing that the
        largest stable lr; failing that the smallest lr."""
        cands = [lr for lr in self.s.sweep_lrs if self._stable(sweep, lr, lr_star, mon_row)]
        active = [lr for lr in cands if sweep["muon"][f"{lr:g}"]["peak_s"] > tau]
        if active:
            return (
                max(active),
                f"largest stable lr (no divergence, no loss spike) whose Muon max logit exceeded tau = {tau:g}",
            )
        if cands:
            return max(
                cands
            ), f"largest stable lr; no stable lr's Muon max logit exceeded tau = {tau:g}"
        return min(self.s.sweep_lrs), "no swept lr was stable; the smallest lr"


def _use_compile_cache(path: pathlib.Path):
    """JAX's persistent compilation cache: runs that differ only in the seed,
    and every continued run, reuse the compiled train step (a few seconds to
    a minute each on 2 CPU cores). The lr and tau are constants in the
    compiled step, so other runs still compile."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    if jax.config.jax_compilation_cache_dir:
        return lambda: None  # the caller chose a cache
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    before = {n: getattr(jax.config, n) for n in names}
    for n, v in zip(names, (str(path), 0.0, -1)):
        jax.config.update(n, v)

    def restore() -> None:  # leave the process as it was (e.g. under pytest)
        for n, v in before.items():
            jax.config.update(n, v)
        cc.reset_cache()

    return restore


def versions() -> dict[str, str]:
    import equinox
    import jax
    import matplotlib
    import numpy
    import optax

    return {
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": _jaxlib(),
        "equinox": equinox.__version__,
        "optax": optax.__version__,
        "numpy": numpy.__version__,
        "matplotlib": matplotlib.__version__,
        "platform": platform.platform(),
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "qkclip_eqx": _lib_rev(),
    }


def _lib_rev() -> str:
    """Which qkclip_eqx ran: $QKCLIP_EQX_REV if set, else its git commit (+ "dirty"
    when its sources differ from it)."""
    import os
    import subprocess

    import qkclip_eqx

    if os.environ.get("QKCLIP_EQX_REV"):
        return os.environ["QKCLIP_EQX_REV"]
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
        return f"git {rev}" + (" + uncommitted changes" if dirty else "")
    except Exception:
        return str(src)


def _jaxlib() -> str:
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:  # pragma: no cover
        return "?"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m paper_repro.kimi_k2",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="the same pipeline at test size (~1-2 min)")
    p.add_argument(
        "--preset",
        choices=sorted(MODES),
        default="full",
        help="full (default, ~43 min on 2 CPU cores), quick, or gpu (for an accelerator)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="results folder (results.md, PNGs, summary.json); runs go to OUT/runs. "
        "Default: paper_repro/kimi_k2/results for full, paper_repro/kimi_k2/runs/<mode>/results otherwise",
    )
    p.add_argument(
        "--runs", default=None, help="folder for the run directories (overrides OUT/runs)"
    )
    p.add_argument(
        "--no-train",
        action="store_true",
        help="only rebuild results.md and figures from complete runs",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    s = QUICK if args.quick else MODES[args.preset]
    if args.out is not None:
        out = pathlib.Path(args.out)
        runs_dir = pathlib.Path(args.runs) if args.runs else out / "runs"
    else:
        out = HERE / "results" if s.name == "full" else HERE / "runs" / s.name / "results"
        runs_dir = pathlib.Path(args.runs) if args.runs else HERE / "runs" / s.name
    out.mkdir(parents=True, exist_ok=True)
    print(f"kimi_k2 reproduction, mode {s.name}: runs in {runs_dir}, results in {out}", flush=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    t0 = time.perf_counter()
    # Before any training: the qkclip_eqx revision that this process imported
    # (the sources may change while the runs train).
    vers = versions()
    restore = _use_compile_cache(runs_dir / ".jax_cache")
    try:
        exp = Experiment(s, runs_dir, train=not args.no_train, log=log)
        summ = exp.run_all()
    finally:
        restore()
    summ["versions"] = vers
    summ["settings"] = {k: v for k, v in vars(s).items()}
    summ["run_configs"] = exp.configs
    summ["run_status"] = {
        n: {k: v for k, v in st.items() if k != "config"} for n, st in exp.status.items()
    }
    report.write(summ, exp.metrics, out)
    print(f"results: {out / 'results.md'} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return summ
