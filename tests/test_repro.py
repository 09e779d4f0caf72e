"""paper_repro.kimi_k2: the quick pipeline, checked against its own logs and
against computations the training loop does not make.

The quick pipeline runs ONCE (module fixture, ~1-2 min on 2 CPU cores), on
fixed synthetic text (not the interpreter's standard library, whose size
varies). Each reported number is recomputed here straight from the runs'
metrics.jsonl, without the package's analysis code. Two clipping runs (MuonClip
of Fig. 2 right, AdamW + QK-Clip of App. E) are then replayed step by step:
each step's model must be NumPy's QK-Clip (K2 sec. 2.1) of the unclipped update
of the step before, and the S logged after a clip must be the unclipped model's
one-step growth scaled by gamma, which bounds the overshoot independently of
the logged maximum.
"""

import dataclasses
import json
import pathlib
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from builders import attention_s, layer_inputs, synthetic_corpus, unclipped_update  # noqa: E402
from paper_repro.kimi_k2 import pipeline  # noqa: E402
from paper_repro.kimi_k2.settings import QUICK  # noqa: E402
from qkclip_eqx._data import get_batch  # noqa: E402
from qkclip_eqx._model import Transformer  # noqa: E402
from qkclip_eqx._step import make_train_step, next_token_loss  # noqa: E402
from qkclip_eqx._train import RunConfig, optimizer, preset, train  # noqa: E402
from reference import leaves_by_path, np_clip_factors, np_qk_clip  # noqa: E402


@pytest.fixture(scope="module")
def corpus():
    return synthetic_corpus(QUICK.max_bytes, 65_536)


@pytest.fixture(scope="module")
def quick(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("kimi_k2_quick")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "load_data", lambda path, max_bytes: corpus)
        summ = pipeline.main(["--quick", "--out", str(out)])
    return out, summ


def _records(run_dir):
    lines = [
        json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()
    ]
    cfg = json.loads((run_dir / "config.json").read_text())
    steps = np.array([r["step"] for r in lines])
    s = np.array(
        [[[np.nan if v is None else v for v in row] for row in r["max_logits"]] for r in lines]
    )
    clipped = np.array([r["heads_clipped"] for r in lines])
    return cfg, steps, s, clipped


def _clip_runs(out):
    for d in sorted((out / "runs").iterdir()):
        if (d / "config.json").is_file():
            cfg = json.loads((d / "config.json").read_text())
            if cfg["optimizer"] == "muonclip":
                yield d


# --------------------------------------------------------------------------
# replaying a clipping run, step by step
# --------------------------------------------------------------------------

_forward = eqx.filter_jit(next_token_loss)


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, tree)


@dataclasses.dataclass
class Replay:
    tau: float
    s: np.ndarray  # [t, layers, heads]: S of each step's model on its batch (a plain forward)
    logged_s: np.ndarray  # the same, from metrics.jsonl
    logged_loss: np.ndarray
    loss: np.ndarray
    clip_err: np.ndarray  # [t]: max |model_{t+1} - NumPy clip of the unclipped update| / max |.|
    clip_size: (
        np.ndarray
    )  # [t]: max |NumPy clip - unclipped update| / max |.|: what the clip changed
    # [t-1, layers, heads]: S of each layer of step k's UNCLIPPED update, on
    # batch k + 1, each layer fed the inputs it gets in the clipped model
    s_next_unclipped: np.ndarray


