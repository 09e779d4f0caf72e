"""Figures (one claim each, 130 dpi) and ``results.md``, from the summary and
the run logs. Every number is formatted from ``summary.json``; every verdict
is the word a rule of ``settings.py`` returned.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from . import analysis as A
from . import settings as S

DPI = 130
COLORS = {"muon": "tab:red", "muonclip": "tab:blue", "adamw": "tab:green"}
LABELS = {"muon": "Muon", "muonclip": "MuonClip", "adamw": "AdamW"}


def _fig(w: float, h: float, ncols: int = 1, nrows: int = 1, **kw):
    fig = Figure(figsize=(w, h), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


def _save(fig: Figure, path: pathlib.Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")
    return path.name


def _f(x: Any, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _g(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.3g}"


def _rows(summ, w, opt):
    return [summ["runs"][n] for n in summ["sweep"][str(w)][opt]]


def _against_lr(summ, y, *, ylabel: str, title: str, path: pathlib.Path, panel, logy: bool) -> str:
    """One panel per width: ``y(row)`` against the lr for each optimizer, then
    ``panel(ax)`` for the panel's reference lines."""
    ws = summ["settings"]["widths"]
    fig, ax = _fig(4.0 * len(ws), 3.6, ncols=len(ws), sharey=True)
    for i, w in enumerate(ws):
        a = ax[0, i]
        for opt in ("muon", "muonclip", "adamw"):
            rows = _rows(summ, w, opt)
            style = "o-" if opt != "muonclip" else "s--"
            a.plot(
                [r["lr"] for r in rows],
                [y(r) for r in rows],
                style,
                color=COLORS[opt],
                label=LABELS[opt],
                ms=4,
            )
            for r in rows:
                if r["stopped"] != "done" and not logy:
                    a.plot(r["lr"], S.LN_VOCAB, "x", color=COLORS[opt], ms=9, mew=2)
        panel(a)
        a.set_xscale("log")
        if logy:
            a.set_yscale("log")
        a.set_title(f"width {w}")
        a.set_xlabel("peak learning rate")
        a.grid(alpha=0.3)
    ax[0, 0].set_ylabel(ylabel)
    ax[0, 0].legend(fontsize=8 if not logy else 7)
    fig.suptitle(title)
    return _save(fig, path)


def fig_loss_vs_lr(summ, logs, out) -> str:
    return _against_lr(
        summ,
        A.capped_val,
        ylabel="final val loss (capped at ln 256; x: stopped)",
        title="Final validation loss against lr (Wortsman et al. 2023, Fig. 1 style)",
        path=out / "loss_vs_lr.png",
        panel=lambda a: a.axhline(S.LN_VOCAB, color="gray", lw=0.8, ls=":"),
        logy=False,
    )


def fig_peak_s_vs_lr(summ, logs, out) -> str:
    def panel(a) -> None:
        a.axhline(
            summ["explosion"],
            color="black",
            lw=0.8,
            ls="--",
            label="lr_1000 threshold (K2 Fig. 2 left: 1000)",
        )
        a.axhline(summ["tau"], color="tab:blue", lw=0.8, ls=":", label=f"tau = {summ['tau']:g}")

    return _against_lr(
        summ,
        lambda r: r["peak_s"],
        ylabel="peak training-batch S",
        title="Peak max logit S against lr, per width",
        path=out / "peak_s_vs_lr.png",
        panel=panel,
        logy=True,
    )


