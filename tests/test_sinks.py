"""Metric sinks against the real libraries: a short run logs to TensorBoard
(tensorboardX) and W&B (offline, chosen because there is no API key), and the
event file, read back by TensorBoard's own reader, and the W&B run directory,
read back by `wandb leet inspect`, hold the numbers of metrics.jsonl."""

import json
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from builders import synthetic_corpus
from qkclip_eqx._run_config import preset
from qkclip_eqx._sinks import (
    TensorBoardSink,
    WandbSink,
    on_step_for,
    parse_log_to,
    scalars,
)
from qkclip_eqx._train import train
from qkclip_eqx.cli import train as train_cli

STEPS = 4


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A tiny run with both sinks; W&B without an API key, so offline."""
    out = tmp_path_factory.mktemp("run")
    cfg = preset("tiny", steps=STEPS, eval_every=2, ckpt_every=STEPS, out=str(out))
    said = []
    with pytest.MonkeyPatch.context() as mp:
        for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
            mp.delenv(name, raising=False)
        mp.setenv("NETRC", str(out / "no-netrc"))
        mp.setenv("WANDB_SILENT", "true")
        sinks = [
            TensorBoardSink(out / "tensorboard"),
            WandbSink(out, {"tau": cfg.tau}, say=said.append),
        ]
        try:
            # TensorBoard as qkclip-train feeds it (one step behind, no host sync);
            # W&B through on_step, as a user's own train loop would
            train(
                cfg,
                progress=False,
                data=synthetic_corpus(100_000),
                sinks=sinks[:1],
                on_step=on_step_for(sinks[1:]),
            )
        finally:
            for sink in sinks:
                sink.close()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return out, records, sinks, said


def test_tensorboard_event_file_holds_every_step(logged):
    out, records, _, _ = logged
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "qk_clip/S_max", "val/loss"} <= tags
    assert {"qk_clip/heads_clipped", "S/layer_01/head_01"} <= tags

    def series(tag):
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    # TensorBoard stores float32
    for key, tag in [("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm")]:
        got = series(tag)
        assert [s for s, _ in got] == list(range(STEPS))
        want = [r[key] for r in records]
        # TensorBoard stores float32: at most half a float32 ulp (6e-8); measured 0 here
        np.testing.assert_allclose([v for _, v in got], want, rtol=1.2e-7)
    assert [s for s, _ in series("val/loss")] == [1, 3]
    np.testing.assert_allclose(
        [v for _, v in series("val/loss")], [r["val_loss"] for r in records if "val_loss" in r]
    )
    s = [[v for _, v in series(f"S/layer_{la:02d}/head_{h:02d}")] for la in (0, 1) for h in (0, 1)]
    want = [[r["max_logits"][la][h] for r in records] for la in (0, 1) for h in (0, 1)]
    np.testing.assert_allclose(s, want, rtol=1.2e-7)  # as above; measured 0
    assert [v for _, v in series("qk_clip/heads_clipped")] == [r["heads_clipped"] for r in records]


def test_wandb_offline_run_directory_holds_every_step(logged):
    _, records, sinks, said = logged
    wandb_sink = sinks[1]
    assert wandb_sink.mode == "offline" and "offline" in said[0]
    assert wandb_sink.run_dir.name.startswith("offline-run-")
    text = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(wandb_sink.run_dir)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = [json.loads(x) for x in text.splitlines() if x.startswith("{")]
    history = [x["history"]["item"] for x in lines if x.get("type") == "history"]
    assert [h["_step"] for h in history] == list(range(STEPS))
    for h, r in zip(history, records, strict=True):
        assert h["train/loss"] == r["loss"] and h["train/lr"] == r["lr"]  # JSON: exact
        assert h["qk_clip/S_max"] == r["max_logit"]
        assert h["S/layer_00/head_01"] == r["max_logits"][0][1]
        assert h.get("val/loss") == r.get("val_loss")
    config = next(x["run"]["config"]["update"] for x in lines if x.get("type") == "run")
    assert config["tau"] == preset("tiny").tau


def test_scalars_names_every_metric_and_drops_a_null_s():
    line = {
        "step": 7,
        "loss": 2.5,
        "lr": 1e-3,
        "grad_norm": 0.75,
        "tokens_per_s": 1000.0,
        "max_logit": 12.0,
        "heads_clipped": 1,
        "heads_over_tau": 2,
        "n_nonfinite": 0,
        "max_logits": [[12.0, None], [3.0, 4.0]],
        "val_loss": 2.75,
    }
    assert scalars(line) == {
        "train/loss": 2.5,
        "train/lr": 1e-3,
        "train/grad_norm": 0.75,
        "train/tokens_per_s": 1000.0,
        "qk_clip/S_max": 12.0,
        "qk_clip/heads_clipped": 1.0,
        "qk_clip/heads_over_tau": 2.0,
        "qk_clip/n_nonfinite": 0.0,
        "val/loss": 2.75,
        "S/layer_00/head_00": 12.0,
        "S/layer_01/head_00": 3.0,
        "S/layer_01/head_01": 4.0,
    }


def test_log_to_names_a_bad_sink(tmp_path, capsys):
    assert parse_log_to("tensorboard, wandb,tensorboard") == ("tensorboard", "wandb")
    with pytest.raises(ValueError, match="unknown sink 'tensorbord'"):
        parse_log_to("tensorbord")
    with pytest.raises(SystemExit):
        train_cli.main(["--preset", "tiny", "--out", str(tmp_path), "--log-to", "tensorbord"])
    assert "unknown sink 'tensorbord'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def bound_run(tmp_path_factory):
    """A tiny run whose attention reports the log-sum-exp bound of S
    (`max_logit="lse_bound"`), logged to TensorBoard."""
    out = tmp_path_factory.mktemp("bound")
    cfg = preset(
        "tiny",
        steps=3,
        eval_every=3,
        ckpt_every=3,
        out=str(out),
        kernel="dot_product_attention",
        max_logit="lse_bound",
    )
    sink = TensorBoardSink(out / "tensorboard")
    try:
        train(cfg, progress=False, data=synthetic_corpus(100_000), sinks=[sink])
    finally:
        sink.close()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return out, records


def test_an_lse_bound_runs_s_reaches_tensorboard_read_metrics_and_the_plot(bound_run):
    """The bound is logged under its own keys (metrics.jsonl), sent to
    TensorBoard under the bound's names, read back by read_metrics (flagged as
    a bound) and drawn by qkclip-plot labelled as a bound."""
    from qkclip_eqx._metric_schema import bar_items
    from qkclip_eqx._metrics import layer_max_logits, read_metrics
    from qkclip_eqx.cli import plot

    out, records = bound_run
    assert all("max_logits_lse_bound" in r and "max_logits" not in r for r in records)
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert "qk_clip/S_max_lse_bound" in tags and "qk_clip/S_max" not in tags
    got = [e.value for e in acc.Scalars("qk_clip/S_max_lse_bound")]
    # TensorBoard stores float32: at most half a float32 ulp; measured 0 here
    np.testing.assert_allclose(got, [r["max_logit_lse_bound"] for r in records], rtol=1.2e-7)
    got = [e.value for e in acc.Scalars("S_lse_bound/layer_01/head_00")]
    want = [r["max_logits_lse_bound"][1][0] for r in records]
    np.testing.assert_allclose(got, want, rtol=1.2e-7)

    m = read_metrics(out)
    assert m.has_max_logits and m.s_bound and m.max_logits.shape == (3, 2, 2)
    np.testing.assert_array_equal(m.max_logits, [r["max_logits_lse_bound"] for r in records])
    fig = plot.max_logit_figure([m])
    (ax,) = fig.axes
    assert ax.get_title().endswith(": S bound (log-sum-exp)")
    assert ax.get_ylabel() == "S bound (log-sum-exp) (log)"
    lines = [ln for ln in ax.get_lines() if ln.get_label().startswith("layer")]
    assert len(lines) == 2
    np.testing.assert_array_equal(lines[1].get_ydata(), layer_max_logits(m)[:, 1])
    assert bar_items(records[-1])["S_bound"] == f"{records[-1]['max_logit_lse_bound']:.1f}"


def test_scalars_of_a_bound_line_use_the_bounds_names():
    line = {"loss": 2.5, "max_logit_lse_bound": 12.0, "max_logits_lse_bound": [[12.0, 3.0]]}
    assert scalars(line) == {
        "train/loss": 2.5,
        "qk_clip/S_max_lse_bound": 12.0,
        "S_lse_bound/layer_00/head_00": 12.0,
        "S_lse_bound/layer_00/head_01": 3.0,
    }


def test_log_to_is_part_of_the_run_and_survives_resume(tmp_path, capsys):
    """--log-to is a field of the run's config: a resume without it keeps
    logging to TensorBoard, so the event files hold every step."""
    out = tmp_path / "run"
    common = ["--no-progress", "--no-plots", "--out", str(out)]
    tiny = ["--preset", "tiny", "--ckpt-every", "2", "--eval-every", "2"]
    assert train_cli.main([*tiny, "--steps", "2", "--log-to", "tensorboard", *common]) == 0
    assert json.loads((out / "config.json").read_text())["log_to"] == "tensorboard"
    assert train_cli.main(["--resume", "--steps", "4", *common]) == 0
    capsys.readouterr()
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 1, 2, 3]
