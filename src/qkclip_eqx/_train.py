"""The training run behind ``qkclip-train``: config, presets, loop, records.

One frozen :class:`RunConfig` holds every setting; every field is a CLI flag.
The loop is plain Python around the jitted step: batches are a pure function
of ``(seed, step)``, checkpoints hold model, optimizer state and step, so a
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

from ._checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ._config import GQAConfig, MLAConfig, TransformerConfig
from ._data import TokenData, eval_batches, get_batch, load_data
from ._model import Transformer
from ._optim import muon_adamw, warmup_cosine, wsd
from ._parallel import make_mesh, shard_batch, shard_train_state
from ._step import make_train_step, next_token_loss

Optimizer = Literal["muonclip", "muon", "adamw"]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs. ``optimizer="muonclip"`` is Muon with
    QK-Clip (``mode`` clip by default); ``"muon"`` is Muon that never clips
    (``monitor`` or ``off``); ``"adamw"`` monitors by default and clips with
    ``mode="clip"`` (QK-Clip does not depend on the optimizer)."""

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
    kernel: Literal["dense", "blockwise"] = "dense"
    block_size: int = 128
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
        for name in ("steps", "batch_size", "seq_len", "accum_steps", "eval_every",
                     "eval_batches", "ckpt_every", "keep", "max_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RunConfig.{name} must be > 0, got {getattr(self, name)}")
        if not self.tau > 0:
            raise ValueError(f"RunConfig.tau must be > 0, got {self.tau}")
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ValueError(f"RunConfig.final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")
        if not self.lr > 0:
            raise ValueError(f"RunConfig.lr must be > 0, got {self.lr}")
        if self.optimizer not in ("muonclip", "muon", "adamw"):
            raise ValueError(f"RunConfig.optimizer must be muonclip, muon or adamw, got {self.optimizer!r}")
        if self.mode is None:
            object.__setattr__(self, "mode", "clip" if self.optimizer == "muonclip" else "monitor")
        if self.mode not in ("clip", "monitor", "off"):
            raise ValueError(f"RunConfig.mode must be clip, monitor or off, got {self.mode!r}")
        if self.optimizer == "muon" and self.mode == "clip":
            raise ValueError("RunConfig.mode='clip' with optimizer='muon': that is optimizer='muonclip'")
        if self.batch_size % self.accum_steps:
            raise ValueError(
                f"RunConfig.batch_size={self.batch_size} is not divisible by accum_steps={self.accum_steps}"
            )
        self.model_config()  # validates the model fields, naming the bad one

    def mesh_shape(self) -> dict[str, int] | None:
        """``mesh`` parsed: ``{"data": d, "model": m, "seq": s}``, or None."""
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
        if self.attention == "mla":
            attn = MLAConfig(
                dim=self.dim, n_heads=self.n_heads, q_lora_rank=self.q_lora_rank,
                kv_lora_rank=self.kv_lora_rank, qk_nope_head_dim=self.qk_nope_head_dim,
                qk_rope_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim,
                kernel=self.kernel, block_size=self.block_size,
            )
        else:
            attn = GQAConfig(
                dim=self.dim, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                head_dim=self.head_dim, kernel=self.kernel, block_size=self.block_size,
            )
        return TransformerConfig(
            vocab_size=vocab_size, n_layers=self.n_layers, mlp_hidden=self.mlp_hidden,
            attention=attn,
            param_dtype=self.param_dtype, compute_dtype=self.compute_dtype,
        )


