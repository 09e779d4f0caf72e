"""paper_repro.kimi_k2: the pre-registered rules on synthetic inputs with
known answers, the corpus hash check, and the quick pipeline end to end.

The quick pipeline runs ONCE (module fixture). Its reported numbers are
recomputed here from the runs' metrics.jsonl with plain json/NumPy, and one
MuonClip run is replayed step by step: after each clip, the probe S of the
first layer must equal gamma x the probe S of the UNCLIPPED update
(gamma = min(1, tau / S_t)), so the overshoot S(probe, t+1) is bounded by
tau x (the unclipped update's growth of S), a bound computed from the update
rather than from the logged maximum. (Layer 0 only: its inputs are the
embeddings, which the clip does not touch; later layers' inputs change with
the clip of the layers before them.)
"""

import dataclasses
import hashlib
import json
import math
import pathlib
import sys
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import qkclip_eqx as qc  # noqa: E402
from builders import unclipped_update  # noqa: E402
from paper_repro.kimi_k2 import corpus as C  # noqa: E402
from paper_repro.kimi_k2 import pipeline, report, runner  # noqa: E402
from paper_repro.kimi_k2 import settings as S  # noqa: E402

WORDS = {S.REPRODUCED, S.NOT_REPRODUCED, S.NOT_TESTED}


# --------------------------------------------------------------------------
# rules on synthetic inputs
# --------------------------------------------------------------------------


def test_diverged_rule_fires():
    down = list(np.linspace(5.5, 2.0, 100))
    assert not S.diverged(down)
    assert S.diverged(down[:50] + [float("nan")])
    assert S.diverged(down + [3.0] * 40)  # blew up from ~2.1 to 3.0: >= 0.5 above its best mean
    assert not S.diverged(down + [2.4] * 40)
    assert S.diverged([5.5] * 100)  # never learned
    assert S.diverged(list(np.linspace(5.5, 5.2, 100)))  # learned < 0.5 nats


def test_best_lr_and_extension():
    lrs = [1e-3, 1e-2, 1e-1]
    assert S.best_lr(lrs, [3.0, 2.0, 2.5], [False] * 3) == {
        "lr": 1e-2,
        "edge": None,
        "why": "lowest final val loss among the runs that did not diverge",
    }
    assert S.best_lr(lrs, [3.0, 2.0, 1.0], [False] * 3)["edge"] == "high"
    assert S.best_lr(lrs, [1.0, 2.0, 1.5], [False] * 3)["edge"] == "low"
    # the best loss belongs to a diverged run: it is not chosen
    assert S.best_lr(lrs, [3.0, 2.0, 1.0], [False, False, True])["lr"] == 1e-2
    assert S.best_lr(lrs, [3.0, 2.0, 1.0], [True] * 3)["lr"] is None
    assert S.extension(lrs, "high") == pytest.approx(0.1 * math.sqrt(10))
    assert S.extension(lrs, "low") == pytest.approx(1e-3 / math.sqrt(10))
    assert S.extension(lrs, None) is None


def test_schedule_reaches_two_weight_decay_times_and_matches_wsd():
    for lr in (3e-3, 1e-2, 3e-2):
        sch = S.schedule(lr, S.FULL)
        assert sch["warmup"] + sch["flat"] + sch["decay"] == sch["total"]
        wdt = S.wd_time(lr, S.FULL.weight_decay, sch["flat"])
        assert wdt >= 2.0 or sch["flat"] == S.FULL.flat_max
        spec = runner.RunSpec(
            name="x",
            optimizer="muon",
            lr=lr,
            weight_decay=0.1,
            seed=0,
            steps=sch["total"],
            warmup_steps=sch["warmup"],
            decay_fraction=sch["decay"] / sch["total"],
            tau=1.0,
            model=S.MODEL_QUICK,
            batch_size=2,
            seq_len=8,
            probe_every=1,
            norms_every=1,
            val_every=1,
            corpus_sha256="",
        )
        f = spec.schedule()
        d = sch["decay_start"]
        assert float(f(d - 1)) == pytest.approx(lr) and float(f(d)) == pytest.approx(lr)
        assert float(f(d + 1)) < lr and float(f(sch["total"])) == pytest.approx(0.0, abs=1e-12)


