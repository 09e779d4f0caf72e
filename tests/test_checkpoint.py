"""Tests for `qkclip_eqx._checkpoint` (Orbax): bit-exact round trips, restore onto
another sharding, retention, atomicity, fall-back to an older checkpoint and
precise error reporting."""

import asyncio
import gc
import json
import logging
import pathlib
import re
import sys
import time
import types
import warnings

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
    CheckpointMismatchError,
    latest_checkpoint,
    load_checkpoint,
    load_latest_checkpoint,
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
    assert path == tmp_path / "run" / "ckpt_00000012"
    assert (path / "state").is_dir() and (path / "meta").is_dir()

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


def test_restore_onto_another_sharding(tmp_path):
    """Written sharded over 8 devices; read back onto a 4 x 2 mesh with another
    spec, onto one device, and onto the same sharding: the same bits each time."""
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    state = {
        "w": jax.device_put(jnp.arange(64.0).reshape(16, 4), sharded),
        "key": jax.device_put(jax.random.key(3), replicated),
        "local": jnp.ones(2),
    }
    path = _save(tmp_path, state=state)
    mesh2 = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    other = NamedSharding(mesh2, PartitionSpec("model", "data"))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[3])
    for w_sharding in (sharded, other, one):
        like = {
            "w": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=w_sharding),
            "key": jax.device_put(jax.random.key(0), replicated),
            "local": jnp.zeros(2),
        }
        loaded, _ = load_checkpoint(path, like)
        _assert_bit_identical(state, loaded)
        assert loaded["w"].sharding == w_sharding
        assert loaded["key"].sharding == replicated


def test_keep_and_latest(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "ckpt_abc").mkdir()
    state = {"x": jnp.arange(3.0)}
    for step in [1, 5, 7, 30, 100_000_000]:
        save_checkpoint(tmp_path, step, state, meta={"step": step}, keep=3)
    names = sorted(p.name for p in tmp_path.glob("ckpt_*"))
    assert names == ["ckpt_00000007", "ckpt_00000030", "ckpt_100000000", "ckpt_abc"]
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt_100000000"
    assert read_meta(latest_checkpoint(tmp_path)) == {"step": 100_000_000}
    assert (tmp_path / "notes.txt").exists()
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, 3, state, meta={}, keep=0)


def test_interrupted_write_is_ignored(tmp_path, monkeypatch):
    """A save that dies before Orbax commits it (here: the commit raises) leaves
    no checkpoint under its name; its temporary directory is ignored and the
    previous checkpoint is the newest."""
    from orbax.checkpoint._src.path import atomicity

    state = _make_state(0)
    good = _save(tmp_path, step=1, state=state)

    async def crash(self):
        raise OSError("simulated crash")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", crash)
    with pytest.raises(OSError, match="simulated crash"):
        _save(tmp_path, step=2, state=_make_state(1))
    monkeypatch.undo()
    assert not (tmp_path / "ckpt_00000002").exists()
    assert latest_checkpoint(tmp_path) == good
    loaded, _, path = load_latest_checkpoint(tmp_path, _make_state(1))
    assert path == good
    _assert_bit_identical(state, loaded)


def _array_files(path):
    """The files Orbax reads the arrays from (`state/d`, after it merged every
    process's writes), smallest first."""
    return sorted(
        (p for p in (path / "state" / "d").iterdir() if p.is_file()), key=lambda p: p.stat().st_size
    )


def test_missing_array_files(tmp_path):
    path = _save(tmp_path)
    for f in _array_files(path):
        f.unlink()
    with pytest.raises(CheckpointError, match="unreadable or truncated") as info:
        load_checkpoint(path, _make_state(0))
    assert str(path) in str(info.value)
    assert not isinstance(info.value, CheckpointMismatchError)


def _lose_a_failed_future(message):
    """A future whose exception nobody retrieves, as a failed TensorStore read
    leaves: asyncio logs it when it is collected."""
    loop = asyncio.new_event_loop()
    future = loop.create_future()
    future.set_exception(ValueError(message))
    del future
    gc.collect()
    loop.close()


