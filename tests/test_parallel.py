"""Multi-device: every mesh (FSDP and tensor-parallel MLP included) reproduces
the single-device run, the parameters are gathered one layer at a time inside
the scan, the clip needs no all-gather, bad meshes fail before compiling naming
the leaf, and two processes agree with one."""

import dataclasses
import os
import pathlib
import re
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
from qkclip_eqx._parallel import layer_specs, partition_specs, shard, shard_loss

MESHES = [
    dict(data=8),
    dict(data=4, model=2),
    dict(data=2, seq=4),
    dict(data=2, model=2, seq=2),
    dict(fsdp=8),
    dict(fsdp=4, model=2),
    dict(data=2, fsdp=2, model=2),
]


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
    _assert_same_run(reference["gqa"], run_scenario(qc.make_mesh(fsdp=2, model=2, seq=2), "gqa"))


def test_params_are_sharded_by_heads_hidden_units_and_fsdp():
    mesh = qc.make_mesh(fsdp=2, model=4)
    model = qc.Transformer(config("mla"), key=jax.random.key(0))
    model = shard(model, partition_specs(model), mesh)
    wq = model.blocks.attn.wq  # [layers, heads, qk, q_in]: heads over model, q_in over fsdp
    assert wq.sharding.spec == P(None, "model", None, "fsdp")
    assert {s.data.shape for s in wq.addressable_shards} == {(2, 1, 16, 8)}
    mlp = model.blocks.mlp  # column-parallel in, row-parallel out; fsdp on the other axis
    assert (mlp.w_gate.sharding.spec, mlp.w_up.sharding.spec, mlp.w_down.sharding.spec) == (
        P(None, "model", "fsdp"),
        P(None, "model", "fsdp"),
        P(None, "fsdp", "model"),
    )
    assert {s.data.shape for s in mlp.w_down.addressable_shards} == {(2, 16, 16)}
    assert model.embed.sharding.spec == model.lm_head.sharding.spec == P(None, "fsdp")
    assert model.blocks.attn_norm.weight.sharding.spec == P(None, "fsdp")
    # every leaf's shards are exactly 1/8 (model and fsdp) or 1/2 (fsdp only) of it
    for leaf, spec in zip(
        jax.tree.leaves(eqx.filter(model, eqx.is_array)),
        jax.tree.leaves(partition_specs(model), is_leaf=lambda s: isinstance(s, P)),
    ):
        parts = 8 if "model" in tuple(spec) else 2
        assert {s.data.size * parts for s in leaf.addressable_shards} == {leaf.size}


def _collectives(hlo: str, op: str) -> list[tuple[str, tuple[int, ...]]]:
    """`(computation, result shape)` of every `op` (e.g. all-gather) in an HLO module."""
    found, computation = [], None
    for line in hlo.splitlines():
        if m := re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line):
            computation = m.group(1)
        if m := re.search(rf"= \w+\[([\d,]*)\]\S* {op}(?:-start)?\(", line):
            found.append((computation, tuple(int(d) for d in m.group(1).split(",") if d)))
    return found


def _ops(hlo: str) -> list[tuple[str, str]]:
    """`(result, op)` of every collective in an HLO module."""
    ops = "all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute"
    return re.findall(rf"= (.*?) ({ops})(?:-start)?\(", hlo)


def test_fsdp_gathers_one_layer_at_a_time_inside_the_scan():
    """The compiled loss-and-gradient on fsdp=4 x model=2: each block leaf is
    all-gathered in a loop body (the scan, forward and backward) with ONE
    layer's shape, never the stacked shape; the gradients are reduce-scattered."""
    cfg = config("mla")
    cfg = dataclasses.replace(cfg, n_layers=3)  # a layer count no other axis has
    mesh = qc.make_mesh(fsdp=4, model=2)
    model = qc.Transformer(cfg, key=jax.random.key(0))
    specs = partition_specs(model)
    model = shard(model, specs, mesh)
    params, static = eqx.partition(model, eqx.is_array)
    loss = shard_loss(qc.next_token_loss, mesh)
    grad = jax.jit(jax.grad(lambda p, t: loss(eqx.combine(p, static), t)[0]))
    tokens = qc.shard_batch(np.zeros((8, 17), np.int32), mesh)
    hlo = grad.lower(params, tokens).compile().as_text()
    gathers = _collectives(hlo, "all-gather")
    entry = re.search(r"^ENTRY %?([\w.\-]+)", hlo, re.M).group(1)  # pyright: ignore
    in_loops = {shape for comp, shape in gathers if comp != entry}
    stacked = jax.tree.leaves(eqx.filter(model.blocks, eqx.is_array))
    one_layer = jax.tree.leaves(layer_specs(specs.blocks), is_leaf=lambda s: isinstance(s, P))
    for leaf, spec in zip(stacked, one_layer, strict=True):
        local = [n // (2 if s == "model" else 1) for n, s in zip(leaf.shape[1:], tuple(spec))]
        assert tuple(local) in in_loops, f"a layer of {leaf.shape} is not gathered in the scan"
        whole = (cfg.n_layers, *local)
        assert all(shape != whole for _, shape in gathers), f"the stack {whole} was gathered"
    assert _collectives(hlo, "reduce-scatter"), "the gradients are reduce-scattered"


def test_clip_on_sharded_weights_needs_no_all_gather():
    mesh = qc.make_mesh(fsdp=2, model=4)
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
    assert clipped.blocks.attn.wq.sharding.spec == P(None, "model", None, "fsdp")


@pytest.mark.parametrize(
    "shape, batch, seq, match",
    [
        (dict(data=2, model=4), 8, 16, None),  # a mesh that divides everything passes
        (dict(data=1, model=8), 8, 16, "n_heads=4 is not divisible by the mesh's model axis"),
        (dict(data=2, fsdp=4), 4, 16, r"batch size 4 is not divisible by the mesh's data x fsdp"),
        (dict(data=2, seq=4), 8, 18, "sequence length 18 is not divisible by the mesh's seq axis"),
        (
            dict(fsdp=8),
            8,
            16,
            re.escape(
                "Transformer.blocks.attn.q_norm.weight of shape (2, 12): its dimension 1 (12) is "
                "not divisible by the mesh's fsdp axis (8)"
            ),
        ),
        (
            dict(fsdp=2, model=4),
            8,
            16,
            re.escape(
                "Transformer.blocks.mlp.w_gate of shape (2, 66, 32): its dimension 1 (66) is not "
                "divisible by the mesh's model axis (4)"
            ),
        ),
    ],
)
def test_bad_mesh_fails_before_compiling(shape, batch, seq, match):
    mesh = qc.make_mesh(**shape)
    cfg = config("mla")
    if "q_norm" in str(match):  # a q_lora_rank that 8 does not divide
        cfg = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, q_lora_rank=12))
    if "w_gate" in str(match):  # an MLP that 4 does not divide
        cfg = dataclasses.replace(cfg, mlp_hidden=66)
    model = qc.Transformer(cfg, key=jax.random.key(0))
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
    # positional sizes are (data, fsdp, model, seq)
    assert dict(qc.make_mesh(2, 2, 2).shape) == dict(data=2, fsdp=2, model=2, seq=1)


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


