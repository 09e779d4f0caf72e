"""qkclip-train: train a Transformer with MuonClip on the built-in corpus.

    qkclip-train                               # the default run (preset small)
    qkclip-train --preset tiny --out runs/t    # seconds
    qkclip-train --optimizer muon --lr 1e-2    # no clip, for comparison
    qkclip-train --out runs/default --resume   # continue after a stop
    qkclip-train --mesh data=4,model=2         # 8 devices: data and head parallelism

Multi-process (one process per host; every process runs the same command):
    qkclip-train --mesh data=16 --coordinator-address HOST0:1234 \
                 --num-processes 2 --process-id $RANK
(or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; on a TPU
slice or under SLURM, --distributed alone lets JAX find them).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import numpy as np

from .._checkpoint import CheckpointError
from .._evaluate import format_table
from .._sinks import make_sinks, on_step_for, parse_log_to
from .._train import RunError, train
from . import plot
from ._flags import add_cache_flag, add_run_flags, run_config_from_args, use_compilation_cache


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value is None else int(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qkclip-train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_flags(parser)
    dist = parser.add_argument_group("multi-process (jax.distributed)")
    dist.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() (implied by the flags below)",
    )
    dist.add_argument("--coordinator-address", default=os.environ.get("JAX_COORDINATOR_ADDRESS"))
    dist.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"))
    dist.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"))
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --out"
    )
    parser.add_argument(
        "--log-to",
        default="",
        metavar="SINKS",
        help="also send each step's metrics to: tensorboard (RUN/tensorboard), wandb "
        "(RUN/wandb; offline without an API key or network), comma-separated; needs the "
        "qkclip_eqx[tensorboard] or [wandb] extra",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_cache_flag(parser)
    parser.add_argument("--no-plots", action="store_true", help="do not write PNGs at the end")
    args = parser.parse_args(argv)
    use_compilation_cache(args)
    if args.distributed or args.coordinator_address is not None:
        # CPU processes talk through gloo; the setting does not affect GPU/TPU.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    try:
        cfg = run_config_from_args(args)
        log_to = parse_log_to(args.log_to)
    except ValueError as e:
        parser.error(str(e))

    lead = jax.process_index() == 0
    if lead:
        print("qkclip-train config:")
        for f in dataclasses.fields(cfg):
            print(f"  {f.name} = {getattr(cfg, f.name)!r}")
    try:
        sinks = (
            make_sinks(log_to, cfg.out, dataclasses.asdict(cfg), label=cfg.label) if lead else []
        )
    except ImportError as e:
        print(f"qkclip-train: error: {e}", file=sys.stderr)
        return 2
    try:
        result = train(
            cfg, resume=args.resume, progress=not args.no_progress, on_step=on_step_for(sinks)
        )
    except (
        RunError,
        CheckpointError,
    ) as e:  # expected problems: one message; bugs keep their traceback
        print(f"qkclip-train: error: {e}", file=sys.stderr)
        return 2
    finally:
        for sink in sinks:
            sink.close()

    code = {"done": 0, "interrupted": 130, "nan": 1}[result.stopped]
    if not lead:
        return code
    m = result.last_metrics
    print(
        f"\nstopped at step {result.step} ({result.stopped}); last loss {m.get('loss', float('nan')):.4f}"
        + (f", val loss {m['val_loss']:.4f}" if "val_loss" in m else "")
    )
    if "max_logits" in m:
        s = np.array([[np.nan if x is None else x for x in row] for row in m["max_logits"]])
        print(
            f"max logit S per layer and head at the last step (tau = {cfg.tau}, '*' = above tau):"
        )
        print(format_table(s, cfg.tau if cfg.mode == "clip" else None))
    if not args.no_plots:
        plot.main([str(result.out)])
    return code


if __name__ == "__main__":
    sys.exit(main())
