"""The training run: bit-exact resume, Ctrl-C, NaN stop, checkpoint errors, the CLIs,
and the end-to-end claims checked against computations the loop does not make:
the clip acts (the clipped weights are NumPy's QK-Clip of the pre-clip weights,
and S re-measured on the same batch is min(S, tau)), AdamW can clip, and a run
on a mesh (and its checkpoints, both ways) matches one device."""

import dataclasses
import json
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import types
import typing

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qkclip_eqx._evaluate as evaluate_mod
import qkclip_eqx._train as train_mod
from builders import (
    attention_s,
    corrupt_checkpoint_arrays,
    layer_inputs,
    synthetic_corpus,
    synthetic_text,
    unclipped_update,
)
from qkclip_eqx import MoEConfig, YaRN
from qkclip_eqx._checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from qkclip_eqx._data import get_batch, load_data
from qkclip_eqx._model import Transformer
from qkclip_eqx._options import hints_of
from qkclip_eqx._parallel import make_mesh, partition_specs, shard_train_state
from qkclip_eqx._run_config import MAY_CHANGE, MUST_MATCH, RunConfig, optimizer, preset
from qkclip_eqx._step import next_token_loss
from qkclip_eqx._train import RunError, train
from qkclip_eqx.cli import eval as eval_cli
from qkclip_eqx.cli import train as train_cli
from reference import assert_leaves_close, leaves_by_path, np_clip_factors, np_qk_clip

N = 4
TESTS = pathlib.Path(__file__).parent


