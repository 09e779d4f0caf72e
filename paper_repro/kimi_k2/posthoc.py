"""POST HOC, NOT PRE-REGISTERED: v3's committed logs re-analysed, beside the
pre-registered verdicts (which stay as ``settings.py`` registered them).

A review of v3 found artifacts in how some rules measure (issue 33 of the
project); this module applies corrected rules to the same logs, NumPy only,
and writes them into ``results.md`` as a separate, labelled section and into
``posthoc.json``. Nothing here was fixed before the data were seen: every
number is a re-analysis, and the verdict words say so ("post hoc").

The corrections:

- **One rule for an interval and a bound** (:func:`call`): an interval
  entirely above the bound is "above", entirely below is "below", anything
  else (it crosses or touches the bound, or it is undefined) is
  *inconclusive*. Every post-hoc rule with an interval uses it; the
  verdict words are *reproduced*, *not reproduced*, *inconclusive* and *not
  tested at this scale* (the regime the claim is about does not occur).
- **Spikes** as detrended one-step jumps: the paired per-step loss
  difference d_t = Muon - MuonClip (same batches) minus its rolling median
  (:func:`rolling_median`: the median of d over steps t - 12 .. t + 12,
  truncated at the ends of the run), so that a steady gap between the
  arms does not count. A Muon spike is a step where it exceeds the pilot's
  delta, a reverse spike one below -delta; per pair, the Wilson 90%
  interval of Muon's share of the spikes against 1/2.
- **Run sets**: the pre-registered cap, switch-off and App. D rules say
  "every healthy MuonClip run whose clip acted"; v3's code used the 4
  sweep runs (seed 0) of them. Here: the runs the text names (every seed,
  every tau for the cap and switch-off, tau = 100 for App. D).
- **The cap over every MuonClip run whose clip acted**, healthy or not
  (the healthy filter selects on the outcome), with the one-update
  outgrowth: S / tau one step after a step that clipped.
- **Switch-off and App. D need their regime**: switch-off is testable in a
  run only if its unclipped twin's S crosses tau and falls back below it
  before the window (:func:`falls_back`); App. D's fraction is measured
  where a researcher trains, at Muon's best lr.
- **App. E at equal lr**: Muon's and AdamW's peak S (and the q/k spectral
  norm product) per (width, lr), not slopes against each optimizer's own
  lr*.
- **The width fit at a fixed lr / lr\\***, with its interval, over the
  widths measured and no further.

``python -m paper_repro.kimi_k2.posthoc`` rewrites the section from the
committed ``results/summary.json`` and ``results/logs`` (no training, no
corpus); ``python -m paper_repro.kimi_k2`` writes it after the registered
results in every mode.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import analysis as A
from . import settings as S

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
MARKER = "## Post hoc, not pre-registered: v3 corrected in the open"

INCONCLUSIVE = "inconclusive"
ROLL = 25  # steps of the centred rolling median that detrends the paired loss difference
Z90 = 1.6448536269514722  # the standard normal's 95% quantile: a two-sided 90% interval
# Student t_{0.95, df}, df = 11..20 (``settings.T95`` holds df 1..10)
T95_MORE = (
    1.795884819,
    1.782287556,
    1.770933396,
    1.761310136,
    1.753050356,
    1.745883676,
    1.739606726,
    1.734063607,
    1.729132812,
    1.724718243,
)
# F_{0.95}(df, df), df = 1..10: a 90% interval for a ratio of two variances
F95_EQUAL = (
    161.447638798,
    19.0,
    9.276628153,
    6.388232909,
    5.050329058,
    4.283865714,
    3.78704354,
    3.438101233,
    3.178893104,
    2.978237016,
)
MIN_TESTABLE = (
    3  # switch-off: runs with the regime needed for a verdict ("most" of 1 or 2 is no test)
)
SETTLED = 0.10  # settled: the window's log-linear trend moves S by at most 10%
K2_LR = 2e-4  # Kimi K2's peak learning rate (arXiv 2507.20534, sec. 3.1)


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------


def t95(df: int) -> float:
    """Student t_{0.95, df} for df = 1..20."""
    if 1 <= df <= len(S.T95):
        return S.T95[df - 1]
    if df - len(S.T95) - 1 < len(T95_MORE):
        return T95_MORE[df - len(S.T95) - 1]
    raise ValueError(f"t95: df 1..20, got {df}")


def call(lo: float, hi: float, bound: float) -> str:
    """The one rule for an interval and a bound: "above", "below" or
    ``INCONCLUSIVE`` (it crosses or touches the bound, or is undefined)."""
    if math.isfinite(lo) and lo > bound:
        return "above"
    if math.isfinite(hi) and hi < bound:
        return "below"
    return INCONCLUSIVE


def wilson90(k: int, n: int) -> tuple[float, float]:
    """The Wilson score 90% interval of a proportion k / n (NaNs for n = 0)."""
    if n == 0:
        return math.nan, math.nan
    p, z2 = k / n, Z90**2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z90 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return centre - half, centre + half


def median_ci90(x: Sequence[float]) -> tuple[float, float]:
    """The narrowest order-statistic interval [x_(j), x_(n+1-j)] that covers
    the median with probability >= 90% (binomial, no assumption on the
    distribution); NaNs when even [min, max] covers less (n < 5)."""
    x = np.sort(np.asarray(x, float))
    n = len(x)
    best = None
    for j in range(1, n // 2 + 1):
        tail = sum(math.comb(n, i) for i in range(j)) / 2.0**n  # P(Bin(n, 1/2) <= j - 1)
        if 1 - 2 * tail >= 0.9:
            best = j
    if best is None:
        return math.nan, math.nan
    return float(x[best - 1]), float(x[n - best])


def blocked_mean_ci(blocks: Sequence[Sequence[float]]) -> dict[str, float]:
    """Mean of all differences with a 90% t interval whose variance is pooled
    within blocks (one block per width: df = n - blocks)."""
    allv = np.concatenate([np.asarray(b, float) for b in blocks])
    res = np.concatenate([np.asarray(b, float) - np.mean(b) for b in blocks])
    n, df = len(allv), len(allv) - len(blocks)
    if df < 1 or not np.all(np.isfinite(allv)):
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "t": math.nan, "n": n, "df": df}
    se = math.sqrt(float(np.sum(res**2)) / df / n)
    m = float(np.mean(allv))
    h = t95(df) * se
    return {"mean": m, "lo": m - h, "hi": m + h, "t": m / se, "n": n, "df": df}


def variance_ratio_ci90(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """var(a) / var(b) for two samples of equal size with its 90% F interval."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    df = len(a) - 1
    if len(a) != len(b) or not 1 <= df <= len(F95_EQUAL):
        raise ValueError(f"variance_ratio_ci90: equal sizes 2..11, got {len(a)} and {len(b)}")
    r = float(np.var(a, ddof=1) / np.var(b, ddof=1))
    f = F95_EQUAL[df - 1]
    return {"ratio": r, "lo": r / f, "hi": r * f, "df": df}


