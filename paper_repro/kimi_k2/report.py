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


def _legend(ax) -> None:
    ax.legend(fontsize=8, loc="best", framealpha=0.8)


# ---------------------------------------------------------------------------
def fig_presweep(summ, logs, out) -> str:
    fig, ax = _fig(6.5, 4)
    a = ax[0, 0]
    for opt, col in (("muon", "C0"), ("adamw", "C1")):
        sw = summ["sweep"][opt]
        lrs = [r["lr"] for r in sw["runs"]]
        v = [r["final_val"] for r in sw["runs"]]
        a.plot(lrs, v, "o-", color=col, label=f"{opt}: lr* = {sw['lr']}")
        for r in sw["runs"]:
            if r["diverged"]:
                a.plot(
                    [r["lr"]],
                    [r["final_val"] if math.isfinite(r["final_val"]) else max(v)],
                    "x",
                    color="k",
                    ms=9,
                )
    a.plot([], [], "x", color="k", label="diverged (rule of settings.diverged)")
    a.set_xscale("log")
    a.set_xlabel("lr")
    a.set_ylabel("final val loss (nats/byte)")
    a.set_title("Pre-sweep: each optimizer's best lr must be bracketed")
    _legend(a)
    return _save(fig, out / "presweep.png")


def fig2_left(summ, logs, out) -> str:
    mults = summ["main"]["multipliers"]
    fig, ax = _fig(5 * len(mults), 4, ncols=len(mults), sharey=True)
    for j, (mult, m) in enumerate(mults.items()):
        a = ax[0, j]
        for k, r in enumerate(m["muon"]):
            st, pm = A.probe_max(logs[r["run"]])
            a.plot(st, pm, lw=1, color=f"C{k}", label=f"Muon seed {r['seed']}")
        a.axhline(S.K2_LOGIT_EXPLOSION, color="r", ls="--", lw=1, label="1000 (K2 Fig. 2 left)")
        a.axhline(m["tau"], color="k", ls=":", lw=1, label=f"tau = {m['tau']:g} (MuonClip)")
        a.axvline(
            summ["schedule"]["decay_start"], color="grey", ls="-.", lw=1, label="lr decay starts"
        )
        a.set_yscale("log")
        a.set_xlabel("step")
        a.set_title(f"vanilla Muon, {mult}x lr* = {m['lr']:.3g}")
        _legend(a)
    ax[0, 0].set_ylabel("max logit S on the probe batch")
    return _save(fig, out / "fig2_left_muon.png")


def fig2_right(summ, logs, out) -> str:
    mults = summ["main"]["multipliers"]
    fig, ax = _fig(5 * len(mults), 4, ncols=len(mults))
    for j, (mult, m) in enumerate(mults.items()):
        a = ax[0, j]
        for k, r in enumerate(m["clip"]):
            st, pm = A.probe_max(logs[r["run"]])
            a.plot(st, pm / m["tau"], lw=1, color=f"C{k}", label=f"MuonClip seed {r['seed']}")
            if r["clip"]["last"] >= 0:
                a.axvline(r["clip"]["last"], color=f"C{k}", ls=":", lw=1)
        a.axhline(1.0, color="k", ls="--", lw=1, label="tau")
        a.axvline(
            summ["schedule"]["decay_start"], color="grey", ls="-.", lw=1, label="lr decay starts"
        )
        a.set_xlabel("step (dotted: each seed's last clip)")
        a.set_ylabel("probe S / tau")
        a.set_title(f"MuonClip, {mult}x lr*, tau = {m['tau']:g}")
        _legend(a)
    return _save(fig, out / "fig2_right_muonclip.png")


def fig_appd(summ, logs, out) -> str:
    fig, ax = _fig(6, 4)
    a = ax[0, 0]
    mults = summ["main"]["multipliers"]
    xs, med = [], []
    for m in mults.values():
        fr = [r["clip"]["fraction"] for r in m["clip"]]
        a.plot([m["lr"]] * len(fr), fr, "o", color="C3", alpha=0.7)
        xs.append(m["lr"])
        med.append(float(np.median(fr)))
    a.plot(xs, med, "-", color="C3", label="median over seeds (dots: seeds)")
    a.axhline(S.K2_HEAD_FRACTION, color="grey", ls=":", label="K2 App. D: 12.7%")
    a.axhline(S.HEAD_FRACTION_LIMIT, color="k", ls="--", lw=1, label="pre-registered limit 25.4%")
    a.set_xscale("log")
    a.set_ylim(0, 1.02)
    a.set_xlabel("lr (MuonClip, wd 0.1)")
    a.set_ylabel("fraction of heads ever clipped")
    a.set_title(
        f"App. D: heads that triggered QK-Clip ({mults['1']['clip'][0]['clip']['n_heads']} heads)"
    )
    _legend(a)
    return _save(fig, out / "appD_head_fraction.png")


