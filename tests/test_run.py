"""Loading a trained run back with no template: `load_run` on a run directory
or one checkpoint directory, and the CLIs that take either."""

import equinox as eqx
import jax
import numpy as np
import pytest

from builders import synthetic_text
from qkclip_eqx import CheckpointError, load_checkpoint, load_run
from qkclip_eqx._run_config import preset
from qkclip_eqx._train import train
from qkclip_eqx.cli import eval as eval_cli
from qkclip_eqx.cli import generate as generate_cli
from qkclip_eqx.cli import plot as plot_cli


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run with checkpoints of steps 2 and 4, and its final model
    (a resume of the finished run restores it through the loop's own template)."""
    root = tmp_path_factory.mktemp("run")
    corpus = root / "corpus.txt"
    corpus.write_bytes(synthetic_text(100_000, seed=3))
    cfg = preset(
        "tiny", steps=4, ckpt_every=2, eval_every=2, keep=2, data=str(corpus), out=str(root / "run")
    )
    train(cfg, progress=False)
    return root / "run", cfg, train(cfg, resume=True, progress=False).model


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


def _assert_same(a, b):
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_load_run_needs_no_template(run):
    out, cfg, final = run
    loaded = load_run(out)
    assert loaded.step == 4 and loaded.checkpoint == out / "ckpt_00000004"
    assert loaded.config == cfg
    assert loaded.vocab_size == 256
    _assert_same(loaded.model, final)


def test_a_step_or_a_checkpoint_directory(run):
    out, cfg, final = run
    by_step, by_dir = load_run(out, step=2), load_run(out / "ckpt_00000002")
    assert by_step.step == by_dir.step == 2
    _assert_same(by_step.model, by_dir.model)
    # the loop's own template and loader give the same step-2 model
    like = eqx.filter_eval_shape(lambda: (by_dir.model, by_dir.opt_state))
    (model2, _), _ = load_checkpoint(out / "ckpt_00000002", like)
    _assert_same(by_dir.model, model2)
    assert not np.array_equal(_leaves(model2)[1], _leaves(final)[1])  # not the final one
    assert by_dir.checkpoint == out / "ckpt_00000002"
    with pytest.raises(CheckpointError, match=r"no checkpoint of step 3 \(steps: 2, 4\)"):
        load_run(out, step=3)
    with pytest.raises(CheckpointError, match="holds step 2, not 4"):
        load_run(out / "ckpt_00000002", step=4)


def test_no_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in this directory"):
        load_run(tmp_path)


def test_generate_and_eval_take_a_checkpoint_directory(run, capsys):
    out, _, _ = run
    ckpt = out / "ckpt_00000002"
    rc = generate_cli.main([str(ckpt), "--prompt", "def ", "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"checkpoint {ckpt} (step 2)" in captured.out
    assert eval_cli.main([str(ckpt)]) == 0
    assert f"checkpoint {ckpt} (step 2)" in capsys.readouterr().out
    assert ".eqx" not in (generate_cli.__doc__ or "")  # its example names a real path


def test_plot_takes_a_checkpoint_directory(run, tmp_path):
    out, _, _ = run
    assert plot_cli.main([str(out / "ckpt_00000004"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "loss.png").is_file()