@pytest.fixture(scope="module")
def data():
    return synthetic_corpus(200_000)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """The same kind of fixed text as a file, for the CLI's --data."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_bytes(synthetic_text(200_000, seed=1))
    return path


_forward = eqx.filter_jit(next_token_loss)


def _records(out):
    return [json.loads(x) for x in (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines()]


def _initial_model(cfg, vocab_size):
    """The model a run starts from, built here from the config and seed."""
    return Transformer(cfg.model_config(vocab_size), key=jax.random.key(cfg.seed))


def _like(cfg, vocab_size):
    """Shape-only (model, optimizer state) of a run, for load_checkpoint."""
    model = eqx.filter_eval_shape(Transformer, cfg.model_config(vocab_size), key=jax.random.key(0))
    state = eqx.filter_eval_shape(lambda m: optimizer(cfg).init(eqx.filter(m, eqx.is_array)), model)
    return model, state


def _tau_splitting(s) -> float:
    """A tau halfway between the two middle values of S (exact in float32), so
    that some heads are clipped and some are not."""
    v = np.sort(np.asarray(s, np.float64).ravel())
    return float(np.float32((v[len(v) // 2 - 1] + v[len(v) // 2]) / 2))


def _first_batch(cfg, data):
    return jnp.asarray(
        get_batch(data.train, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed, step=0)
    )


def _assert_clip_acted(before, after, tokens, tau, alpha, logged_s):
    """``after`` = QK-Clip of ``before`` (the updated, unclipped weights) with the
    S of this step, ``logged_s``, computed in NumPy; and S re-measured on the same
    batch, layer by layer on ``before``'s layer inputs, is gamma * S(before):
    for weights that did not move, min(S, tau)."""
    s = np.asarray(logged_s, np.float64)
    over = s > tau
    assert over.any() and not over.all(), "tau must split the heads"
    assert_leaves_close(after, np_qk_clip(before, s, tau, alpha), rtol=1e-5, atol=1e-7)
    xs = layer_inputs(before, tokens[:, :-1])  # the inputs; the last token is only a target
    s_before, s_after = np.asarray(attention_s(before, xs)), np.asarray(attention_s(after, xs))
    # measured rel 7.4e-8 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(s_after, np_clip_factors(s, tau) * s_before, rtol=3e-7)
    return s_before, s_after


def _cfg(out, **kw):
    return preset("tiny", out=str(out), steps=2 * N, ckpt_every=N, eval_every=N, **kw)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data):
    """The uninterrupted run. It also records which token arrays the loop drew
    its training batches from, and which evaluation read (by identity)."""
    out = tmp_path_factory.mktemp("straight")
    read = STRAIGHT_READ

    def spy(kind, real):
        def wrapped(tokens, **kw):
            read[kind].append(tokens)
            return real(tokens, **kw)

        return wrapped

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "get_batch", spy("train", train_mod.get_batch))
        mp.setattr(evaluate_mod, "eval_batches", spy("eval", evaluate_mod.eval_batches))
        return train(_cfg(out), progress=False, data=data)


STRAIGHT_READ: dict[str, list] = {"train": [], "eval": []}  # filled by `straight`


def test_resume_after_interrupt_is_bit_exact(tmp_path, data, straight):
    cfg = _cfg(tmp_path)

    def stop_at_n(step, _):
        if step == N:
            raise KeyboardInterrupt

    first = train(cfg, progress=False, data=data, on_step=stop_at_n)
    assert first.stopped == "interrupted" and first.step == N
    assert latest_checkpoint(tmp_path).name == f"ckpt_{N:08d}"  # Ctrl-C wrote it
    resumed = train(cfg, resume=True, progress=False, data=data)
    assert resumed.step == 2 * N and resumed.stopped == "done"
    for a, b in zip(_leaves(straight.model), _leaves(resumed.model), strict=True):
        np.testing.assert_array_equal(a, b)
    # the metrics log holds each step once, in order, and the losses agree
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (straight.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(2 * N))
    assert [r["loss"] for r in lines] == [r["loss"] for r in ref]
    assert len(lines[0]["max_logits"]) == 2 and len(lines[0]["max_logits"][0]) == 2


def test_existing_run_needs_resume(tmp_path, data, straight):
    with pytest.raises(RunError, match="--resume"):
        train(_cfg(straight.out), progress=False, data=data)


def test_resume_with_other_config_names_the_field(data, straight):
    with pytest.raises(CheckpointError, match="dim"):
        train(_cfg(straight.out, dim=48), resume=True, progress=False, data=data)


def test_validation_loss_reads_the_val_split_only(data, straight):
    """Evaluation reads only the validation split, disjoint from the training
    stream: the loop drew every training batch from ``data.train`` and every
    evaluation from ``data.val`` (two arrays sharing no memory), and the logged
    final val_loss is the final model's mean loss over consecutive windows of
    ``data.val`` cut here (as ``eval_batches`` documents), which the same
    windows of ``data.train`` would not give."""
    cfg = _cfg(straight.out)
    assert not np.shares_memory(data.train, data.val)
    assert len(STRAIGHT_READ["train"]) == 2 * N and len(STRAIGHT_READ["eval"]) == 2
    assert all(tokens is data.train for tokens in STRAIGHT_READ["train"])
    assert all(tokens is data.val for tokens in STRAIGHT_READ["eval"])

    def mean_loss(tokens):
        n, t = cfg.eval_batches * cfg.batch_size, cfg.seq_len
        windows = np.stack([tokens[i * t : (i + 1) * t + 1] for i in range(n)]).astype(np.int32)
        batches = windows.reshape(cfg.eval_batches, cfg.batch_size, t + 1)
        return np.mean([float(_forward(straight.model, jnp.asarray(b))[0]) for b in batches])

    logged = _records(straight.out)[-1]
    assert logged["step"] == 2 * N - 1
    val, train_split = mean_loss(data.val), mean_loss(data.train)
    # the same program on the same batches: measured equal; 1e-6 allows a
    # last-bit difference of the two compilations
    assert logged["val_loss"] == pytest.approx(val, rel=1e-6, abs=0)
    assert abs(train_split - val) > 1e-3 * val  # the check can tell the splits apart


def _other_values(cfg: RunConfig, name: str) -> list:
    """Every value of RunConfig field ``name`` that differs from ``cfg``'s and
    makes a valid config, from the field's type: each choice of a Literal,
    None, two other ints or floats, another string."""
    value, hint = getattr(cfg, name), hints_of(RunConfig)[name]
    parts, out = [hint], []
    while parts:
        part = parts.pop(0)
        if typing.get_origin(part) is typing.Literal:
            out += list(typing.get_args(part))
        elif part is type(None):
            out.append(None)
        elif part is int:
            out += [2 * value, value + 1] if isinstance(value, int) else [8, 2]
        elif part is float:
            out += [2 * value, value / 2, 0.5]
        elif part is str:
            other = {"mesh": "data=2", "log_to": "tensorboard"}.get(name, f"{value or name}-other")
            out.append(other)
        elif part is YaRN:
            out.append(YaRN(4.0, cfg.seq_len))
        elif part is MoEConfig:
            out.append(
                MoEConfig(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8)
            )
        else:  # a union
            parts += list(typing.get_args(part))
    valid = []
    for other in out:
        try:
            changed = getattr(dataclasses.replace(cfg, **{name: other}), name)
        except ValueError:
            continue
        if changed != value and changed not in valid:
            valid.append(changed)
    return valid


@pytest.mark.parametrize("name", MUST_MATCH)
def test_resume_refuses_every_must_match_field(data, straight, name):
    """The resume rule, table-driven from MUST_MATCH itself: each field, set to
    another valid value, is refused on resume, naming the field and both
    values, before any step runs."""
    cfg = _cfg(straight.out)
    other = _other_values(cfg, name)[0]
    changed = dataclasses.replace(cfg, **{name: other})
    pattern = rf"config\.{name}: checkpoint has {re.escape(repr(getattr(cfg, name)))}, expected"
    with pytest.raises(CheckpointError, match=pattern):
        train(changed, resume=True, progress=False, data=data)


def test_resume_rule_covers_every_field_and_may_change_fields_keep_the_stream(data):
    """Every RunConfig field is either MUST_MATCH or MAY_CHANGE, and no
    may-change field, set to any other valid value, changes what a checkpoint
    holds (the structure, shapes and dtypes of the model and optimizer state),
    the data source, or the batches the loop draws at a step."""
    names = [f.name for f in dataclasses.fields(RunConfig)]
    assert set(MUST_MATCH).isdisjoint(MAY_CHANGE)
    assert sorted([*MUST_MATCH, *MAY_CHANGE]) == sorted(names)
    cfg = _cfg("unused")

    def held(c):
        flat = jax.tree_util.tree_flatten_with_path(_like(c, data.vocab_size))[0]
        leaves = [(jax.tree_util.keystr(p), x.shape, x.dtype) for p, x in flat]
        return leaves, (c.data, c.max_bytes)

    def batches(c):
        kw = dict(batch_size=c.batch_size, seq_len=c.seq_len, seed=c.seed)
        return [get_batch(data.train, step=s, **kw) for s in (0, 5)]

    # max_logit and attention_implementation have other valid values only with
    # the dot_product_attention kernel (and cuDNN with bf16 compute)
    dpa = dataclasses.replace(cfg, kernel="dot_product_attention", compute_dtype="bfloat16")
    changed = set()
    for base in (cfg, dpa):
        base_held, base_batches = held(base), batches(base)
        for name in MAY_CHANGE:
            for value in _other_values(base, name):
                other = dataclasses.replace(base, **{name: value})
                assert held(other) == base_held, (name, value)
                for a, b in zip(batches(other), base_batches, strict=True):
                    assert np.array_equal(a, b), (name, value)
                changed.add(name)
    assert changed == set(MAY_CHANGE)


def _copy_checkpoints(src, dst, steps):
    for step in steps:
        shutil.copytree(
            pathlib.Path(src) / f"ckpt_{step:08d}", pathlib.Path(dst) / f"ckpt_{step:08d}"
        )


_corrupt = corrupt_checkpoint_arrays


@pytest.mark.parametrize("damage", ["flipped bytes", "missing array files"])
def test_corrupt_newest_checkpoint_falls_back_to_older(tmp_path, data, straight, capsys, damage):
    """The newest checkpoint (step 2N) is damaged: resume says so, names the
    older one it uses (step N), sets the damaged one aside, and the run then
    ends bit for bit where the uninterrupted run ended."""
    _copy_checkpoints(straight.out, tmp_path, [N, 2 * N])
    newest = tmp_path / f"ckpt_{2 * N:08d}"
    if damage == "flipped bytes":
        _corrupt(newest)
    else:
        shutil.rmtree(newest / "state" / "d")
    resumed = train(_cfg(tmp_path), resume=True, progress=False, data=data)
    out = capsys.readouterr().out
    assert f"checkpoint ckpt_{2 * N:08d} failed to restore" in out
    assert f"trying the older ckpt_{N:08d}" in out
    assert f"resuming at step {N} of {2 * N}, not the newest checkpoint's" in out
    assert (tmp_path / f"ckpt_{2 * N:08d}.unusable").is_dir()
    assert resumed.step == 2 * N and resumed.stopped == "done"
    for a, b in zip(_leaves(straight.model), _leaves(resumed.model), strict=True):
        np.testing.assert_array_equal(a, b)
    # the only checkpoint damaged: resume fails, naming it
    only = tmp_path / "only"
    _copy_checkpoints(straight.out, only, [N])
    _corrupt(only / f"ckpt_{N:08d}")
    with pytest.raises(CheckpointError, match=f"no checkpoint restores:\n.*ckpt_{N:08d}"):
        train(_cfg(only), resume=True, progress=False, data=data)


def test_resume_may_change_lr_and_steps_with_stated_effect(tmp_path, data, straight, capsys):
    """lr and steps may change on resume (docs/checkpoints.md, 'What a resume
    may change'): the run continues from the checkpoint, says what changed and
    what the lr at the resume step was and is, and logs the new schedule's lr
    from there on."""
    _copy_checkpoints(straight.out, tmp_path, [N])
    cfg = dataclasses.replace(_cfg(tmp_path), lr=1e-3, steps=N + 2)
    resumed = train(cfg, resume=True, progress=False, data=data)
    text = capsys.readouterr().out
    assert resumed.step == N + 2
    assert "resume changes lr: 0.003 -> 0.001" in text
    assert f"resume changes steps: {2 * N} -> {N + 2}" in text
    before, after = float(train_mod.schedule(_cfg(tmp_path))(N)), float(train_mod.schedule(cfg)(N))
    assert before != after
    assert f"lr at the resume step {N}: {before:.6g} -> {after:.6g}" in text
    got = _records(tmp_path)
    assert [r["step"] for r in got] == [N, N + 1]
    assert [r["lr"] for r in got] == [float(train_mod.schedule(cfg)(i)) for i in (N, N + 1)]
    # the first resumed step starts from the same weights and batch: same loss
    assert got[0]["loss"] == _records(straight.out)[N]["loss"]
    # a must-match field is refused, naming it
    with pytest.raises(CheckpointError, match="config.seq_len: checkpoint has 32, expected 16"):
        train(_cfg(tmp_path, seq_len=16), resume=True, progress=False, data=data)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data, monkeypatch, capsys):
    real = train_mod.make_train_step

    def poisoned(*args, **kwargs):
        step = real(*args, **kwargs)
        calls = {"n": 0}

        def wrapped(model, opt_state, tokens, **kw):
            calls["n"] += 1
            if calls["n"] == N + 2:  # the step with index N + 1 gets NaN weights: NaN loss
                model = eqx.tree_at(lambda m: m.embed, model, replace_fn=lambda x: x * jnp.nan)
            return step(model, opt_state, tokens, **kw)

        return wrapped

    monkeypatch.setattr(train_mod, "make_train_step", poisoned)
    result = train(_cfg(tmp_path), progress=False, data=data)
    assert result.stopped == "nan" and result.step == N + 1
    assert f"step {N + 1}: loss is not finite" in capsys.readouterr().out
    assert latest_checkpoint(tmp_path).name == f"ckpt_{N:08d}"
    # the log ends with the last good step
    assert [r["step"] for r in _records(tmp_path)] == list(range(N + 1))


def test_metrics_are_read_one_step_behind(tmp_path, data, monkeypatch):
    """No host sync per step: a step's metrics are read only after the next step
    has been dispatched, except at eval and checkpoint steps (here: the last)."""
    events = []
    real_step, real_read = train_mod.make_train_step, train_mod._host_metrics

    def recording(*args, **kwargs):
        step = real_step(*args, **kwargs)

        def wrapped(model, opt_state, tokens, **kw):
            events.append("dispatch")
            return step(model, opt_state, tokens, **kw)

        return wrapped

    def read(metrics):
        events.append("read")
        return real_read(metrics)

    monkeypatch.setattr(train_mod, "make_train_step", recording)
    monkeypatch.setattr(train_mod, "_host_metrics", read)
    steps = 6
    cfg = preset("tiny", out=str(tmp_path), steps=steps, ckpt_every=steps, eval_every=steps)
    result = train(cfg, progress=False, data=data)
    assert result.step == steps
    # step i's metrics are read after step i + 1 is dispatched; the last at once
    assert events == ["dispatch", "dispatch"] + ["read", "dispatch"] * (steps - 2) + [
        "read",
        "read",
    ]
    assert [r["step"] for r in _records(tmp_path)] == list(range(steps))


def test_tokens_per_second_counts_one_step_each_also_at_eval_and_checkpoint_steps(
    tmp_path, data, monkeypatch
):
    """With a clock that advances 1 s per dispatched step and not otherwise,
    every step logs exactly tokens_per_step / 1 s: the eval and checkpoint
    steps, whose metrics are read right after the previous step's, too (timing
    the reads gave the second one 0 s)."""
    clock = [0.0]
    real_step = train_mod.make_train_step

    def ticking(*args, **kwargs):
        step = real_step(*args, **kwargs)

        def wrapped(model, opt_state, tokens, **kw):
            clock[0] += 1.0
            return step(model, opt_state, tokens, **kw)

        return wrapped

    monkeypatch.setattr(train_mod, "make_train_step", ticking)
    monkeypatch.setattr(train_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    cfg = preset("tiny", out=str(tmp_path), steps=6, ckpt_every=3, eval_every=2)
    train(cfg, progress=False, data=data)
    records = _records(tmp_path)
    assert [r["step"] for r in records] == list(range(6))
    assert [r["tokens_per_s"] for r in records] == [float(cfg.batch_size * cfg.seq_len)] * 6


def test_nonfinite_parameters_at_a_checkpoint_step_are_never_saved(
    tmp_path, data, monkeypatch, capsys
):
    """NaN injected into the updated parameters of step 2N - 1, whose result is
    the step-2N checkpoint (the loss of that step is finite): the run stops
    naming the step and the parameters, and the step-N checkpoint stays the
    newest on disk."""
    real = train_mod.optimizer

    def nan_update_at(index: int) -> optax.GradientTransformation:
        """Adds NaN to every update of the step with this index, and nothing else."""

        def update(updates, count, params=None):
            poison = jnp.where(count == index, jnp.nan, 0.0)
            return jax.tree.map(lambda u: u + poison, updates), count + 1

        return optax.GradientTransformation(lambda params: jnp.zeros((), jnp.int32), update)

    monkeypatch.setattr(
        train_mod, "optimizer", lambda cfg: optax.chain(real(cfg), nan_update_at(2 * N - 1))
    )
    result = train(_cfg(tmp_path), progress=False, data=data)
    assert result.stopped == "nan" and result.step == 2 * N - 1
    text = capsys.readouterr().out
    assert f"step {2 * N - 1}: parameters is not finite" in text
    assert "--lr" in text and "--mesh" not in text  # suggests only what a resume may change
    assert latest_checkpoint(tmp_path).name == f"ckpt_{N:08d}"


def test_cli_data_pointing_nowhere_is_one_line(tmp_path, capsys):
    rc = train_cli.main(
        [
            "--preset",
            "tiny",
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
            "--no-plots",
            "--data",
            str(tmp_path / "nowhere.txt"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "nowhere.txt" in err and "does not exist" in err


def test_cli_train_then_eval(tmp_path, capsys, data_file, monkeypatch):
    # The run's first batch and initial model, rebuilt here from the seed: tau
    # is chosen between their heads' S, so the first step clips some heads.
    data = load_data(data_file)
    cfg = preset("tiny", data=str(data_file))
    model0 = _initial_model(cfg, data.vocab_size)
    batch0 = _first_batch(cfg, data)
    _, s0 = _forward(model0, batch0)
    tau = _tau_splitting(s0)
    out = tmp_path / "run"
    rc = train_cli.main(
        [
            "--preset",
            "tiny",
            "--steps",
            "6",
            "--eval-every",
            "3",
            "--ckpt-every",
            "1",
            "--keep",
            "6",
            "--out",
            str(out),
            "--no-progress",
            "--tau",
            repr(tau),
            "--data",
            str(data_file),
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0
    assert f"tau = {tau!r}" in text and "layer" in text
    assert (out / "loss.png").exists() and (out / "max_logit.png").exists()
    records = _records(out)
    assert [r["step"] for r in records if "val_loss" in r] == [2, 5]

    # The warmup's first lr is 0, so the first step's update is zero and the
    # model after it must be the clip of the initial model.
    cfg = preset("tiny", tau=tau, data=str(data_file))
    assert records[0]["lr"] == 0.0
    # bit-equal (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_array_equal(records[0]["max_logits"], s0)  # the log is that forward's S
    (model1, _), meta = load_checkpoint(out / "ckpt_00000001", _like(cfg, data.vocab_size))
    assert meta["step"] == 1
    _, s_after = _assert_clip_acted(model0, model1, batch0, cfg.tau, cfg.alpha, np.asarray(s0))
    # S on the same batch after the step: min(S, tau), so never above tau
    # measured rel 7.4e-8 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(s_after, np.minimum(np.asarray(s0), cfg.tau), rtol=3e-7)
    assert records[0]["heads_clipped"] == int(np.sum(np.asarray(s0) > cfg.tau)) > 0
    monkeypatch.chdir(tmp_path)
    assert eval_cli.main(["run"]) == 0  # a relative path
    text = capsys.readouterr().out
    val = float(text.split("validation loss:")[1].split()[0])
    assert val == pytest.approx(records[-1]["val_loss"], abs=1e-4)  # printed to 4 places


def test_cli_rejects_bad_flag_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_cli.main(["--preset", "tiny", "--tau", "-1", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "tau" in capsys.readouterr().err


def test_eval_on_garbage_file(tmp_path, capsys):
    bad = tmp_path / "ckpt_00000001"
    bad.write_bytes(b"garbage" * 10)
    assert eval_cli.main([str(bad)]) == 2
    assert "not a qkclip checkpoint" in capsys.readouterr().err
    (tmp_path / "somedir" / "meta").mkdir(parents=True)  # a directory, not a checkpoint
    assert eval_cli.main([str(tmp_path / "somedir")]) == 2
    assert "not a qkclip checkpoint" in capsys.readouterr().err


MESH = "fsdp=4,model=2"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("sharded")
    return train(_cfg(out, mesh=MESH), progress=False, data=data)


def _load(path, like):
    state, meta = load_checkpoint(path, like)
    return state, meta


def _assert_states_close(a, b, rtol=1e-4, atol=2e-6, what=""):
    la, lb = leaves_by_path(a), leaves_by_path(b)
    assert la.keys() == lb.keys()
    for k in la:
        np.testing.assert_allclose(la[k], lb[k], rtol=rtol, atol=atol, err_msg=f"{what} {k}")


def test_run_on_a_mesh_matches_one_device(data, straight, sharded):
    ref, got = _records(straight.out), _records(sharded.out)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(2 * N))
    for key in ("loss", "grad_norm"):
        # measured rel 4e-7 (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_allclose(
            [r[key] for r in got], [r[key] for r in ref], rtol=2e-6, err_msg=key
        )
    # measured rel 3.3e-7 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(
        [r["max_logits"] for r in got], [r["max_logits"] for r in ref], rtol=1.5e-6
    )
    assert [r["heads_clipped"] for r in got] == [r["heads_clipped"] for r in ref]
    # evaluation on the mesh (the sharded loss) gives the one-device validation loss
    val = [(r["step"], r["val_loss"]) for r in got if "val_loss" in r]
    ref_val = [(r["step"], r["val_loss"]) for r in ref if "val_loss" in r]
    assert [s for s, _ in val] == [s for s, _ in ref_val] == [N - 1, 2 * N - 1]
    # measured rel 4.2e-8 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose([v for _, v in val], [v for _, v in ref_val], rtol=2e-7)
    _assert_states_close(straight.model, sharded.model, what="final model")


def test_mesh_checkpoint_restores_on_one_device(tmp_path, data, straight, sharded):
    """The mesh run's checkpoints, loaded on one device: the mesh run's own
    final model value for value, the one-device run's model and optimizer
    state within float tolerance; and resumed on one device from step N, the
    one-device run's steps N..2N-1 and final model."""
    cfg = _cfg(sharded.out)
    like = _like(cfg, data.vocab_size)
    (model, state), meta = _load(sharded.out / f"ckpt_{2 * N:08d}", like)
    assert meta["step"] == 2 * N
    assert all(
        len(x.devices()) == 1 for x in jax.tree.leaves(eqx.filter((model, state), eqx.is_array))
    )
    mesh_final = leaves_by_path(sharded.model)
    for k, v in leaves_by_path(model).items():
        np.testing.assert_array_equal(v, mesh_final[k], err_msg=k)
    (ref_model, ref_state), _ = _load(straight.out / f"ckpt_{2 * N:08d}", like)
    _assert_states_close(ref_model, model, what="model")
    _assert_states_close(ref_state, state, what="optimizer state")
    # resume the mesh run's step-N checkpoint on one device
    shutil.copytree(sharded.out / f"ckpt_{N:08d}", tmp_path / f"ckpt_{N:08d}")
    resumed = train(_cfg(tmp_path), resume=True, progress=False, data=data)
    assert resumed.step == 2 * N
    ref = _records(straight.out)[N:]
    got = _records(tmp_path)
    assert [r["step"] for r in got] == list(range(N, 2 * N))
    # measured rel 8e-8 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in ref], rtol=4e-7)
    _assert_states_close(straight.model, resumed.model, what="resumed on one device")


