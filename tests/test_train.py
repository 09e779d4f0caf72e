"""The training run: bit-exact resume, Ctrl-C, NaN stop, checkpoint errors, the CLIs."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkclip_eqx._train as train_mod
from qkclip_eqx._checkpoint import CheckpointError, latest_checkpoint
from qkclip_eqx._data import stdlib_corpus
from qkclip_eqx._train import preset, train
from qkclip_eqx.cli import eval as eval_cli
from qkclip_eqx.cli import train as train_cli

N = 4


@pytest.fixture(scope="module")
def data():
    return stdlib_corpus(max_bytes=200_000)


def _cfg(out, **kw):
    return preset("tiny", out=str(out), steps=2 * N, ckpt_every=N, eval_every=N, **kw)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("straight")
    return train(_cfg(out), progress=False, data=data)


def test_resume_after_interrupt_is_bit_exact(tmp_path, data, straight):
    cfg = _cfg(tmp_path)

    def stop_at_n(step, _):
        if step == N:
            raise KeyboardInterrupt

    first = train(cfg, progress=False, data=data, on_step=stop_at_n)
    assert first.stopped == "interrupted" and first.step == N
    assert latest_checkpoint(tmp_path).name == f"ckpt_{N:08d}.eqx"  # Ctrl-C wrote it
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
    with pytest.raises(FileExistsError, match="--resume"):
        train(_cfg(straight.out), progress=False, data=data)


def test_resume_with_other_config_names_the_field(data, straight):
    with pytest.raises(CheckpointError, match="dim"):
        train(_cfg(straight.out, dim=48), resume=True, progress=False, data=data)


def test_truncated_checkpoint_is_reported(tmp_path, data):
    cfg = preset("tiny", out=str(tmp_path), steps=2, ckpt_every=2, eval_every=2)
    train(cfg, progress=False, data=data)
    ckpt = latest_checkpoint(tmp_path)
    ckpt.write_bytes(ckpt.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        train(cfg, resume=True, progress=False, data=data)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data, monkeypatch, capsys):
    real = train_mod.make_train_step

    def poisoned(*args, **kwargs):
        step = real(*args, **kwargs)
        calls = {"n": 0}

        def wrapped(model, opt_state, tokens):
            model, opt_state, m = step(model, opt_state, tokens)
            calls["n"] += 1
            if calls["n"] == N + 2:  # the step with index N + 1
                m = {**m, "loss": jnp.float32(jnp.nan)}
            return model, opt_state, m

        return wrapped

    monkeypatch.setattr(train_mod, "make_train_step", poisoned)
    result = train(_cfg(tmp_path), progress=False, data=data)
    assert result.stopped == "nan" and result.step == N + 1
    assert f"at step {N + 1}" in capsys.readouterr().out
    assert latest_checkpoint(tmp_path).name == f"ckpt_{N:08d}.eqx"


def test_cli_train_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    rc = train_cli.main(["--preset", "tiny", "--steps", "6", "--eval-every", "3", "--ckpt-every", "3",
                         "--out", str(out), "--no-progress", "--tau", "3.0", "--max-bytes", "200000"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "tau = 3.0" in text and "layer" in text
    assert (out / "loss.png").exists() and (out / "max_logit.png").exists()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # at tau = 3 this tiny model clips from the first step
    assert records[0]["heads_clipped"] > 0
    assert [r["step"] for r in records if "val_loss" in r] == [2, 5]
    assert eval_cli.main([str(out)]) == 0
    text = capsys.readouterr().out
    val = float(text.split("validation loss:")[1].split()[0])
    assert val == pytest.approx(records[-1]["val_loss"], abs=1e-4)  # printed to 4 places


def test_cli_rejects_bad_flag_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_cli.main(["--preset", "tiny", "--tau", "-1", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "tau" in capsys.readouterr().err


def test_eval_on_garbage_file(tmp_path, capsys):
    bad = tmp_path / "ckpt_00000001.eqx"
    bad.write_bytes(b"garbage" * 10)
    assert eval_cli.main([str(bad)]) == 2
    assert "not a qkclip checkpoint" in capsys.readouterr().err


def test_run_on_a_mesh_matches_one_device(tmp_path, data, straight):
    sharded = train(_cfg(tmp_path, mesh="data=2,model=2,seq=2"), progress=False, data=data)
    ref = [json.loads(x) for x in (straight.out / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in ref], rtol=1e-5)
    np.testing.assert_allclose([r["max_logits"] for r in got], [r["max_logits"] for r in ref], rtol=1e-5)
    for a, b in zip(_leaves(straight.model), _leaves(sharded.model), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # the checkpoint of a sharded run resumes on one device
    assert latest_checkpoint(tmp_path).name == f"ckpt_{2 * N:08d}.eqx"


def test_bad_mesh_string_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="RunConfig.mesh"):
        _cfg(tmp_path, mesh="data=two")


def test_adamw_can_clip_and_muon_cannot(tmp_path, data):
    with pytest.raises(ValueError, match="muonclip"):
        preset("tiny", optimizer="muon", mode="clip")
    assert preset("tiny", optimizer="adamw").mode == "monitor"
    cfg = preset("tiny", optimizer="adamw", mode="clip", tau=3.0, steps=2, out=str(tmp_path))
    train(cfg, progress=False, data=data)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["heads_clipped"] > 0
    assert max(max(row) for row in records[1]["max_logits"]) < records[0]["max_logit"]


def test_sigint_writes_a_checkpoint_then_resume_finishes(tmp_path):
    """A real Ctrl-C (SIGINT) to a running qkclip-train process."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = [sys.executable, "-m", "qkclip_eqx.cli.train", "--preset", "tiny", "--steps", "100000",
            "--out", str(out), "--no-progress", "--no-plots", "--max-bytes", "200000"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    log = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, log
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and "interrupted: checkpoint for step" in log
    step = int(ckpt.stem.split("_")[1])
    assert step >= 3
    # and the run resumes from it
    rc = train_cli.main(["--preset", "tiny", "--steps", str(step + 2), "--out", str(out),
                         "--resume", "--no-progress", "--no-plots", "--max-bytes", "200000"])
    assert rc == 0
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(step + 2))