def _asyncio_state():
    logger = logging.getLogger("asyncio")
    return sys.unraisablehook, list(logger.filters), logger.level, list(logger.handlers)


def test_failed_restore_leaves_no_global_hooks(tmp_path, monkeypatch, caplog):
    """Orbax's noise after a failed restore is quieted only while the restore
    runs: afterwards `sys.unraisablehook` and the asyncio logger are as before,
    and none of the noise (late callbacks on the closed event loop, failed
    reads logged by asyncio) has reached them, then or later."""
    # many arrays: reads still in flight when the first one fails
    state = {f"x{i}": jnp.arange(1000.0 * (i + 1)) for i in range(60)}
    path = _save(tmp_path, state=state)
    for f in _array_files(path):
        f.unlink()
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    caplog.set_level(logging.WARNING, logger="asyncio")
    before = _asyncio_state()
    for _ in range(3):
        with pytest.raises(CheckpointError, match="unreadable or truncated"):
            load_checkpoint(path, state)
        assert _asyncio_state() == before
    time.sleep(0.2)
    gc.collect()
    assert seen == []
    assert [r.getMessage()[:80] for r in caplog.records if r.name == "asyncio"] == []


def test_orbax_noise_is_dropped_inside_the_scope_only(monkeypatch, caplog):
    """Inside `_quiet_failed_reads`, "Event loop is closed" unraisables and
    asyncio's log of failed TensorStore reads are dropped, every other one
    passes; on exit the previous hook is back and the same log passes."""
    from qkclip_eqx._checkpoint import _quiet_failed_reads

    seen = []
    previous = seen.append
    monkeypatch.setattr(sys, "unraisablehook", previous)
    closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
    caplog.set_level(logging.ERROR, logger="asyncio")
    with _quiet_failed_reads():
        assert sys.unraisablehook is not previous
        sys.unraisablehook(closed)
        sys.unraisablehook(other)
        _lose_a_failed_future("read failed: {'tensorstore_spec': {'driver': 'zarr'}}")
        _lose_a_failed_future("an unrelated failure")
    assert seen == [other]
    assert sys.unraisablehook is previous
    logged = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert len(logged) == 1 and "an unrelated failure" in logged[0]
    _lose_a_failed_future("read failed: {'tensorstore_spec': {'driver': 'zarr'}}")
    logged = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert len(logged) == 2 and "tensorstore_spec" in logged[1]


async def _read():
    pass


def test_unawaited_coroutines_are_quiet_inside_the_scope_only():
    from qkclip_eqx._checkpoint import _quiet_failed_reads

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _quiet_failed_reads():
            _read()
            gc.collect()
        _read()
        gc.collect()
    assert [str(w.message) for w in caught] == ["coroutine '_read' was never awaited"]


def test_corrupt_arrays(tmp_path):
    path = _save(tmp_path)
    blob = _array_files(path)[-1]
    raw = bytearray(blob.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    blob.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt|unreadable") as info:
        load_checkpoint(path, _make_state(0))
    assert str(path) in str(info.value)
    assert read_meta(path) == META  # The metadata itself is still readable.


def test_fingerprint_catches_changed_bits(tmp_path):
    """A leaf whose bits differ from those saved (here: the saved fingerprint
    edited) is reported as corrupt, naming the leaf."""
    path = _save(tmp_path)
    meta_file = path / "meta" / "metadata"
    header = json.loads(meta_file.read_text())
    i = [r["path"] for r in header["leaves"]].index("['ema']")
    header["fingerprints"][i] = "%08x" % (int(header["fingerprints"][i], 16) ^ 1)
    meta_file.write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match=re.escape("corrupt checkpoint: leaf ['ema']")):
        load_checkpoint(path, _make_state(0))