def test_one_device_checkpoint_restores_on_a_mesh(tmp_path, data, straight):
    """The reverse: the one-device run's step-N checkpoint, loaded onto the mesh,
    holds its values bit for bit with the mesh's shardings, and a run resumed
    from it on the mesh ends where the one-device run ended."""
    cfg = _cfg(tmp_path, mesh=MESH)
    vocab = data.vocab_size
    mesh = make_mesh(**cfg.mesh_shape())
    model = _initial_model(cfg, vocab)
    opt = optimizer(cfg)
    sharded_like = shard_train_state(model, opt.init(eqx.filter(model, eqx.is_array)), opt, mesh)
    (m, st), _ = _load(straight.out / f"ckpt_{N:08d}", sharded_like)
    (m1, st1), _ = _load(straight.out / f"ckpt_{N:08d}", _like(cfg, vocab))
    for got, want in ((m, m1), (st, st1)):
        la, lb = leaves_by_path(got), leaves_by_path(want)
        for k in lb:
            np.testing.assert_array_equal(la[k], lb[k], err_msg=k)
    specs = partition_specs(m)
    for x, spec in zip(jax.tree.leaves(eqx.filter(m, eqx.is_array)), jax.tree.leaves(specs)):
        assert x.sharding.mesh.shape == mesh.shape and x.sharding.spec == spec
    assert m.blocks.attn.wq.sharding.spec[1] == "model"  # the heads really are split
    shutil.copytree(straight.out / f"ckpt_{N:08d}", tmp_path / f"ckpt_{N:08d}")
    resumed = train(cfg, resume=True, progress=False, data=data)
    ref, got = _records(straight.out)[N:], _records(tmp_path)
    assert [r["step"] for r in got] == list(range(N, 2 * N))
    for key in ("loss", "grad_norm"):
        # measured rel 4e-7 (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_allclose(
            [r[key] for r in got], [r[key] for r in ref], rtol=2e-6, err_msg=key
        )
    _assert_states_close(straight.model, resumed.model, what="resumed on the mesh")


