"""Pre-registration of the third reproduction: every size, grid, step count
and decision rule, fixed before its full run.

The second design derived tau from the unclipped peak, used tolerances that
were never calibrated and had no scale axis, so most of its negatives came
from the design (its code and results: git history, commit ``98163c4``).
This one follows Wortsman et al. 2023 ("Small-scale proxies for large-scale
Transformer training instabilities", arXiv 2309.14322, sec. 3): attention
logit growth is a property of width and learning rate, so it sweeps both,
and it sets tau as Kimi K2 does, in absolute terms.

## Design (full mode)

- **Models**: MLA, 2 layers, widths 64 / 128 / 256 (4x), q/k head dims 16
  (q_C, k_C) + 8 (RoPE), v 16, heads = width / 16 (4 / 8 / 16 per layer: 8 /
  16 / 32 heads), kv latent width / 2, no q latent, SwiGLU 3 x width, byte
  vocabulary: 0.14M / 0.49M / 1.84M parameters.
- **Data**: the fixed corpus of ``corpus_manifest.txt`` (hash checked at
  load); batch 8 x 64 tokens; the batches depend on the seed and step only,
  so every optimizer and lr of one seed sees the same batches (paired).
- **Sweep** (seed 0, per width): Muon (no clip), MuonClip (QK-Clip at
  tau = 100, K2's production value) and AdamW (betas 0.9, 0.95), wd 0.1, at
  lrs in half decades: Muon and MuonClip 1e-3 ... 1, AdamW 3.16e-4 ...
  0.316. 400 steps, WSD: warmup 20, constant to step 320, linear decay to 0
  over the last 20%.
- **The cure**: at each width's lr_1000 (below), Muon and MuonClip with
  seeds 1-4 besides the sweep's seed 0.
- **Fig. 12**: at the middle width and Muon's best lr there (lowest final
  validation loss of the sweep), Muon and MuonClip at tau = 30, seeds 0-5.
- **Weight-decay axis**: at the middle width and lr_fit (the largest grid lr
  at which no width's Muon run diverged), Muon with wd 0.05 and 0.2 (0.1 is
  in the sweep).
- **Measurements** (``runner.py``): S per layer and head on every training
  batch; S, loss and the spectral norms of q_C, k_C and q_R per head on a
  fixed probe set of 128 x 64 = 8,192 validation tokens every 100 steps and
  after the last, with the attention entropy per head; the final validation loss on 512 x 64 = 32,768 tokens.
  The logs are committed (``results/logs``).

## Rules

Every verdict is one of *reproduced*, *not reproduced*, *not tested at this
scale*, from the functions below. A run **diverged** when its loss became
non-finite, it was stopped (a 25-step mean loss above ln(256) + 1), or its
final validation loss is more than ``DIVERGED_MARGIN`` nats above the best
run of its width and optimizer family (:func:`diverged`); the other runs are
**healthy**. Tolerances marked *pilot* are computed by the functions below
from ``results/pilot.json``, committed with this file before the full run.

- **Fig. 2 left, explosion**: per width, lr_1000 = the lowest lr at which
  Muon's peak training-batch S reaches 1000. Reproduced if some width has
  one and lr_1000 does not rise with width (a width without one counts as
  infinite) (:func:`verdict_explosion`).
- **Fig. 2 left, spikes**: for each width and lr at which Muon's S reaches
  1000, the paired per-step loss difference Muon - MuonClip on the same
  batches; a Muon spike is a step where it exceeds delta (pilot: three times
  the 99th percentile of |difference| between two healthy runs that differ
  by a clip), or Muon diverged where MuonClip did not. Reproduced if there
  is such a pair and in most of them Muon has more spikes than MuonClip has
  the other way (:func:`verdict_spikes`).
- **MuonClip's cure, with an interval**: at each width's lr_1000, Muon and
  MuonClip (tau = 100) with seeds 0-4; the paired difference of min(final
  val loss, ln 256). Reproduced if its 90% t interval lies below 0 at every
  width that has an lr_1000 (:func:`verdict_cure`).
- **Stable lr range**: Wortsman's lr sensitivity, the mean over the grid of
  min(loss, ln 256) - the best loss of Muon and MuonClip at that width
  (diverged runs count ln 256). Reproduced if MuonClip's is lower than
  Muon's by more than a margin (pilot: twice the seed-to-seed standard
  deviation of the final validation loss) at every width
  (:func:`verdict_stable_range`).
- **Fig. 2 right, cap**: in each healthy MuonClip run whose clip acted, the
  99th percentile over steps after the first clip of the largest
  training-batch S / tau. Reproduced if that is within the cap tolerance
  (pilot: the 99th percentile of S's step-to-step ratio, a new batch and
  one update, in unclipped Muon at lr 0.1; one update's growth on fixed
  data is reported beside it) in every such run (:func:`verdict_cap`).
- **Fig. 2 right, switch-off**: the clip rate (share of steps with a head
  over tau) in the last quarter of the constant-lr phase. Reproduced if it
  is at most 5% in most healthy MuonClip runs whose clip acted
  (:func:`verdict_switch_off`).
- **App. D**: the fraction of heads ever clipped at tau = 100. Reproduced if
  its median over the healthy MuonClip runs whose clip acted is at most
  25.4% (twice K2's 12.7%) (:func:`verdict_head_fraction`). The fraction
  against tau, from the Muon runs' per-head peaks, is reported beside it.
- **Fig. 12**: the paired difference of final validation loss, MuonClip
  (tau = 30) - Muon, 6 seeds, two one-sided tests at 5% each (a 90% t
  interval). Reproduced if the interval lies within +-1% of Muon's mean
  validation loss; not reproduced if it lies outside; else not tested. Not
  tested either if the clip did not act in every seed
  (:func:`verdict_negligible`).
- **App. E, growth**: per width and optimizer, the least-squares slope of
  log(peak S) against log(lr / lr*) over the runs with lr >= lr* that did
  not stop early (lr* = the optimizer's best lr at that width). Reproduced
  if Muon's slope is larger than AdamW's at every width
  (:func:`verdict_muon_faster`).
- **App. E, mechanism** (weights, not updates): the same slope for
  log(max over heads of ||W_qC|| ||W_kC||) at its peak over the probes.
  Reproduced if Muon's is larger at every width
  (:func:`verdict_weight_growth`).
- **Scale** (a prediction, no verdict): settled S (the median over the last
  quarter of the constant phase of the largest training-batch S) at lr_fit
  against width, and against wd at the middle width, each with a power-law
  fit; the width fit extrapolated to K2's 7168 and labelled as an
  extrapolation.

## The pilot (``pilot.py``; ``results/pilot.json`` and its logs)

Run once, before this file was committed, on the 2-vCPU machine the full run
uses (Python 3.11.7, jax 0.10.2, nothing else running):

- bare compiled step, Muon / AdamW: 15.9 / 15.8 ms (width 64), 42.2 / 25.9
  ms (128), 164.8 / 124.7 ms (256); the run loop with its probes every 50
  steps and the final validation: 1.17x, 1.53x and 1.21x the bare Muon step
  (a rerun at width 128 gave 1.23x, of which about 0.1 is the probes and
  the validation: the full run probes every 100 steps instead);
- unclipped Muon at lr 0.1 reaches S = 149 / 523 / 1280 in 150 steps at
  widths 64 / 128 / 256; one update's growth of S on fixed data, 99th
  percentile 1.16 / 1.19 / 1.27; S's step-to-step ratio (a new batch and one
  update) 1.50 / 1.47 / 1.62: **cap tolerance 1.621**;
- width 64, lr 0.01, seeds 0-2: final val loss 1.900 / 1.944 / 1.907, sd
  0.0236: **lr-sensitivity margin 0.0472**; with a clip at tau = 15 the
  per-step |loss difference| has a 99th percentile of 0.0223: **spike delta
  0.0668**; the paired val difference has sd 0.0030, so 6 seeds give a 90%
  interval of about +-0.0025 against the Fig. 12 margin of about +-0.019.

## Budget

At most 88 runs of 400 steps: 3 widths x 21 sweep runs, at most 3 x 8 cure
runs, 11 Fig. 12 runs, 2 weight-decay runs. From the pilot's loop times:
about 57 minutes of training and 1.5 of compiling (one compiled step per
width and optimizer family, and one probe and one validation program per
width), inside the 100 minutes the issue allows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
PILOT = HERE / "results" / "pilot.json"

# ---------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------


def model(width: int, *, layers: int = 2, head: int = 16, rope: int = 8) -> dict[str, Any]:
    """The MLA model of one width: heads = width / head, kv latent width / 2."""
    return dict(
        attention="mla",
        n_layers=layers,
        dim=width,
        n_heads=width // head,
        q_lora_rank=None,
        kv_lora_rank=width // 2,
        qk_nope_head_dim=head,
        qk_rope_head_dim=rope,
        v_head_dim=head,
        mlp_hidden=3 * width,
    )


def half_decades(lo_exp2: int, hi_exp2: int) -> tuple[float, ...]:
    """10^(k/2) for k = lo_exp2 .. hi_exp2."""
    return tuple(float(10 ** (k / 2)) for k in range(lo_exp2, hi_exp2 + 1))


@dataclasses.dataclass(frozen=True)
class Settings:
    """One mode of the reproduction. Every field is pre-registered."""

    name: str
    widths: tuple[int, ...]
    model_kw: dict[str, Any]
    batch_size: int
    seq_len: int
    steps: int
    warmup_steps: int
    decay_fraction: float
    grid: dict[str, tuple[float, ...]]  # "muon" (also MuonClip) / "adamw" -> lrs
    weight_decay: float
    wd_axis: tuple[float, ...]  # extra Muon runs at the middle width and lr_fit
    tau: float  # the sweep's MuonClip (K2's production value)
    tau_fig12: float
    fig12_seeds: tuple[int, ...]
    cure_seeds: tuple[int, ...]  # Muon and MuonClip at each width's lr_1000
    probe_every: int
    probe_windows: int
    val_windows: int
    explosion: float = 1000.0  # Fig. 2 left's threshold (lowered only in the quick mode)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in ("batch_size", "seq_len", "steps", "probe_every", "probe_windows"):
            if getattr(self, f) <= 0:
                raise ValueError(f"Settings.{f} must be > 0, got {getattr(self, f)}")
        if self.val_windows % self.probe_windows:
            raise ValueError("Settings.val_windows must be a multiple of probe_windows")
        if not 0 < self.decay_fraction < 1:
            raise ValueError(
                f"Settings.decay_fraction must be in (0, 1), got {self.decay_fraction}"
            )
        if len(self.widths) < 3 or sorted(self.widths) != list(self.widths):
            raise ValueError(f"Settings.widths: at least 3, increasing; got {self.widths}")
        if len(self.fig12_seeds) < 2 or len(self.cure_seeds) < 2:
            raise ValueError("Settings.fig12_seeds and cure_seeds: at least 2 each")

    @property
    def fig12_width(self) -> int:
        return self.widths[len(self.widths) // 2]

    def model(self, width: int) -> dict[str, Any]:
        return {**model(width, **self.model_kw), **self.extra}


FULL = Settings(
    name="full",
    widths=(64, 128, 256),
    model_kw={},
    batch_size=8,
    seq_len=64,
    steps=400,
    warmup_steps=20,
    decay_fraction=0.2,
    grid={"muon": half_decades(-6, 0), "adamw": half_decades(-7, -1)},
    weight_decay=0.1,
    wd_axis=(0.05, 0.2),
    tau=100.0,
    tau_fig12=30.0,
    fig12_seeds=(0, 1, 2, 3, 4, 5),
    cure_seeds=(0, 1, 2, 3, 4),
    probe_every=100,  # 50 in the pilot; 100 keeps the probes under 10% of the step time
    probe_windows=128,
    val_windows=512,
)
QUICK = Settings(
    name="quick",
    widths=(32, 48, 64),
    model_kw=dict(head=16, rope=4),
    batch_size=4,
    seq_len=32,
    steps=40,
    warmup_steps=4,
    decay_fraction=0.2,
    grid={"muon": half_decades(-4, -1), "adamw": half_decades(-5, -3)},
    weight_decay=0.1,
    wd_axis=(0.3,),
    tau=10.0,
    tau_fig12=3.0,
    fig12_seeds=(0, 1, 2),
    cure_seeds=(0, 1),
    probe_every=10,
    probe_windows=16,
    val_windows=32,
    explosion=20.0,  # so that the quick mode exercises the lr_1000 branches
)
# For one accelerator (designed, not yet run): widths 256-1024 (4x), 4 layers,
# batch 32 x 256; bfloat16 compute, float32 parameters and optimizer state.
GPU = Settings(
    name="gpu",
    widths=(256, 512, 1024),
    model_kw=dict(layers=4, head=32, rope=16),
    batch_size=32,
    seq_len=256,
    steps=1000,
    warmup_steps=50,
    decay_fraction=0.2,
    grid={"muon": half_decades(-7, 0), "adamw": half_decades(-8, -1)},
    weight_decay=0.1,
    wd_axis=(0.05, 0.2),
    tau=100.0,
    tau_fig12=30.0,
    fig12_seeds=(0, 1, 2, 3, 4, 5),
    cure_seeds=(0, 1, 2, 3, 4),
    probe_every=50,
    probe_windows=128,
    val_windows=1024,
    extra=dict(compute_dtype="bfloat16"),
)
MODES = {"full": FULL, "quick": QUICK, "gpu": GPU}

# ---------------------------------------------------------------------------
# Constants of the rules
# ---------------------------------------------------------------------------

LN_VOCAB = math.log(256)  # the loss of a uniform guess over bytes (Wortsman's l_0)
STOP_LOSS = LN_VOCAB + 1.0  # a run whose 25-step mean loss passes this is stopped
DIVERGED_MARGIN = 0.5  # nats above the best run of the width and family
K2_LOGIT_EXPLOSION = 1000.0  # Fig. 2 left: max logits "rapidly exceed 1000"
K2_HEAD_FRACTION = 0.127  # App. D: 12.7% of heads triggered the clip
HEAD_FRACTION_LIMIT = 2 * K2_HEAD_FRACTION
OFF_RATE = 0.05  # switch-off: at most 5% of steps clip in the window
EQUIVALENCE_MARGIN = 0.01  # Fig. 12: "negligible" = within +-1% of Muon's val loss

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
NOT_TESTED = "not tested at this scale"

# ---------------------------------------------------------------------------
# Tolerances from the pilot
# ---------------------------------------------------------------------------


def load_pilot(path: pathlib.Path = PILOT) -> dict[str, Any]:
    return json.loads(pathlib.Path(path).read_text())


def cap_tolerance(pilot: dict[str, Any]) -> float:
    """The largest S / tau one step after a clip that the cap allows: the
    99th percentile, over heads and constant-lr steps of the pilot's
    unclipped Muon runs at lr 0.1, of S(batch t+1, W_{t+1}) / S(batch t, W_t):
    a new batch and one update, the two things that move S after a clip (the
    largest over the widths)."""
    return max(w["step_ratio_q99"] for w in pilot["widths"].values())


def spike_delta(pilot: dict[str, Any]) -> float:
    """A loss spike: Muon - MuonClip above 3 x the 99th percentile of
    |difference| between the pilot's two healthy trajectories that differ by
    a clip."""
    return 3.0 * pilot["paired_abs_diff_q99"]


def sensitivity_margin(pilot: dict[str, Any]) -> float:
    """Twice the seed-to-seed standard deviation of the final val loss."""
    return 2.0 * pilot["seed_val_sd"]


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------

# One-sided 95% Student t quantiles t_{0.95, df}, df = 1..10 (the two one-sided
# tests at 5% each: a 90% two-sided interval).
T95 = (
    6.313751515,
    2.919985580,
    2.353363435,
    2.131846786,
    2.015048373,
    1.943180281,
    1.894578605,
    1.859548038,
    1.833112933,
    1.812461123,
)


def paired_ci90(diffs: Sequence[float]) -> dict[str, float]:
    """Mean of paired differences and its two-sided 90% t interval
    (df = n - 1); NaNs for n < 2 or a non-finite difference."""
    d = [float(x) for x in diffs]
    n = len(d)
    if n < 2 or not all(math.isfinite(x) for x in d):
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": n}
    if n - 1 > len(T95):
        raise ValueError(f"paired_ci90: at most {len(T95) + 1} seeds, got {n}")
    m = sum(d) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1))
    h = T95[n - 2] * sd / math.sqrt(n)
    return {"mean": m, "lo": m - h, "hi": m + h, "n": n}


def slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of y on x; NaN with fewer than 2 distinct x."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.ptp(x) == 0:
        return math.nan
    return float(np.polyfit(x, y, 1)[0])


def power_fit(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """y = c x^p by least squares in log-log: ``{"p", "c"}``."""
    p, logc = np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)
    return {"p": float(p), "c": float(math.exp(logc))}


def sensitivity(losses: Sequence[float], best: float) -> float:
    """Wortsman et al. 2023's lr sensitivity: the mean over the grid of
    min(loss, ln 256) - best; a NaN loss (diverged) counts as ln 256."""
    capped = [LN_VOCAB if not math.isfinite(x) else min(x, LN_VOCAB) for x in losses]
    return float(np.mean(capped) - best)


def diverged(val: float, best: float) -> bool:
    """Non-finite (stopped), or more than DIVERGED_MARGIN above ``best``."""
    return not math.isfinite(val) or val > best + DIVERGED_MARGIN


# ---------------------------------------------------------------------------
# Verdicts: each returns (word, reason)
# ---------------------------------------------------------------------------


def _majority(flags: Sequence[bool]) -> bool:
    return sum(bool(f) for f in flags) * 2 > len(flags)


def _median(x: Sequence[float]) -> float:
    return float(np.median(np.asarray(x, float)))


def verdict_explosion(
    lr_1000: dict[int, float | None], threshold: float = K2_LOGIT_EXPLOSION
) -> tuple[str, str]:
    """``lr_1000``: width -> lowest lr at which Muon's peak S >= ``threshold``
    (1000 in the full mode; None: none)."""
    ws = sorted(lr_1000)
    vals = [math.inf if lr_1000[w] is None else float(lr_1000[w]) for w in ws]
    txt = ", ".join(f"{w}: {'none' if math.isinf(v) else f'{v:.3g}'}" for w, v in zip(ws, vals))
    if all(math.isinf(v) for v in vals):
        return NOT_REPRODUCED, f"no Muon run reaches S = {threshold:g} (lr_1000 by width {txt})"
    rises = any(b > a for a, b in zip(vals, vals[1:]))
    if rises:
        return NOT_REPRODUCED, f"lr_1000 rises with width ({txt})"
    return REPRODUCED, f"S passes {threshold:g} and lr_1000 does not rise with width ({txt})"


def verdict_spikes(pairs: Sequence[dict[str, int]]) -> tuple[str, str]:
    """``pairs``: one per exploding (width, lr): ``{"muon": n, "clip": n}``
    spike counts (Muon above MuonClip by delta, and the reverse)."""
    if not pairs:
        return NOT_TESTED, "no Muon run reaches S = 1000, so no pair to compare"
    more = [p["muon"] > p["clip"] for p in pairs]
    txt = f"{sum(more)} of {len(pairs)} exploding pairs with more Muon spikes than MuonClip ones"
    return (REPRODUCED if _majority(more) else NOT_REPRODUCED), txt


def verdict_stable_range(sens: dict[int, dict[str, float]], margin: float) -> tuple[str, str]:
    """``sens``: width -> {"muon": s, "muonclip": s} lr sensitivities."""
    ok = {w: v["muonclip"] < v["muon"] - margin for w, v in sens.items()}
    txt = "; ".join(
        f"{w}: Muon {v['muon']:.3f}, MuonClip {v['muonclip']:.3f}" for w, v in sorted(sens.items())
    )
    word = REPRODUCED if all(ok.values()) else NOT_REPRODUCED
    return word, f"{txt} (margin {margin:.3f})"


def verdict_cure(diffs: dict[int, Sequence[float]]) -> tuple[str, str]:
    """``diffs``: width -> paired differences, per seed, of min(final val
    loss, ln 256) (a diverged run counts ln 256), MuonClip - Muon, at the
    width's lr_1000. Reproduced if the 90% interval lies below 0 at every
    such width; not reproduced if it lies above 0 or contains 0 at one."""
    if not diffs:
        return NOT_TESTED, "no Muon run reaches S = 1000, so there is no lr_1000"
    cis = {w: paired_ci90(d) for w, d in sorted(diffs.items())}
    txt = "; ".join(
        f"{w}: {c['mean']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]" for w, c in cis.items()
    )
    ok = all(c["hi"] < 0 for c in cis.values())
    return (REPRODUCED if ok else NOT_REPRODUCED), f"MuonClip - Muon, 90% CI: {txt}"


def verdict_cap(q99_ratios: Sequence[float], tolerance: float) -> tuple[str, str]:
    """``q99_ratios``: per healthy MuonClip run whose clip acted."""
    if not q99_ratios:
        return NOT_TESTED, "the clip did not act in any healthy MuonClip run"
    hi = max(q99_ratios)
    txt = f"99th-percentile S / tau after the first clip {min(q99_ratios):.3f}-{hi:.3f}, tolerance {tolerance:.3f}"
    return (REPRODUCED if hi <= tolerance else NOT_REPRODUCED), txt


def verdict_switch_off(rates: Sequence[float]) -> tuple[str, str]:
    """``rates``: clip rate in the last quarter of the flat phase, per healthy
    MuonClip run whose clip acted."""
    if not rates:
        return NOT_TESTED, "the clip did not act in any healthy MuonClip run"
    off = [r <= OFF_RATE for r in rates]
    txt = f"{sum(off)} of {len(rates)} runs clip on <= {OFF_RATE:.0%} of the window's steps (rates {', '.join(f'{r:.2f}' for r in rates)})"
    return (REPRODUCED if _majority(off) else NOT_REPRODUCED), txt


def verdict_head_fraction(fractions: Sequence[float]) -> tuple[str, str]:
    if not fractions:
        return NOT_TESTED, "the clip did not act in any healthy MuonClip run"
    med = _median(fractions)
    txt = f"median fraction of heads ever clipped {med:.1%} (runs: {', '.join(f'{f:.0%}' for f in fractions)})"
    return (REPRODUCED if med <= HEAD_FRACTION_LIMIT else NOT_REPRODUCED), txt


def verdict_negligible(
    diffs: Sequence[float], base: float, clip_acted: Sequence[bool]
) -> tuple[str, str]:
    """Two one-sided tests: the 90% interval of the paired differences
    within +-EQUIVALENCE_MARGIN x ``base``."""
    if not all(clip_acted):
        return NOT_TESTED, f"the clip acted in {sum(clip_acted)} of {len(clip_acted)} seeds"
    ci = paired_ci90(diffs)
    m = EQUIVALENCE_MARGIN * base
    txt = (
        f"difference {ci['mean']:+.4f}, 90% CI [{ci['lo']:+.4f}, {ci['hi']:+.4f}], margin +-{m:.4f}"
    )
    if -m < ci["lo"] and ci["hi"] < m:
        return REPRODUCED, txt
    if ci["lo"] >= m or ci["hi"] <= -m:
        return NOT_REPRODUCED, txt
    return NOT_TESTED, txt + " (inconclusive)"


def _compare_slopes(slopes: dict[int, dict[str, float]], what: str) -> tuple[str, str]:
    txt = "; ".join(
        f"{w}: Muon {v['muon']:.2f}, AdamW {v['adamw']:.2f}" for w, v in sorted(slopes.items())
    )
    if any(not math.isfinite(v) for s in slopes.values() for v in s.values()):
        return NOT_TESTED, f"a slope of {what} could not be fitted ({txt})"
    ok = all(v["muon"] > v["adamw"] for v in slopes.values())
    return (REPRODUCED if ok else NOT_REPRODUCED), f"slopes of {what}: {txt}"


def verdict_muon_faster(slopes: dict[int, dict[str, float]]) -> tuple[str, str]:
    return _compare_slopes(slopes, "log peak S vs log(lr / lr*)")


def verdict_weight_growth(slopes: dict[int, dict[str, float]]) -> tuple[str, str]:
    return _compare_slopes(slopes, "log max over heads of sigma(W_qC) sigma(W_kC) vs log(lr / lr*)")


# ---------------------------------------------------------------------------
# v4, part B: the near-lr* map. Pre-registered in ``prereg_v4.md`` before its
# pilot; data only, not run by this package yet.
# ---------------------------------------------------------------------------

V4_LR_STAR = {64: 0.01, 128: 0.01, 256: 10**-2.5}  # v3's sweep: Muon's best lr per width (seed 0)
V4_LR_STAR_ADAMW = {64: 0.01, 128: 10**-2.5, 256: 0.001}  # v3's sweep: AdamW's best lr
V4_LR_MULTS = tuple(float(10 ** (k / 4)) for k in range(4))  # 1, 1.78, 3.16, 5.62 x lr*
V4_TAUS = (math.inf, 100.0, 30.0, 15.0)  # inf: the unclipped twin
V4_WEIGHT_DECAY = 0.1
V4_HIGH_WEIGHT_DECAY = 0.2  # the Muon arm with more weight decay (settled S ~ wd^-2.1 in v3)
# AdamW + QK-Clip: a tau that binds for AdamW at lr* (its S is 1.2-6.5x Muon's at equal lr)
V4_ADAMW_CLIP_TAU = 30.0


@dataclasses.dataclass(frozen=True)
class V4Arm:
    """One arm of part B: an optimizer family (the compiled step it shares),
    a tau (None: no clip), a weight decay, and whether QK-Norm is on."""

    name: str
    family: str  # "muon" or "adamw"
    tau: float | None = None
    weight_decay: float = V4_WEIGHT_DECAY
    qk_norm: bool = False

    def __post_init__(self) -> None:
        if self.family not in ("muon", "adamw"):
            raise ValueError(f"V4Arm.family must be muon or adamw, got {self.family!r}")
        if self.tau is not None and not self.tau > 0:
            raise ValueError(f"V4Arm.tau must be > 0 or None, got {self.tau}")


V4_ARMS = (
    V4Arm("muon", "muon"),
    V4Arm("muonclip_tau100", "muon", tau=100.0),
    V4Arm("muonclip_tau30", "muon", tau=30.0),
    V4Arm("muonclip_tau15", "muon", tau=15.0),
    V4Arm("muon_wd0.2", "muon", weight_decay=V4_HIGH_WEIGHT_DECAY),
    V4Arm("qknorm", "muon", qk_norm=True),  # needs the library's QK-Norm option (not yet there)
    V4Arm("adamw", "adamw"),
    V4Arm("adamw_clip_tau30", "adamw", tau=V4_ADAMW_CLIP_TAU),
)


@dataclasses.dataclass(frozen=True)
class V4Cell:
    """Every arm at one width, one lr multiple of lr*, each seed (the same
    batches across the arms of one seed)."""

    width: int
    lr_mult: float
    seeds: tuple[int, ...]
    steps: int
    warmup_steps: int = 20
    decay_fraction: float = 0.2
    arms: tuple[V4Arm, ...] = V4_ARMS

    def __post_init__(self) -> None:
        if len(self.seeds) < 3:
            raise ValueError(f"V4Cell.seeds: at least 3, got {self.seeds}")
        if self.width not in V4_LR_STAR:
            raise ValueError(f"V4Cell.width: one of {sorted(V4_LR_STAR)}, got {self.width}")

    def lr(self, arm: V4Arm) -> float:
        """lr_mult x the arm family's best lr at this width (v3's sweep)."""
        star = V4_LR_STAR_ADAMW if arm.family == "adamw" else V4_LR_STAR
        return self.lr_mult * star[self.width]

    def flat_steps(self) -> int:
        return self.steps - self.warmup_steps - round(self.steps * self.decay_fraction)

    def decay_constants(self, arm: V4Arm) -> float:
        """lr x wd x the flat phase's steps: weight-decay time constants."""
        return self.lr(arm) * arm.weight_decay * self.flat_steps()


