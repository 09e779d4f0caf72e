"""Numbers of one run, as pure functions of its ``metrics.jsonl`` records
(``runner.read_log``). S is a head's max logit; ``s`` is on the step's
training batch before the update and clip, ``probe_s`` on the fixed probe
batch. A clip run clips head h at step t when its ``s`` exceeds tau.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import settings as S

Records = Sequence[dict[str, Any]]


def losses(recs: Records) -> np.ndarray:
    return np.array([r["loss"] for r in recs], dtype=float)


def train_s(recs: Records) -> np.ndarray:
    """``[steps, layers, heads]`` (non-finite S is recorded as -1)."""
    return np.array([r["s"] for r in recs], dtype=float)


def probe(recs: Records) -> tuple[np.ndarray, np.ndarray]:
    """Probe steps and S ``[points, layers, heads]``."""
    rows = [r for r in recs if "probe_s" in r]
    return np.array([r["step"] for r in rows]), np.array([r["probe_s"] for r in rows], dtype=float)


def probe_max(recs: Records) -> tuple[np.ndarray, np.ndarray]:
    """Probe steps and the max over heads of probe S."""
    st, ps = probe(recs)
    return st, ps.reshape(len(st), -1).max(axis=1) if len(st) else np.zeros(0)


def peak_probe_s(recs: Records) -> float:
    _, m = probe_max(recs)
    return float(m.max()) if len(m) else math.nan


def final_val(recs: Records) -> float:
    v = [r["val_loss"] for r in recs if "val_loss" in r]
    return float(v[-1]) if v else math.nan


def val_curve(recs: Records) -> tuple[np.ndarray, np.ndarray]:
    rows = [r for r in recs if "val_loss" in r]
    return np.array([r["step"] for r in rows]), np.array([r["val_loss"] for r in rows], dtype=float)


def spikes(recs: Records, window: int, factor: float) -> list[int]:
    """Steps with a loss spike (``settings.is_spike`` over the previous ``window`` losses)."""
    x = losses(recs)
    return [
        int(recs[i]["step"])
        for i in range(window, len(x))
        if S.is_spike(float(x[i]), list(x[i - window : i]), factor)
    ]


def diverged(recs: Records, status: dict[str, Any] | None = None) -> bool:
    if status is not None and status.get("stopped") == "nan":
        return True
    return S.diverged(losses(recs))


def clip_summary(recs: Records, tau: float) -> dict[str, Any]:
    """First / last step with a head over tau (-1: none), the fraction of
    heads ever over tau, per layer and in all, and the largest probe S / tau
    after the first clip (``overshoot``) and the same on the training
    batches (``overshoot_train``, the cap verdict's number: one update's
    growth plus the variation between batches, as K2's Fig. 2 plots it)."""
    s = train_s(recs)
    over = s > tau
    any_t = over.reshape(len(s), -1).any(axis=1)
    steps = np.array([r["step"] for r in recs])
    out: dict[str, Any] = {"tau": tau, "n_heads": int(over.shape[1] * over.shape[2])}
    if not any_t.any():
        return {
            **out,
            "clipped": False,
            "first": -1,
            "last": -1,
            "steps_clipping": 0,
            "fraction": 0.0,
            "fraction_by_layer": [0.0] * over.shape[1],
            "overshoot": math.nan,
            "overshoot_step": -1,
            "overshoot_train": math.nan,
        }
    idx = np.nonzero(any_t)[0]
    first, last = int(steps[idx[0]]), int(steps[idx[-1]])
    ever = over.any(axis=0)
    pst, pmax = probe_max(recs)
    after = pst > first
    if after.any():
        j = int(np.argmax(np.where(after, pmax, -np.inf)))
        ov, ov_step = float(pmax[j] / tau), int(pst[j])
    else:
        ov, ov_step = math.nan, -1
    return {
        **out,
        "clipped": True,
        "first": first,
        "last": last,
        "steps_clipping": int(any_t.sum()),
        "fraction": float(ever.mean()),
        "fraction_by_layer": [float(x) for x in ever.mean(axis=1)],
        "overshoot": ov,
        "overshoot_step": ov_step,
        "overshoot_train": float(s.reshape(len(s), -1)[steps > first].max(initial=-np.inf) / tau),
    }


def update_growth(recs: Records, tau: float) -> float:
    """One update's growth of S on fixed data, for the heads a clip acted on:
    the largest ``probe_s[t + 1] / (gamma_t probe_s[t])`` over consecutive
    probe pairs and heads with ``s[t] > tau``, ``gamma_t = tau / s[t]``. In
    layer 0 this is exactly S_probe(unclipped update) / S_probe(W_t) (the
    clip scales every logit of a head by gamma); later layers' inputs also
    move with the clip of the layers before. NaN when no pair qualifies."""
    by_step = {r["step"]: r for r in recs}
    best = -np.inf
    for t, r in by_step.items():
        n = by_step.get(t + 1)
        if "probe_s" not in r or n is None or "probe_s" not in n:
            continue
        s_t = np.asarray(r["s"], dtype=float)
        hit = s_t > tau
        if hit.any():
            g = np.asarray(n["probe_s"])[hit] / ((tau / s_t[hit]) * np.asarray(r["probe_s"])[hit])
            best = max(best, float(g.max()))
    return best if np.isfinite(best) else math.nan


def ever_clipped_curve(recs: Records, tau: float) -> np.ndarray:
    """Fraction of heads clipped at least once up to each step."""
    over = (train_s(recs) > tau).reshape(len(recs), -1)
    return np.logical_or.accumulate(over, axis=0).mean(axis=1)


def mean_stable_rank(recs: Records) -> dict[str, float]:
    """Mean over the measured steps with lr > 0 of each matrix type's stable
    rank, and ``all``: the mean of those means."""
    rows = [r["rank"] for r in recs if "rank" in r and r["lr"] > 0]
    if not rows:
        return {"all": math.nan}
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    out["all"] = float(np.mean(list(out.values())))
    return out


def norm_products(recs: Records) -> tuple[np.ndarray, np.ndarray]:
    """Steps and the max over heads of ||q_C|| ||k_C|| (the no-RoPE logit's bound factor)."""
    rows = [r for r in recs if "norm_qc" in r]
    p = np.array([np.max(np.array(r["norm_qc"]) * np.array(r["norm_kc"])) for r in rows])
    return np.array([r["step"] for r in rows]), p


def run_row(recs: Records, status: dict[str, Any], s: S.Settings) -> dict[str, Any]:
    """Every per-run number the report uses."""
    spec = status["spec"]
    row = {
        "run": spec["name"],
        "optimizer": spec["optimizer"],
        "lr": spec["lr"],
        "weight_decay": spec["weight_decay"],
        "seed": spec["seed"],
        "tau": spec["tau"],
        "steps_run": status["steps_run"],
        "stopped": status["stopped"],
        "wall_s": status["wall_s"],
        "peak_probe_s": peak_probe_s(recs),
        "final_val": final_val(recs),
        "final_train": float(np.mean(losses(recs)[-20:])),
        "diverged": diverged(recs, status),
        "spikes": spikes(recs, s.spike_window, s.spike_factor),
        "stable_rank": mean_stable_rank(recs),
    }
    if spec["optimizer"] == "muonclip":
        row["clip"] = clip_summary(recs, spec["tau"])
        row["clip"]["update_growth"] = update_growth(recs, spec["tau"])
    return row
