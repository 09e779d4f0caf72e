"""qkclip-sweep: a grid of runs over any run options and seeds, one run directory
each, one after another; resumable; a summary table and figures at the end.

    qkclip-sweep --out sweeps/lr --grid lr=1e-3,3e-3 --seeds 0,1,2 --preset tiny
    qkclip-sweep --out sweeps/opt --grid optimizer=muonclip,muon --grid tau=30,100 --steps 300
    qkclip-sweep --config sweep.json            # {"out": ..., "grid": {...}, "seeds": [...], "preset": ...}

Every flag that is not the sweep's own goes to every run (`qkclip-train --help`
lists them). Each point of the grid, with each seed, is the run directory
`OUT/<name>=<value>,...,seed=<seed>`. Run the same command again after a stop
(Ctrl-C, a killed job): finished runs are skipped, a run with a checkpoint is
resumed (`qkclip-train --resume`), and the rest start. At the end: the table
`OUT/summary.md` (final loss, peak S, clip rate per run, and per grid point
the mean and the spread over seeds), `OUT/summary.json`, and the figures of
`qkclip-plot --aggregate` in `OUT/plots`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._checkpoint import latest_checkpoint, read_meta
from .._metrics import RunMetrics, clipped_fraction, read_metrics
from .._run_config import RunConfig
from . import plot
from . import train as train_cli
from ._flags import Parser


def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="qkclip-sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default=None, help="the sweep's directory (default: sweeps/default)")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="NAME=V1,V2",
        help="a run option and its values (repeat for a product of several); NAME is any "
        "qkclip-train flag, with - or _",
    )
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: 0)")
    p.add_argument(
        "--config",
        default=None,
        metavar="JSON",
        help='a file {"out": DIR, "grid": {NAME: [values]}, "seeds": [..], other keys: run '
        "options for every run}; flags on the command line override it",
    )
    p.add_argument("--format", choices=("png", "pdf", "svg"), default="png", help="figures")
    p.add_argument("--no-plots", action="store_true", help="no figures at the end")
    return p


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A sweep as given: its directory, the grid (name, values as text), the
    seeds, and the flags every run gets."""

    out: pathlib.Path
    grid: list[tuple[str, list[str]]]
    seeds: list[int]
    flags: list[str]

    def points(self) -> list[tuple[str, list[str], str]]:
        """`(run name, its grid flags, its group label)` for every point and seed."""
        names = [n for n, _ in self.grid]
        out = []
        for values in itertools.product(*(v for _, v in self.grid)):
            pairs = [f"{n}={v}" for n, v in zip(names, values)]
            flags = [f for n, v in zip(names, values) for f in (_flag(n), v)]
            for seed in self.seeds:
                name = ",".join([*pairs, f"seed={seed}"]).replace("/", "_")
                out.append((name, [*flags, "--seed", str(seed)], " ".join(pairs) or "run"))
        return out


def _flag(name: str) -> str:
    return "--" + name.strip().lstrip("-").replace("_", "-")


def _as_text(value: Any) -> str:
    return "none" if value is None else json.dumps(value) if isinstance(value, bool) else str(value)


def _split_values(text: str, what: str) -> list[str]:
    values = [v.strip() for v in text.split(",")]
    if not all(values):
        raise ValueError(f"{what}: empty value in {text!r}")
    return values


def read_sweep(args: argparse.Namespace, rest: list[str]) -> Sweep:
    """The sweep of the command line (over the `--config` file). ValueError
    naming the flag or key when something is not a run option or a value."""
    config: dict[str, Any] = {}
    if args.config is not None:
        try:
            config = json.loads(pathlib.Path(args.config).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"--config {args.config}: {e}") from None
        if not isinstance(config, dict):
            raise ValueError(f"--config {args.config}: a JSON object is needed")
    fields = {f.name for f in dataclasses.fields(RunConfig)} | {"preset"}
    grid: dict[str, list[str]] = {}
    cfg_grid = config.pop("grid", {})
    if not isinstance(cfg_grid, dict):
        raise ValueError(f"--config {args.config}: 'grid' is an object of lists")
    for name, values in cfg_grid.items():
        values = values if isinstance(values, list) else [values]
        grid[name.replace("-", "_")] = [_as_text(v) for v in values]
    for item in args.grid:
        name, sep, values = item.partition("=")
        if not sep:
            raise ValueError(f"--grid {item}: expected NAME=V1,V2")
        grid[name.strip().replace("-", "_")] = _split_values(values, f"--grid {item}")
    for name in grid:
        if name not in fields - {"out", "seed", "preset"}:
            raise ValueError(f"--grid {name}: not a run option (qkclip-train --help lists them)")
    seeds_given = config.pop("seeds", [0]) if args.seeds is None else args.seeds
    try:
        seeds = (
            [int(s) for s in _split_values(seeds_given, "--seeds")]
            if isinstance(seeds_given, str)
            else [int(s) for s in seeds_given]
        )
    except (TypeError, ValueError):
        raise ValueError(f"--seeds: integers, comma-separated; got {seeds_given!r}") from None
    out = pathlib.Path(args.out or config.pop("out", None) or "sweeps/default")
    config.pop("out", None)
    flags = []
    for name, value in config.items():
        if name.replace("-", "_") not in fields:
            raise ValueError(f"--config {args.config}: {name!r} is not a run option")
        flags += [_flag(name), _as_text(value)]
    return Sweep(out, list(grid.items()), seeds, [*flags, *rest])