V4_SEEDS = (0, 1, 2)
V4_STEPS = 1500
# The worst-case plan (every clipped run launched). Extensions, in this order, while the
# pilot's step times keep the worst case within the budget: width 128 at 5.62x lr*, then
# at 1.78x; then width 256 at 1x and 3.16x lr*.
V4_PLAN = tuple(V4Cell(64, m, V4_SEEDS, V4_STEPS) for m in V4_LR_MULTS) + tuple(
    V4Cell(128, m, V4_SEEDS, V4_STEPS) for m in (V4_LR_MULTS[0], V4_LR_MULTS[2])
)
V4_EXTENSIONS = (
    V4Cell(128, V4_LR_MULTS[3], V4_SEEDS, V4_STEPS),
    V4Cell(128, V4_LR_MULTS[1], V4_SEEDS, V4_STEPS),
    V4Cell(256, V4_LR_MULTS[0], V4_SEEDS, V4_STEPS),
    V4Cell(256, V4_LR_MULTS[2], V4_SEEDS, V4_STEPS),
)
# The step-time model: v3's run loop, ms per step (the median over the full run's runs of
# wall_s / steps_run in results/logs/*/status.json: 2 vCPUs, quiet, jax 0.10.2; probes every
# 100 steps and the final validation included). The pilot re-measures every arm.
V4_STEP_MS = {
    64: {"muon": 18.18, "adamw": 16.45},
    128: {"muon": 38.70, "adamw": 32.60},
    256: {"muon": 145.91, "adamw": 79.20},
}
V4_COMPILE_MIN = 2.0  # v3: 149 compiles in 38 s; v4 adds the QK-Norm step per width
V4_BUDGET_MIN = 100.0


def v4_minutes(cells: Sequence[V4Cell], step_ms: dict[int, dict[str, float]] = V4_STEP_MS) -> float:
    """The plan's worst-case wall time in minutes by the step-time model:
    every (cell, arm, seed) run, clipped runs included, plus the compiles."""
    ms = sum(len(c.seeds) * c.steps * step_ms[c.width][a.family] for c in cells for a in c.arms)
    return ms / 60_000 + V4_COMPILE_MIN
