"""The training run behind `qkclip-train`: config, presets, loop, records.

One frozen [`qkclip_eqx.RunConfig`][] holds every setting; every field is a CLI flag.
The loop is plain Python around the jitted step: batches are a pure function
of `(seed, step)`, checkpoints hold model, optimizer state and step, so a
resumed run continues bit-exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jaxtyping import Array

from ._checkpoint import (
    Checkpointer,
    latest_checkpoint,
    list_checkpoints,
    load_latest_checkpoint,
    set_aside,
)
from ._clip import check_tau_alpha
from ._config import GQAConfig, MLAConfig, TransformerConfig
from ._data import TokenData, eval_batches, get_batch, load_data
from ._model import Transformer
from ._optim import muon_adamw, warmup_cosine, wsd
from ._parallel import check_mesh, make_mesh, shard_batch, shard_loss, shard_train_state
from ._step import make_train_step, next_token_loss

Optimizer = Literal["muonclip", "muon", "adamw"]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs. `optimizer="muonclip"` is Muon with
    QK-Clip (`mode` clip by default); `"muon"` is Muon that never clips
    (`monitor` or `off`); `"adamw"` monitors by default and clips with
    `mode="clip"` (QK-Clip does not depend on the optimizer)."""

    # model
    attention: Literal["mla", "gqa"] = "mla"
    n_layers: int = 4
    dim: int = 128
    n_heads: int = 4
    q_lora_rank: int | None = None
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    n_kv_heads: int | None = None
    head_dim: int = 32
    mlp_hidden: int = 384
    kernel: Literal["dense", "blockwise", "dot_product_attention"] = "dense"
    block_size: int = 128
    # kernel="dot_product_attention" only: S exact or the LSE bound, and the backend
    max_logit: Literal["exact", "lse_bound"] = "exact"
    attention_implementation: Literal["xla", "cudnn"] | None = None
    # parameters and optimizer state (keep float32), and the matmuls' dtype:
    # see TransformerConfig
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    # optimisation
    optimizer: Optimizer = "muonclip"
    mode: Literal["clip", "monitor", "off"] | None = None  # None: clip for muonclip, else monitor
    tau: float = 100.0
    alpha: float = 0.5
    clip_until: int | None = None  # clip mode: clip the updates of steps < clip_until only
    lr: float = 3e-3
    weight_decay: float = 0.1
    schedule: Literal["wsd", "cosine", "constant"] = "wsd"
    warmup_steps: int = 50
    decay_fraction: float = 0.2
    final_lr_fraction: float = 0.0  # the lr the schedule ends at, as a fraction of lr
    steps: int = 600
    batch_size: int = 16
    seq_len: int = 128
    accum_steps: int = 1
    seed: int = 0
    # data, records
    data: str | None = None
    max_bytes: int = 8_000_000
    out: str = "runs/default"
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 200
    keep: int = 2
    label: str | None = None
    # devices: e.g. "data=4,model=2" (absent axes have size 1); None: one device
    mesh: str | None = None

    def __post_init__(self) -> None:
        self.mesh_shape()  # validates the mesh string
        for name in (
            "steps",
            "batch_size",
            "seq_len",
            "accum_steps",
            "eval_every",
            "eval_batches",
            "ckpt_every",
            "keep",
            "max_bytes",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"RunConfig.{name} must be > 0, got {getattr(self, name)}")
        try:
            check_tau_alpha(self.tau, self.alpha)
        except ValueError as e:
            raise ValueError(f"RunConfig.{e}") from None
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ValueError(
                f"RunConfig.final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}"
            )
        if not self.lr > 0:
            raise ValueError(f"RunConfig.lr must be > 0, got {self.lr}")
        if self.optimizer not in ("muonclip", "muon", "adamw"):
            raise ValueError(
                f"RunConfig.optimizer must be muonclip, muon or adamw, got {self.optimizer!r}"
            )
        if self.mode is None:
            object.__setattr__(self, "mode", "clip" if self.optimizer == "muonclip" else "monitor")
        if self.mode not in ("clip", "monitor", "off"):
            raise ValueError(f"RunConfig.mode must be clip, monitor or off, got {self.mode!r}")
        if self.optimizer == "muon" and self.mode == "clip":
            raise ValueError(
                "RunConfig.mode='clip' with optimizer='muon': that is optimizer='muonclip'"
            )
        if self.batch_size % self.accum_steps:
            raise ValueError(
                f"RunConfig.batch_size={self.batch_size} is not divisible by accum_steps={self.accum_steps}"
            )
        self.model_config()  # validates the model fields, naming the bad one

    def make_optimizer(self) -> optax.GradientTransformation:
        """The run's optimizer: [`qkclip_eqx.muon_adamw`][] (Muon and MuonClip) or
        AdamW, on the run's lr schedule and weight decay."""
        return optimizer(self)

    def mesh_shape(self) -> dict[str, int] | None:
        """`mesh` parsed: `{"data": d, "model": m, "seq": s}`, or None.

        Raises `ValueError` when `mesh` does not look like
        `"data=4,model=2,seq=1"`.
        """
        if self.mesh is None:
            return None
        shape = {"data": 1, "model": 1, "seq": 1}
        for part in self.mesh.split(","):
            name, _, size = part.partition("=")
            if name.strip() not in shape or not size.strip().isdigit() or int(size) < 1:
                raise ValueError(
                    f"RunConfig.mesh must look like 'data=4,model=2,seq=1', got {self.mesh!r}"
                )
            shape[name.strip()] = int(size)
        return shape

    def model_config(self, vocab_size: int = 256) -> TransformerConfig:
        """The [`qkclip_eqx.TransformerConfig`][] of the run's model (MLA or GQA
        by `attention`), for a vocabulary of `vocab_size` tokens."""
        if self.attention == "mla":
            attn = MLAConfig(
                dim=self.dim,
                n_heads=self.n_heads,
                q_lora_rank=self.q_lora_rank,
                kv_lora_rank=self.kv_lora_rank,
                qk_nope_head_dim=self.qk_nope_head_dim,
                qk_rope_head_dim=self.qk_rope_head_dim,
                v_head_dim=self.v_head_dim,
                kernel=self.kernel,
                block_size=self.block_size,
                max_logit=self.max_logit,
                implementation=self.attention_implementation,
            )
        else:
            attn = GQAConfig(
                dim=self.dim,
                n_heads=self.n_heads,
                n_kv_heads=self.n_kv_heads,
                head_dim=self.head_dim,
                kernel=self.kernel,
                block_size=self.block_size,
                max_logit=self.max_logit,
                implementation=self.attention_implementation,
            )
        return TransformerConfig(
            vocab_size=vocab_size,
            n_layers=self.n_layers,
            mlp_hidden=self.mlp_hidden,
            attention=attn,
            param_dtype=self.param_dtype,
            compute_dtype=self.compute_dtype,
        )


