"""Loading a trained run back: the model (and optimizer state) of a run
directory's newest checkpoint that restores, or of one checkpoint, with the
run's config, and no template from the caller."""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax

from ._checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    read_meta,
)
from ._model import Transformer
from ._run_config import RunConfig, optimizer


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """What [`qkclip_eqx.load_run`][] returns.

    **Fields:**

    - `model`: the trained [`qkclip_eqx.Transformer`][].
    - `opt_state`: its optimizer state (of `config.make_optimizer()`).
    - `config`: the [`qkclip_eqx.RunConfig`][] that wrote the checkpoint.
    - `step`: the steps the checkpoint holds.
    - `checkpoint`: the checkpoint directory read.
    - `vocab_size`: the model's vocabulary.
    """

    model: Transformer
    opt_state: Any
    config: RunConfig
    step: int
    checkpoint: pathlib.Path
    vocab_size: int


def is_run_directory(path: str | os.PathLike) -> bool:
    """Whether `path` is a run directory (one that holds checkpoints, or may),
    not one checkpoint `ckpt_XXXXXXXX` nor a file."""
    path = pathlib.Path(path)
    return (
        path.is_dir()
        and not (path / "meta").exists()
        and not (path.name.startswith("ckpt_") and path.name[5:].isdigit())
    )


def run_directory_of(path: str | os.PathLike) -> pathlib.Path:
    """The run directory of `path`: itself, or the directory holding the
    checkpoint `path`."""
    path = pathlib.Path(path)
    return path if is_run_directory(path) else path.parent


def _config_of(path: pathlib.Path, meta: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.from_dict(meta["run"], source=f"{path} (its run config)")
    except KeyError as e:
        raise CheckpointError(f"{path}: the checkpoint's meta holds no {e}") from e
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def _like(cfg: RunConfig, vocab_size: int) -> tuple[Any, Any]:
    """The shapes of a run's (model, optimizer state), without computing them."""
    model = eqx.filter_eval_shape(Transformer, cfg.model_config(vocab_size), key=jax.random.key(0))
    state = eqx.filter_eval_shape(lambda m: optimizer(cfg).init(eqx.filter(m, eqx.is_array)), model)
    return model, state


def load_run(
    path: str | os.PathLike,
    step: int | None = None,
    *,
    warn: Callable[[str], None] = print,
) -> LoadedRun:
    """The trained model of a run, from its checkpoint, built from the config
    stored with it: nothing to construct first.

    ```python
    run = qc.load_run("runs/default")             # the newest checkpoint that restores
    run = qc.load_run("runs/default", step=400)   # or runs/default/ckpt_00000400
    loss, s = qc.next_token_loss(run.model, tokens)
    ```

    **Arguments:**

    - `path`: a run directory (`--out` of `qkclip-train`), or one checkpoint
      directory `ckpt_XXXXXXXX` in it.
    - `step`: with a run directory, the checkpoint of this step; default the
      newest one that restores (each newer one that does not is reported
      through `warn`, and the next older one tried).
    - `warn`: called with one line per checkpoint that could not be used.

    **Returns:**

    A [`qkclip_eqx.LoadedRun`][]: the model, optimizer state, config, step and
    checkpoint.

    **Raises:**

    `CheckpointError` naming the path when it holds no checkpoint (or not the
    one of `step`), when no checkpoint restores, or when its config is not one
    this version reads.
    """
    path = pathlib.Path(path)
    if is_run_directory(path):
        found = list_checkpoints(path)
        if not found:
            raise CheckpointError(f"{path}: no checkpoint in this directory")
        if step is not None:
            wanted = path / f"ckpt_{step:08d}"
            if wanted not in found:
                steps = ", ".join(str(int(p.name[5:])) for p in found)
                raise CheckpointError(f"{path}: no checkpoint of step {step} (steps: {steps})")
            found = [wanted]
        meta = None
        for candidate in reversed(found):  # the config, from the newest readable one
            try:
                meta = read_meta(candidate)
                break
            except CheckpointError:
                continue
        if meta is None:
            raise CheckpointError(
                f"{path}: no checkpoint in this directory has readable metadata (tried "
                + ", ".join(p.name for p in reversed(found))
                + ")"
            )
        cfg = _config_of(path, meta)
        if step is None:
            loaded = load_latest_checkpoint(path, _like(cfg, meta["vocab_size"]), warn=warn)
            assert loaded is not None  # `found` is not empty; none restoring raises
            (model, opt_state), meta, checkpoint = loaded
            cfg = _config_of(checkpoint, meta)  # an older one's own config
        else:
            checkpoint = found[0]
            (model, opt_state), meta = load_checkpoint(checkpoint, _like(cfg, meta["vocab_size"]))
    else:
        meta = read_meta(path)
        if step is not None and meta.get("step") != step:
            raise CheckpointError(f"{path}: holds step {meta.get('step')}, not {step}")
        cfg = _config_of(path, meta)
        checkpoint = path
        (model, opt_state), meta = load_checkpoint(path, _like(cfg, meta["vocab_size"]))
    return LoadedRun(
        model=model,
        opt_state=opt_state,
        config=cfg,
        step=int(meta["step"]),
        checkpoint=checkpoint,
        vocab_size=int(meta["vocab_size"]),
    )
