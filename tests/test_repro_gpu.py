"""paper_repro.kimi_k2.gpu: the one-command GPU preset, checked on CPU at a
tiny size (``--tiny``: width 32, one layer, 6 steps, bfloat16 compute as on the GPU) by the same
code. Nothing here times anything. The preset itself (widths 512 and 1024)
is only planned here: its parameter count against the model the library
builds, and its run list.
"""

import json
import math
import pathlib
import sys
import warnings

import equinox as eqx
import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import qkclip_eqx as qc  # noqa: E402
from paper_repro.kimi_k2 import corpus as C  # noqa: E402
from paper_repro.kimi_k2 import gpu  # noqa: E402

SUMMARY = ROOT / "paper_repro" / "kimi_k2" / "results" / "summary.json"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("kimi_k2_gpu_tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", C.CorpusMismatchWarning)
        summ = gpu.main(["--tiny", "--out", str(out)])
    return out, summ


def test_predicted_lr_star_is_the_cpu_maps_power_law():
    summ = json.loads(SUMMARY.read_text())
    ws = [64, 128, 256]
    lrs = [summ["best"][str(w)]["muon"]["lr"] for w in ws]
    p, logc = np.polyfit(np.log(ws), np.log(lrs), 1)
    got = gpu.predicted_lr_star(summ, (512, 1024))
    for w in (512, 1024):
        # float64 polyfit both ways: measured rel 2e-16
        assert got[w] == pytest.approx(math.exp(logc) * w**p, rel=1e-12)
    assert got[1024] < got[512] < 0.01  # the best lr falls with width in the CPU map
    with pytest.raises(ValueError, match="widths"):
        gpu.predicted_lr_star({"best": {"64": {"muon": {"lr": 0.01}}}}, (512,))


@pytest.mark.parametrize("preset,width", [("tiny", 32), ("gpu", 512)])
def test_parameter_count_is_the_models(preset, width):
    p = gpu.PRESETS[preset]
    cfg = qc.RunConfig(**p.model(width), batch_size=p.batch_size, seq_len=p.seq_len)
    model = eqx.filter_eval_shape(
        lambda k: qc.Transformer(cfg.model_config(256), key=k), jax.random.key(0)
    )
    n = sum(x.size for x in jax.tree.leaves(model) if isinstance(x, jax.ShapeDtypeStruct))
    assert gpu.model_params(p, width) == n


def test_gpu_plan():
    pl = gpu.plan(gpu.GPU)
    assert pl["runs"] == 16 and pl["steps"] == 16 * 600
    assert gpu.GPU.widths == (512, 1024) and gpu.GPU.extra == {"compute_dtype": "bfloat16"}
    with pytest.raises(ValueError, match="--steps"):
        gpu.main(["--tiny", "--out", "unused", "--steps", "2"])


def test_tiny_runs_the_preset_and_writes_compact_logs(tiny):
    out, summ = tiny
    assert json.loads((out / "summary.json").read_text())["runs"] == summ["runs"]
    assert not summ["skipped"] and len(summ["runs"]) == gpu.plan(gpu.TINY)["runs"] == 8
    for w in gpu.TINY.widths:
        rows = {n: r for n, r in summ["runs"].items() if r["width"] == w}
        muon = [r for r in rows.values() if r["optimizer"] == "muon"]
        pred = summ["predicted_lr_star"][str(w)]
        assert sorted(r["lr"] for r in muon) == pytest.approx(
            [pred * f for f in gpu.LR_FACTORS], rel=1e-12
        )
        best = min(muon, key=lambda r: r["val_loss"])["lr"]
        assert summ["best_lr"][str(w)] == best
        for opt in ("muonclip", "adamw"):
            got = sorted(r["lr"] for r in rows.values() if r["optimizer"] == opt)
            assert got == pytest.approx([best * f for f in gpu.CLIP_FACTORS], rel=1e-12)
        for name, r in rows.items():
            with np.load(out / "logs" / f"{name}.npz") as z:
                lg = {k: z[k] for k in z.files}
            layers = gpu.TINY.model(w)["n_layers"]
            heads = gpu.TINY.model(w)["n_heads"]
            assert lg["loss"].shape == (r["steps_run"],) == lg["clipped_heads"].shape
            assert lg["s_max"].shape == (r["steps_run"], layers)
            assert lg["head_peak"].shape == (layers, heads)
            # the compact log agrees with itself and with the summary: bit-equal maxima
            np.testing.assert_array_equal(lg["head_peak"].max(axis=1), lg["s_max"].max(axis=0))
            assert r["peak_s"] == float(lg["s_max"].max())
            assert r["val_loss"] == float(lg["val_loss"])
            assert r["clip_steps"] == int(np.sum(lg["clipped_heads"] > 0))
            np.testing.assert_array_equal(lg["lr"] > 0, np.arange(r["steps_run"]) > 0)


def test_deadline_skips_runs_and_still_writes_the_summary(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", C.CorpusMismatchWarning)
        summ = gpu.main(["--tiny", "--out", str(tmp_path), "--deadline-min", "0"])
    assert not summ["runs"] and len(summ["skipped"]) == 4 * len(gpu.TINY.widths)
    assert json.loads((tmp_path / "summary.json").read_text())["skipped"] == summ["skipped"]
