"""One training run, with the measurements the claims need, through
qkclip_eqx's public API.

The loop is written here rather than taken from ``qkclip_eqx.train``
because the measurements need the model between steps, which ``train``'s
``on_step(step, host_metrics)`` callback does not see. It builds the same
pieces (:class:`qkclip_eqx.Transformer`, :func:`qkclip_eqx.muon_adamw` or
``optax.adamw(b1=0.9, b2=0.95)``, :func:`qkclip_eqx.make_train_step`,
:func:`qkclip_eqx.get_batch`), so a batch is a function of ``(seed, step)``.

Records, one JSON line per step in ``metrics.jsonl``:

- every step: ``loss``, ``lr``, ``s`` (S per layer and head on the step's
  training batch, before the update and clip), ``clipped`` (heads whose S
  exceeded tau, for a clip run);
- at steps t and t + 1 for every multiple t of ``probe_every`` (and the
  last): ``probe_s``, S of the current model (before that step's update) on
  a fixed probe batch. The consecutive pairs give one update's growth of S
  on fixed data (``analysis.update_growth``);
- every ``norms_every`` steps: ``norm_qc``, ``norm_kc``, ``norm_qr``, the
  spectral norm per layer and head of q_C (``wq[:, :, :nope]``), k_C
  (``wkv_b[:, :, :nope]``) and q_R (``wq[:, :, nope:]``); in monitor runs
  also ``rank``: the mean stable rank ||U||_F^2 / ||U||_2^2 of the update
  ``U = W_{t+1} - W_t + lr_t wd W_t`` (decoupled weight decay removed) of
  the per-head ``wq`` and ``wkv_b`` and of ``wkv_a`` and ``wo``;
- every ``val_every`` steps and the last: ``val_loss`` on windows spread
  evenly across the validation split.

A run is written to ``metrics.jsonl.part`` and renamed when complete, with
``status.json`` beside it; an incomplete run is rerun from the start.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import qkclip_eqx as qc

STATUS = "status.json"


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run. ``optimizer``: ``muon`` (monitor), ``muonclip`` or ``adamw``
    (monitor). ``decay_fraction`` None: constant lr after the warmup (the
    pre-sweep); else qkclip_eqx's WSD over ``steps``."""

    name: str
    optimizer: str
    lr: float
    weight_decay: float
    seed: int
    steps: int
    warmup_steps: int
    decay_fraction: float | None
    tau: float
    model: dict[str, Any]
    batch_size: int
    seq_len: int
    probe_every: int
    norms_every: int
    val_every: int
    corpus_sha256: str

    def __post_init__(self) -> None:
        if self.optimizer not in ("muon", "muonclip", "adamw"):
            raise ValueError(
                f"RunSpec.optimizer must be muon, muonclip or adamw, got {self.optimizer!r}"
            )
        for f in ("lr", "tau", "steps", "probe_every", "norms_every", "val_every"):
            if not getattr(self, f) > 0:
                raise ValueError(f"RunSpec.{f} must be > 0, got {getattr(self, f)}")

    @property
    def mode(self) -> str:
        return "clip" if self.optimizer == "muonclip" else "monitor"

    def schedule(self) -> optax.Schedule:
        if self.decay_fraction is None:
            return optax.join_schedules(
                [
                    optax.linear_schedule(0.0, self.lr, max(self.warmup_steps, 1)),
                    optax.constant_schedule(self.lr),
                ],
                [self.warmup_steps],
            )
        return qc.wsd(
            self.lr,
            warmup_steps=self.warmup_steps,
            total_steps=self.steps,
            decay_fraction=self.decay_fraction,
        )


def spread_windows(tokens: np.ndarray, n: int, seq_len: int) -> np.ndarray:
    """``n`` windows of ``seq_len + 1`` tokens at evenly spaced offsets from
    the start to the end of ``tokens``: ``[n, seq_len + 1]`` int32."""
    if len(tokens) < seq_len + 1:
        raise ValueError(f"spread_windows: {len(tokens)} tokens, need {seq_len + 1}")
    starts = np.linspace(0, len(tokens) - seq_len - 1, n).round().astype(np.int64)
    return np.stack([np.asarray(tokens[s : s + seq_len + 1]) for s in starts]).astype(np.int32)


_forward = eqx.filter_jit(qc.next_token_loss)


def probe_s(model: qc.Transformer, probe: np.ndarray) -> np.ndarray:
    """S per layer and head of ``model`` on the probe batch."""
    return np.asarray(_forward(model, jnp.asarray(probe))[1])


def val_loss(model: qc.Transformer, windows: np.ndarray, batch_size: int) -> float:
    """Mean next-token loss over ``windows`` (equal-size chunks)."""
    losses = [
        float(_forward(model, jnp.asarray(windows[i : i + batch_size]))[0])
        for i in range(0, len(windows) - batch_size + 1, batch_size)
    ]
    return float(np.mean(losses))


@eqx.filter_jit
def head_norms(model: qc.Transformer, nope: int) -> dict[str, jax.Array]:
    """Spectral norms ``[layers, heads]`` of q_C, k_C and q_R."""
    attn = model.blocks.attn
    top = lambda w: jnp.linalg.svd(w, compute_uv=False)[..., 0]  # noqa: E731
    return {
        "norm_qc": top(attn.wq[:, :, :nope]),
        "norm_kc": top(attn.wkv_b[:, :, :nope]),
        "norm_qr": top(attn.wq[:, :, nope:]),
    }


