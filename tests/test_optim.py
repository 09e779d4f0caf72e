"""MuonClip's optimizer half (`qkclip_eqx.muon_adamw`, routing) and the schedules.

Routing (Kimi K2 report, Algorithm 1; Moonlight, arXiv 2502.16982): the hidden
matrices of the Transformer's blocks go to Muon, each stacked layer
orthogonalised on its own and a per-head weight [heads, head_dim, in] as ONE
(heads*head_dim, in) matrix; the embedding, LM head and every RMSNorm gain go to
AdamW (betas 0.9, 0.95). Muon's update is NewtonSchulz5(M) * 0.2 * sqrt(max(n, m)),
plus decoupled weight decay, times the learning rate.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
from optax.contrib import MuonDimensionNumbers

import reference
from builders import init_from_numpy as _init
from qkclip_eqx import (
    GQAConfig,
    MLAConfig,
    Transformer,
    TransformerConfig,
    matrix_dimension_numbers,
    muon_adamw,
    warmup_cosine,
    wsd,
)
from reference import NumpyMuonClip, leaves_by_path

NS_COEFFS = (3.4445, -4.7750, 2.0315)
LR = 1e-2


def _random_like(tree, seed: int):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), tree)


def _is_spec(x) -> bool:
    return x is None or isinstance(x, MuonDimensionNumbers)


def param_spec(params):
    """The routing the default muon_adamw applies to a Transformer."""
    return params.muon_dimension_numbers()


def _expected_route(path: str, leaf) -> object:
    """The documented routing of a Transformer leaf, restated independently."""
    if path in (".embed", ".lm_head") or "norm" in path:
        return None
    assert path.startswith(".blocks."), path
    assert leaf.ndim >= 3, path  # a stacked matrix: [layers, out..., in]
    return MuonDimensionNumbers(
        reduction_axis=leaf.ndim - 1, output_axis=tuple(range(1, leaf.ndim - 1))
    )


def _ns5(g: np.ndarray) -> np.ndarray:
    """Newton-Schulz, 5 quintic steps, K2's coefficients, X0 = G / ||G||_F (float64)."""
    a, b, c = NS_COEFFS
    x = np.asarray(g, np.float64)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / (np.linalg.norm(x) + 1e-8)
    for _ in range(5):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if transposed else x


def _ns_scaled(g: np.ndarray) -> np.ndarray:
    """K2's O = NS5(G) * 0.2 * sqrt(max(n, m)) of one 2-D (out, in) matrix."""
    return _ns5(g) * 0.2 * math.sqrt(max(g.shape))


@pytest.fixture(scope="module")
def mla_params():
    att = MLAConfig(
        dim=16,
        n_heads=2,
        kv_lora_rank=8,
        qk_nope_head_dim=4,
        qk_rope_head_dim=4,
        v_head_dim=4,
        q_lora_rank=12,
    )
    cfg = TransformerConfig(vocab_size=32, n_layers=3, mlp_hidden=24, attention=att)
    return eqx.filter(_init(lambda k: Transformer(cfg, key=k), 0), eqx.is_array)


@pytest.fixture(scope="module")
def gqa_params():
    att = GQAConfig(dim=16, n_heads=4, head_dim=4, n_kv_heads=2)
    cfg = TransformerConfig(vocab_size=32, n_layers=2, mlp_hidden=24, attention=att)
    return eqx.filter(_init(lambda k: Transformer(cfg, key=k), 1), eqx.is_array)


@pytest.fixture(scope="module")
def transformer_update(mla_params):
    """One muonclip update (fresh state, wd=0) of the MLA Transformer's params."""
    opt = muon_adamw(LR, weight_decay=0.0)
    state = opt.init(mla_params)
    grads = _random_like(mla_params, 2)
    updates, _ = jax.jit(opt.update)(grads, state, mla_params)
    return grads, updates, state