PRESETS: dict[str, dict[str, Any]] = {
    # a few seconds: the tests
    "tiny": dict(n_layers=2, dim=32, n_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
                 qk_rope_head_dim=8, v_head_dim=8, head_dim=8, mlp_hidden=64, steps=20,
                 batch_size=4, seq_len=32, warmup_steps=4, eval_every=10, eval_batches=2,
                 ckpt_every=10, max_bytes=400_000),
    # the default run: ~5 minutes on 2 CPU cores. A model this small, trained
    # this briefly, does not reach K2's tau = 100 at a stable lr; lr 2e-2 grows
    # S to ~60 within 150 steps, so the cap is shown at tau = 30, the threshold
    # of the K2 ablation (Fig. 12).
    "small": dict(lr=2e-2, tau=30.0),
    # about 100M parameters (100.4M with byte tokens), for an accelerator:
    # float32 master weights and optimizer state, bfloat16 matmuls
    "gpu-100m": dict(n_layers=15, dim=768, n_heads=12, q_lora_rank=384, kv_lora_rank=256,
                     qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, head_dim=64,
                     mlp_hidden=2048, steps=5000, batch_size=64, seq_len=1024,
                     kernel="blockwise", compute_dtype="bfloat16", lr=2e-3, warmup_steps=250,
                     eval_every=250, ckpt_every=500, max_bytes=64_000_000),
}


def preset(name: str, **overrides: Any) -> RunConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return RunConfig(**{**PRESETS[name], **overrides})


def schedule(cfg: RunConfig) -> optax.Schedule:
    if cfg.schedule == "wsd":
        return wsd(cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                   decay_fraction=cfg.decay_fraction, final_fraction=cfg.final_lr_fraction)
    if cfg.schedule == "cosine":
        return warmup_cosine(cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                             final_fraction=cfg.final_lr_fraction)
    return optax.constant_schedule(cfg.lr)


def optimizer(cfg: RunConfig) -> optax.GradientTransformation:
    lr = schedule(cfg)
    if cfg.optimizer == "adamw":
        return optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay)
    return muon_adamw(lr, weight_decay=cfg.weight_decay)


def meta_of(cfg: RunConfig, vocab_size: int) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: every field that shapes the
    model, the optimizer or the data stream."""
    config = dataclasses.asdict(cfg)
    for name in ("out", "eval_every", "eval_batches", "ckpt_every", "keep", "label", "steps", "mesh",
                 "clip_until"):
        config.pop(name)
    return {"config": config, "vocab_size": vocab_size}


@dataclasses.dataclass(frozen=True)
class RunResult:
    model: Transformer
    step: int
    last_metrics: dict[str, Any]
    out: pathlib.Path
    stopped: str  # "done", "nan", "interrupted"


def _to_host(tree: Any) -> Any:
    """Host (NumPy) copies, whatever the sharding; across processes, gathered."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def _place_batch(batch: np.ndarray, mesh: Mesh | None) -> Array:
    """This process's rows of a global batch, on the mesh (or the default device)."""
    if mesh is None:
        return jnp.asarray(batch)
    rows = batch.shape[0] // jax.process_count()
    return shard_batch(batch[jax.process_index() * rows:(jax.process_index() + 1) * rows], mesh)


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


_eval_loss = eqx.filter_jit(next_token_loss)  # one compile for every evaluation


def evaluate(
    model: Transformer, data: TokenData, cfg: RunConfig, mesh: Mesh | None = None
) -> tuple[float, np.ndarray]:
    """Mean validation loss and S (max over the validation batches) per layer and head."""
    batches = eval_batches(data.val, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                           max_batches=cfg.eval_batches)
    losses, s = [], None
    for b in batches:
        loss, s_b = _to_host(_eval_loss(model, _place_batch(b, mesh)))
        losses.append(float(loss))
        s = s_b if s is None else np.maximum(s, s_b)
    return float(np.mean(losses)), np.asarray(s)


