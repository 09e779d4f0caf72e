"""QK-Clip (`qkclip_eqx.qk_clip`, `clip_factors`): the identity that defines it.

For a batch with per-head max logits S and a threshold tau, clipping and then
re-running THE SAME inputs must give ``min(S, tau)`` per head (Kimi K2 report,
sec. 2.1), while every weight the clip must not touch stays bit-identical.
In a multi-layer Transformer, clipping layer l changes the inputs of layers
> l, so the identity is checked per layer on that layer's own (pre-clip)
inputs, and for the whole model where it is exact (the first layer).
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from jaxtyping import Array, Float

from builders import attention_s as _attn_s_on_inputs
from builders import init_from_numpy as _init
from builders import layer_inputs as _layerwise_s
from qkclip_eqx import (
    AbstractHeadwiseQKClippable,
    AbstractQKClippable,
    GQAConfig,
    GQAttention,
    MLAConfig,
    MLAttention,
    Transformer,
    TransformerConfig,
    clip_factors,
    qk_clip,
)
from qkclip_eqx._clip import clipped_heads
from reference import assert_leaves_close, heads_scaled, leaves_by_path, np_qk_clip

# S re-run after a clip against min(S, tau) and the like: float32 rounding of
# the re-scaled logits, measured rel 4.1e-7 at most (jax 0.10.2 and 0.12.0.1, CPU)
RTOL = 2e-6
DIM = 16


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _mla_config(q_lora: int | None, n_heads: int = 4) -> MLAConfig:
    return MLAConfig(
        dim=DIM,
        n_heads=n_heads,
        kv_lora_rank=8,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        q_lora_rank=q_lora,
    )


@eqx.filter_jit
def _module_s(module, x):
    """S per head of one attention module over a batch: vmap, then max over the batch."""
    return jnp.max(jax.vmap(module)(x)[1], axis=0)


@eqx.filter_jit
def _model_s(model, tokens):
    return jnp.max(jax.vmap(model)(tokens)[1], axis=0)


def _paths(tree) -> dict[str, np.ndarray]:
    leaves = jtu.tree_flatten_with_path(eqx.filter(tree, eqx.is_array))[0]
    return {jtu.keystr(p): np.asarray(x) for p, x in leaves}


def _assert_untouched(before, after, touched: dict[str, np.ndarray]):
    """Every array leaf bit-identical, except the elements set in ``touched[path]``
    (boolean masks of the leaf's shape); returns nothing, raises on a difference."""
    b, a = _paths(before), _paths(after)
    assert b.keys() == a.keys()
    for path in touched:
        assert path in b, f"{path} is not a leaf; leaves: {sorted(b)}"
    for path, x in b.items():
        y = a[path]
        assert x.shape == y.shape and x.dtype == y.dtype, path
        mask = touched.get(path)
        if mask is None:
            assert np.array_equal(x, y), f"{path} changed but must be bit-identical"
        else:
            assert np.array_equal(x[~mask], y[~mask]), f"untouched part of {path} changed"


def _head_rows_mask(shape, heads, rows: slice = slice(None), head_axis: int = 0):
    """Boolean mask of ``w[..., h, rows, :]`` for h in heads (head axis given)."""
    mask = np.zeros(shape, bool)
    idx = [slice(None)] * len(shape)
    idx[head_axis + 1] = rows
    for h in heads:
        idx[head_axis] = h
        mask[tuple(idx)] = True
    return mask


def _tau_between(s: np.ndarray) -> float:
    """A tau strictly between the smallest and largest S, not equal to any S."""
    vals = np.sort(np.unique(np.asarray(s, np.float64).ravel()))
    mid = len(vals) // 2
    return float((vals[mid - 1] + vals[mid]) / 2)


def _check_identity(s_before, s_after, tau):
    s_before, s_after = np.asarray(s_before), np.asarray(s_after)
    assert np.any(s_before > tau) and np.any(s_before < tau), "tau must split the heads"
    np.testing.assert_allclose(s_after, np.minimum(s_before, tau), rtol=RTOL)
    # the heads below tau are not just close: they are exactly as before
    below = s_before <= tau
    assert np.array_equal(s_after[below], s_before[below])


# --------------------------------------------------------------------------
# fixtures: tiny modules and a batch that gives them a spread of S
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def x():
    return jnp.asarray(2.0 * np.random.default_rng(1).standard_normal((3, 10, DIM)), jnp.float32)


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(2).integers(0, 64, (3, 12)), jnp.int32)


@pytest.fixture(scope="module", params=[None, 12], ids=["no_q_lora", "q_lora"])
def mla(request):
    return _init(lambda k: MLAttention(_mla_config(request.param), key=k), 3)


