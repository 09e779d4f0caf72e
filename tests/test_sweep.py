"""qkclip-sweep: a 2-lr x 3-seed grid of the tiny preset from one command,
SIGKILLed mid-sweep and run again: finished runs are skipped, the killed run
resumes from its checkpoint, and the summary table and the aggregated figure
come out, their numbers those of the runs' own metrics."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from builders import synthetic_text
from qkclip_eqx import latest_checkpoint, read_metrics
from qkclip_eqx.cli import plot as qplot
from qkclip_eqx.cli import sweep as sweep_cli

STEPS = 8
SRC = pathlib.Path(__file__).resolve().parents[1] / "src"


def _command(out, data):
    return [
        sys.executable, "-m", "qkclip_eqx.cli.sweep", "--out", str(out),
        "--grid", "lr=1e-3,3e-3", "--seeds", "0,1,2", "--preset", "tiny",
        "--steps", str(STEPS), "--ckpt-every", "2", "--eval-every", "4",
        "--data", str(data), "--no-progress",
    ]  # fmt: skip


def _env(tmp):
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{SRC}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["XDG_CACHE_HOME"] = str(tmp / "cache")  # the seeds of one lr share a compile
    env["QKCLIP_EQX_COMPILATION_CACHE"] = "1"
    env.pop("XLA_FLAGS", None)
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _steps_of(run):
    """The checkpoints of `run` that are complete (a write in progress is not)."""
    newest = latest_checkpoint(run)
    return [] if newest is None else sorted(p.name for p in run.glob("ckpt_*") if p <= newest)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The sweep, killed (SIGKILL) while a run after the first is between
    checkpoints, then run again to the end. Returns its directory and what the
    second invocation printed."""
    tmp = tmp_path_factory.mktemp("sweep")
    data = tmp / "corpus.txt"
    data.write_bytes(synthetic_text(60_000, seed=3))
    out = tmp / "s"
    env = _env(tmp)
    proc = subprocess.Popen(
        _command(out, data), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    final = f"ckpt_{STEPS:08d}"
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            runs = [r for r in out.glob("*seed=*") if r.is_dir()]
            done = [r for r in runs if final in _steps_of(r)]
            partial = [r for r in runs if _steps_of(r) and final not in _steps_of(r)]
            if done and partial:
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert done and partial, "the sweep was not caught between two runs' checkpoints"
    result = subprocess.run(
        _command(out, data), env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result.stdout, [r.name for r in done], [r.name for r in partial]


def test_a_killed_sweep_resumes_skipping_finished_runs(swept):
    out, text, done, partial = swept
    names = [f"lr={lr},seed={s}" for lr in ("1e-3", "3e-3") for s in (0, 1, 2)]
    for name in done:
        assert f"{name}: finished, skipped" in text
    for name in partial:
        assert f"{name}: resuming from step " in text, text
    for name in names:
        run = out / name
        assert f"ckpt_{STEPS:08d}" in _steps_of(run)
        steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert sorted(steps) == list(range(STEPS))  # every step once: the resume rewrote its tail
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["lr"] == float(name[3:7]) and cfg["seed"] == int(name[-1])


def test_summary_is_the_mean_and_spread_of_the_runs_own_numbers(swept):
    out, text, _, _ = swept
    per_run = json.loads((out / "summary.json").read_text())["runs"]
    table = (out / "summary.md").read_text()
    assert table.splitlines()[0] == (
        "| run | seeds | final_loss | final_val_loss | peak_S | clip_rate | over_tau_rate |"
    )
    for lr in ("1e-3", "3e-3"):
        runs = [read_metrics(out / f"lr={lr},seed={s}") for s in (0, 1, 2)]
        finals = [float(m.loss[-1]) for m in runs]
        peaks = [float(np.nanmax(m.max_logits)) for m in runs]
        for s, f, p in zip((0, 1, 2), finals, peaks):
            got = per_run[f"lr={lr},seed={s}"]
            assert got["final_loss"] == f and got["peak_S"] == p
        row = next(x for x in table.splitlines() if x.startswith(f"| lr={lr} | 3 |"))
        mean, sd = np.mean(finals), np.std(finals, ddof=1)
        assert f"{mean:.4g} ± {sd:.2g}" in row.split("|")[3]
        assert row in text  # printed too


def test_the_aggregated_figure_has_one_band_per_lr(swept):
    out, _, _, _ = swept
    assert (out / "plots" / "seeds.png").stat().st_size > 10_000
    runs = [read_metrics(r) for r in sorted(out.glob("lr=*"))]
    groups = qplot.group_by_seed(runs)
    assert [qplot.group_label(g) for g in groups] == ["lr=1e-3 (3 seeds)", "lr=3e-3 (3 seeds)"]
    fig = qplot.seeds_figure(groups, window=1)
    loss_ax = fig.axes[0]
    bands = loss_ax.collections
    assert len(bands) == 2
    lines = [ln for ln in loss_ax.get_lines() if ln.get_label().startswith("lr=")]
    for group, line in zip(groups, lines):
        want = np.mean([m.loss for m in group], axis=0)
        np.testing.assert_allclose(line.get_ydata(), want, rtol=1e-12)


def test_sweep_errors_are_one_line_naming_the_flag(tmp_path, capsys):
    for args, message in [
        (["--grid", "lrr=1,2"], "--grid lrr: not a run option"),
        (["--grid", "lr"], "--grid lr: expected NAME=V1,V2"),
        (["--seeds", "0,x"], "--seeds: integers, comma-separated"),
        (["--grid", "lr=1e-3,-1"], "lr=-1,seed=0: RunConfig.lr must be > 0"),
    ]:
        with pytest.raises(SystemExit) as e:
            sweep_cli.main([*args, "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith("qkclip-sweep: error: ") and message in err, err


def test_a_config_file_is_the_same_sweep_as_the_flags(tmp_path):
    parser = sweep_cli._parser()
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({
        "out": "runs/x", "grid": {"lr": [1e-3, 0.003], "optimizer": ["muonclip", "muon"]},
        "seeds": [0, 1], "preset": "tiny", "steps": 8, "q_lora_rank": None,
    }))  # fmt: skip
    from_file = sweep_cli.read_sweep(*parser.parse_known_args(["--config", str(path)]))
    from_flags = sweep_cli.read_sweep(
        *parser.parse_known_args(
            ["--out", "runs/x", "--grid", "lr=0.001,0.003", "--grid", "optimizer=muonclip,muon",
             "--seeds", "0,1", "--preset", "tiny", "--steps", "8", "--q-lora-rank", "none"]
        )
    )  # fmt: skip
    assert from_file == from_flags
    points = from_file.points()
    assert [p[0] for p in points][:3] == [
        "lr=0.001,optimizer=muonclip,seed=0",
        "lr=0.001,optimizer=muonclip,seed=1",
        "lr=0.001,optimizer=muon,seed=0",
    ]
    assert points[0][1] == ["--lr", "0.001", "--optimizer", "muonclip", "--seed", "0"]
    assert sweep_cli._without_preset(["--preset", "tiny", "--steps", "8", "--preset=x"]) == [
        "--steps",
        "8",
    ]
    path.write_text(json.dumps({"grid": {"lr": [1]}, "stepz": 8}))
    with pytest.raises(ValueError, match="'stepz' is not a run option"):
        sweep_cli.read_sweep(*parser.parse_known_args(["--config", str(path)]))


def test_a_run_that_stopped_at_a_non_finite_step_is_not_run_again(tmp_path):
    (tmp_path / sweep_cli.NAN_MARK).write_text("")
    assert sweep_cli._state(tmp_path, 8) == ("nan", 0)
    assert sweep_cli._state(tmp_path / "none", 8) == ("new", 0)