def test_checkpoint_moves_between_meshes(tmp_path):
    """fsdp=8 -> one device -> fsdp=4 x model=2: each save and load is bit-exact,
    and each load places every leaf on the target's sharding (the state after
    one step, so that the optimizer moments are not zero)."""
    model = qc.Transformer(config("mla"), key=jax.random.key(0))
    opt = qc.muon_adamw(1e-2)
    state = opt.init(eqx.filter(model, eqx.is_array))
    grads = jax.tree.map(jnp.ones_like, eqx.filter(model, eqx.is_array))
    _, state = opt.update(grads, state, eqx.filter(model, eqx.is_array))
    want = [np.asarray(x) for x in jax.tree.leaves((model, state))]
    fsdp8 = qc.shard_train_state(model, state, opt, qc.make_mesh(fsdp=8))
    assert fsdp8[0].lm_head.sharding.spec == P(None, "fsdp")
    path = qc._checkpoint.save_checkpoint(tmp_path / "a", 1, fsdp8, meta={})
    one, _ = qc.load_checkpoint(path, (model, state))
    assert all(len(x.devices()) == 1 for x in jax.tree.leaves(one))
    for a, b in zip(want, jax.tree.leaves(one), strict=True):
        np.testing.assert_array_equal(a, b)
    path = qc._checkpoint.save_checkpoint(tmp_path / "b", 1, one, meta={})
    mesh = qc.make_mesh(fsdp=4, model=2)
    target = qc.shard_train_state(model, state, opt, mesh)
    moved, _ = qc.load_checkpoint(path, jax.tree.map(jnp.zeros_like, target))
    for a, b, t in zip(want, jax.tree.leaves(moved), jax.tree.leaves(target), strict=True):
        np.testing.assert_array_equal(a, b)
        assert b.sharding == t.sharding
    assert moved[0].blocks.mlp.w_gate.sharding.spec == P(None, "model", "fsdp")


@pytest.mark.parametrize(
    "scheme, shape", [("owner", dict(fsdp=8)), ("gather", dict(fsdp=4, model=2))]
)
def test_muon_on_sharded_state_equals_one_device(scheme, shape):
    """One optimizer update on sharded state, Newton-Schulz placed by owner
    (whole matrices resharded to the device that orthogonalises them) or
    gathered everywhere: the one-device update; the owner scheme's HLO moves
    the momentum by all-to-all, the gather scheme's by all-gather."""
    model = qc.Transformer(config("mla"), key=jax.random.key(0))
    params = eqx.filter(model, eqx.is_array)
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
    opt = qc.muon_adamw(1e-2, ns_sharding=scheme)
    state = opt.init(params)
    want, _ = opt.update(grads, state, params)
    mesh = qc.make_mesh(**shape)
    specs = partition_specs(model)
    sharded = [shard(t, specs, mesh) for t in (grads, params)]
    _, state = qc.shard_train_state(model, state, opt, mesh)

    def update(g, s, p):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return opt.update(g, s, p)

    compiled = jax.jit(update).lower(sharded[0], state, sharded[1]).compile()
    got, _ = compiled(sharded[0], state, sharded[1])
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        # measured max |diff| 1.35e-8 (owner), 9.8e-9 (gather) on updates up to 1.3e-2
        # (jax 0.10.2, CPU)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=5.4e-8)
    ops = {op for _, op in _ops(compiled.as_text())}
    assert ops == ({"all-to-all"} if scheme == "owner" else {"all-gather"})


def test_unknown_ns_sharding_is_refused():
    with pytest.raises(ValueError, match="ns_sharding must be one of"):
        qc.muon_adamw(1e-2, ns_sharding="everywhere")