def fig12(summ, logs, out) -> str:
    fig, ax = _fig(6, 4)
    a = ax[0, 0]
    mults = summ["main"]["multipliers"]
    for i, m in enumerate(mults.values()):
        d = [c["final_val"] - u["final_val"] for u, c in zip(m["muon"], m["clip"])]
        ci = S.paired_ci(d)
        marg = summ["settings"]["equivalence_margin"] * float(
            np.mean([u["final_val"] for u in m["muon"]])
        )
        a.plot([i] * len(d), d, "o", color="C0", alpha=0.6, label="seeds" if i == 0 else None)
        if math.isfinite(ci["lo"]):
            a.errorbar(
                [i + 0.15],
                [ci["mean"]],
                yerr=[[ci["mean"] - ci["lo"]], [ci["hi"] - ci["mean"]]],
                fmt="s",
                color="k",
                capsize=4,
                label="mean, paired 95% CI" if i == 0 else None,
            )
        a.fill_between(
            [i - 0.3, i + 0.45],
            -marg,
            marg,
            color="C2",
            alpha=0.2,
            label="equivalence margin (+-1%)" if i == 0 else None,
        )
    a.axhline(0, color="k", lw=1)
    a.set_xticks(range(len(mults)), [f"{k}x lr*\ntau {m['tau']:g}" for k, m in mults.items()])
    a.set_ylabel("MuonClip - Muon final val loss")
    a.set_title("Fig. 12: does QK-Clip change the loss?")
    _legend(a)
    return _save(fig, out / "fig12_paired.png")


def fig_appe(summ, logs, out) -> str:
    main = summ["main"]
    one = main["multipliers"]["1"]
    fig, ax = _fig(13, 4, ncols=3)
    for u, w in zip(one["muon"], main["adamw"]):
        ax[0, 0].plot([0, 1], [u["peak_probe_s"], w["peak_probe_s"]], "o-", color="0.4")
        ax[0, 1].plot([0, 1], [u["stable_rank"]["all"], w["stable_rank"]["all"]], "o-", color="0.4")
    for a, lab in ((ax[0, 0], "peak probe S"), (ax[0, 1], "mean stable rank of attention updates")):
        a.set_xticks(
            [0, 1], [f"Muon\nlr {one['lr']:.3g}", f"AdamW\nlr {main['adamw'][0]['lr']:.3g}"]
        )
        a.set_ylabel(lab)
        a.set_xlim(-0.4, 1.4)
    ax[0, 0].set_title("App. E: max logit, each at its own lr* (lines: seeds)")
    ax[0, 1].set_title("App. E mechanism: update stable rank")
    b = ax[0, 2]
    for rows, col, lab in ((one["muon"], "C0", "Muon"), (main["adamw"], "C1", "AdamW")):
        for k, r in enumerate(rows):
            st, p = A.norm_products(logs[r["run"]])
            b.plot(st, p, color=col, lw=1, label=lab if k == 0 else None)
    b.set_yscale("log")
    b.set_xlabel("step")
    b.set_ylabel("max over heads of ||q_C|| ||k_C||")
    b.set_title("spectral norms over training")
    _legend(b)
    return _save(fig, out / "appE_muon_vs_adamw.png")