def _attn_mats(model: qc.Transformer) -> dict[str, jax.Array]:
    a = model.blocks.attn
    return {"wq": a.wq, "wkv_b": a.wkv_b, "wkv_a": a.wkv_a, "wo": a.wo}


@jax.jit
def _stable_ranks(before: dict, after: dict, lr_wd: jax.Array) -> dict[str, jax.Array]:
    out = {}
    for k in before:
        u = (after[k] - before[k] + lr_wd * before[k]).astype(jnp.float32)
        sv = jnp.linalg.svd(u, compute_uv=False)
        out[k] = jnp.mean(jnp.sum(sv**2, -1) / jnp.maximum(sv[..., 0] ** 2, 1e-30))
    return out


def optimizer(spec: RunSpec) -> optax.GradientTransformation:
    if spec.optimizer == "adamw":
        return optax.adamw(spec.schedule(), b1=0.9, b2=0.95, weight_decay=spec.weight_decay)
    return qc.muon_adamw(spec.schedule(), weight_decay=spec.weight_decay)


_STEPS: dict[tuple, tuple] = {}


def _compiled(spec: RunSpec) -> tuple[optax.GradientTransformation, Any]:
    """The optimizer and train step of ``spec``, shared by runs that differ
    only in seed and name (so seeds compile once per process)."""
    key = tuple(
        (k, repr(v)) for k, v in dataclasses.asdict(spec).items() if k not in ("seed", "name")
    )
    if key not in _STEPS:
        opt = optimizer(spec)
        _STEPS[key] = (opt, qc.make_train_step(opt, mode=spec.mode, tau=spec.tau))
    return _STEPS[key]


def read_status(run_dir: pathlib.Path) -> dict[str, Any] | None:
    p = run_dir / STATUS
    try:
        return json.loads(p.read_text()) if p.is_file() else None
    except json.JSONDecodeError:
        return None


def run(
    spec: RunSpec,
    data: qc.TokenData,
    probe: np.ndarray,
    val_windows: np.ndarray,
    run_dir: pathlib.Path,
    log=print,
) -> dict[str, Any]:
    """Train ``spec`` unless ``run_dir`` holds it complete; return its status."""
    run_dir = pathlib.Path(run_dir)
    spec_d = dataclasses.asdict(spec)
    st = read_status(run_dir)
    if st is not None and (run_dir / "metrics.jsonl").is_file():
        if st["spec"] != spec_d:
            raise RuntimeError(
                f"{run_dir} holds a run with another spec; delete it or use another --runs"
            )
        return st
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = qc.RunConfig(**spec.model, batch_size=spec.batch_size, seq_len=spec.seq_len)
    model = qc.Transformer(cfg.model_config(data.vocab_size), key=jax.random.key(spec.seed))
    opt, step_fn = _compiled(spec)
    state = opt.init(eqx.filter(model, eqx.is_array))
    sched = spec.schedule()
    nope = spec.model["qk_nope_head_dim"]
    t0 = time.perf_counter()
    stopped = "done"
    part = run_dir / "metrics.jsonl.part"
    with part.open("w") as f:
        for t in range(spec.steps):
            rec: dict[str, Any] = {"step": t}
            last = t == spec.steps - 1
            if t % spec.probe_every in (0, 1) or last:
                rec["probe_s"] = probe_s(model, probe).tolist()
            measure = t % spec.norms_every == 0 or last
            if measure:
                rec.update({k: np.asarray(v).tolist() for k, v in head_norms(model, nope).items()})
            before = None
            if measure and spec.mode == "monitor":
                before = {k: jnp.array(v, copy=True) for k, v in _attn_mats(model).items()}
            lr_t = float(sched(t))
            batch = jnp.asarray(
                qc.get_batch(
                    data.train,
                    batch_size=spec.batch_size,
                    seq_len=spec.seq_len,
                    seed=spec.seed,
                    step=t,
                )
            )
            model, state, m = step_fn(model, state, batch)
            loss = float(m["loss"])
            s = np.asarray(m["max_logits"], dtype=np.float64)
            rec.update(
                loss=loss,
                lr=lr_t,
                s=np.where(np.isfinite(s), s, -1.0).tolist(),
                clipped=int(np.sum(s > spec.tau)) if spec.mode == "clip" else 0,
            )
            if before is not None:
                sr = _stable_ranks(before, _attn_mats(model), jnp.float32(lr_t * spec.weight_decay))
                rec["rank"] = {k: float(v) for k, v in sr.items()}
            if not math.isfinite(loss):
                stopped = "nan"
            elif (t + 1) % spec.val_every == 0 or last:
                rec["val_loss"] = val_loss(model, val_windows, spec.batch_size)
            f.write(json.dumps(rec) + "\n")
            if stopped == "nan":
                break
            if (t + 1) % 500 == 0:
                log(
                    f"    {spec.name} step {t + 1} loss {loss:.3f} ({time.perf_counter() - t0:.0f}s)"
                )
    wall = time.perf_counter() - t0
    part.replace(run_dir / "metrics.jsonl")
    st = {"stopped": stopped, "steps_run": t + 1, "wall_s": round(wall, 1), "spec": spec_d}
    (run_dir / STATUS).write_text(json.dumps(st, indent=1))
    log(f"  {stopped:<4} {spec.name}: {t + 1} steps, {wall:.0f}s")
    return st


def read_log(run_dir: pathlib.Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``."""
    return [
        json.loads(x)
        for x in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()
        if x.strip()
    ]
