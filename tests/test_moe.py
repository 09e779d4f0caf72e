"""DeepSeek-V3 mixture-of-experts layers (`qkclip_eqx.MoE`, `MoEBlock`, a
Transformer with `config.moe`): the layer against a dense float64 NumPy
reference that runs every expert, routing settings (groups, norm_topk_prob,
the bias selecting but not weighting), training with MuonClip (the bias rule
exactly, the load balancing, the optimizer kept off the bias, micro-batches,
resume bit for bit), decoding, Muon's per-expert routing, QK-Clip on the two
layer stacks, and the config's checks."""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from optax.contrib import MuonDimensionNumbers

import qkclip_eqx as qc
from qkclip_eqx._moe import route
from qkclip_eqx._parallel import check_mesh

DIM = 32


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _silu(x):
    return x * _sigmoid(x)


def numpy_moe(moe: qc.MoE, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The layer in float64, every expert run on every token (the dense
    form): DeepSeek-V3 report, arXiv 2412.19437, eqs. 12-16, with the group
    limit of its `noaux_tc` router. Returns the output and the load."""
    c = moe.config
    f = {k: np.asarray(v, np.float64) for k, v in _arrays(moe).items()}
    x = np.asarray(x, np.float64)
    t, e, g = x.shape[0], c.n_routed_experts, c.n_group
    scores = _sigmoid(x @ f["router"].T)
    choice = scores + f["expert_bias"]
    if g > 1:
        grouped = np.sort(choice.reshape(t, g, e // g), axis=-1)[..., -2:].sum(-1)
        best = np.argsort(-grouped, axis=-1)[:, : c.topk_group]
        keep = np.zeros((t, g), bool)
        np.put_along_axis(keep, best, True, axis=-1)
        choice = np.where(np.repeat(keep, e // g, axis=-1), choice, -np.inf)
    chosen = np.argsort(-choice, axis=-1)[:, : c.num_experts_per_tok]
    gate = np.zeros((t, e))
    np.put_along_axis(gate, chosen, np.take_along_axis(scores, chosen, -1), axis=-1)
    if c.norm_topk_prob:
        gate = gate / gate.sum(-1, keepdims=True)
    gate = gate * c.routed_scaling_factor
    # every expert on every token: [e, t, hidden]
    h = _silu(np.einsum("td,ehd->eth", x, f["w_gate"])) * np.einsum("td,ehd->eth", x, f["w_up"])
    routed = np.einsum("eth,edh,te->td", h, f["w_down"], gate)
    out = routed
    if moe.shared is not None:
        s = {k: np.asarray(v, np.float64) for k, v in vars(moe.shared).items() if k[:2] == "w_"}
        out = out + (_silu(x @ s["w_gate"].T) * (x @ s["w_up"].T)) @ s["w_down"].T
    load = np.bincount(chosen.reshape(-1), minlength=e).astype(np.float64)
    return out, load


def _arrays(moe: qc.MoE) -> dict[str, np.ndarray]:
    return {
        "router": np.asarray(moe.router),
        "expert_bias": np.asarray(moe.expert_bias),
        "w_gate": np.asarray(moe.experts.w_gate),
        "w_up": np.asarray(moe.experts.w_up),
        "w_down": np.asarray(moe.experts.w_down),
    }


# name -> MoEConfig: n_group 1 and > 1, with and without norm_topk_prob, shared or not
ROUTINGS = {
    "k2": qc.MoEConfig(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        routed_scaling_factor=2.827,
    ),
    "dsv3_groups": qc.MoEConfig(
        n_routed_experts=16,
        num_experts_per_tok=3,
        moe_intermediate_size=8,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
    ),
    "groups_unnormed_no_shared": qc.MoEConfig(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        n_shared_experts=0,
        n_group=2,
        topk_group=1,
        norm_topk_prob=False,
    ),
}


def _moe(config: qc.MoEConfig, seed: int = 0) -> qc.MoE:
    moe = qc.MoE(config, DIM, key=jax.random.key(seed))
    # a bias of the order of the score differences: it changes the choice
    bias = 0.2 * jax.random.uniform(jax.random.key(seed + 100), moe.expert_bias.shape)
    return eqx.tree_at(lambda m: m.expert_bias, moe, bias)


@pytest.mark.parametrize("name", sorted(ROUTINGS))
def test_moe_matches_dense_float64_reference(name):
    moe = _moe(ROUTINGS[name])
    x = jax.random.normal(jax.random.key(1), (24, DIM))
    out, stats = eqx.filter_jit(lambda m, x: m(x))(moe, x)
    ref, load = numpy_moe(moe, np.asarray(x))
    # measured max |diff| 1.2e-6 of outputs up to 3.1 (jax 0.10.2, CPU)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=5e-6)
    np.testing.assert_array_equal(np.asarray(stats.load), load)
    assert float(stats.dropped) == 0.0 and load.sum() == 24 * moe.config.num_experts_per_tok


def test_bias_selects_but_does_not_weight():
    """Zeroing the bias changes which experts are chosen (so it matters), and
    the weights of the chosen experts are the unbiased scores."""
    moe = _moe(ROUTINGS["k2"])
    x = jax.random.normal(jax.random.key(1), (24, DIM))
    logits = x @ moe.router.T
    experts, weights, scores = route(logits, moe.expert_bias, moe.config)
    unbiased, _, _ = route(logits, jnp.zeros_like(moe.expert_bias), moe.config)
    assert not np.array_equal(np.sort(experts, -1), np.sort(unbiased, -1))
    picked = np.take_along_axis(np.asarray(scores), np.asarray(experts), -1)
    expected = picked / picked.sum(-1, keepdims=True) * moe.config.routed_scaling_factor
    np.testing.assert_allclose(np.asarray(weights), expected, rtol=1e-6)


def test_gradients_match_a_dense_jax_form():
    """The grouped-matmul dispatch's gradients (router, experts, shared) equal
    those of a dense form that runs every expert and masks by the weights."""
    moe = _moe(ROUTINGS["dsv3_groups"])
    x = jax.random.normal(jax.random.key(1), (24, DIM))
    r = jax.random.normal(jax.random.key(2), (24, DIM))

    def dense(m, x):
        logits = x @ m.router.T
        experts, weights, _ = route(logits, m.expert_bias, m.config)
        gate = jnp.zeros(logits.shape).at[jnp.arange(24)[:, None], experts].set(weights)
        ex = m.experts
        h = jax.nn.silu(jnp.einsum("td,ehd->eth", x, ex.w_gate)) * jnp.einsum(
            "td,ehd->eth", x, ex.w_up
        )
        return jnp.einsum("eth,edh,te->td", h, ex.w_down, gate) + m.shared(x)

    g_moe = jax.grad(lambda m: jnp.sum(m(x)[0] * r))(moe)
    g_dense = jax.grad(lambda m: jnp.sum(dense(m, x) * r))(moe)
    for a, b in zip(jax.tree.leaves(g_moe), jax.tree.leaves(g_dense)):
        a, b = np.asarray(a), np.asarray(b)
        # measured max |diff| 7.6e-6 of gradients up to 17 (4.5e-7 of the largest;
        # jax 0.10.2, CPU): allowed 2e-6 of the largest
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * np.abs(b).max() + 1e-7)
    assert not np.any(np.asarray(g_moe.expert_bias))  # the bias gets no gradient
    assert np.abs(np.asarray(g_moe.router)).max() > 1e-3  # the router learns through g_i


def test_sequence_balance_loss_per_packed_sequence():
    """Packed sequences: the balance loss is the mean of each sequence's own."""
    moe = _moe(ROUTINGS["k2"])
    x = jax.random.normal(jax.random.key(1), (24, DIM))
    _, packed = moe(x, segment_length=8)
    each = [moe(x[i : i + 8])[1].balance_loss for i in (0, 8, 16)]
    np.testing.assert_allclose(float(packed.balance_loss), np.mean(each), rtol=1e-6)
    # f_i P_i summed: with K of N experts, f sums to N over experts and P to 1
    assert 0.0 < float(packed.balance_loss) < moe.config.n_routed_experts


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------

ATTN = qc.MLAConfig(
    dim=DIM, n_heads=2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8
)
MOE = qc.MoEConfig(
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    n_group=2,
    topk_group=1,
    routed_scaling_factor=2.0,
    first_k_dense_replace=1,
    bias_update_rate=1e-2,
    seq_balance_weight=1e-3,
)
CONFIG = qc.TransformerConfig(vocab_size=61, n_layers=3, mlp_hidden=48, attention=ATTN, moe=MOE)


@pytest.fixture(scope="module")
def model():
    return qc.Transformer(CONFIG, key=jax.random.key(0))


def test_model_layout_and_forward(model):
    assert model.blocks.attn.wkv_a.shape[0] == 1 and model.moe_blocks is not None
    assert model.moe_blocks.mlp.experts.w_gate.shape == (2, 8, 16, DIM)
    tokens = jnp.arange(10) % 61
    logits, s, stats = model.forward(tokens)
    assert s.shape == (3, 2) and stats is not None and stats.load.shape == (2, 8)
    # the layers by hand: the dense block, then each MoE block
    x = model.embed[tokens]
    block0 = jax.tree.map(lambda a: a[0], model.blocks)
    x, s0 = block0(x)
    for i in range(2):
        x, si, st = jax.tree.map(lambda a, i=i: a[i], model.moe_blocks)(x)
        np.testing.assert_array_equal(np.asarray(st.load), np.asarray(stats.load[i]))
        np.testing.assert_allclose(np.asarray(si), np.asarray(s[1 + i]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(s0), np.asarray(s[0]), rtol=1e-5)
    ref = model.final_norm(x) @ model.lm_head.T
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), rtol=0, atol=2e-5)
    assert model(tokens)[0].shape == (10, 61)


