"""QK-Clip as properties over alpha, tau and head counts, for every clippable
module: `MLAttention`, `GQAttention` (MHA, and with grouped keys in each
`clip_mode`) and `ClippableMultiheadAttention` (with every bias on).

1. The identity (Kimi K2 report, arXiv 2507.20534, sec. 2.1): after
   `qk_clip(module, S, tau, alpha)`, re-running the same input gives
   `min(S, tau)` per head (in GQA `group` mode, `S * eta` with eta the
   smallest gamma of the head's group, Megatron-Core's rule).
2. The split between query and key, which the identity cannot see (any split
   multiplies the logit by gamma): the query rows of head h are scaled by
   `gamma_h^alpha` and the key rows by `gamma_h^(1 - alpha)` (MLA: q_R by
   gamma, the shared k_R untouched; GQA query_key: the shared key by
   `eta^(1 - alpha)`, the queries by `gamma_h / eta^(1 - alpha)`), checked
   against float64 NumPy, every other leaf bit-for-bit unchanged. At alpha
   0.5 a swap of the two exponents is invisible: alpha is drawn from [0, 1].

Shapes come from a small set (2 or 4 heads), so each module compiles its
forward once per head count.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qkclip_eqx as qc

DIM, SEQ = 16, 12
KINDS = ("mla", "mla_qlora", "mha", "gqa_query", "gqa_query_key", "gqa_group", "eqx_mha")


@functools.cache
def _module(kind: str, heads: int):
    key = jax.random.key(heads)
    if kind.startswith("mla"):
        cfg = qc.MLAConfig(
            dim=DIM,
            n_heads=heads,
            q_lora_rank=8 if kind == "mla_qlora" else None,
            kv_lora_rank=8,
            qk_nope_head_dim=4,
            qk_rope_head_dim=4,
            v_head_dim=4,
        )
        return qc.MLAttention(cfg, key=key)
    if kind == "eqx_mha":
        mha = eqx.nn.MultiheadAttention(
            heads,
            DIM,
            qk_size=4,
            vo_size=4,
            use_query_bias=True,
            use_key_bias=True,
            use_value_bias=True,
            use_output_bias=True,
            key=key,
        )
        return qc.ClippableMultiheadAttention(mha)
    mode = {"mha": "query", "gqa_query": "query", "gqa_query_key": "query_key"}.get(kind, "group")
    n_kv = heads if kind == "mha" else heads // 2
    cfg = qc.GQAConfig(dim=DIM, n_heads=heads, n_kv_heads=n_kv, head_dim=4, clip_mode=mode)
    return qc.GQAttention(cfg, key=key)


_X = jnp.asarray(3.0 * np.random.default_rng(0).standard_normal((SEQ, DIM)), jnp.float32)
_CAUSAL = jnp.tril(jnp.ones((SEQ, SEQ), bool))


@eqx.filter_jit
def _s(module):
    if isinstance(module, qc.ClippableMultiheadAttention):
        return module(_X, _X, _X, _CAUSAL)[1]
    return module(_X)[1]


def _np(x):
    return np.asarray(x, np.float64)


def _expected_weights(kind, module, gamma, alpha):
    """{field path: expected float64 array} for the leaves the clip scales."""
    g = _np(gamma)
    if kind.startswith("mla"):
        nope = module.config.qk_nope_head_dim
        wq, wkv_b = _np(module.wq).copy(), _np(module.wkv_b).copy()
        wq[:, :nope] *= (g**alpha)[:, None, None]
        wq[:, nope:] *= g[:, None, None]  # q_R: the shared k_R cannot take a per-head factor
        wkv_b[:, :nope] *= (g ** (1 - alpha))[:, None, None]
        return {"wq": wq, "wkv_b": wkv_b}
    if kind == "eqx_mha":
        out = {}
        heads = g.shape[0]
        for name, f in (("query_proj", g**alpha), ("key_proj", g ** (1 - alpha))):
            lin = getattr(module.mha, name)
            w = _np(lin.weight).reshape(heads, -1, DIM) * f[:, None, None]
            b = _np(lin.bias).reshape(heads, -1) * f[:, None]
            out[f"mha.{name}.weight"] = w.reshape(lin.weight.shape)
            out[f"mha.{name}.bias"] = b.reshape(lin.bias.shape)
        return out
    c = module.config
    group = c.n_heads // c.n_kv_heads
    eta = g.reshape(c.n_kv_heads, group).min(axis=1)
    if group == 1:
        q, k = g**alpha, g ** (1 - alpha)
    elif c.clip_mode == "query":
        return {"wq": _np(module.wq) * g[:, None, None]}
    elif c.clip_mode == "query_key":
        k = eta ** (1 - alpha)
        q = g / np.repeat(k, group)
    else:
        q, k = np.repeat(eta**alpha, group), eta ** (1 - alpha)
    return {"wq": _np(module.wq) * q[:, None, None], "wk": _np(module.wk) * k[:, None, None]}


def _leaf(module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _expected_s(kind, module, s, gamma):
    s, g = _np(s), _np(gamma)
    if kind == "gqa_group":
        c = module.config
        group = c.n_heads // c.n_kv_heads
        return s * np.repeat(g.reshape(c.n_kv_heads, group).min(axis=1), group)
    return s * g  # = min(S, tau) where S > 0


# 7 modules x 2 head counts: more than the profile's count in CI
@settings(max_examples=max(40, settings().max_examples))
@given(
    kind=st.sampled_from(KINDS),
    heads=st.sampled_from([2, 4]),
    alpha=st.one_of(st.sampled_from([0.0, 0.25, 0.8, 1.0]), st.floats(0.0, 1.0)),
    tau_fraction=st.floats(0.2, 1.2),
)
def test_clip_identity_and_split_for_every_module(kind, heads, alpha, tau_fraction):
    module = _module(kind, heads)
    s = _s(module)
    tau = float(tau_fraction * jnp.max(s))
    if tau <= 0:
        tau = 1.0
    gamma = qc.clip_factors(s, tau)
    clipped = qc.qk_clip(module, s, tau, alpha=alpha)
    s_new = _s(clipped)

    # 1. the identity: min(S, tau) per head (S * eta in group mode)
    want = _expected_s(kind, module, s, gamma)
    if kind != "gqa_group":
        np.testing.assert_allclose(want, np.minimum(_np(s), tau), rtol=1e-6)
    # float32 forward of the scaled weights: measured 2.8e-7 (jax 0.10.2, CPU, 252 cases)
    np.testing.assert_allclose(_np(s_new), want, rtol=1.2e-6)

    # 2. the split: each scaled leaf against float64, every other leaf untouched
    expected = _expected_weights(kind, module, gamma, alpha)
    for path, w in expected.items():
        # one float32 product per element, gamma**alpha in float32: measured 1.2e-7
        np.testing.assert_allclose(_np(_leaf(clipped, path)), w, rtol=5e-7, err_msg=path)
    scaled = {id(_leaf(module, p)) for p in expected}
    for before, after in zip(jax.tree.leaves(module), jax.tree.leaves(clipped), strict=True):
        if id(before) not in scaled:
            assert np.array_equal(before, after)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_clips_some_head_at_tau_below_s(kind):
    """The property's draws reach a clip in every module: not a vacuous identity."""
    module = _module(kind, 4)
    s = _s(module)
    tau = float(0.5 * jnp.max(s))
    clipped = qc.qk_clip(module, s, tau, alpha=0.25)
    assert int(jnp.sum(s > tau)) > 0
    assert float(jnp.max(_s(clipped))) <= tau * (1 + 2e-6)
