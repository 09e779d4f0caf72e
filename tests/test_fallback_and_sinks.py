"""Fallback paths return ONE state, and every metric sink shows each step once
after a resume.

The run: 2 steps with tau 7 (checkpoint 2), resumed to 4 steps with tau 9
(checkpoint 4), both with a TensorBoard sink. Its newest checkpoint is then
damaged in copies of the run:

- `load_run` (arrays corrupt, or metadata unreadable) returns the model,
  optimizer state, config, step, checkpoint and vocabulary all of checkpoint
  2, the one it loaded: the config is checkpoint 2's (tau 7), not the newest
  one's (tau 9).
- `qkclip-train --resume --steps 4` falls back to checkpoint 2 and trains
  steps 2 and 3 again (the newest checkpoint's step 4 is not the run's state:
  the run is not finished), ending bit for bit where the undamaged run ended;
  `metrics.jsonl` and the TensorBoard event files then hold steps 0..3 once
  each, the re-logged steps with the values of the resumed process.
"""

from __future__ import annotations

import json
import shutil

import equinox as eqx
import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from builders import corrupt_checkpoint_arrays, synthetic_text
from qkclip_eqx import CheckpointError, load_run
from qkclip_eqx._run_config import preset
from qkclip_eqx._sinks import TensorBoardSink
from qkclip_eqx._train import train
from qkclip_eqx.cli import train as train_cli

TAU_OLD, TAU_NEW = 7.0, 9.0


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


def _assert_same(a, b):
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def _train(cfg, **kw):
    sink = TensorBoardSink(cfg.out + "/tensorboard")
    try:
        return train(cfg, progress=False, sinks=[sink], **kw)
    finally:
        sink.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fallback")
    corpus = root / "corpus.txt"
    corpus.write_bytes(synthetic_text(100_000, seed=5))
    out = str(root / "run")
    common = dict(ckpt_every=2, eval_every=2, keep=3, data=str(corpus), out=out)
    _train(preset("tiny", steps=2, tau=TAU_OLD, **common))
    final = _train(preset("tiny", steps=4, tau=TAU_NEW, **common), resume=True)
    assert final.step == 4 and final.stopped == "done"
    first = load_run(out, step=2)
    assert first.config.tau == TAU_OLD and load_run(out, step=4).config.tau == TAU_NEW
    return root / "run", first, final


@pytest.mark.parametrize("damage", ["corrupt arrays", "unreadable metadata"])
def test_load_run_returns_everything_from_the_checkpoint_it_loaded(run, tmp_path, damage):
    src, first, _ = run
    copy = tmp_path / "run"
    shutil.copytree(src, copy)
    newest = copy / "ckpt_00000004"
    if damage == "corrupt arrays":
        corrupt_checkpoint_arrays(newest)
    else:
        shutil.rmtree(newest / "meta")
    said = []
    loaded = load_run(copy, warn=said.append)
    assert loaded.checkpoint == copy / "ckpt_00000002"
    assert loaded.step == 2
    assert loaded.config == first.config  # tau 7: checkpoint 2's own config
    assert loaded.vocab_size == first.vocab_size
    _assert_same(loaded.model, first.model)
    _assert_same(loaded.opt_state, first.opt_state)
    if damage == "corrupt arrays":
        assert len(said) == 1 and "ckpt_00000004" in said[0]
    # the damaged one asked for by step: refused, naming it
    with pytest.raises(CheckpointError, match="ckpt_00000004"):
        load_run(copy, step=4)


def _records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _tensorboard(run_dir):
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_undamaged_run_logged_every_step_once(run):
    src, _, _ = run
    assert [r["step"] for r in _records(src)] == [0, 1, 2, 3]
    tb = _tensorboard(src)
    assert [s for s, _ in tb["train/loss"]] == [0, 1, 2, 3]


def test_cli_resume_falls_back_and_every_sink_shows_each_step_once(run, tmp_path, capsys):
    src, _, final = run
    copy = tmp_path / "run"
    shutil.copytree(src, copy)
    corrupt_checkpoint_arrays(copy / "ckpt_00000004")
    before = _records(copy)
    code = train_cli.main(
        [
            "--resume",
            "--out",
            str(copy),
            "--steps",
            "4",
            "--log-to",
            "tensorboard",
            "--no-progress",
            "--no-plots",
            "--no-compilation-cache",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0
    assert "is finished" not in text
    assert "ckpt_00000004 failed to restore" in text
    assert (copy / "ckpt_00000004.unusable").is_dir()
    resumed = load_run(copy)
    assert resumed.step == 4 and resumed.checkpoint == copy / "ckpt_00000004"
    _assert_same(resumed.model, final.model)  # bit for bit: the same steps again

    records = _records(copy)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert records[:2] == before[:2]  # kept; steps 2, 3 rewritten by the resumed process
    assert [r["loss"] for r in records[2:]] == [r["loss"] for r in before[2:]]
    tb = _tensorboard(copy)
    for key, tag in [("loss", "train/loss"), ("grad_norm", "train/grad_norm"), ("lr", "train/lr")]:
        steps = [s for s, _ in tb[tag]]
        assert steps == [0, 1, 2, 3], (tag, steps)
        # TensorBoard stores float32: at most half a float32 ulp apart
        np.testing.assert_allclose([v for _, v in tb[tag]], [r[key] for r in records], rtol=1.2e-7)
    assert [s for s, _ in tb["val/loss"]] == [1, 3]
