"""Multi-device: every mesh reproduces the single-device run, the clip needs no
all-gather, bad meshes fail before compiling, and two processes agree with one."""

import os
import pathlib
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import qkclip_eqx as qc
from launch import run_processes
from parallel_scenario import TAU, config, run_scenario
from qkclip_eqx._parallel import partition_specs, shard

MESHES = [dict(data=8), dict(data=4, model=2), dict(data=2, seq=4), dict(data=2, model=2, seq=2)]


@pytest.fixture(scope="module")
def reference():
    return {a: run_scenario(None, a) for a in ("mla", "gqa")}


def _assert_same_run(ref, got):
    (ref_params, ref_m), (params, m) = ref, got
    np.testing.assert_array_equal(ref_m["heads_clipped"], m["heads_clipped"])
    assert ref_m["heads_clipped"].sum() > 0, "the scenario must exercise the clip"
    # the same heads were clipped at every step
    np.testing.assert_array_equal(ref_m["max_logits"] > TAU, m["max_logits"] > TAU)
    # measured rel 6.9e-7 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(ref_m["max_logits"], m["max_logits"], rtol=3e-6)
    # measured rel 3.3e-7 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(ref_m["loss"], m["loss"], rtol=1.5e-6)
    # the gradients are the one device's: their global norm at every step
    assert np.all(ref_m["grad_norm"] > 0)
    # measured rel 1.1e-7 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(ref_m["grad_norm"], m["grad_norm"], rtol=5e-7)
    for a, b in zip(ref_params, params, strict=True):
        # a few f32 roundings apart: the sequence shards sum dK in another order, and
        # Newton-Schulz amplifies the last bits over the steps
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_mesh_matches_single_device_mla(reference, shape):
    _assert_same_run(reference["mla"], run_scenario(qc.make_mesh(**shape), "mla"))


def test_mesh_matches_single_device_gqa(reference):
    _assert_same_run(reference["gqa"], run_scenario(qc.make_mesh(data=2, model=2, seq=2), "gqa"))


def test_params_are_sharded_by_heads():
    mesh = qc.make_mesh(data=2, model=4)
    model = qc.Transformer(config("mla"), key=jax.random.key(0))
    model = shard(model, partition_specs(model), mesh)
    wq = model.blocks.attn.wq  # [layers, heads, qk, q_in]
    assert wq.sharding.spec == P(None, "model")
    assert {s.data.shape for s in wq.addressable_shards} == {(2, 1, 16, 16)}


def test_clip_on_sharded_weights_needs_no_all_gather():
    mesh = qc.make_mesh(data=2, model=4)
    model = qc.Transformer(config("mla"), key=jax.random.key(0))
    model = shard(model, partition_specs(model), mesh)
    s = jax.device_put(jnp.full((2, 4), 10.0), NamedSharding(mesh, P(None, "model")))
    params, static = eqx.partition(model, eqx.is_array)
    clip = jax.jit(
        lambda p, s: eqx.filter(qc.qk_clip(eqx.combine(p, static), s, TAU), eqx.is_array)
    )
    hlo = clip.lower(params, s).compile().as_text()
    assert "multiply" in hlo  # the clip was compiled, not optimised away
    assert "all-gather" not in hlo and "all-reduce" not in hlo
    clipped = eqx.filter_jit(lambda m, s: qc.qk_clip(m, s, TAU))(model, s)
    assert clipped.blocks.attn.wq.sharding.spec == P(None, "model")


@pytest.mark.parametrize(
    "shape, batch, seq, match",
    [
        (dict(data=2, model=4), 8, 16, None),  # a mesh that divides everything passes
        (dict(data=1, model=8), 8, 16, "n_heads=4 is not divisible by the mesh's model axis"),
        (dict(data=8), 4, 16, "batch size 4 is not divisible by the mesh's data axis"),
        (dict(data=2, seq=4), 8, 18, "sequence length 18 is not divisible by the mesh's seq axis"),
    ],
)
def test_bad_mesh_fails_before_compiling(shape, batch, seq, match):
    mesh = qc.make_mesh(**shape)
    model = qc.Transformer(config("mla"), key=jax.random.key(0))
    if match is None:
        qc._parallel.check_mesh(mesh, model, batch, seq)  # a good mesh passes
        return
    opt = qc.muon_adamw(1e-2)
    step = qc.make_train_step(opt, mesh=mesh)
    with pytest.raises(ValueError, match=match):
        step(
            model, opt.init(eqx.filter(model, eqx.is_array)), jnp.zeros((batch, seq + 1), jnp.int32)
        )


def test_mesh_must_match_devices():
    with pytest.raises(ValueError, match="does not match the 8 devices"):
        qc.make_mesh(data=3)


def test_two_processes_match_one(reference, tmp_path):
    tests = pathlib.Path(__file__).parent
    out = tmp_path / "mp.npz"
    env = {**os.environ, "PYTHONPATH": str(tests) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XLA_FLAGS", None)
    worker = str(tests / "_multiprocess_worker.py")
    run_processes(lambda address, i: [sys.executable, worker, address, str(i), str(out)], env=env)
    got = np.load(out)
    ref_params, ref_m = reference["mla"]
    params = [got[f"arr_{i}"] for i in range(len(ref_params))]
    _assert_same_run(reference["mla"], (params, {k: got[k] for k in ref_m}))
