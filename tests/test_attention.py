"""MLAttention and GQAttention against a float64 NumPy re-implementation written
here from the documented weight layouts (no library helper is used by the
reference): outputs and per-head max logits S, causal and packed; causality;
dense vs blockwise; bfloat16."""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkclip_eqx import GQAConfig, GQAttention, MLAConfig, MLAttention

T = 14  # sequence length; packed inputs hold two documents of T // 2
DIM = 64

CASES = {
    "mla_qlora": (
        MLAttention,
        MLAConfig(
            dim=DIM,
            n_heads=4,
            kv_lora_rank=12,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=6,
            q_lora_rank=10,
        ),
    ),
    "mla_noqlora": (
        MLAttention,
        MLAConfig(
            dim=DIM,
            n_heads=4,
            kv_lora_rank=12,
            qk_nope_head_dim=8,
            qk_rope_head_dim=6,
            v_head_dim=6,
        ),
    ),
    "mha": (GQAttention, GQAConfig(dim=DIM, n_heads=4, head_dim=8, rope_layout="interleaved")),
    "gqa": (GQAttention, GQAConfig(dim=DIM, n_heads=4, head_dim=8, n_kv_heads=2)),
    "mqa": (GQAttention, GQAConfig(dim=DIM, n_heads=4, head_dim=8, n_kv_heads=1)),
}
BIDIRECTIONAL = {
    "mla_bidir": (MLAttention, dataclasses.replace(CASES["mla_qlora"][1], causal=False)),
    "gqa_bidir": (GQAttention, dataclasses.replace(CASES["gqa"][1], causal=False)),
}


# --------------------------------------------------------------------------
# Building modules without jax.random (which compiles a kernel per shape)
# --------------------------------------------------------------------------


def build(cls, config, seed=0, dtype=jnp.float32):
    """The module's structure, with every weight drawn by NumPy: norm gains
    1 + 0.1 N(0, 1), matrices N(0, 1/fan_in) (fan_in = last axis)."""
    shape_tree = eqx.filter_eval_shape(cls, config, dtype=dtype, key=jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if "norm" in jax.tree_util.keystr(path):
            w = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
        else:
            w = rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[-1])
        return jnp.asarray(w.astype(np.float32), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shape_tree)


@eqx.filter_jit
def apply(module, x, positions, segment_ids):
    return module(x, positions=positions, segment_ids=segment_ids)


def inputs(seed, t=T):
    return np.random.default_rng(seed).standard_normal((t, DIM)).astype(np.float32)


def plain(t=T):
    return np.arange(t, dtype=np.int32), np.zeros((t,), np.int32)


def packed(t=T):
    half = t // 2
    pos = np.concatenate([np.arange(half), np.arange(t - half)]).astype(np.int32)
    seg = np.concatenate([np.zeros(half), np.ones(t - half)]).astype(np.int32)
    return pos, seg


def call(module, x, pos, seg):
    out, s = apply(module, jnp.asarray(x), jnp.asarray(pos), jnp.asarray(seg))
    assert out.shape == x.shape and s.shape == (module.config.n_heads,)
    assert s.dtype == jnp.float32
    return np.asarray(out, np.float32), np.asarray(s)


# --------------------------------------------------------------------------
# Independent NumPy reference (float64)
# --------------------------------------------------------------------------


