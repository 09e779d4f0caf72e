"""Pre-registration: every size, grid, step count and decision rule of the
second reproduction, fixed before its full run.

This file was committed on its own, before any pipeline code and before any
run of this design. The analysis applies the functions below to the run logs
mechanically; a verdict in ``results.md`` is the return value of one of them.

## Design (full mode)

- **Model**: MLA, 4 layers x 8 heads = **32 heads** (one head = 3.1%), width
  64, q/k head dims 8 (no RoPE, q_C/k_C) + 8 (RoPE), v 8, kv latent 32, no q
  latent, SwiGLU 192, byte vocabulary 256: 0.26M parameters.
- **Data**: the fixed file list ``corpus_manifest.txt`` (Python stdlib
  sources byte-identical in CPython 3.11.7, 3.12.1 and 3.13.0), its content
  hash checked at load (``corpus.py``). Batch 8 x 64 tokens.
- **Pre-sweep** (per optimizer, seed 0, 300 steps: 20 warmup, then constant
  lr): Muon lr in 1e-3 ... 3e-1, AdamW 3e-4 ... 1e-1 (half decades). lr* = the
  lowest final validation loss among runs that did not diverge
  (:func:`best_lr`). When lr* is at an end of the grid, the grid is extended
  by one half decade on that side (at most :data:`MAX_EXTENSIONS` times);
  still at the end: every verdict that rests on lr* is "not tested at this
  scale".
- **Main runs** (3 seeds each), WSD schedule: warmup 20, a constant-lr flat
  phase of :func:`flat_steps` steps (lr x wd x flat >= 2 at 1x lr*, i.e. two
  weight-decay time constants; clamped to [600, 3000]), then linear decay to 0
  over 35% of the run (K2: 5.5T of 15.5T tokens).
  - Muon (monitor) and MuonClip at 1x and 3x Muon's lr*, wd 0.1
    (12 runs). tau per lr from the Muon runs' peak probe S (:func:`choose_tau`).
  - MuonClip at 1x lr* with wd 0.3, same tau and length (3 runs): the
    weight-decay hypothesis (:func:`verdict_wd_hypothesis`).
  - AdamW (monitor) at 1x its own lr*, same length (3 runs): App. E.
  18 main runs in all.
- **Measurements**: S on a fixed probe batch (8 windows spread evenly across
  the validation split) at steps t and t + 1 for every fifth t; per-head spectral norms of q_C, k_C
  and q_R every 50 steps; the stable rank ||U||_F^2 / ||U||_2^2 of each
  optimizer's update U (weight decay removed) of the attention matrices every
  50 steps (monitor runs only); validation loss on 32 windows spread evenly
  across the whole validation split, every 250 steps and at the end.

## Amendment before the full run (2026-12-02)

The cap verdict (:func:`verdict_cap`) first used the largest S on the fixed
*probe* batch after the first clip. The clip acts on each step's *training*
batch, so a probe batch's S above tau says as much about the difference
between the two batches as about the cap. The rule now uses the largest
training-batch S / tau after the first clip (the number K2's Fig. 2 right
plots), with the same 1.25 tolerance; the probe ratio and one update's
growth of S on the probe stay in ``results.md`` as descriptions. No run of
this design had been made when this was changed.

## Budget (full mode, 2 CPU cores)

Measured on this machine under load (load average 8-10 on 2 cores, shared
with other jobs; 2026-11-30): one train step of this model at batch 8 x 64
takes 0.063-0.065 s, and the compile 12-13 s. The same measurement gave
0.35-0.38 s/step for v1's 4 x 128 MLA at batch 8 x 128, which v1's full run
measured at ~0.24 s/step on its machine: a load factor of ~1.5. Estimate on a
quiet machine: ~0.045 s/step, +15% for the probe, norm and rank
measurements: **0.052 s/step**; compile ~9 s per distinct run config.

- pre-sweep: 12 runs x 300 = 3,600 steps (+ up to 4 extensions x 300);
- main: 18 runs x (20 + flat + decay) steps. At an lr* of 1e-2: flat =
  2,000, total = ceil(2,020 / 0.65) = 3,108: 55,944 steps. Worst case (flat
  clamped at 3,000, lr* <= 6.7e-3): 4,647 steps per run, 83,646 steps.
- expected: (3,600 + 55,944) x 0.052 s + 30 x 9 s = 56 min; worst case
  (4,800 + 83,646) x 0.052 s + 34 x 9 s = 82 min. Both within the 90-minute
  target; the estimate rests on a loaded-machine timing scaled by ~1.5, so
  the first full run reports its measured wall time in ``results.md``.
- a second timing, after the runner was written (load average 3.4-4.3): 200
  steps of this model through ``runner.run`` with every measurement took
  7.1-7.7 s (0.036-0.039 s/step), without the measurements 6.8-9.3 s; the
  measurements' cost is within that noise. (Budget note only; no rule
  changed.)

## GPU configuration (not run: no accelerator was lent to this task)

:data:`GPU`: 23.1M parameters, MLA, 8 layers x 8 heads = 64 heads, bfloat16
compute with float32 parameters and optimizer state, batch 32 x 512, the same
corpus and rules. Sizing, on ASSUMED speeds (nothing was timed on a GPU):
~20 ms per step (6 x 23M x 16k tokens = 2.3 TFLOP at ~30% of an H200's bf16
peak) and ~20 s per compile. Pre-sweep 6 runs x 150 = 900 steps; main 18 runs
x ceil(550 / 0.65) = 847 steps = 15,246; (900 + 15,246) x 20 ms + 12 compiles x
20 s = 9.4 min, a little over the ~8 minutes aimed at. The flat phase is
clamped at 500 steps, so lr x wd x flat >= 2 needs lr* >= 0.04: at a 25M
model's usual lr* (~3e-3) the switch-off verdict will be "not tested at this scale".
One vmapped program per pre-sweep (lr as a traced input; see the README)
would cut the compiles.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

# ---------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------

MODEL_FULL: dict[str, Any] = dict(
    attention="mla",
    n_layers=4,
    dim=64,
    n_heads=8,
    q_lora_rank=None,
    kv_lora_rank=32,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    mlp_hidden=192,
)
MODEL_QUICK: dict[str, Any] = dict(
    attention="mla",
    n_layers=2,
    dim=32,
    n_heads=4,
    q_lora_rank=None,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    mlp_hidden=64,
)
MODEL_GPU: dict[str, Any] = dict(
    attention="mla",
    n_layers=8,
    dim=512,
    n_heads=8,
    q_lora_rank=256,
    kv_lora_rank=128,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    mlp_hidden=1536,
    kernel="blockwise",
    block_size=128,
    compute_dtype="bfloat16",
)

HALF_DECADE = math.sqrt(10.0)
MAX_EXTENSIONS = 2  # grid extensions per optimizer when lr* is at an end


@dataclasses.dataclass(frozen=True)
class Settings:
    """One mode of the reproduction. Every field is pre-registered."""

    name: str
    model: dict[str, Any]
    batch_size: int
    seq_len: int
    warmup_steps: int
    sweep_steps: int  # pre-sweep length (constant lr after warmup)
    sweep_grid: dict[str, tuple[float, ...]]  # "muon" / "adamw" -> lrs
    lr_multipliers: tuple[float, ...]  # main runs at these multiples of lr*
    weight_decay: float
    weight_decay_large: float  # the wd-hypothesis runs (1x lr*)
    wd_time: float  # required lr x wd x flat steps at 1x lr*
    flat_min: int
    flat_max: int
    decay_fraction: float  # of the whole run
    seeds: tuple[int, ...]
    probe_every: int
    probe_windows: int
    norms_every: int
    val_every: int
    val_windows: int
    tau_fraction: float = 0.5  # tau = tau_fraction x min over seeds of Muon's peak probe S
    equivalence_margin: float = (
        0.01  # "negligible": |paired diff| CI within +-1% of Muon's val loss
    )
    spike_window: int = 20
    spike_factor: float = 1.5
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in (
            "batch_size",
            "seq_len",
            "warmup_steps",
            "sweep_steps",
            "flat_min",
            "flat_max",
            "probe_every",
            "probe_windows",
            "norms_every",
            "val_every",
            "val_windows",
        ):
            if getattr(self, f) <= 0:
                raise ValueError(f"Settings.{f} must be > 0, got {getattr(self, f)}")
        if self.flat_min > self.flat_max:
            raise ValueError(f"Settings.flat_min ({self.flat_min}) > flat_max ({self.flat_max})")
        if not 0 < self.decay_fraction < 1:
            raise ValueError(
                f"Settings.decay_fraction must be in (0, 1), got {self.decay_fraction}"
            )
        if not 0 < self.tau_fraction < 1:
            raise ValueError(f"Settings.tau_fraction must be in (0, 1), got {self.tau_fraction}")
        if sorted(self.sweep_grid) != ["adamw", "muon"]:
            raise ValueError(
                f"Settings.sweep_grid needs keys 'muon' and 'adamw', got {sorted(self.sweep_grid)}"
            )
        for k, g in self.sweep_grid.items():
            if len(g) < 3 or list(g) != sorted(g):
                raise ValueError(f"Settings.sweep_grid[{k!r}] must be >= 3 increasing lrs, got {g}")
        if 1.0 not in self.lr_multipliers:
            raise ValueError(f"Settings.lr_multipliers must contain 1.0, got {self.lr_multipliers}")
        if self.weight_decay_large <= self.weight_decay:
            raise ValueError("Settings.weight_decay_large must exceed weight_decay")
        if len(self.seeds) < 2:
            raise ValueError(f"Settings.seeds needs >= 2 seeds for a paired CI, got {self.seeds}")


FULL = Settings(
    name="full",
    model=MODEL_FULL,
    batch_size=8,
    seq_len=64,
    warmup_steps=20,
    sweep_steps=300,
    sweep_grid={
        "muon": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
        "adamw": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    },
    lr_multipliers=(1.0, 3.0),
    weight_decay=0.1,
    weight_decay_large=0.3,
    wd_time=2.0,
    flat_min=600,
    flat_max=3000,
    decay_fraction=0.35,
    seeds=(0, 1, 2),
    probe_every=5,
    probe_windows=8,
    norms_every=50,
    val_every=250,
    val_windows=32,
)

# The same pipeline at test size: every stage and every rule runs; the
# numbers mean nothing (8 heads, 2 seeds, a few dozen steps).
QUICK = Settings(
    name="quick",
    model=MODEL_QUICK,
    batch_size=4,
    seq_len=32,
    warmup_steps=4,
    sweep_steps=16,
    sweep_grid={"muon": (3e-3, 3e-2, 3e-1), "adamw": (1e-3, 1e-2, 1e-1)},
    lr_multipliers=(1.0, 3.0),
    weight_decay=0.1,
    weight_decay_large=0.3,
    wd_time=2.0,
    flat_min=20,
    flat_max=20,
    decay_fraction=0.35,
    seeds=(0, 1),
    probe_every=2,
    probe_windows=4,
    norms_every=10,
    val_every=20,
    val_windows=4,
    spike_window=8,
)

# For one H200, ~8-10 minutes on assumed speeds (not run here). bfloat16 matmuls, float32 master
# weights and optimizer state (RunConfig's param_dtype stays float32).
GPU = Settings(
    name="gpu",
    model=MODEL_GPU,
    batch_size=32,
    seq_len=512,
    warmup_steps=50,
    sweep_steps=150,
    sweep_grid={"muon": (1e-3, 3e-3, 1e-2), "adamw": (3e-4, 1e-3, 3e-3)},
    lr_multipliers=(1.0, 3.0),
    weight_decay=0.1,
    weight_decay_large=0.3,
    wd_time=2.0,
    flat_min=500,
    flat_max=500,
    decay_fraction=0.35,
    seeds=(0, 1, 2),
    probe_every=10,
    probe_windows=16,
    norms_every=100,
    val_every=250,
    val_windows=64,
)

MODES = {"full": FULL, "quick": QUICK, "gpu": GPU}

# ---------------------------------------------------------------------------
# Rules that choose (applied in this order by the pipeline)
# ---------------------------------------------------------------------------

DIVERGED_REGRESSION = 0.5  # nats: final 20-step mean above the run's best 20-step mean
DIVERGED_MIN_LEARNING = 0.5  # nats: final 20-step mean must be this far below the first 10 steps'


def diverged(losses: Sequence[float], window: int = 20) -> bool:
    """A run diverged when its loss went non-finite, or its last ``window``-step
    mean is (a) at least 0.5 nats above its lowest ``window``-step mean (it
    blew up and did not recover), or (b) less than 0.5 nats below the mean of
    its first 10 steps (it never learned)."""
    x = [float(v) for v in losses]
    if not x or not all(math.isfinite(v) for v in x):
        return True
    w = max(1, min(window, len(x)))
    means = [sum(x[i : i + w]) / w for i in range(len(x) - w + 1)]
    first = sum(x[:10]) / len(x[:10])
    return (
        means[-1] >= min(means) + DIVERGED_REGRESSION or means[-1] > first - DIVERGED_MIN_LEARNING
    )


def best_lr(
    lrs: Sequence[float], val_losses: Sequence[float], diverged_flags: Sequence[bool]
) -> dict[str, Any]:
    """lr* = the lr with the lowest final validation loss among runs that did
    not diverge. ``edge``: "low" / "high" when lr* is the smallest / largest
    lr of the grid (the optimum is not bracketed on that side), else None.
    ``lr`` is None when every run diverged."""
    order = sorted(range(len(lrs)), key=lambda i: lrs[i])
    ok = [i for i in order if not diverged_flags[i] and math.isfinite(val_losses[i])]
    if not ok:
        return {"lr": None, "edge": "low", "why": "every pre-sweep run diverged"}
    i = min(ok, key=lambda j: val_losses[j])
    edge = "low" if i == order[0] else "high" if i == order[-1] else None
    return {
        "lr": float(lrs[i]),
        "edge": edge,
        "why": "lowest final val loss among the runs that did not diverge",
    }


def extension(lrs: Sequence[float], edge: str | None) -> float | None:
    """The next lr to add when lr* is at an end of the grid: one half decade
    beyond it."""
    if edge == "high":
        return float(max(lrs) * HALF_DECADE)
    if edge == "low":
        return float(min(lrs) / HALF_DECADE)
    return None


def flat_steps(lr: float, weight_decay: float, s: Settings) -> int:
    """Constant-lr steps so that lr x wd x flat >= ``s.wd_time`` at 1x lr*,
    clamped to [flat_min, flat_max]."""
    need = math.ceil(s.wd_time / (lr * weight_decay) - 1e-9)
    return int(min(max(need, s.flat_min), s.flat_max))


def schedule(lr_1x: float, s: Settings) -> dict[str, int]:
    """Length of every main run (one length for all, set by Muon's lr* and
    the base wd): warmup, flat, decay (``decay_fraction`` of the run), total,
    and ``decay_start``, the first step of the decay."""
    flat = flat_steps(lr_1x, s.weight_decay, s)
    body = s.warmup_steps + flat
    total = math.ceil(body / (1 - s.decay_fraction))
    return {
        "warmup": s.warmup_steps,
        "flat": flat,
        "decay": total - body,
        "total": total,
        "decay_start": body,
    }


def wd_time(lr: float, weight_decay: float, flat: int) -> float:
    """lr x wd x flat: the flat phase in weight-decay time constants."""
    return lr * weight_decay * flat


def choose_tau(unclipped_peaks: Sequence[float], s: Settings) -> float:
    """tau for the MuonClip runs at one lr: ``tau_fraction`` x the smallest
    (over seeds) peak probe S of the unclipped Muon runs at that lr, rounded
    down to a multiple of 0.25 (exact in float32), at least 0.25. So the
    clip acts in every seed, and caps S at half of where it would go."""
    peak = min(float(p) for p in unclipped_peaks)
    if not math.isfinite(peak):
        raise ValueError(f"choose_tau: a non-finite peak S in {list(unclipped_peaks)}")
    return max(0.25, math.floor(s.tau_fraction * peak * 4) / 4)


def is_spike(loss: float, previous: Sequence[float], factor: float = 1.5) -> bool:
    """A loss spike: loss > ``factor`` x the median of the previous window."""
    p = sorted(previous)
    n = len(p)
    med = p[n // 2] if n % 2 else 0.5 * (p[n // 2 - 1] + p[n // 2])
    return loss > factor * med


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------

# Two-sided 95% Student t quantiles t_{0.975, df}, df = 1..10.
T975 = (
    12.706204736,
    4.302652730,
    3.182446305,
    2.776445105,
    2.570581836,
    2.446911851,
    2.364624252,
    2.306004135,
    2.262157163,
    2.228138852,
)


def paired_ci(diffs: Sequence[float]) -> dict[str, float]:
    """Mean of paired differences (one per seed) and its two-sided 95% t
    interval, df = n - 1. n < 2 or a non-finite difference gives NaNs."""
    d = [float(x) for x in diffs]
    n = len(d)
    if n < 2 or not all(math.isfinite(x) for x in d):
        m = sum(d) / n if n and all(math.isfinite(x) for x in d) else math.nan
        return {"mean": m, "lo": math.nan, "hi": math.nan, "n": n}
    if n - 1 > len(T975):
        raise ValueError(f"paired_ci: at most {len(T975) + 1} seeds, got {n}")
    m = sum(d) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1))
    h = T975[n - 2] * sd / math.sqrt(n)
    return {"mean": m, "lo": m - h, "hi": m + h, "n": n}


# ---------------------------------------------------------------------------
# Verdicts: each returns (word, reason). Words: REPRODUCED, NOT_REPRODUCED,
# NOT_TESTED; the weight-decay hypothesis (ours, not the paper's) uses
# SUPPORTED / NOT_SUPPORTED / NOT_TESTED.
# ---------------------------------------------------------------------------

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
NOT_TESTED = "not tested at this scale"
SUPPORTED = "supported"
NOT_SUPPORTED = "not supported"

K2_LOGIT_EXPLOSION = 1000.0  # Fig. 2 left: max logits "rapidly exceed 1000"
K2_HEAD_FRACTION = 0.127  # App. D: 12.7% of heads triggered the clip
HEAD_FRACTION_LIMIT = 2 * K2_HEAD_FRACTION  # "a minority like K2's": <= 25.4%
CAP_TOLERANCE = 1.25  # the cap holds: training-batch S <= 1.25 tau after the first clip
OFF_MARGIN = 0.1  # switch-off: last clip >= 10% of the flat phase before the decay
WD_RATIO_TOLERANCE = 1.5  # hypothesis: observed ratio within [pred / 1.5, pred x 1.5]
SPEED_EQUIVALENCE = math.log(1.25)  # App. E: |log S ratio| CI within +-log 1.25: "no faster"


def _majority(flags: Sequence[bool]) -> bool:
    return sum(bool(f) for f in flags) * 2 > len(flags)


def verdict_explosion(peaks_1x: Sequence[float], bracketed: bool) -> tuple[str, str]:
    """Fig. 2 left: vanilla Muon's max logit exceeds 1000, at 1x lr*.
    Reproduced if the median over seeds of the peak probe S is >= 1000."""
    if not bracketed:
        return NOT_TESTED, "the pre-sweep did not bracket Muon's best lr"
    med = _median(peaks_1x)
    if med >= K2_LOGIT_EXPLOSION:
        return REPRODUCED, f"median peak S {med:.1f} >= {K2_LOGIT_EXPLOSION:g}"
    return NOT_REPRODUCED, f"median peak S {med:.1f} < {K2_LOGIT_EXPLOSION:g}"


def verdict_spikes(
    spikes_muon: Sequence[int], spikes_clip: Sequence[int], bracketed: bool
) -> tuple[str, str]:
    """Fig. 2 left: vanilla Muon has loss spikes that MuonClip removes, at 1x
    lr*. Reproduced if a majority of seeds has >= 1 spike in the Muon run and
    fewer in its MuonClip partner; else not reproduced."""
    if not bracketed:
        return NOT_TESTED, "the pre-sweep did not bracket Muon's best lr"
    flags = [m >= 1 and c < m for m, c in zip(spikes_muon, spikes_clip)]
    word = REPRODUCED if _majority(flags) else NOT_REPRODUCED
    return word, f"{sum(flags)} of {len(flags)} seeds with Muon spikes that MuonClip removes"


def verdict_cap(ratios: Sequence[float], clipped: Sequence[bool]) -> tuple[str, str]:
    """Fig. 2 right: MuonClip holds S at tau. ``ratios``: per seed, the
    largest S / tau on the training batches after the first clip (the S the
    clip acts on, and the one K2's Fig. 2 plots; amended before the full run,
    see the module docstring). Reproduced if the clip acted in every seed and
    every ratio <= 1.25."""
    if not all(clipped):
        return NOT_TESTED, f"the clip never acted in {sum(not c for c in clipped)} seed(s)"
    worst = max(ratios)
    if worst <= CAP_TOLERANCE:
        return (
            REPRODUCED,
            f"largest training-batch S / tau after the first clip {worst:.3f} <= {CAP_TOLERANCE}",
        )
    return (
        NOT_REPRODUCED,
        f"largest training-batch S / tau after the first clip {worst:.3f} > {CAP_TOLERANCE}",
    )


def verdict_switch_off(
    last_clip: Sequence[int], decay_start: int, flat: int, wdt: float, required_wd_time: float
) -> tuple[str, str]:
    """Fig. 2 right: the clip switches off on its own while the lr is still at
    its peak. Not tested if the flat phase is shorter than ``required_wd_time``
    weight-decay time constants. Reproduced if in a majority of seeds the last
    clip comes at least 10% of the flat phase before the decay starts (-1:
    never clipped counts as not switched off)."""
    if wdt < required_wd_time - 1e-9:
        return NOT_TESTED, f"lr x wd x flat = {wdt:.2f} < {required_wd_time:g}"
    limit = decay_start - OFF_MARGIN * flat
    flags = [0 <= t < limit for t in last_clip]
    word = REPRODUCED if _majority(flags) else NOT_REPRODUCED
    return (
        word,
        f"{sum(flags)} of {len(flags)} seeds' last clip before step {limit:.0f} (decay from {decay_start})",
    )


def verdict_wd_hypothesis(
    off_small_wd: Sequence[int],
    off_large_wd: Sequence[int],
    warmup: int,
    predicted_ratio: float,
    limit: float,
) -> tuple[str, str]:
    """Hypothesis (ours, not the paper's): the clip's switch-off time after
    warmup scales with 1 / (lr x wd). ``off_*``: per seed, the last clip step
    of the runs at the base and the larger wd; each must switch off before
    ``limit`` (the switch-off test's step), else not tested. Supported if the
    geometric mean of (t_small - warmup) / (t_large - warmup) lies within
    [pred / 1.5, pred x 1.5]."""
    pairs = list(zip(off_small_wd, off_large_wd))
    if not pairs or any(not (warmup < a < limit and warmup < b < limit) for a, b in pairs):
        return NOT_TESTED, "a run of the pair did not switch off during the flat phase"
    logs = [math.log((a - warmup) / (b - warmup)) for a, b in pairs]
    g = math.exp(sum(logs) / len(logs))
    lo, hi = predicted_ratio / WD_RATIO_TOLERANCE, predicted_ratio * WD_RATIO_TOLERANCE
    word = SUPPORTED if lo <= g <= hi else NOT_SUPPORTED
    return (
        word,
        f"switch-off time ratio {g:.2f} (predicted {predicted_ratio:g}, accepted [{lo:.2f}, {hi:.2f}])",
    )


def verdict_head_fraction(
    fractions_1x: Sequence[float], clipped: Sequence[bool]
) -> tuple[str, str]:
    """App. D: a minority of heads (12.7% in K2) ever trigger the clip.
    Reproduced if the median over seeds of the fraction of heads ever clipped
    at 1x lr* is <= 2 x 12.7%."""
    if not any(clipped):
        return NOT_TESTED, "the clip never acted"
    med = _median(fractions_1x)
    word = REPRODUCED if med <= HEAD_FRACTION_LIMIT else NOT_REPRODUCED
    return (
        word,
        f"median fraction of heads ever clipped {med:.3f} (limit {HEAD_FRACTION_LIMIT:.3f})",
    )


def verdict_negligible(
    diffs: Sequence[float], baseline: float, margin: float, clipped: Sequence[bool]
) -> tuple[str, str]:
    """Fig. 12: QK-Clip has negligible impact on the loss. ``diffs``: per
    seed, MuonClip - Muon final val loss; the equivalence margin is
    ``margin`` x ``baseline`` (Muon's mean val loss). Reproduced if the
    paired 95% CI lies inside [-m, m]; not reproduced if it lies entirely
    outside; otherwise not tested (the CI is wider than the margin)."""
    if not all(clipped):
        return NOT_TESTED, "the clip did not act in every seed"
    ci = paired_ci(diffs)
    m = margin * baseline
    txt = f"paired diff {ci['mean']:+.4f}, 95% CI [{ci['lo']:+.4f}, {ci['hi']:+.4f}], margin +-{m:.4f}"
    if not math.isfinite(ci["lo"]):
        return NOT_TESTED, txt + " (no CI)"
    if -m <= ci["lo"] and ci["hi"] <= m:
        return REPRODUCED, txt
    if ci["lo"] > m or ci["hi"] < -m:
        return NOT_REPRODUCED, txt
    return NOT_TESTED, txt + " (inconclusive: the CI crosses the margin)"


def verdict_muon_faster(log_ratios: Sequence[float], bracketed: bool) -> tuple[str, str]:
    """App. E: Muon grows max logits more than AdamW. ``log_ratios``: per
    seed, log(peak probe S of Muon / that of AdamW), each at its own 1x lr*.
    Reproduced if the paired 95% CI is > 0; not reproduced if it is < 0 or
    lies inside +-log 1.25 (no meaningful difference); else not tested."""
    if not bracketed:
        return NOT_TESTED, "the pre-sweep did not bracket both optimizers' best lr"
    ci = paired_ci(log_ratios)
    txt = f"mean log(S_Muon / S_AdamW) {ci['mean']:+.3f}, 95% CI [{ci['lo']:+.3f}, {ci['hi']:+.3f}]"
    if not math.isfinite(ci["lo"]):
        return NOT_TESTED, txt + " (no CI)"
    if ci["lo"] > 0:
        return REPRODUCED, txt
    if ci["hi"] < 0 or (-SPEED_EQUIVALENCE <= ci["lo"] and ci["hi"] <= SPEED_EQUIVALENCE):
        return NOT_REPRODUCED, txt
    return NOT_TESTED, txt + " (inconclusive)"


def verdict_update_rank(diffs: Sequence[float]) -> tuple[str, str]:
    """App. E's mechanism: Muon's updates have a higher (stable) rank than
    AdamW's. ``diffs``: per seed, mean stable rank of Muon's attention
    updates minus AdamW's. Reproduced if the paired 95% CI is > 0; not
    reproduced if it is < 0; else not tested."""
    ci = paired_ci(diffs)
    txt = f"stable rank Muon - AdamW {ci['mean']:+.2f}, 95% CI [{ci['lo']:+.2f}, {ci['hi']:+.2f}]"
    if not math.isfinite(ci["lo"]):
        return NOT_TESTED, txt + " (no CI)"
    if ci["lo"] > 0:
        return REPRODUCED, txt
    if ci["hi"] < 0:
        return NOT_REPRODUCED, txt
    return NOT_TESTED, txt + " (inconclusive)"


def _median(x: Sequence[float]) -> float:
    p = sorted(float(v) for v in x)
    n = len(p)
    if n == 0:
        return math.nan
    return p[n // 2] if n % 2 else 0.5 * (p[n // 2 - 1] + p[n // 2])