PRESETS: dict[str, dict[str, Any]] = {
    # a few seconds: the tests
    "tiny": dict(
        n_layers=2,
        dim=32,
        n_heads=2,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        head_dim=8,
        mlp_hidden=64,
        steps=20,
        batch_size=4,
        seq_len=32,
        warmup_steps=4,
        eval_every=10,
        eval_batches=2,
        ckpt_every=10,
        max_bytes=400_000,
    ),
    # the default run: ~5 minutes on 2 CPU cores. A model this small, trained
    # this briefly, does not reach K2's tau = 100 at a stable lr; lr 2e-2 grows
    # S to ~60 within 150 steps, so the cap is shown at tau = 30, the threshold
    # of the K2 ablation (Fig. 12).
    "small": dict(lr=2e-2, tau=30.0),
    # about 100M parameters (100.4M with byte tokens), for an accelerator:
    # float32 master weights and optimizer state, bfloat16 matmuls
    "gpu-100m": dict(
        n_layers=15,
        dim=768,
        n_heads=12,
        q_lora_rank=384,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        head_dim=64,
        mlp_hidden=2048,
        steps=5000,
        batch_size=64,
        seq_len=1024,
        kernel="blockwise",
        compute_dtype="bfloat16",
        lr=2e-3,
        warmup_steps=250,
        eval_every=250,
        ckpt_every=500,
        max_bytes=64_000_000,
    ),
}