def test_program_size_does_not_grow_with_depth():
    """One scan over the dense layers and one over the MoE layers, whatever the
    depth: the traced program is the same size for 3 and 7 layers."""
    from test_model import _count_eqns

    sizes, scans = {}, {}
    for n in (3, 7):
        m = eqx.filter_eval_shape(
            qc.Transformer, dataclasses.replace(CONFIG, n_layers=n), key=jax.random.key(0)
        )
        jaxpr = jax.make_jaxpr(lambda m, t: m(t))(m, jnp.arange(8))
        sizes[n] = (len(jaxpr.eqns), _count_eqns(jaxpr))
        scans[n] = [e.params["length"] for e in jaxpr.eqns if e.primitive.name == "scan"]
    assert sizes[3] == sizes[7], sizes
    assert scans == {3: [1, 2], 7: [1, 6]}
    # the routed experts run as grouped matmuls, not a dense einsum over experts
    text = str(jax.make_jaxpr(lambda m, t: m(t))(m, jnp.arange(8)))
    assert text.count("ragged_dot_general") == 3  # gate, up, down


def test_decode_equals_forward(model):
    """Absorbed MLA over the latent cache with MoE layers: a prefill then one
    token at a time gives the forward's logits at every position."""
    tokens = jax.random.randint(jax.random.key(3), (12,), 0, 61)
    full, s_full = eqx.filter_jit(lambda m, t: m(t))(model, tokens)
    cache = model.init_cache(16)
    decode = eqx.filter_jit(lambda m, t, c: m.decode(t, c))
    logits, _, cache = decode(model, tokens[:7], cache)
    steps = [logits]
    for i in range(7, 12):
        logits, _, cache = decode(model, tokens[i : i + 1], cache)
        steps.append(logits)
    # measured max |diff| 1.9e-6 of logits up to 4 (jax 0.10.2, CPU)
    np.testing.assert_allclose(np.concatenate(steps), np.asarray(full), rtol=0, atol=2e-5)
    assert int(cache.length) == 12


