"""The training loop behind `qkclip-train`: [`qkclip_eqx.train`][].

Plain Python around the jitted step. Batches are a pure function of `(seed,
step)` and checkpoints hold the model, the optimizer state and the step, so a
resumed run continues bit-exactly. The host reads a step's metrics while the
next step runs, so it never waits for a step it has just dispatched; an eval or
checkpoint step is read at once, so that both see the model of that very step.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import math
import pathlib
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

import equinox as eqx
import jax
import numpy as np
import optax
from jax.sharding import Mesh

from ._checkpoint import (
    Checkpointer,
    latest_checkpoint,
    list_checkpoints,
    load_latest_checkpoint,
    set_aside,
)
from ._data import TokenData, check_batch_tokens, get_batch, load_data
from ._evaluate import evaluate
from ._model import Transformer
from ._parallel import check_mesh, make_mesh, place_batch, shard_train_state, to_host
from ._run_config import RunConfig, meta_of, optimizer, resume_changes, schedule
from ._sinks import MetricSink
from ._step import NONFINITE, make_train_step


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
        return load_data(
            cfg.data, max_bytes=cfg.max_bytes, vocab_size=cfg.vocab_size, tokenizer=cfg.tokenizer
        )
    except ImportError as e:
        raise RunError(f"--tokenizer {cfg.tokenizer}: {e}") from e
    except (OSError, ValueError) as e:
        flag = "--tokenizer" if cfg.tokenizer and str(cfg.tokenizer) in str(e) else "--data"
        raise RunError(f"{flag} {getattr(cfg, flag[2:])}: {e}") from e


def _host_metrics(m: dict[str, Any]) -> dict[str, Any]:
    m = to_host(m)
    out = {}
    for k, v in m.items():
        v = np.asarray(v)
        if v.ndim == 0:
            out[k] = v.item()
        else:
            out[k] = [[x if math.isfinite(x) else None for x in row] for row in v.tolist()]
    return out


def _at(step: int, every: int, total: int) -> bool:
    """THE boundary rule for evaluations and checkpoints: after `step` steps, at
    every `every`-th step and at the end of the run."""
    return step % every == 0 or step == total


class _MetricsLog:
    """The host side of the loop. A dispatched step's metrics wait on the device
    (`defer`) until `read` fetches them, checks that the step is finite, and
    writes the record to `metrics.jsonl`, `on_step` and the progress bar."""

    def __init__(
        self,
        file: IO[str],
        cfg: RunConfig,
        on_step: Callable[[int, dict[str, Any]], None] | None,
        bar: Any,
        sinks: Sequence[MetricSink] = (),
    ):
        self.file, self.on_step, self.bar, self.sinks = file, on_step, bar, sinks
        self.lr_at = schedule(cfg)
        self.tokens_per_step = cfg.batch_size * cfg.seq_len
        # the progress bar's tokens/s: the median over the last TOK_S_WINDOW steps
        # of this process, leaving out its first (which holds the compile)
        self.recent: collections.deque[float] = collections.deque(maxlen=TOK_S_WINDOW)
        self.first = True
        self.pending: tuple[int, dict[str, Any], float] | None = None
        self.last: dict[str, Any] = {}  # the last step read, finite or not
        self.nonfinite: str | None = None  # what was not finite in it

    def defer(self, index: int, metrics: dict[str, Any], seconds: float) -> None:
        assert self.pending is None, "a step's metrics were never read"
        self.pending = (index, metrics, seconds)

    def read(self, val_loss: Callable[[], float] | None = None) -> str | None:
        """Read and log the pending step (none: nothing to do). Returns the name
        of its first non-finite quantity, and then logs nothing; else None.
        `val_loss` (called only for a finite step) adds the validation loss."""
        if self.pending is None:
            return None
        index, metrics, seconds = self.pending
        self.pending = None
        host = _host_metrics(metrics)
        bad = host.pop("first_nonfinite")
        host.update(
            step=index,
            lr=float(self.lr_at(index)),  # pyright: ignore[reportArgumentType]  # a schedule returns a real scalar
            tokens_per_s=self.tokens_per_step / seconds,
        )
        self.last = host
        if bad:
            self.nonfinite = NONFINITE[bad - 1]
            return self.nonfinite
        if val_loss is not None:
            host["val_loss"] = val_loss()
        self.file.write(json.dumps(host) + "\n")
        self.file.flush()
        if self.on_step is not None:
            self.on_step(index + 1, host)
        for sink in self.sinks:
            sink.write(index, host)
        first, self.first = self.first, False
        if not first:
            self.recent.append(seconds)
        if self.bar is not None:
            post = dict(loss=f"{host['loss']:.3f}")
            if "max_logit" in host:
                post.update(S_max=f"{host['max_logit']:.1f}", clipped=host["heads_clipped"])
            if self.recent:
                post["tok/s"] = f"{self.smoothed_tokens_per_s():,.0f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
            if first:
                _restart_clock(self.bar)
        return None

    def smoothed_tokens_per_s(self) -> float:
        """Tokens per second of the median of the last `TOK_S_WINDOW` steps read
        (not the process's first, which holds the compile): the training speed,
        which an evaluation or checkpoint step (slow) and the step read just
        after it (fast) do not move."""
        return self.tokens_per_step / float(np.median(self.recent))


TOK_S_WINDOW = 20


def _restart_clock(bar: Any) -> None:
    """Start the bar's clock (elapsed time, rate and so ETA) now, after the
    process's first step, which holds the compile: counted, it put the ETA of
    a resumed run at hours. The steps done so far become the bar's start."""
    n = bar.n
    bar.reset(total=bar.total)
    bar.initial = bar.n = bar.last_print_n = n
    bar.refresh()


def _val_loss(model: Transformer, data: TokenData, cfg: RunConfig, mesh: Mesh | None) -> float:
    return evaluate(model, data, cfg, mesh)[0]


def _mesh(cfg: RunConfig) -> Mesh | None:
    try:
        return None if (shape := cfg.mesh_shape()) is None else make_mesh(**shape)
    except ValueError as e:
        raise RunError(f"--mesh {cfg.mesh}: {e}") from e


def _init_or_resume(
    cfg: RunConfig,
    opt: optax.GradientTransformation,
    meta: dict[str, Any],
    mesh: Mesh | None,
    *,
    resume: bool,
    lead: bool,
) -> tuple[Transformer, Any, int]:
    """`(model, opt_state, steps done)`: freshly initialised from `cfg.seed`
    (and placed on the mesh), or, with `resume`, from the newest checkpoint in
    `cfg.out` that restores (newer ones that do not are set aside)."""
    model = Transformer(cfg.model_config(meta["vocab_size"]), key=jax.random.key(cfg.seed))
    opt_state = opt.init(eqx.filter(model, eqx.is_array))
    if mesh is not None:
        try:
            check_mesh(mesh, model, cfg.batch_size // cfg.accum_steps, cfg.seq_len)
        except ValueError as e:
            raise RunError(f"--mesh {cfg.mesh}: {e}") from e
        model, opt_state = shard_train_state(model, opt_state, opt, mesh)
    if not resume:
        return model, opt_state, 0
    out = pathlib.Path(cfg.out)
    found = load_latest_checkpoint(
        out,
        (model, opt_state),
        expect_meta=meta,
        warn=lambda msg: print(msg, flush=True) if lead else None,
    )
    if found is None:
        return model, opt_state, 0
    (model, opt_state), stored, path = found
    start = stored["step"]
    if lead:
        found_paths = list_checkpoints(out)  # oldest first: those after `path` failed
        unusable = found_paths[found_paths.index(path) + 1 :]
        for bad in unusable:
            print(f"set aside {bad.name} as {set_aside(bad).name}", flush=True)
        if unusable:  # the banner named the newest checkpoint's step
            print(
                f"resuming at step {start} of {cfg.steps}, not the newest checkpoint's", flush=True
            )
        for line in resume_changes(stored, cfg):
            print(f"resume changes {line}", flush=True)
    _barrier("qkclip-resume")
    return model, opt_state, start


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
    sinks: Sequence[MetricSink] = (),
) -> RunResult:
    """Train, writing `config.json`, `metrics.jsonl` and checkpoints in `cfg.out`.

    Metrics are read from the devices one step behind, so the host never waits
    for a step it has just dispatched; `sinks` receive each step's record as it
    is read. `on_step(steps_done, metrics)` (if given) is called before the
    next step is dispatched, so it sees the model of that step, at the cost of
    a host sync per step.

    **Arguments:**

    - `cfg`: the run.
    - `resume`: continue from the latest usable checkpoint in `cfg.out` (its
      meta must match `cfg`); without it, `cfg.out` must hold no checkpoint.
    - `progress`: show a progress bar.
    - `data`: the token data; default `cfg.data` read by
      [`qkclip_eqx.load_data`][].
    - `on_step`: called as `on_step(steps_done, metrics)` after each step:
      `metrics` is the step's line of `metrics.jsonl` (`step`, 0-based, `loss`,
      `lr`, `grad_norm`, `max_logit`, `max_logits` per layer and head,
      `heads_clipped`, `heads_over_tau`, `tokens_per_s`, and `val_loss` at an
      evaluation step), a non-finite S as None.
    - `sinks`: [`qkclip_eqx.MetricSink`][]s (TensorBoard, W&B) written with
      each step's record, one step behind like `metrics.jsonl`; closed by the
      caller.

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
    lead = jax.process_index() == 0  # only the first process writes and prints
    mesh = _mesh(cfg)
    opt = optimizer(cfg)
    meta = meta_of(cfg, data.vocab_size)
    model, opt_state, start = _init_or_resume(cfg, opt, meta, mesh, resume=resume, lead=lead)
    out.mkdir(parents=True, exist_ok=True)
    if lead:
        (out / "config.json").write_text(cfg.to_json(data_description=data.description))
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
    checkpoints = Checkpointer(out, keep=cfg.keep, async_save=True)

    def save(step: int, model: Transformer, opt_state: Any) -> None:
        # Every process writes its own shards; the device-to-host copy happens
        # here, the file writes overlap the next steps.
        checkpoints.save(
            step, (model, opt_state), meta={**meta, "step": step, "run": dataclasses.asdict(cfg)}
        )

    bar = None
    if progress and lead:
        from tqdm.auto import tqdm  # progress bars: tqdm does this better than hand-written code

        bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True)
    try:
        with metrics_path.open("a") as file, _deferred_sigint() as sigint:
            log = _MetricsLog(file, cfg, on_step, bar, sinks)
            model, step, stopped = _run_steps(
                cfg, data, mesh, step_fn, save, log, sigint, model, opt_state, start
            )
    finally:
        checkpoints.wait()
        checkpoints.close()
        if bar is not None:
            bar.close()
    if stopped == "nan":
        if lead:
            print(
                f"\nstep {log.last['step']}: {log.nonfinite} is not finite (loss "
                f"{log.last['loss']}, grad norm {log.last['grad_norm']}): stopping without saving "
                f"it; the last good checkpoint in {out} is kept. Rerun with --resume and a lower "
                "--lr (a resume may change lr, the schedule and tau).",
                flush=True,
            )
        step = log.last["step"]
    elif stopped == "interrupted" and lead:
        print(f"\ninterrupted: checkpoint for step {step} written to {out}")
    return RunResult(model=model, step=step, last_metrics=log.last, out=out, stopped=stopped)


def _run_steps(
    cfg: RunConfig,
    data: TokenData,
    mesh: Mesh | None,
    step_fn: Callable,
    save: Callable[[int, Transformer, Any], None],
    log: _MetricsLog,
    sigint: threading.Event,
    model: Transformer,
    opt_state: Any,
    start: int,
) -> tuple[Transformer, int, str]:
    """Steps `start .. cfg.steps - 1`: `(model, steps applied, how it stopped)`.

    A step's metrics are read while the next step runs, except at an eval or
    checkpoint boundary (or with `on_step`), where they are read at once: the
    evaluation and the checkpoint see the model of that step, and only after
    the step is known to be finite. A non-finite step is never saved.
    """
    step = start
    try:
        clock = time.perf_counter()
        while step < cfg.steps:
            if sigint.is_set():  # between steps: model, state, step and log agree
                raise KeyboardInterrupt
            batch = get_batch(
                data.train, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed, step=step
            )
            try:
                check_batch_tokens(batch, data.vocab_size, f"the batch of step {step}")
            except ValueError as e:
                raise RunError(f"--vocab-size {data.vocab_size}: {e}") from e
            model, opt_state, metrics = step_fn(
                model, opt_state, place_batch(batch, mesh), step=step
            )
            now = time.perf_counter()  # one turn of the loop: from dispatch to dispatch
            seconds, clock = now - clock, now
            if log.read() is not None:  # the previous step, read while this one runs
                return model, step, "nan"
            log.defer(step, metrics, seconds)
            step += 1
            evaluate_now, save_now = (
                _at(step, cfg.eval_every, cfg.steps),
                _at(step, cfg.ckpt_every, cfg.steps),
            )
            if evaluate_now or save_now or log.on_step is not None:
                val = functools.partial(_val_loss, model, data, cfg, mesh) if evaluate_now else None
                if log.read(val) is not None:
                    return model, step, "nan"
            if save_now:
                save(step, model, opt_state)
        return model, step, "done"
    except KeyboardInterrupt:
        if log.read() is not None:  # a step not yet read is checked before it is saved
            return model, step, "nan"
        save(step, model, opt_state)
        return model, step, "interrupted"