def np_rms_norm(x, w, eps):
    return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def np_rope(x, pos, theta, layout):
    """x [seq, heads, d]. Pair i = (i, i + d/2) ("half") or (2i, 2i + 1)
    ("interleaved") turns by pos * theta^(-2i/d)."""
    d = x.shape[-1]
    out = np.empty_like(x)
    for i in range(d // 2):
        a, b = (i, i + d // 2) if layout == "half" else (2 * i, 2 * i + 1)
        angle = pos * theta ** (-2.0 * i / d)
        cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
        out[..., a] = x[..., a] * cos - x[..., b] * sin
        out[..., b] = x[..., b] * cos + x[..., a] * sin
    return out


def np_softmax_attention(logits, v_of_head, pos, seg, causal):
    """logits [heads, tq, tk] already scaled; v_of_head(h) -> [tk, dv].
    Returns (concatenated head outputs [t, heads * dv], S [heads], the masked
    logits [heads, tq, tk] with -inf where not allowed)."""
    heads, t, _ = logits.shape
    allowed = seg[:, None] == seg[None, :]
    if causal:
        allowed &= pos[None, :] <= pos[:, None]
    masked = np.where(allowed, logits, -np.inf)
    s_max = masked.max(axis=(1, 2))
    p = np.exp(masked - masked.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    out = np.concatenate([p[h] @ v_of_head(h) for h in range(heads)], axis=-1)
    return out, s_max, masked


def np_weights(module):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), module)


def np_mla(module, x, pos, seg):
    c = module.config
    w = np_weights(module)
    x = np.asarray(x, np.float64)
    nope, rope, r = c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank
    if c.q_lora_rank is None:
        q_in = x
    else:
        q_in = np_rms_norm(x @ w.wq_a.T, w.q_norm.weight, c.norm_eps)
    q = np.stack([q_in @ w.wq[h].T for h in range(c.n_heads)], axis=1)  # [t, h, nope + rope]
    q_c = q[..., :nope]
    q_r = np_rope(q[..., nope:], pos, c.rope_theta, c.rope_layout)
    kv_a = x @ w.wkv_a.T
    c_kv = np_rms_norm(kv_a[:, :r], w.kv_norm.weight, c.norm_eps)
    k_r = np_rope(kv_a[:, None, r:], pos, c.rope_theta, c.rope_layout)[:, 0]  # one for all heads
    kv = np.stack([c_kv @ w.wkv_b[h].T for h in range(c.n_heads)], axis=1)
    k_c, v = kv[..., :nope], kv[..., nope:]
    logits = np.stack([q_c[:, h] @ k_c[:, h].T + q_r[:, h] @ k_r.T for h in range(c.n_heads)])
    logits /= np.sqrt(nope + rope)
    out, s, masked = np_softmax_attention(logits, lambda h: v[:, h], pos, seg, c.causal)
    return out @ w.wo.T, s, masked


def np_gqa(module, x, pos, seg):
    c = module.config
    w = np_weights(module)
    x = np.asarray(x, np.float64)
    group = c.n_heads // c.n_kv_heads
    q = np_rope(
        np.stack([x @ w.wq[h].T for h in range(c.n_heads)], 1), pos, c.rope_theta, c.rope_layout
    )
    k = np_rope(
        np.stack([x @ w.wk[g].T for g in range(c.n_kv_heads)], 1), pos, c.rope_theta, c.rope_layout
    )
    v = np.stack([x @ w.wv[g].T for g in range(c.n_kv_heads)], 1)
    logits = np.stack([q[:, h] @ k[:, h // group].T for h in range(c.n_heads)])
    logits /= np.sqrt(c.head_dim)
    out, s, masked = np_softmax_attention(logits, lambda h: v[:, h // group], pos, seg, c.causal)
    return out @ w.wo.T, s, masked


def reference(module, x, pos, seg, with_logits=False):
    out, s, masked = (np_mla if isinstance(module, MLAttention) else np_gqa)(module, x, pos, seg)
    return (out, s, masked) if with_logits else (out, s)


@pytest.fixture(scope="module")
def modules():
    return {
        name: build(cls, cfg, seed=i)
        for i, (name, (cls, cfg)) in enumerate({**CASES, **BIDIRECTIONAL}.items())
    }


# --------------------------------------------------------------------------
# Against the reference
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*CASES, *BIDIRECTIONAL])
@pytest.mark.parametrize("layout", ["plain", "packed"])
def test_matches_numpy_reference(modules, name, layout):
    module = modules[name]
    x = inputs(1)
    pos, seg = plain() if layout == "plain" else packed()
    out, s = call(module, x, pos, seg)
    ref_out, ref_s = reference(module, x, pos, seg)
    assert np.ptp(ref_s) > 1e-2  # heads differ: a head mix-up would show
    # measured max |diff| 1.2e-6, 21% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(s, ref_s, rtol=1.5e-6, atol=1.5e-6)
    # measured max |diff| 6.8e-7, 21% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(out, ref_out, rtol=2e-5, atol=2e-6)


def test_default_positions_and_segments(modules):
    """positions=None, segment_ids=None mean 0..seq-1 and one document."""
    module = modules["mla_qlora"]
    x = inputs(2)
    out, s = eqx.filter_jit(lambda m, x: m(x))(module, jnp.asarray(x))
    ref_out, ref_s = reference(module, x, *plain())
    # measured max |diff| 6.6e-7, 23% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(np.asarray(s), ref_s, rtol=8e-7, atol=8e-7)
    # measured max |diff| 6.4e-7, 21% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(np.asarray(out), ref_out, rtol=1e-5, atol=1e-6)


def test_rope_layout_matters(modules):
    """Guards the reference: the two layouts give different logits for the same
    weights, so matching the reference pins the layout down."""
    module = modules["gqa"]
    x = inputs(1)
    pos, seg = plain()
    other = build(
        GQAttention,
        dataclasses.replace(CASES["gqa"][1], rope_layout="interleaved"),
        seed=list(modules).index("gqa"),
    )
    _, s_half = reference(module, x, pos, seg)
    _, s_inter = reference(other, x, pos, seg)
    assert not np.allclose(s_half, s_inter, atol=1e-3)


# --------------------------------------------------------------------------
# Causality and packing
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_future_tokens_do_not_reach_earlier_rows(modules, name):
    module = modules[name]
    k = T // 2
    x = inputs(3)
    pos, seg = plain()
    out, _ = call(module, x, pos, seg)

    x2 = x.copy()
    x2[k] += 5.0 * inputs(4)[k]
    out2, _ = call(module, x2, pos, seg)
    # bit-equal (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_array_equal(out2[:k], out[:k])
    assert not np.allclose(out2[k:], out[k:], atol=1e-3)

    # The prefix run alone gives the same rows.
    out_p, _ = call(module, x[:k], *plain(k))
    # measured max |diff| 2.4e-7, 23% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(out[:k], out_p, rtol=5e-6, atol=5e-7)


def query_null_space(module):
    """Unit vectors x with (first query projection) @ x = 0: tokens made of
    them have (almost) zero queries but ordinary, or large, keys."""
    w = module.wq_a if getattr(module, "wq_a", None) is not None else module.wq
    w = np.asarray(w, np.float64).reshape(-1, DIM)
    _, sv, vt = np.linalg.svd(w)
    rank = int(np.sum(sv > 1e-8 * sv[0]))
    assert rank < DIM
    return vt[rank:]


def _with_config(module, config):
    """The same weights under another (static) config."""
    template = eqx.filter_eval_shape(type(module), config, key=jax.random.key(0))
    return jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(template), jax.tree.leaves(module)
    )


@pytest.mark.parametrize("name", list(CASES))
def test_future_keys_do_not_enter_s(modules, name):
    """S counts allowed pairs only. The later tokens are built to be a trap: large
    keys (30x) but near-zero queries, so they would give the earlier queries
    logits far above everything else if the mask let those pairs through.

    Checks: S of the prefix run alone equals the reference's max over the first
    k query rows of the full sequence; S of the full run equals the max of the
    prefix-alone S and the reference's max over the later rows."""
    module = modules[name]
    k = T // 2
    x = inputs(5)
    null = query_null_space(module)
    coef = np.random.default_rng(9).standard_normal((T - k, null.shape[0]))
    future = coef @ null
    future *= 30.0 / np.sqrt(np.mean(future**2, axis=-1, keepdims=True))
    x[k:] = future.astype(np.float32)
    pos, seg = plain()

    _, s_full = call(module, x, pos, seg)
    _, s_prefix = call(module, x[:k], *plain(k))
    _, _, masked = reference(module, x, pos, seg, with_logits=True)
    s_rows_before = masked[:, :k, :].max(axis=(1, 2))
    s_rows_after = masked[:, k:, :].max(axis=(1, 2))
    # measured max |diff| 4.6e-7, 24% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(s_prefix, s_rows_before, rtol=6e-7, atol=6e-7)
    # bit-equal on jax 0.10.2 and 0.12.0.1; 2 ulp (rel 1.2e-7) on jax 0.12.1 (CPU):
    # XLA may tile the prefix's and the full sequence's q.k products differently
    np.testing.assert_allclose(s_full, np.maximum(s_prefix, s_rows_after), rtol=4e-7, atol=0)

    # The trap is real: with the mask off, every head's S would be far higher.
    leaky = _with_config(module, dataclasses.replace(module.config, causal=False))
    _, s_leaky, _ = reference(leaky, x, pos, seg, with_logits=True)
    assert np.all(s_leaky > s_full + 5.0), (s_leaky, s_full)
    if name in ("mla_qlora", "gqa"):  # same configs as the *_bidir cases: no new compile
        _, s_leaky_module = call(leaky, x, pos, seg)
        # measured max |diff| 9.4e-6, 23% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_allclose(s_leaky_module, s_leaky, rtol=6e-7, atol=6e-7)


@pytest.mark.parametrize("name", ["mla_qlora", "mla_noqlora", "gqa", "gqa_bidir"])
def test_packed_documents_are_independent(modules, name):
    """Two documents packed in one row (positions restarting) give the rows and
    the S (max over documents) of running each document alone."""
    module = modules[name]
    x = inputs(6)
    pos, seg = packed()
    out, s = call(module, x, pos, seg)
    half = T // 2
    out_a, s_a = call(module, x[:half], *plain(half))
    out_b, s_b = call(module, x[half:], *plain(T - half))
    np.testing.assert_allclose(out[:half], out_a, rtol=1e-5, atol=1e-6)
    # measured max |diff| 2.4e-7, 21% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(out[half:], out_b, rtol=6e-6, atol=6e-7)
    # bit-equal on jax 0.10.2 and 0.12.0.1; 1 ulp (rel 1.1e-7) on jax 0.12.1 (CPU)
    np.testing.assert_allclose(s, np.maximum(s_a, s_b), rtol=4e-7, atol=0)
    # Without the segment ids the two documents would mix.
    out_mixed, _ = call(module, x, *plain())
    assert not np.allclose(out_mixed[half:], out_b, atol=1e-3)


# --------------------------------------------------------------------------
# Kernels and dtypes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mla_qlora", "gqa"])
def test_dense_and_blockwise_modules_agree(modules, name):
    """The same weights under kernel="dense" and kernel="blockwise" (block 4, which
    does not divide T) give the same output and S."""
    _, config = CASES[name]
    dense = modules[name]
    block = _with_config(dense, dataclasses.replace(config, kernel="blockwise", block_size=4))
    assert block.config.kernel == "blockwise" and dense.config.kernel == "dense"
    x = inputs(7)
    for pos, seg in (plain(), packed()):
        out_d, s_d = call(dense, x, pos, seg)
        out_b, s_b = call(block, x, pos, seg)
        # measured max |diff| 4.8e-7, 20% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_allclose(s_b, s_d, rtol=8e-7, atol=8e-8)
        np.testing.assert_allclose(out_b, out_d, rtol=1e-5, atol=1e-6)
        ref_out, ref_s = reference(dense, x, pos, seg)
        # measured max |diff| 8.8e-7, 23% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_allclose(s_b, ref_s, rtol=1.2e-6, atol=1.2e-6)
        # measured max |diff| 7.9e-7, 24% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_allclose(out_b, ref_out, rtol=1.2e-5, atol=1.2e-6)


@pytest.mark.parametrize("name", ["mla_qlora", "mqa"])
def test_bf16_params(modules, name):
    cls, config = CASES[name]
    m32 = modules[name]
    m16 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a).astype(jnp.bfloat16)), m32)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(m16))
    x = inputs(8)
    pos, seg = plain()
    out16, s16 = apply(m16, jnp.asarray(x, jnp.bfloat16), jnp.asarray(pos), jnp.asarray(seg))
    assert out16.dtype == jnp.bfloat16 and s16.dtype == jnp.float32
    out16, s16 = np.asarray(out16, np.float32), np.asarray(s16)
    assert np.all(np.isfinite(out16)) and np.all(np.isfinite(s16))
    out32, s32 = call(m32, x, pos, seg)
    # measured (jax 0.10.2, CPU): S 0.42% relative, outputs 0.46% of their
    # largest magnitude (mla_qlora; mqa 0.35%, 0.35%)
    np.testing.assert_allclose(s16, s32, rtol=2e-2)
    scale = np.abs(out32).max()
    np.testing.assert_allclose(out16, out32, atol=2e-2 * scale)

    # The constructor's dtype argument gives bf16 weights too.
    built = eqx.filter_eval_shape(cls, config, dtype=jnp.bfloat16, key=jax.random.key(0))
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(built))