def test_muon_routes_each_expert_on_its_own(model):
    dims = model.muon_dimension_numbers()
    ex = dims.moe_blocks.mlp.experts
    assert ex.w_gate == MuonDimensionNumbers(reduction_axis=3, output_axis=(2,))
    assert dims.moe_blocks.mlp.router == MuonDimensionNumbers(reduction_axis=2, output_axis=(1,))
    assert dims.moe_blocks.mlp.expert_bias is None
    assert dims.moe_blocks.mlp.shared.w_down == MuonDimensionNumbers(
        reduction_axis=2, output_axis=(1,)
    )
    assert dims.blocks.mlp.w_up == MuonDimensionNumbers(reduction_axis=2, output_axis=(1,))


def test_qk_clip_splits_s_over_the_two_stacks(model):
    s = jnp.array([[150.0, 50.0], [50.0, 400.0], [120.0, 10.0]])
    clipped = qc.qk_clip(model, s, 100.0)
    by_stack = qc.qk_clip(model, [s[:1], s[1:]], 100.0)
    assert eqx.tree_equal(clipped, by_stack)
    assert not eqx.tree_equal(clipped.moe_blocks.attn, model.moe_blocks.attn)
    with pytest.raises(ValueError, match="got 1 max-logit arrays for 2"):
        qc.qk_clip(model, s[:2], 100.0)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