# --------------------------------------------------------------------------
# routing
# --------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["mla", "gqa"])
def test_param_spec_routes_every_transformer_leaf(which, mla_params, gqa_params):
    params = mla_params if which == "mla" else gqa_params
    spec = param_spec(params)
    param_leaves = dict((jtu.keystr(p), x) for p, x in jtu.tree_flatten_with_path(params)[0])
    # a None where the params hold no leaf (the dense model's moe_blocks=None) is no entry
    spec_leaves = {
        jtu.keystr(p): s
        for p, s in jtu.tree_flatten_with_path(spec, is_leaf=_is_spec)[0]
        if s is not None or jtu.keystr(p) in param_leaves
    }
    assert spec_leaves.keys() == param_leaves.keys()
    n_muon = 0
    for path, leaf in param_leaves.items():
        expected = _expected_route(path, leaf)
        assert spec_leaves[path] == expected, (path, spec_leaves[path], expected)
        n_muon += expected is not None
    # some of each, and the AdamW ones include every kind
    assert n_muon >= 7
    for must in (
        ".embed",
        ".lm_head",
        ".final_norm.weight",
        ".blocks.attn_norm.weight",
        ".blocks.mlp_norm.weight",
    ):
        assert spec_leaves[must] is None
    if which == "mla":
        for must in (".blocks.attn.q_norm.weight", ".blocks.attn.kv_norm.weight"):
            assert spec_leaves[must] is None
        assert spec_leaves[".blocks.attn.wq"] == MuonDimensionNumbers(3, (1, 2))


def test_matrix_dimension_numbers_generic_model():
    params = {"w": jnp.ones((3, 4)), "heads": jnp.ones((2, 3, 4)), "b": jnp.ones(4)}
    spec = matrix_dimension_numbers(params)
    assert spec["w"] == MuonDimensionNumbers(1, (0,))
    assert spec["heads"] == MuonDimensionNumbers(2, (0, 1))
    assert spec["b"] is None
    # a stacked axis is a batch axis, never part of the matrix
    stacked = matrix_dimension_numbers(params, stacked_axes=1)
    assert stacked["heads"] == MuonDimensionNumbers(2, (1,))
    assert stacked["w"] is None and stacked["b"] is None


def test_a_model_without_routing_is_refused_by_name():
    """No silent default for a model muon_adamw knows nothing about: a stacked
    layer axis would be orthogonalised as part of the matrix."""
    params = {"w": jnp.ones((2, 3, 4))}
    with pytest.raises(TypeError, match="cannot tell which leaves of a dict"):
        muon_adamw(LR).init(params)
    with pytest.raises(ValueError, match="stacked_axes"):
        matrix_dimension_numbers(params, stacked_axes=-1)


def _array_paths(tree) -> set[str]:
    """Paths of the array leaves of an optimizer-state subtree (MaskedNodes are empty)."""
    return {jtu.keystr(p) for p, x in jtu.tree_flatten_with_path(tree)[0] if eqx.is_array(x)}


def test_optimizer_state_follows_routing(mla_params):
    state = muon_adamw(LR).init(mla_params)
    spec = param_spec(mla_params)
    flat = jtu.tree_flatten_with_path(spec, is_leaf=_is_spec)[0]
    params = {jtu.keystr(p) for p, _ in jtu.tree_flatten_with_path(mla_params)[0]}
    muon_paths = {jtu.keystr(p) for p, s in flat if s is not None}
    # a None where the params hold no leaf (moe_blocks=None) is no entry
    adamw_paths = {jtu.keystr(p) for p, s in flat if s is None and jtu.keystr(p) in params}
    assert muon_paths and adamw_paths and not (muon_paths & adamw_paths)

    muon_state = state.inner_states["muon"].inner_state[0]
    adam_state = state.inner_states["adamw"].inner_state[0]
    assert isinstance(muon_state, optax.contrib.MuonState)
    assert isinstance(adam_state, optax.ScaleByAdamState)
    # Muon's momentum exists exactly for the Muon leaves, with their full shapes
    assert _array_paths(muon_state.mu) == muon_paths
    # Adam's moments exactly for the AdamW leaves
    assert _array_paths(adam_state.mu) == adamw_paths
    assert _array_paths(adam_state.nu) == adamw_paths
    shapes = {jtu.keystr(p): x.shape for p, x in jtu.tree_flatten_with_path(mla_params)[0]}
    for p, x in jtu.tree_flatten_with_path(muon_state.mu)[0]:
        assert x.shape == shapes[jtu.keystr(p)]


