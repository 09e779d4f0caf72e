"""Figures and ``results.md``, generated from the run logs and the summary.

Every number in ``results.md`` is formatted from ``summary.json`` (which the
pipeline computes from the runs' ``metrics.jsonl``); nothing is typed in.
Figures use matplotlib's object-oriented API (no pyplot), at 80 dpi.
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

DPI = 80


def _fig(w: float, h: float, ncols: int = 1, nrows: int = 1, **kw):
    fig = Figure(figsize=(w, h), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _save(fig: Figure, path: pathlib.Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")
    return path.name


def _f(x: Any, nd: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    if len(y) < k or k <= 1:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    out = np.empty_like(y)
    out[k - 1 :] = (c[k:] - c[:-k]) / k
    out[: k - 1] = c[1:k] / np.arange(1, k)
    return out


def _decay_start(settings: dict[str, Any]) -> float:
    return settings["steps"] - round(settings["steps"] * settings["decay_fraction"])


# ---------------------------------------------------------------------------
def fig2_left(summ, metrics, out) -> str:
    row = summ["fig2_left"]
    m = metrics[row["run"]]
    fig, ax = _fig(7, 5, nrows=2, sharex=True)
    lay = m.max_logits.max(axis=2)
    for i in range(lay.shape[1]):
        ax[0, 0].plot(m.steps, lay[:, i], lw=1, label=f"layer {i}")
    ax[0, 0].plot(m.steps, A.global_s(m), color="k", lw=1.5, label="max")
    ax[0, 0].axhline(100, color="r", ls="--", lw=1, label="tau = 100 (K2)")
    ax[0, 0].set_yscale("log")
    ax[0, 0].set_ylabel("max logit S")
    ax[0, 0].set_title(f"Fig. 2 left: vanilla Muon, lr {summ['lr_star']:g} (no clip)")
    ax[0, 0].legend(fontsize=7, ncol=3)
    ax[1, 0].plot(m.steps, m.loss, lw=0.8, color="C0", label="train loss")
    if len(m.val_steps):
        ax[1, 0].plot(m.val_steps, m.val_loss, "o--", ms=3, color="C1", label="val loss")
    sp = row["spikes"]
    if sp:
        ax[1, 0].plot([p["step"] for p in sp], [p["loss"] for p in sp], "rv", ms=6, label="spike")
    ax[1, 0].set_ylabel("loss (nats/byte)")
    ax[1, 0].set_xlabel("step")
    ax[1, 0].legend(fontsize=7)
    for a in ax[:, 0]:
        a.axvline(_decay_start(summ["settings"]), color="grey", ls=":", lw=1)
    return _save(fig, out / "fig2_left_muon.png")


def fig2_right(summ, metrics, out) -> str:
    taus = list(summ["fig2_right"])
    mon = metrics[summ["fig2_left"]["run"]]
    fig, ax = _fig(4 * len(taus), 5, ncols=len(taus), nrows=2, sharex=True)
    for j, t in enumerate(taus):
        row = summ["fig2_right"][t]
        m = metrics[row["run"]]
        tau = float(t)
        a = ax[0, j]
        a.plot(mon.steps, A.global_s(mon), color="0.7", lw=1, label="Muon (no clip)")
        a.plot(m.steps, A.global_s(m), color="C3", lw=1.2, label="MuonClip")
        a.axhline(tau, color="k", ls="--", lw=1, label=f"tau = {tau:g}")
        c = row["clip"]
        if c["last_clip_step"] >= 0:
            a.axvline(c["last_clip_step"], color="C2", lw=1, label="last clip")
        a.set_yscale("log")
        a.set_title(f"MuonClip tau = {tau:g}, lr {summ['lr_star']:g}", fontsize=9)
        a.set_ylabel("max logit S")
        a.legend(fontsize=7)
        b = ax[1, j]
        b.plot(m.steps, m.heads_clipped, color="C3", lw=0.8)
        b.set_ylabel("heads clipped")
        b.set_xlabel("step")
        for x in (a, b):
            x.axvline(_decay_start(summ["settings"]), color="grey", ls=":", lw=1)
    return _save(fig, out / "fig2_right_muonclip.png")


def appd(summ, metrics, out) -> str:
    taus = list(summ["fig2_right"])
    fig, ax = _fig(8, 3.2, ncols=2)
    width = 0.8 / max(1, len(taus))
    for j, t in enumerate(taus):
        c = summ["fig2_right"][t]["clip"]
        by = c["ever_clipped_by_layer"]
        ax[0, 0].bar(np.arange(len(by)) + j * width, by, width, label=f"tau = {t}")
        m = metrics[summ["fig2_right"][t]["run"]]
        ax[0, 1].plot(m.steps, A.ever_clipped_curve(m, float(t)), label=f"tau = {t}")
    ax[0, 0].set_xlabel("layer")
    ax[0, 0].set_ylabel("fraction of heads ever clipped")
    ax[0, 0].set_ylim(0, 1.05)
    ax[0, 0].legend(fontsize=7)
    ax[0, 1].set_xlabel("step")
    ax[0, 1].set_ylabel("heads clipped so far (fraction)")
    ax[0, 1].set_ylim(0, 1.05)
    ax[0, 1].axhline(0.127, color="grey", ls=":", lw=1, label="K2: 12.7%")
    ax[0, 1].legend(fontsize=7)
    fig.suptitle(f"App. D: heads that triggered QK-Clip (lr {summ['lr_star']:g})", fontsize=9)
    return _save(fig, out / "appD_heads_clipped.png")


def fig12(summ, metrics, out) -> str:
    comps = summ["fig12"]
    fig, ax = _fig(7.5, 2.4 * len(comps), ncols=2, nrows=len(comps))
    k = max(1, summ["settings"]["steps"] // 25)
    for i, f in enumerate(comps):
        for r in f["seeds"]:
            for key, col, lab in (
                ("muon_run", "C0", "Muon"),
                ("clip_run", "C3", f"MuonClip tau={f['tau']:g}"),
            ):
                m = metrics[r[key]]
                ax[i, 0].plot(
                    m.steps,
                    _smooth(m.loss, k),
                    color=col,
                    lw=0.8,
                    label=lab if r is f["seeds"][0] else None,
                )
        ax[i, 0].set_xlabel("step")
        ax[i, 0].set_ylabel(f"train loss (mean of {k})")
        ax[i, 0].legend(fontsize=7)
        ax[i, 0].set_title(f"lr {f['lr']:g}", fontsize=9)
        lo = min(min(r["val_muon"], r["val_clip"]) for r in f["seeds"])
        ax[i, 0].set_ylim(lo - 0.1, lo + 1.5)
        seeds = [r["seed"] for r in f["seeds"]]
        ax[i, 1].plot(seeds, [r["val_muon"] for r in f["seeds"]], "o", color="C0", label="Muon")
        ax[i, 1].plot(seeds, [r["val_clip"] for r in f["seeds"]], "s", color="C3", label="MuonClip")
        ax[i, 1].set_xlabel("seed")
        ax[i, 1].set_ylabel("final val loss")
        ax[i, 1].set_xticks(seeds)
        ax[i, 1].legend(fontsize=7)
        ax[i, 1].set_title(
            f"lr {f['lr']:g}: MuonClip - Muon = {f['diff_mean']:+.3f} ± {_f(f['diff_std'], 3)}",
            fontsize=9,
        )
    fig.suptitle(f"Fig. 12: Muon vs MuonClip tau = {comps[0]['tau']:g}", fontsize=9)
    return _save(fig, out / "fig12_loss.png")


def appe(summ, metrics, out) -> str:
    sw = summ["sweep"]
    lrs = sw["lrs"]
    fig, ax = _fig(8, 3.2, ncols=2)
    arms = (
        ("muon", "C0", "o", "Muon", "-"),
        ("adamw", "C2", "^", "AdamW", "-"),
        ("muonclip", "C3", "s", f"MuonClip tau={sw['tau']:g}", "--"),
        ("adamw_clip", "C1", "v", f"AdamW + QK-Clip tau={sw['tau']:g}", "--"),
    )
    for arm, col, mk, lab, ls in arms:
        if arm not in sw["runs"]:
            continue
        rows = [sw["runs"][arm][f"{lr:g}"] for lr in lrs]
        y = [r["s_fixed"] for r in rows]
        kw = dict(color=col, label=lab, ls=ls, marker=mk, mfc="none" if ls == "--" else col)
        ax[0, 0].plot(lrs, y, **kw)
        ax[0, 1].plot(lrs, [r["final_train_loss"] for r in rows], **kw)
        for lr, r in zip(lrs, rows):
            if r["diverged"]:
                yy = r["s_fixed"] if math.isfinite(r["s_fixed"]) else r["peak_s"]
                ax[0, 0].plot([lr], [yy], "x", color="k", ms=9)
    ax[0, 0].axhline(sw["tau"], color="k", ls="--", lw=1)
    for a in ax[0]:
        a.set_xscale("log")
        a.set_xlabel("peak lr")
    ax[0, 0].set_yscale("log")
    ax[0, 0].set_ylabel(f"max logit S at step {sw['fixed_step']}")
    ax[0, 1].set_ylabel("train loss, last 20 steps")
    ax[0, 0].legend(fontsize=7)
    fig.suptitle("App. E: max logit vs lr (x: diverged)", fontsize=9)
    return _save(fig, out / "appE_lr_sweep.png")


def overshoot(summ, metrics, out) -> str:
    fig, ax = _fig(7, 3)
    for i, r in enumerate(summ["overshoot"]["runs"]):
        m = metrics[r["run"]]
        ax[0, 0].plot(
            m.steps,
            A.global_s(m) / r["tau"],
            lw=0.8,
            color=f"C{i % 10}",
            label=r["run"].split("/")[-1],
        )
    ax[0, 0].axhline(1.0, color="k", ls="--", lw=1)
    ax[0, 0].set_xlabel("step")
    ax[0, 0].set_ylabel("max S / tau")
    ax[0, 0].set_yscale("log")
    ax[0, 0].legend(fontsize=5, ncol=2)
    ax[0, 0].set_title(
        f"Overshoot: max S/tau after the first clip = {_f(summ['overshoot']['max'], 3)}", fontsize=9
    )
    return _save(fig, out / "overshoot.png")


# ---------------------------------------------------------------------------
def results_md(summ, figs) -> str:
    s = summ["settings"]
    L: list[str] = []
    w = L.append
    w(f"# Kimi K2 stability experiments, small scale: results ({summ['mode']} mode)\n")
    w(
        "Generated by `python -m paper_repro.kimi_k2"
        + ("" if summ["mode"] == "full" else f" --preset {summ['mode']}")
        + "` from the runs' "
        "`metrics.jsonl`; every number below is computed from those logs.\n"
    )
    mdl = s["model"]
    w(
        f"- Model: MLA Transformer, {mdl['n_layers']} layers, width {mdl['dim']}, {mdl['n_heads']} heads "
        f"({mdl['n_layers'] * mdl['n_heads']} heads in all), q/k head dim {mdl['qk_nope_head_dim']}+"
        f"{mdl['qk_rope_head_dim']} (RoPE), kv latent {mdl['kv_lora_rank']}, MLP {mdl['mlp_hidden']}; "
        f"byte tokens (vocab 256) of the Python standard library ({s['max_bytes']:,} train bytes max)."
    )
    w(
        f"- Batch {s['batch_size']} x {s['seq_len']} tokens. Main runs {s['steps']} steps: WSD, warmup "
        f"{s['warmup_steps']}, linear decay over the last {s['decay_fraction']:.0%} (from step "
        f"{_decay_start(s):g}), weight decay {s['weight_decay']}. Sweep runs {s['sweep_steps']} steps, "
        f"constant lr after the warmup."
    )
    w(
        f"- Seeds: {list(s['seeds'])} (Fig. 12); seed 0 elsewhere. A loss spike: loss > "
        f"{s['spike_factor']} x the median of the previous {s['spike_window']} steps. Diverged: a "
        "non-finite loss, or the mean of the last 10 losses not below that of the first 10."
    )
    v = summ["versions"]
    w(
        f"- Software: Python {v['python']}, jax {v['jax']} (jaxlib {v['jaxlib']}), equinox "
        f"{v['equinox']}, optax {v['optax']}, numpy {v['numpy']}, matplotlib {v['matplotlib']}; "
        f"backend {v['backend']} ({v['device']}), {v['platform']}; qkclip_eqx {v['qkclip_eqx']}."
    )
    trained = summ.get("runs_trained_this_invocation", [])
    reused = summ["n_runs"] - len(trained)
    w(
        f"- Runs: {summ['n_runs']}, {summ['n_steps_total']:,} training steps, "
        f"{summ['train_wall_s_total'] / 60:.1f} min of training (sum of the runs' wall times). "
        f"This invocation trained {len(trained)} of them"
        + (
            f"; the other {reused} were complete and reused as they were (trained by earlier "
            "invocations, possibly with an earlier qkclip_eqx)"
            if reused
            else ""
        )
        + ".\n"
    )

    # 1 --------------------------------------------------------------------
    sw = summ["sweep"]
    w("## 1. Fig. 2 left: vanilla Muon (max logit monitored, never clipped)\n")
    w(f"lr sweep ({s['sweep_steps']} steps each), Muon:\n")
    w("| lr | max S | at step | S at last step | final train loss | spikes | diverged |")
    w("|---|---|---|---|---|---|---|")
    for lr in sw["lrs"]:
        r = sw["runs"]["muon"][f"{lr:g}"]
        w(
            f"| {lr:g} | {_f(r['peak_s'], 1)} | {r['peak_step']} | {_f(r['s_fixed'], 1)} | "
            f"{_f(r['final_train_loss'], 3)} | {r['spikes']} | {'yes' if r['diverged'] else 'no'} |"
        )
    r = summ["fig2_left"]
    w(f"\nChosen lr* = **{summ['lr_star']:g}** ({summ['lr_star_why']}).\n")
    w(
        f"Full-length run at lr*, {s['steps']} steps: **largest max logit S = {_f(r['peak_s'], 1)} at "
        f"step {r['peak_step']}**; S at the last step {_f(r['s_final'], 1)}; "
        f"**loss spikes: {len(r['spikes'])}** (largest loss / running median: {_f(r['max_loss_ratio'], 3)}); "
        f"largest rise of the {s['spike_window']}-step mean loss above its earlier minimum: "
        f"{_f(r['loss_regression'][0], 3)} (at step {r['loss_regression'][1]}); "
        "first step with S above "
        + ", ".join(f"{k}: {v}" for k, v in r["first_step_over"].items())
        + "; "
        "largest S per layer: " + ", ".join(f"{x:.1f}" for x in r["peak_s_by_layer"]) + "; "
        f"diverged: {'yes' if r['diverged'] else 'no'} (stopped: {r['stopped']} at step {r['steps_run']}); "
        f"final val loss {_f(r['final_val_loss'], 4)}."
    )
    if r["spikes"]:
        w("Spikes at steps: " + ", ".join(str(p["step"]) for p in r["spikes"]) + ".")
    w(f"\n![Fig. 2 left]({figs['fig2_left']})\n")

    # 2 --------------------------------------------------------------------
    w("## 2. Fig. 2 right: MuonClip at lr*\n")
    w(
        f"tau_low = {summ['tau_low']:g}, chosen from the monitor run's largest S "
        f"({_f(r['peak_s'], 1)}): 30 (K2's ablation value) when that S is at least 45, else half of it.\n"
    )
    w(
        "| tau | max S (step) | first clip | last clip | clipping switched off after | steps clipping | "
        "most heads at once | spikes | largest rise of mean loss | final val loss |"
    )
    w("|---|---|---|---|---|---|---|---|---|---|")
    for t, row in summ["fig2_right"].items():
        c = row["clip"]
        off = (
            f"step {c['clip_off_after']} = **{c['clip_off_fraction']:.1%}** of training"
            if c["last_clip_step"] >= 0
            else "never clipped"
        )
        if row.get("identical_to_monitor_run"):
            off += " (S never exceeded tau, so MuonClip is the monitor run itself)"
        w(
            f"| {t} | {_f(row['peak_s'], 1)} ({row['peak_step']}) | {c['first_clip_step']} | "
            f"{c['last_clip_step']} | {off} | {c['steps_clipping']} | {c['max_heads_clipped']} | "
            f"{len(row['spikes'])} | {_f(row['loss_regression'][0], 3)} | {_f(row['final_val_loss'], 4)} |"
        )
    w(f"\nVanilla Muon at the same lr: final val loss {_f(r['final_val_loss'], 4)}.")
    w(
        f"\nK2: the max logit reaches 100 and decays to a stable range after about 30% of training. "
        f"Here the lr decay starts at step {_decay_start(s):g} "
        f"({_decay_start(s) / s['steps']:.0%} of training)."
    )
    w(f"\n![Fig. 2 right]({figs['fig2_right']})\n")

    # 3 --------------------------------------------------------------------
    w("## 3. App. D: heads that ever triggered QK-Clip\n")
    w(
        "| tau | all heads | "
        + " | ".join(f"layer {i}" for i in range(s["model"]["n_layers"]))
        + " | no head triggers after step |"
    )
    w("|---|---|" + "---|" * s["model"]["n_layers"] + "---|")
    for t, row in summ["fig2_right"].items():
        c = row["clip"]
        w(
            f"| {t} | **{c['ever_clipped']:.1%}** | "
            + " | ".join(f"{x:.0%}" for x in c["ever_clipped_by_layer"])
            + f" | {c['clip_off_after'] if c['last_clip_step'] >= 0 else 'never clipped'} |"
        )
    w("\nThe same for every MuonClip run of Fig. 12 (section 4):\n")
    w(
        "| lr | seed | all heads | "
        + " | ".join(f"layer {i}" for i in range(s["model"]["n_layers"]))
        + " | no head triggers after step |"
    )
    w("|---|---|---|" + "---|" * s["model"]["n_layers"] + "---|")
    for f in summ["fig12"]:
        for r in f["seeds"]:
            off = (
                f"{r['clip_last'] + 1} ({r['clip_off_fraction']:.0%})"
                if r["clip_last"] >= 0
                else "never clipped"
            )
            w(
                f"| {f['lr']:g} | {r['seed']} | {r['clip_ever']:.1%} | "
                + " | ".join(f"{x:.0%}" for x in r["clip_by_layer"])
                + f" | {off} |"
            )
    w("\nK2: 12.7% of heads triggered QK-Clip in the first 70k steps; none after 70k (of ~220k).")
    w(f"\n![App. D]({figs['appd']})\n")

    # 4 --------------------------------------------------------------------
    comps = summ["fig12"]
    w(f"## 4. Fig. 12: Muon vs MuonClip tau = {comps[0]['tau']:g}\n")
    for f in comps:
        w(f"### lr {f['lr']:g}\n")
        w(f"lr {f['lr']:g}: {f['lr_why']}.\n")
        w(
            "| seed | val loss Muon | val loss MuonClip | MuonClip - Muon | max S Muon | heads ever clipped | "
            "last clip | spikes Muon / MuonClip |"
        )
        w("|---|---|---|---|---|---|---|---|")
        for r in f["seeds"]:
            w(
                f"| {r['seed']} | {r['val_muon']:.4f} | {r['val_clip']:.4f} | {r['diff']:+.4f} | "
                f"{_f(r['peak_s_muon'], 1)} | {r['clip_ever']:.0%} | {r['clip_last']} | "
                f"{r['spikes_muon']} / {r['spikes_clip']} |"
            )
        w(
            f"\nMuon {f['muon_mean']:.4f} ± {_f(f['muon_std'], 4)}, MuonClip {f['clip_mean']:.4f} ± "
            f"{_f(f['clip_std'], 4)} (mean ± std over {len(f['seeds'])} seeds). **lr {f['lr']:g}: MuonClip - Muon = "
            f"{f['diff_mean']:+.4f} ± {_f(f['diff_std'], 4)}** (paired by seed; "
            f"{f['diff_mean'] / f['muon_mean']:+.2%} of the loss). "
            + (
                "Within Muon's seed-to-seed std: negligible."
                if f["negligible"]
                else "Larger than Muon's seed-to-seed std: not negligible."
            )
            + "\n"
        )
    w("K2: tau = 30 'has negligible impact on loss'.")
    w(f"\n![Fig. 12]({figs['fig12']})\n")

    # 5 --------------------------------------------------------------------
    w(
        f"## 5. App. E: max logit vs lr, Muon vs AdamW, with and without QK-Clip ({s['sweep_steps']} steps, "
        f"S at step {sw['fixed_step']})\n"
    )
    w(
        "| lr | Muon S | AdamW S | Muon / AdamW | MuonClip S | AdamW+clip S | Muon loss | AdamW loss | "
        "MuonClip loss | AdamW+clip loss |"
    )
    w("|---|---|---|---|---|---|---|---|---|---|")
    for lr in sw["lrs"]:
        a, b, c, d = (sw["runs"][k][f"{lr:g}"] for k in ("muon", "adamw", "muonclip", "adamw_clip"))

        def cell(r, key="s_fixed", nd=1):
            return _f(r[key], nd) + (" (diverged)" if r["diverged"] else "")

        ratio = (
            a["s_fixed"] / b["s_fixed"]
            if b["s_fixed"] and math.isfinite(b["s_fixed"])
            else math.nan
        )
        w(
            f"| {lr:g} | {cell(a)} | {cell(b)} | {_f(ratio, 2)} | {cell(c)} | {cell(d)} | "
            f"{_f(a['final_train_loss'], 3)} | {_f(b['final_train_loss'], 3)} | {_f(c['final_train_loss'], 3)} | "
            f"{_f(d['final_train_loss'], 3)} |"
        )
    n_ok, n_fast = len(sw["lrs_both_ok"]), len(sw["lrs_muon_above_adamw"])
    w(
        f"\nMuon's S above AdamW's at **{n_fast} of {n_ok}** lrs where neither diverged "
        f"({', '.join(f'{x:g}' for x in sw['lrs_muon_above_adamw']) or 'none'}). MuonClip is Muon with "
        f'QK-Clip and AdamW+clip is AdamW with the same QK-Clip (qkclip_eqx `optimizer="adamw", '
        f'mode="clip"`), both at tau = {sw["tau"]:g}, from the same seed and batches as the unclipped runs.\n'
    )
    w(
        "The clip in the sweep runs (first clip; steps with a head clipped; fraction of heads ever clipped; "
        "largest S / tau after the first clip):\n"
    )
    w("| lr | MuonClip | AdamW+clip |")
    w("|---|---|---|")

    def clip_cell(c):
        if c["first_clip_step"] < 0:
            return "never clipped"
        return (
            f"step {c['first_clip_step']}; {c['steps_clipping']} steps; {c['ever_clipped']:.0%} of heads; "
            f"overshoot {_f(c['overshoot'], 3)}"
        )

    for lr in sw["lrs"]:
        w(
            f"| {lr:g} | {clip_cell(sw['runs']['muonclip'][f'{lr:g}']['clip'])} | "
            f"{clip_cell(sw['runs']['adamw_clip'][f'{lr:g}']['clip'])} |"
        )
    w(f"\n![App. E]({figs['appe']})\n")

    # 6 --------------------------------------------------------------------
    o = summ["overshoot"]
    w("## 6. Overshoot after the first clip (MuonClip runs)\n")
    w(
        "The clip scales the updated weights by tau / S of this step's forward, so the next step's S can "
        "exceed tau by one update.\n"
    )
    w("| run | tau | first clip | max S / tau after it | at step |")
    w("|---|---|---|---|---|")
    for r in o["runs"]:
        w(
            f"| {r['run']} | {r['tau']:g} | {r['first_clip_step']} | {_f(r['overshoot'], 3)} | {r['overshoot_step']} |"
        )
    w(
        f"\n**Largest S / tau after the first clip, over all MuonClip runs: {_f(o['max'], 3)}**. "
        "(The AdamW + QK-Clip sweep runs' overshoot is in section 5.)"
    )
    w(f"\n![Overshoot]({figs['overshoot']})\n")
    return "\n".join(L) + "\n"


def write(summ: dict[str, Any], metrics: dict[str, Any], out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    figs = {
        "fig2_left": fig2_left(summ, metrics, out),
        "fig2_right": fig2_right(summ, metrics, out),
        "appd": appd(summ, metrics, out),
        "fig12": fig12(summ, metrics, out),
        "appe": appe(summ, metrics, out),
        "overshoot": overshoot(summ, metrics, out),
    }
    (out / "summary.json").write_text(json.dumps(summ, indent=1, default=str, allow_nan=True))
    (out / "results.md").write_text(results_md(summ, figs))