STEPS = 24


def _copy(tree):
    return jax.tree.map(lambda a: a.copy() if eqx.is_array(a) else a, tree)


def _batch(i: int) -> jax.Array:
    return jax.random.randint(jax.random.key(1000 + i), (4, 17), 0, 61)


@pytest.fixture(scope="module")
def trained(model):
    opt = qc.muon_adamw(3e-3, weight_decay=0.1)
    step = qc.make_train_step(opt, tau=4.0)
    m = _copy(model)  # the step donates its model
    state = opt.init(eqx.filter(m, eqx.is_array))
    history = []
    for i in range(STEPS):
        before = np.asarray(m.moe_blocks.mlp.expert_bias)
        m, state, metrics = step(m, state, _batch(i))
        history.append((before, np.asarray(m.moe_blocks.mlp.expert_bias), jax.device_get(metrics)))
    return opt, step, m, state, history


def test_bias_moves_by_the_sign_rule_only(trained):
    """Every step, with weight decay on: b' = b + rate * sign(mean load - load)
    exactly, the optimizer's update (and its decay) kept off the bias."""
    *_, history = trained
    for before, after, metrics in history:
        load = metrics["expert_load"]
        expected = np.asarray(before) + np.float32(MOE.bias_update_rate) * np.sign(
            load.mean(-1, keepdims=True) - load
        ).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(after), expected)


@eqx.filter_jit
def _probe_load(m):
    """The load of 512 fixed tokens, per MoE layer."""
    return m.forward(jax.random.randint(jax.random.key(7), (512,), 0, 61))[2].load


def _cv(load) -> float:
    load = np.asarray(load)
    return float(np.mean(load.std(-1) / load.mean(-1)))


def test_load_balances_and_metrics(trained, model):
    *_, m, _, history = trained
    assert all(int(h[2]["dropped_tokens"]) == 0 for h in history)
    assert all(h[2]["expert_load"].sum() == 2 * 64 * 2 for h in history)  # layers, tokens, K
    # random init routes unevenly; after warm-up the bias has evened the load
    # of a fixed probe out (measured CV 0.32 -> 0.19), and it is the bias that did
    before, after = _cv(_probe_load(model)), _cv(_probe_load(m))
    unbiased = eqx.tree_at(
        lambda t: t.moe_blocks.mlp.expert_bias, m, jnp.zeros_like(m.moe_blocks.mlp.expert_bias)
    )
    assert after < 0.75 * before and after < _cv(_probe_load(unbiased)), (before, after)
    ratios = [float(h[2]["expert_load_ratio"]) for h in history]
    assert all(r >= 1.0 for r in ratios) and np.mean(ratios[-6:]) < ratios[0], ratios
    first, last = history[0][2], history[-1][2]
    assert np.isfinite(last["loss"]) and last["loss"] < first["loss"]
    assert float(first["balance_loss"]) > 0
    assert first["max_logits"].shape == (3, 2)
    assert sum(int(h[2]["heads_clipped"]) for h in history) > 0  # QK-Clip acted


def test_micro_batches_sum_the_loads(trained):
    """accum_steps=2 routes the same tokens: the same loads, bit for bit."""
    opt, step, m, state, _ = trained
    step2 = qc.make_train_step(opt, tau=4.0, accum_steps=2)
    _, _, one = step(*_copy((m, state)), _batch(99))
    _, _, two = step2(*_copy((m, state)), _batch(99))
    np.testing.assert_array_equal(np.asarray(one["expert_load"]), np.asarray(two["expert_load"]))


