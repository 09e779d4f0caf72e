"""qkclip-eval: validation loss and per-head max logits of a checkpoint.

qkclip-eval runs/default/ckpt_00000600
qkclip-eval runs/default            # the newest checkpoint that restores
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

from .._evaluate import evaluate, format_table, marked_tau
from .._run import load_run
from .._train import RunError, load_run_data
from ._flags import add_cache_flag, use_compilation_cache


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qkclip-eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "checkpoint",
        help="a run directory (its newest checkpoint that restores), or one checkpoint "
        "directory in it (RUN/ckpt_00000600)",
    )
    parser.add_argument("--data", default=None, help="evaluate on other data (default: the run's)")
    parser.add_argument("--eval-batches", type=int, default=None)
    add_cache_flag(parser)
    args = parser.parse_args(argv)
    use_compilation_cache(args)

    path = pathlib.Path(args.checkpoint)
    try:
        run = load_run(path, warn=lambda msg: print(f"qkclip-eval: {msg}", file=sys.stderr))
        overrides = {
            k: v
            for k, v in (("data", args.data), ("eval_batches", args.eval_batches))
            if v is not None
        }
        cfg = dataclasses.replace(run.config, **overrides)
        data = load_run_data(cfg)
        if data.vocab_size > run.vocab_size:
            raise RunError(f"data vocab {data.vocab_size} exceeds the model's {run.vocab_size}")
    except (RunError, ValueError) as e:  # a CheckpointError, or a bad --eval-batches
        print(f"qkclip-eval: error: {e}", file=sys.stderr)
        return 2
    loss, s = evaluate(run.model, data, cfg)
    print(f"checkpoint {run.checkpoint} (step {run.step})")
    print(f"data: {data.description}")
    print(f"validation loss: {loss:.4f}")
    print("max logit S per layer and head on the validation batches:")
    print(format_table(s, marked_tau(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
