"""One training run of the sweep, with its measurements, through
qkclip_eqx's public API.

The learning rate, the weight decay and tau are *traced* inputs of the step,
so every run of one width and one optimizer family (Muon and MuonClip share
one; AdamW is the other) uses one compiled program: the lr and the weight
decay enter the optimizer through ``optax.inject_hyperparams``, and a run
without the clip has ``tau = inf``, for which QK-Clip is a bit-exact no-op
(every gamma is exactly 1).

The step is Algorithm 1 of the Kimi K2 report (arXiv 2507.20534): loss, S
(per layer and head, from this step's forward) and grads; the optimizer
update; then :func:`qkclip_eqx.qk_clip` of the *updated* weights with that S.
It is written here, rather than taken from :func:`qkclip_eqx.make_train_step`
(which fixes tau when it is built), so that tau can be traced.

The log of a run, ``log.npz`` (every array float32 unless said):

- every step t: ``loss``, ``lr`` and ``s`` ``[steps, layers, heads]``: S on
  step t's training batch, before the update (a clip run clipped the heads
  with ``s > tau``);
- at every multiple of ``probe_every`` (and after the last step):
  ``probe_step`` (int32; the number of updates taken), ``probe_s`` (S on the
  fixed probe set), ``probe_loss``, ``probe_entropy`` (the mean attention
  entropy per layer and head; the report takes its minimum over heads), and the spectral norms ``norm_qc``,
  ``norm_kc``, ``norm_qr`` ``[probes, layers, heads]`` of q_C, k_C and q_R;
  with ``probe_pairs`` also one step later (one update's growth of S on
  fixed data);
- ``val_loss``: the final validation loss (NaN when the run stopped early).

``status.json`` beside it holds the spec, how the run ended and its wall
time; the log is written to a temporary file and renamed, then the status, so
a run with a status is complete.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import qkclip_eqx as qc
from qkclip_eqx._rope import apply_rope  # the model's own RoPE, for attention_stats

STATUS = "status.json"
LOG = "log.npz"
CHUNK = 25  # steps between host reads of the losses (the host never waits per step)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run. ``optimizer``: ``muon`` (no clip), ``muonclip`` (QK-Clip at
    ``tau``) or ``adamw`` (no clip). The schedule is WSD: linear warmup,
    constant, then a linear decay to 0 over the last ``decay_fraction``."""

    name: str
    optimizer: str
    width: int
    lr: float
    weight_decay: float
    tau: float | None
    seed: int
    steps: int
    warmup_steps: int
    decay_fraction: float
    model: dict[str, Any]
    batch_size: int
    seq_len: int
    probe_every: int
    probe_pairs: bool
    stop_loss: float
    corpus_sha256: str

    def __post_init__(self) -> None:
        if self.optimizer not in ("muon", "muonclip", "adamw"):
            raise ValueError(
                f"RunSpec.optimizer must be muon, muonclip or adamw, got {self.optimizer!r}"
            )
        if (self.tau is not None) != (self.optimizer == "muonclip"):
            raise ValueError(
                f"RunSpec: tau is for muonclip only, got {self.optimizer} tau={self.tau}"
            )
        if self.tau is not None and not self.tau > 0:
            raise ValueError(f"RunSpec.tau must be > 0, got {self.tau}")
        for f in ("lr", "steps", "probe_every"):
            if not getattr(self, f) > 0:
                raise ValueError(f"RunSpec.{f} must be > 0, got {getattr(self, f)}")

    @property
    def family(self) -> str:
        """Runs of one family and width share a compiled step."""
        return "adamw" if self.optimizer == "adamw" else "muon"

    def lrs(self) -> np.ndarray:
        """The lr of every step (qkclip_eqx's WSD)."""
        sched = qc.wsd(
            self.lr,
            warmup_steps=self.warmup_steps,
            total_steps=self.steps,
            decay_fraction=self.decay_fraction,
        )
        return np.asarray(sched(np.arange(self.steps)), np.float32)

    def flat(self) -> tuple[int, int]:
        """The constant-lr phase, ``[start, end)`` in steps."""
        decay = max(1, min(round(self.steps * self.decay_fraction), self.steps - self.warmup_steps))
        return self.warmup_steps, self.steps - decay


