"""The README's Python examples run as written, and do what they say: the
library example's train step clips at tau = 100 (checked against NumPy's
QK-Clip of the weights it was given, and by re-measuring S), and the own-attention
example is found and clipped by ``qk_clip``."""

import pathlib
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from qkclip_eqx import next_token_loss
from reference import assert_leaves_close, np_qk_clip

README = pathlib.Path(__file__).parent.parent / "README.md"
TAU = 100.0  # the README's make_train_step(opt, mode="clip", tau=100.0)


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


_forward = eqx.filter_jit(next_token_loss)


def test_library_example_runs():
    scope: dict = {}
    exec(_blocks()[0], scope)
    assert scope["metrics"]["max_logits"].shape == (4, 8)
    assert np.isfinite(float(scope["metrics"]["loss"]))
    assert "tau=100.0" in _blocks()[0].replace(" ", "")

    # The example's step, on its model with every even head's q weights scaled
    # so that layer 0's S is 300 (odd heads: 30): those heads are over tau.
    step, opt, model, tokens = scope["step"], scope["opt"], scope["model"], scope["tokens"]
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, tokens.shape), jnp.int32)
    _, s_base = map(np.asarray, _forward(model, tokens))
    assert np.all(s_base > 0.1)
    target = np.where(np.arange(s_base.shape[1]) % 2 == 0, 300.0, 30.0)[None, :]
    factor = jnp.asarray(target / s_base, jnp.float32)[:, :, None, None]
    hot = eqx.tree_at(lambda m: m.blocks.attn.wq, model, model.blocks.attn.wq * factor)
    _, s_hot = map(np.asarray, _forward(hot, tokens))
    np.testing.assert_allclose(s_hot[0], target[0], rtol=1e-4)
    assert np.any(s_hot > TAU) and np.any(s_hot < TAU)

    # A fresh optimizer state: the example's schedule warms up from lr 0, so the
    # update is zero and the step's model must be exactly the clip of ``hot``.
    state = opt.init(eqx.filter(hot, eqx.is_array))
    copy = jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, hot)
    clipped, _, metrics = step(copy, state, tokens)
    np.testing.assert_allclose(metrics["max_logits"], s_hot, rtol=1e-6)
    assert int(metrics["heads_clipped"]) == int(np.sum(s_hot > TAU))
    assert_leaves_close(clipped, np_qk_clip(hot, s_hot, TAU), rtol=2e-6)
    # re-run on the same batch: layer 0 (whose inputs the clip does not change) is min(S, tau)
    _, s_after = map(np.asarray, _forward(clipped, tokens))
    np.testing.assert_allclose(s_after[0], np.minimum(s_hot[0], TAU), rtol=1e-5)


def test_own_clippable_attention_example():
    scope: dict = {}
    exec("import equinox as eqx, jax\nimport qkclip_eqx as qc\n" + _blocks()[1], scope)
    import qkclip_eqx as qc

    ones = jnp.ones((2, 4, 8))
    attn = scope["MyAttention"](wq=ones, wk=ones, wv=ones, wo=jnp.ones((8, 8)), n_heads=2)
    # its head layout shards every per-head leaf, and wo's columns, over `model`
    specs = qc.partition_specs({"layer": attn})["layer"]
    assert (specs.wq, specs.wk, specs.wv, specs.wo) == (P("model"),) * 3 + (P(None, "model"),)
    clipped = qc.qk_clip({"layer": attn}, [jnp.array([400.0, 50.0])], 100.0)["layer"]
    # head 0: gamma = 1/4 split as sqrt on each side; head 1 below tau: untouched
    np.testing.assert_allclose(clipped.wq[0], 0.5, rtol=1e-6)
    np.testing.assert_allclose(clipped.wk[0], 0.5, rtol=1e-6)
    assert np.array_equal(clipped.wq[1], attn.wq[1]) and np.array_equal(clipped.wk[1], attn.wk[1])