def preset(name: str, **overrides: Any) -> RunConfig:
    """A [`qkclip_eqx.RunConfig`][] from a named preset.

    **Arguments:**

    - `name`: a key of [`qkclip_eqx.PRESETS`][].
    - `**overrides`: fields of [`qkclip_eqx.RunConfig`][] that replace the
      preset's.

    **Returns:**

    The [`qkclip_eqx.RunConfig`][].

    **Raises:**

    `ValueError` when `name` is not a preset, or the config is invalid.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return RunConfig(**{**PRESETS[name], **overrides})


def schedule(cfg: RunConfig) -> optax.Schedule:
    if cfg.schedule == "wsd":
        return wsd(
            cfg.lr,
            warmup_steps=cfg.warmup_steps,
            total_steps=cfg.steps,
            decay_fraction=cfg.decay_fraction,
            final_fraction=cfg.final_lr_fraction,
        )
    if cfg.schedule == "cosine":
        return warmup_cosine(
            cfg.lr,
            warmup_steps=cfg.warmup_steps,
            total_steps=cfg.steps,
            final_fraction=cfg.final_lr_fraction,
        )
    return optax.constant_schedule(cfg.lr)


def optimizer(cfg: RunConfig) -> optax.GradientTransformation:
    lr = schedule(cfg)
    if cfg.optimizer == "adamw":
        return optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay)
    return muon_adamw(lr, weight_decay=cfg.weight_decay)


# What a resume may change (README, "Resuming"). MUST_MATCH: the fields that
# shape the model, the optimizer state or the data stream; a checkpoint whose
# values differ is refused, naming each field. Every other field may change,
# with the effect stated here (and printed when a resume changes it).
MUST_MATCH = (
    # architecture (and the dtype of the stored parameters)
    "attention",
    "n_layers",
    "dim",
    "n_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_kv_heads",
    "head_dim",
    "mlp_hidden",
    "param_dtype",
    # data: which bytes, and the batches drawn from them at each step
    "data",
    "max_bytes",
    "batch_size",
    "seq_len",
    "seed",
    # optimizer kind: the layout and meaning of the optimizer state
    "optimizer",
)
MAY_CHANGE = {
    "lr": "the lr schedule is recomputed; from the resume step on, the lr is the new schedule's value at that step",
    "schedule": "as lr",
    "warmup_steps": "as lr",
    "decay_fraction": "as lr",
    "final_lr_fraction": "as lr",
    "steps": "the run ends at the new step count, and the warmup/decay schedule is recomputed for it "
    "(from the resume step on, the lr is the new schedule's value at that step)",
    "weight_decay": "applies from the resume step on",
    "tau": "QK-Clip uses the new threshold from the resume step on",
    "alpha": "as tau",
    "mode": "as tau",
    "clip_until": "as tau",
    "mesh": "the same maths in another arithmetic order: results agree to rounding, not bit for bit",
    "kernel": "as mesh",
    "block_size": "as mesh",
    "attention_implementation": "as mesh",
    "max_logit": "from the resume step on, QK-Clip acts on (and the metrics report) the new "
    "choice: S, or its log-sum-exp upper bound",
    "compute_dtype": "as mesh",
    "accum_steps": "as mesh",
    "eval_every": "no effect on training",
    "eval_batches": "no effect on training",
    "ckpt_every": "no effect on training",
    "keep": "no effect on training",
    "label": "no effect on training",
    "out": "no effect on training",
}


def meta_of(cfg: RunConfig, vocab_size: int) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed (`MUST_MATCH`)."""
    config = dataclasses.asdict(cfg)
    return {"config": {name: config[name] for name in MUST_MATCH}, "vocab_size": vocab_size}


def resume_changes(stored: dict[str, Any], cfg: RunConfig) -> list[str]:
    """One line per may-change field that differs from the checkpoint's run,
    with its effect (`MAY_CHANGE`); the lr at the resume step is named when
    the schedule changes it."""
    run, now = stored.get("run", {}), dataclasses.asdict(cfg)
    lines = []
    for name, effect in MAY_CHANGE.items():
        if name in run and run[name] != now[name]:
            lines.append(f"{name}: {run[name]!r} -> {now[name]!r}: {effect}")
    step = stored.get("step", 0)
    try:
        before = float(schedule(RunConfig(**run))(step))  # pyright: ignore[reportArgumentType]  # a schedule returns a real scalar
    except (TypeError, ValueError):
        before = None
    after = float(schedule(cfg)(step))  # pyright: ignore[reportArgumentType]  # a schedule returns a real scalar
    if before is not None and before != after:
        lines.append(f"lr at the resume step {step}: {before:.6g} -> {after:.6g}")
    return lines