def test_choose_tau():
    assert S.choose_tau([40.3, 100.0, 61.0], S.FULL) == 20.0
    assert S.choose_tau([41.0], S.FULL) == 20.5
    assert S.choose_tau([0.2], S.FULL) == 0.25
    with pytest.raises(ValueError, match="non-finite"):
        S.choose_tau([float("nan")], S.FULL)


def test_t_quantiles_are_student_t():
    # independent: integrate Student's t density from 0 to the tabulated quantile
    for df, q in enumerate(S.T975, start=1):
        x = np.linspace(0.0, q, 400_001)
        c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
        pdf = c * (1 + x**2 / df) ** (-(df + 1) / 2)
        assert np.trapezoid(pdf, x) == pytest.approx(0.475, abs=1e-7)


def test_paired_ci():
    ci = S.paired_ci([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0
    assert ci["hi"] - 2.0 == pytest.approx(4.302652730 * 1.0 / math.sqrt(3))
    assert math.isnan(S.paired_ci([1.0])["lo"])


def test_every_verdict_word_is_reachable():
    R, N, T = S.REPRODUCED, S.NOT_REPRODUCED, S.NOT_TESTED
    assert S.verdict_explosion([1500, 900, 1200], True)[0] == R
    assert S.verdict_explosion([1500, 900, 200], True)[0] == N
    assert S.verdict_explosion([1500, 1500, 1500], False)[0] == T
    assert S.verdict_spikes([2, 1, 0], [0, 0, 0], True)[0] == R
    assert S.verdict_spikes([2, 0, 0], [0, 0, 0], True)[0] == N
    assert S.verdict_spikes([2, 2, 2], [2, 2, 2], True)[0] == N  # the clip removes none
    assert S.verdict_spikes([2, 2, 2], [0, 0, 0], False)[0] == T
    assert S.verdict_cap([1.1, 1.2, 1.0], [True] * 3)[0] == R
    assert S.verdict_cap([1.1, 1.3, 1.0], [True] * 3)[0] == N
    assert S.verdict_cap([1.1, 1.1, 1.1], [True, False, True])[0] == T
    # decay from step 2020, flat 2000: switched off iff last clip < 1820
    assert S.verdict_switch_off([500, 1000, 2019], 2020, 2000, 2.0, 2.0)[0] == R
    assert S.verdict_switch_off([500, 1900, 2019], 2020, 2000, 2.0, 2.0)[0] == N
    assert S.verdict_switch_off([-1, -1, 100], 2020, 2000, 2.0, 2.0)[0] == N
    assert S.verdict_switch_off([500, 500, 500], 2020, 2000, 1.5, 2.0)[0] == T
    assert S.verdict_head_fraction([0.1, 0.2, 0.9], [True] * 3)[0] == R
    assert S.verdict_head_fraction([0.1, 0.3, 0.9], [True] * 3)[0] == N
    assert S.verdict_head_fraction([0.0] * 3, [False] * 3)[0] == T
    # margin 1% of 2.0 = 0.02
    assert S.verdict_negligible([0.001, -0.002, 0.0005], 2.0, 0.01, [True] * 3)[0] == R
    assert S.verdict_negligible([0.10, 0.11, 0.12], 2.0, 0.01, [True] * 3)[0] == N
    assert S.verdict_negligible([-0.10, -0.11, -0.12], 2.0, 0.01, [True] * 3)[0] == N
    assert S.verdict_negligible([0.0, 0.05, -0.05], 2.0, 0.01, [True] * 3)[0] == T
    assert S.verdict_negligible([0.0] * 3, 2.0, 0.01, [True, True, False])[0] == T
    assert S.verdict_muon_faster([1.0, 1.1, 0.9], True)[0] == R
    assert S.verdict_muon_faster([-1.0, -1.1, -0.9], True)[0] == N
    assert S.verdict_muon_faster([0.01, -0.01, 0.0], True)[0] == N  # within +-log 1.25
    assert S.verdict_muon_faster([1.0, -1.0, 0.5], True)[0] == T
    assert S.verdict_muon_faster([1.0, 1.1, 0.9], False)[0] == T
    assert S.verdict_update_rank([3.0, 3.5, 2.5])[0] == R
    assert S.verdict_update_rank([-3.0, -3.5, -2.5])[0] == N
    assert S.verdict_update_rank([3.0, -3.5, 0.5])[0] == T
    # the hypothesis: warmup 20, predicted ratio 3
    assert S.verdict_wd_hypothesis([620, 920], [220, 320], 20, 3.0, 1820)[0] == S.SUPPORTED
    assert S.verdict_wd_hypothesis([620, 920], [520, 820], 20, 3.0, 1820)[0] == S.NOT_SUPPORTED
    assert S.verdict_wd_hypothesis([1900, 920], [220, 320], 20, 3.0, 1820)[0] == S.NOT_TESTED


def test_update_growth_on_synthetic_records():
    from paper_repro.kimi_k2 import analysis as A

    # one layer, two heads, tau 10: at step 0 head 0 has S 20 (gamma 0.5), head 1 is not clipped
    recs = [
        {"step": 0, "s": [[20.0, 5.0]], "probe_s": [[18.0, 4.0]]},
        {"step": 1, "s": [[11.0, 5.0]], "probe_s": [[10.8, 100.0]]},
        {"step": 2, "s": [[9.0, 5.0]]},
    ]
    assert A.update_growth(recs, 10.0) == pytest.approx(10.8 / (0.5 * 18.0))
    assert math.isnan(A.update_growth(recs, 30.0))


def test_settings_validate():
    with pytest.raises(ValueError, match="Settings.flat_min"):
        dataclasses.replace(S.QUICK, flat_min=30, flat_max=20)
    with pytest.raises(ValueError, match="Settings.lr_multipliers"):
        dataclasses.replace(S.QUICK, lr_multipliers=(3.0,))
    with pytest.raises(ValueError, match="Settings.seeds"):
        dataclasses.replace(S.QUICK, seeds=(0,))


# --------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------


def _fake_stdlib(root: pathlib.Path) -> None:
    for i in range(40):
        p = root / ("pkg" if i % 3 else "") / f"m{i:02d}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"# module {i}\n" + "x = 1\n" * (50 + i))
    (root / "site-packages").mkdir()
    (root / "site-packages" / "skip.py").write_text("skipped\n")


def test_corpus_hash_and_mismatch(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _fake_stdlib(a)
    _fake_stdlib(b)
    (b / "only_b.py").write_text("not in a\n")
    (b / "m00.py").write_text("differs\n")
    manifest = tmp_path / "manifest.txt"
    h = C.build_manifest([a, b], manifest)
    expected, rows = C.read_manifest(manifest)
    assert expected == h
    names = [r[2] for r in rows]
    assert (
        "m00.py" not in names
        and "only_b.py" not in names
        and not any("site-packages" in n for n in names)
    )
    assert len(names) == 39 and names == sorted(names)
    # independent hash of the listed files
    ref = hashlib.sha256()
    for n in names:
        data = (a / n).read_bytes()
        ref.update(n.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    assert ref.hexdigest() == h
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data, rec = C.load_corpus(a, manifest=manifest)
    assert rec["matches"] and rec["sha256"] == h and rec["files"] == 39
    assert len(data.train) + len(data.val) == sum((a / n).stat().st_size for n in names)
    # one byte changed, one file removed: the hash differs, loudly
    (a / names[0]).write_text((a / names[0]).read_text() + "#\n")
    (a / names[1]).unlink()
    with pytest.warns(C.CorpusMismatchWarning, match="CORPUS MISMATCH"):
        _, rec = C.load_corpus(a, manifest=manifest)
    assert not rec["matches"] and rec["differing"] == [names[0]] and rec["missing"] == [names[1]]


def test_committed_manifest_on_this_python():
    expected, rows = C.read_manifest()
    assert len(rows) == 642
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", C.CorpusMismatchWarning)
        _, rec = C.load_corpus()
    # the listed versions have these files byte for byte; elsewhere the
    # mismatch must be reported, file by file
    assert rec["matches"] == (not rec["missing"] and not rec["differing"])
    if sys.version_info[:3] in ((3, 11, 7), (3, 12, 1), (3, 13, 0)):
        assert rec["matches"] and rec["sha256"] == expected


# --------------------------------------------------------------------------
# the quick pipeline, end to end
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("kimi_k2_quick")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", C.CorpusMismatchWarning)
        summ = pipeline.main(["--quick", "--out", str(out)])
    return out, summ


def _log(out, name):
    return [json.loads(x) for x in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]


def test_quick_writes_results(quick):
    out, summ = quick
    md = (out / "results.md").read_text()
    assert summ["corpus"]["sha256"] in md
    for f in (
        "presweep.png",
        "fig2_left_muon.png",
        "fig2_right_muonclip.png",
        "appD_head_fraction.png",
        "fig12_paired.png",
        "appE_muon_vs_adamw.png",
        "overshoot.png",
        "wd_hypothesis.png",
    ):
        assert (out / f).stat().st_size > 10_000 and f in md
    for tag in ("1x", "3x"):
        for v in summ["verdicts"][tag].values():
            assert v["word"] in WORDS and f"**{v['word']}**: {v['why']}" in md
    assert summ["verdicts"]["wd_hypothesis"]["word"] in {S.SUPPORTED, S.NOT_SUPPORTED, S.NOT_TESTED}
    assert json.loads((out / "summary.json").read_text())["n_runs"] == summ["n_runs"] == 18
    assert ("CORPUS MISMATCH" in md) == (not summ["corpus"]["matches"])
    other = {**summ, "corpus": {**summ["corpus"], "matches": False, "sha256": "0" * 64}}
    figs = dict.fromkeys(
        ("presweep", "fig2_left", "fig2_right", "appd", "fig12", "appe", "overshoot", "wd"), "x.png"
    )
    assert report.results_md(other, figs).count("CORPUS MISMATCH") == 1


def test_quick_numbers_recomputed_from_logs(quick):
    out, summ = quick
    s = S.QUICK
    for mult, m in summ["main"]["multipliers"].items():
        peaks = []
        for r in m["muon"]:
            recs = _log(out, r["run"])
            peak = max(max(max(row) for row in x["probe_s"]) for x in recs if "probe_s" in x)
            assert r["peak_probe_s"] == peak
            assert r["final_val"] == [x["val_loss"] for x in recs if "val_loss" in x][-1]
            peaks.append(peak)
        assert m["tau"] == max(0.25, math.floor(0.5 * min(peaks) * 4) / 4)
        diffs = []
        for u, c in zip(m["muon"], m["clip"]):
            recs = _log(out, c["run"])
            over = np.array([x["s"] for x in recs]) > m["tau"]
            steps = [x["step"] for x in recs if (np.array(x["s"]) > m["tau"]).any()]
            assert c["clip"]["first"] == steps[0] and c["clip"]["last"] == steps[-1]
            assert c["clip"]["fraction"] == over.any(axis=0).mean()
            assert [x["clipped"] for x in recs] == list(over.reshape(len(recs), -1).sum(axis=1))
            diffs.append(c["final_val"] - u["final_val"])
        base = float(np.mean([u["final_val"] for u in m["muon"]]))
        want = S.verdict_negligible(diffs, base, s.equivalence_margin, [True] * len(diffs))
        assert summ["verdicts"][f"{mult}x"]["fig12_negligible"] == {"word": want[0], "why": want[1]}
    # the pre-sweep's lr* by the rule, from the logs
    for opt in ("muon", "adamw"):
        sw = summ["sweep"][opt]
        vals = [_log(out, r["run"])[-1]["val_loss"] for r in sw["runs"]]
        assert S.best_lr(sw["grid"], vals, [r["diverged"] for r in sw["runs"]])["lr"] == sw["lr"]


def test_quick_second_invocation_trains_nothing(quick):
    out, summ = quick
    again = pipeline.main(["--quick", "--out", str(out), "--no-train"])
    assert again["trained_this_invocation"] == [] and again["verdicts"] == summ["verdicts"]


_fwd = eqx.filter_jit(qc.next_token_loss)


def test_overshoot_bounded_by_the_unclipped_update(quick):
    out, summ = quick
    m = summ["main"]["multipliers"]["3"]
    name = m["clip"][0]["run"]
    st = json.loads((out / "runs" / name / "status.json").read_text())
    spec = runner.RunSpec(**st["spec"])
    recs = _log(out, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", C.CorpusMismatchWarning)
        data, _ = C.load_corpus()
    probe = jnp.asarray(runner.spread_windows(data.val, S.QUICK.probe_windows, S.QUICK.seq_len))
    cfg = qc.RunConfig(**spec.model, batch_size=spec.batch_size, seq_len=spec.seq_len)
    model = qc.Transformer(cfg.model_config(256), key=jax.random.key(spec.seed))
    opt = runner.optimizer(spec)
    state = opt.init(eqx.filter(model, eqx.is_array))
    step = qc.make_train_step(opt, mode="clip", tau=spec.tau)
    copy = lambda t: jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, t)  # noqa: E731
    n_checked = 0
    for t in range(spec.steps - 1):
        batch = jnp.asarray(
            qc.get_batch(
                data.train, batch_size=spec.batch_size, seq_len=spec.seq_len, seed=spec.seed, step=t
            )
        )
        s_t = np.asarray(_fwd(model, batch)[1])
        assert np.allclose(s_t, recs[t]["s"], rtol=1e-5)  # the log is this run
        unclipped = unclipped_update(model, opt, state, batch)
        p_t = np.asarray(_fwd(model, probe)[1])[0]
        model, state, _ = step(copy(model), copy(state), batch)
        if not (s_t > spec.tau).any():
            continue
        s_next = np.asarray(_fwd(model, probe)[1])[0]
        s_unc = np.asarray(_fwd(unclipped, probe)[1])[0]
        gamma = np.minimum(1.0, spec.tau / s_t[0])
        np.testing.assert_allclose(s_next, gamma * s_unc, rtol=2e-4)
        # the overshoot bound, from the update: S(probe, t+1) <= tau x S_unclipped(probe) / S_t
        clipped = s_t[0] > spec.tau
        assert (s_next[clipped] <= spec.tau * s_unc[clipped] / s_t[0][clipped] * (1 + 2e-4)).all()
        if "probe_s" in recs[t + 1]:
            np.testing.assert_allclose(recs[t + 1]["probe_s"][0], s_next, rtol=1e-5)
            # the logged pair's growth (analysis.update_growth) is the unclipped update's, in layer 0
            logged = np.array(recs[t + 1]["probe_s"][0]) / (gamma * np.array(recs[t]["probe_s"][0]))
            np.testing.assert_allclose(logged[clipped], (s_unc / p_t)[clipped], rtol=2e-4)
        n_checked += int(clipped.sum())
    assert n_checked > 0


# --------------------------------------------------------------------------
# the committed full run: its verdicts follow from its numbers by the rules
# --------------------------------------------------------------------------

RESULTS = ROOT / "paper_repro" / "kimi_k2" / "results"


def test_committed_full_results_follow_from_the_rules():
    """The committed results of the full run (``results/summary.json``, the
    per-run numbers the analysis took from the logs) run through the
    pre-registered rules again: lr* of each optimizer, the run length, tau at
    each lr and every verdict come out as committed, and results.md states
    each verdict with its reason. The per-run logs are not committed (59 MB);
    the quick-mode tests above check the numbers against logs."""
    summ = json.loads((RESULTS / "summary.json").read_text())
    s = S.FULL
    assert summ["mode"] == "full" and summ["settings"]["name"] == "full"
    assert summ["corpus"]["matches"]
    assert summ["corpus"]["sha256"] == summ["corpus"]["expected_sha256"] == C.read_manifest()[0]
    for opt in ("muon", "adamw"):
        sw = summ["sweep"][opt]
        runs = sorted(sw["runs"], key=lambda r: r["lr"])
        best = S.best_lr(
            [r["lr"] for r in runs], [r["final_val"] for r in runs], [r["diverged"] for r in runs]
        )
        assert best["lr"] == sw["lr"] and best["edge"] is None and sw["bracketed"]
    assert S.schedule(summ["sweep"]["muon"]["lr"], s) == summ["schedule"]
    for m in summ["main"]["multipliers"].values():
        assert S.choose_tau([r["peak_probe_s"] for r in m["muon"]], s) == m["tau"]
        assert all(
            r["tau"] == m["tau"] and r["steps_run"] == summ["schedule"]["total"] for r in m["clip"]
        )
    again = pipeline.verdicts(summ, s)
    assert again == summ["verdicts"]
    text = (RESULTS / "results.md").read_text()
    for v in [*again["1x"].values(), *again["3x"].values()] + [
        again[k] for k in ("appE_muon_faster", "appE_update_rank", "wd_hypothesis")
    ]:
        assert v["word"] in WORDS | {S.SUPPORTED, S.NOT_SUPPORTED}
        assert f"**{v['word']}**: {v['why']}" in text
