"""Tests for `qkclip_eqx._checkpoint`: bit-exact round trips, retention, atomicity and
precise error reporting."""

import os
import pathlib
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qkclip_eqx._checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)


META = {"config": {"n_layers": 4, "width": 8, "betas": [0.9, 0.95]}, "step": 1}


def _make_state(seed: int, width: int = 8, depth: int = 2):
    model_key, key = jax.random.split(jax.random.key(seed))
    model = eqx.nn.MLP(3, 2, width, depth, key=model_key)
    optim = optax.adamw(1e-2)
    params = eqx.filter(model, eqx.is_array)
    opt_state = optim.init(params)

    def loss(p, x):
        return jnp.sum(eqx.combine(p, model)(x) ** 2)

    grads = jax.grad(loss)(params, jnp.arange(3.0) + seed)
    updates, opt_state = optim.update(grads, opt_state, params)
    model = eqx.apply_updates(model, updates)
    return {
        "model": model,
        "opt_state": opt_state,
        "step": 1 + seed,
        "lr": 0.1 + seed,  # Python float: must survive without x64.
        "key": jax.random.fold_in(key, 7),  # New-style typed key.
        "raw_key": jax.random.PRNGKey(seed + 11),  # Raw uint32 key.
        "rbg_keys": jax.random.split(jax.random.key(seed, impl="rbg"), 3),
        "ema": jnp.full((4,), 0.5 + seed, dtype=jnp.bfloat16),
        "data_pos": np.int64(123 + seed),
    }


def _assert_bit_identical(a, b):
    leaves_a, treedef_a = jtu.tree_flatten(a)
    leaves_b, treedef_b = jtu.tree_flatten(b)
    assert treedef_a == treedef_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert type(x) is type(y)
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert x.dtype == y.dtype
            assert jax.random.key_impl(x) == jax.random.key_impl(y)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        if isinstance(x, (jax.Array, np.ndarray, np.generic)):
            assert x.shape == y.shape and x.dtype == y.dtype
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
        elif isinstance(x, (bool, int, float, complex)):
            assert x == y
        else:
            assert x is y  # Non-stored leaves (e.g. activations) come from `like`.


def _save(tmp_path, step=1, state=None, meta=META, keep=3):
    state = _make_state(0) if state is None else state
    return save_checkpoint(tmp_path, step, state, meta=meta, keep=keep)


def test_round_trip_bit_exact(tmp_path):
    state = _make_state(0)
    path = save_checkpoint(tmp_path / "run", 12, state, meta=META)
    assert path == tmp_path / "run" / "ckpt_00000012.eqx"
    assert path.read_bytes().startswith(b"QKCLIP-CKPT 1\n")

    like = _make_state(1)  # Same structure, different values.
    with pytest.raises(AssertionError):
        _assert_bit_identical(state, like)
    loaded, meta = load_checkpoint(path, like, expect_meta=META)
    _assert_bit_identical(state, loaded)
    assert meta == META
    assert read_meta(path) == META

    # The loaded state is usable: typed keys keep their impl.
    assert jax.random.key_impl(loaded["rbg_keys"]) == "rbg"
    np.testing.assert_array_equal(
        jax.random.uniform(loaded["key"], (3,)), jax.random.uniform(state["key"], (3,))
    )


def test_round_trip_with_eval_shape_like(tmp_path):
    state = _make_state(0)
    del state["data_pos"]  # NumPy leaves become JAX-typed under eval_shape.
    path = _save(tmp_path, state=state)
    like = eqx.filter_eval_shape(_make_state, 1)
    del like["data_pos"]
    assert isinstance(like["key"], jax.ShapeDtypeStruct)
    loaded, _ = load_checkpoint(path, like)
    _assert_bit_identical(state, loaded)


def test_round_trip_restores_sharding(tmp_path):
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    state = {
        "w": jax.device_put(jnp.arange(16.0), sharded),
        "key": jax.device_put(jax.random.key(3), replicated),
        "local": jnp.ones(2),
    }
    path = _save(tmp_path, state=state)
    like = {
        "w": jax.device_put(jnp.zeros(16), sharded),
        "key": jax.device_put(jax.random.key(0), replicated),
        "local": jnp.zeros(2),
    }
    loaded, _ = load_checkpoint(path, like)
    _assert_bit_identical(state, loaded)
    assert loaded["w"].sharding == sharded
    assert loaded["key"].sharding == replicated