# --------------------------------------------------------------------------
# the Muon update
# --------------------------------------------------------------------------


def test_stacked_layers_orthogonalised_separately_heads_jointly(transformer_update):
    grads, updates, _ = transformer_update
    for name, get in [
        ("wq", lambda t: t.blocks.attn.wq),
        ("wo", lambda t: t.blocks.attn.wo),
        ("w_gate", lambda t: t.blocks.mlp.w_gate),
    ]:
        g, u = np.asarray(get(grads)), np.asarray(get(updates))
        n_layers = g.shape[0]
        for layer in range(n_layers):
            g2 = g[layer].reshape(-1, g.shape[-1])  # (heads*head_dim, in) for wq
            expected = -LR * _ns_scaled(g2)
            # measured max |diff| 7.9e-9, 23% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
            np.testing.assert_allclose(
                u[layer].reshape(g2.shape), expected, rtol=3e-5, atol=1.5e-8, err_msg=name
            )
        # had the layers been orthogonalised jointly, the update would differ
        joint = -LR * _ns_scaled(g.reshape(-1, g.shape[-1])).reshape(g.shape)
        assert not np.allclose(u, joint, rtol=1e-2)
    # per head separately would differ for wq as well
    g, u = np.asarray(grads.blocks.attn.wq[0]), np.asarray(updates.blocks.attn.wq[0])
    per_head = np.stack([-LR * _ns_scaled(g[h]) for h in range(g.shape[0])])
    assert not np.allclose(u, per_head, rtol=1e-2)


@pytest.mark.parametrize("shape", [(64, 32), (4, 8, 32)], ids=["2d", "per_head_3d"])
def test_muon_update_scale_and_rms(shape):
    """One step from a fresh state with wd = 0: update = -lr * 0.2 * sqrt(max(n, m)) * NS5(G).

    Moonlight's 0.2 * sqrt(max(n, m)) makes the update RMS exactly 0.2 * lr for an
    exactly orthogonal O (all singular values 1). NS5 with K2's coefficients
    does not converge to 1: its singular values oscillate in about [0.68, 1.13],
    so the measured RMS on a Gaussian gradient is about 0.86 * 0.2 * lr.
    """
    params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)}
    grads = {"w": jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)}
    opt = muon_adamw(LR, weight_decay=0.0, weight_dimension_numbers=matrix_dimension_numbers)
    u = np.asarray(opt.update(grads, opt.init(params), params)[0]["w"])
    g2 = np.asarray(grads["w"]).reshape(-1, shape[-1])
    fan = max(g2.shape)
    np.testing.assert_allclose(u.reshape(g2.shape), -LR * _ns_scaled(g2), rtol=1e-4, atol=1e-8)

    # the scale K2 intends: with the exact polar factor U V^T the RMS is 0.2 * lr
    uu, _, vt = np.linalg.svd(g2, full_matrices=False)
    exact = -LR * 0.2 * math.sqrt(fan) * (uu @ vt)
    # measured rel 4.7e-8 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(np.sqrt(np.mean(exact**2)), 0.2 * LR, rtol=2e-7)
    # and with NS5 it is the same to within NS5's own band: singular values of
    # the pre-scaling update in [0.68, 1.14] gives RMS in that band times 0.2*lr
    ratio = np.sqrt(np.mean(u**2)) / (0.2 * LR)
    sv = np.linalg.svd(u.reshape(g2.shape) / (-LR * 0.2 * math.sqrt(fan)), compute_uv=False)
    # measured rel 6.6e-8 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(ratio, np.sqrt(np.mean(sv**2)), rtol=3e-7)
    assert 0.80 <= ratio <= 0.95, ratio