def _replay(run_dir, data) -> Replay:
    """Re-run a logged run with the library's step, and at every step compute,
    outside the step, the unclipped update and its NumPy QK-Clip."""
    conf = json.loads((run_dir / "config.json").read_text())
    cfg = RunConfig(**{f.name: conf[f.name] for f in dataclasses.fields(RunConfig)})
    _, _, logged, _ = _records(run_dir)
    logged_loss = np.array(
        [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    )
    n = len(logged)
    model = Transformer(cfg.model_config(data.vocab_size), key=jax.random.key(cfg.seed))
    opt = optimizer(cfg)
    state = opt.init(eqx.filter(model, eqx.is_array))
    step = make_train_step(
        opt, mode=cfg.mode, tau=cfg.tau, alpha=cfg.alpha, accum_steps=cfg.accum_steps
    )
    batches = [
        jnp.asarray(
            get_batch(
                data.train, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed, step=k
            )
        )
        for k in range(n)
    ]
    s_all, loss_all, clip_err, clip_size, s0_next = [], [], [], [], []
    for k in range(n):
        loss, s = map(np.asarray, _forward(model, batches[k]))
        unclipped = unclipped_update(model, opt, state, batches[k])
        expected = np_qk_clip(unclipped, s, cfg.tau, cfg.alpha)
        model, state, _ = step(_copy(model), _copy(state), batches[k])
        got, plain = leaves_by_path(model), leaves_by_path(unclipped)
        clip_err.append(
            max(np.max(np.abs(got[p] - e)) / np.max(np.abs(e)) for p, e in expected.items())
        )
        clip_size.append(
            max(np.max(np.abs(plain[p] - e)) / np.max(np.abs(e)) for p, e in expected.items())
        )
        if k + 1 < n:
            xs = layer_inputs(
                model, batches[k + 1][:, :-1]
            )  # the inputs; the last token is a target
            s0_next.append(np.asarray(attention_s(unclipped, xs)))
        s_all.append(s)
        loss_all.append(float(loss))
    return Replay(
        cfg.tau,
        np.stack(s_all),
        logged,
        logged_loss,
        np.array(loss_all),
        np.array(clip_err),
        np.array(clip_size),
        np.stack(s0_next),
    )


@pytest.fixture(scope="module")
def replays(quick, corpus):
    """The MuonClip run of Fig. 2 right at tau_low, and one AdamW + QK-Clip
    sweep run that clipped (App. E)."""
    out, summ = quick
    fig2 = summ["fig2_right"][f"{summ['tau_low']:g}"]
    assert not fig2.get("identical_to_monitor_run"), "tau_low must be reached"
    adamw = [
        r for r in summ["sweep"]["runs"]["adamw_clip"].values() if r["clip"]["first_clip_step"] >= 0
    ]
    assert adamw, "an AdamW + QK-Clip sweep run must clip"
    return {
        "muonclip": _replay(out / "runs" / fig2["run"], corpus),
        "adamw_clip": _replay(out / "runs" / adamw[0]["run"], corpus),
    }


@pytest.mark.parametrize("run", ["muonclip", "adamw_clip"])
def test_replayed_run_is_the_logged_run(replays, run):
    r = replays[run]
    np.testing.assert_allclose(r.s, r.logged_s, rtol=1e-5)
    np.testing.assert_allclose(r.loss, r.logged_loss, rtol=1e-5)


@pytest.mark.parametrize("run", ["muonclip", "adamw_clip"])
def test_every_step_is_numpys_clip_of_the_unclipped_update(replays, run):
    """The clip acts: at every step the model is NumPy's QK-Clip, with this
    step's S, of the update without clip; on the steps with a head over tau
    that clip really changed the weights (a clip switched off fails here)."""
    r = replays[run]
    over = (r.s > r.tau).any(axis=(1, 2))
    assert over.any() and not over.all()
    assert np.all(r.clip_err < 1e-5), r.clip_err
    assert np.all(r.clip_size[over] > 1e-3) and np.all(r.clip_size[~over] == 0)


@pytest.mark.parametrize("run", ["muonclip", "adamw_clip"])
def test_overshoot_is_one_unclipped_step_of_growth(replays, run):
    """The bound on the overshoot, computed without the clip. The clip scales
    every logit of head h of layer l by gamma_k, so S at step k + 1 is gamma_k
    times the S that the UNCLIPPED update W_k' of step k gives on batch k + 1
    (each layer fed the inputs it gets in the run):

        S_{k+1} / tau = S(W_k', B_{k+1}) / max(S_k, tau)      (every layer and head).

    A clipped head therefore sits at tau times one unclipped update's growth
    of S. The logged S must equal this; a run whose clip does nothing logs
    S(W_k', B_{k+1}) itself, above it by 1 / gamma."""
    r = replays[run]
    gamma = np_clip_factors(r.s[:-1], r.tau)
    np.testing.assert_allclose(r.logged_s[1:], gamma * r.s_next_unclipped, rtol=2e-5)
    clipped = gamma < 1
    assert clipped.any()
    growth = r.s_next_unclipped[clipped] / r.s[:-1][clipped]
    np.testing.assert_allclose(r.logged_s[1:][clipped] / r.tau, growth, rtol=2e-5)
    # without the clip, S would be larger by 1 / gamma (a clip that does nothing fails above)
    assert np.max(np.abs(r.s_next_unclipped[clipped] / r.logged_s[1:][clipped])) > 1.01
    # the run's overshoot over these steps is the largest such growth
    after = r.logged_s[1:][clipped] / r.tau
    assert np.max(after) == pytest.approx(np.max(growth), rel=2e-5)


def test_overshoot_is_the_max_after_the_first_clip(quick):
    """The reported overshoot is recomputed from the logs (the analysis code is
    not used); each run's logged clip count is its count of S > tau (MLA: the
    heads over tau are the heads scaled)."""
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
        after = np.nanmax(s[hit[0] + 1 :].reshape(len(steps) - hit[0] - 1, -1), axis=1) / tau
        assert per_run[d.name] == pytest.approx(float(after.max()), rel=1e-12)
        seen.append(float(after.max()))
    assert reported == pytest.approx(max(seen), rel=1e-12)


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
    assert n_clipping >= 1


def test_results_md_holds_the_numbers(quick):
    out, summ = quick
    md = (out / "results.md").read_text()
    assert f"{summ['overshoot']['max']:.3f}" in md
    assert f"lr* = **{summ['lr_star']:g}**" in md
    for t, row in summ["fig2_right"].items():
        c = row["clip"]
        assert (
            f"| {t} | **{c['ever_clipped']:.1%}** | "
            + " | ".join(f"{x:.0%}" for x in c["ever_clipped_by_layer"])
            in md
        )
    for f in summ["fig12"]:
        assert f"lr {f['lr']:g}: MuonClip - Muon = {f['diff_mean']:+.4f}" in md
        for r in f["seeds"]:
            assert f"| {r['seed']} | {r['val_muon']:.4f} | {r['val_clip']:.4f} |" in md
    left = summ["fig2_left"]
    assert f"S = {left['peak_s']:.1f} at step {left['peak_step']}" in md
    for v in ("python", "jax", "equinox", "optax"):
        assert summ["versions"][v] in md
    for png in (
        "fig2_left_muon",
        "fig2_right_muonclip",
        "appD_heads_clipped",
        "fig12_loss",
        "appE_lr_sweep",
        "overshoot",
    ):
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
        np.testing.assert_array_equal(
            (np.nan_to_num(s, nan=-np.inf) > cfg["tau"]).sum(axis=(1, 2)), clipped
        )
        v = row["s_fixed"]
        line = [x for x in md.splitlines() if x.startswith(f"| {lr:g} | ") and x.count("|") == 11]
        assert len(line) == 1  # the App. E table's row for this lr
        assert line[0].split(" | ")[5].startswith(f"{v:.1f}" if np.isfinite(v) else "n/a")
    assert any(r["clip"]["first_clip_step"] >= 0 for r in sw["runs"]["adamw_clip"].values())


def _leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(model, eqx.is_array))]


def test_monitor_and_unreached_clip_leave_the_weights_of_the_unclipped_run(tmp_path, corpus):
    """What lets the pipeline stand the monitor run in for MuonClip at a tau
    that S never reaches: Muon + monitor, Muon with S not even reduced
    (mode off), and MuonClip with an unreachable tau give bit-identical weights."""
    data = corpus
    kw = dict(steps=4, eval_every=4, ckpt_every=4, lr=5e-2, seed=3)
    runs = {
        "monitor": preset("tiny", optimizer="muon", mode="monitor", out=str(tmp_path / "a"), **kw),
        "off": preset("tiny", optimizer="muon", mode="off", out=str(tmp_path / "b"), **kw),
        "clip_unreached": preset(
            "tiny", optimizer="muonclip", tau=1e9, out=str(tmp_path / "c"), **kw
        ),
    }
    models = {k: train(cfg, progress=False, data=data).model for k, cfg in runs.items()}
    ref = _leaves(models["monitor"])
    for k in ("off", "clip_unreached"):
        for a, b in zip(ref, _leaves(models[k]), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=k)
    s = [
        json.loads(x)["max_logit"]
        for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    ]
    assert 0 < max(s) < 1e9
