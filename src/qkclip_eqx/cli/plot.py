"""`qkclip-plot`: plot the metrics of one or more training runs.

Usage::

    qkclip-plot RUN_DIR [RUN_DIR ...] [--out DIR] [--labels A B ...]

Each `RUN_DIR` holds `metrics.jsonl` (one JSON object per line, written by
`qkclip-train`) and, optionally, `config.json`.  The script writes:

* `loss.png`: training loss (faint: every step; solid: a centred moving mean)
  and validation loss (markers, drawn on top) against step, every run on one
  axis; for exactly two runs, a second panel with their difference.
* `max_logit.png`: S against step on one log y axis shared by every panel:
  for several runs, first their global S (max over layers and heads) in one
  panel with each run's tau, then one panel per run with S per layer (max
  over heads) and the run's tau (dashed red where QK-Clip applies it, dotted
  grey for monitor and off).
* `heatmap_<label>.png` per run that recorded `max_logits`: S for every
  (layer, head) row against step, rows labelled `L<layer> h<head>`, on one
  colour scale shared by every run plotted.
* `clipped_fraction.png`: fraction of heads clipped per step, runs overlaid.

The figures are built with the object-oriented API (`matplotlib.figure.Figure`
rendered by the Agg canvas), so this module never imports `pyplot` and never
changes matplotlib's global backend or state.

The parsing ([`qkclip_eqx.read_metrics`][]) and derived quantities
(`clipped_fraction`) are pure functions, usable from notebooks. The module runs
past 500 lines because each figure above is a short function of its own here;
splitting them across files would leave the CLI's one job in pieces.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from jaxtyping import Float
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator

from .._metrics import RunMetrics, clipped_fraction, layer_max_logits, read_metrics

__all__ = [
    "LOG_FLOOR",
    "RunMetrics",
    "clipped_fraction",
    "heatmap_figure",
    "layer_max_logits",
    "loss_figure",
    "main",
    "max_logit_figure",
    "read_metrics",
    "shared_norm",
    "smooth",
]

#: Values at or below this are drawn at this value on log-scale axes (the
#: panel's title counts them when there are any).
LOG_FLOOR = 1e-3
_DPI = 100


# --------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------


def _new_figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path, dpi: int = _DPI) -> Path:
    """Write `fig` in the format of `path`'s suffix (png, pdf or svg)."""
    fig.savefig(path, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    return path


#: The x axes a figure may use: steps (0-based), or tokens trained on.
X_AXES = ("step", "tokens")


def _xs(m: RunMetrics, steps: np.ndarray, x: str) -> np.ndarray:
    """`steps` of run `m` on the x axis `x`: the steps, or the tokens trained
    on once each step is done (`(step + 1) * batch_size * seq_len`)."""
    if x == "step":
        return steps
    if m.tokens_per_step is None:
        raise ValueError(
            f"--x tokens: {m.run_dir} has no batch_size and seq_len in its config.json"
        )
    return (np.asarray(steps, np.float64) + 1) * m.tokens_per_step


def _xlabel(x: str) -> str:
    return "tokens" if x == "tokens" else "step"


def _colour(i: int) -> str:
    return f"C{i % 10}"


def _line_kw(n: int) -> dict[str, Any]:
    # a single point is invisible as a line: add a marker then
    return {"marker": "o", "markersize": 3} if n == 1 else {}


def default_window(n: int) -> int:
    """The smoothing window for `n` logged steps: odd, about `n / 30`."""
    return 2 * (n // 60) + 1


def smooth(values: Float[np.ndarray, " t"], window: int) -> Float[np.ndarray, " t"]:
    """Centred moving mean over `window` consecutive points; NaN points are
    left out of each mean, and the first and last points average over the part
    of the window that exists (so the curve neither lags nor shrinks).

    **Arguments:**

    - `values`: the series, e.g. [`qkclip_eqx.RunMetrics`][]`.loss`.
    - `window`: points per mean; 1 returns a copy.

    **Returns:**

    The smoothed series, NaN where a window holds no finite point.
    """
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or v.size == 0:
        return v.copy()
    ok = np.isfinite(v)
    total = np.concatenate([[0.0], np.cumsum(np.where(ok, v, 0.0))])
    count = np.concatenate([[0], np.cumsum(ok)])
    i = np.arange(v.size)
    lo = np.clip(i - window // 2, 0, v.size)
    hi = np.clip(i - window // 2 + window, 0, v.size)
    n = count[hi] - count[lo]
    return np.where(n > 0, (total[hi] - total[lo]) / np.maximum(n, 1), np.nan)


def _loss_ylim(runs: Sequence[RunMetrics], smoothed: list[np.ndarray]) -> tuple[float, float]:
    """Limits that show the smoothed curves and every validation point once
    the first tenth of each run (the initial drop) is past."""
    parts = []
    for m, sm in zip(runs, smoothed):
        parts.append(sm[len(sm) // 10 :])
        parts.append(m.val_loss)
    vals = np.concatenate([np.asarray(p, np.float64) for p in parts]) if parts else np.zeros(0)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = float(vals.min()), float(vals.max())
    span = hi - lo if hi > lo else 0.1 * max(abs(hi), 1.0)
    return lo - 0.08 * span, hi + 0.4 * span  # room at the top for the legend


def loss_figure(runs: Sequence[RunMetrics], window: int | None = None, x: str = "step") -> Figure:
    """Training loss (raw, faint; smoothed, solid) and validation loss (markers
    drawn on top) of every run on one axis; for exactly two runs, a second
    panel with their difference (second minus first) at the steps both logged."""
    two = len(runs) == 2
    fig = _new_figure(7.5, 6.8 if two else 4.6)
    if two:
        ax, dax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2.2, 1.0]})
    else:
        ax, dax = fig.add_subplot(), None
    smoothed = []
    cut = False
    for i, m in enumerate(runs):
        c, w = _colour(i), window or default_window(len(m.steps))
        sm = smooth(m.loss, w)
        smoothed.append(sm)
        xs = _xs(m, m.steps, x)
        ax.plot(xs, m.loss, "-", color=c, lw=0.6, alpha=0.3, zorder=1)
        what = f"train, mean of {w} steps" if w > 1 else "train"
        ax.plot(
            xs, sm, "-", color=c, lw=1.6, zorder=2, label=f"{m.label} ({what})",
            **_line_kw(len(m.steps)),
        )  # fmt: skip
        if len(m.val_steps):
            ax.plot(
                _xs(m, m.val_steps, x), m.val_loss, ":", color=c, lw=1.0, marker="o", markersize=6,
                markeredgecolor="white", markeredgewidth=1.2, zorder=4,
                label=f"{m.label} (validation)",
            )  # fmt: skip
    if runs:
        lo, hi = _loss_ylim(runs, smoothed)
        finite = [m.loss[np.isfinite(m.loss)] for m in runs]
        cut = any(f.size and f.max() > hi for f in finite)
        ax.set_ylim(lo, hi)
        ax.legend(fontsize=8, ncol=2, loc="upper right")
    ax.set_ylabel("loss")
    ax.set_title("Loss", fontsize=10)
    if cut:  # said where it happens, not in the title
        ax.annotate("first steps above the axis", (0.01, 0.98), xycoords="axes fraction",
                    ha="left", va="top", fontsize=7, color="0.35")  # fmt: skip
    ax.grid(True, alpha=0.3)
    if dax is not None:
        _loss_difference(dax, runs[0], runs[1], window, x)
    (dax if dax is not None else ax).set_xlabel(_xlabel(x))
    fig.tight_layout()
    return fig


def _loss_difference(
    ax: Any, a: RunMetrics, b: RunMetrics, window: int | None, x: str = "step"
) -> None:
    steps, ia, ib = np.intersect1d(a.steps, b.steps, return_indices=True)
    diff = b.loss[ib] - a.loss[ia]
    w = window or default_window(len(steps))
    ax.axhline(0.0, color="0.3", lw=0.8)
    xs = _xs(a, steps, x)
    ax.plot(xs, diff, "-", color="0.5", lw=0.6, alpha=0.4)
    ax.plot(xs, smooth(diff, w), "-", color="k", lw=1.5,
            label=f"train, mean of {w} steps" if w > 1 else "train")  # fmt: skip
    vsteps, va, vb = np.intersect1d(a.val_steps, b.val_steps, return_indices=True)
    if len(vsteps):
        vdiff = b.val_loss[vb] - a.val_loss[va]
        ax.plot(_xs(a, vsteps, x), vdiff, ":", color="C3", marker="o", markersize=5,
                markeredgecolor="white", zorder=4,
                label=f"validation (last: {vdiff[-1]:+.4f})")  # fmt: skip
    ax.set_ylabel(f"{b.label}\nminus {a.label}", fontsize=8)
    ax.set_title(f"Difference (below 0: {b.label} is lower)", fontsize=9)
    ax.grid(True, alpha=0.3)
    if len(steps):
        sm = smooth(diff, w)
        vals = np.concatenate([sm[len(sm) // 10 :], b.val_loss[vb] - a.val_loss[va]])
        vals = vals[np.isfinite(vals)]
        if vals.size:
            r = max(float(np.abs(vals).max()) * 1.3, 1e-6)
            ax.set_ylim(-r, r)
        ax.legend(fontsize=7)


def plot_loss(runs: Sequence[RunMetrics], path: Path, window: int | None = None) -> Path:
    return _save(loss_figure(runs, window), path)


def _global_max(m: RunMetrics) -> np.ndarray:
    lm = layer_max_logits(m)
    if lm.shape[1] == 0:
        return np.full(len(m.steps), np.nan)
    ok = np.any(~np.isnan(lm), axis=1)
    return np.where(ok, np.where(np.isnan(lm), -np.inf, lm).max(axis=1), np.nan)


def _tau_label(m: RunMetrics) -> str:
    if m.mode == "clip":
        return f"tau = {m.tau:g} (clip)"
    return f"tau = {m.tau:g} ({m.mode or 'mode unknown'}: not applied)"


def _log_axis(ax: Any) -> None:
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    ax.yaxis.set_minor_formatter(plain)
    ax.grid(True, which="both", alpha=0.25)


def _floored(values: np.ndarray) -> tuple[np.ndarray, int]:
    """`values` with the finite ones at or below `LOG_FLOOR` raised to it
    (NaN stays NaN: a gap), and how many were raised."""
    low = np.isfinite(values) & (values <= LOG_FLOOR)
    return np.where(low, LOG_FLOOR, values), int(low.sum())


def max_logit_figure(runs: Sequence[RunMetrics], x: str = "step") -> Figure:
    """S against step on one shared log y axis: for several runs, a first panel
    with each run's S (max over layers and heads) and tau; then one panel per
    run with S per layer (max over heads) and the run's tau, dashed red where
    QK-Clip applies it and dotted grey where it does not (monitor, off)."""
    overview = len(runs) > 1
    n = max(len(runs) + overview, 1)
    fig = _new_figure(7.5, 1.6 + 2.4 * n)
    all_axes = list(fig.subplots(n, 1, sharex=True, sharey=True, squeeze=False)[:, 0])
    axes = all_axes[1:] if overview else all_axes
    any_log = False
    if overview:
        ax = all_axes[0]
        floored_total = 0
        for i, m in enumerate(runs):
            y, k = _floored(_global_max(m))
            floored_total += k
            ax.plot(_xs(m, m.steps, x), y, "-", color=_colour(i), lw=1.1, label=m.label,
                    **_line_kw(len(m.steps)))  # fmt: skip
        by_tau: dict[float, list[int]] = {}
        for i, m in enumerate(runs):
            if m.tau is not None:
                by_tau.setdefault(m.tau, []).append(i)
        for tau, idx in by_tau.items():
            one = len(idx) == 1
            clips = {runs[i].mode == "clip" for i in idx}
            who = "clip" if clips == {True} else "not applied" if clips == {False} else "clip: some"
            ax.axhline(max(tau, LOG_FLOOR), color=_colour(idx[0]) if one else "k", ls="--",
                       lw=1.1, label=f"tau = {tau:g} ({who})")  # fmt: skip
        title = "S, all runs"
        if floored_total:
            title += f" ({floored_total} values <= {LOG_FLOOR:g} drawn at {LOG_FLOOR:g})"
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("S (log)", fontsize=8)
        _log_axis(ax)
        any_log = True
        ax.legend(fontsize=7, ncol=2, loc="best")
    for ax, m in zip(axes, runs):
        lm = layer_max_logits(m)
        n_layers = lm.shape[1]
        title = f"{m.label} ({m.mode or 'mode unknown'})"
        n_bad = int(np.isnan(m.max_logits).sum())
        if n_bad:
            title += f"; {n_bad} gaps (non-finite)"
        if n_layers == 0:
            ax.text(0.5, 0.5, "no max_logits recorded", ha="center", va="center",
                    transform=ax.transAxes, color="0.4")  # fmt: skip
            ax.set_title(title, fontsize=9)
            continue
        cmap = matplotlib.colormaps["viridis"]
        floored_total = 0
        for layer in range(n_layers):
            colour = cmap(layer / max(n_layers - 1, 1) * 0.9)
            y, k = _floored(lm[:, layer])
            floored_total += k
            ax.plot(_xs(m, m.steps, x), y, "-", color=colour, lw=1.0, label=f"layer {layer}",
                    **_line_kw(len(m.steps)))  # fmt: skip
        if m.tau is not None:
            clip = m.mode == "clip"
            ax.axhline(max(m.tau, LOG_FLOOR), color="red" if clip else "0.35",
                       ls="--" if clip else ":", lw=1.3, label=_tau_label(m))  # fmt: skip
        if floored_total:
            title += f" ({floored_total} values <= {LOG_FLOOR:g} drawn at {LOG_FLOOR:g})"
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("S (log)", fontsize=8)
        _log_axis(ax)
        any_log = True
        ax.legend(fontsize=7, ncol=min(n_layers + 1, 5), loc="best")
    if not runs:
        all_axes[0].text(
            0.5, 0.5, "no runs", ha="center", va="center", transform=all_axes[0].transAxes
        )
    all_axes[-1].set_xlabel(_xlabel(x))
    if not any_log:
        all_axes[0].set_yticks([])
    fig.tight_layout()
    return fig


def plot_max_logit(runs: Sequence[RunMetrics], path: Path) -> Path:
    return _save(max_logit_figure(runs), path)


def _edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges around (sorted) step centres for pcolormesh."""
    s = steps.astype(np.float64)
    if len(s) == 1:
        return np.array([s[0] - 0.5, s[0] + 0.5])
    mid = (s[1:] + s[:-1]) / 2
    return np.concatenate([[s[0] - (mid[0] - s[0])], mid, [s[-1] + (s[-1] - mid[-1])]])


def _pool_columns(
    steps: np.ndarray, img: np.ndarray, max_cols: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Max-pool `img [rows, t]` over groups of consecutive steps.

    Keeps at most `max_cols` columns (spikes survive: max, not mean).
    Returns `(x_edges, pooled, group_size)`.
    """
    t = img.shape[1]
    increasing = t > 0 and bool(np.all(np.diff(steps) > 0))
    if t <= max_cols:
        x = _edges(steps) if increasing else np.arange(t + 1) - 0.5
        return x, img, 1
    k = -(-t // max_cols)
    starts = np.arange(0, t, k)
    pad = starts[-1] + k - t
    padded = np.concatenate([img, np.full((img.shape[0], pad), np.nan)], axis=1)
    blocks = padded.reshape(img.shape[0], len(starts), k)
    any_finite = np.any(~np.isnan(blocks), axis=2)
    pooled = np.where(any_finite, np.where(np.isnan(blocks), -np.inf, blocks).max(2), np.nan)
    if increasing:
        x = np.concatenate([steps[starts].astype(np.float64), [steps[-1] + 1.0]])
    else:
        x = np.concatenate([starts, [t]]).astype(np.float64) - 0.5
    return x, pooled, int(k)


def shared_norm(runs: Sequence[RunMetrics]) -> Normalize:
    """One colour scale for the S heatmaps of `runs`: logarithmic from the
    smallest to the largest finite S of any of them when all are positive,
    else linear."""
    vals = [m.max_logits[np.isfinite(m.max_logits)] for m in runs if m.has_max_logits]
    finite = np.concatenate(vals) if vals else np.zeros(0)
    if finite.size and finite.min() > 0 and finite.max() > finite.min():
        return LogNorm(vmin=float(finite.min()), vmax=float(finite.max()))
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 1.0
    return Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1.0)


#: Up to this many rows, each heatmap row is labelled `L<layer> h<head>`.
_ROW_LABELS_UP_TO = 48


def heatmap_figure(
    m: RunMetrics,
    max_cols: int = 400,
    norm: Normalize | None = None,
    shared_with: Sequence[str] = (),
) -> Figure:
    """S of every (layer, head) against step, one row each, layer 0 head 0 at
    the top; rows are labelled `L<layer> h<head>` (for many rows, by layer).
    `norm` (default: this run's range) is the colour scale, e.g.
    `shared_norm` of every run plotted, named
    in `shared_with`."""
    t, n_layers, n_heads = m.max_logits.shape
    rows = n_layers * n_heads
    fig = _new_figure(8.5, min(2.2 + 0.2 * rows, 12.0))
    ax = fig.add_subplot()
    full = m.max_logits.reshape(t, rows).T  # [layer*head, t], row = layer*H + head
    x, img, group = _pool_columns(m.steps, full, max_cols)
    norm = shared_norm([m]) if norm is None else norm
    cmap = tau_colormap(norm, m.tau)
    y = np.arange(rows + 1) - 0.5
    mesh = ax.pcolormesh(x, y, np.ma.masked_invalid(img), cmap=cmap, norm=norm, shading="flat")
    for layer in range(1, n_layers):
        ax.axhline(layer * n_heads - 0.5, color="white", lw=1.0)
    if rows <= _ROW_LABELS_UP_TO:
        ax.set_yticks(np.arange(rows))
        ax.set_yticklabels([f"L{r // n_heads} h{r % n_heads}" for r in range(rows)], fontsize=7)
        ax.set_ylabel("layer, head")
    else:
        ax.set_yticks([layer * n_heads + (n_heads - 1) / 2 for layer in range(n_layers)])
        ax.set_yticklabels([f"L{layer}" for layer in range(n_layers)])
        ax.set_ylabel(f"layer (each band: heads 0..{n_heads - 1}, top to bottom)")
    ax.set_ylim(rows - 0.5, -0.5)  # layer 0 at the top
    ax.set_xlabel("step" if t and np.all(np.diff(m.steps) > 0) else "line index")
    cb = fig.colorbar(mesh, ax=ax, pad=0.07)
    _colour_bar(cb, norm, [m.tau])
    title = f"{m.label}: S per layer and head"
    notes = []
    if shared_with:
        notes.append("colour scale shared with " + ", ".join(shared_with))
    if group > 1:
        notes.append(f"each column: max over {group} logged steps")
    if np.isnan(img).any():
        notes.append("grey: non-finite")
    if notes:
        title += "\n" + "; ".join(notes)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_heatmap(
    m: RunMetrics,
    path: Path,
    max_cols: int = 400,
    norm: Normalize | None = None,
    shared_with: Sequence[str] = (),
) -> Path:
    return _save(heatmap_figure(m, max_cols=max_cols, norm=norm, shared_with=shared_with), path)


def plot_clipped_fraction(runs: Sequence[RunMetrics], path: Path) -> Path:
    return _save(clipped_fraction_figure(runs), path)


def clipped_fraction_figure(runs: Sequence[RunMetrics], x: str = "step") -> Figure:
    """The share of heads clipped per step, runs overlaid."""
    fig = _new_figure(7.0, 4.0)
    ax = fig.add_subplot()
    for i, m in enumerate(runs):
        frac = clipped_fraction(m)
        lab = m.label if m.n_heads_total else f"{m.label} (head count unknown)"
        ax.plot(_xs(m, m.steps, x), frac, "-", color=_colour(i), lw=1.2, label=lab,
                **_line_kw(len(m.steps)))  # fmt: skip
    ax.set_xlabel(_xlabel(x))
    ax.set_ylabel("heads clipped (share)")
    ax.set_title("Heads clipped", fontsize=10)
    ax.set_ylim(bottom=-0.02)
    ax.grid(True, alpha=0.3)
    if runs:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _tau_inside(norm: Normalize, tau: float | None) -> bool:
    return (
        tau is not None
        and norm.vmin is not None
        and norm.vmax is not None
        and norm.vmin < tau < norm.vmax
    )


def tau_colormap(norm: Normalize, tau: float | None) -> Any:
    """The heatmaps' colours on `norm`, split at tau: blues to green below it,
    reds above, so that every cell over the threshold stands out (magma when
    tau is outside the scale or unknown); grey for non-finite S."""
    if tau is None or not _tau_inside(norm, tau):
        return matplotlib.colormaps["magma"].with_extremes(bad="0.75")
    from matplotlib.colors import ListedColormap

    n = 256
    k = int(np.clip(round(float(norm(tau)) * n), 1, n - 1))
    below = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.8, k))
    above = matplotlib.colormaps["Reds"](np.linspace(0.45, 1.0, n - k))
    return ListedColormap(np.concatenate([below, above])).with_extremes(bad="0.75")


def _colour_bar(cb: Any, norm: Normalize, taus: Sequence[float | None]) -> None:
    """The S colour bar: plain tick labels on a log scale, and a black line
    labelled with its value at each tau inside the scale."""
    scale = "log" if isinstance(norm, LogNorm) else "linear"
    cb.set_label(f"S ({scale} scale)")
    if scale == "log":
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        cb.ax.yaxis.set_major_formatter(plain)
        cb.ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        cb.ax.yaxis.set_minor_formatter(plain)
    for tau in sorted({t for t in taus if t is not None and _tau_inside(norm, t)}):
        cb.ax.axhline(tau, color="black", lw=2.0)
        cb.ax.text(-0.15, tau, f"tau {tau:g}", transform=cb.ax.get_yaxis_transform(),
                   ha="right", va="center", fontsize=7, fontweight="bold")  # fmt: skip


def heatmaps_figure(runs: Sequence[RunMetrics], max_cols: int = 400, x: str = "step") -> Figure:
    """The S heatmaps of several runs in one figure, one panel each (layer 0
    head 0 at the top), on one colour scale (`shared_norm`) with one colour
    bar; with one tau for all, the colours split there (`tau_colormap`)."""
    with_s = [m for m in runs if m.has_max_logits]
    rows = [m.n_layers * m.n_heads for m in with_s]
    fig = _new_figure(8.5, min(1.0 + sum(0.9 + 0.12 * r for r in rows), 14.0))
    if not with_s:
        fig.text(0.5, 0.5, "no max_logits recorded", ha="center")
        return fig
    axes = list(fig.subplots(len(with_s), 1, squeeze=False, sharex=True,
                             gridspec_kw={"height_ratios": rows})[:, 0])  # fmt: skip
    norm = shared_norm(with_s)
    taus = {m.tau for m in with_s}
    one_tau = next(iter(taus)) if len(taus) == 1 else None
    cmap = tau_colormap(norm, one_tau)
    mesh = None
    for ax, m in zip(axes, with_s):
        t = m.max_logits.shape[0]
        full = m.max_logits.reshape(t, -1).T
        xe, img, _ = _pool_columns(m.steps, full, max_cols)
        if x == "tokens":
            xe = _xs(m, xe, x)
        mesh = ax.pcolormesh(xe, np.arange(full.shape[0] + 1) - 0.5, np.ma.masked_invalid(img),
                             cmap=cmap, norm=norm, shading="flat")  # fmt: skip
        for layer in range(1, m.n_layers):
            ax.axhline(layer * m.n_heads - 0.5, color="white", lw=0.8)
        ax.set_yticks([layer * m.n_heads + (m.n_heads - 1) / 2 for layer in range(m.n_layers)])
        ax.set_yticklabels([f"L{layer}" for layer in range(m.n_layers)], fontsize=7)
        ax.set_ylim(full.shape[0] - 0.5, -0.5)
        ax.set_title(f"{m.label} ({m.mode or 'mode unknown'}, tau {m.tau:g})"
                     if m.tau is not None else m.label, fontsize=9)  # fmt: skip
    axes[-1].set_xlabel(_xlabel(x))
    assert mesh is not None  # with_s is not empty
    cb = fig.colorbar(mesh, ax=axes, pad=0.07, fraction=0.04)
    _colour_bar(cb, norm, [m.tau for m in with_s])
    return fig


def _over_tau_fraction(m: RunMetrics) -> np.ndarray:
    """Heads with S above tau over all heads, per step: the logged
    `heads_over_tau`, else counted from `max_logits`."""
    if not m.n_heads_total:
        return np.full(len(m.steps), np.nan)
    counted = (
        np.sum(m.max_logits > m.tau, axis=(1, 2)).astype(np.float64)
        if m.tau is not None
        else np.full(len(m.steps), np.nan)
    )
    return (
        np.where(np.isnan(m.scalar("heads_over_tau")), counted, m.scalar("heads_over_tau"))
        / m.n_heads_total
    )


def heads_over_tau_figure(runs: Sequence[RunMetrics], window: int = 1, x: str = "step") -> Figure:
    """The share of heads whose S is above tau, per step, for every run: what
    a monitor (Muon) run is compared with a clip run by (the clip run's share
    is that of the heads it clipped). `window` > 1 smooths each curve."""
    fig = _new_figure(7.0, 4.0)
    ax = fig.add_subplot()
    for i, m in enumerate(runs):
        frac = smooth(_over_tau_fraction(m), window)
        tau = f", tau {m.tau:g}" if m.tau is not None else ""
        ax.plot(_xs(m, m.steps, x), frac, "-", color=_colour(i), lw=1.2,
                label=f"{m.label} ({m.mode or '?'}{tau})", **_line_kw(len(m.steps)))  # fmt: skip
    ax.set_xlabel(_xlabel(x))
    ax.set_ylabel("heads with S > tau (share)")
    ax.set_title("Heads over tau", fontsize=10)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    if runs:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def optim_figure(runs: Sequence[RunMetrics], window: int = 1, x: str = "step") -> Figure:
    """Learning rate (top) and gradient norm (bottom, log scale; `window` > 1
    smooths it) per step, every run overlaid."""
    fig = _new_figure(7.0, 5.2)
    lr_ax, gn_ax = fig.subplots(2, 1, sharex=True)
    for i, m in enumerate(runs):
        xs = _xs(m, m.steps, x)
        lr_ax.plot(xs, m.scalar("lr"), "-", color=_colour(i), lw=1.2, label=m.label)
        gn_ax.plot(xs, smooth(m.scalar("grad_norm"), window), "-", color=_colour(i), lw=1.0)
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_title("Learning rate and gradient norm", fontsize=10)
    gn_ax.set_ylabel("gradient norm")
    if any(np.nanmin(m.scalar("grad_norm"), initial=np.inf) > 0 for m in runs):
        _log_axis(gn_ax)
    gn_ax.set_xlabel(_xlabel(x))
    for ax in (lr_ax, gn_ax):
        ax.grid(True, alpha=0.3)
    if runs:
        lr_ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------
# Seeds: runs that differ only by seed, as a mean with a band
# --------------------------------------------------------------------------

#: config.json keys that do not make two runs different experiments.
_NOT_THE_EXPERIMENT = frozenset({"seed", "out", "label", "data_description"})


def _experiment(m: RunMetrics) -> str | None:
    path = Path(m.run_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    return json.dumps({k: v for k, v in cfg.items() if k not in _NOT_THE_EXPERIMENT},
                      sort_keys=True)  # fmt: skip


def group_by_seed(runs: Sequence[RunMetrics]) -> list[list[RunMetrics]]:
    """`runs` in groups whose `config.json` differ only by seed (and out,
    label), in the order each group first appears; a run without a readable
    config is a group of its own."""
    groups: dict[Any, list[RunMetrics]] = {}
    for i, m in enumerate(runs):
        groups.setdefault(_experiment(m) or i, []).append(m)
    return list(groups.values())


def group_label(group: Sequence[RunMetrics]) -> str:
    """The first run's label without its seed (`seed=1`, `seed 1`, `_s1`), and
    the number of seeds."""
    base = re.sub(r"[\s,_/-]*seed[=_ ]?\d+", "", group[0].label).strip(" ,_-") or group[0].label
    return base if len(group) == 1 else f"{base} ({len(group)} seeds)"


def across_seeds(
    group: Sequence[RunMetrics], series: Any, val: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`(steps, mean, low, high)` of `series(run)` over the runs of `group` at
    the steps every run logged (validation steps with `val`): the mean and the
    band from the lowest to the highest run."""
    steps_of = (lambda m: m.val_steps) if val else (lambda m: m.steps)
    common = steps_of(group[0])
    for m in group[1:]:
        common = np.intersect1d(common, steps_of(m))
    rows = []
    for m in group:
        idx = np.searchsorted(steps_of(m), common)
        rows.append(np.asarray(series(m), np.float64)[idx])
    stack = np.array(rows).reshape(len(group), len(common))
    with np.errstate(all="ignore"):
        return common, np.nanmean(stack, 0), np.nanmin(stack, 0), np.nanmax(stack, 0)


def seeds_figure(
    groups: Sequence[Sequence[RunMetrics]], window: int | None = None, x: str = "step"
) -> Figure:
    """Each group of seeds as its mean (line) and the band from its lowest to
    its highest run (shaded): train loss (each run smoothed first) with the
    validation mean as markers, S (max over layers and heads; log scale) with
    each group's tau, and the share of heads over tau."""
    fig = _new_figure(7.5, 8.4)
    loss_ax, s_ax, tau_ax = fig.subplots(3, 1, sharex=True)
    for i, group in enumerate(groups):
        c, lab, first = _colour(i), group_label(group), group[0]
        w = window or default_window(len(first.steps))
        panels = (
            (loss_ax, lambda m, w=w: smooth(m.loss, w)),
            (s_ax, _global_max),
            (tau_ax, _over_tau_fraction),
        )
        for ax, series in panels:
            steps, mean, low, high = across_seeds(group, series)
            xs = _xs(first, steps, x)
            ax.fill_between(xs, low, high, color=c, alpha=0.25, lw=0)
            ax.plot(xs, mean, "-", color=c, lw=1.4, label=lab if ax is loss_ax else None)
        steps, mean, _, _ = across_seeds(group, lambda m: m.val_loss, val=True)
        if len(steps):
            loss_ax.plot(_xs(first, steps, x), mean, "o", color=c, markersize=5,
                         markeredgecolor="white", zorder=4)  # fmt: skip
        if first.tau is not None:
            s_ax.axhline(first.tau, color=c, ls="--" if first.mode == "clip" else ":", lw=1.0)
    loss_ax.set_title("Mean over seeds (band: lowest to highest seed)", fontsize=10)
    loss_ax.set_ylabel("loss")
    s_ax.set_ylabel("S (log)")
    _log_axis(s_ax)
    tau_ax.set_ylabel("heads over tau")
    tau_ax.set_ylim(-0.02, 1.02)
    tau_ax.set_xlabel(_xlabel(x))
    for ax in (loss_ax, tau_ax):
        ax.grid(True, alpha=0.3)
    if groups:
        loss_ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


#: One caption per figure: what the title leaves to the reader.
CAPTIONS = {
    "loss": "Training loss of every run (faint: each step; solid: a centred moving mean) "
    "and validation loss (markers, drawn on top). For two runs, the lower panel is their "
    "difference at the steps both logged.",
    "max_logit": "Max attention logit S on one shared log axis. First panel (several runs): "
    "each run's S, the max over every layer and head, with its tau. Then one panel per run: "
    "S per layer (max over heads); tau dashed red where QK-Clip applies it, dotted grey "
    "where it is only monitored. Values at or below 0.001 are drawn at 0.001.",
    "heatmap": "S of every layer and head (rows, layer 0 head 0 at the top) against the "
    "x axis, on one colour scale shared by every run plotted; colours turn from green to "
    "red at tau, marked on the colour bar; long runs are max-pooled over groups of steps; "
    "grey: non-finite.",
    "heatmaps": "The S heatmaps of every run in one figure, on one colour scale; with one "
    "tau for all, colours turn from green to red at tau (marked on the colour bar).",
    "clipped_fraction": "Share of the (layer, head) pairs QK-Clip rescaled at each step "
    "(clip runs; a monitor run never clips).",
    "heads_over_tau": "Share of the (layer, head) pairs whose S is above tau at each step, in "
    "every mode: for a monitor (Muon) run the heads that would be clipped, for a clip run "
    "the heads that were.",
    "optim": "Learning rate of each step (top) and the gradient norm (bottom, log scale).",
    "seeds": "Runs that differ only by seed: the mean over seeds (line) and the band from "
    "the lowest to the highest seed (shaded). Top: train loss (each run smoothed first; "
    "markers: mean validation loss). Middle: S, max over layers and heads, with each "
    "group's tau. Bottom: share of heads over tau.",
}


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def _safe_name(label: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._")
    return s or "run"


def _parser() -> argparse.ArgumentParser:
    from ._flags import Parser

    p = Parser(
        prog="qkclip-plot",
        description="Plot loss, max attention logits and clipping of training runs.",
    )
    p.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="run directory holding metrics.jsonl (and config.json), or a checkpoint "
        "directory in it",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="output directory (default: RUN_DIR for one run, else plots/ beside the runs: "
        "in their common parent directory)",
    )
    p.add_argument(
        "--labels",
        nargs="+",
        metavar="LABEL",
        default=None,
        help="one label per RUN_DIR (default: config 'label', else dir name)",
    )
    p.add_argument("--format", choices=("png", "pdf", "svg"), default="png",
                   help="file format of the figures (default: png)")  # fmt: skip
    p.add_argument("--dpi", type=int, default=_DPI,
                   help=f"resolution of PNGs (and of a PDF's or SVG's images; default {_DPI})")  # fmt: skip
    p.add_argument("--x", choices=X_AXES, default="step",
                   help="x axis: steps, or tokens trained on (batch-size x seq-len per step)")  # fmt: skip
    p.add_argument("--smooth", type=int, default=None, metavar="N",
                   help="moving mean over N steps of the loss, heads over tau and gradient norm "
                   "(1: none; default: about a 30th of the run for the loss, none for the rest)")  # fmt: skip
    p.add_argument("--aggregate", action="store_true",
                   help="also draw runs that differ only by seed as their mean with a band "
                   "(seeds.FORMAT)")  # fmt: skip
    return p


def _common_parent(dirs: Sequence[str]) -> Path:
    return Path(os.path.commonpath([str(Path(d).resolve().parent) for d in dirs]))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `qkclip-plot`; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.run_dirs):
        parser.error(f"--labels got {len(args.labels)} labels for {len(args.run_dirs)} RUN_DIRs")
    if args.dpi < 1:
        parser.error(f"argument --dpi: must be >= 1, got {args.dpi}")
    if args.smooth is not None and args.smooth < 1:
        parser.error(f"argument --smooth: must be >= 1, got {args.smooth}")

    runs: list[RunMetrics] = []
    for i, rd in enumerate(args.run_dirs):
        if re.fullmatch(r"ckpt_\d+", Path(rd).name) and not (Path(rd) / "metrics.jsonl").exists():
            rd = str(Path(rd).parent)  # a checkpoint directory: its run's metrics
        metrics_path = Path(rd) / "metrics.jsonl"
        if not metrics_path.is_file():
            print(
                f"qkclip-plot: error: {metrics_path} not found (is {rd!r} a run directory?)",
                file=sys.stderr,
            )
            return 2
        try:
            m = read_metrics(rd)
        except (OSError, ValueError) as e:
            print(f"qkclip-plot: error: {rd}: {e}", file=sys.stderr)
            return 2
        if args.labels is not None:
            m = dataclasses.replace(m, label=args.labels[i])
        runs.append(m)
    if args.x == "tokens":
        missing = [m.run_dir for m in runs if m.tokens_per_step is None]
        if missing:
            parser.error(
                f"argument --x tokens: no batch_size and seq_len in the config.json of {missing[0]}"
            )

    if args.out is not None:
        out = Path(args.out)
    elif len(args.run_dirs) == 1:
        out = Path(args.run_dirs[0])
    else:
        out = _common_parent(args.run_dirs) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = write_figures(runs, out, fmt=args.format, dpi=args.dpi, x=args.x,
                            window=args.smooth, aggregate=args.aggregate)  # fmt: skip
    for p in written:
        print(p)
    return 0


def write_figures(
    runs: Sequence[RunMetrics],
    out: Path,
    *,
    fmt: str = "png",
    dpi: int = _DPI,
    x: str = "step",
    window: int | None = None,
    aggregate: bool = False,
) -> list[Path]:
    """Every figure of `runs` into `out` as `fmt`, and `captions.md` (one
    caption per figure written). Returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[tuple[str, Path]] = []

    def save(kind: str, fig: Figure, name: str | None = None) -> None:
        written.append((kind, _save(fig, out / f"{name or kind}.{fmt}", dpi)))

    w = window or 1
    save("loss", loss_figure(runs, window, x))
    save("max_logit", max_logit_figure(runs, x))
    used: set[str] = set()
    with_s = [m for m in runs if m.has_max_logits]
    norm = shared_norm(with_s)  # one colour scale: the heatmaps compare
    for m in runs:
        if not m.has_max_logits:
            print(
                f"qkclip-plot: note: {m.label}: no max_logits recorded, no heatmap", file=sys.stderr
            )
            continue
        name = _safe_name(m.label)
        base, k = name, 2
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        others = [o.label for o in with_s if o is not m]
        save("heatmap", heatmap_figure(m, norm=norm, shared_with=others), f"heatmap_{name}")
    if len(with_s) > 1:
        save("heatmaps", heatmaps_figure(with_s, x=x))
    clipping = [m for m in runs if m.mode not in ("monitor", "off")]
    if clipping or not with_s:
        save("clipped_fraction", clipped_fraction_figure(clipping or runs, x))
    if with_s:
        save("heads_over_tau", heads_over_tau_figure(with_s, w, x))
    if any(
        np.isfinite(m.scalar("lr")).any() or np.isfinite(m.scalar("grad_norm")).any() for m in runs
    ):
        save("optim", optim_figure(runs, w, x))
    if aggregate:
        save("seeds", seeds_figure(group_by_seed(runs), window, x))
    captions = out / "captions.md"
    captions.write_text("".join(f"**{p.name}**: {CAPTIONS[kind]}\n\n" for kind, p in written))
    return [p for _, p in written] + [captions]


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