def test_newton_schulz_output_is_near_orthogonal():
    """Singular values of the pre-scaling update lie in NS5's band (about 0.68-1.13)
    for well-conditioned gradients, whatever the gradient's own spread."""
    rng = np.random.default_rng(3)
    for shape in [(64, 32), (32, 96), (4, 8, 64)]:
        # a gradient whose singular values span 3 orders of magnitude
        g = rng.standard_normal(shape).reshape(-1, shape[-1])
        uu, s, vt = np.linalg.svd(g, full_matrices=False)
        g = (uu * np.geomspace(1.0, 1e-3, len(s))) @ vt
        params = {"w": jnp.zeros(shape)}
        grads = {"w": jnp.asarray(g.reshape(shape), jnp.float32)}
        opt = muon_adamw(LR, weight_decay=0.0, weight_dimension_numbers=matrix_dimension_numbers)
        u = np.asarray(opt.update(grads, opt.init(params), params)[0]["w"]).reshape(g.shape)
        o = u / (-LR * 0.2 * math.sqrt(max(g.shape)))
        sv = np.linalg.svd(o, compute_uv=False)
        # the largest 90%: tiny singular values (1e-3 of the top) are amplified
        # but need not reach the band in 5 steps
        top = sv[: int(0.9 * len(sv))]
        assert top.min() > 0.6 and sv.max() < 1.3, (shape, sv.min(), sv.max())
        assert sv.max() / sv.min() < 1e3 / 10  # far better conditioned than g


def test_decoupled_weight_decay_is_lr_wd_w():
    rng = np.random.default_rng(4)
    params = {
        "w": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32),
        "gain": jnp.asarray(1 + rng.standard_normal(8), jnp.float32),
    }
    dims = matrix_dimension_numbers
    assert dims(params)["gain"] is None and dims(params)["w"] is not None
    grads = _random_like(params, 5)
    wd = 0.1
    on = muon_adamw(LR, weight_decay=wd, weight_dimension_numbers=dims)
    off = muon_adamw(LR, weight_decay=0.0, weight_dimension_numbers=dims)
    u_on = on.update(grads, on.init(params), params)[0]
    u_off = off.update(grads, off.init(params), params)[0]
    for k in params:
        # measured max |diff| 9.3e-10, 24% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_allclose(
            np.asarray(u_on[k]) - np.asarray(u_off[k]),
            -LR * wd * np.asarray(params[k]),
            rtol=1.5e-5,
            atol=1.5e-10,
            err_msg=k,
        )
    with pytest.raises(ValueError, match="weight_decay"):
        muon_adamw(LR, weight_decay=-0.1)