def _trim_metrics(path: pathlib.Path, from_step: int) -> None:
    """Drop records at or after ``from_step`` (a resumed run rewrites them)."""
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
        print("\nCtrl-C: finishing this step, then writing a checkpoint (Ctrl-C again: quit now)",
              flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def train(
    cfg: RunConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    data: TokenData | None = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> RunResult:
    """Train, writing ``config.json``, ``metrics.jsonl`` and checkpoints in ``cfg.out``."""
    out = pathlib.Path(cfg.out)
    if not resume and latest_checkpoint(out) is not None:
        raise FileExistsError(f"{out} already holds checkpoints: pass --resume, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(cfg.data, max_bytes=cfg.max_bytes) if data is None else data
    mcfg = cfg.model_config(data.vocab_size)
    meta = meta_of(cfg, data.vocab_size)
    if jax.process_index() == 0:
        (out / "config.json").write_text(json.dumps({**dataclasses.asdict(cfg), "data_description": data.description}, indent=1))

    model = Transformer(mcfg, key=jax.random.key(cfg.seed))
    opt = optimizer(cfg)
    opt_state = opt.init(eqx.filter(model, eqx.is_array))
    start = 0
    if resume and (ckpt := latest_checkpoint(out)) is not None:
        (model, opt_state), stored = load_checkpoint(ckpt, (model, opt_state), expect_meta=meta)
        start = stored["step"]
    mesh = None if (shape := cfg.mesh_shape()) is None else make_mesh(**shape)
    if mesh is not None:
        model, opt_state = shard_train_state(model, opt_state, opt, mesh)
    lead = jax.process_index() == 0  # only the first process writes and prints
    metrics_path = out / ("metrics.jsonl" if lead else f"metrics.process{jax.process_index()}.jsonl")
    _trim_metrics(metrics_path, start)

    step_fn = make_train_step(opt, mode=cfg.mode,  # pyright: ignore[reportArgumentType]  # None becomes a mode in __post_init__
                              tau=cfg.tau, alpha=cfg.alpha, accum_steps=cfg.accum_steps, mesh=mesh,
                              clip_until=cfg.clip_until)
    lr_at = schedule(cfg)
    tokens_per_step = cfg.batch_size * cfg.seq_len

    def save(step: int) -> None:
        state = (model, opt_state)
        if jax.process_count() > 1:  # gather (a collective: every process takes part)
            state = jax.tree.map(jnp.asarray, _to_host(state))
        if lead:
            save_checkpoint(out, step, state, keep=cfg.keep,
                            meta={**meta, "step": step, "run": dataclasses.asdict(cfg)})

    bar = None
    if progress and lead:
        from tqdm.auto import tqdm  # progress bars: tqdm does this better than hand-written code

        bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True)
    stopped, host = "done", {}
    step = start
    t_last = time.perf_counter()
    try:
        with metrics_path.open("a") as log, _deferred_sigint() as sigint:
            while step < cfg.steps:
                if sigint.is_set():  # between steps: model, state, step and log agree
                    raise KeyboardInterrupt
                batch = _place_batch(get_batch(data.train, batch_size=cfg.batch_size,
                                               seq_len=cfg.seq_len, seed=cfg.seed, step=step), mesh)
                model, opt_state, metrics = step_fn(model, opt_state, batch, step=step)
                host = _host_metrics(metrics)
                now = time.perf_counter()
                host.update(step=step, lr=float(lr_at(step)),  # pyright: ignore[reportArgumentType]  # a schedule returns a real scalar
                            tokens_per_s=tokens_per_step / (now - t_last))
                t_last = now
                if not math.isfinite(host["loss"]):
                    stopped = "nan"
                    print(f"\nloss is {host['loss']} at step {step}: stopping; the last good "
                          f"checkpoint in {out} is kept (rerun with --resume and a lower --lr).")
                    break
                step += 1
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    host["val_loss"], _ = evaluate(model, data, cfg, mesh)
                log.write(json.dumps(host) + "\n")
                log.flush()
                if on_step is not None:
                    on_step(step, host)
                if bar is not None:
                    post = dict(loss=f"{host['loss']:.3f}")
                    if "max_logit" in host:
                        post.update(S_max=f"{host['max_logit']:.1f}", clipped=host["heads_clipped"])
                    post["tok/s"] = f"{host['tokens_per_s']:.0f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                if step % cfg.ckpt_every == 0 or step == cfg.steps:
                    save(step)
    except KeyboardInterrupt:
        stopped = "interrupted"
        save(step)
        print(f"\ninterrupted: checkpoint for step {step} written to {out}")
    finally:
        if bar is not None:
            bar.close()
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