@pytest.fixture(scope="module")
def mla_transformer():
    cfg = TransformerConfig(vocab_size=64, n_layers=3, mlp_hidden=32, attention=_mla_config(12))
    return _init(lambda k: Transformer(cfg, key=k), 4)


@pytest.fixture(scope="module")
def gqa_transformer():
    att = GQAConfig(dim=DIM, n_heads=4, head_dim=8, n_kv_heads=2)
    cfg = TransformerConfig(vocab_size=64, n_layers=3, mlp_hidden=32, attention=att)
    return _init(lambda k: Transformer(cfg, key=k), 5)


# --------------------------------------------------------------------------
# clip_factors
# --------------------------------------------------------------------------


def test_clip_factors_values():
    s = jnp.array([200.0, 100.0, 50.0, 0.0, -0.0, -300.0, jnp.nan, jnp.inf, -jnp.inf, 100.0001])
    g = np.asarray(clip_factors(s, 100.0))
    expected = np.array([0.5, 1, 1, 1, 1, 1, 1, 1, 1, 100.0 / np.float32(100.0001)], np.float32)
    # bit-equal (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_array_equal(g, expected)
    # the unclipped ones are exactly 1 (so scaling by them is a bit-exact no-op)
    assert np.all(g[1:9] == 1.0)
    assert g[-1] < 1.0
    assert np.all(np.isfinite(g)) and np.all(g > 0) and np.all(g <= 1)
    # per layer and head: shape kept
    s2 = jnp.array([[300.0, 1.0], [1.0, 400.0]])
    np.testing.assert_allclose(clip_factors(s2, 100.0), [[1 / 3, 1], [1, 0.25]], rtol=1e-7)