def test_fingerprints_ignore_the_sharding():
    """The fingerprint of an array is the same whatever its sharding, and one
    flipped bit anywhere changes it."""
    from qkclip_eqx._checkpoint_format import fingerprint_all as _fingerprint_all

    x = jnp.arange(64, dtype=jnp.float32).reshape(16, 4) / 7
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    placed = [
        x,
        jax.device_put(x, NamedSharding(mesh, PartitionSpec("a", "b"))),
        jax.device_put(x, NamedSharding(mesh, PartitionSpec("b"))),
    ]
    fps = {_fingerprint_all([y])[0] for y in placed}
    assert len(fps) == 1
    bits = np.asarray(x).view(np.uint32).copy()
    for i, bit in [(0, 0), (37, 31), (63, 15)]:
        flipped = bits.copy()
        flipped.flat[i] ^= np.uint32(1 << bit)
        assert _fingerprint_all([jnp.asarray(flipped.view(np.float32))])[0] not in fps


def test_newest_unusable_falls_back_to_older(tmp_path):
    old, new = _make_state(0), _make_state(1)
    _save(tmp_path, step=1, state=old)
    newest = _save(tmp_path, step=2, state=new)
    for f in _array_files(newest):
        f.unlink()
    warnings = []
    loaded, meta, path = load_latest_checkpoint(tmp_path, _make_state(2), warn=warnings.append)
    assert path.name == "ckpt_00000001"
    _assert_bit_identical(old, loaded)
    assert len(warnings) == 1
    assert (
        "ckpt_00000002 failed to restore" in warnings[0]
        and "trying the older ckpt_00000001" in warnings[0]
    )
    # a checkpoint of another run: no fall-back, the mismatch is the answer
    with pytest.raises(CheckpointMismatchError, match="n_layers"):
        load_latest_checkpoint(
            tmp_path, _make_state(2), expect_meta={"config": {"n_layers": 2}}, warn=warnings.append
        )
    assert load_latest_checkpoint(tmp_path / "empty", _make_state(2)) is None


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "ckpt_00000001"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    for fn in (read_meta, lambda p: load_checkpoint(p, _make_state(0))):
        with pytest.raises(CheckpointError, match="not a qkclip checkpoint") as info:
            fn(path)
        assert str(path) in str(info.value)
    path.unlink()
    path.mkdir()
    with pytest.raises(CheckpointError, match="not a qkclip checkpoint"):
        read_meta(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_meta(tmp_path / "missing")
    # an Orbax checkpoint, but not one of ours
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(
        tmp_path / "other",
        item_names=("state", "meta"),
        options=ocp.CheckpointManagerOptions(step_prefix="ckpt", step_format_fixed_length=8),
    ) as m:
        m.save(
            1,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({"a": jnp.ones(2)}),
                meta=ocp.args.JsonSave({"hello": 1}),
            ),
        )
        m.wait_until_finished()
    with pytest.raises(CheckpointError, match="not a qkclip checkpoint"):
        read_meta(tmp_path / "other" / "ckpt_00000001")
    assert issubclass(CheckpointError, ValueError)


def test_structure_mismatch(tmp_path):
    path = _save(tmp_path)
    with pytest.raises(CheckpointMismatchError, match="structure") as info:
        load_checkpoint(path, _make_state(0, width=16))
    message = str(info.value)
    assert ".layers[0].weight" in message
    assert "(8, 3)" in message and "(16, 3)" in message
    assert str(path) in message

    with pytest.raises(CheckpointMismatchError, match="number of stored leaves"):
        load_checkpoint(path, _make_state(0, depth=3))

    like = _make_state(0)
    like["ema"] = like["ema"].astype(jnp.float32)
    with pytest.raises(CheckpointMismatchError, match="bfloat16") as info:
        load_checkpoint(path, like)
    assert "['ema']" in str(info.value) and "float32" in str(info.value)

    like = _make_state(0)
    like["key"] = jax.random.PRNGKey(0)  # Raw key where a typed key was saved.
    with pytest.raises(CheckpointMismatchError, match=re.escape("['key']")):
        load_checkpoint(path, like)


def test_expect_meta_mismatch(tmp_path):
    path = _save(tmp_path)
    with pytest.raises(CheckpointMismatchError, match="n_layers") as info:
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
    _, meta = load_checkpoint(path, _make_state(1), expect_meta={"config": {"betas": (0.9, 0.95)}})
    assert meta == META


def test_meta_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path, 1, {"x": 1}, meta={"bad": object()})
    assert not (pathlib.Path(tmp_path) / "ckpt_00000001").exists()
