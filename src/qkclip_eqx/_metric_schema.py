"""The metrics of a training step and run, declared once: each one's key (in
the step's `metrics` and in `metrics.jsonl`), shape, meaning, and the names
the sinks and the progress bar show it by.

The train step (`_step.py`) and the loop (`_train.py`) write these keys; the
progress bar, the sinks (`_sinks.py`), [`qkclip_eqx.read_metrics`][],
`qkclip-plot`, `qkclip-train`'s report and `qkclip-eval` read them from here.
A new metric is one `Metric` in `METRICS` (and the code that computes it).

S, the max attention logit per head, has a second key for a model whose
attention reports the log-sum-exp upper bound of S instead
(`max_logit="lse_bound"`): a run's log says which it holds, and every reader
labels a bound as a bound.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

Source = Literal["step", "loop"]


@dataclasses.dataclass(frozen=True)
class Metric:
    """One metric.

    - `key`: its key in the step's `metrics` and in `metrics.jsonl`.
    - `meaning`: one line.
    - `shape`: `()` for a scalar, else its axes' names (`("layers", "heads")`).
    - `source`: `"step"` (the jitted train step) or `"loop"` (the host loop).
    - `sink`: its name in TensorBoard and W&B (None: not sent); an array's
      elements go as `<sink>/layer_<l>/head_<h>`.
    - `bar`: its name in the progress bar (None: not shown), `bar_format` the
      format spec of its value there.
    - `bound_key`, `bound_sink`, `bound_bar`: the same under
      `max_logit="lse_bound"`, where the value bounds S rather than is S.
    """

    key: str
    meaning: str
    shape: tuple[str, ...] = ()
    source: Source = "step"
    sink: str | None = None
    bar: str | None = None
    bar_format: str = ""
    bound_key: str | None = None
    bound_sink: str | None = None
    bound_bar: str | None = None

    def keys(self) -> tuple[str, ...]:
        """Its keys: `key`, and `bound_key` where it has one."""
        return (self.key,) if self.bound_key is None else (self.key, self.bound_key)


LOSS = Metric(
    "loss",
    "training loss: mean next-token cross-entropy",
    sink="train/loss",
    bar="loss",
    bar_format=".3f",
)
GRAD_NORM = Metric("grad_norm", "global L2 norm of the gradient", sink="train/grad_norm")
S = Metric(
    "max_logits",
    "S: the max attention logit of each layer and head over the step's batch",
    shape=("layers", "heads"),
    sink="S",
    bound_key="max_logits_lse_bound",
    bound_sink="S_lse_bound",
)
S_MAX = Metric(
    "max_logit",
    "S over every layer and head",
    sink="qk_clip/S_max",
    bar="S_max",
    bar_format=".1f",
    bound_key="max_logit_lse_bound",
    bound_sink="qk_clip/S_max_lse_bound",
    bound_bar="S_bound",
)
HEADS_OVER_TAU = Metric(
    "heads_over_tau", "(layer, head) pairs with S > tau", sink="qk_clip/heads_over_tau"
)
HEADS_CLIPPED = Metric(
    "heads_clipped",
    "(layer, head) pairs whose logits the clip scaled (0 unless mode is clip)",
    sink="qk_clip/heads_clipped",
    bar="clipped",
    bar_format="d",
)
N_NONFINITE = Metric(
    "n_nonfinite",
    "(layer, head) pairs whose S is not finite (never clipped)",
    sink="qk_clip/n_nonfinite",
)
CLIP_ACTIVE = Metric("clip_active", "1 while the clip acts (clip_until), else 0")
FIRST_NONFINITE = Metric(
    "first_nonfinite",
    "0 when the step is finite, else 1 + the index in NONFINITE of the first quantity that "
    "is not (read by the loop, not logged)",
)
# mixture-of-experts models only (TransformerConfig.moe; see _moe.py)
EXPERT_LOAD = Metric(
    "expert_load",
    "tokens routed to each expert of each MoE layer in the step",
    shape=("moe_layers", "experts"),
)
EXPERT_LOAD_RATIO = Metric(
    "expert_load_ratio",
    "the worst MoE layer's max/min expert load (1: balanced; inf: an idle expert)",
    sink="moe/load_ratio",
    bar="load",
    bar_format=".2f",
)
EXPERT_LOAD_CV = Metric(
    "expert_load_cv",
    "mean over MoE layers of the expert load's coefficient of variation",
    sink="moe/load_cv",
)
DROPPED_TOKENS = Metric(
    "dropped_tokens", "routed (token, expert) pairs not computed (0: dropless)", sink="moe/dropped"
)
BALANCE_LOSS = Metric(
    "balance_loss",
    "the sequence-wise balance loss summed over MoE layers (before its weight)",
    sink="moe/balance_loss",
)
STEP = Metric("step", "the 0-based step", source="loop")
LR = Metric("lr", "the learning rate of the step", source="loop", sink="train/lr")
TOKENS_PER_S = Metric(
    "tokens_per_s", "tokens per second of the step", source="loop", sink="train/tokens_per_s"
)
TIME = Metric("time", "wall-clock time the step was read, in Unix seconds", source="loop")
VAL_LOSS = Metric(
    "val_loss", "validation loss, at evaluation steps", source="loop", sink="val/loss"
)

#: Every metric, in the order of a `metrics.jsonl` line.
METRICS: tuple[Metric, ...] = (
    STEP,
    LOSS,
    GRAD_NORM,
    S,
    S_MAX,
    HEADS_OVER_TAU,
    HEADS_CLIPPED,
    N_NONFINITE,
    CLIP_ACTIVE,
    FIRST_NONFINITE,
    EXPERT_LOAD,
    EXPERT_LOAD_RATIO,
    EXPERT_LOAD_CV,
    DROPPED_TOKENS,
    BALANCE_LOSS,
    LR,
    TOKENS_PER_S,
    TIME,
    VAL_LOSS,
)

#: What `first_nonfinite` indexes (from 1): the quantities the step checks.
NONFINITE = ("loss", "grad_norm", "parameters")


def nonfinite_name(code: int) -> str | None:
    """The quantity a `first_nonfinite` value names (None for 0: finite)."""
    return NONFINITE[code - 1] if code else None


def s_key(bound: bool) -> str:
    """The key of S per layer and head: `max_logits`, or under
    `max_logit="lse_bound"` `max_logits_lse_bound`."""
    return (S.bound_key or S.key) if bound else S.key


def s_max_key(bound: bool) -> str:
    """The key of S over every layer and head (as `s_key`)."""
    return (S_MAX.bound_key or S_MAX.key) if bound else S_MAX.key


def find_s(record: Mapping[str, Any]) -> tuple[Any, bool]:
    """`(S per layer and head, is_bound)` of a step's record: its
    `max_logits` or `max_logits_lse_bound`, `(None, False)` when it has neither."""
    for key, bound in ((S.key, False), (S.bound_key, True)):
        if key is not None and key in record:
            return record[key], bound
    return None, False


def s_label(bound: bool) -> str:
    """How a reader names S: `"S"`, or `"S bound (log-sum-exp)"`."""
    return "S bound (log-sum-exp)" if bound else "S"


def bar_items(record: Mapping[str, Any]) -> dict[str, str]:
    """The progress bar's items of a step's record: each metric with a `bar`
    name that the record holds (a bound under its bound's name)."""
    out = {}
    for metric in METRICS:
        for key, name in ((metric.key, metric.bar), (metric.bound_key, metric.bound_bar)):
            if key is not None and name is not None and record.get(key) is not None:
                out[name] = format(record[key], metric.bar_format)
    return out
