"""paper_repro.kimi_k2: the quick pipeline, checked against its own logs.

The quick pipeline runs ONCE (module fixture, ~1-2 min on 2 CPU cores); each
reported number is recomputed here straight from the runs' metrics.jsonl,
without the package's analysis code.
"""

import json
import pathlib
import sys

import equinox as eqx
import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from paper_repro.kimi_k2 import pipeline  # noqa: E402
from qkclip_eqx._data import stdlib_corpus  # noqa: E402
from qkclip_eqx._train import preset, train  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("kimi_k2_quick")
    summ = pipeline.main(["--quick", "--out", str(out)])
    return out, summ


def _records(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    cfg = json.loads((run_dir / "config.json").read_text())
    steps = np.array([r["step"] for r in lines])
    s = np.array([[[np.nan if v is None else v for v in row] for row in r["max_logits"]] for r in lines])
    clipped = np.array([r["heads_clipped"] for r in lines])
    return cfg, steps, s, clipped


def _clip_runs(out):
    for d in sorted((out / "runs").iterdir()):
        if (d / "config.json").is_file():
            cfg = json.loads((d / "config.json").read_text())
            if cfg["optimizer"] == "muonclip":
                yield d


def test_overshoot_is_the_max_after_the_first_clip(quick):
    out, summ = quick
    reported = summ["overshoot"]["max"]
    per_run = {r["run"]: r["overshoot"] for r in summ["overshoot"]["runs"]}
    assert per_run, "the quick pipeline must clip somewhere"
    seen = []
    for d in _clip_runs(out):
        cfg, steps, s, clipped = _records(d)
        tau = cfg["tau"]
        over = np.nan_to_num(s, nan=-np.inf) > tau
        np.testing.assert_array_equal(over.sum(axis=(1, 2)), clipped)  # the logged count agrees
        hit = np.nonzero(over.any(axis=(1, 2)))[0]
        if len(hit) == 0:
            assert d.name not in per_run
            continue
        after = np.nanmax(s[hit[0] + 1:].reshape(len(steps) - hit[0] - 1, -1), axis=1) / tau
        assert np.all(after <= reported * (1 + 1e-12))  # no head beyond the reported bound
        assert per_run[d.name] == pytest.approx(float(after.max()), rel=1e-12)
        seen.append(float(after.max()))
    assert reported == pytest.approx(max(seen), rel=1e-12)  # the bound is attained


def test_clipped_fraction_per_layer(quick):
    out, summ = quick
    n_clipping = 0
    for tau_key, row in summ["fig2_right"].items():
        cfg, steps, s, clipped = _records(out / "runs" / row["run"])
        tau = float(tau_key)
        ever = (np.nan_to_num(s, nan=-np.inf) > tau).any(axis=0)  # [layers, heads]
        c = row["clip"]
        assert c["ever_clipped_by_layer"] == pytest.approx(ever.mean(axis=1).tolist())
        assert c["ever_clipped"] == pytest.approx(ever.mean())
        any_t = (np.nan_to_num(s, nan=-np.inf) > tau).any(axis=(1, 2))
        last = int(steps[any_t][-1]) if any_t.any() else -1
        assert c["last_clip_step"] == last
        if last >= 0:
            n_clipping += 1
            assert c["clip_off_fraction"] == pytest.approx((last + 1) / cfg["steps"])
            assert np.all(clipped[steps > last] == 0)
    assert n_clipping >= 1


def test_results_md_holds_the_numbers(quick):
    out, summ = quick
    md = (out / "results.md").read_text()
    assert f"{summ['overshoot']['max']:.3f}" in md
    assert f"lr* = **{summ['lr_star']:g}**" in md
    for t, row in summ["fig2_right"].items():
        c = row["clip"]
        assert f"| {t} | **{c['ever_clipped']:.1%}** | " + " | ".join(
            f"{x:.0%}" for x in c["ever_clipped_by_layer"]) in md
    for f in summ["fig12"]:
        assert f"lr {f['lr']:g}: MuonClip - Muon = {f['diff_mean']:+.4f}" in md
        for r in f["seeds"]:
            assert f"| {r['seed']} | {r['val_muon']:.4f} | {r['val_clip']:.4f} |" in md
    left = summ["fig2_left"]
    assert f"S = {left['peak_s']:.1f} at step {left['peak_step']}" in md
    for v in ("python", "jax", "equinox", "optax"):
        assert summ["versions"][v] in md
    for png in ("fig2_left_muon", "fig2_right_muonclip", "appD_heads_clipped", "fig12_loss",
                "appE_lr_sweep", "overshoot"):
        assert (out / f"{png}.png").stat().st_size < 150_000
        assert f"({png}.png)" in md
    json.loads((out / "summary.json").read_text())


def test_app_e_has_adamw_with_qk_clip(quick):
    """App. E's AdamW + QK-Clip column: one run per swept lr, AdamW with mode clip
    at the sweep's tau, and its logged clip count is the count of heads with S > tau."""
    out, summ = quick
    sw = summ["sweep"]
    md = (out / "results.md").read_text()
    assert "| AdamW+clip S |" in md and "not run" not in md
    assert set(sw["runs"]["adamw_clip"]) == {f"{lr:g}" for lr in sw["lrs"]}
    for lr in sw["lrs"]:
        row = sw["runs"]["adamw_clip"][f"{lr:g}"]
        cfg, steps, s, clipped = _records(out / "runs" / row["run"])
        assert (cfg["optimizer"], cfg["mode"], cfg["tau"]) == ("adamw", "clip", sw["tau"])
        np.testing.assert_array_equal((np.nan_to_num(s, nan=-np.inf) > cfg["tau"]).sum(axis=(1, 2)), clipped)
        v = row["s_fixed"]
        line = [x for x in md.splitlines() if x.startswith(f"| {lr:g} | ") and x.count("|") == 11]
        assert len(line) == 1  # the App. E table's row for this lr
        assert line[0].split(" | ")[5].startswith(f"{v:.1f}" if np.isfinite(v) else "n/a")
    assert any(r["clip"]["first_clip_step"] >= 0 for r in sw["runs"]["adamw_clip"].values())


def _leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(model, eqx.is_array))]


def test_monitor_and_unreached_clip_leave_the_weights_of_the_unclipped_run(tmp_path):
    """What lets the pipeline stand the monitor run in for MuonClip at a tau
    that S never reaches: Muon + monitor, Muon with S not even reduced
    (mode off), and MuonClip with an unreachable tau give bit-identical weights."""
    data = stdlib_corpus(max_bytes=200_000)
    kw = dict(steps=4, eval_every=4, ckpt_every=4, lr=5e-2, seed=3)
    runs = {
        "monitor": preset("tiny", optimizer="muon", mode="monitor", out=str(tmp_path / "a"), **kw),
        "off": preset("tiny", optimizer="muon", mode="off", out=str(tmp_path / "b"), **kw),
        "clip_unreached": preset("tiny", optimizer="muonclip", tau=1e9, out=str(tmp_path / "c"), **kw),
    }
    models = {k: train(cfg, progress=False, data=data).model for k, cfg in runs.items()}
    ref = _leaves(models["monitor"])
    for k in ("off", "clip_unreached"):
        for a, b in zip(ref, _leaves(models[k]), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=k)
    s = [json.loads(x)["max_logit"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert 0 < max(s) < 1e9
