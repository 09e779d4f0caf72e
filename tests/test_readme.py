"""The README's Python examples run as written, and do what they say."""

import pathlib
import re

import jax.numpy as jnp
import numpy as np

README = pathlib.Path(__file__).parent.parent / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_library_example_runs():
    scope: dict = {}
    exec(_blocks()[0], scope)
    assert scope["metrics"]["max_logits"].shape == (4, 8)
    assert np.isfinite(float(scope["metrics"]["loss"]))


def test_own_clippable_attention_example():
    scope: dict = {}
    exec("import equinox as eqx, jax\nimport qkclip_eqx as qc\n" + _blocks()[1], scope)
    import qkclip_eqx as qc

    attn = scope["MyAttention"](jnp.ones((2, 4, 8)), jnp.ones((2, 4, 8)))
    clipped = qc.qk_clip({"layer": attn}, [jnp.array([400.0, 50.0])], 100.0)["layer"]
    # head 0: gamma = 1/4 split as sqrt on each side; head 1 below tau: untouched
    np.testing.assert_allclose(clipped.wq[0], 0.5, rtol=1e-6)
    np.testing.assert_allclose(clipped.wk[0], 0.5, rtol=1e-6)
    assert np.array_equal(clipped.wq[1], attn.wq[1]) and np.array_equal(clipped.wk[1], attn.wk[1])
