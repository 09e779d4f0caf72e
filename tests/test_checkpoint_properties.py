"""Checkpoint round trips as a property: any PyTree of the stored leaf kinds
(JAX arrays of several dtypes, NumPy arrays and scalars, Python bool/int/float,
typed PRNG keys), holding NaN, infinities and -0.0, saved and loaded back (with
the tree itself, or its `eval_shape`, as `like`) is bit-identical, each leaf of
its own type; its meta comes back as its JSON round trip; and a `like` that
differs in one leaf's dtype or shape is refused naming that leaf. Shapes come
from a small set, so the fingerprint program compiles a few times only."""

from __future__ import annotations

import json
import re
import tempfile

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkclip_eqx._checkpoint import (
    CheckpointMismatchError,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)

SHAPES = [(), (3,), (2, 4)]
DTYPES = ["float32", "bfloat16", "float16", "int32", "uint8", "bool"]
SPECIAL = [np.nan, np.inf, -np.inf, -0.0]


def _array(rng, dtype, shape, special):
    x = rng.standard_normal(shape) * 50
    if special and x.size and dtype.startswith(("float", "bfloat")):
        x.flat[0] = special
    if dtype == "bool":
        return x > 0
    if dtype in ("int32", "uint8"):
        return np.abs(x).astype(dtype)
    return x.astype(jnp.dtype(dtype))


@st.composite
def leaves(draw, rng):
    kind = draw(st.sampled_from(["jax", "numpy", "np_scalar", "python", "key"]))
    dtype, shape = draw(st.sampled_from(DTYPES)), draw(st.sampled_from(SHAPES))
    special = draw(st.sampled_from([None, *SPECIAL]))
    if kind == "jax":
        return jnp.asarray(_array(rng, dtype, shape, special))
    if kind == "numpy":
        return _array(rng, dtype, shape, special)
    if kind == "np_scalar":
        return np.float32(special if special is not None else rng.standard_normal())
    if kind == "python":
        return draw(st.sampled_from([True, 3, -7, 0.1, float("nan"), -0.0, 1e300]))
    return jax.random.split(jax.random.key(int(rng.integers(1000))), 2)


@st.composite
def trees(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    n = draw(st.integers(1, 6))
    items = [draw(leaves(rng)) for _ in range(n)]
    # nested containers, and a non-array leaf (taken from `like`)
    return {"a": items[: n // 2], "b": {"c": tuple(items[n // 2 :]), "fn": jnp.tanh}}


def _bits(x):
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return ("key", str(jax.random.key_impl(x)), np.asarray(jax.random.key_data(x)).tobytes())
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return (x.shape, str(x.dtype), np.asarray(x).tobytes())
    if isinstance(x, float):
        return np.float64(x).tobytes()
    return x


def _assert_bit_identical(a, b):
    la, ta = jtu.tree_flatten(a)
    lb, tb = jtu.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        assert type(x) is type(y)
        assert _bits(x) == _bits(y)


# each example writes and reads a checkpoint twice: half the profile's count
@settings(max_examples=max(1, settings().max_examples // 2))
@given(
    tree=trees(),
    meta_value=st.one_of(
        st.integers(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=5)
    ),
)
def test_round_trip_is_bit_identical(tree, meta_value):
    meta = {"x": meta_value, "nested": {"list": [meta_value, (1, 2)]}}
    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(tmp, 5, tree, meta=meta)
        state, got_meta = load_checkpoint(path, tree, expect_meta=meta)
        _assert_bit_identical(tree, state)
        assert got_meta == json.loads(json.dumps(meta)) == read_meta(path)
        # ShapeDtypeStructs as `like` for the JAX arrays (keys included)
        like = jtu.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, jax.Array) else x,
            tree,
        )
        state2, _ = load_checkpoint(path, like)
        _assert_bit_identical(tree, state2)


@pytest.mark.parametrize("change", ["dtype", "shape"])
def test_one_leaf_differing_is_named(tmp_path, change):
    tree = {f"w{i}": jnp.arange(6.0).reshape(2, 3) * i for i in range(4)}
    path = save_checkpoint(tmp_path, 1, tree, meta={})
    like = dict(tree)
    like["w2"] = like["w2"].astype(jnp.bfloat16) if change == "dtype" else jnp.zeros((3, 2))
    with pytest.raises(CheckpointMismatchError, match=re.escape("['w2']")) as info:
        load_checkpoint(path, like)
    assert "['w1']" not in str(info.value) and "['w3']" not in str(info.value)