def fig_scale(summ, logs, out) -> str:
    fig, ax = _fig(10, 3.8, ncols=2)
    a = ax[0, 0]
    sw = {int(k): v for k, v in summ["settled_vs_width"].items()}
    if sw:
        a.plot(
            list(sw),
            list(sw.values()),
            "o",
            color="tab:red",
            label=f"Muon, lr {_g(summ['lr_fit'])}, wd 0.1",
        )
        fit = summ["fit_width"]
        if fit:
            x = np.geomspace(min(sw), 7168, 50)
            a.plot(
                x,
                fit["c"] * x ** fit["p"],
                "--",
                color="gray",
                label=f"fit S = {fit['c']:.3g} d^{fit['p']:.2f} (extrapolated)",
            )
            a.plot(
                [7168],
                [summ["prediction_k2_width"]],
                "*",
                color="black",
                ms=12,
                label=f"K2 width 7168: {summ['prediction_k2_width']:.3g} (extrapolation)",
            )
    a.axhline(summ["explosion"], color="black", lw=0.8, ls=":")
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("width (dim)")
    a.set_ylabel("settled S (last quarter of the flat phase)")
    a.set_title("Settled S against width")
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    b = ax[0, 1]
    sd = {float(k): v for k, v in summ["settled_vs_wd"].items()}
    if sd:
        b.plot(list(sd), list(sd.values()), "o-", color="tab:red")
        fit = summ["fit_wd"]
        if fit:
            b.set_title(
                f"Settled S against wd (width {summ['fig12']['width']}): S ~ wd^{fit['p']:.2f}"
            )
    b.set_xscale("log")
    b.set_yscale("log")
    b.set_xlabel("weight decay")
    b.grid(alpha=0.3)
    return _save(fig, out / "settled_s_vs_scale.png")


def exploding_pair(summ) -> tuple[str, str] | None:
    """The largest width's lr_1000 pair (seed 0), Muon and MuonClip."""
    for w in reversed(summ["settings"]["widths"]):
        lr = summ["lr_1000"][str(w)]
        if lr is not None:
            i = [summ["runs"][n]["lr"] for n in summ["sweep"][str(w)]["muon"]].index(lr)
            return summ["sweep"][str(w)]["muon"][i], summ["sweep"][str(w)]["muonclip"][i]
    return None


def fig_traces(summ, logs, out) -> str:
    fig, ax = _fig(10, 5.5, ncols=1, nrows=2, sharex=True)
    pair = exploding_pair(summ)
    if pair:
        for n, opt in zip(pair, ("muon", "muonclip")):
            lg = logs[n]
            ax[0, 0].plot(A.step_max(lg), color=COLORS[opt], lw=1, label=LABELS[opt])
            ax[1, 0].plot(lg["loss"], color=COLORS[opt], lw=0.8, label=LABELS[opt])
        r = summ["runs"][pair[0]]
        ax[0, 0].set_title(f"Width {r['width']}, lr {_g(r['lr'])}, seed 0: the same batches")
    ax[0, 0].axhline(summ["tau"], color="tab:blue", lw=0.8, ls=":", label=f"tau = {summ['tau']:g}")
    ax[0, 0].axhline(summ["explosion"], color="black", lw=0.8, ls="--")
    ax[0, 0].set_yscale("log")
    ax[0, 0].set_ylabel("largest training-batch S")
    ax[1, 0].set_ylabel("training loss")
    ax[1, 0].set_xlabel("step")
    for a in ax[:, 0]:
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    return _save(fig, out / "explosion_traces.png")


def fig_appd(summ, logs, out) -> str:
    fig, ax = _fig(6.5, 3.8)
    a = ax[0, 0]
    taus = np.geomspace(5, 5000, 60)
    for w in summ["settings"]["widths"]:
        rows = [r for r in _rows(summ, w, "muon") if not r["diverged"]]
        if rows:
            a.plot(
                taus,
                A.heads_over_curve([r["head_peaks"] for r in rows], taus),
                label=f"width {w} ({len(rows)} healthy Muon runs)",
            )
    fr = [summ["runs"][n]["clip"]["fraction"] for n in summ["clip_runs"]]
    if fr:
        a.plot([summ["tau"]] * len(fr), fr, "k.", label=f"MuonClip runs at tau {summ['tau']:g}")
    a.axhline(S.K2_HEAD_FRACTION, color="gray", ls="--", lw=0.8, label="K2: 12.7%")
    a.set_xscale("log")
    a.set_xlabel("tau")
    a.set_ylabel("fraction of heads ever over tau")
    a.set_title("App. D: heads that a clip at tau would touch")
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    return _save(fig, out / "appD_head_fraction.png")