def test_resume_is_bit_for_bit(trained, model, tmp_path):
    """Save after 3 steps, restore, take 3 more: the same model and state as
    6 steps without a break."""
    opt, step, *_ = trained

    def run(m, state, steps):
        for i in steps:
            m, state, _ = step(m, state, _batch(i))
        return m, state

    def fresh():
        m = _copy(model)
        return m, opt.init(eqx.filter(m, eqx.is_array))

    straight = run(*fresh(), range(6))
    half = run(*fresh(), range(3))
    path = qc._checkpoint.save_checkpoint(tmp_path, 3, half, meta={"step": 3})
    restored, _ = qc.load_checkpoint(path, fresh())
    resumed = run(*restored, range(3, 6))
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("shape", [dict(data=4, model=2), dict(data=2, fsdp=2, model=2)])
def test_mesh_equals_one_device(model, shape):
    """On 8 simulated devices (heads and experts sharded over model, 4 experts
    a device; with fsdp, every leaf also split over it and gathered a layer at
    a time), two MuonClip steps give the single device's loads and biases bit
    for bit, and its weights to float32 rounding."""
    specs = qc.partition_specs(model)
    # [layers, experts, dim, hidden]: experts over model, the input axis over fsdp
    assert specs.moe_blocks.mlp.experts.w_down == P(None, "model", None, "fsdp")
    assert "model" not in tuple(specs.moe_blocks.mlp.router)
    assert "model" not in tuple(specs.moe_blocks.mlp.shared.w_up)
    opt = qc.muon_adamw(3e-3, weight_decay=0.1)
    mesh = qc.make_mesh(**shape, seq=1)
    runs = []
    for on in (None, mesh):
        m = _copy(model)
        state = opt.init(eqx.filter(m, eqx.is_array))
        if on is not None:
            m, state = qc.shard_train_state(m, state, opt, on)
        step = qc.make_train_step(opt, tau=4.0, mesh=on)
        for i in range(2):
            tokens = _batch(i) if on is None else qc.shard_batch(np.asarray(_batch(i)), on)
            m, state, metrics = step(m, state, tokens)
        runs.append((m, jax.device_get(metrics)))
    (one, m1), (many, m8) = runs
    assert tuple(many.moe_blocks.mlp.experts.w_gate.sharding.spec)[:2] == (None, "model")
    np.testing.assert_array_equal(m1["expert_load"], m8["expert_load"])
    np.testing.assert_array_equal(
        np.asarray(one.moe_blocks.mlp.expert_bias), np.asarray(many.moe_blocks.mlp.expert_bias)
    )
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(eqx.filter(one, eqx.is_array)), jax.tree.leaves(many)):
        # measured max |diff| 1.2e-7 (jax 0.10.2, CPU)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_experts_must_divide_over_the_model_axis():
    config = dataclasses.replace(
        CONFIG, moe=dataclasses.replace(MOE, n_routed_experts=5, n_group=1)
    )
    m = eqx.filter_eval_shape(qc.Transformer, config, key=jax.random.key(0))
    with pytest.raises(
        ValueError, match=r"n_routed_experts=5 is not divisible by the mesh's model"
    ):
        check_mesh(qc.make_mesh(data=4, model=2, seq=1), m, 4, 16)


def test_sequence_sharding_is_refused_by_name(model):
    mesh = qc.make_mesh(data=2, model=1, seq=4)
    loss = qc.shard_loss(qc.next_token_loss, mesh)
    with pytest.raises(NotImplementedError, match="mixture-of-experts model .* seq axis of 4"):
        loss(model, _batch(0))


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(n_group=3), "n_group=3 must divide n_routed_experts=8"),
        (dict(n_group=8, topk_group=2), "at least 2"),
        (dict(topk_group=3), "topk_group=3 exceeds n_group=2"),
        (dict(num_experts_per_tok=5), "num_experts_per_tok=5 exceeds the 4 experts"),
        (dict(n_shared_experts=-1), "n_shared_experts must be an int >= 0"),
        (dict(norm_topk_prob=1), "norm_topk_prob must be a bool"),
        (dict(bias_update_rate=-1e-3), "bias_update_rate must be a finite number >= 0"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor must be a positive"),
        (dict(first_k_dense_replace=0), "first_k_dense_replace must be a positive int"),
    ],
)
def test_bad_moe_configs_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(MOE, **changes)


def test_no_moe_layer_is_refused():
    with pytest.raises(ValueError, match="first_k_dense_replace=3 leaves none of the n_layers=3"):
        dataclasses.replace(CONFIG, moe=dataclasses.replace(MOE, first_k_dense_replace=3))
    with pytest.raises(ValueError, match="moe must be a MoEConfig"):
        dataclasses.replace(CONFIG, moe={"n_routed_experts": 8})
