"""The reported numbers, as pure functions of a run's ``metrics.jsonl``.

Everything here reads `qkclip_eqx.RunMetrics` (from `qkclip_eqx.read_metrics`).
S is the per-(layer, head) max logit of a step's forward pass, recorded before
that step's update and clip. A head is clipped at step t when S_t > tau (the
same float32 comparison the clip makes; tau values are exact in float32).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from qkclip_eqx import RunMetrics


def global_s(m: RunMetrics) -> np.ndarray:
    """Max over layers and heads of S, per step (NaN where none is finite)."""
    ml = m.max_logits.reshape(len(m.steps), -1)
    finite = ~np.isnan(ml)
    return np.where(finite.any(axis=1), np.where(finite, ml, -np.inf).max(axis=1), np.nan)


def peak_s(m: RunMetrics) -> tuple[float, int]:
    """Largest S of the run and its step."""
    g = global_s(m)
    if not np.isfinite(g).any():
        return math.nan, -1
    i = int(np.nanargmax(g))
    return float(g[i]), int(m.steps[i])


def s_at(m: RunMetrics, step: int) -> float:
    """Global S at ``step`` (NaN if the run did not reach it)."""
    idx = np.nonzero(m.steps == step)[0]
    return float(global_s(m)[idx[0]]) if len(idx) else math.nan


def spikes(m: RunMetrics, window: int = 20, factor: float = 1.5) -> list[dict[str, float]]:
    """Loss spikes: steps where loss > ``factor`` x the median loss of the
    previous ``window`` steps (only once ``window`` steps exist)."""
    out = []
    for i in range(window, len(m.loss)):
        med = float(np.median(m.loss[i - window : i]))
        if m.loss[i] > factor * med:
            out.append({"step": int(m.steps[i]), "loss": float(m.loss[i]), "median": med})
    return out


def max_loss_ratio(m: RunMetrics, window: int = 20) -> float:
    """Largest loss / (median of the previous ``window`` losses): how close to a spike."""
    r = [m.loss[i] / np.median(m.loss[i - window : i]) for i in range(window, len(m.loss))]
    return float(max(r)) if r else math.nan


def diverged(m: RunMetrics, status: dict[str, Any] | None) -> bool:
    """Non-finite loss (the run stopped), or no learning: mean of the last 10
    training losses at or above the mean of the first 10."""
    if status is not None and status.get("stopped") == "nan":
        return True
    if len(m.loss) < 20 or not np.isfinite(m.loss).all():
        return not np.isfinite(m.loss).all()
    return bool(np.mean(m.loss[-10:]) >= np.mean(m.loss[:10]))


def final_val_loss(m: RunMetrics) -> float:
    return float(m.val_loss[-1]) if len(m.val_loss) else math.nan


def final_train_loss(m: RunMetrics, n: int = 20) -> float:
    """Mean training loss of the last ``n`` steps."""
    return float(np.mean(m.loss[-n:])) if len(m.loss) else math.nan


def over_tau(m: RunMetrics, tau: float) -> np.ndarray:
    """[t, layers, heads] bool: head clipped at that step (S > tau, NaN never)."""
    ml = m.max_logits
    return np.where(np.isnan(ml), False, ml > tau)


def clip_summary(m: RunMetrics, tau: float, total_steps: int) -> dict[str, Any]:
    """What a MuonClip run did with its clip.

    - ``first_clip_step``, ``last_clip_step`` (-1 when nothing clipped);
      ``clip_off_after`` = last_clip_step + 1, the step after which no head
      triggers, and ``clip_off_fraction`` = that / total_steps (K2: ~30%).
    - ``steps_clipping``: steps with at least one head clipped;
      ``max_heads_clipped``: most heads clipped at one step.
    - ``ever_clipped_by_layer``: fraction of each layer's heads clipped at
      least once; ``ever_clipped``: the same over all heads (K2 App. D: 12.7%).
    - ``overshoot``: the largest S / tau at any step after the first clip (a
      clip acts on the weights that produced this step's S, so the next step's
      S can exceed tau by one update); ``overshoot_step`` where it occurred.
    """
    over = over_tau(m, tau)
    any_t = over.reshape(len(m.steps), -1).any(axis=1)
    n_layers, n_heads = over.shape[1], over.shape[2]
    out: dict[str, Any] = {"tau": tau, "n_heads_total": int(n_layers * n_heads)}
    if not any_t.any():
        out.update(
            first_clip_step=-1,
            last_clip_step=-1,
            clip_off_after=0,
            clip_off_fraction=0.0,
            steps_clipping=0,
            max_heads_clipped=0,
            ever_clipped_by_layer=[0.0] * n_layers,
            ever_clipped=0.0,
            ever_clipped_heads=[],
            overshoot=math.nan,
            overshoot_step=-1,
        )
        return out
    idx = np.nonzero(any_t)[0]
    first, last = int(m.steps[idx[0]]), int(m.steps[idx[-1]])
    ever = over.any(axis=0)  # [layers, heads]
    g = global_s(m)
    after = m.steps > first
    if after.any() and np.isfinite(g[after]).any():
        j = int(np.nanargmax(np.where(after, g, np.nan)))
        overshoot, o_step = float(g[j] / tau), int(m.steps[j])
    else:
        overshoot, o_step = math.nan, -1
    out.update(
        first_clip_step=first,
        last_clip_step=last,
        clip_off_after=last + 1,
        clip_off_fraction=(last + 1) / total_steps,
        steps_clipping=int(any_t.sum()),
        max_heads_clipped=int(over.reshape(len(m.steps), -1).sum(axis=1).max()),
        ever_clipped_by_layer=[float(x) for x in ever.mean(axis=1)],
        ever_clipped=float(ever.mean()),
        ever_clipped_heads=[[int(a), int(b)] for a, b in zip(*np.nonzero(ever))],
        overshoot=overshoot,
        overshoot_step=o_step,
    )
    return out


def ever_clipped_curve(m: RunMetrics, tau: float) -> np.ndarray:
    """[t]: fraction of all heads clipped at least once up to each step."""
    over = over_tau(m, tau).reshape(len(m.steps), -1)
    return np.logical_or.accumulate(over, axis=0).mean(axis=1) if len(over) else np.zeros(0)


def mean_std(x: list[float]) -> tuple[float, float]:
    a = np.asarray(x, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else math.nan


def prefix(m: RunMetrics, n: int) -> RunMetrics:
    """The run's records for steps < n (the lr sweep reads the first n steps)."""
    import dataclasses

    keep = m.steps < n
    vkeep = m.val_steps < n
    return dataclasses.replace(
        m,
        steps=m.steps[keep],
        loss=m.loss[keep],
        max_logits=m.max_logits[keep],
        heads_clipped=m.heads_clipped[keep],
        val_steps=m.val_steps[vkeep],
        val_loss=m.val_loss[vkeep],
    )


def loss_regression(m: RunMetrics, window: int = 20) -> tuple[float, int]:
    """Largest rise of the ``window``-step running mean of the training loss
    above its lowest earlier value, and the step where it peaks: a slow
    instability that the spike test (a single-step jump) does not see."""
    if len(m.loss) < window + 1:
        return 0.0, -1
    c = np.cumsum(np.insert(m.loss, 0, 0.0))
    sm = (c[window:] - c[:-window]) / window
    rise = sm - np.minimum.accumulate(sm)
    i = int(np.argmax(rise))
    return float(rise[i]), int(m.steps[i + window - 1])


def first_step_over(m: RunMetrics, level: float) -> int:
    """First step whose global S exceeds ``level`` (-1: never)."""
    g = np.nan_to_num(global_s(m), nan=-np.inf) > level
    return int(m.steps[np.argmax(g)]) if g.any() else -1