def fig_intervals(summ, logs, out) -> str:
    fig, ax = _fig(10, 3.6, ncols=2)
    f12 = summ["fig12"]
    a = ax[0, 0]
    d = np.asarray(f12["diffs"], float)
    a.plot(range(len(d)), d, "o", color="tab:blue")
    ci = S.paired_ci90(d)
    m = S.EQUIVALENCE_MARGIN * f12["base"]
    a.axhspan(-m, m, color="gray", alpha=0.2, label="+-1% of Muon's loss")
    if math.isfinite(ci["lo"]):
        a.axhspan(ci["lo"], ci["hi"], color="tab:blue", alpha=0.2, label="90% CI")
    a.axhline(0, color="black", lw=0.8)
    a.set_xlabel("seed")
    a.set_ylabel("val loss, MuonClip - Muon")
    a.set_title(f"Fig. 12: tau {f12['tau']:g}, width {f12['width']}, lr {_g(f12['lr'])}")
    a.legend(fontsize=7)
    b = ax[0, 1]
    for i, w in enumerate(sorted(summ["cure"], key=int)):
        c = summ["cure"][w]
        ci = S.paired_ci90(c["diffs"])
        b.plot([i] * len(c["diffs"]), c["diffs"], ".", color="gray")
        if math.isfinite(ci["lo"]):
            b.errorbar(
                [i],
                [ci["mean"]],
                yerr=[[ci["mean"] - ci["lo"]], [ci["hi"] - ci["mean"]]],
                fmt="o",
                color="tab:blue",
                capsize=4,
            )
        b.text(
            i,
            b.get_ylim()[1] if False else ci["mean"],
            f"  lr {_g(c['lr'])}",
            fontsize=7,
            va="center",
        )
    b.axhline(0, color="black", lw=0.8)
    b.set_xticks(range(len(summ["cure"])), [f"width {w}" for w in sorted(summ["cure"], key=int)])
    b.set_ylabel("capped val loss, MuonClip - Muon")
    b.set_title("At lr_1000: MuonClip - Muon, 90% CI")
    return _save(fig, out / "intervals.png")


def fig_appe(summ, logs, out) -> str:
    ws = summ["settings"]["widths"]
    fig, ax = _fig(4.0 * len(ws), 6.4, ncols=len(ws), nrows=2)
    for i, w in enumerate(ws):
        for opt in ("muon", "adamw"):
            star = summ["best"][str(w)][opt]["lr"]
            rows = [r for r in _rows(summ, w, opt) if r["stopped"] == "done"]
            if star is None:
                continue
            x = [r["lr"] / star for r in rows]
            for row, key, slopes in (
                (0, "peak_s", "slopes_s"),
                (1, "peak_norm_product", "slopes_norm"),
            ):
                slope = summ[slopes][str(w)][opt]
                label = f"{LABELS[opt]} slope {slope:.2f}"
                ax[row, i].plot(
                    x, [r[key] for r in rows], "o-", color=COLORS[opt], label=label, ms=4
                )
        for a in ax[:, i]:
            a.axvline(1, color="gray", lw=0.8)
            a.set_xscale("log")
            a.set_yscale("log")
            a.grid(alpha=0.3)
            a.legend(fontsize=7)
        ax[0, i].set_title(f"width {w}")
        ax[1, i].set_xlabel("lr / lr* (each optimizer's own best)")
    ax[0, 0].set_ylabel("peak S")
    ax[1, 0].set_ylabel("peak max over heads of\nsigma(W_qC) sigma(W_kC)")
    fig.suptitle("App. E: growth of S and of the q/k weights with lr (slopes over lr >= lr*)")
    return _save(fig, out / "appE_muon_vs_adamw.png")


