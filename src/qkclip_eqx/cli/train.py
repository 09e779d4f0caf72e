"""qkclip-train: train a Transformer with MuonClip on the built-in corpus.

    qkclip-train                               # the default run (preset small)
    qkclip-train --preset tiny --out runs/t    # seconds
    qkclip-train --optimizer muon --lr 1e-2    # no clip, for comparison
    qkclip-train --out runs/default --resume   # continue after a stop
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np

from .._train import format_table, train
from . import plot
from ._flags import add_run_flags, run_config_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qkclip-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_flags(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-plots", action="store_true", help="do not write PNGs at the end")
    args = parser.parse_args(argv)
    try:
        cfg = run_config_from_args(args)
    except ValueError as e:
        parser.error(str(e))

    print("qkclip-train config:")
    for f in dataclasses.fields(cfg):
        print(f"  {f.name} = {getattr(cfg, f.name)!r}")
    try:
        result = train(cfg, resume=args.resume, progress=not args.no_progress)
    except (FileExistsError, ValueError) as e:  # CheckpointError is a ValueError
        print(f"qkclip-train: error: {e}", file=sys.stderr)
        return 2

    m = result.last_metrics
    print(f"\nstopped at step {result.step} ({result.stopped}); last loss {m.get('loss', float('nan')):.4f}"
          + (f", val loss {m['val_loss']:.4f}" if "val_loss" in m else ""))
    if "max_logits" in m:
        s = np.array([[np.nan if x is None else x for x in row] for row in m["max_logits"]])
        print(f"max logit S per layer and head at the last step (tau = {cfg.tau}, '*' = above tau):")
        print(format_table(s, cfg.tau if cfg.mode == "clip" else None))
    if not args.no_plots:
        plot.main([str(result.out)])
    return {"done": 0, "interrupted": 130, "nan": 1}[result.stopped]


if __name__ == "__main__":
    sys.exit(main())