# --------------------------------------------------------------------------
# the identity, module by module
# --------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_mla_identity_and_untouched_weights(mla, x, alpha):
    s = np.asarray(_module_s(mla, x))
    tau = _tau_between(s)
    clipped = qk_clip(mla, jnp.asarray(s), tau, alpha=alpha)
    _check_identity(s, _module_s(clipped, x), tau)

    over = np.flatnonzero(s > tau)
    nope = mla.config.qk_nope_head_dim
    touched = {
        ".wq": _head_rows_mask(mla.wq.shape, over),  # q_C and q_R of clipped heads
        ".wkv_b": _head_rows_mask(mla.wkv_b.shape, over, slice(0, nope)),  # k_C only
    }
    # wq_a, q_norm, wkv_a (latent AND the shared k_R rows), kv_norm, v rows of
    # wkv_b, wo, and the unclipped heads' rows: all bit-identical
    _assert_untouched(mla, clipped, touched)

    gamma = tau / s.astype(np.float64)
    for h in over:
        g = gamma[h]
        # measured rel 1.2e-7 (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_allclose(clipped.wq[h, :nope], mla.wq[h, :nope] * g**alpha, rtol=5e-7)
        # measured rel 1.2e-7 (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_allclose(clipped.wq[h, nope:], mla.wq[h, nope:] * g, rtol=5e-7)
        # measured rel 1.3e-7 (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_allclose(
            clipped.wkv_b[h, :nope], mla.wkv_b[h, :nope] * g ** (1 - alpha), rtol=6e-7
        )


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_mha_identity_and_untouched_weights(x, alpha):
    attn = _init(lambda k: GQAttention(GQAConfig(dim=DIM, n_heads=4, head_dim=8), key=k), 6)
    assert attn.config.n_kv_heads == attn.config.n_heads
    s = np.asarray(_module_s(attn, x))
    tau = _tau_between(s)
    clipped = qk_clip(attn, jnp.asarray(s), tau, alpha=alpha)
    _check_identity(s, _module_s(clipped, x), tau)
    over = np.flatnonzero(s > tau)
    _assert_untouched(
        attn,
        clipped,
        {
            ".wq": _head_rows_mask(attn.wq.shape, over),
            ".wk": _head_rows_mask(attn.wk.shape, over),
        },
    )
    for h in over:
        g = tau / float(s[h])
        # measured rel 1.3e-7 (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_allclose(clipped.wq[h], attn.wq[h] * g**alpha, rtol=6e-7)
        # measured rel 1.2e-7 (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_allclose(clipped.wk[h], attn.wk[h] * g ** (1 - alpha), rtol=5e-7)


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_gqa_query_mode_identity_shared_key_untouched(x, alpha):
    """Query mode scales each query head by its own gamma whatever alpha is:
    the shared key is not this head's to scale."""
    cfg = GQAConfig(dim=DIM, n_heads=6, head_dim=8, n_kv_heads=2, clip_mode="query")
    attn = _init(lambda k: GQAttention(cfg, key=k), 7)
    s = np.asarray(_module_s(attn, x))
    # tau between the two largest S of the hottest group: that group has heads
    # over tau and a group-mate under it
    hot = np.sort(s.reshape(2, 3)[np.argmax(s) // 3])
    tau = float((hot[0] + hot[1]) / 2)
    groups = (s > tau).reshape(2, 3)
    assert np.any(groups.any(axis=1) & ~groups.all(axis=1))
    clipped = qk_clip(attn, jnp.asarray(s), tau, alpha=alpha)
    _check_identity(s, _module_s(clipped, x), tau)
    over = np.flatnonzero(s > tau)
    _assert_untouched(attn, clipped, {".wq": _head_rows_mask(attn.wq.shape, over)})
    for h in over:
        # bit-equal (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_array_equal(clipped.wq[h], attn.wq[h] * (tau / float(s[h])))


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_gqa_group_mode_scales_whole_group_by_its_max(x, alpha):
    cfg = GQAConfig(dim=DIM, n_heads=4, head_dim=8, n_kv_heads=2, clip_mode="group")
    attn = _init(lambda k: GQAttention(cfg, key=k), 8)
    s = np.asarray(_module_s(attn, x))
    group_max = s.reshape(2, 2).max(axis=1)
    hot = int(np.argmax(group_max))
    # tau: between the two groups' maxima, so one group is clipped, the other not,
    # and the hot group's other head is below tau (it must be scaled all the same)
    tau = float((group_max[0] + group_max[1]) / 2)
    mate = 2 * hot + int(np.argmin(s.reshape(2, 2)[hot]))
    assert s[mate] < tau
    clipped = qk_clip(attn, jnp.asarray(s), tau, alpha=alpha)
    s_new = np.asarray(_module_s(clipped, x))

    eta = np.ones(2)
    eta[hot] = tau / float(group_max[hot])
    np.testing.assert_allclose(s_new, s * np.repeat(eta, 2), rtol=RTOL)
    # the group-mate is NOT min(S, tau): it went below its own S
    assert s_new[mate] < s[mate] * (1 - 1e-3)
    cold_heads = [2 * (1 - hot), 2 * (1 - hot) + 1]
    hot_heads = [2 * hot, 2 * hot + 1]
    _assert_untouched(
        attn,
        clipped,
        {
            ".wq": _head_rows_mask(attn.wq.shape, hot_heads),
            ".wk": _head_rows_mask(attn.wk.shape, [hot]),
        },
    )
    # measured rel 1.3e-7 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(clipped.wk[hot], attn.wk[hot] * eta[hot] ** (1 - alpha), rtol=6e-7)
    for h in hot_heads:
        # measured rel 1.2e-7 (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_allclose(clipped.wq[h], attn.wq[h] * eta[hot] ** alpha, rtol=5e-7)
    assert all(np.array_equal(clipped.wq[h], attn.wq[h]) for h in cold_heads)


# --------------------------------------------------------------------------
# the scanned Transformer
# --------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["mla", "gqa"])
def test_transformer_identity_per_layer(which, mla_transformer, gqa_transformer, tokens):
    model = mla_transformer if which == "mla" else gqa_transformer
    s = np.asarray(_model_s(model, tokens))
    assert s.shape == (model.config.n_layers, model.config.n_heads)
    tau = _tau_between(s)
    clipped = qk_clip(model, jnp.asarray(s), tau)

    # whole model re-run: layer 0 sees the same inputs, so its identity is exact
    s_rerun = np.asarray(_model_s(clipped, tokens))
    np.testing.assert_allclose(s_rerun[0], np.minimum(s[0], tau), rtol=RTOL)

    # every layer, fed the inputs it saw before the clip
    xs = _layerwise_s(model, tokens)
    # bit-equal (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_array_equal(_attn_s_on_inputs(model, xs), s)  # sanity
    _check_identity(s, _attn_s_on_inputs(clipped, xs), tau)

    over = np.argwhere(s > tau)
    attn = model.blocks.attn
    touched = {}
    if which == "mla":
        nope = attn.config.qk_nope_head_dim
        wq_mask = np.zeros(attn.wq.shape, bool)
        kvb_mask = np.zeros(attn.wkv_b.shape, bool)
        for l, h in over:
            wq_mask[l, h] = True
            kvb_mask[l, h, :nope] = True
        touched = {".blocks.attn.wq": wq_mask, ".blocks.attn.wkv_b": kvb_mask}
    else:  # query mode (default): only the query heads over tau
        wq_mask = np.zeros(attn.wq.shape, bool)
        for l, h in over:
            wq_mask[l, h] = True
        touched = {".blocks.attn.wq": wq_mask}
    # embeddings, lm_head, norms, MLPs, wkv_a, v rows, wo, keys: bit-identical
    _assert_untouched(model, clipped, touched)


def test_scanned_layers_get_their_own_gamma(mla_transformer):
    """Regression: a public implementation gave every stacked layer the same gamma."""
    model = mla_transformer
    attn = model.blocks.attn
    nope = attn.config.qk_nope_head_dim
    tau = 100.0
    s = np.array(
        [
            [400.0, 150.0, 90.0, 100.0],  # layer 0: heads 0, 1 clipped (different gammas)
            [50.0, 50.0, 50.0, 50.0],  # layer 1: nothing over tau
            [101.0, 250.0, 800.0, 1000.0],
        ],  # layer 2: all clipped, all different
        np.float32,
    )
    clipped = qk_clip(model, jnp.asarray(s), tau)
    new = clipped.blocks.attn
    gamma = np.where(s > tau, tau / s.astype(np.float64), 1.0)
    for l in range(3):
        for h in range(4):
            g = gamma[l, h]
            # bit-equal (jax 0.10.2 and 0.12.0.1, CPU)
            np.testing.assert_array_equal(new.wq[l, h, :nope], attn.wq[l, h, :nope] * math.sqrt(g))
            # bit-equal (jax 0.10.2 and 0.12.0.1, CPU)
            np.testing.assert_array_equal(new.wq[l, h, nope:], attn.wq[l, h, nope:] * g)
            # bit-equal (jax 0.10.2 and 0.12.0.1, CPU)
            np.testing.assert_array_equal(
                new.wkv_b[l, h, :nope], attn.wkv_b[l, h, :nope] * math.sqrt(g)
            )
            if g == 1.0:
                assert np.array_equal(new.wq[l, h], attn.wq[l, h])
                assert np.array_equal(new.wkv_b[l, h], attn.wkv_b[l, h])
    # layer 1 entirely bit-identical
    assert np.array_equal(new.wq[1], attn.wq[1]) and np.array_equal(new.wkv_b[1], attn.wkv_b[1])
    # the observed per-(layer, head) factor on q_R rows IS gamma[l, h] (all distinct)
    ratio = np.asarray(new.wq[:, :, nope:, :] / attn.wq[:, :, nope:, :]).reshape(3, 4, -1)
    # measured rel 1.2e-7 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(ratio, np.broadcast_to(gamma[..., None], ratio.shape), rtol=5e-7)
    assert len(np.unique(np.round(ratio[2, :, 0], 6))) == 4


TRANSFORMER_ATTENTION = {
    "mla": _mla_config(12),
    "mha": GQAConfig(dim=DIM, n_heads=4, head_dim=8),
    "gqa_query": GQAConfig(dim=DIM, n_heads=4, head_dim=8, n_kv_heads=2, clip_mode="query"),
    "gqa_group": GQAConfig(dim=DIM, n_heads=4, head_dim=8, n_kv_heads=2, clip_mode="group"),
}


@pytest.mark.parametrize("alpha", [0.3, 0.8])
@pytest.mark.parametrize("kind", list(TRANSFORMER_ATTENTION))
def test_transformer_clip_matches_numpy_for_any_alpha(kind, alpha):
    """Every clip mode of a stacked Transformer, alpha != 1/2 (where swapping
    the q and k exponents shows), against the float64 NumPy rule of K2 sec. 2.1
    (reference.np_qk_clip): each layer its own gamma, every other leaf untouched."""
    cfg = TransformerConfig(
        vocab_size=32, n_layers=2, mlp_hidden=16, attention=TRANSFORMER_ATTENTION[kind]
    )
    model = _init(lambda k: Transformer(cfg, key=k), 20)
    tau = 10.0
    s = np.array(
        [
            [40.0, 9.0, 12.5, -3.0],  # layer 0: heads 0 and 2 over tau
            [5.0, 25.0, 10.0, 80.0],
        ],  # layer 1: heads 1 and 3 (tau itself is not over)
        np.float32,
    )
    clipped = qk_clip(model, jnp.asarray(s), tau, alpha=alpha)
    expected = np_qk_clip(model, s, tau, alpha)
    # measured rel 1.2e-7 (jax 0.10.2 and 0.12.0.1, CPU)
    assert_leaves_close(clipped, expected, rtol=6e-7, what=kind)
    # and the expectation is not the unclipped model (a clip that does nothing fails)
    before = leaves_by_path(model)
    assert any(not np.allclose(before[k], v, rtol=1e-3) for k, v in expected.items())
    # clipped_heads names exactly the (layer, head) pairs whose query weights
    # the clip changed: in "group" mode the group-mates of a head over tau too
    changed = np.any(expected[".blocks.attn.wq"] != before[".blocks.attn.wq"], axis=(-2, -1))
    (mask,) = clipped_heads(model, jnp.asarray(s), tau)
    np.testing.assert_array_equal(np.asarray(mask), changed)
    np.testing.assert_array_equal(changed, heads_scaled(model, s, tau))
    if kind == "gqa_group":
        assert changed.sum() > (s > tau).sum()
    else:
        np.testing.assert_array_equal(changed, s > tau)


# --------------------------------------------------------------------------
# no-ops: S at/below tau, S <= 0, non-finite S
# --------------------------------------------------------------------------


def test_all_heads_at_or_below_tau_is_bit_identical(mla, mla_transformer, x, tokens):
    s = np.asarray(_module_s(mla, x))
    tau = float(s.max())  # the max head is exactly AT tau: not clipped
    _assert_untouched(mla, qk_clip(mla, jnp.asarray(s), tau), {})
    _assert_untouched(mla, qk_clip(mla, jnp.asarray(s), tau * 10), {})
    s_model = _model_s(mla_transformer, tokens)
    _assert_untouched(mla_transformer, qk_clip(mla_transformer, s_model, float(s_model.max())), {})


def test_nonpositive_s_is_bit_identical(mla, mla_transformer):
    s = jnp.array([0.0, -0.0, -1e-30, -250.0])
    for tau in (1.0, 1e-6, 100.0):
        out = qk_clip(mla, s, tau)
        _assert_untouched(mla, out, {})
    s_model = jnp.array([[-5.0, 0.0, -1e6, -0.0]] * 3)
    _assert_untouched(mla_transformer, qk_clip(mla_transformer, s_model, 0.5), {})


def test_nonfinite_s_is_bit_identical_and_never_nan(mla):
    tau = 0.5
    s = jnp.array([jnp.nan, jnp.inf, -jnp.inf, 1.0])  # only head 3 is a real clip
    out = qk_clip(mla, s, tau)
    assert all(np.all(np.isfinite(v)) for v in _paths(out).values())
    _assert_untouched(
        mla,
        out,
        {
            ".wq": _head_rows_mask(mla.wq.shape, [3]),
            ".wkv_b": _head_rows_mask(mla.wkv_b.shape, [3], slice(0, mla.config.qk_nope_head_dim)),
        },
    )
    # bit-equal (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_array_equal(out.wq[3, 8:], mla.wq[3, 8:] * 0.5)
    all_bad = jnp.array([jnp.nan, jnp.inf, jnp.nan, -jnp.inf])
    _assert_untouched(mla, qk_clip(mla, all_bad, tau), {})


# --------------------------------------------------------------------------
# user models and user attention
# --------------------------------------------------------------------------


class _UserModel(eqx.Module):
    attn: dict
    extra: list
    head: jax.Array


def test_user_model_with_several_attentions(x):
    mla_a = _init(lambda k: MLAttention(_mla_config(None, n_heads=4), key=k), 10)
    mla_b = _init(lambda k: MLAttention(_mla_config(12, n_heads=2), key=k), 11)
    gqa_cfg = GQAConfig(dim=DIM, n_heads=6, head_dim=8, n_kv_heads=3)
    gqa = _init(lambda k: GQAttention(gqa_cfg, key=k), 12)
    # dict keys flatten sorted: "a_gqa" before "z_mla"; then the list
    model = _UserModel(attn={"z_mla": mla_a, "a_gqa": gqa}, extra=[mla_b], head=jnp.ones((DIM, 3)))
    order = [gqa, mla_a, mla_b]
    s = [np.asarray(_module_s(m, x)) for m in order]
    tau = _tau_between(np.concatenate(s))
    assert all(np.any(si > tau) for si in s[:2])
    clipped = qk_clip(model, [jnp.asarray(si) for si in s], tau)
    new = [clipped.attn["a_gqa"], clipped.attn["z_mla"], clipped.extra[0]]
    for m_old, m_new, si in zip(order, new, s):
        np.testing.assert_allclose(_module_s(m_new, x), np.minimum(si, tau), rtol=RTOL)
        if not np.any(si > tau):
            _assert_untouched(m_old, m_new, {})
    assert np.array_equal(clipped.head, model.head)
    # a tuple works as well as a list
    clipped_t = qk_clip(model, tuple(jnp.asarray(si) for si in s), tau)
    by_tuple, by_list = _paths(clipped_t), _paths(clipped)
    assert all(np.array_equal(by_tuple[k], by_list[k]) for k in by_list)
    # the wrong order is caught (head counts 6, 4, 2 differ)
    with pytest.raises(ValueError, match="heads"):
        qk_clip(model, [jnp.asarray(s[1]), jnp.asarray(s[0]), jnp.asarray(s[2])], tau)


class _TinyAttention(AbstractHeadwiseQKClippable):
    """Plain MHA without RoPE, written against the public protocol only."""

    wq: Float[Array, "heads d dim"]
    wk: Float[Array, "heads d dim"]

    def __init__(self, heads, d, dim, seed):
        rng = np.random.default_rng(seed)
        self.wq = jnp.asarray(rng.standard_normal((heads, d, dim)) / math.sqrt(dim), jnp.float32)
        self.wk = jnp.asarray(rng.standard_normal((heads, d, dim)) / math.sqrt(dim), jnp.float32)

    @property
    def n_heads(self) -> int:
        return self.wq.shape[0]

    def __call__(self, x):
        q = jnp.einsum("td,hed->hte", x, self.wq)
        k = jnp.einsum("td,hed->hte", x, self.wk)
        logits = jnp.einsum("hte,hse->hts", q, k) / math.sqrt(self.wq.shape[1])
        return x, jnp.max(logits, axis=(1, 2))

    def scale_heads(self, gamma, alpha):
        wq = self.wq * (gamma**alpha)[:, None, None]
        wk = self.wk * (gamma ** (1 - alpha))[:, None, None]
        return eqx.tree_at(lambda m: (m.wq, m.wk), self, (wq, wk))

    def head_axes(self):
        return (lambda m: (m.wq, m.wk)), (-3, -3)


def test_custom_clippable_attention_is_found_and_clipped(x):
    """A module written against the protocol alone; ``heads_scaled`` of
    AbstractHeadwiseQKClippable is the heads with gamma < 1."""
    tiny = _TinyAttention(5, 4, DIM, 13)
    model = {"blocks": [tiny], "w": jnp.arange(3.0)}
    s = np.asarray(_module_s(tiny, x))
    tau = _tau_between(s)
    clipped = qk_clip(model, jnp.asarray(s), tau)
    assert isinstance(clipped["blocks"][0], _TinyAttention)
    np.testing.assert_allclose(_module_s(clipped["blocks"][0], x), np.minimum(s, tau), rtol=RTOL)
    assert np.array_equal(clipped["w"], model["w"])
    under = s <= tau
    assert np.array_equal(clipped["blocks"][0].wq[under], tiny.wq[under])
    (mask,) = clipped_heads(model, jnp.asarray(s), tau)
    np.testing.assert_array_equal(np.asarray(mask), s > tau)


# --------------------------------------------------------------------------
# jit, and bad inputs
# --------------------------------------------------------------------------


def test_qk_clip_under_jit_with_traced_tau(mla, x):
    s = _module_s(mla, x)
    tau_value = _tau_between(np.asarray(s))
    jitted = eqx.filter_jit(lambda m, s, tau: qk_clip(m, s, tau))
    out = jitted(mla, s, jnp.float32(tau_value))  # tau is an array: traced
    eager = qk_clip(mla, s, tau_value)
    for path, v in _paths(eager).items():
        # bit-equal (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_array_equal(_paths(out)[path], v)
    np.testing.assert_allclose(_module_s(out, x), np.minimum(np.asarray(s), tau_value), rtol=RTOL)
    # a second tau reuses the compiled function and clips harder
    out2 = jitted(mla, s, jnp.float32(tau_value / 2))
    np.testing.assert_allclose(
        _module_s(out2, x), np.minimum(np.asarray(s), tau_value / 2), rtol=RTOL
    )


def test_bad_inputs_raise(mla, mla_transformer):
    s = jnp.ones((4,))
    for tau in (0.0, -1.0, float("nan"), jnp.asarray(0.0), jnp.asarray(-1.0)):
        with pytest.raises(ValueError, match="tau"):
            qk_clip(mla, s, tau)
    with pytest.raises(ValueError, match="heads"):
        qk_clip(mla, jnp.ones((3,)), 1.0)
    with pytest.raises(ValueError, match="heads"):
        qk_clip(mla_transformer, jnp.ones((3, 5)), 1.0)
    # S without the layer axis for scanned layers would scale the wrong rows
    # (v rows of wkv_b, q_R by sqrt(gamma)) if accepted; S with the wrong layer count
    with pytest.raises(ValueError, match="layer"):
        qk_clip(mla_transformer, jnp.full((4,), 400.0), 1.0)
    with pytest.raises(ValueError, match="layer"):
        qk_clip(mla_transformer, jnp.full((2, 4), 400.0), 1.0)
    with pytest.raises(ValueError, match="layer"):
        qk_clip(mla, jnp.full((3, 4), 400.0), 1.0)
    with pytest.raises(ValueError, match="arrays"):
        qk_clip(mla, [s, s], 1.0)
    with pytest.raises(ValueError, match="arrays"):
        qk_clip({"a": mla, "b": mla}, [s], 1.0)
    with pytest.raises(ValueError, match="alpha"):
        qk_clip(mla, s, 1.0, alpha=1.5)
    user_model = _UserModel(attn={}, extra=[], head=jnp.ones((2, 2)))
    for no_attention in (user_model, eqx.nn.Identity(), {"w": jnp.ones(3)}, []):
        with pytest.raises(ValueError, match="no AbstractQKClippable"):
            qk_clip(no_attention, s, 1.0)


# --------------------------------------------------------------------------
# GQA "query_key": exact per head, the shared key takes eta^(1-alpha)
# --------------------------------------------------------------------------


def _query_key_module(alpha_seed: int = 30):
    cfg = GQAConfig(dim=DIM, n_heads=6, head_dim=8, n_kv_heads=2, clip_mode="query_key")
    return _init(lambda k: GQAttention(cfg, key=k), alpha_seed)


def _hot_group_tau(s: np.ndarray, group: int) -> tuple[float, int]:
    """A tau that clips part of the hottest group and nothing of the others."""
    groups = s.reshape(-1, group)
    hot = int(np.argmax(groups.max(axis=1)))
    top = np.sort(groups[hot])[::-1]
    tau = float((top[0] + top[1]) / 2)
    cold_max = np.delete(groups, hot, axis=0).max()
    assert cold_max < tau, "the data must leave the other groups below tau"
    return tau, hot


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_gqa_query_key_mode_identity_and_key_factor(x, alpha):
    """S' = min(S, tau) for every head (re-running the same batch); the shared
    key of the clipped group is scaled by exactly eta^(1-alpha), each of its
    query heads by gamma_h / eta^(1-alpha); a group with no head over tau is
    bit-identical, weights and S."""
    attn = _query_key_module()
    s = np.asarray(_module_s(attn, x))
    tau, hot = _hot_group_tau(s, 3)
    clipped = qk_clip(attn, jnp.asarray(s), tau, alpha=alpha)
    s_new = np.asarray(_module_s(clipped, x))
    np.testing.assert_allclose(s_new, np.minimum(s, tau), rtol=RTOL)
    hot_heads = np.arange(3 * hot, 3 * hot + 3)
    cold_heads = np.setdiff1d(np.arange(6), hot_heads)
    # the other group: exactly as before (eta = 1 changes nothing, bit for bit)
    assert np.array_equal(s_new[cold_heads], s[cold_heads])
    _assert_untouched(
        attn,
        clipped,
        {
            ".wq": _head_rows_mask(attn.wq.shape, hot_heads),
            ".wk": _head_rows_mask(attn.wk.shape, [hot]),
        },
    )
    gamma = np.where(s > tau, tau / s.astype(np.float64), 1.0)
    eta = gamma[hot_heads].min()
    assert eta < 1 and np.any(gamma[hot_heads] == 1.0)  # a group-mate below tau
    # measured rel 1.5e-7 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(clipped.wk[hot], attn.wk[hot] * eta ** (1 - alpha), rtol=8e-7)
    for h in hot_heads:
        np.testing.assert_allclose(
            clipped.wq[h], attn.wq[h] * gamma[h] / eta ** (1 - alpha), rtol=1e-6
        )
    # against the float64 NumPy rule
    # measured rel 1.2e-7 (jax 0.10.2 and 0.12.0.1, CPU)
    assert_leaves_close(clipped, np_qk_clip(attn, s, tau, alpha, prefix=""), rtol=6e-7)
    # The key took part of the shrinkage (unlike "query" mode), the mate below
    # tau kept its logits (unlike "group" mode), and clipped_heads counts the
    # heads whose logits were scaled: those over tau, not the mate whose q rows
    # were rescaled by 1/eta^(1-alpha).
    assert not np.allclose(clipped.wk[hot], attn.wk[hot], rtol=1e-3)
    mate = hot_heads[gamma[hot_heads] == 1.0][0]
    assert not np.allclose(clipped.wq[mate], attn.wq[mate], rtol=1e-3)
    # measured rel 9.5e-8 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(s_new[mate], s[mate], rtol=4e-7)
    (mask,) = clipped_heads(attn, jnp.asarray(s), tau)
    np.testing.assert_array_equal(np.asarray(mask), s > tau)
    np.testing.assert_array_equal(np.asarray(mask), heads_scaled(attn, s, tau, prefix=""))


def test_gqa_query_key_mode_alpha_one_is_query_mode_bit_for_bit(x):
    """alpha = 1 gives the key eta^0 = 1: the rule is then "query" mode's."""
    attn = _query_key_module()
    s = np.asarray(_module_s(attn, x))
    tau, _ = _hot_group_tau(s, 3)
    query_cfg = GQAConfig(dim=DIM, n_heads=6, head_dim=8, n_kv_heads=2, clip_mode="query")
    template = eqx.filter_eval_shape(GQAttention, query_cfg, key=jax.random.key(0))
    as_query = jtu.tree_unflatten(jtu.tree_structure(template), jax.tree.leaves(attn))
    assert as_query.config.clip_mode == "query"
    a = qk_clip(attn, jnp.asarray(s), tau, alpha=1.0)
    b = qk_clip(as_query, jnp.asarray(s), tau, alpha=1.0)
    assert np.array_equal(a.wq, b.wq) and np.array_equal(a.wk, attn.wk)


def test_gqa_query_key_mode_unclipped_group_bit_identical_for_any_alpha(x):
    """Every gamma 1 (S at or under tau everywhere): every leaf bit-identical."""
    attn = _query_key_module()
    s = np.asarray(_module_s(attn, x))
    for alpha in (0.0, 0.3, 0.5, 1.0):
        _assert_untouched(attn, qk_clip(attn, jnp.asarray(s), float(s.max()), alpha=alpha), {})


@pytest.mark.parametrize("alpha", [0.3, 0.8])
def test_transformer_query_key_mode_matches_numpy(alpha):
    """The stacked Transformer in "query_key" mode against the NumPy rule; each
    layer its own eta. clipped_heads names the heads over tau, although the q
    rows of their group-mates change too."""
    att = GQAConfig(dim=DIM, n_heads=4, head_dim=8, n_kv_heads=2, clip_mode="query_key")
    cfg = TransformerConfig(vocab_size=32, n_layers=2, mlp_hidden=16, attention=att)
    model = _init(lambda k: Transformer(cfg, key=k), 20)
    tau = 10.0
    s = np.array(
        [
            [40.0, 9.0, 12.5, -3.0],  # layer 0: both groups clipped, each with a mate
            [5.0, 7.0, 10.0, 80.0],
        ],  # layer 1: group 0 untouched
        np.float32,
    )
    clipped = qk_clip(model, jnp.asarray(s), tau, alpha=alpha)
    expected = np_qk_clip(model, s, tau, alpha)
    # measured rel 1.5e-7 (jax 0.10.2 and 0.12.0.1, CPU)
    assert_leaves_close(clipped, expected, rtol=6e-7, what="query_key")
    got, before = leaves_by_path(clipped), leaves_by_path(model)
    # layer 1, group 0 (heads 0, 1 and key 0): bit-identical
    assert np.array_equal(got[".blocks.attn.wq"][1, :2], before[".blocks.attn.wq"][1, :2])
    assert np.array_equal(got[".blocks.attn.wk"][1, 0], before[".blocks.attn.wk"][1, 0])
    changed = np.any(got[".blocks.attn.wq"] != before[".blocks.attn.wq"], axis=(-2, -1))
    np.testing.assert_array_equal(changed, [[True] * 4, [False, False, True, True]])
    (mask,) = clipped_heads(model, jnp.asarray(s), tau)
    np.testing.assert_array_equal(np.asarray(mask), s > tau)
    np.testing.assert_array_equal(np.asarray(mask), heads_scaled(model, s, tau))


def test_every_library_module_is_abstract_or_final():
    """equinox's abstract-or-final rule: no class of the library overrides a
    concrete method or property of a base, and the interface's every member is
    abstract."""
    import abc
    import inspect

    import qkclip_eqx as qc
    from qkclip_eqx._attention import AbstractAttention

    assert AbstractQKClippable.__abstractmethods__ >= {
        "scale_heads",
        "head_axes",
        "heads_scaled",
        "reports_lse_bound",
    }
    classes = {AbstractAttention} | {
        c for c in vars(qc).values() if isinstance(c, type) and issubclass(c, eqx.Module)
    }
    for cls in classes:
        for base in cls.__mro__[1:]:
            if base in (eqx.Module, object) or not issubclass(base, eqx.Module):
                continue
            for name, member in vars(base).items():
                if name.startswith("__") or getattr(member, "__isabstractmethod__", False):
                    continue
                if not (inspect.isfunction(member) or isinstance(member, property)):
                    continue
                owner = next(k for k in cls.__mro__ if name in vars(k))
                assert owner is base, f"{owner.__name__}.{name} overrides {base.__name__}.{name}"
    assert isinstance(AbstractQKClippable, abc.ABCMeta)
