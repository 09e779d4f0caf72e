"""Per-run numbers, computed from a run's ``log.npz`` (``runner.py``) with
NumPy only, so that every number of ``results.md`` can be recomputed from the
committed logs."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import settings as S

Log = dict[str, np.ndarray]


def step_max(log: Log) -> np.ndarray:
    """The largest training-batch S of each step (over layers and heads)."""
    return np.max(log["s"].reshape(len(log["s"]), -1), axis=1)


def finite_max(x: np.ndarray) -> float:
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    return float(np.max(x)) if len(x) else math.nan


def flat_window(spec: dict[str, Any]) -> tuple[int, int]:
    """The last quarter of the constant-lr phase, ``[start, end)``."""
    steps, warm = spec["steps"], spec["warmup_steps"]
    decay = max(1, min(round(steps * spec["decay_fraction"]), steps - warm))
    end = steps - decay
    return end - (end - warm) // 4, end


def settled_s(log: Log, spec: dict[str, Any]) -> float:
    """The median of the per-step largest S over the last quarter of the
    constant phase (NaN if the run stopped before its end)."""
    a, b = flat_window(spec)
    m = step_max(log)
    return float(np.median(m[a:b])) if len(m) >= b else math.nan


def clip_numbers(log: Log, spec: dict[str, Any], tau: float) -> dict[str, Any]:
    """Where S passed ``tau`` (before the update, so where a clip run clipped):
    ``acted``, ``first`` step, ``fraction`` of heads ever over, the 99th
    percentile and the max of the per-step largest S / tau after the first
    clip, and the ``window_rate`` (share of steps with a head over tau in
    the last quarter of the constant phase)."""
    s = log["s"].reshape(len(log["s"]), -1)
    over = np.isfinite(s) & (s > tau)
    steps_over = np.flatnonzero(over.any(axis=1))
    a, b = flat_window(spec)
    rate = float(np.mean(over[a:b].any(axis=1))) if len(s) >= b else math.nan
    out: dict[str, Any] = {
        "acted": bool(len(steps_over)),
        "first": int(steps_over[0]) if len(steps_over) else None,
        "fraction": float(np.mean(over.any(axis=0))),
        "window_rate": rate,
        "q99_ratio": math.nan,
        "max_ratio": math.nan,
    }
    if len(steps_over) and steps_over[0] + 1 < len(s):
        after = np.max(s[steps_over[0] + 1 :], axis=1) / tau
        after = after[np.isfinite(after)]
        if len(after):
            out["q99_ratio"] = float(np.quantile(after, 0.99))
            out["max_ratio"] = float(np.max(after))
    return out


def run_row(log: Log, status: dict[str, Any]) -> dict[str, Any]:
    """Every per-run number the rules and the report use."""
    spec = status["spec"]
    s = log["s"].reshape(len(log["s"]), -1)
    prod = log["norm_qc"] * log["norm_kc"]
    row: dict[str, Any] = {
        "name": spec["name"],
        "optimizer": spec["optimizer"],
        "width": spec["width"],
        "lr": spec["lr"],
        "weight_decay": spec["weight_decay"],
        "tau": spec["tau"],
        "seed": spec["seed"],
        "stopped": status["stopped"],
        "steps_run": int(len(log["loss"])),
        "val_loss": float(log["val_loss"]),
        "peak_s": finite_max(s),
        "settled_s": settled_s(log, spec),
        "head_peaks": [finite_max(s[:, j]) for j in range(s.shape[1])],
        "peak_norm_product": finite_max(prod.reshape(len(prod), -1).max(axis=1)),
        "min_entropy": float(np.nanmin(log["probe_entropy"])),
        "final_min_entropy": float(np.min(log["probe_entropy"][-1])),
        "wall_s": status["wall_s"],
    }
    if spec["tau"] is not None:
        row["clip"] = clip_numbers(log, spec, spec["tau"])
    return row


def capped_val(row: dict[str, Any]) -> float:
    """min(final val loss, ln 256); a stopped run counts ln 256 (Wortsman's l_0)."""
    v = row["val_loss"]
    return S.LN_VOCAB if not math.isfinite(v) else min(v, S.LN_VOCAB)


def spike_counts(muon: Log, clip: Log, delta: float) -> dict[str, int]:
    """Steps where Muon's loss exceeds its MuonClip twin's (same batches) by
    more than ``delta``, and the reverse; a run that stopped where its twin
    did not counts one more."""
    n = min(len(muon["loss"]), len(clip["loss"]))
    d = muon["loss"][:n].astype(float) - clip["loss"][:n].astype(float)
    stop_m = len(muon["loss"]) < len(clip["loss"]) or not np.isfinite(muon["val_loss"])
    stop_c = len(clip["loss"]) < len(muon["loss"]) or not np.isfinite(clip["val_loss"])
    return {
        "muon": int(np.sum(d > delta)) + int(stop_m and not stop_c),
        "clip": int(np.sum(-d > delta)) + int(stop_c and not stop_m),
    }


def heads_over_curve(head_peaks: list[list[float]], taus: np.ndarray) -> np.ndarray:
    """Median over runs of the fraction of heads whose peak S exceeds each tau."""
    peaks = [np.asarray(p, float) for p in head_peaks]
    return np.asarray([np.median([np.mean(p > t) for p in peaks]) for t in taus])