def _without_preset(flags: list[str]) -> list[str]:
    """The flags less `--preset X`: a resumed run starts from its own config."""
    out, skip = [], False
    for f in flags:
        if skip:
            skip = False
        elif f == "--preset":
            skip = True
        elif not f.startswith("--preset="):
            out.append(f)
    return out


#: In a run directory: written when the run stopped at a non-finite step, so
#: that running the sweep again does not resume it into the same step.
NAN_MARK = "sweep_stopped_nan"


def _state(run: pathlib.Path, steps: int) -> tuple[str, int]:
    """`("new" | "partial" | "done" | "nan", step of its newest checkpoint)`
    of a run of `steps` steps."""
    if (run / NAN_MARK).is_file():
        return "nan", 0
    newest = latest_checkpoint(run)
    if newest is None:
        return "new", 0
    try:
        step = int(read_meta(newest)["step"])
    except (OSError, KeyError, ValueError):
        return "partial", 0
    return ("done" if step >= steps else "partial"), step


def run_summary(m: RunMetrics) -> dict[str, float]:
    """One run's numbers: the last train loss and validation loss, the peak S
    (max over steps, layers and heads), and the clip rate (mean share of heads
    clipped per step) and over-tau rate (mean share of heads above tau)."""
    s = m.max_logits[np.isfinite(m.max_logits)]
    n = m.n_heads_total
    with np.errstate(all="ignore"):
        return {
            "final_loss": float(m.loss[-1]) if len(m.loss) else math.nan,
            "final_val_loss": float(m.val_loss[-1]) if len(m.val_loss) else math.nan,
            "peak_S": float(s.max()) if s.size else math.nan,
            "clip_rate": float(np.nanmean(clipped_fraction(m))) if len(m.steps) else math.nan,
            "over_tau_rate": (
                float(np.nanmean(m.scalars["heads_over_tau"]) / n)
                if n and "heads_over_tau" in m.scalars
                else math.nan
            ),
        }


COLUMNS = ("final_loss", "final_val_loss", "peak_S", "clip_rate", "over_tau_rate")


def _mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; NaN for one value)."""
    v = np.asarray(values, np.float64)
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else math.nan


def summary_table(groups: dict[str, list[dict[str, float]]]) -> str:
    """A Markdown table: one row per grid point, each column `mean ± sd` over
    its seeds (sample standard deviation) and the number of seeds."""
    head = "| run | seeds | " + " | ".join(COLUMNS) + " |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for label, runs in groups.items():
        cells = []
        for col in COLUMNS:
            mean, sd = _mean_spread([r[col] for r in runs])
            cells.append(f"{mean:.4g}" + ("" if math.isnan(sd) else f" ± {sd:.2g}"))
        rows.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    try:
        sweep = read_sweep(args, rest)
    except ValueError as e:
        parser.error(str(e))
    points = sweep.points()
    # every run's flags parse before the first step: a typo fails now, in one line
    check = train_cli._parser(None)
    check.prog = parser.prog
    steps = {}
    for name, flags, _ in points:
        try:
            steps[name] = train_cli.run_config_from_args(
                check.parse_args([*sweep.flags, *flags, "--out", str(sweep.out / name)])
            ).steps
        except ValueError as e:
            parser.error(f"{name}: {e}")
    sweep.out.mkdir(parents=True, exist_ok=True)
    print(f"qkclip-sweep: {len(points)} runs in {sweep.out}", flush=True)
    for i, (name, flags, label) in enumerate(points, 1):
        run = sweep.out / name
        state, step = _state(run, steps[name])
        where = f"[{i}/{len(points)}] {name}"
        if state in ("done", "nan"):
            what = "finished" if state == "done" else f"stopped at a non-finite step ({NAN_MARK})"
            print(f"{where}: {what}, skipped", flush=True)
            continue
        common = [*flags, "--out", str(run), "--label", f"{label} seed={flags[-1]}", "--no-plots"]
        if state == "partial":
            print(f"{where}: resuming from step {step}", flush=True)
            argv_run = [*_without_preset(sweep.flags), *common, "--resume"]
        else:
            print(f"{where}: starting", flush=True)
            argv_run = [*sweep.flags, *common]
        code = train_cli.main(argv_run)
        if code == 2:  # bad input: every later run would fail alike
            print(f"qkclip-sweep: error: {name} failed (above); stopping", file=sys.stderr)
            return 2
        if code == 130:
            return 130
        if code == 1:  # a non-finite step: a result (this lr diverges), kept as it is
            (run / NAN_MARK).write_text("qkclip-train stopped at a non-finite step\n")
    return _finish(sweep, points, args)


def _finish(
    sweep: Sweep, points: list[tuple[str, list[str], str]], args: argparse.Namespace
) -> int:
    runs: list[RunMetrics] = []
    groups: dict[str, list[dict[str, float]]] = {}
    per_run = {}
    for name, _, label in points:
        m = read_metrics(sweep.out / name)
        runs.append(m)
        per_run[name] = run_summary(m)
        groups.setdefault(label, []).append(per_run[name])
    table = summary_table(groups)
    (sweep.out / "summary.md").write_text(
        table + "\n\nmean ± sample standard deviation over seeds; clip_rate: mean share of "
        "heads clipped per step; over_tau_rate: mean share of heads with S above tau.\n"
    )
    (sweep.out / "summary.json").write_text(json.dumps({"runs": per_run}, indent=1))
    print(table)
    if not args.no_plots:
        plot.write_figures(runs, sweep.out / "plots", fmt=args.format, aggregate=True)
        print(f"figures: {sweep.out / 'plots'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