def fig_overshoot(summ, logs, out) -> str:
    fig, ax = _fig(6, 4)
    a = ax[0, 0]
    groups = [(f"{k}x lr*", m["clip"]) for k, m in summ["main"]["multipliers"].items()]
    groups.append(
        (f"1x lr*, wd {summ['settings']['weight_decay_large']:g}", summ["main"]["wd_large"])
    )
    for i, (_, rows) in enumerate(groups):
        tr = [
            r["clip"]["overshoot_train"]
            for r in rows
            if math.isfinite(r["clip"]["overshoot_train"])
        ]
        ov = [r["clip"]["overshoot"] for r in rows if math.isfinite(r["clip"]["overshoot"])]
        g = [r["clip"]["update_growth"] for r in rows if math.isfinite(r["clip"]["update_growth"])]
        a.plot(
            [i - 0.2] * len(tr),
            tr,
            "D",
            color="k",
            alpha=0.7,
            label="training-batch S / tau (the verdict's number)" if i == 0 else None,
        )
        a.plot(
            [i] * len(ov),
            ov,
            "o",
            color="C3",
            alpha=0.7,
            label="probe S / tau" if i == 0 else None,
        )
        a.plot(
            [i + 0.2] * len(g),
            g,
            "s",
            color="C0",
            alpha=0.7,
            label="one update's growth of S (fixed data)" if i == 0 else None,
        )
    a.axhline(1.0, color="k", lw=1, label="tau")
    a.axhline(
        S.CAP_TOLERANCE,
        color="k",
        ls="--",
        lw=1,
        label=f"pre-registered tolerance {S.CAP_TOLERANCE}",
    )
    a.set_xticks(range(len(groups)), [g[0] for g in groups])
    a.set_ylabel("largest value after the first clip")
    a.set_title("Overshoot of the cap, by lr (dots: seeds)")
    _legend(a)
    return _save(fig, out / "overshoot.png")


def fig_wd(summ, logs, out) -> str:
    fig, ax = _fig(6, 4)
    a = ax[0, 0]
    one, big = summ["main"]["multipliers"]["1"]["clip"], summ["main"]["wd_large"]
    w0, w1 = summ["settings"]["weight_decay"], summ["settings"]["weight_decay_large"]
    for r0, r1 in zip(one, big):
        a.plot([w0, w1], [r0["clip"]["last"], r1["clip"]["last"]], "o-", color="0.4")
    warm = summ["settings"]["warmup_steps"]
    t0 = np.median([r["clip"]["last"] for r in one]) - warm
    a.plot(
        [w0, w1],
        [warm + t0, warm + t0 * w0 / w1],
        "--",
        color="C2",
        label="hypothesis: t_off - warmup ~ 1/wd",
    )
    a.axhline(summ["schedule"]["decay_start"], color="grey", ls="-.", label="lr decay starts")
    a.set_xlabel("weight decay")
    a.set_ylabel("last clip step")
    a.set_title("Hypothesis (not the paper's): switch-off ~ 1/(lr x wd)")
    _legend(a)
    return _save(fig, out / "wd_hypothesis.png")


# ---------------------------------------------------------------------------
CLAIMS = [
    ("fig2_left_explosion", "Fig. 2 left: vanilla Muon's max logit exceeds 1000"),
    ("fig2_left_spikes", "Fig. 2 left: loss spikes with vanilla Muon, removed by MuonClip"),
    ("fig2_right_cap", "Fig. 2 right: MuonClip holds S at tau"),
    ("fig2_right_switch_off", "Fig. 2 right: the clip switches off while the lr is at its peak"),
    ("appD_head_fraction", "App. D: a minority of heads (12.7%) trigger the clip"),
    ("fig12_negligible", "Fig. 12: QK-Clip has negligible impact on the loss"),
]


