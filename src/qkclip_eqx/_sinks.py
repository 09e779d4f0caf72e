"""Metric sinks: a run's per-step metrics sent to TensorBoard or Weights & Biases
as well as to `metrics.jsonl`, through [`qkclip_eqx.train`][]'s `on_step`.

Both libraries are optional extras (`pip install "qkclip_eqx[tensorboard]"`,
`"qkclip_eqx[wandb]"`), imported only when a sink is made.
"""

from __future__ import annotations

import os
import pathlib
import socket
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from ._metric_schema import METRICS

SINKS = ("tensorboard", "wandb")


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """One step's metrics (as `on_step` receives them) as named scalars, by
    the sink names of `_metric_schema.METRICS`: the loss, lr, gradient norm,
    tokens/s, S (max over layers and heads), heads clipped and over tau,
    validation loss where the step evaluated, and S of every layer and head as
    `S/layer_<l>/head_<h>` (a non-finite S, stored as null, is left out). A
    run whose attention reports the log-sum-exp bound of S sends it under
    the bound's names (`qk_clip/S_max_lse_bound`, `S_lse_bound/...`).

    **Arguments:**

    - `metrics`: a line of `metrics.jsonl`.

    **Returns:**

    `{name: value}`.
    """
    out = {}
    for metric in METRICS:
        for key, sink in ((metric.key, metric.sink), (metric.bound_key, metric.bound_sink)):
            if key is None or sink is None or key not in metrics:
                continue
            value = metrics[key]
            if not metric.shape:
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[sink] = float(value)
                continue
            for suffix, x in _elements(value, metric.shape):
                if x is not None:
                    out[sink + suffix] = float(x)
    return out


def _elements(value: Any, axes: tuple[str, ...]) -> list[tuple[str, Any]]:
    """`(/layer_<l>/head_<h>, x)` for each element of a nested list whose
    axes are `axes` (`("layers", "heads")`)."""
    if not axes:
        return [("", value)]
    return [
        (f"/{axes[0].removesuffix('s')}_{i:02d}{suffix}", x)
        for i, sub in enumerate(value or [])
        for suffix, x in _elements(sub, axes[1:])
    ]


@runtime_checkable
class MetricSink(Protocol):
    """Where the metrics of each step go: `write(step, metrics)` with the
    0-based step and a line of `metrics.jsonl`; `close()` at the end."""

    def write(self, step: int, metrics: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    """Event files in `log_dir` (default `RUN/tensorboard`), written by
    tensorboardX. A resumed run purges the steps it logs again: TensorBoard
    drops the earlier events from its first step on."""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        try:
            from tensorboardX import SummaryWriter  # noqa: F401
        except ImportError as e:
            raise ImportError(
                '--log-to tensorboard needs tensorboardX: pip install "qkclip_eqx[tensorboard]"'
            ) from e
        self.log_dir = pathlib.Path(log_dir)
        self._writer = None

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._writer is None:
            from tensorboardX import SummaryWriter

            # purge_step: a resumed run's first step; TensorBoard drops the events
            # from it on that an earlier, interrupted process wrote
            self._writer = SummaryWriter(str(self.log_dir), purge_step=step, flush_secs=10)
        for name, value in scalars(metrics).items():
            self._writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _wandb_reachable(timeout: float = 2.0) -> bool:
    """Whether W&B has an API key and its server answers a TCP connect."""
    if not os.environ.get("WANDB_API_KEY"):
        netrc = pathlib.Path(os.environ.get("NETRC", pathlib.Path.home() / ".netrc"))
        if not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")):
            return False
    url = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


class WandbSink:
    """A W&B run in `RUN/wandb`, its config the run's `config`. Offline (synced
    later by `wandb sync RUN/wandb/offline-run-*`) when `WANDB_MODE` says so, or
    when it is unset and there is no API key or no network; each invocation of
    the run (a resume too) is one W&B run, grouped by the run directory."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        config: Mapping[str, Any],
        *,
        name: str | None = None,
        project: str | None = None,
        say: Callable[[str], None] = print,
    ) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ImportError('--log-to wandb needs wandb: pip install "qkclip_eqx[wandb]"') from e
        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_reachable() else "offline")
        if mode == "offline" and "WANDB_MODE" not in os.environ:
            say(
                "wandb: no API key or no network: logging offline to "
                f"{pathlib.Path(run_dir) / 'wandb'} (upload later with `wandb sync`)"
            )
        run_dir = pathlib.Path(run_dir)
        self.mode = mode
        self._run = wandb.init(
            project=project or os.environ.get("WANDB_PROJECT", "qkclip-eqx"),
            dir=str(run_dir),
            name=name or run_dir.resolve().name,
            group=str(run_dir.resolve()),
            config=dict(config),
            mode=mode,  # pyright: ignore[reportArgumentType]  # one of wandb's mode strings
        )
        self.run_dir = pathlib.Path(self._run.dir).parent  # RUN/wandb/<offline->run-...

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._run.log(scalars(metrics), step=step)

    def close(self) -> None:
        self._run.finish()


def parse_log_to(value: str) -> tuple[str, ...]:
    """`--log-to` parsed: comma-separated names of `SINKS`, each once.

    **Raises:**

    `ValueError` naming an unknown sink.
    """
    names = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    bad = [n for n in names if n not in SINKS]
    if bad:
        raise ValueError(f"unknown sink {bad[0]!r}; choose from {', '.join(SINKS)}")
    return names


def make_sinks(
    names: Sequence[str],
    run_dir: str | os.PathLike,
    config: Mapping[str, Any],
    *,
    label: str | None = None,
    say: Callable[[str], None] = print,
) -> list[MetricSink]:
    """The sinks named in `names` (of `SINKS`) for the run in `run_dir`."""
    sinks: list[MetricSink] = []
    for name in names:
        if name == "tensorboard":
            sinks.append(TensorBoardSink(pathlib.Path(run_dir) / "tensorboard"))
        elif name == "wandb":
            sinks.append(WandbSink(run_dir, config, name=label, say=say))
    return sinks


def on_step_for(sinks: Sequence[MetricSink]) -> Callable[[int, dict[str, Any]], None] | None:
    """An `on_step` for [`qkclip_eqx.train`][] that writes every step's metrics
    to `sinks` (None when there are none, so that the loop keeps reading its
    metrics one step behind)."""
    if not sinks:
        return None

    def on_step(steps_done: int, metrics: dict[str, Any]) -> None:
        del steps_done  # metrics["step"], the 0-based step of metrics.jsonl, is the x axis
        for sink in sinks:
            sink.write(metrics["step"], metrics)

    return on_step