def test_adamw_leaves_get_exact_optax_adamw_updates(mla_params):
    """The AdamW leaves' updates are optax.adamw's, bit for bit, over three
    steps: both jitted (compiled, the same arithmetic gives the same bits at
    XLA's backend optimisation level 0, which the suite uses, and at 3;
    measured). Jitted against eager they differ in the last bit of a
    near-cancelling (adam + wd * W) element."""
    wd = 0.1
    opt = muon_adamw(LR, weight_decay=wd)
    ref = optax.adamw(LR, b1=0.9, b2=0.95, eps=1e-8, weight_decay=wd)
    leaves = {
        "embed": lambda t: t.embed,
        "lm_head": lambda t: t.lm_head,
        "attn_norm": lambda t: t.blocks.attn_norm.weight,
        "final_norm": lambda t: t.final_norm.weight,
    }
    state = opt.init(mla_params)
    params = mla_params
    ref_params = {k: get(mla_params) for k, get in leaves.items()}
    ref_state = ref.init(ref_params)
    update, ref_update = jax.jit(opt.update), jax.jit(ref.update)
    for step in range(3):
        grads = _random_like(mla_params, 10 + step)
        updates, state = update(grads, state, params)
        ref_updates, ref_state = ref_update(
            {k: get(grads) for k, get in leaves.items()}, ref_state, ref_params
        )
        for k, get in leaves.items():
            np.testing.assert_array_equal(get(updates), ref_updates[k], err_msg=f"{k} step {step}")
        params = optax.apply_updates(params, updates)
        ref_params = optax.apply_updates(ref_params, ref_updates)
    # after three steps the AdamW leaves are a standalone AdamW run's
    for k, get in leaves.items():
        np.testing.assert_array_equal(get(params), ref_params[k], err_msg=k)
        assert not np.array_equal(get(params), get(mla_params))


# --------------------------------------------------------------------------
# several steps against the NumPy reference
# --------------------------------------------------------------------------


def _lr(t):
    """A learning rate that changes every step, so an off-by-one in the
    schedule's step count shows."""
    return LR * (1.0 + t) / 2


@pytest.fixture(scope="module")
def several_steps(mla_params):
    """Four muonclip updates (wd 0.1) of the MLA Transformer's params, with a
    fresh random gradient each step; the params move by their own updates."""
    opt = muon_adamw(_lr, weight_decay=0.1)
    update = jax.jit(opt.update)
    state, params = opt.init(mla_params), mla_params
    grads, updates = [], []
    for step in range(4):
        g = _random_like(mla_params, 20 + step)
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
        grads.append(leaves_by_path(g))
        updates.append(leaves_by_path(u))
    return leaves_by_path(mla_params), grads, updates, leaves_by_path(params)


def _reference_run(params0, grads, **kw):
    ref = NumpyMuonClip(params0, _lr, weight_decay=0.1, **kw)
    params = {k: v.astype(np.float64) for k, v in params0.items()}
    updates = []
    for g in grads:
        u = ref.update(g, params)
        params = {k: params[k] + u[k] for k in params}
        updates.append(u)
    return updates, params


def test_muonclip_matches_numpy_over_several_steps(several_steps):
    """Every leaf's update at every step equals the float64 NumPy MuonClip
    (EMA momentum with bias correction, Nesterov, NS5, 0.2 sqrt(max(n, m)),
    decoupled decay; AdamW 0.9/0.95 with bias correction for the rest)."""
    params0, grads, updates, final = several_steps
    ref_updates, ref_final = _reference_run(params0, grads)
    for step, (u, r) in enumerate(zip(updates, ref_updates)):
        for k in r:
            scale = np.max(np.abs(r[k]))
            # measured max |diff| 1.8e-8, 20% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
            np.testing.assert_allclose(
                u[k], r[k], rtol=2e-5, atol=4e-6 * scale, err_msg=f"{k} step {step}"
            )
    for k in ref_final:
        # measured max |diff| 2.8e-7, 21% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_allclose(final[k], ref_final[k], rtol=6e-6, atol=6e-8, err_msg=k)