def spread_windows(tokens: np.ndarray, n: int, seq_len: int) -> np.ndarray:
    """``n`` windows of ``seq_len + 1`` tokens at evenly spaced offsets from
    the start to the end of ``tokens``: ``[n, seq_len + 1]`` int32."""
    if len(tokens) < seq_len + 1:
        raise ValueError(f"spread_windows: {len(tokens)} tokens, need {seq_len + 1}")
    starts = np.linspace(0, len(tokens) - seq_len - 1, n).round().astype(np.int64)
    return np.stack([np.asarray(tokens[s : s + seq_len + 1]) for s in starts]).astype(np.int32)


def hyper_optimizer(family: str) -> optax.GradientTransformation:
    """The optimizer with the lr and the weight decay as state (set per step).
    Muon: :func:`qkclip_eqx.muon_adamw` (K2's recipe); AdamW: betas (0.9, 0.95)."""
    if family == "adamw":
        return optax.inject_hyperparams(optax.adamw, static_args=("b1", "b2", "eps", "eps_root"))(
            learning_rate=0.0, b1=0.9, b2=0.95, weight_decay=0.0
        )
    static = ("momentum", "ns_steps", "adam_b1", "adam_b2", "eps", "rms")
    return optax.inject_hyperparams(qc.muon_adamw, static_args=static)(0.0, weight_decay=0.0)


def make_step(opt: optax.GradientTransformation):
    """``step(hp, model, opt_state, tokens) -> (model, opt_state, loss, S)`` with
    ``hp = {"lr", "wd", "tau"}`` float32 scalars (traced: no recompile)."""
    grad_fn = eqx.filter_value_and_grad(qc.next_token_loss, has_aux=True)

    @eqx.filter_jit(donate="all-except-first")
    def step(hp, model, opt_state, tokens):
        (loss, s), grads = grad_fn(model, tokens)
        hyper = {**opt_state.hyperparams, "learning_rate": hp["lr"], "weight_decay": hp["wd"]}
        opt_state = opt_state._replace(hyperparams=hyper)
        updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        model = eqx.apply_updates(model, updates)
        model = qc.qk_clip(model, s, hp["tau"])  # after the update, with this step's S
        return model, opt_state, loss, s

    return step