class RunError(Exception):
    """An expected problem with a run's inputs (the data, the output directory,
    the mesh): the CLI prints it as one line, without a traceback."""


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What [`qkclip_eqx.train`][] returns.

    **Fields:**

    - `model`: the trained model.
    - `step`: the steps done; for `"nan"`, the index of the step that was not
      finite.
    - `last_metrics`: the last step's metrics, read to the host.
    - `out`: the run directory.
    - `stopped`: `"done"`, `"nan"` (a non-finite step) or `"interrupted"`
      (Ctrl-C; a checkpoint was written).
    """

    model: Transformer
    step: int
    last_metrics: dict[str, Any]
    out: pathlib.Path
    stopped: str  # "done", "nan", "interrupted"


def load_run_data(cfg: RunConfig) -> TokenData:
    """`load_data` for `cfg`; a missing or unreadable `data` is a RunError."""
    try:
        return load_data(cfg.data, max_bytes=cfg.max_bytes)
    except (OSError, ValueError) as e:
        raise RunError(f"--data {cfg.data}: {e}") from e


def _to_host(tree: Any) -> Any:
    """Host (NumPy) copies, whatever the sharding; across processes, gathered."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def _place_batch(batch: np.ndarray, mesh: Mesh | None) -> Array:
    """The global batch (every process builds the same one) on the mesh."""
    return jnp.asarray(batch) if mesh is None else shard_batch(batch, mesh)


def _host_metrics(m: dict[str, Any]) -> dict[str, Any]:
    m = _to_host(m)
    out = {}
    for k, v in m.items():
        v = np.asarray(v)
        if v.ndim == 0:
            out[k] = v.item()
        else:
            out[k] = [[x if math.isfinite(x) else None for x in row] for row in v.tolist()]
    return out


_NONFINITE = ("loss", "grad_norm", "parameters")


@eqx.filter_jit
def _first_nonfinite(loss: Array, grad_norm: Array, model: Transformer) -> Array:
    """0 if the step is finite, else 1 + the index in `_NONFINITE` of the first
    non-finite quantity: loss, gradient norm, updated parameters."""
    params = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    params_ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in params]))
    oks = jnp.stack([jnp.isfinite(loss), jnp.isfinite(grad_norm), params_ok])
    return jnp.where(jnp.all(oks), 0, 1 + jnp.argmin(oks))


_eval_loss = eqx.filter_jit(next_token_loss)  # one compile for every evaluation


@eqx.filter_jit
def _sharded_eval_loss(model: Transformer, tokens: Array, mesh: Mesh):
    return shard_loss(next_token_loss, mesh)(model, tokens)


def evaluate(
    model: Transformer, data: TokenData, cfg: RunConfig, mesh: Mesh | None = None
) -> tuple[float, np.ndarray]:
    """Mean validation loss and S (max over the validation batches) per layer and
    head; on a mesh, by the same sharded loss as training.

    **Arguments:**

    - `model`: the [`qkclip_eqx.Transformer`][].
    - `data`: its `val` split is read by [`qkclip_eqx.eval_batches`][].
    - `cfg`: gives `batch_size`, `seq_len` and `eval_batches`.
    - `mesh`: the mesh the model is placed on, or None.

    **Returns:**

    `(loss, S)`: a float, and S `[layers, heads]`.
    """
    batches = eval_batches(
        data.val, batch_size=cfg.batch_size, seq_len=cfg.seq_len, max_batches=cfg.eval_batches
    )
    results = []
    for b in batches:  # dispatch every batch, then fetch: one host sync
        tokens = _place_batch(b, mesh)
        results.append(
            _eval_loss(model, tokens) if mesh is None else _sharded_eval_loss(model, tokens, mesh)
        )
    losses, s = [], None
    for loss, s_b in _to_host(results):
        losses.append(float(loss))
        s = s_b if s is None else np.maximum(s, s_b)
    return float(np.mean(losses)), np.asarray(s)