def results_md(summ: dict[str, Any], figs: dict[str, str]) -> str:
    v, tm, ver, tol = summ["verdicts"], summ["timing"], summ["versions"], summ["tolerances"]
    ws = summ["settings"]["widths"]
    claims = [
        (
            'Fig. 2 left: vanilla Muon\'s max logits "rapidly exceed 1000"',
            "fig2_left_explosion",
            "peak_s_vs_lr",
        ),
        (
            'Fig. 2 left: "significant loss spikes" (paired with MuonClip)',
            "fig2_left_spikes",
            "explosion_traces",
        ),
        (
            f"MuonClip prevents the damage where Muon explodes ({summ['settings']['cure_seeds']} seeds)",
            "cure",
            "intervals",
        ),
        (
            "MuonClip widens the stable lr range (Wortsman's lr sensitivity)",
            "stable_range",
            "loss_vs_lr",
        ),
        (
            "Fig. 2 right: S rises to the cap and is held there (paraphrase)",
            "fig2_right_cap",
            "explosion_traces",
        ),
        (
            "Fig. 2 right: the clip stops acting during training (paraphrase)",
            "fig2_right_switch_off",
            "explosion_traces",
        ),
        (
            "App. D: 12.7% of heads triggered QK-Clip (paraphrase)",
            "appD_head_fraction",
            "appD_head_fraction",
        ),
        ('Fig. 12: tau = 30 "has negligible impact on loss"', "fig12_negligible", "intervals"),
        (
            "App. E: Muon grows max logits faster than Adam (paraphrase)",
            "appE_muon_faster",
            "appE_muon_vs_adamw",
        ),
        (
            "App. E, mechanism: through the q/k weights' spectral norms (paraphrase)",
            "appE_weight_growth",
            "appE_muon_vs_adamw",
        ),
    ]
    n_rep = sum(v[k]["word"] == S.REPRODUCED for _, k, _ in claims)
    L = [
        "# Kimi K2's stability claims at small scale: results (v3)",
        "",
        f"Mode `{summ['mode']}`. Generated by `python -m paper_repro.kimi_k2` from the run logs (full mode: `logs/`); every verdict is the return value of a rule in `settings.py`, with the tolerances from `pilot.json`.",
        "",
        f"**{n_rep} of {len(claims)} claims reproduced.**",
        "",
        "| claim (Kimi K2 report, arXiv 2507.20534) | verdict | measurement | figure |",
        "|---|---|---|---|",
    ]
    for claim, k, fig in claims:
        L.append(f"| {claim} | **{v[k]['word']}** | {v[k]['why']} | [{figs[fig]}]({figs[fig]}) |")
    L += [
        "",
        "## The sweep",
        "",
        "| width | best lr Muon / MuonClip / AdamW | best val loss | lr_1000 (Muon) | lowest diverged lr Muon / MuonClip / AdamW | lr sensitivity Muon / MuonClip |",
        "|---|---|---|---|---|---|",
    ]
    for w in ws:
        b = summ["best"][str(w)]
        sens = summ["sensitivity"][str(w)]
        L.append(
            f"| {w} | {_g(b['muon']['lr'])} / {_g(b['muonclip']['lr'])} / {_g(b['adamw']['lr'])} "
            f"| {_f(b['muon']['val_loss'])} / {_f(b['muonclip']['val_loss'])} / {_f(b['adamw']['val_loss'])} "
            f"| {_g(summ['lr_1000'][str(w)])} "
            f"| {' / '.join(_g(summ['lr_diverged'][str(w)][o]) for o in ('muon', 'muonclip', 'adamw'))} "
            f"| {_f(sens['muon'])} / {_f(sens['muonclip'])} |"
        )
    L += [
        "",
        "Per run (seed 0): peak training-batch S, final val loss, and the smallest attention "
        "entropy of a head on the probe set (nats); n/a: the run was stopped.",
        "",
    ]
    L += [
        "| width | optimizer | "
        + " | ".join(_g(x) for x in summ["settings"]["grid"]["muon"])
        + " |",
        "|---|---|" + "---|" * len(summ["settings"]["grid"]["muon"]),
    ]
    for w in ws:
        for opt in ("muon", "muonclip", "adamw"):
            cells = [
                f"{_g(r['peak_s'])}, {_f(r['val_loss'])}, "
                + (_f(r["min_entropy"], 2) if r["stopped"] == "done" else "n/a")
                for r in _rows(summ, w, opt)
            ]
            head = (
                "AdamW (lrs " + ", ".join(_g(x) for x in summ["settings"]["grid"]["adamw"]) + ")"
                if opt == "adamw"
                else LABELS[opt]
            )
            L.append(f"| {w} | {head} | " + " | ".join(cells) + " |")
    f12 = summ["fig12"]
    L += [
        "",
        "## Scale",
        "",
        f"[{figs['settled_s_vs_scale']}]({figs['settled_s_vs_scale']})",
        "",
        f"Settled S at lr_fit = {_g(summ['lr_fit'])}, wd 0.1, by width: "
        + ", ".join(f"{w}: {_f(x, 1)}" for w, x in summ["settled_vs_width"].items())
        + (
            f"; fit S = {summ['fit_width']['c']:.3g} d^{summ['fit_width']['p']:.2f}. **Extrapolation** to K2's width 7168: S = {summ['prediction_k2_width']:.3g} (a prediction from three small widths, not a measurement)."
            if summ["fit_width"]
            else "."
        ),
        f"By weight decay at width {f12['width']}: "
        + ", ".join(f"{k}: {_f(x, 1)}" for k, x in summ["settled_vs_wd"].items())
        + (f"; S ~ wd^{summ['fit_wd']['p']:.2f}." if summ["fit_wd"] else "."),
        "",
        f"Fig. 12 runs: the clip acted on {', '.join(f'{x:.0%}' for x in f12['clip_fraction_steps'])} of the steps (seeds {', '.join(str(i) for i in range(len(f12['diffs'])))}).",
        "",
        "## Tolerances (from the pilot, `pilot.json`)",
        "",
        f"cap {tol['cap_tolerance']:.3f} x tau; spike delta {tol['spike_delta']:.4f} nats; lr-sensitivity margin {tol['sensitivity_margin']:.4f} nats.",
        "",
        "## Run",
        "",
        f"{tm['runs']} runs, {tm['steps']} steps, {tm['wall_s'] / 60:.1f} min of wall time in the invocation that trained them "
        f"({tm['trained']} runs). {tm['compiles']} XLA compilations took {tm['compile_s']:.0f} s ({tm['compile_s'] / tm['wall_s']:.1%} of the wall time; "
        f"every distinct jitted function and shape counts, eager operations included; the train step is compiled once per width and optimizer family). The loop took {_f(tm['loop_over_bare'], 2)}x the time of the pilot's bare "
        f"steps for the same steps (probes and final validation included). Python {ver['python']}, jax {ver['jax']}, equinox {ver['equinox']}, optax {ver['optax']}, {ver['platform']}, {ver['cpus']} CPUs; qkclip_eqx {ver['qkclip_eqx']}.",
        f"Corpus sha256 `{summ['corpus']['sha256']}`"
        + ("" if summ["corpus"]["matches"] else " (**CORPUS MISMATCH**)")
        + ".",
        "",
    ]
    return "\n".join(L)


def write(summ: dict[str, Any], logs: dict[str, A.Log], out: pathlib.Path, s: S.Settings) -> None:
    out = pathlib.Path(out)
    figs = {
        "loss_vs_lr": fig_loss_vs_lr(summ, logs, out),
        "peak_s_vs_lr": fig_peak_s_vs_lr(summ, logs, out),
        "settled_s_vs_scale": fig_scale(summ, logs, out),
        "explosion_traces": fig_traces(summ, logs, out),
        "appD_head_fraction": fig_appd(summ, logs, out),
        "intervals": fig_intervals(summ, logs, out),
        "appE_muon_vs_adamw": fig_appe(summ, logs, out),
    }
    (out / "summary.json").write_text(
        json.dumps(summ, indent=1, default=float, sort_keys=True) + "\n"
    )
    (out / "results.md").write_text(results_md(summ, figs))