def test_keep_and_latest(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "ckpt_abc.eqx").write_text("not a checkpoint either")
    state = {"x": jnp.arange(3.0)}
    for step in [5, 1, 30, 7, 100_000_000]:
        save_checkpoint(tmp_path, step, state, meta={"step": step}, keep=3)
    names = sorted(p.name for p in tmp_path.glob("ckpt_*.eqx"))
    assert names == [
        "ckpt_00000007.eqx",
        "ckpt_00000030.eqx",
        "ckpt_100000000.eqx",
        "ckpt_abc.eqx",
    ]
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt_100000000.eqx"
    assert read_meta(latest_checkpoint(tmp_path)) == {"step": 100_000_000}
    assert (tmp_path / "notes.txt").exists()

    # Saving an older step never deletes the file just written.
    save_checkpoint(tmp_path, 2, state, meta={}, keep=1)
    assert sorted(p.name for p in tmp_path.glob("ckpt_0*.eqx")) == ["ckpt_00000002.eqx"]
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt_100000000.eqx"

    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, 3, state, meta={}, keep=0)


def test_crash_mid_write_keeps_previous(tmp_path, monkeypatch):
    state = _make_state(0)
    good = _save(tmp_path, step=1, state=state)

    def crash(src, dst):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        _save(tmp_path, step=2, state=_make_state(1))
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]  # Temp removed.
    # A hard crash (no cleanup) leaves a partial temp file: it must be ignored.
    partial = good.read_bytes()[:100]
    (tmp_path / ".ckpt_00000002.eqx.0123456789abcdef.tmp").write_bytes(partial)
    assert latest_checkpoint(tmp_path) == good
    loaded, _ = load_checkpoint(latest_checkpoint(tmp_path), _make_state(1))
    _assert_bit_identical(state, loaded)


def test_truncated(tmp_path):
    path = _save(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated") as info:
        load_checkpoint(path, _make_state(0))
    numbers = [int(n) for n in re.findall(r"(\d+) bytes", str(info.value))]
    assert len(numbers) == 2 and numbers[1] - numbers[0] == 10
    assert str(path) in str(info.value)

    path.write_bytes(data[:40])  # Cut inside the header.
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path, _make_state(0))


def test_corrupt_payload(tmp_path):
    path = _save(tmp_path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt.*checksum") as info:
        load_checkpoint(path, _make_state(0))
    assert str(path) in str(info.value)
    assert read_meta(path) == META  # The header itself is still readable.

    path.write_bytes(bytes(data) + b"extra")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path, _make_state(0))


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "ckpt_00000001.eqx"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    for fn in (read_meta, lambda p: load_checkpoint(p, _make_state(0))):
        with pytest.raises(CheckpointError, match="not a qkclip checkpoint") as info:
            fn(path)
        assert str(path) in str(info.value)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a qkclip checkpoint"):
        read_meta(path)
    path.write_bytes(b"QKCLIP-CKPT 1\n{not json\n")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_meta(path)
    path.write_bytes(b"QKCLIP-CKPT 2\n{}\n")
    with pytest.raises(CheckpointError, match="version '2'"):
        read_meta(path)
    assert issubclass(CheckpointError, ValueError)


def test_structure_mismatch(tmp_path):
    path = _save(tmp_path)
    with pytest.raises(CheckpointError, match="structure") as info:
        load_checkpoint(path, _make_state(0, width=16))
    message = str(info.value)
    assert ".layers[0].weight" in message
    assert "(8, 3)" in message and "(16, 3)" in message
    assert str(path) in message

    with pytest.raises(CheckpointError, match="number of stored leaves") as info:
        load_checkpoint(path, _make_state(0, depth=3))

    like = _make_state(0)
    like["ema"] = like["ema"].astype(jnp.float32)
    with pytest.raises(CheckpointError, match="bfloat16") as info:
        load_checkpoint(path, like)
    assert "['ema']" in str(info.value) and "float32" in str(info.value)

    like = _make_state(0)
    like["key"] = jax.random.PRNGKey(0)  # Raw key where a typed key was saved.
    with pytest.raises(CheckpointError, match=re.escape("['key']")):
        load_checkpoint(path, like)


def test_expect_meta_mismatch(tmp_path):
    path = _save(tmp_path)
    with pytest.raises(CheckpointError, match="n_layers") as info:
        load_checkpoint(path, _make_state(0), expect_meta={"config": {"n_layers": 2}})
    message = str(info.value)
    assert "config.n_layers: checkpoint has 4, expected 2" in message
    assert str(path) in message

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(
            path,
            _make_state(0),
            expect_meta={"config": {"width": 8, "betas": (0.9, 0.99)}, "seed": 0},
        )
    message = str(info.value)
    assert "config.betas" in message and "width" not in message
    assert "seed" in message

    # Tuples compare equal to their JSON lists; only given keys are compared.
    _, meta = load_checkpoint(
        path, _make_state(1), expect_meta={"config": {"betas": (0.9, 0.95)}}
    )
    assert meta == META


def test_meta_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path, 1, {"x": 1}, meta={"bad": object()})
    assert not any(pathlib.Path(tmp_path).iterdir())