def _trim_metrics(path: pathlib.Path, from_step: int) -> None:
    """Drop records at or after `from_step` (a resumed run rewrites them)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] < from_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            continue
    path.write_text("".join(line + "\n" for line in kept))


@contextlib.contextmanager
def _deferred_sigint():
    """Ctrl-C sets a flag that the loop reads between steps, so that the
    checkpoint it then writes never holds a half-done step (an update applied
    but not counted, or a step not logged). A second Ctrl-C exits at once,
    without a checkpoint."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.is_set():
            raise SystemExit(130)
        flag.set()
        print(
            "\nCtrl-C: finishing this step, then writing a checkpoint (Ctrl-C again: quit now)",
            flush=True,
        )

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def train(
    cfg: RunConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    data: TokenData | None = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> RunResult:
    """Train, writing `config.json`, `metrics.jsonl` and checkpoints in `cfg.out`.

    Metrics are read from the devices one step behind, so the host never waits
    for a step it has just dispatched; `on_step(steps_done, metrics)` (if
    given) is called before the next step is dispatched, so it sees the model
    of that step, at the cost of a host sync per step.

    **Arguments:**

    - `cfg`: the run.
    - `resume`: continue from the latest usable checkpoint in `cfg.out` (its
      meta must match `cfg`); without it, `cfg.out` must hold no checkpoint.
    - `progress`: show a progress bar.
    - `data`: the token data; default `cfg.data` read by
      [`qkclip_eqx.load_data`][].
    - `on_step`: called as `on_step(steps_done, metrics)` after each step.

    **Returns:**

    A [`qkclip_eqx.RunResult`][].

    **Raises:**

    `RunError` when `cfg.out` already holds checkpoints and `resume` is not
    set, the data cannot be read, or the mesh does not fit the devices, heads,
    batch or sequence.
    """
    out = pathlib.Path(cfg.out)
    if not resume and latest_checkpoint(out) is not None:
        raise RunError(f"{out} already holds checkpoints: pass --resume, or choose another --out")
    data = load_run_data(cfg) if data is None else data
    mcfg = cfg.model_config(data.vocab_size)
    meta = meta_of(cfg, data.vocab_size)
    lead = jax.process_index() == 0  # only the first process writes and prints
    try:
        mesh = None if (shape := cfg.mesh_shape()) is None else make_mesh(**shape)
    except ValueError as e:
        raise RunError(f"--mesh {cfg.mesh}: {e}") from e

    model = Transformer(mcfg, key=jax.random.key(cfg.seed))
    opt = optimizer(cfg)
    opt_state = opt.init(eqx.filter(model, eqx.is_array))
    if mesh is not None:
        try:
            check_mesh(mesh, model, cfg.batch_size // cfg.accum_steps, cfg.seq_len)
        except ValueError as e:
            raise RunError(f"--mesh {cfg.mesh}: {e}") from e
        model, opt_state = shard_train_state(model, opt_state, opt, mesh)
    start = 0
    if resume:
        found = load_latest_checkpoint(
            out,
            (model, opt_state),
            expect_meta=meta,
            warn=lambda msg: print(msg, flush=True) if lead else None,
        )
        if found is not None:
            (model, opt_state), stored, path = found
            start = stored["step"]
            if lead:
                found_paths = list_checkpoints(out)  # oldest first: those after `path` failed
                for unusable in found_paths[found_paths.index(path) + 1 :]:
                    print(f"set aside {unusable.name} as {set_aside(unusable).name}", flush=True)
                for line in resume_changes(stored, cfg):
                    print(f"resume changes {line}", flush=True)
            _barrier("qkclip-resume")
    out.mkdir(parents=True, exist_ok=True)
    if lead:
        (out / "config.json").write_text(
            json.dumps({**dataclasses.asdict(cfg), "data_description": data.description}, indent=1)
        )
    metrics_path = out / (
        "metrics.jsonl" if lead else f"metrics.process{jax.process_index()}.jsonl"
    )
    _trim_metrics(metrics_path, start)

    step_fn = make_train_step(
        opt,
        mode=cfg.mode,  # pyright: ignore[reportArgumentType]  # None becomes a mode in __post_init__
        tau=cfg.tau,
        alpha=cfg.alpha,
        accum_steps=cfg.accum_steps,
        mesh=mesh,
        clip_until=cfg.clip_until,
    )
    lr_at = schedule(cfg)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    checkpoints = Checkpointer(out, keep=cfg.keep, async_save=True)

    def save(step: int) -> None:
        # Every process writes its own shards; the device-to-host copy happens
        # here, the file writes overlap the next steps.
        checkpoints.save(
            step, (model, opt_state), meta={**meta, "step": step, "run": dataclasses.asdict(cfg)}
        )

    bar = None
    if progress and lead:
        from tqdm.auto import tqdm  # progress bars: tqdm does this better than hand-written code

        bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True)
    stopped, host = "done", {}
    step = start  # steps applied to `model`
    # A step's tokens/s is over one turn of the loop: from just after the previous
    # step's dispatch to just after its own. Timing the metric reads instead gives
    # ~0 s to the second of the two reads at an eval or checkpoint step.
    t_dispatched = time.perf_counter()
    pending = None  # (step index, device metrics, device non-finite code, seconds) not yet read

    def finish(log) -> bool:
        """Reads, checks and logs the pending step; False if it was not finite."""
        nonlocal pending, host, stopped
        if pending is None:
            return True
        index, metrics, bad, seconds = pending
        pending = None
        host, bad = _host_metrics(metrics), int(_to_host(bad))
        host.update(
            step=index,
            lr=float(lr_at(index)),  # pyright: ignore[reportArgumentType]  # a schedule returns a real scalar
            tokens_per_s=tokens_per_step / seconds,
        )
        if bad:
            stopped = "nan"
            if lead:
                print(
                    f"\nstep {index}: {_NONFINITE[bad - 1]} is not finite (loss {host['loss']}, grad norm "
                    f"{host['grad_norm']}): stopping without saving it; the last good checkpoint in {out} "
                    "is kept. Rerun with --resume and a lower --lr (a resume may change lr, the schedule "
                    "and tau; see README, 'Resuming').",
                    flush=True,
                )
            return False
        if (index + 1) % cfg.eval_every == 0 or index + 1 == cfg.steps:
            host["val_loss"], _ = evaluate(model, data, cfg, mesh)
        log.write(json.dumps(host) + "\n")
        log.flush()
        if on_step is not None:
            on_step(index + 1, host)
        if bar is not None:
            post = dict(loss=f"{host['loss']:.3f}")
            if "max_logit" in host:
                post.update(S_max=f"{host['max_logit']:.1f}", clipped=host["heads_clipped"])
            post["tok/s"] = f"{host['tokens_per_s']:.0f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
        return True

    try:
        with metrics_path.open("a") as log, _deferred_sigint() as sigint:
            try:
                while step < cfg.steps:
                    if sigint.is_set():  # between steps: model, state, step and log agree
                        raise KeyboardInterrupt
                    batch = _place_batch(
                        get_batch(
                            data.train,
                            batch_size=cfg.batch_size,
                            seq_len=cfg.seq_len,
                            seed=cfg.seed,
                            step=step,
                        ),
                        mesh,
                    )
                    model, opt_state, metrics = step_fn(model, opt_state, batch, step=step)
                    bad = _first_nonfinite(metrics["loss"], metrics["grad_norm"], model)
                    now = time.perf_counter()
                    seconds, t_dispatched = now - t_dispatched, now
                    if not finish(log):  # the previous step, read while this one runs
                        break
                    pending = (step, metrics, bad, seconds)
                    step += 1
                    # Eval and checkpoint steps (and every step for on_step) are read
                    # at once, so that they see the model of that very step.
                    boundary = (
                        step % cfg.eval_every == 0
                        or step % cfg.ckpt_every == 0
                        or step == cfg.steps
                    )
                    if (boundary or on_step is not None) and not finish(log):
                        break
                    if step % cfg.ckpt_every == 0 or step == cfg.steps:
                        save(
                            step
                        )  # `finish` has checked this step: a non-finite one is never saved
                else:
                    finish(log)
            except KeyboardInterrupt:
                if finish(log):  # a step not yet read is checked before it is saved
                    stopped = "interrupted"
                    save(step)
                    if lead:
                        print(f"\ninterrupted: checkpoint for step {step} written to {out}")
    finally:
        checkpoints.wait()
        checkpoints.close()
        if bar is not None:
            bar.close()
    if stopped == "nan":
        step = host.get("step", step)
    return RunResult(model=model, step=step, last_metrics=host, out=out, stopped=stopped)


def format_table(max_logits: Any, tau: float | None = None) -> str:
    """S per layer (rows) and head (columns) as a text table; '*' marks S > tau."""
    s = np.asarray(max_logits, dtype=float)
    head = "layer " + " ".join(f"{f'h{h}':>8}" for h in range(s.shape[1]))
    rows = [head]
    for i, row in enumerate(s):
        cells = [f"{x:8.2f}" + ("*" if tau is not None and x > tau else " ") for x in row]
        rows.append(f"{i:5d} " + "".join(cells))
    return "\n".join(rows)
