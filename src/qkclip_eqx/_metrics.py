"""Reading a run's metrics back: `metrics.jsonl` (and `config.json`) of a run
directory as arrays, for notebooks, `qkclip-plot` and the reproduction."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Float, Int

#: The scalar metrics of the training lines that `read_metrics` keeps in
#: `RunMetrics.scalars`, by their key in `metrics.jsonl`.
SCALARS = ("lr", "grad_norm", "heads_over_tau", "tokens_per_s")


@dataclasses.dataclass(frozen=True, eq=False)
class RunMetrics:
    """Parsed metrics of one run.

    **Fields:**

    - `steps`: `[t]` steps of the training lines (lines with `"loss"`),
      sorted ascending.
    - `loss`: `[t]` training loss (NaN where missing or null).
    - `val_steps`: `[v]` steps of the validation lines (`"val_loss"`).
    - `val_loss`: `[v]` validation loss.
    - `max_logits`: `[t, layers, heads]` max attention logit S per layer and
      head; NaN for null (non-finite) entries and for training lines
      without `"max_logits"`.  Shape `[t, 0, 0]` when no line
      recorded it (e.g. mode `"off"`).
    - `heads_clipped`: `[t]` number of heads clipped at each step, as float
      so that a missing value can be NaN.

    - `label`: display label (config `"label"`, else the directory name).
    - `tau`: QK-Clip threshold from the config, or `None`.
    - `mode`: `"clip" | "monitor" | "off"` from the config, or `None`.
    - `n_heads_total`: `layers * heads` for the clipped fraction, from the
      `max_logits` shape; `None` when no line recorded S.
    - `run_dir`: the directory read.
    - `scalars`: `[t]` of each scalar metric of `SCALARS` that some training
      line holds, by key (`lr`, `grad_norm`, `heads_over_tau`: the heads whose
      S is above tau, in every mode); NaN where a line lacks it.
    - `tokens_per_step`: `batch_size * seq_len` from the config, or `None`.
    - `seed`: the config's seed, or `None`.
    """

    steps: Int[np.ndarray, " t"]
    loss: Float[np.ndarray, " t"]
    val_steps: Int[np.ndarray, " v"]
    val_loss: Float[np.ndarray, " v"]
    max_logits: Float[np.ndarray, "t layers heads"]
    heads_clipped: Float[np.ndarray, " t"]
    label: str
    tau: float | None
    mode: str | None
    n_heads_total: int | None
    run_dir: str
    scalars: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    tokens_per_step: int | None = None
    seed: int | None = None

    def scalar(self, key: str) -> Float[np.ndarray, " t"]:
        """`scalars[key]`, or NaN at every step when no line logged it."""
        return self.scalars.get(key, np.full(len(self.steps), np.nan))

    @property
    def n_layers(self) -> int:
        """The layers of `max_logits` (0 when no line recorded S)."""
        return int(self.max_logits.shape[1])

    @property
    def n_heads(self) -> int:
        """The heads per layer of `max_logits` (0 when no line recorded S)."""
        return int(self.max_logits.shape[2])

    @property
    def has_max_logits(self) -> bool:
        """Whether any line recorded S."""
        return self.max_logits.shape[1] > 0 and self.max_logits.shape[2] > 0


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------


def _as_float(x: Any) -> float:
    """JSON number / null / bool -> float, NaN for null or junk."""
    if x is None or isinstance(x, bool):
        return math.nan
    if isinstance(x, (int, float)):
        return float(x)
    return math.nan


def _read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        warnings.warn(f"{path}: unreadable config ({e}); ignoring it", stacklevel=3)
        return {}
    if not isinstance(cfg, dict):
        warnings.warn(f"{path}: config is not a JSON object; ignoring it", stacklevel=3)
        return {}
    return cfg


def _read_lines(path: Path) -> list[dict[str, Any]]:
    """Parse a JSONL file, skipping (with a warning) malformed lines."""
    text = path.read_text()
    raw = text.splitlines()
    last = max((i for i, s in enumerate(raw) if s.strip()), default=-1)
    out: list[dict[str, Any]] = []
    for i, line in enumerate(raw):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            where = "truncated last line" if i == last else "malformed line"
            warnings.warn(f"{path}:{i + 1}: skipping {where} ({line[:60]!r}...)", stacklevel=3)
            continue
        if not isinstance(obj, dict):
            warnings.warn(f"{path}:{i + 1}: skipping non-object line", stacklevel=3)
            continue
        out.append(obj)
    return out


def _logits_array(x: Any) -> np.ndarray | None:
    """`max_logits` JSON value -> float [layers, heads] (NaN for null)."""
    if not isinstance(x, list) or not x or not all(isinstance(r, list) for r in x):
        return None
    widths = {len(r) for r in x}
    if len(widths) != 1 or 0 in widths:
        return None
    return np.array([[_as_float(v) for v in row] for row in x], dtype=np.float64)


def read_metrics(run_dir: str | os.PathLike) -> RunMetrics:
    """Read `run_dir/metrics.jsonl` (and `config.json` if present).

    A line with `"loss"` is a training line; a line with `"val_loss"` a
    validation line (a line may be both).  Lines that do not parse (e.g. the
    truncated last line of a crashed run) are skipped with a
    `UserWarning`.  Training and validation points are sorted by step
    (stable, so repeated steps keep file order).

    **Raises:**

    `FileNotFoundError` if `run_dir/metrics.jsonl` does not exist; `ValueError`
    if `max_logits` changes shape between lines.
    """
    rd = Path(run_dir)
    path = rd / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file: {path}")
    cfg = _read_config(rd)
    lines = _read_lines(path)

    steps: list[int] = []
    loss: list[float] = []
    clipped: list[float] = []
    scalars: dict[str, list[float]] = {k: [] for k in SCALARS}
    logits: list[np.ndarray | None] = []
    val_steps: list[int] = []
    val_loss: list[float] = []
    shape: tuple[int, ...] | None = None
    for obj in lines:
        step_raw = obj.get("step")
        if isinstance(step_raw, bool) or not isinstance(step_raw, (int, float)):
            step = None
        else:
            step = int(step_raw)
        if "val_loss" in obj and step is not None:
            val_steps.append(step)
            val_loss.append(_as_float(obj["val_loss"]))
        if "loss" in obj and step is not None:
            steps.append(step)
            loss.append(_as_float(obj["loss"]))
            clipped.append(_as_float(obj.get("heads_clipped")))
            for key, values in scalars.items():
                values.append(_as_float(obj.get(key)))
            arr = _logits_array(obj.get("max_logits"))
            if arr is not None:
                if shape is None:
                    shape = arr.shape
                elif arr.shape != shape:
                    raise ValueError(
                        f"{path}: max_logits shape {arr.shape} at step {step} "
                        f"differs from earlier shape {shape}"
                    )
            logits.append(arr)

    t = len(steps)
    lh = shape if shape is not None else (0, 0)
    ml = np.full((t, *lh), np.nan, dtype=np.float64)
    for i, arr in enumerate(logits):
        if arr is not None:
            ml[i] = arr

    order = np.argsort(np.asarray(steps, dtype=np.int64), kind="stable")
    vorder = np.argsort(np.asarray(val_steps, dtype=np.int64), kind="stable")

    n_total = None if shape is None else int(shape[0] * shape[1])

    tau_raw = cfg.get("tau")
    tau = (
        float(tau_raw)
        if isinstance(tau_raw, (int, float)) and not isinstance(tau_raw, bool)
        else None
    )
    mode = cfg.get("mode") if isinstance(cfg.get("mode"), str) else None
    label = cfg.get("label") if isinstance(cfg.get("label"), str) else None
    ints = {k: v for k, v in cfg.items() if isinstance(v, int) and not isinstance(v, bool)}
    tokens_per_step = (
        ints["batch_size"] * ints["seq_len"] if {"batch_size", "seq_len"} <= ints.keys() else None
    )
    if not label:
        label = rd.resolve().name or str(rd)

    return RunMetrics(
        steps=np.asarray(steps, dtype=np.int64)[order],
        loss=np.asarray(loss, dtype=np.float64)[order],
        val_steps=np.asarray(val_steps, dtype=np.int64)[vorder],
        val_loss=np.asarray(val_loss, dtype=np.float64)[vorder],
        max_logits=ml[order],
        heads_clipped=np.asarray(clipped, dtype=np.float64)[order],
        label=label,
        tau=tau,
        mode=mode,
        n_heads_total=n_total,
        run_dir=str(rd),
        scalars={
            k: np.asarray(v, dtype=np.float64)[order]
            for k, v in scalars.items()
            if any(k in obj for obj in lines)
        },
        tokens_per_step=tokens_per_step,
        seed=ints.get("seed"),
    )


# --------------------------------------------------------------------------
# Derived quantities
# --------------------------------------------------------------------------


def clipped_fraction(m: RunMetrics) -> Float[np.ndarray, " t"]:
    """`heads_clipped / (n_layers * n_heads)` per training step.

    When the total head count is unknown (no `max_logits` recorded) the
    fraction is 0 where
    `heads_clipped == 0` and NaN elsewhere.  Missing `heads_clipped` is NaN.
    """
    if not m.n_heads_total:
        return np.where(m.heads_clipped == 0, 0.0, np.nan)
    return m.heads_clipped / float(m.n_heads_total)


def layer_max_logits(m: RunMetrics) -> Float[np.ndarray, "t layers"]:
    """Max over heads of `max_logits`: `[t, layers]`.

    NaN entries (non-finite logits) are ignored; a (step, layer) with no
    finite head is NaN.
    """
    ml = m.max_logits
    if ml.shape[1] == 0:
        return np.zeros((ml.shape[0], 0), dtype=np.float64)
    if ml.shape[2] == 0:
        return np.full(ml.shape[:2], np.nan, dtype=np.float64)
    finite_any = np.any(~np.isnan(ml), axis=2)
    filled = np.where(np.isnan(ml), -np.inf, ml)
    return np.where(finite_any, filled.max(axis=2), np.nan)
