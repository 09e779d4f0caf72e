"""`qkclip-plot`: plot the metrics of one or more training runs.

Usage::

    qkclip-plot RUN_DIR [RUN_DIR ...] [--out DIR] [--labels A B ...]

Each `RUN_DIR` holds `metrics.jsonl` (one JSON object per line, written by
`qkclip-train`) and, optionally, `config.json`.  The script writes:

* `loss.png`: training loss (solid) and validation loss (dashed, markers)
  against step, every run overlaid, one colour per run.
* `max_logit.png`: per run (one subplot each) the max attention logit of
  every layer (max over heads) against step, log-scale y, with the QK-Clip
  threshold `tau` as a dashed line when the run's mode is `"clip"`.
* `heatmap_<label>.png` per run that recorded `max_logits`: S for every
  (layer, head) row against step, log colour scale where possible.
* `clipped_fraction.png`: fraction of heads clipped per step, runs overlaid.

The figures are built with the object-oriented API (`matplotlib.figure.Figure`
rendered by the Agg canvas), so this module never imports `pyplot` and never
changes matplotlib's global backend or state.

The parsing ([`qkclip_eqx.read_metrics`][]) and derived quantities
(`clipped_fraction`) are pure functions, usable from notebooks.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from .._metrics import RunMetrics, clipped_fraction, layer_max_logits, read_metrics

__all__ = [
    "LOG_FLOOR",
    "RunMetrics",
    "clipped_fraction",
    "layer_max_logits",
    "main",
    "read_metrics",
]

#: Values at or below this are drawn at this value on log-scale axes.
LOG_FLOOR = 1e-3
_DPI = 100


# --------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------


def _new_figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=_DPI, format="png")
    return path


def _colour(i: int) -> str:
    return f"C{i % 10}"


def _line_kw(n: int) -> dict[str, Any]:
    # a single point is invisible as a line: add a marker then
    return {"marker": "o", "markersize": 3} if n == 1 else {}


def plot_loss(runs: Sequence[RunMetrics], path: Path) -> Path:
    fig = _new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    for i, m in enumerate(runs):
        c = _colour(i)
        ax.plot(
            m.steps,
            m.loss,
            "-",
            color=c,
            lw=1.2,
            label=f"{m.label} (train)",
            **_line_kw(len(m.steps)),
        )
        if len(m.val_steps):
            ax.plot(
                m.val_steps,
                m.val_loss,
                "--o",
                color=c,
                lw=1.0,
                markersize=4,
                label=f"{m.label} (val)",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Loss (solid: train, dashed + markers: validation)")
    ax.grid(True, alpha=0.3)
    if runs:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_max_logit(runs: Sequence[RunMetrics], path: Path) -> Path:
    n = max(len(runs), 1)
    fig = _new_figure(7.5, 2.0 + 2.4 * n)
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    for ax, m in zip(axes, runs):
        lm = layer_max_logits(m)
        n_layers = lm.shape[1]
        title = f"{m.label} (mode={m.mode or '?'}"
        if m.tau is not None:
            title += f", tau={m.tau:g}"
        n_bad = int(np.isnan(m.max_logits).sum())
        if n_bad:
            title += f", {n_bad} non-finite/missing entries left as gaps"
        ax.set_title(title + ")", fontsize=9)
        if n_layers == 0:
            ax.text(
                0.5,
                0.5,
                "no max_logits recorded",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="0.4",
            )
            ax.set_yticks([])
            continue
        cmap = matplotlib.colormaps["viridis"]
        for layer in range(n_layers):
            colour = cmap(layer / max(n_layers - 1, 1) * 0.9)
            y = np.maximum(lm[:, layer], LOG_FLOOR)  # NaN stays NaN -> gap
            ax.plot(
                m.steps,
                y,
                "-",
                color=colour,
                lw=1.0,
                label=f"layer {layer}",
                **_line_kw(len(m.steps)),
            )
        if m.mode == "clip" and m.tau is not None:
            ax.axhline(
                max(m.tau, LOG_FLOOR), color="red", ls="--", lw=1.2, label=f"tau = {m.tau:g}"
            )
        ax.set_yscale("log")
        ax.set_ylabel(f"max S (heads)\nlog, floor {LOG_FLOOR:g}", fontsize=8)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, ncol=min(n_layers + 1, 5), loc="best")
    if not runs:
        axes[0].text(0.5, 0.5, "no runs", ha="center", va="center", transform=axes[0].transAxes)
    axes[-1].set_xlabel("step")
    fig.suptitle(
        f"Max attention logit per layer (values < {LOG_FLOOR:g} drawn at {LOG_FLOOR:g})",
        fontsize=10,
    )
    fig.tight_layout()
    return _save(fig, path)


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


def plot_heatmap(m: RunMetrics, path: Path, max_cols: int = 400) -> Path:
    t, n_layers, n_heads = m.max_logits.shape
    rows = n_layers * n_heads
    fig = _new_figure(8.0, min(2.0 + 0.18 * rows, 12.0))
    ax = fig.add_subplot()
    full = m.max_logits.reshape(t, rows).T  # [layer*head, t], row = layer*H + head
    x, img, group = _pool_columns(m.steps, full, max_cols)
    masked = np.ma.masked_invalid(img)
    finite = img[np.isfinite(img)]
    if finite.size and finite.min() > 0 and finite.max() > finite.min():
        norm: Normalize = LogNorm(vmin=finite.min(), vmax=finite.max())
        scale = "log"
    else:
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 1.0
        norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1.0)
        scale = "linear"
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="0.75")
    y = np.arange(rows + 1) - 0.5
    mesh = ax.pcolormesh(x, y, masked, cmap=cmap, norm=norm, shading="flat")
    for layer in range(1, n_layers):
        ax.axhline(layer * n_heads - 0.5, color="white", lw=1.0)
    ax.set_yticks([layer * n_heads + (n_heads - 1) / 2 for layer in range(n_layers)])
    ax.set_yticklabels([f"L{layer}" for layer in range(n_layers)])
    ax.set_ylim(rows - 0.5, -0.5)  # layer 0 at the top
    ax.set_xlabel("step" if t and np.all(np.diff(m.steps) > 0) else "line index")
    ax.set_ylabel(f"layer (rows: {n_heads} heads each)")
    cb = fig.colorbar(mesh, ax=ax)
    cb.set_label(f"S (max logit, {scale} scale; grey = non-finite)")
    if (
        m.tau is not None
        and norm.vmin is not None
        and norm.vmax is not None
        and norm.vmin <= m.tau <= norm.vmax
    ):
        cb.ax.axhline(m.tau, color="cyan", lw=1.5)
    title = f"{m.label}: per-head max logit S"
    notes = []
    if m.tau is not None:
        notes.append(f"tau={m.tau:g}, cyan on colourbar")
    if group > 1:
        notes.append(f"each column = max over {group} logged steps")
    if notes:
        title += "\n(" + "; ".join(notes) + ")"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_clipped_fraction(runs: Sequence[RunMetrics], path: Path) -> Path:
    fig = _new_figure(7.0, 4.0)
    ax = fig.add_subplot()
    for i, m in enumerate(runs):
        frac = clipped_fraction(m)
        lab = m.label if m.n_heads_total else f"{m.label} (head count unknown)"
        ax.plot(m.steps, frac, "-", color=_colour(i), lw=1.2, label=lab, **_line_kw(len(m.steps)))
    ax.set_xlabel("step")
    ax.set_ylabel("heads clipped / (layers x heads)")
    ax.set_title("Fraction of heads clipped per step")
    ax.set_ylim(bottom=-0.02)
    ax.grid(True, alpha=0.3)
    if runs:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def _safe_name(label: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._")
    return s or "run"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qkclip-plot",
        description="Plot loss, max attention logits and clipping of training runs.",
    )
    p.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="run directory holding metrics.jsonl (and config.json)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="output directory (default: RUN_DIR for one run, ./plots otherwise)",
    )
    p.add_argument(
        "--labels",
        nargs="+",
        metavar="LABEL",
        default=None,
        help="one label per RUN_DIR (default: config 'label', else dir name)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `qkclip-plot`; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.run_dirs):
        parser.error(f"--labels got {len(args.labels)} labels for {len(args.run_dirs)} RUN_DIRs")

    runs: list[RunMetrics] = []
    for i, rd in enumerate(args.run_dirs):
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

    if args.out is not None:
        out = Path(args.out)
    elif len(args.run_dirs) == 1:
        out = Path(args.run_dirs[0])
    else:
        out = Path("plots")
    out.mkdir(parents=True, exist_ok=True)

    written = [
        plot_loss(runs, out / "loss.png"),
        plot_max_logit(runs, out / "max_logit.png"),
    ]
    used: set[str] = set()
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
        written.append(plot_heatmap(m, out / f"heatmap_{name}.png"))
    written.append(plot_clipped_fraction(runs, out / "clipped_fraction.png"))

    for p in written:
        print(p)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