def slope_ci90(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Least-squares slope of y on x with its 90% t interval (df = n - 2)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    p, c = np.polyfit(x, y, 1)
    if n < 3:
        return {"p": float(p), "c": float(c), "lo": math.nan, "hi": math.nan, "n": n}
    res = y - (p * x + c)
    se = math.sqrt(float(np.sum(res**2)) / (n - 2) / float(np.sum((x - x.mean()) ** 2)))
    h = t95(n - 2) * se
    return {"p": float(p), "c": float(c), "lo": float(p - h), "hi": float(p + h), "n": n}


# ---------------------------------------------------------------------------
# per-run measurements
# ---------------------------------------------------------------------------


def rolling_median(x: np.ndarray, k: int = ROLL) -> np.ndarray:
    """Centred rolling median: out[t] = median(x[t - k//2 : t + k//2 + 1]),
    the window truncated at both ends."""
    x = np.asarray(x, float)
    h = k // 2
    return np.asarray([np.median(x[max(0, t - h) : t + h + 1]) for t in range(len(x))])


def detrended_spikes(muon: A.Log, clip: A.Log, delta: float) -> dict[str, Any]:
    """Spikes of the detrended paired difference, over the steps both ran;
    a run that stopped where its twin did not is reported beside."""
    n = min(len(muon["loss"]), len(clip["loss"]))
    d = muon["loss"][:n].astype(float) - clip["loss"][:n].astype(float)
    e = d - rolling_median(d)
    k_m, k_c = int(np.sum(e > delta)), int(np.sum(e < -delta))
    lo, hi = wilson90(k_m, k_m + k_c)
    stop_m = len(muon["loss"]) < len(clip["loss"]) or not np.isfinite(muon["val_loss"])
    stop_c = len(clip["loss"]) < len(muon["loss"]) or not np.isfinite(clip["val_loss"])
    if stop_m and not stop_c:
        side = "above"  # Muon diverged where MuonClip did not: the registered convention
    elif stop_c and not stop_m:
        side = "below"
    else:
        side = call(lo, hi, 0.5)
    return {
        "steps": n,
        "raw_muon": int(np.sum(d > delta)),
        "raw_clip": int(np.sum(-d > delta)),
        "mean_gap": float(np.mean(d)),
        "muon": k_m,
        "clip": k_c,
        "share_lo": lo,
        "share_hi": hi,
        "side": side,
        "top_jumps_muon": top_jumps(muon["loss"][:n]),
        "top_jumps_clip": top_jumps(clip["loss"][:n]),
    }


def top_jumps(loss: np.ndarray, k: int = 3) -> list[list[float]]:
    """The ``k`` largest one-step rises loss[t] - loss[t - 1]: ``[[t, rise], ...]``."""
    j = np.diff(np.asarray(loss, float))
    idx = np.argsort(-j, kind="stable")[:k]
    return [[int(i + 1), float(j[i])] for i in idx]


def outgrowth(s: np.ndarray, tau: float) -> dict[str, float]:
    """One update's outgrowth of the clip: over the steps t that clipped
    (some head's S_t > tau; the clip then sets those heads to S = tau on
    batch t), the largest S_{t+1} / tau of the next step (a new batch and
    one update): its median and its maximum."""
    m = np.max(s.reshape(len(s), -1), axis=1)
    t = np.flatnonzero(np.isfinite(m[:-1]) & (m[:-1] > tau))
    r = m[t + 1] / tau
    r = r[np.isfinite(r)]
    if not len(r):
        return {"median": math.nan, "max": math.nan}
    return {"median": float(np.median(r)), "max": float(np.max(r))}


def falls_back(twin: A.Log, spec: dict[str, Any], tau: float) -> dict[str, Any]:
    """Whether the unclipped twin shows the regime of K2's switch-off: its S
    (the rolling median of the per-step largest S) rises above tau and is
    back below it before the window (the last quarter of the flat phase)
    starts, for the rest of the flat phase. ``peak_step``: the step of the
    twin's largest S."""
    a, b = A.flat_window(spec)
    m = A.step_max(twin).astype(float)
    out: dict[str, Any] = {"peak_step": int(np.nanargmax(m)), "last_over": None, "regime": False}
    if len(m) < b:
        return out
    over = np.flatnonzero(rolling_median(m[:b]) > tau)
    if len(over):
        out["last_over"] = int(over[-1])
        out["regime"] = bool(over[-1] < a)
    return out


def decay_constants(log: A.Log, spec: dict[str, Any], wd: float) -> float:
    """Weight-decay time constants to the end of the flat phase: sum_t lr_t wd."""
    _, b = A.flat_window(spec)
    return float(np.sum(np.asarray(log["lr"][:b], float)) * wd)


def window_trend(log: A.Log, spec: dict[str, Any]) -> float:
    """The relative change of S across the window by a log-linear fit of the
    per-step largest S: exp(slope x window length) - 1 (NaN if the run
    stopped before the window's end)."""
    a, b = A.flat_window(spec)
    m = A.step_max(log).astype(float)
    if len(m) < b or not np.all(m[a:b] > 0):
        return math.nan
    p = np.polyfit(np.arange(a, b), np.log(m[a:b]), 1)[0]
    return float(math.expm1(p * (b - a)))


# ---------------------------------------------------------------------------
# the re-analysis
# ---------------------------------------------------------------------------


def _spec(summ: dict[str, Any]) -> dict[str, Any]:
    st = summ["settings"]
    # the schedule of every run (settings.Settings of the mode)
    mode = S.MODES.get(summ["mode"], S.FULL)
    return {
        "steps": st["steps"],
        "warmup_steps": mode.warmup_steps,
        "decay_fraction": mode.decay_fraction,
    }


def _majority(sides: Sequence[str], yes: str, no: str) -> str:
    n = len(sides)
    if sum(s == yes for s in sides) * 2 > n:
        return S.REPRODUCED
    if sum(s == no for s in sides) * 2 > n:
        return S.NOT_REPRODUCED
    return INCONCLUSIVE


class _Runs:
    """The summary's run rows, indexed, with their logs."""

    def __init__(self, summ: dict[str, Any], logs: dict[str, A.Log]):
        self.summ, self.logs, self.rows = summ, logs, summ["runs"]
        self.spec = _spec(summ)

    def star(self, w: int) -> float:
        return self.summ["best"][str(w)]["muon"]["lr"]

    def twin(self, r: dict[str, Any]) -> dict[str, Any] | None:
        """The Muon run with the same width, lr, wd and seed."""
        for q in self.rows.values():
            if (
                q["optimizer"] == "muon"
                and q["width"] == r["width"]
                and q["seed"] == r["seed"]
                and q["weight_decay"] == r["weight_decay"]
                and math.isclose(q["lr"], r["lr"], rel_tol=1e-9)
            ):
                return q
        return None

    def healthy(self, r: dict[str, Any]) -> bool:
        """Not diverged by the registered rule (against the width's best Muon
        or MuonClip sweep run)."""
        b = self.summ["best"][str(r["width"])]
        ref = (
            b["adamw"]["val_loss"]
            if r["optimizer"] == "adamw"
            else min(b["muon"]["val_loss"], b["muonclip"]["val_loss"])
        )
        return not S.diverged(r["val_loss"], ref)

    def clip_runs(self) -> list[dict[str, Any]]:
        return sorted(
            (r for r in self.rows.values() if r["optimizer"] == "muonclip" and r["clip"]["acted"]),
            key=lambda r: (r["width"], r["lr"], r["tau"], r["seed"]),
        )


def twins_at_lr_star(R: _Runs) -> dict[str, Any]:
    """At Muon's best lr (seed 0): peak S, and whether MuonClip equals Muon
    bit for bit; over the sweep, every pair whose losses and S are equal;
    lr_1000 / lr* and the val-loss excess over the width's best there."""
    summ, out = R.summ, {"widths": {}, "identical": [], "pairs": 0}
    for w in summ["settings"]["widths"]:
        for nm, nc in zip(summ["sweep"][str(w)]["muon"], summ["sweep"][str(w)]["muonclip"]):
            a, b = R.logs[nm], R.logs[nc]
            same = (
                len(a["loss"]) == len(b["loss"])
                and np.array_equal(a["loss"], b["loss"])
                and np.array_equal(a["s"], b["s"])
                and np.array_equal(a["val_loss"], b["val_loss"], equal_nan=True)
            )
            out["pairs"] += 1
            if same:
                out["identical"].append(nc)
        star = R.star(w)
        m = next(R.rows[n] for n in summ["sweep"][str(w)]["muon"] if R.rows[n]["lr"] == star)
        lr1k = summ["lr_1000"][str(w)]
        best = min(summ["best"][str(w)][f]["val_loss"] for f in ("muon", "muonclip"))
        row: dict[str, Any] = {"lr_star": star, "peak_s": m["peak_s"], "lr_1000_over_star": None}
        if lr1k is not None:
            r1k = next(R.rows[n] for n in summ["sweep"][str(w)]["muon"] if R.rows[n]["lr"] == lr1k)
            row["lr_1000_over_star"] = lr1k / star
            row["excess_at_lr_1000"] = A.capped_val(r1k) - best
        nc = next(n for n in summ["sweep"][str(w)]["muonclip"] if R.rows[n]["lr"] == star)
        row["identical_at_star"] = nc in out["identical"]
        out["widths"][str(w)] = row
    return out


def explosion(R: _Runs) -> dict[str, Any]:
    """Not re-analysed (no artifact): the registered word, with where lr_1000
    sits against lr*."""
    tw = twins_at_lr_star(R)["widths"]
    at = [(w, v) for w, v in tw.items() if v["lr_1000_over_star"] is not None]
    why = "unchanged rule; lr_1000 / lr* = " + ", ".join(
        f"{w}: {v['lr_1000_over_star']:.3g}" for w, v in at
    )
    if at:
        why += (
            ", where the val loss is "
            f"{min(v['excess_at_lr_1000'] for _, v in at):.2f}-"
            f"{max(v['excess_at_lr_1000'] for _, v in at):.2f} nats above the width's best"
        )
    return {"word": R.summ["verdicts"]["fig2_left_explosion"]["word"], "why": why}


def spikes(R: _Runs) -> dict[str, Any]:
    delta = R.summ["tolerances"]["spike_delta"]
    pairs = []
    for w in R.summ["settings"]["widths"]:
        for nm, nc in zip(R.summ["sweep"][str(w)]["muon"], R.summ["sweep"][str(w)]["muonclip"]):
            if R.rows[nm]["peak_s"] >= R.summ["explosion"]:
                c = detrended_spikes(R.logs[nm], R.logs[nc], delta)
                pairs.append({"width": w, "lr": R.rows[nm]["lr"], **c})
    if not pairs:
        word, why = S.NOT_TESTED, "no Muon run reaches the explosion threshold"
    else:
        sides = [p["side"] for p in pairs]
        word = _majority(sides, "above", "below")
        why = (
            f"detrended (rolling median of {ROLL} steps): Muon more in {sides.count('above')}, "
            f"MuonClip more in {sides.count('below')}, inconclusive in "
            f"{sides.count(INCONCLUSIVE)} of {len(pairs)} exploding pairs (Muon / reverse spikes "
            + ", ".join(f"{p['muon']}/{p['clip']}" for p in pairs)
            + ")"
        )
    return {"pairs": pairs, "delta": delta, "word": word, "why": why}


def cure(R: _Runs) -> dict[str, Any]:
    widths, blocks = {}, []
    for w, c in sorted(R.summ["cure"].items(), key=lambda kv: int(kv[0])):
        ci = S.paired_ci90(c["diffs"])
        mv = [A.capped_val(R.rows[n]) for n in c["muon"]]
        cv = [A.capped_val(R.rows[n]) for n in c["muonclip"]]
        vr = variance_ratio_ci90(mv, cv)
        widths[w] = {
            "lr": c["lr"],
            "lr_over_star": c["lr"] / R.star(int(w)),
            **ci,
            "side": call(ci["lo"], ci["hi"], 0.0),
            "negative": int(sum(d < 0 for d in c["diffs"])),
            "sd_diff": float(np.std(c["diffs"], ddof=1)),
            "sd_muon": float(np.std(mv, ddof=1)),
            "sd_muonclip": float(np.std(cv, ddof=1)),
            "var_ratio": vr,
            "spread_side": call(vr["lo"], vr["hi"], 1.0),
        }
        blocks.append(c["diffs"])
    if not widths:
        return {"widths": {}, "word": S.NOT_TESTED, "why": "no lr_1000", "pooled": None}
    sides = [v["side"] for v in widths.values()]
    if all(s == "below" for s in sides):
        word = S.REPRODUCED
    elif any(s == "above" for s in sides):
        word = S.NOT_REPRODUCED
    else:
        word = INCONCLUSIVE
    pooled = blocked_mean_ci(blocks)
    why = "MuonClip - Muon, 90% CI: " + "; ".join(
        f"{w}: {v['mean']:+.3f} [{v['lo']:+.3f}, {v['hi']:+.3f}] ({v['side']})"
        for w, v in widths.items()
    )
    return {"widths": widths, "pooled": pooled, "word": word, "why": why}


def stable_range(R: _Runs) -> dict[str, Any]:
    m = R.summ["tolerances"]["sensitivity_margin"]
    per = {}
    for w, v in sorted(R.summ["sensitivity"].items(), key=lambda kv: int(kv[0])):
        d = v["muonclip"] - v["muon"]  # below -m: MuonClip lower by more than the margin
        per[w] = {"diff": d, "side": call(d - m, d + m, 0.0)}
    sides = [v["side"] for v in per.values()]
    if all(s == "below" for s in sides):
        word = S.REPRODUCED
    elif any(s == "above" for s in sides):
        word = S.NOT_REPRODUCED
    else:
        word = INCONCLUSIVE
    why = (
        "MuonClip - Muon lr sensitivity, +- the margin "
        + f"{m:.3f}: "
        + "; ".join(f"{w}: {v['diff']:+.3f} ({v['side']})" for w, v in per.items())
    )
    return {"widths": per, "margin": m, "word": word, "why": why}


def _run_brief(R: _Runs, r: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": r["name"],
        "width": r["width"],
        "lr": r["lr"],
        "lr_over_star": r["lr"] / R.star(r["width"]),
        "tau": r["tau"],
        "seed": r["seed"],
        "healthy": R.healthy(r),
        "stopped": r["stopped"],
    }


def cap(R: _Runs) -> dict[str, Any]:
    tol = R.summ["tolerances"]["cap_tolerance"]
    runs = []
    for r in R.clip_runs():
        og = outgrowth(R.logs[r["name"]]["s"], r["tau"])
        runs.append({**_run_brief(R, r), "q99": r["clip"]["q99_ratio"], "outgrowth": og})
    text = [x["q99"] for x in runs if x["healthy"]]
    word_text, why_text = S.verdict_cap(text, tol)
    word, why = S.verdict_cap([x["q99"] for x in runs], tol)
    groups: dict[str, list[float]] = {}
    for x in runs:
        groups.setdefault(f"{x['lr_over_star']:.3g}", []).append(x["q99"])
    held = sorted((k for k, v in groups.items() if max(v) <= tol), key=float)
    return {
        "tolerance": tol,
        "runs": runs,
        "rule_text": {"n": len(text), "word": word_text, "why": why_text},
        "by_lr_over_star": {k: [min(v), max(v), len(v)] for k, v in groups.items()},
        "held_at": held,
        "word": word,
        "why": f"every MuonClip run whose clip acted ({len(runs)}, healthy or not): "
        + why
        + f"; held in every run at lr / lr* = {', '.join(held) or 'none'}",
    }


def switch_off(R: _Runs) -> dict[str, Any]:
    runs = []
    for r in R.clip_runs():
        if not R.healthy(r):
            continue
        twin = R.twin(r)
        fb = (
            falls_back(R.logs[twin["name"]], R.spec, r["tau"])
            if twin is not None
            else {"peak_step": None, "last_over": None, "regime": False}
        )
        runs.append(
            {
                **_run_brief(R, r),
                "rate": r["clip"]["window_rate"],
                "decay_constants": decay_constants(R.logs[r["name"]], R.spec, r["weight_decay"]),
                "twin": None if twin is None else twin["name"],
                **fb,
            }
        )
    word_text, why_text = S.verdict_switch_off([x["rate"] for x in runs])
    testable = [x for x in runs if x["regime"]]
    if len(testable) < MIN_TESTABLE:
        word = S.NOT_TESTED
        why = (
            f"the unclipped twin's S falls back below tau before the window in {len(testable)} of "
            f"{len(runs)} runs (at least {MIN_TESTABLE} needed); twins' peaks at steps "
            + (
                f"{min(x['peak_step'] for x in runs)}-{max(x['peak_step'] for x in runs)}"
                if runs
                else "n/a"
            )
        )
    else:
        word, why = S.verdict_switch_off([x["rate"] for x in testable])
    return {
        "runs": runs,
        "rule_text": {"n": len(runs), "word": word_text, "why": why_text},
        "testable": [x["name"] for x in testable],
        "word": word,
        "why": why,
    }


def head_fraction(R: _Runs) -> dict[str, Any]:
    summ, tau = R.summ, R.summ["tau"]
    text = [
        r["clip"]["fraction"]
        for r in R.clip_runs()
        if R.healthy(r) and r["tau"] == tau and math.isfinite(r["val_loss"])
    ]
    word_text, why_text = S.verdict_head_fraction(text)
    by_lr: dict[str, dict[str, float]] = {}
    at_star = []  # the sweep's MuonClip runs at Muon's best lr
    for w in summ["settings"]["widths"]:
        for n in summ["sweep"][str(w)]["muonclip"]:
            r = R.rows[n]
            k = f"{r['lr'] / R.star(w):.3g}"
            by_lr.setdefault(k, {})[str(w)] = r["clip"]["fraction"]
            if r["lr"] == R.star(w):
                at_star.append(r)
    f12 = summ["fig12"]
    fr = [R.rows[n]["clip"]["fraction"] for n in f12["muonclip"]]
    lo, hi = median_ci90(fr)
    analogue = {
        "tau": f12["tau"],
        "width": f12["width"],
        "fractions": fr,
        "median": float(np.median(fr)) if fr else math.nan,
        "lo": lo,
        "hi": hi,
        "side": call(lo, hi, S.HEAD_FRACTION_LIMIT),
    }
    if any(r["clip"]["acted"] for r in at_star):
        word, why = S.verdict_head_fraction(
            [r["clip"]["fraction"] for r in at_star if r["clip"]["acted"]]
        )
    else:
        word = S.NOT_TESTED
        why = (
            f"at Muon's best lr the clip at tau = {tau:g} acts in none of the "
            f"{len(at_star)} widths; analogue at tau = {f12['tau']:g} (Fig. 12 runs): median "
            f"{analogue['median']:.0%}, 90% CI [{lo:.0%}, {hi:.0%}] against {S.HEAD_FRACTION_LIMIT:.1%} "
            f"({analogue['side']})"
        )
    return {
        "rule_text": {"n": len(text), "word": word_text, "why": why_text},
        "by_lr_over_star": by_lr,
        "analogue": analogue,
        "word": word,
        "why": why,
    }


def negligible(R: _Runs) -> dict[str, Any]:
    f12 = R.summ["fig12"]
    word, why = S.verdict_negligible(f12["diffs"], f12["base"], f12["acted"])
    if word == S.NOT_TESTED and all(f12["acted"]):
        word = INCONCLUSIVE  # the registered "not tested" for an interval across a bound
        why = why.replace(" (inconclusive)", "")
    return {"word": word, "why": why}


def _seed_sd(R: _Runs, key: str) -> float:
    """The largest seed-to-seed sd of log(row[key]) over the multi-seed Muon
    cells (the cure's and Fig. 12's)."""
    cells = [c["muon"] for c in R.summ["cure"].values()] + [R.summ["fig12"]["muon"]]
    sds = [float(np.std([math.log(R.rows[n][key]) for n in c], ddof=1)) for c in cells]
    return max(sds)


def equal_lr(R: _Runs, key: str) -> dict[str, Any]:
    """AdamW / Muon of ``row[key]`` at every (width, lr) both grids hold,
    the pair's log ratio +- twice the largest seed-to-seed sd of the log."""
    margin = 2 * _seed_sd(R, key)
    pairs = []
    for w in R.summ["settings"]["widths"]:
        muon = {R.rows[n]["lr"]: R.rows[n] for n in R.summ["sweep"][str(w)]["muon"]}
        for n in R.summ["sweep"][str(w)]["adamw"]:
            a = R.rows[n]
            m = next((v for k, v in muon.items() if math.isclose(k, a["lr"], rel_tol=1e-9)), None)
            if m is None:
                continue
            done = a["stopped"] == "done" and m["stopped"] == "done"
            lr_ = math.log(a[key] / m[key]) if done else math.nan
            pairs.append(
                {
                    "width": w,
                    "lr": a["lr"],
                    "ratio": a[key] / m[key],
                    "done": done,
                    "side": call(lr_ - margin, lr_ + margin, 0.0) if done else "stopped",
                }
            )
    sides = [p["side"] for p in pairs if p["done"]]
    # K2: Muon's larger, i.e. AdamW / Muon "below" 1
    word = _majority(sides, "below", "above")
    done = [p for p in pairs if p["done"]]
    why = (
        f"AdamW / Muon at equal lr: AdamW larger in {sides.count('above')}, Muon larger in "
        f"{sides.count('below')}, inconclusive in {sides.count(INCONCLUSIVE)} of {len(done)} pairs "
        f"that both completed (ratios {min(p['ratio'] for p in done):.2f}-"
        f"{max(p['ratio'] for p in done):.2f}; margin x{math.exp(margin):.2f})"
        if done
        else "no pair completed"
    )
    gt1 = [p["ratio"] for p in pairs if p["ratio"] > 1]
    return {
        "pairs": pairs,
        "margin_log": margin,
        "n_adamw_larger_point": len(gt1),
        "range_adamw_larger_point": [min(gt1), max(gt1)] if gt1 else None,
        "word": word,
        "why": why,
    }


def s_over_product(R: _Runs) -> list[float]:
    """Per probe of every completed Muon and AdamW sweep run: the largest
    probe S over the largest sigma(W_qC) sigma(W_kC); its range."""
    ratios = []
    for w in R.summ["settings"]["widths"]:
        for opt in ("muon", "adamw"):
            for n in R.summ["sweep"][str(w)][opt]:
                if R.rows[n]["stopped"] != "done":
                    continue
                lg = R.logs[n]
                ps = lg["probe_s"].reshape(len(lg["probe_s"]), -1).max(axis=1)
                pr = (lg["norm_qc"] * lg["norm_kc"]).reshape(len(ps), -1).max(axis=1)
                ratios.extend((ps / pr).astype(float).tolist())
    return [min(ratios), max(ratios)] if ratios else [math.nan, math.nan]


def width_fit(R: _Runs) -> dict[str, Any]:
    """Settled S of seed 0's Muon at lr = lr* x 10^(k/2), k = 0, 1, 2, per
    width, and the power-law exponent in width with its 90% interval."""
    summ, grid = R.summ, R.summ["settings"]["grid"]["muon"]
    fits = {}
    for k in range(3):
        xs, ys, lrs = [], [], []
        for w in summ["settings"]["widths"]:
            i = next(j for j, g in enumerate(grid) if math.isclose(g, R.star(w), rel_tol=1e-9))
            if i + k >= len(grid):
                continue
            lr = grid[i + k]
            n = next(n for n in summ["sweep"][str(w)]["muon"] if R.rows[n]["lr"] == lr)
            y = R.rows[n]["settled_s"]
            if math.isfinite(y) and y > 0:
                xs.append(w)
                ys.append(y)
                lrs.append(lr)
        if len(xs) >= 2:
            f = slope_ci90(np.log(xs), np.log(ys))
            fits[f"{10 ** (k / 2):.3g}"] = {"widths": xs, "lrs": lrs, "settled": ys, **f}
    lr_fit = summ["lr_fit"]
    registered = {
        "lr": lr_fit,
        "lr_over_star": {str(w): lr_fit / R.star(w) for w in summ["settings"]["widths"]}
        if lr_fit
        else {},
        "lr_over_k2": None if lr_fit is None else lr_fit / K2_LR,
    }
    trends = {}
    names = [
        n
        for w in summ["settings"]["widths"]
        for n in summ["sweep"][str(w)]["muon"]
        if lr_fit is not None and math.isclose(R.rows[n]["lr"], lr_fit, rel_tol=1e-9)
    ]
    for n in names:
        trends[n] = window_trend(R.logs[n], R.spec)
    wd_runs = {}
    for wd in summ["settled_vs_wd"]:
        n = next(
            (
                r["name"]
                for r in R.rows.values()
                if r["optimizer"] == "muon"
                and r["width"] == summ["fig12"]["width"]
                and r["seed"] == 0
                and lr_fit is not None
                and math.isclose(r["lr"], lr_fit, rel_tol=1e-9)
                and math.isclose(r["weight_decay"], float(wd), rel_tol=1e-9)
            ),
            None,
        )
        if n is not None:
            wd_runs[wd] = {"name": n, "trend": window_trend(R.logs[n], R.spec)}
    return {
        "fits": fits,
        "registered": registered,
        "trends": trends,
        "wd_runs": wd_runs,
        "settled_limit": SETTLED,
    }


def analyse(summ: dict[str, Any], logs: dict[str, A.Log]) -> dict[str, Any]:
    """Every post-hoc number and verdict, from a v3 summary and its logs."""
    summ = json.loads(json.dumps(summ, default=float))  # as summary.json holds it
    R = _Runs(summ, logs)
    ph: dict[str, Any] = {
        "mode": summ["mode"],
        "registered": {k: v["word"] for k, v in summ["verdicts"].items()},
        "twins": twins_at_lr_star(R),
        "explosion": explosion(R),
        "spikes": spikes(R),
        "cure": cure(R),
        "stable_range": stable_range(R),
        "cap": cap(R),
        "switch_off": switch_off(R),
        "head_fraction": head_fraction(R),
        "negligible": negligible(R),
        "appE_s": equal_lr(R, "peak_s"),
        "appE_norm": equal_lr(R, "peak_norm_product"),
        "s_over_product": s_over_product(R),
        "width_fit": width_fit(R),
    }
    return ph


# ---------------------------------------------------------------------------
# results.md's section
# ---------------------------------------------------------------------------

CLAIMS = (
    ("Fig. 2 left: S passes 1000", "fig2_left_explosion", "explosion"),
    ("Fig. 2 left: spikes", "fig2_left_spikes", "spikes"),
    ("MuonClip's cure at lr_1000", "cure", "cure"),
    ("Stable lr range", "stable_range", "stable_range"),
    ("Fig. 2 right: the cap", "fig2_right_cap", "cap"),
    ("Fig. 2 right: switch-off", "fig2_right_switch_off", "switch_off"),
    ("App. D: heads clipped", "appD_head_fraction", "head_fraction"),
    ("Fig. 12: tau = 30 negligible", "fig12_negligible", "negligible"),
    ("App. E: Muon grows S faster", "appE_muon_faster", "appE_s"),
    ("App. E: through the q/k spectral norms", "appE_weight_growth", "appE_norm"),
)


def _p(x: float, nd: int = 0) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{nd}%}"