def attention_stats(model: qc.Transformer, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The attention entropy (the mean over queries 1.. and sequences) and S,
    per layer and head ``[layers, heads]``, of an MLA model without a q latent
    or YaRN on ``inputs`` ``[n, seq]``, from q and k formed as MLAttention
    forms them (its RoPE, its norms); the tests check that this S equals the
    model's own. The entropy of a query attending to j keys is at most
    ln j; the smallest head's entropy collapsing towards 0 is the other
    instability Wortsman et al. 2023 (sec. 3.1.1) tie to logit growth."""
    n, t = inputs.shape
    positions = jnp.arange(t)
    causal = positions[:, None] >= positions[None, :]
    params, static = eqx.partition(model.blocks, eqx.is_array)
    x = model.embed[inputs]
    ents, ss = [], []
    for layer in range(model.config.n_layers):
        block = eqx.combine(jax.tree.map(lambda p, i=layer: p[i], params), static)
        a, c = block.attn, block.attn.config
        if a.wq_a is not None or c.yarn is not None:
            raise NotImplementedError("attention_stats: no q latent, no YaRN")
        h = block.attn_norm(x)
        nope = c.qk_nope_head_dim
        q = jnp.einsum("ntd,hed->nthe", h, a.wq)
        kv_a = jnp.einsum("ntd,ed->nte", h, a.wkv_a)
        c_kv, k_r = kv_a[..., : c.kv_lora_rank], kv_a[..., c.kv_lora_rank :]
        rope = jax.vmap(
            functools.partial(
                apply_rope, positions=positions, theta=c.rope_theta, layout=c.rope_layout
            )
        )
        q_r = rope(q[..., nope:])
        k_r = rope(k_r[:, :, None, :])
        k_c = jnp.einsum("ntl,hel->nthe", a.kv_norm(c_kv), a.wkv_b[:, :nope, :])
        k_r = jnp.broadcast_to(k_r, (*k_c.shape[:-1], k_r.shape[-1]))
        qk = jnp.concatenate([q[..., :nope], q_r], -1), jnp.concatenate([k_c, k_r], -1)
        logits = jnp.einsum("nihe,njhe->nhij", *qk) / math.sqrt(c.qk_head_dim)
        logits = jnp.where(causal, logits, -jnp.inf)
        logp = jax.nn.log_softmax(logits, axis=-1)
        ent = -jnp.sum(jnp.where(causal, jnp.exp(logp) * logp, 0.0), axis=-1)  # [n, h, i]
        ents.append(jnp.mean(ent[..., 1:], axis=(0, 2)))  # query 0 sees one key: entropy 0
        ss.append(jnp.max(logits, axis=(0, 2, 3)))
        x = jax.vmap(block)(x)[0]
    return jnp.stack(ents), jnp.stack(ss)


@eqx.filter_jit
def measure(model: qc.Transformer, tokens: jax.Array, nope: int) -> dict[str, jax.Array]:
    """Loss and S on ``tokens``, the minimum attention entropy, and the
    spectral norm per layer and head of q_C (``wq[..., :nope, :]``), k_C
    (``wkv_b[..., :nope, :]``) and q_R."""
    loss, s = qc.next_token_loss(model, tokens)
    entropy, _ = attention_stats(model, tokens[:, :-1])
    attn = model.blocks.attn
    top = lambda w: jnp.linalg.svd(w, compute_uv=False)[..., 0]  # noqa: E731
    return {
        "loss": loss,
        "s": s,
        "entropy": entropy,
        "norm_qc": top(attn.wq[..., :nope, :]),
        "norm_kc": top(attn.wkv_b[..., :nope, :]),
        "norm_qr": top(attn.wq[..., nope:, :]),
    }


_loss = eqx.filter_jit(lambda model, tokens: qc.next_token_loss(model, tokens)[0])


def mean_loss(model: qc.Transformer, windows: np.ndarray, chunk: int) -> float:
    """Mean next-token loss over ``windows`` in equal chunks (one compiled shape)."""
    n = len(windows) // chunk * chunk
    return float(
        np.mean([_loss(model, jnp.asarray(windows[i : i + chunk])) for i in range(0, n, chunk)])
    )


class Compiled:
    """The compiled steps, one per (model, batch shape, optimizer family), and
    the compile count and time (JAX's backend-compile events)."""

    def __init__(self) -> None:
        self.steps: dict[str, tuple] = {}
        self.compiles = 0
        self.compile_s = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._event)

    def _event(self, event: str, duration: float, **_: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.compiles += 1
            self.compile_s += duration

    def get(self, spec: RunSpec) -> tuple:
        key = json.dumps([spec.model, spec.batch_size, spec.seq_len, spec.family], sort_keys=True)
        if key not in self.steps:
            opt = hyper_optimizer(spec.family)
            self.steps[key] = (opt, make_step(opt))
        return self.steps[key]


COMPILED = Compiled()


def read_status(run_dir: pathlib.Path) -> dict[str, Any] | None:
    p = pathlib.Path(run_dir) / STATUS
    try:
        return json.loads(p.read_text()) if p.is_file() else None
    except json.JSONDecodeError:
        return None


def read_log(run_dir: pathlib.Path) -> dict[str, np.ndarray]:
    with np.load(pathlib.Path(run_dir) / LOG) as z:
        return {k: z[k] for k in z.files}


def run(
    spec: RunSpec,
    data: qc.TokenData,
    probe: np.ndarray,
    val_windows: np.ndarray,
    run_dir: pathlib.Path,
    log=print,
) -> dict[str, Any]:
    """Train ``spec`` unless ``run_dir`` holds it complete; return its status.

    A run stops early when its loss is not finite or a chunk's mean loss
    exceeds ``spec.stop_loss`` (far worse than guessing uniformly): it has
    diverged, and its validation loss is NaN."""
    run_dir = pathlib.Path(run_dir)
    spec_d = dataclasses.asdict(spec)
    st = read_status(run_dir)
    if st is not None and (run_dir / LOG).is_file():
        if st["spec"] != spec_d:
            raise RuntimeError(f"{run_dir} holds a run with another spec; delete it or use --runs")
        return st
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = qc.RunConfig(**spec.model, batch_size=spec.batch_size, seq_len=spec.seq_len)
    model = qc.Transformer(cfg.model_config(data.vocab_size), key=jax.random.key(spec.seed))
    opt, step = COMPILED.get(spec)
    state = opt.init(eqx.filter(model, eqx.is_array))
    nope = spec.model["qk_nope_head_dim"]
    lrs = spec.lrs()
    wd = jnp.float32(spec.weight_decay)
    tau = jnp.float32(math.inf if spec.tau is None else spec.tau)
    probe_j = jnp.asarray(probe)
    probes: list[tuple[int, dict]] = []
    losses: list[np.ndarray] = []
    ss: list[np.ndarray] = []
    pending: list[tuple[jax.Array, jax.Array]] = []
    stopped = "done"
    t0 = time.perf_counter()

    def probe_now(t: int) -> None:
        probes.append((t, {k: np.asarray(v) for k, v in measure(model, probe_j, nope).items()}))

    def flush() -> bool:
        """Read the pending losses and S; True when the run must stop."""
        if not pending:
            return False
        losses.append(np.asarray(jnp.stack([p[0] for p in pending]), np.float32))
        ss.append(np.asarray(jnp.stack([p[1] for p in pending]), np.float32))
        pending.clear()
        last = losses[-1]
        return bool(not np.all(np.isfinite(last)) or np.mean(last) > spec.stop_loss)

    for t in range(spec.steps):
        if t % spec.probe_every == 0 or (spec.probe_pairs and t % spec.probe_every == 1):
            flush()
            probe_now(t)
        batch = qc.get_batch(
            data.train, batch_size=spec.batch_size, seq_len=spec.seq_len, seed=spec.seed, step=t
        )
        hp = {"lr": jnp.float32(lrs[t]), "wd": wd, "tau": tau}
        model, state, loss, s = step(hp, model, state, jnp.asarray(batch))
        pending.append((loss, s))
        if len(pending) == CHUNK and flush():
            stopped = "diverged"
            break
    if stopped == "done" and flush():
        stopped = "diverged"
    n = sum(len(x) for x in losses)
    val = math.nan
    if stopped == "done":
        probe_now(spec.steps)
        val = mean_loss(model, val_windows, len(probe))
    wall = time.perf_counter() - t0
    out: dict[str, Any] = {
        "loss": np.concatenate(losses),
        "s": np.concatenate(ss),
        "lr": lrs[:n],
        "val_loss": np.float32(val),
        "probe_step": np.asarray([p[0] for p in probes], np.int32),
    }
    for k in ("loss", "s", "entropy", "norm_qc", "norm_kc", "norm_qr"):
        out["probe_" + k if k in ("loss", "s", "entropy") else k] = np.stack(
            [p[1][k] for p in probes]
        ).astype(np.float32)
    tmp = run_dir / (LOG + ".part")
    with tmp.open("wb") as f:
        np.savez_compressed(f, **out)
    os.replace(tmp, run_dir / LOG)
    st = {
        "stopped": stopped,
        "steps_run": n,
        "wall_s": round(wall, 2),
        "val_loss": None if math.isnan(val) else round(val, 6),
        "spec": spec_d,
    }
    (run_dir / STATUS).write_text(json.dumps(st, indent=1))
    log(
        f"  {stopped:<8} {spec.name}: {n} steps, {wall:.0f}s, "
        f"max S {np.max(out['s']):.4g}, val {val:.4f}"
    )
    return st