def test_bad_mesh_string_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="RunConfig.mesh"):
        _cfg(tmp_path, mesh="data=two")


def test_adamw_can_clip_and_muon_cannot(tmp_path, data):
    """AdamW with mode clip: one step at a constant lr is AdamW's update (optax's
    AdamW with K2's betas, built here), then QK-Clip of it in NumPy with this
    step's S and alpha = 0.3; S re-measured on the same batch is gamma times that
    of the unclipped update."""
    with pytest.raises(ValueError, match="muonclip"):
        preset("tiny", optimizer="muon", mode="clip")
    assert preset("tiny", optimizer="adamw").mode == "monitor"
    cfg = preset(
        "tiny",
        optimizer="adamw",
        mode="clip",
        alpha=0.3,
        steps=1,
        schedule="constant",
        out=str(tmp_path),
    )
    model0 = _initial_model(cfg, data.vocab_size)
    batch0 = _first_batch(cfg, data)
    _, s0 = _forward(model0, batch0)
    cfg = dataclasses.replace(cfg, tau=_tau_splitting(s0))
    result = train(cfg, progress=False, data=data)
    records = _records(tmp_path)
    np.testing.assert_array_equal(records[0]["max_logits"], s0)  # bit-equal
    adamw = optax.adamw(cfg.lr, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay)
    updated = unclipped_update(model0, adamw, adamw.init(eqx.filter(model0, eqx.is_array)), batch0)
    assert not np.allclose(leaves_by_path(updated)[".embed"], leaves_by_path(model0)[".embed"])
    s_upd, s_after = _assert_clip_acted(
        updated, result.model, batch0, cfg.tau, cfg.alpha, np.asarray(s0)
    )
    # the clipped heads end one AdamW update's growth from tau
    over = np.asarray(s0) > cfg.tau
    # measured rel 1.4e-7 on an AMD EPYC (jax 0.10.2, CPU); bit-equal on the CPU the
    # tolerances were first measured on: gamma * S rounds differently with the kernels
    np.testing.assert_allclose(
        s_after[over], cfg.tau * s_upd[over] / np.asarray(s0)[over], rtol=6e-7
    )


