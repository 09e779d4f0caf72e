"""v4 part B's rules as code, pre-registered with ``prereg_v4.md`` before its
pilot (nothing here has seen v4 data). Each endpoint's function returns
``(word, reason)`` like ``settings.verdict_*``; the intervals use
``posthoc.call``, the one rule for an interval and a bound. The margins are
functions of the pilot's numbers (``sigma_d``, ``sigma_s``), set when the
pilot is committed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from . import posthoc as P
from . import settings as S

IDENTICAL = "identical to its twin"
BOOTSTRAP = 2000  # resamples of the seeds
BOOTSTRAP_SEED = 0
MIN_REGIME = 3  # switch-off: runs in the regime needed for a verdict
# One-sided 90% Student t quantiles t_{0.90, df}, df = 1..10 (80% power of the TOST)
T90 = (
    3.077683537,
    1.885618083,
    1.637744354,
    1.533206274,
    1.475884049,
    1.439755747,
    1.414923928,
    1.39681531,
    1.383028738,
    1.372183641,
)


def identical_to_twin(twin_s: np.ndarray, tau: float) -> bool:
    """A clipped run equals its unclipped twin bit for bit when the twin's S
    is finite and at most tau at every step, layer and head (QK-Clip's gamma
    is then exactly 1 at every step)."""
    s = np.asarray(twin_s)
    return bool(np.all(np.isfinite(s)) and np.max(s) <= tau)


def cost_margin(sigma_d: float, n: int, base_loss: float) -> float:
    """The equivalence margin for the cost at lr*: the one the TOST has 80%
    power for at a true difference of 0, (t_{0.95, n-1} + t_{0.90, n-1})
    sigma_d / sqrt(n), never wider than v3's 1% of the twin's loss."""
    if not 2 <= n <= len(T90) + 1:
        raise ValueError(f"cost_margin: n must be 2..{len(T90) + 1} seeds, got {n}")
    return min(
        S.EQUIVALENCE_MARGIN * base_loss, (S.T95[n - 2] + T90[n - 2]) * sigma_d / math.sqrt(n)
    )


def verdict_cost(
    diffs: Sequence[float], margin: float, identical: Sequence[bool]
) -> tuple[str, str]:
    """Endpoint 1: the paired differences clip - twin of the final val loss
    (a seed identical to its twin contributes exactly 0)."""
    if all(identical):
        return IDENTICAL, f"the clip never fired in any of {len(identical)} seeds: cost exactly 0"
    ci = S.paired_ci90(diffs)
    txt = f"difference {ci['mean']:+.4f}, 90% CI [{ci['lo']:+.4f}, {ci['hi']:+.4f}], margin +-{margin:.4f}"
    lo, hi = P.call(ci["lo"], ci["hi"], -margin), P.call(ci["lo"], ci["hi"], margin)
    if lo == "above" and hi == "below":
        return S.REPRODUCED, txt
    if lo == "below" or hi == "above":
        return S.NOT_REPRODUCED, txt
    return P.INCONCLUSIVE, txt


def headroom(losses: np.ndarray, ref: float, delta: float) -> int:
    """``losses`` [lr multiples, seeds] of one arm: the index of the largest
    lr multiple whose seed-mean loss (NaN: diverged) is within ``ref +
    delta``; -1 if none is."""
    mean = np.mean(np.where(np.isfinite(losses), losses, np.inf), axis=1)
    ok = np.flatnonzero(mean <= ref + delta)
    return int(ok[-1]) if len(ok) else -1


def headroom_bootstrap(
    losses: dict[str, np.ndarray], delta: float, *, reference: str = "muon"
) -> dict[str, dict[str, float]]:
    """Endpoint 2. ``losses``: arm -> [lr multiples, seeds] final val loss,
    the same seeds in the same order for every arm. L_ref = the lowest
    seed-mean loss over every arm and lr; per arm its headroom H and, over
    ``BOOTSTRAP`` resamples of the seeds (the same for every arm), the 90%
    percentile intervals of H and of H - H(``reference``) in grid steps."""
    arms = list(losses)
    n = {v.shape[1] for v in losses.values()}
    if len(n) != 1 or reference not in losses:
        raise ValueError(
            f"headroom_bootstrap: every arm needs the same seeds and a {reference!r} arm"
        )
    (k,) = n

    def all_h(idx: np.ndarray) -> dict[str, int]:
        sub = {a: losses[a][:, idx] for a in arms}
        ref = min(
            float(np.min(np.mean(np.where(np.isfinite(v), v, np.inf), axis=1)))
            for v in sub.values()
        )
        return {a: headroom(v, ref, delta) for a, v in sub.items()}

    point = all_h(np.arange(k))
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    draws = [all_h(rng.integers(0, k, k)) for _ in range(BOOTSTRAP)]
    out = {}
    for a in arms:
        h = np.array([d[a] for d in draws], float)
        dh = h - np.array([d[reference] for d in draws], float)
        out[a] = {
            "h": point[a],
            "lo": float(np.quantile(h, 0.05)),
            "hi": float(np.quantile(h, 0.95)),
            "diff": point[a] - point[reference],
            "diff_lo": float(np.quantile(dh, 0.05)),
            "diff_hi": float(np.quantile(dh, 0.95)),
        }
    return out


def verdict_headroom(h: dict[str, float]) -> tuple[str, str]:
    """An arm's headroom against the reference's: more (reproduced for a
    clipped arm: "MuonClip widens the stable lr range"), less, or
    inconclusive, by the bootstrap interval of the difference against 0."""
    side = P.call(h["diff_lo"], h["diff_hi"], 0.0)
    txt = f"H - H(muon) = {h['diff']:+d} grid steps, 90% CI [{h['diff_lo']:+.0f}, {h['diff_hi']:+.0f}]"
    return {"above": S.REPRODUCED, "below": S.NOT_REPRODUCED}.get(side, P.INCONCLUSIVE), txt


def spread(arm: Sequence[float], reference: Sequence[float]) -> tuple[str, dict[str, float]]:
    """Endpoint 3: var(arm) / var(reference) with its 90% F interval against 1."""
    vr = P.variance_ratio_ci90(arm, reference)
    return P.call(vr["lo"], vr["hi"], 1.0), vr


def verdict_switch_off(regime: Sequence[bool], rates: Sequence[float]) -> tuple[str, str]:
    """Endpoint 4: ``regime`` per clipped run whose clip acted (its twin's S
    fell back below tau before the window, ``posthoc.falls_back``), and its
    clip rate in the window."""
    r = [x for g, x in zip(regime, rates) if g]
    if len(r) < MIN_REGIME:
        return (
            S.NOT_TESTED,
            f"{len(r)} of {len(rates)} runs in the regime (at least {MIN_REGIME} needed)",
        )
    return S.verdict_switch_off(r)


def verdict_head_fraction(fractions: Sequence[float]) -> tuple[str, str]:
    """Endpoint 5: the median fraction of heads ever clipped, with its 90%
    order-statistic interval, against twice K2's 12.7%."""
    if not fractions:
        return S.NOT_TESTED, "the clip acted in no run at lr*"
    lo, hi = P.median_ci90(fractions)
    txt = (
        f"median {np.median(fractions):.1%}, 90% CI [{lo:.1%}, {hi:.1%}] over {len(fractions)} runs"
    )
    side = P.call(lo, hi, S.HEAD_FRACTION_LIMIT)
    return {"below": S.REPRODUCED, "above": S.NOT_REPRODUCED}.get(side, P.INCONCLUSIVE), txt
