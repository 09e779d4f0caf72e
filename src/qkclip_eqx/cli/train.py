"""qkclip-train: train a Transformer with MuonClip on the built-in corpus.

    qkclip-train                               # the default run (preset small)
    qkclip-train --preset tiny --out runs/t    # seconds
    qkclip-train --optimizer muon --lr 1e-2    # no clip, for comparison
    qkclip-train --out runs/default --resume   # continue after a stop
    qkclip-train --config runs/a/config.json --out runs/b --seed 1   # a new run from a file
    qkclip-train --mesh data=4,model=2         # 8 devices: data and head parallelism
    qkclip-train --mesh fsdp=4,model=2         # 8 devices: FSDP and tensor parallelism

Multi-process (one process per host; every process runs the same command):
    qkclip-train --mesh data=16 --coordinator-address HOST0:1234 \\
                 --num-processes 2 --process-id $RANK
(or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; on a TPU
slice or under SLURM, --distributed alone lets JAX find them).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._checkpoint import CheckpointError, latest_checkpoint, read_meta
from .._data import TokenData
from .._evaluate import format_table, marked_tau
from .._loglines import LogLines, train_flops_per_token
from .._metric_schema import find_s, s_label
from .._model import Transformer
from .._run import load_run
from .._run_config import MUST_MATCH, RunConfig, merge_values
from .._sinks import make_sinks
from .._train import RunError, RunResult, load_run_data, train
from . import plot
from ._flags import (
    DEFAULT_PRESET,
    Parser,
    add_cache_flag,
    add_run_flags,
    given_fields,
    preset_of,
    run_config_from_args,
    use_compilation_cache,
    with_flag_names,
)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value is None else int(value)


def _resume_config(args: argparse.Namespace, given: dict[str, Any]) -> tuple[RunConfig, int]:
    """The config of a resumed run: the run's own `config.json` (or, without
    one, its newest checkpoint's), with the flags given on the command line;
    and the step of its newest checkpoint. RunError (one line) when there is
    no checkpoint, or a flag changes what a resume cannot."""
    out = pathlib.Path(given.get("out", RunConfig.out))
    if args.preset is not None or args.config is not None:
        which = "a preset: drop --preset" if args.config is None else "--config: drop it"
        raise RunError(
            f"--resume starts from the run's own config ({out / 'config.json'}), not {which} "
            "and give only the flags to change"
        )
    newest = latest_checkpoint(out)
    if newest is None:
        where = "no such directory" if not out.is_dir() else "it holds no checkpoint"
        raise RunError(
            f"--resume: nothing to resume in {out} ({where}): check --out, or drop --resume "
            "to start a new run there"
        )
    try:
        meta = read_meta(newest)
        stored = out / "config.json"
        base = (
            RunConfig.from_json(stored)
            if stored.is_file()
            else RunConfig.from_dict(meta["run"], source=f"{newest} (its run config)")
        )
    except (OSError, KeyError, ValueError) as e:
        raise RunError(f"--resume: {e}") from e
    try:
        cfg = RunConfig(**merge_values(base.to_dict(), {**given, "out": str(out)}))
    except ValueError as e:
        raise RunError(f"--resume: {with_flag_names(str(e))}") from e
    fixed = [n for n in MUST_MATCH if getattr(cfg, n) != getattr(base, n)]
    if fixed:
        raise RunError(
            "--resume cannot change "
            + ", ".join(f"{n} ({getattr(base, n)!r} -> {getattr(cfg, n)!r})" for n in fixed)
            + f": they shape the model, its optimizer state or the data of the run in {out}; "
            "start a new run with another --out"
        )
    return cfg, int(meta["step"])


def summary(cfg: RunConfig, data: TokenData, *, preset_name: str | None, start: int) -> str:
    """What a run is about to do, in a few lines: the model and its parameter
    count, the optimizer and QK-Clip, the devices and mesh, the data and
    tokens per step, and where it writes."""
    model = eqx.filter_eval_shape(
        Transformer, cfg.model_config(data.vocab_size), key=jax.random.key(0)
    )
    n_params = sum(
        x.size
        for x in jax.tree.leaves(model)
        if isinstance(x, jax.ShapeDtypeStruct) and jnp.issubdtype(x.dtype, jnp.floating)
    )
    heads = f"{cfg.n_heads} heads" + (
        f" ({cfg.n_kv_heads} kv)" if cfg.attention == "gqa" and cfg.n_kv_heads else ""
    )
    devices = jax.devices()
    kinds = ", ".join(sorted({d.device_kind for d in devices}))
    mesh = f"mesh {cfg.mesh}" if cfg.mesh else "no mesh (one device)"
    tokens = cfg.batch_size * cfg.seq_len
    clip = (
        f"QK-Clip {cfg.mode} at tau {cfg.tau:g} (alpha {cfg.alpha:g})"
        if cfg.mode != "off"
        else "QK-Clip off"
    )
    begin = (
        f"resuming from the newest checkpoint, step {start} of {cfg.steps}"
        if start
        else f"{cfg.steps} steps"
    )
    return "\n".join(
        [
            f"qkclip-train{f' (preset {preset_name})' if preset_name else ''}: {begin}",
            f"  model   {cfg.attention.upper()}, {cfg.n_layers} layers, width {cfg.dim}, {heads}: "
            f"{n_params:,} parameters ({cfg.param_dtype}; matmuls in {cfg.compute_dtype})",
            f"  optim   {cfg.optimizer}, lr {cfg.lr:g} ({cfg.schedule}, warmup {cfg.warmup_steps}), "
            f"weight decay {cfg.weight_decay:g}; {clip}",
            f"  devices {jax.process_count()} process(es), {len(devices)} x {kinds}; {mesh}",
            f"  data    {data.description}",
            f"  tokens  {cfg.batch_size} x {cfg.seq_len} = {tokens:,} per step"
            + (f" ({cfg.accum_steps} micro-batches)" if cfg.accum_steps > 1 else "")
            + f", {tokens * cfg.steps:,} in all",
            f"  out     {cfg.out}: checkpoints every {cfg.ckpt_every} steps (keep {cfg.keep}), "
            f"validation every {cfg.eval_every}",
            f"  flops   {train_flops_per_token(cfg.model_config(data.vocab_size), cfg.seq_len):,.0f}"
            " per token trained (6N + attention: the TFLOP/s and MFU of the log lines)",
        ]
    )


def _parser(preset_name: str | None) -> argparse.ArgumentParser:
    """The flags: the run's (RunConfig's fields), then multi-process, resuming, sinks, output."""
    parser = Parser(
        prog="qkclip-train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_flags(parser, preset_name)
    dist = parser.add_argument_group("multi-process (jax.distributed)")
    dist.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() (implied by the flags below)",
    )
    dist.add_argument(
        "--coordinator-address",
        default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
        help="HOST:PORT of process 0 (default: $JAX_COORDINATOR_ADDRESS)",
    )
    dist.add_argument(
        "--num-processes",
        type=int,
        default=_env_int("JAX_NUM_PROCESSES"),
        help="processes in all (default: $JAX_NUM_PROCESSES)",
    )
    dist.add_argument(
        "--process-id",
        type=int,
        default=_env_int("JAX_PROCESS_ID"),
        help="this process, 0 .. num-processes - 1 (default: $JAX_PROCESS_ID)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest checkpoint, with its own config.json "
        "and only the flags given changed (each change is printed with its effect)",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar: plain log lines instead (also when stdout is not a terminal)",
    )
    parser.add_argument(
        "--log-every",
        type=int,
        default=10,
        metavar="N",
        help="without a progress bar: one line every N steps (and at each evaluation and the "
        "end): step, loss, S, heads clipped, tokens/s, TFLOP/s, MFU (default: 10)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        metavar="F",
        help="peak TFLOP/s of one device, for the MFU of the log lines (e.g. 989 for an H100 "
        "SXM in bf16 dense; none: no MFU)",
    )
    add_cache_flag(parser)
    parser.add_argument("--no-plots", action="store_true", help="do not write PNGs at the end")
    return parser


def _report(result: RunResult, cfg: RunConfig) -> None:
    """The end of a run: where it stopped, its last losses and S per layer and head."""
    m = result.last_metrics
    print(
        f"\nstopped at step {result.step} ({result.stopped})"
        + (f"; last loss {m['loss']:.4f}" if "loss" in m else "")
        + (f", val loss {m['val_loss']:.4f}" if "val_loss" in m else "")
    )
    values, bound = find_s(m)
    if values is not None:
        s = np.array([[np.nan if x is None else x for x in row] for row in values])
        mark = "" if cfg.mode == "off" else f" (tau = {cfg.tau}, '*' = above tau)"
        print(f"max logit {s_label(bound)} per layer and head at the last step{mark}:")
        print(format_table(s, marked_tau(cfg)))


def _error(e: Exception) -> int:
    """An expected problem (bad input, a checkpoint that does not fit): one line, exit 2."""
    print(f"qkclip-train: error: {e}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    preset_name = preset_of(argv)
    parser = _parser(preset_name)
    args = parser.parse_args(argv)
    if args.log_every < 1:
        parser.error(f"--log-every must be >= 1, got {args.log_every}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        parser.error(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    if args.distributed or args.coordinator_address is not None:
        # CPU processes talk through gloo; the setting does not affect GPU/TPU.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    use_compilation_cache(args)
    lead = jax.process_index() == 0
    try:
        if args.resume:
            cfg, start = _resume_config(args, given_fields(args))
        else:
            cfg, start = run_config_from_args(args), 0
            if re.fullmatch(r"ckpt_\d+", pathlib.Path(cfg.out).name):
                raise RunError(
                    f"--out {cfg.out} is a checkpoint directory; --out takes the run directory "
                    f"({pathlib.Path(cfg.out).parent})"
                )
    except RunError as e:
        return _error(e)
    except ValueError as e:
        parser.error(with_flag_names(str(e)))
    if start >= cfg.steps:
        # The newest checkpoint says the run is finished; it is the run's state only
        # if it restores (else resume falls back to an older one, with steps to do).
        try:
            start = load_run(cfg.out, warn=lambda msg: None).step
        except CheckpointError as e:
            return _error(e)
    if start >= cfg.steps:
        if lead:
            print(
                f"{cfg.out} is finished: its newest checkpoint is step {start} of {cfg.steps}. "
                f"To train on, resume with --steps N (N > {start})."
            )
        return 0
    try:
        data = load_run_data(cfg)
    except RunError as e:
        return _error(e)
    if lead:
        print(
            summary(
                cfg,
                data,
                preset_name=None if args.resume else args.preset or DEFAULT_PRESET,
                start=start,
            ),
            flush=True,
        )
    progress = not args.no_progress and sys.stdout.isatty()
    try:
        sinks = make_sinks(cfg.sinks(), cfg.out, cfg.to_dict(), label=cfg.label) if lead else []
        if lead and not progress:
            flops = train_flops_per_token(cfg.model_config(data.vocab_size), cfg.seq_len)
            sinks.append(
                LogLines(args.log_every, cfg.steps, flops, args.peak_tflops, len(jax.devices()))
            )
    except ImportError as e:
        return _error(e)
    try:
        result = train(cfg, resume=args.resume, progress=progress, data=data, sinks=sinks)
    except (
        RunError,
        CheckpointError,
    ) as e:  # expected problems: one message; bugs keep their traceback
        return _error(e)
    finally:
        for sink in sinks:
            sink.close()

    code = {"done": 0, "interrupted": 130, "nan": 1}[result.stopped]
    if not lead:
        return code
    _report(result, cfg)
    if not args.no_plots:
        plot.main([str(result.out)])
    return code


if __name__ == "__main__":
    sys.exit(main())