def results_md(summ: dict[str, Any], figs: dict[str, str]) -> str:
    c, s, sch, v = summ["corpus"], summ["settings"], summ["schedule"], summ["verdicts"]
    L = [f"# Kimi K2 stability claims at small scale: results ({summ['mode']} mode)", ""]
    if not c["matches"]:
        L += [
            "> **CORPUS MISMATCH.** These runs read a corpus with sha256 "
            f"`{c['sha256']}`, not the pre-registered `{c['expected_sha256']}` "
            f"({len(c['missing'])} file(s) missing, {len(c['differing'])} differing). "
            "The numbers below are not comparable with results of the pre-registered corpus.",
            "",
        ]
    ver = summ["versions"]
    L += [
        "Generated by `python -m paper_repro.kimi_k2` from the runs' `metrics.jsonl`; every verdict is "
        "the return value of a rule in `settings.py`, fixed before the runs.",
        "",
        f"- Corpus: {c['files']} stdlib files, {c['bytes']:,} bytes, sha256 `{c['sha256']}` "
        f"({'the pre-registered corpus' if c['matches'] else 'NOT the pre-registered corpus'}); read on Python {c['python']}.",
        f"- Model: {s['model']}; batch {s['batch_size']} x {s['seq_len']}.",
        f"- Main runs: {sch['total']} steps: warmup {sch['warmup']}, flat {sch['flat']}, decay from step "
        f"{sch['decay_start']}; wd {s['weight_decay']:g} (and {s['weight_decay_large']:g}); seeds {list(s['seeds'])}.",
        f"- Runs: {summ['n_runs']}, {summ['n_steps']:,} steps, {summ['train_wall_s'] / 60:.1f} min of training "
        f"(sum of run wall times); this invocation trained {len(summ['trained_this_invocation'])} of them "
        f"and took {summ['wall_s_this_invocation'] / 60:.1f} min.",
        f"- Software: Python {ver['python']}, jax {ver['jax']}, equinox {ver['equinox']}, optax {ver['optax']}, "
        f"numpy {ver['numpy']}; backend {ver['backend']}; {ver['platform']}; qkclip_eqx {ver['qkclip_eqx']}.",
        "",
        "## Verdicts",
        "",
        "| claim | " + " | ".join(f"{k}x lr*" for k in summ["main"]["multipliers"]) + " |",
        "|---|" + "---|" * len(summ["main"]["multipliers"]),
    ]
    for key, text in CLAIMS:
        cells = [f"**{v[m][key]['word']}**: {v[m][key]['why']}" for m in v if m.endswith("x")]
        L.append(f"| {text} | " + " | ".join(cells) + " |")
    L += [
        "",
        f"- App. E: Muon grows max logits more than AdamW (each at its own lr*): "
        f"**{v['appE_muon_faster']['word']}**: {v['appE_muon_faster']['why']}.",
        f"- App. E mechanism: Muon's updates have a higher stable rank: "
        f"**{v['appE_update_rank']['word']}**: {v['appE_update_rank']['why']}.",
        f"- Hypothesis (ours, not the paper's), switch-off time ~ 1/(lr x wd): "
        f"**{v['wd_hypothesis']['word']}**: {v['wd_hypothesis']['why']}.",
        "",
    ]
    L += ["## Pre-sweep", ""]
    for opt in ("muon", "adamw"):
        sw = summ["sweep"][opt]
        L += [
            f"{opt}: lr* = **{sw['lr']}** ({sw['why']}; bracketed: {'yes' if sw['bracketed'] else 'NO, ' + str(sw['edge']) + ' end'}).",
            "",
            "| lr | final val loss | diverged | peak probe S | spikes |",
            "|---|---|---|---|---|",
        ]
        L += [
            f"| {r['lr']:.4g} | {_f(r['final_val'])} | {'yes' if r['diverged'] else 'no'} | "
            f"{_f(r['peak_probe_s'], 1)} | {len(r['spikes'])} |"
            for r in sw["runs"]
        ]
        L.append("")
    L += [
        f"![]({figs['presweep']})",
        "",
        "## Main runs",
        "",
        "| run | peak probe S | final val | spikes | first clip | last clip | heads ever clipped | overshoot (probe) | overshoot (train batches) | one update's growth of S | stable rank |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [r for m in summ["main"]["multipliers"].values() for r in m["muon"] + m["clip"]]
    rows += summ["main"]["wd_large"] + summ["main"]["adamw"]
    for r in rows:
        cl = r.get("clip")
        L.append(
            f"| {r['run']} | {_f(r['peak_probe_s'], 1)} | {_f(r['final_val'], 4)} | {len(r['spikes'])} | "
            + (
                f"{cl['first']} | {cl['last']} | {_f(cl['fraction'])} | {_f(cl['overshoot'])} | "
                f"{_f(cl['overshoot_train'])} | {_f(cl['update_growth'])} | "
                if cl
                else "- | - | - | - | - | - | "
            )
            + f"{_f(r['stable_rank']['all'], 2)} |"
        )
    L.append("")
    for key in ("fig2_left", "fig2_right", "appd", "fig12", "appe", "overshoot", "wd"):
        L += [f"![]({figs[key]})", ""]
    return "\n".join(L) + "\n"


def write(summ: dict[str, Any], logs: dict[str, list], out: pathlib.Path) -> None:
    out = pathlib.Path(out)
    figs = {
        "presweep": fig_presweep(summ, logs, out),
        "fig2_left": fig2_left(summ, logs, out),
        "fig2_right": fig2_right(summ, logs, out),
        "appd": fig_appd(summ, logs, out),
        "fig12": fig12(summ, logs, out),
        "appe": fig_appe(summ, logs, out),
        "overshoot": fig_overshoot(summ, logs, out),
        "wd": fig_wd(summ, logs, out),
    }
    (out / "summary.json").write_text(json.dumps(summ, indent=1, default=float))
    (out / "results.md").write_text(results_md(summ, figs))
