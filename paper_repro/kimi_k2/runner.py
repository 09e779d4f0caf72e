"""Run-or-resume one training run through ``qkclip_eqx.train``.

``status.json`` in a run directory records how far the run got (written after
``train`` returned). A run is skipped when it is done, stopped on a non-finite
loss, or already at the requested step; otherwise it is continued with
``train(..., resume=True)``, which restarts from the latest checkpoint (bit for
bit) or from scratch when there is none.

``until`` stops a run early (a checkpoint is written there): the lr sweep is
the first ``sweep_steps`` steps of runs with the main schedule, and the runs
picked for the main experiments are later continued from that checkpoint to
the end. A resumed run reproduces an uninterrupted one exactly
(qkclip_eqx's checkpoints hold model, optimizer state and step; batches are a
function of (seed, step)).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

from qkclip_eqx import RunConfig, TokenData, latest_checkpoint, train

STATUS = "status.json"


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d.pop("out")
    return d


def read_status(run_dir: str | pathlib.Path) -> dict[str, Any] | None:
    path = pathlib.Path(run_dir) / STATUS
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def finished(status: dict[str, Any] | None, target: int) -> bool:
    return status is not None and (status["stopped"] in ("done", "nan") or status["step"] >= target)


def run(cfg: RunConfig, data: TokenData, until: int | None = None, log=print) -> dict[str, Any]:
    """Train ``cfg`` to step ``until`` (default: the end) unless already there."""
    out = pathlib.Path(cfg.out)
    target = cfg.steps if until is None else min(until, cfg.steps)
    status = read_status(out)
    if status is not None and status.get("config") != config_dict(cfg):
        raise RuntimeError(
            f"{out} holds a run with another config; delete it (or use another --out)"
        )
    if finished(status, target):
        return status
    partial = latest_checkpoint(out) is not None
    log(f"  {'resume' if partial else 'run   '} {out.name} -> step {target}")
    t0 = time.perf_counter()
    stopped_here = []

    def on_step(step: int, host: dict[str, Any]) -> None:
        if step % 100 == 0:
            log(
                f"    {out.name} step {step} loss {host['loss']:.3f} S {host.get('max_logit', float('nan')):.1f} "
                f"clipped {host.get('heads_clipped', 0)} ({time.perf_counter() - t0:.0f}s)"
            )
        if step == target < cfg.steps:
            stopped_here.append(step)
            raise KeyboardInterrupt  # train() writes a checkpoint at this step and returns

    result = train(cfg, resume=True, progress=False, data=data, on_step=on_step)
    wall = time.perf_counter() - t0
    if result.stopped == "interrupted":
        if not stopped_here:
            raise KeyboardInterrupt
        stopped = "partial"
    else:
        stopped = result.stopped
    prev_wall = status["wall_s"] if status is not None else 0.0
    status = {
        "stopped": stopped,
        "step": result.step,
        "wall_s": round(prev_wall + wall, 1),
        "config": config_dict(cfg),
    }
    (out / STATUS).write_text(json.dumps(status, indent=1))
    log(f"  {stopped:<6} {out.name} at step {result.step} ({wall:.0f}s)")
    return status