def test_sigint_writes_a_checkpoint_then_resume_finishes(tmp_path, data_file):
    """A real Ctrl-C (SIGINT) to a running qkclip-train process, sent at a known
    step: tests/_sigint_worker.py runs the CLI with a hook that, after step 3,
    writes a marker file and waits for a signal. The run must finish that step,
    write the step-3 checkpoint, exit with 130, and resume from it."""
    out, marker = tmp_path / "run", tmp_path / "at_step"
    args = [
        sys.executable,
        str(TESTS / "_sigint_worker.py"),
        str(marker),
        "3",
        "--preset",
        "tiny",
        "--steps",
        "100000",
        "--out",
        str(out),
        "--no-progress",
        "--no-plots",
        "--data",
        str(data_file),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while not marker.exists():  # the worker writes it once, at step 3
            if proc.poll() is not None:
                pytest.fail("the training process exited before step 3:\n" + proc.communicate()[0])
            time.sleep(0.05)
        assert marker.read_text() == "3"
        proc.send_signal(signal.SIGINT)
        log = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, log
    assert "interrupted: checkpoint for step 3" in log
    assert latest_checkpoint(out).name == "ckpt_00000003"
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [
        0,
        1,
        2,
    ]
    # and the run resumes from it, with its own config (preset, data): only --steps given
    rc = train_cli.main(
        ["--steps", "5", "--out", str(out), "--resume", "--no-progress", "--no-plots"]
    )
    assert rc == 0
    assert [r["step"] for r in _records(out)] == list(range(5))


def test_sigkill_during_a_checkpoint_write_then_resume_is_bit_exact(tmp_path, data_file):
    """kill -9 of a qkclip-train process in the middle of writing its step-4
    checkpoint (tests/_sigkill_worker.py holds Orbax's commit of that step, with
    every file written, and the test kills the process there): the step-2
    checkpoint is intact and the newest, the half-written one is never taken
    for a checkpoint, and the resumed run ends bit for bit where an
    uninterrupted run ends."""
    flags = [
        "--preset",
        "tiny",
        "--steps",
        "4",
        "--ckpt-every",
        "2",
        "--eval-every",
        "2",
        "--data",
        str(data_file),
    ]
    out, marker = tmp_path / "run", tmp_path / "at_step"
    args = [
        sys.executable,
        str(TESTS / "_sigkill_worker.py"),
        str(marker),
        "4",
        *flags,
        "--out",
        str(out),
        "--no-progress",
        "--no-plots",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(
                    "the training process exited before its step-4 save:\n" + proc.communicate()[0]
                )
            time.sleep(0.05)
        assert any(p.name.startswith("ckpt_00000004.") for p in out.iterdir())  # mid-write
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert latest_checkpoint(out).name == "ckpt_00000002"
    cfg = preset("tiny", steps=4, ckpt_every=2, eval_every=2, data=str(data_file), out=str(out))
    data = load_data(data_file, max_bytes=cfg.max_bytes)
    resumed = train(cfg, resume=True, progress=False, data=data)
    straight = train(
        dataclasses.replace(cfg, out=str(tmp_path / "straight")), progress=False, data=data
    )
    assert resumed.step == straight.step == 4
    for a, b in zip(_leaves(straight.model), _leaves(resumed.model), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [r["loss"] for r in _records(out)] == [r["loss"] for r in _records(straight.out)]
    assert latest_checkpoint(out).name == "ckpt_00000004"


def test_monitor_and_unreached_clip_leave_the_weights_of_the_unclipped_run(tmp_path, data):
    """A clip that never acts changes nothing: Muon + monitor, Muon with S not
    even reduced (mode off), and MuonClip with an unreachable tau give
    bit-identical weights (what lets a monitor run stand in for MuonClip at a
    tau that S never reaches)."""
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
