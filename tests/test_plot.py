"""Tests for the ``qkclip-plot`` CLI and its metric-parsing helpers."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from qkclip_eqx.cli import plot as qplot

N_LAYERS, N_HEADS, N_STEPS = 3, 4, 20
NULL_AT = (7, 1, 2)  # (step, layer, head) written as null in run "a"


def _s(run: int, step: int, layer: int, head: int) -> float:
    """Synthetic max logit; not a 'round' float so exact parsing is tested."""
    return 5.0 + 1.37 * step + 3.1 * layer + 0.29 * head + 0.013 * run


def _write_run(
    root: Path,
    name: str,
    run: int,
    *,
    mode: str = "clip",
    tau: float = 30.0,
    label: str | None = None,
    truncate: bool = False,
) -> Path:
    rd = root / name
    rd.mkdir()
    cfg = {"tau": tau, "mode": mode, "optimizer": "muonclip"}
    if label is not None:
        cfg["label"] = label
    (rd / "config.json").write_text(json.dumps(cfg))
    lines = []
    for step in range(N_STEPS):
        line: dict = {
            "step": step,
            "loss": 6.0 / (1.0 + 0.31 * step) + 0.001 * run,
            "lr": 1e-3,
            "grad_norm": 0.5 + 0.01 * step,
            "heads_clipped": (step * 5 + run) % 13,  # 0..12
            "n_nonfinite": 0,
            "tokens_per_s": 1234.5,
        }
        if mode != "off":
            ml = [[_s(run, step, la, h) for h in range(N_HEADS)] for la in range(N_LAYERS)]
            if run == 0 and step == NULL_AT[0]:
                ml[NULL_AT[1]][NULL_AT[2]] = None
            line["max_logits"] = ml
            line["max_logit"] = max(v for row in ml for v in row if v is not None)
        else:
            line["heads_clipped"] = 0
        if step == N_STEPS - 1:
            line["val_loss"] = 2.5 + 0.01 * run  # a line with both
        lines.append(json.dumps(line))
        if step % 5 == 4 and step != N_STEPS - 1:
            lines.append(json.dumps({"step": step, "val_loss": 4.0 - 0.1 * step}))
    text = "\n".join(lines) + "\n"
    if truncate:
        full = json.dumps({"step": N_STEPS, "loss": 1.0, "max_logits": [[1.0]]})
        text += full[: len(full) // 2]  # crashed mid-write: no newline either
    (rd / "metrics.jsonl").write_text(text)
    return rd


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path]:
    a = _write_run(tmp_path, "run_a", 0, mode="clip", tau=30.0, truncate=True)
    b = _write_run(tmp_path, "run_b", 1, mode="monitor", tau=50.0, label="bee")
    return a, b


def test_read_metrics_values(runs):
    a, b = runs
    with pytest.warns(UserWarning, match="truncated last line"):
        m = qplot.read_metrics(a)
    # truncated step-20 line skipped
    np.testing.assert_array_equal(m.steps, np.arange(N_STEPS))
    assert m.max_logits.shape == (N_STEPS, N_LAYERS, N_HEADS)
    for step in (0, 3, 19):
        assert m.loss[step] == 6.0 / (1.0 + 0.31 * step)
    for step, la, h in [(0, 0, 0), (5, 2, 3), (19, 1, 1), (7, 1, 1), (7, 0, 2)]:
        assert m.max_logits[step, la, h] == _s(0, step, la, h)
    # null -> NaN, and only that entry
    assert math.isnan(m.max_logits[NULL_AT])
    assert int(np.isnan(m.max_logits).sum()) == 1
    # validation: separate lines at 4, 9, 14 plus the combined line at 19
    np.testing.assert_array_equal(m.val_steps, [4, 9, 14, 19])
    assert m.val_loss[1] == 4.0 - 0.1 * 9
    assert m.val_loss[-1] == 2.5
    assert m.heads_clipped[6] == (6 * 5) % 13
    assert m.tau == 30.0 and m.mode == "clip"
    assert m.label == "run_a"  # no config label -> directory name
    assert m.n_heads_total == N_LAYERS * N_HEADS

    mb = qplot.read_metrics(b)  # no truncated line: no warning needed
    assert mb.label == "bee" and mb.mode == "monitor" and mb.tau == 50.0
    assert not np.isnan(mb.max_logits).any()
    assert mb.max_logits[12, 2, 0] == _s(1, 12, 2, 0)


def test_layer_max_ignores_null(runs):
    a, _ = runs
    with pytest.warns(UserWarning):
        m = qplot.read_metrics(a)
    lm = qplot.layer_max_logits(m)
    assert lm.shape == (N_STEPS, N_LAYERS)
    assert lm[NULL_AT[0], NULL_AT[1]] == _s(0, NULL_AT[0], NULL_AT[1], N_HEADS - 1)
    assert not np.isnan(lm).any()


def test_clipped_fraction_exact(runs):
    _, b = runs
    m = qplot.read_metrics(b)
    frac = qplot.clipped_fraction(m)
    expected = np.array([((s * 5 + 1) % 13) / 12 for s in range(N_STEPS)])
    np.testing.assert_array_equal(frac, expected)
    assert frac.max() <= 1.0


def _check_png(path: Path) -> None:
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert 150 <= img.shape[0] <= 2000 and 300 <= img.shape[1] <= 2000
    rgb = img[..., :3].reshape(-1, 3)
    assert np.unique(rgb, axis=0).shape[0] > 10  # not one uniform colour
    assert path.stat().st_size < 400_000


def test_main_writes_pngs(runs, tmp_path, capsys):
    a, b = runs
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="truncated"):
        rc = qplot.main([str(a), str(b), "--out", str(out)])
    assert rc == 0
    expected = {
        "loss.png",
        "max_logit.png",
        "clipped_fraction.png",
        "heatmap_run_a.png",
        "heatmap_bee.png",
        "heatmaps.png",
        "heads_over_tau.png",
        "optim.png",
    }
    assert {p.name for p in out.iterdir()} == expected | {"captions.md"}
    printed = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in printed) == sorted(expected | {"captions.md"})
    for name in expected:
        _check_png(out / name)
    captions = (out / "captions.md").read_text()
    assert all(f"**{name}**: " in captions for name in expected)


def test_main_labels_and_default_out(runs, tmp_path, monkeypatch, capsys):
    a, b = runs
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning):
        rc = qplot.main([str(a), str(b), "--labels", "x/1", "y 2"])
    assert rc == 0
    names = {p.name for p in (tmp_path / "plots").iterdir()}  # plots/ beside the runs
    assert {"heatmap_x_1.png", "heatmap_y_2.png"} <= names
    with pytest.raises(SystemExit) as e:
        qplot.main([str(a), str(b), "--labels", "only-one"])
    assert e.value.code == 2


def test_several_runs_plot_beside_the_runs_not_into_the_working_directory(
    tmp_path, monkeypatch, capsys
):
    root = tmp_path / "runs"
    root.mkdir()
    a = _write_run(root, "a", 0)
    b = _write_run(root, "b", 1)
    work = tmp_path / "repo"
    work.mkdir()
    monkeypatch.chdir(work)
    assert qplot.main([str(a), str(b)]) == 0
    assert (root / "plots" / "loss.png").is_file() and not (work / "plots").exists()


def test_missing_metrics(tmp_path, capsys):
    rd = tmp_path / "empty_run"
    rd.mkdir()
    rc = qplot.main([str(rd)])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(rd / "metrics.jsonl") in err
    with pytest.raises(FileNotFoundError):
        qplot.read_metrics(rd)


def test_mode_off_run(tmp_path, capsys):
    rd = _write_run(tmp_path, "off_run", 2, mode="off")
    m = qplot.read_metrics(rd)
    assert m.max_logits.shape == (N_STEPS, 0, 0)
    assert not m.has_max_logits
    # head count unknown, but 0 clipped is a 0 fraction
    np.testing.assert_array_equal(qplot.clipped_fraction(m), np.zeros(N_STEPS))
    rc = qplot.main([str(rd)])  # single run: output goes into the run dir
    assert rc == 0
    names = {p.name for p in rd.iterdir() if p.suffix == ".png"}
    assert names == {"loss.png", "max_logit.png", "clipped_fraction.png", "optim.png"}
    _check_png(rd / "loss.png")
    assert "no heatmap" in capsys.readouterr().err


def test_heatmap_pools_long_runs(runs, tmp_path):
    a, _ = runs
    with pytest.warns(UserWarning):
        m = qplot.read_metrics(a)
    rows = N_LAYERS * N_HEADS
    full = m.max_logits.reshape(N_STEPS, rows).T
    x, pooled, k = qplot._pool_columns(m.steps, full, max_cols=7)
    assert k == 3 and pooled.shape == (rows, 7) and x.shape == (8,)
    # max over steps 6..8 of the row that has the null at step 7: still finite
    row = NULL_AT[1] * N_HEADS + NULL_AT[2]
    assert pooled[row, 2] == _s(0, 8, NULL_AT[1], NULL_AT[2])
    assert pooled[0, 6] == _s(0, 19, 0, 0)  # last, partial group (18, 19)
    np.testing.assert_array_equal(x[:3], [0.0, 3.0, 6.0])
    _check_png(qplot.plot_heatmap(m, tmp_path / "h.png", max_cols=7))


# --------------------------------------------------------------------------
# Figures that compare: what a reader needs to compare runs at a glance
# --------------------------------------------------------------------------


def _both(runs):
    a, b = runs
    with pytest.warns(UserWarning):
        ma = qplot.read_metrics(a)
    return ma, qplot.read_metrics(b)


def _hline_ys(ax) -> list[float]:
    """The y of every horizontal line (axhline) of `ax`."""
    ys = []
    for line in ax.get_lines():
        x, y = line.get_xdata(), np.asarray(line.get_ydata(), float)
        if len(y) == 2 and y[0] == y[1] and list(x) == [0, 1]:
            ys.append(float(y[0]))
    return ys


def test_max_logit_panels_share_one_y_axis_and_show_every_runs_tau(runs):
    ma, mb = _both(runs)
    fig = qplot.max_logit_figure([ma, mb])
    overview, pa, pb = fig.axes
    assert overview.get_ylim() == pa.get_ylim() == pb.get_ylim()  # peaks compare at a glance
    # every run's tau, the monitor run's too (mode monitor: not applied)
    assert 30.0 in _hline_ys(pa) and 50.0 in _hline_ys(pb)
    assert sorted(_hline_ys(overview)) == [30.0, 50.0]
    labels = [t.get_text() for t in pb.get_legend().get_texts()]
    assert "tau = 50 (monitor: not applied)" in labels
    # the overview: each run's S, max over every layer and head, from the file's numbers
    curves = [ln for ln in overview.get_lines() if len(ln.get_xdata()) == N_STEPS]
    assert len(curves) == 2
    for run, line in enumerate(curves):
        want = [
            max(_s(run, s, la, h) for la in range(N_LAYERS) for h in range(N_HEADS))
            for s in range(N_STEPS)
        ]
        np.testing.assert_allclose(line.get_ydata(), want, rtol=1e-12)


def test_floor_note_only_where_a_value_was_floored(tmp_path, runs):
    ma, mb = _both(runs)
    fig = qplot.max_logit_figure([ma, mb])
    texts = [ax.get_title() for ax in fig.axes] + [fig.get_suptitle()]
    assert not any("drawn at" in t for t in texts)  # nothing floored: no note
    low = dataclasses.replace(mb, max_logits=mb.max_logits.copy())
    low.max_logits[3] = 0.0  # every head of every layer at step 3
    fig = qplot.max_logit_figure([ma, low])
    overview, pa, pb = fig.axes
    assert "drawn at" not in pa.get_title()
    assert f"{N_LAYERS} values <= 0.001 drawn at 0.001" in pb.get_title()
    assert "1 values <= 0.001 drawn at 0.001" in overview.get_title()


def _reference_smooth(v, w):
    h = w // 2
    return np.array([np.mean(v[max(0, i - h) : i + h + 1]) for i in range(len(v))])


def test_loss_is_smoothed_with_validation_on_top_and_a_difference_panel(runs):
    ma, mb = _both(runs)
    fig = qplot.loss_figure([ma, mb], window=5)
    ax, diff = fig.axes
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    train = lines["run_a (train, mean of 5 steps)"]
    np.testing.assert_allclose(train.get_ydata(), _reference_smooth(ma.loss, 5), rtol=1e-12)
    val = lines["run_a (validation)"]
    np.testing.assert_array_equal(val.get_xdata(), [4, 9, 14, 19])
    assert val.get_marker() == "o"
    train_lines = [ln for ln in ax.get_lines() if "validation" not in str(ln.get_label())]
    assert val.get_zorder() > max(ln.get_zorder() for ln in train_lines)  # drawn on top
    # the difference panel: bee minus run_a, train losses differ by 0.001 at every
    # step; validation losses by 0 at steps 4, 9, 14 and by 0.01 at step 19
    dlines = {ln.get_label(): ln for ln in diff.get_lines()}
    np.testing.assert_allclose(dlines["train, mean of 5 steps"].get_ydata(), 0.001, rtol=1e-9)
    vd = next(ln for name, ln in dlines.items() if name.startswith("validation"))
    np.testing.assert_array_equal(vd.get_xdata(), [4, 9, 14, 19])
    np.testing.assert_allclose(vd.get_ydata(), [0, 0, 0, 0.01], atol=1e-12)
    assert "bee is lower" in diff.get_title()
    assert len(qplot.loss_figure([ma]).axes) == 1  # one run: no difference to draw


def test_smooth_matches_a_moving_mean_and_skips_nan():
    v = np.array([1.0, 4.0, 2.0, 8.0, 5.0, 7.0, 3.0])
    np.testing.assert_allclose(qplot.smooth(v, 3), _reference_smooth(v, 3), rtol=1e-15)
    v[2] = np.nan
    assert qplot.smooth(v, 3)[1] == (1.0 + 4.0) / 2 and qplot.smooth(v, 3)[2] == (4.0 + 8.0) / 2


def test_heatmap_rows_name_layer_and_head_and_runs_share_one_colour_scale(
    runs, monkeypatch, tmp_path
):
    ma, mb = _both(runs)
    fig = qplot.heatmap_figure(ma)
    ax = fig.axes[0]
    want = [f"L{la} h{h}" for la in range(N_LAYERS) for h in range(N_HEADS)]
    assert [t.get_text() for t in ax.get_yticklabels()] == want
    # qkclip-plot a b: both heatmaps on one colour scale, spanning both runs' S
    norms = []
    real = qplot.heatmap_figure
    monkeypatch.setattr(
        qplot,
        "heatmap_figure",
        lambda m, **kw: norms.append(kw["norm"]) or real(m, **kw),
    )
    with pytest.warns(UserWarning):
        assert qplot.main([str(runs[0]), str(runs[1]), "--out", str(tmp_path / "o")]) == 0
    assert len(norms) == 2 and norms[0] is norms[1]
    both = np.concatenate([ma.max_logits.ravel(), mb.max_logits.ravel()])
    assert norms[0].vmin == np.nanmin(both) and norms[0].vmax == np.nanmax(both)


# --------------------------------------------------------------------------
# Print: formats, resolution, tokens on x, smoothing, the Muon comparison
# --------------------------------------------------------------------------


def _four(tmp_path):
    """Two clip and two monitor runs, tau 30, with batch 4 x seq 8 in their
    config; the monitor runs log heads_over_tau, the clip runs leave it to be
    counted from S."""
    runs = []
    for i, mode in enumerate(["clip", "clip", "monitor", "monitor"]):
        rd = _write_run(tmp_path, f"r{i}", i, mode=mode, tau=30.0)
        cfg = json.loads((rd / "config.json").read_text())
        (rd / "config.json").write_text(json.dumps({**cfg, "batch_size": 4, "seq_len": 8}))
        if mode == "monitor":
            lines = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
            for x in lines:
                if "loss" in x:
                    x["heads_over_tau"] = x["step"] % 5
            (rd / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        runs.append(qplot.read_metrics(rd))
    return runs


def test_heads_over_tau_for_monitor_and_clip_runs(tmp_path):
    runs = _four(tmp_path)
    ax = qplot.heads_over_tau_figure(runs).axes[0]
    lines = ax.get_lines()
    assert len(lines) == 4
    total = N_LAYERS * N_HEADS
    for m, line in zip(runs, lines):
        if m.mode == "monitor":  # the logged count
            want = (m.steps % 5) / total
        else:  # counted from S per layer and head
            want = np.array([sum(_s(int(m.label[1]), s, la, h) > 30.0
                                 for la in range(N_LAYERS) for h in range(N_HEADS))
                             for s in range(N_STEPS)]) / total  # fmt: skip
        np.testing.assert_array_equal(line.get_ydata(), want)
    assert [t.get_text() for t in ax.get_legend().get_texts()][2] == "r2 (monitor, tau 30)"
    smoothed = qplot.heads_over_tau_figure(runs, window=3).axes[0].get_lines()[2]
    np.testing.assert_allclose(
        smoothed.get_ydata(), _reference_smooth((runs[2].steps % 5) / total, 3), rtol=1e-12
    )


def test_tokens_on_the_x_axis_and_lr_and_grad_norm_panels(tmp_path):
    runs = _four(tmp_path)
    lr_ax, gn_ax = qplot.optim_figure(runs, x="tokens").axes
    line = lr_ax.get_lines()[0]
    np.testing.assert_array_equal(line.get_xdata(), (np.arange(N_STEPS) + 1) * 32)
    np.testing.assert_array_equal(line.get_ydata(), np.full(N_STEPS, 1e-3))
    np.testing.assert_array_equal(gn_ax.get_lines()[1].get_ydata(), 0.5 + 0.01 * runs[1].steps)
    assert gn_ax.get_xlabel() == "tokens" and gn_ax.get_yscale() == "log"
    loss_ax = qplot.loss_figure(runs, x="tokens").axes[0]
    val = next(ln for ln in loss_ax.get_lines() if ln.get_label() == "r0 (validation)")
    np.testing.assert_array_equal(val.get_xdata(), (np.array([4, 9, 14, 19]) + 1) * 32)


def test_several_heatmaps_share_one_scale_and_colours_turn_at_tau(tmp_path):
    runs = _four(tmp_path)
    fig = qplot.heatmaps_figure(runs)
    from matplotlib.collections import QuadMesh

    meshes = [c for ax in fig.axes[:-1] for c in ax.collections if isinstance(c, QuadMesh)]
    assert len(meshes) == 4 and len(fig.axes) == 5  # four panels, one colour bar
    norms = {id(mesh.norm) for mesh in meshes}
    assert len(norms) == 1
    norm, cmap = meshes[0].norm, meshes[0].cmap
    everything = np.concatenate([m.max_logits.ravel() for m in runs])
    assert norm.vmin == np.nanmin(everything) and norm.vmax == np.nanmax(everything)
    below, above = cmap(norm(29.5)), cmap(norm(30.5))
    assert below[1] > below[0] and above[0] > above[1] + 0.3  # green-blue below, red above
    bar = fig.axes[-1]
    assert [t.get_text() for t in bar.texts] == ["tau 30"]


def test_pdf_svg_and_dpi(tmp_path, capsys):
    runs = [str(p) for p in (tmp_path / f"r{i}" for i in range(4))]
    _four(tmp_path)
    for fmt, magic in (("pdf", b"%PDF"), ("svg", b"<svg")):
        out = tmp_path / fmt
        assert qplot.main([*runs, "--out", str(out), "--format", fmt, "--aggregate"]) == 0
        files = sorted(p.name for p in out.iterdir())
        assert f"seeds.{fmt}" in files and f"heads_over_tau.{fmt}" in files
        assert all(p.endswith((f".{fmt}", ".md")) for p in files)
        assert magic in (out / f"loss.{fmt}").read_bytes()[:400]
    for dpi in (50, 100):
        qplot.main([runs[0], "--out", str(tmp_path / f"d{dpi}"), "--dpi", str(dpi)])
    small = mpimg.imread(tmp_path / "d50" / "loss.png").shape
    big = mpimg.imread(tmp_path / "d100" / "loss.png").shape
    assert big[:2] == (2 * small[0], 2 * small[1])
    with pytest.raises(SystemExit):
        qplot.main([runs[0], "--format", "jpg"])
    assert "argument --format: invalid choice: 'jpg'" in capsys.readouterr().err


def test_x_in_tokens_needs_the_batch_shape_in_one_line(tmp_path, capsys):
    rd = _write_run(tmp_path, "bare", 0)  # no batch_size or seq_len in its config
    with pytest.raises(SystemExit):
        qplot.main([str(rd), "--x", "tokens"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--x tokens: no batch_size and seq_len" in err