@pytest.mark.parametrize("variant", ["no_momentum", "no_nesterov_sum", "no_bias_correction"])
def test_several_steps_tell_momentum_variants_apart(several_steps, variant):
    """Guards the test above: from the second step on, Muon without momentum,
    with K2's plain heavy-ball sum, or without bias correction gives a visibly
    different update, so the multi-step check pins the momentum down (one step
    from a fresh state cannot: its direction is G's whatever the momentum)."""
    params0, grads, updates, _ = several_steps
    ref = NumpyMuonClip(params0, _lr, weight_decay=0.1)
    if variant == "no_momentum":
        ref.mu = 0.0
    elif variant == "no_nesterov_sum":

        def heavy_ball(k, g, w, ref=ref):  # M_t = mu M_{t-1} + G_t, O = NS5(M_t)
            ref.m[k] = ref.mu * ref.m[k] + g
            o = np.stack(
                [
                    reference.np_newton_schulz(m.reshape(-1, g.shape[-1])).reshape(g.shape[1:])
                    * ref.rms
                    * math.sqrt(max(np.prod(g.shape[1:-1]), g.shape[-1]))
                    for m in ref.m[k]
                ]
            )
            return o + ref.wd * w

        ref._muon = heavy_ball
    else:

        def unbiased(k, g, w, ref=ref, muon=ref._muon):
            t = ref.t
            ref.t = 10_000  # bias corrections -> 1
            try:
                return muon(k, g, w)
            finally:
                ref.t = t

        ref._muon = unbiased
    params = {k: v.astype(np.float64) for k, v in params0.items()}
    wq = ".blocks.attn.wq"
    diffs = []
    for step, g in enumerate(grads):
        r = ref.update(g, params)
        params = {k: params[k] + r[k] for k in params}
        diffs.append(np.max(np.abs(updates[step][wq] - r[wq])) / np.max(np.abs(r[wq])))
    assert diffs[0] < 1e-3  # the first step agrees, whatever the momentum
    assert max(diffs[1:]) > 0.05, diffs


# --------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------


def test_warmup_cosine_values():
    peak, end = 1e-3, 1e-4
    sched = warmup_cosine(peak, warmup_steps=10, total_steps=110, final_fraction=0.1)

    def cosine(t):
        return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (t - 10) / 100))

    expected = {
        0: 0.0,
        1: peak / 10,
        5: peak / 2,
        10: peak,
        35: cosine(35),
        60: cosine(60),
        100: cosine(100),
        110: end,
        500: end,
    }
    assert cosine(60) == pytest.approx((peak + end) / 2, rel=1e-15)  # measured exact (float64)
    for t, v in expected.items():
        # measured max |diff| 6.1e-11, 24% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
        assert float(sched(t)) == pytest.approx(v, rel=1.2e-6, abs=1.2e-13), t
    no_warmup = warmup_cosine(peak, warmup_steps=0, total_steps=100, final_fraction=0.0)
    # measured rel 4.8e-8 (jax 0.10.2 and 0.12.0.1, CPU)
    assert float(no_warmup(0)) == pytest.approx(peak, rel=2e-7)
    # measured rel 6.9e-8 (jax 0.10.2 and 0.12.0.1, CPU)
    assert float(no_warmup(50)) == pytest.approx(peak / 2, rel=3e-7)
    assert float(no_warmup(100)) == 0.0  # lr * final_fraction 0, exactly


def test_wsd_values():
    peak = 2e-4
    sched = wsd(peak, warmup_steps=10, total_steps=100, decay_fraction=0.2)
    expected = {
        0: 0.0,
        5: peak / 2,
        10: peak,
        50: peak,
        79: peak,
        80: peak,
        85: 0.75 * peak,
        90: peak / 2,
        100: 0.0,
        200: 0.0,
    }
    for t, v in expected.items():
        # measured max |diff| 7.4e-12, 25% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
        assert float(sched(t)) == pytest.approx(v, rel=2e-7, abs=2e-14), t
    with_floor = wsd(peak, warmup_steps=0, total_steps=50, decay_fraction=0.4, final_fraction=0.1)
    # decay over the last 20 steps: 30 -> 50, from peak to 0.1 * peak
    values = {0: peak, 29: peak, 30: peak, 40: 0.55 * peak, 50: 0.1 * peak, 80: 0.1 * peak}
    for t, v in values.items():
        # measured rel 4.7e-8 (jax 0.10.2 and 0.12.0.1, CPU)
        assert float(with_floor(t)) == pytest.approx(v, rel=2e-7), t
