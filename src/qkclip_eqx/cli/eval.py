"""qkclip-eval: validation loss and per-head max logits of a checkpoint.

    qkclip-eval runs/default/ckpt_00000600.eqx
    qkclip-eval runs/default            # the latest checkpoint in a run directory
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import equinox as eqx
import jax

from .._checkpoint import latest_checkpoint, load_checkpoint, read_meta
from .._data import load_data
from .._model import Transformer
from .._train import RunConfig, evaluate, format_table, optimizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qkclip-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint file, or a run directory")
    parser.add_argument("--data", default=None, help="evaluate on other data (default: the run's)")
    parser.add_argument("--eval-batches", type=int, default=None)
    args = parser.parse_args(argv)

    path = pathlib.Path(args.checkpoint)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            print(f"qkclip-eval: error: no checkpoint in {path}", file=sys.stderr)
            return 2
        path = found
    try:
        meta = read_meta(path)
        overrides = {k: v for k, v in (("data", args.data), ("eval_batches", args.eval_batches)) if v is not None}
        cfg = dataclasses.replace(RunConfig(**meta["run"]), **overrides)
        data = load_data(cfg.data, max_bytes=cfg.max_bytes)
        if data.vocab_size > meta["vocab_size"]:
            raise ValueError(f"data vocab {data.vocab_size} exceeds the model's {meta['vocab_size']}")
        like_model = eqx.filter_eval_shape(Transformer, cfg.model_config(meta["vocab_size"]), key=jax.random.key(0))
        like_state = eqx.filter_eval_shape(lambda m: optimizer(cfg).init(eqx.filter(m, eqx.is_array)), like_model)
        (model, _), meta = load_checkpoint(path, (like_model, like_state))
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"qkclip-eval: error: {path}: {e}", file=sys.stderr)
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