def _n(x: Any, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{nd}f}"


def _g(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.3g}"


def markdown(ph: dict[str, Any]) -> str:
    """The post-hoc section of ``results.md``."""
    reg = ph["registered"]
    L = [
        MARKER,
        "",
        "**Post hoc.** Everything in this section was decided after the v3 results were "
        "seen; it is a re-analysis of the same committed logs by "
        "[`posthoc.py`](../posthoc.py) (`python -m paper_repro.kimi_k2.posthoc`), "
        "not a pre-registered test. The verdicts above stay as registered. Verdict words "
        "here: *reproduced*, *not reproduced*, *inconclusive* (an interval crosses or "
        "touches its bound: the one rule every post-hoc interval uses) and *not tested at this scale* "
        "(the regime the claim is about does not occur).",
        "",
        "| claim | pre-registered verdict | post-hoc verdict | post-hoc measurement |",
        "|---|---|---|---|",
    ]
    for claim, k, p in CLAIMS:
        L.append(f"| {claim} | {reg[k]} | **{ph[p]['word']}** | {ph[p]['why']} |")
    n_rep = sum(ph[p]["word"] == S.REPRODUCED for _, _, p in CLAIMS)
    L += ["", f"Post hoc: {n_rep} of {len(CLAIMS)} reproduced.", ""]
    # where the clip acts
    tw = ph["twins"]
    L += [
        "### Where the clip acts",
        "",
        "| width | lr* (Muon's best) | peak S at lr* | MuonClip = Muon bit for bit at lr* | lr_1000 / lr* | val loss above the best there |",
        "|---|---|---|---|---|---|",
    ]
    for w, r in tw["widths"].items():
        L.append(
            f"| {w} | {_g(r['lr_star'])} | {_n(r['peak_s'], 1)} | {'yes' if r['identical_at_star'] else 'no'} "
            f"| {_g(r['lr_1000_over_star'])} | {_n(r.get('excess_at_lr_1000'))} |"
        )
    L += [
        "",
        f"{len(tw['identical'])} of {tw['pairs']} sweep pairs are bit-identical (the clip never fired): "
        + ", ".join(f"`{n}`" for n in tw["identical"])
        + ".",
        "",
    ]
    # spikes
    sp = ph["spikes"]
    L += [
        "### Spikes, detrended",
        "",
        f"d_t = Muon - MuonClip on the same batch; e_t = d_t - the median of d over steps "
        f"t - {ROLL // 2} .. t + {ROLL // 2} (truncated at the ends). A Muon spike: e_t > "
        f"{sp['delta']:.4f} (the pilot's delta); a reverse one: e_t < -{sp['delta']:.4f}. "
        "Muon's share of the spikes with its Wilson 90% interval against 1/2 (call above: "
        "Muon spikes more; below: MuonClip does; the interval treats spikes as independent, "
        "so if anything it is too narrow). The largest "
        "one-step rises of each arm's own loss (step: rise) show where the batches, not the "
        "optimizer, make the jumps.",
        "",
        "| width | lr | steps | registered counts Muon / reverse | mean gap | detrended Muon / reverse | share 90% CI | call | largest rises Muon | largest rises MuonClip |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in sp["pairs"]:
        j = lambda js: ", ".join(f"{t}: {v:.2f}" for t, v in js)  # noqa: E731
        L.append(
            f"| {p['width']} | {_g(p['lr'])} | {p['steps']} | {p['raw_muon']} / {p['raw_clip']} "
            f"| {p['mean_gap']:+.3f} | {p['muon']} / {p['clip']} | [{_n(p['share_lo'], 2)}, {_n(p['share_hi'], 2)}] "
            f"| {p['side']} | {j(p['top_jumps_muon'])} | {j(p['top_jumps_clip'])} |"
        )
    # cure
    cu = ph["cure"]
    L += [
        "",
        "### The cure and the seed-to-seed spread at lr_1000",
        "",
        "Calls: the difference's interval below 0, MuonClip's loss is lower; the variance "
        "ratio's above 1, the clip narrows the seed-to-seed spread of the final val loss.",
        "",
        "| width | lr / lr* | MuonClip - Muon, 90% CI | call | negative | sd of the differences | val-loss sd Muon -> MuonClip | variance ratio Muon / MuonClip, 90% CI | call |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for w, v in cu["widths"].items():
        vr = v["var_ratio"]
        L.append(
            f"| {w} | {_g(v['lr_over_star'])} | {v['mean']:+.3f} [{v['lo']:+.3f}, {v['hi']:+.3f}] | {v['side']} "
            f"| {v['negative']} of {v['n']} | {v['sd_diff']:.3f} | {v['sd_muon']:.3f} -> {v['sd_muonclip']:.3f} "
            f"| {vr['ratio']:.2f} [{vr['lo']:.2f}, {vr['hi']:.2f}] | {v['spread_side']} |"
        )
    pl = cu["pooled"]
    if pl:
        neg = sum(v["negative"] for v in cu["widths"].values())
        L += [
            "",
            f"Pooled over widths (variance pooled within widths, df {pl['df']}): "
            f"{neg} of {pl['n']} differences negative, mean {pl['mean']:+.3f}, "
            f"90% CI [{pl['lo']:+.3f}, {pl['hi']:+.3f}], t = {pl['t']:.2f}.",
        ]
    # cap
    cp = ph["cap"]
    L += [
        "",
        "### The cap over every MuonClip run whose clip acted",
        "",
        f"The registered rule on the runs its text names (every healthy MuonClip run whose clip "
        f"acted, {cp['rule_text']['n']} runs, every seed and tau): **{cp['rule_text']['word']}** "
        f"({cp['rule_text']['why']}). Over every run whose clip acted, healthy or not, by lr / lr*: "
        + "; ".join(
            f"{k}x: {_n(v[0], 2)}-{_n(v[1], 2)} ({v[2]} run{'s' if v[2] > 1 else ''})"
            for k, v in sorted(cp["by_lr_over_star"].items(), key=lambda kv: float(kv[0]))
        )
        + f" (tolerance {cp['tolerance']:.3f}); held at lr / lr* = {', '.join(cp['held_at']) or 'none'}. "
        "One-update outgrowth: S_(t+1) / tau after a step t that clipped (median, max).",
        "",
        "| run | lr / lr* | healthy | stopped | q99 S / tau after the first clip | outgrowth median | outgrowth max |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in cp["runs"]:
        L.append(
            f"| `{x['name']}` | {_g(x['lr_over_star'])} | {'yes' if x['healthy'] else 'no'} | {x['stopped']} "
            f"| {_n(x['q99'], 2)} | {_n(x['outgrowth']['median'], 2)} | {_n(x['outgrowth']['max'], 2)} |"
        )
    # switch-off
    so = ph["switch_off"]
    L += [
        "",
        "### Switch-off needs S to fall by itself",
        "",
        f"The registered rule on its text's runs ({so['rule_text']['n']}): **{so['rule_text']['word']}** "
        f"({so['rule_text']['why']}). A run is testable when its unclipped twin's S (rolling "
        f"median of {ROLL} steps) crosses tau and stays below it from before the window on; "
        f"lr x wd x T: the weight-decay time constants to the end of the flat phase.",
        "",
        "| run | lr x wd x T | twin's peak step | twin's last step over tau | testable | clip rate in the window |",
        "|---|---|---|---|---|---|",
    ]
    for x in so["runs"]:
        L.append(
            f"| `{x['name']}` | {x['decay_constants']:.2f} | {x['peak_step']} | {x['last_over'] if x['last_over'] is not None else 'never over'} "
            f"| {'yes' if x['regime'] else 'no'} | {_n(x['rate'], 2)} |"
        )
    # App D
    hf = ph["head_fraction"]
    an = hf["analogue"]
    L += [
        "",
        "### App. D: the fraction of heads clipped tracks lr",
        "",
        f"The registered rule on its text's runs (tau = 100, healthy, every seed; {hf['rule_text']['n']} runs): "
        f"**{hf['rule_text']['word']}** ({hf['rule_text']['why']}). Seed 0's sweep, fraction of heads "
        "ever clipped at tau = 100 by lr / lr*:",
        "",
        "| lr / lr* | " + " | ".join(f"width {w}" for w in ph["twins"]["widths"]) + " |",
        "|---|" + "---|" * len(ph["twins"]["widths"]),
    ]
    for k, v in sorted(hf["by_lr_over_star"].items(), key=lambda kv: float(kv[0])):
        L.append(f"| {k} | " + " | ".join(_p(v.get(w)) for w in ph["twins"]["widths"]) + " |")
    L += [
        "",
        f"Analogue at lr* (the Fig. 12 runs, tau = {an['tau']:g}, width {an['width']}): "
        + ", ".join(_p(f) for f in an["fractions"])
        + f"; median {_p(an['median'])}, 90% order-statistic CI [{_p(an['lo'])}, {_p(an['hi'])}] "
        f"against the rule's {S.HEAD_FRACTION_LIMIT:.1%}: {an['side']}.",
        "",
    ]
    # App E
    ae, an_ = ph["appE_s"], ph["appE_norm"]
    L += [
        "### App. E at equal lr",
        "",
        "Muon (RMS-matched) and AdamW share an lr scale, so the natural comparison is at equal lr. "
        "A pair's call: log(AdamW / Muon) +- twice the largest seed-to-seed sd of the log measured in "
        f"a multi-seed Muon cell (peak S x{math.exp(ae['margin_log']):.2f}, norm product "
        f"x{math.exp(an_['margin_log']):.2f}). At the point estimates AdamW's peak S is the larger in "
        f"{ae['n_adamw_larger_point']} of {len(ae['pairs'])} pairs "
        f"({ae['range_adamw_larger_point'][0]:.1f}-{ae['range_adamw_larger_point'][1]:.1f}x Muon's). "
        "Calls: above, AdamW's is the larger (against K2's claim); below, Muon's."
        if ae["range_adamw_larger_point"]
        else "",
        "",
        "| width | lr | peak S AdamW / Muon | call | norm product AdamW / Muon | call |",
        "|---|---|---|---|---|---|",
    ]
    for p, q in zip(ae["pairs"], an_["pairs"]):
        L.append(
            f"| {p['width']} | {_g(p['lr'])} | {_g(p['ratio'])} | {p['side']} | {_g(q['ratio'])} | {q['side']} |"
        )
    lo, hi = ph["s_over_product"]
    L += [
        "",
        f"The spectral-norm product leaves out the RMSNorm gains, the inputs' norms and the RoPE "
        f"part: per probe of the completed Muon and AdamW sweep runs, the largest S over the "
        f"largest product ranges {lo:.2f}-{hi:.1f}, so the product is not a stand-in for S.",
        "",
    ]
    # width fit
    wf = ph["width_fit"]
    rg = wf["registered"]
    L += [
        "### Scale at a fixed lr / lr*",
        "",
        "The registered fit took one lr, "
        f"{_g(rg['lr'])}, which is "
        + ", ".join(f"{_g(v)}x lr* at width {w}" for w, v in rg["lr_over_star"].items())
        + f", so width and lr / lr* move together; that lr is {_g(rg['lr_over_k2'])}x K2's peak lr "
        f"({K2_LR:g}). At a fixed lr / lr*, over widths "
        f"{min(ph['twins']['widths'], key=int)}-{max(ph['twins']['widths'], key=int)} only "
        "(no extrapolation: three widths give an exponent interval this wide):",
        "",
        "| lr / lr* | lrs | settled S by width | exponent of width, 90% CI |",
        "|---|---|---|---|",
    ]
    for k, f in wf["fits"].items():
        L.append(
            f"| {k} | {', '.join(_g(x) for x in f['lrs'])} "
            f"| {', '.join(f'{w}: {y:.1f}' for w, y in zip(f['widths'], f['settled']))} "
            f"| {f['p']:.2f} [{_n(f['lo'], 2)}, {_n(f['hi'], 2)}] |"
        )
    L += [
        "",
        f"Settled means the window's log-linear trend moves S by at most {SETTLED:.0%}. Trends in "
        "the window (relative change of S across it): "
        + "; ".join(f"`{n}` {t:+.0%}" for n, t in wf["trends"].items())
        + "; the weight-decay runs: "
        + "; ".join(f"wd {wd}: {v['trend']:+.0%}" for wd, v in wf["wd_runs"].items())
        + ". Runs beyond the limit had not settled when their 'settled S' was taken.",
        "",
    ]
    return "\n".join(L)


def write(ph: dict[str, Any], out: pathlib.Path) -> None:
    """``posthoc.json``, and the section appended to (or replaced in) ``results.md``."""
    out = pathlib.Path(out)
    # insertion order kept: results.md's tables follow it
    (out / "posthoc.json").write_text(json.dumps(ph, indent=1, default=float) + "\n")
    md = out / "results.md"
    text = md.read_text() if md.is_file() else ""
    i = text.find(MARKER)
    head = text if i < 0 else text[:i]
    md.write_text(head.rstrip("\n") + "\n\n" + markdown(ph))


def load_logs(runs_dir: pathlib.Path, names: Sequence[str]) -> dict[str, A.Log]:
    logs = {}
    for n in names:
        with np.load(pathlib.Path(runs_dir) / n / "log.npz") as z:
            logs[n] = {k: z[k] for k in z.files}
    return logs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        prog="python -m paper_repro.kimi_k2.posthoc",
        description="The post-hoc (not pre-registered) re-analysis of v3's committed logs: "
        "rewrites results.md's post-hoc section and posthoc.json; trains nothing.",
    )
    p.add_argument(
        "--results", default=str(RESULTS), help="folder with summary.json and results.md"
    )
    p.add_argument("--runs", default=None, help="the run logs (default: RESULTS/logs)")
    args = p.parse_args(argv)
    out = pathlib.Path(args.results)
    summ = json.loads((out / "summary.json").read_text())
    logs = load_logs(pathlib.Path(args.runs) if args.runs else out / "logs", list(summ["runs"]))
    ph = analyse(summ, logs)
    write(ph, out)
    print(f"post-hoc section written to {out / 'results.md'}")
    return ph


if __name__ == "__main__":
    main()
