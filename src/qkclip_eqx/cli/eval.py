"""qkclip-eval: validation loss and per-head max logits of a checkpoint.

qkclip-eval runs/default/ckpt_00000600
qkclip-eval runs/default            # the newest checkpoint that restores
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import equinox as eqx
import jax

from .._checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    read_meta,
)
from .._model import Transformer
from .._train import RunConfig, RunError, evaluate, format_table, load_run_data, optimizer
from ._flags import add_cache_flag, use_compilation_cache


def _like(cfg: RunConfig, vocab_size: int):
    """The shape of a run's (model, optimizer state), without computing it."""
    like_model = eqx.filter_eval_shape(
        Transformer, cfg.model_config(vocab_size), key=jax.random.key(0)
    )
    like_state = eqx.filter_eval_shape(
        lambda m: optimizer(cfg).init(eqx.filter(m, eqx.is_array)), like_model
    )
    return like_model, like_state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qkclip-eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a checkpoint directory, or a run directory")
    parser.add_argument("--data", default=None, help="evaluate on other data (default: the run's)")
    parser.add_argument("--eval-batches", type=int, default=None)
    add_cache_flag(parser)
    args = parser.parse_args(argv)
    use_compilation_cache(args)

    path = pathlib.Path(args.checkpoint)
    is_run = path.is_dir() and not (path / "meta").is_dir()
    try:
        if is_run:
            found = list_checkpoints(path)
            if not found:
                raise CheckpointError(f"{path}: no checkpoint in this directory")
            meta = None
            for candidate in reversed(found):  # the run config, from the newest readable one
                try:
                    meta = read_meta(candidate)
                    break
                except CheckpointError:
                    continue
            if meta is None:
                raise CheckpointError(
                    f"{path}: no checkpoint in this directory has readable metadata"
                )
        else:
            meta = read_meta(path)
        overrides = {
            k: v
            for k, v in (("data", args.data), ("eval_batches", args.eval_batches))
            if v is not None
        }
        try:
            cfg = dataclasses.replace(RunConfig(**meta["run"]), **overrides)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"{path}: the checkpoint's run config is not usable here: {e}"
            ) from e
        data = load_run_data(cfg)
        if data.vocab_size > meta["vocab_size"]:
            raise RunError(f"data vocab {data.vocab_size} exceeds the model's {meta['vocab_size']}")
        like = _like(cfg, meta["vocab_size"])
        if is_run:  # the newest one that restores; each that does not is reported
            loaded = load_latest_checkpoint(
                path, like, warn=lambda msg: print(f"qkclip-eval: {msg}", file=sys.stderr)
            )
            if loaded is None:
                raise CheckpointError(f"{path}: no checkpoint")
            (model, _), meta, path = loaded
        else:
            (model, _), meta = load_checkpoint(path, like)
    except (RunError, CheckpointError) as e:
        print(f"qkclip-eval: error: {e}", file=sys.stderr)
        return 2
    loss, s = evaluate(model, data, cfg)
    print(f"checkpoint {path} (step {meta['step']})")
    print(f"data: {data.description}")
    print(f"validation loss: {loss:.4f}")
    print("max logit S per layer and head on the validation batches:")
    print(format_table(s, cfg.tau if cfg.mode == "clip" else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
