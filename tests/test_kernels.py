"""The attention kernels: dense vs blockwise, and both against a float64 NumPy
brute force of softmax attention and of S = max over allowed (i, j) of
scale * q_i . k_j (Kimi K2 report, sec. 2.1)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkclip_eqx import attend

T = 37  # not a multiple of any block size used below
DK, DV = 8, 6  # different so that an axis mix-up between k and v shows
HEADS = 4
SCALE = 1.0 / math.sqrt(DK)


# --------------------------------------------------------------------------
# Independent reference
# --------------------------------------------------------------------------


def np_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, causal, scale):
    """Loop-level float64 brute force. Returns (out [tq, h, dv], S [h])."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    tq, h, _ = q.shape
    tk, kvh, dv = v.shape
    group = h // kvh
    out = np.zeros((tq, h, dv))
    s_max = np.full((h,), -np.inf)
    for head in range(h):
        kh = head // group
        for i in range(tq):
            allowed = [
                j
                for j in range(tk)
                if q_seg[i] == k_seg[j] and (not causal or k_pos[j] <= q_pos[i])
            ]
            if not allowed:
                continue
            logits = np.array([scale * q[i, head] @ k[j, kh] for j in allowed])
            s_max[head] = max(s_max[head], logits.max())
            p = np.exp(logits - logits.max())
            p /= p.sum()
            out[i, head] = p @ v[allowed, kh]
    return out, s_max


def make_qkv(seed, tq, tk, heads, kv_heads, dtype=jnp.float32):
    # NumPy's generator: jax.random would compile a kernel per shape.
    rng = np.random.default_rng(seed)
    # Logits of order a few units, as in a trained model.
    q = 1.5 * rng.standard_normal((tq, heads, DK))
    k = 1.5 * rng.standard_normal((tk, kv_heads, DK))
    v = rng.standard_normal((tk, kv_heads, DV))
    # NumPy arrays: slicing them in the tests compiles nothing.
    return tuple(x.astype(np.float32).astype(dtype) for x in (q, k, v))


@functools.partial(jax.jit, static_argnames=("causal", "kernel", "block_size"))
def run(q, k, v, q_pos, k_pos, q_seg, k_seg, *, causal, kernel, block_size=128):
    return attend(
        q,
        k,
        v,
        q_pos=q_pos,
        k_pos=k_pos,
        q_seg=q_seg,
        k_seg=k_seg,
        causal=causal,
        scale=SCALE,
        kernel=kernel,
        block_size=block_size,
    )


def plain(t):
    pos = np.arange(t, dtype=np.int32)
    return pos, np.zeros((t,), np.int32)


def packed(t):
    """Three documents packed in one row; positions restart in each."""
    lengths = [10, 15, t - 25]
    seg = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(lengths)])
    pos = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
    return pos, seg


def check(out, s, ref_out, ref_s):
    assert s.dtype == jnp.float32
    # measured over every caller: S max |diff| 1.0e-6, out 1.2e-6, 23% and 24%
    # of these tolerances (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(np.asarray(s), ref_s, rtol=5e-7, atol=5e-7)
    np.testing.assert_allclose(np.asarray(out), ref_out, rtol=3e-6, atol=3e-6)


# --------------------------------------------------------------------------
# Forward: dense and blockwise vs the brute force
# --------------------------------------------------------------------------


BLOCKWISE_CASES = [
    # (block, kv_heads, causal): block sizes below, at and above T = 37 (none
    # divides it); GQA groups of 2, MHA (groups of 1) and MQA (one key head).
    (4, 2, True),
    (8, 2, True),
    (8, 2, False),
    (16, 2, False),
    (128, 2, True),
    (8, 4, True),
    (8, 1, False),
    (16, 1, True),
]


@pytest.mark.parametrize("block,kv_heads,causal", BLOCKWISE_CASES)
def test_dense_and_blockwise_match_bruteforce(block, kv_heads, causal):
    q, k, v = make_qkv(1, T, T, HEADS, kv_heads)
    pos, seg = plain(T)
    ref_out, ref_s = np_attention(q, k, v, pos, pos, seg, seg, causal, SCALE)
    out_d, s_d = run(q, k, v, pos, pos, seg, seg, causal=causal, kernel="dense")
    out_b, s_b = run(
        q, k, v, pos, pos, seg, seg, causal=causal, kernel="blockwise", block_size=block
    )
    assert out_b.shape == out_d.shape == (T, HEADS, DV) and s_b.shape == s_d.shape == (HEADS,)
    check(out_d, s_d, ref_out, ref_s)
    check(out_b, s_b, ref_out, ref_s)
    # measured max |diff| 9.5e-7, 24% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(np.asarray(s_b), np.asarray(s_d), rtol=5e-7, atol=5e-8)
    np.testing.assert_allclose(np.asarray(out_b), np.asarray(out_d), rtol=1e-5, atol=1e-6)


def test_causal_and_noncausal_differ():
    """Guards the test data: the mask must matter for S and for the output."""
    q, k, v = make_qkv(1, T, T, HEADS, 2)
    pos, seg = plain(T)
    out_c, s_c = np_attention(q, k, v, pos, pos, seg, seg, True, SCALE)
    out_n, s_n = np_attention(q, k, v, pos, pos, seg, seg, False, SCALE)
    assert np.all(s_n >= s_c) and np.any(s_n > s_c + 1e-3)
    assert not np.allclose(out_c, out_n, atol=1e-3)


@pytest.mark.parametrize("kernel,block", [("dense", 128), ("blockwise", 8)])
@pytest.mark.parametrize("causal", [True, False])
def test_packed_segments(kernel, block, causal):
    q, k, v = make_qkv(2, T, T, HEADS, 2)
    pos, seg = packed(T)
    out, s = run(q, k, v, pos, pos, seg, seg, causal=causal, kernel=kernel, block_size=block)
    check(out, s, *np_attention(q, k, v, pos, pos, seg, seg, causal, SCALE))
    # Packing is the same as running each document alone: outputs per document,
    # and S is the max over documents.
    s_docs = []
    for d in range(3):
        rows = np.flatnonzero(seg == d)
        o_d, s_d = np_attention(
            q[rows], k[rows], v[rows], pos[rows], pos[rows], seg[rows], seg[rows], causal, SCALE
        )
        # measured max |diff| 6.6e-7, 24% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_allclose(np.asarray(out)[rows], o_d, rtol=1.5e-6, atol=1.5e-6)
        s_docs.append(s_d)
    # measured rel 1.3e-7 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(np.asarray(s), np.max(s_docs, axis=0), rtol=6e-7)
    # ... and differs from attending across documents.
    _, s_unpacked = np_attention(q, k, v, pos, pos, seg * 0, seg * 0, causal, SCALE)
    assert not np.allclose(np.asarray(s), s_unpacked, atol=1e-3)


@pytest.mark.parametrize("causal,layout", [(True, "plain"), (True, "packed"), (False, "packed")])
def test_query_shard_with_offset_positions(causal, layout):
    """A shard of the queries (context parallelism) attends to all keys: its rows
    and its S equal those of the full computation restricted to the shard."""
    q, k, v = make_qkv(3, T, T, HEADS, 2)
    pos, seg = plain(T) if layout == "plain" else packed(T)
    lo, hi = 13, 30  # crosses document borders in the packed layout
    ref_out, ref_s = np_attention(q[lo:hi], k, v, pos[lo:hi], pos, seg[lo:hi], seg, causal, SCALE)
    full_out, _ = np_attention(q, k, v, pos, pos, seg, seg, causal, SCALE)
    # bit-equal (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_array_equal(ref_out, full_out[lo:hi])  # the reference agrees
    for kernel, block in (("dense", 128), ("blockwise", 4)):
        out, s = run(
            q[lo:hi],
            k,
            v,
            pos[lo:hi],
            pos,
            seg[lo:hi],
            seg,
            causal=causal,
            kernel=kernel,
            block_size=block,
        )
        assert out.shape == (hi - lo, HEADS, DV)
        check(out, s, ref_out, ref_s)
    if causal and layout == "plain":
        # Positions matter: the same shard with positions 0.. (as if it were the
        # start of the sequence) sees fewer keys and gives another answer.
        wrong, _ = np_attention(q[lo:hi], k, v, pos[: hi - lo], pos, seg[lo:hi], seg, causal, SCALE)
        assert not np.allclose(np.asarray(out), wrong, atol=1e-3)


@pytest.mark.parametrize("kernel", ["dense", "blockwise"])
def test_s_is_signed_max_when_all_logits_negative(kernel):
    """S is the signed max: with every logit negative, S is negative (not |.|,
    not clamped at zero)."""
    q, k, v = make_qkv(4, T, T, HEADS, 2)
    q = np.abs(q)
    k = -np.abs(k) - 0.1
    pos, seg = plain(T)
    out, s = run(q, k, v, pos, pos, seg, seg, causal=True, kernel=kernel, block_size=8)
    ref_out, ref_s = np_attention(q, k, v, pos, pos, seg, seg, True, SCALE)
    assert np.all(ref_s < 0)
    check(out, s, ref_out, ref_s)


@pytest.mark.parametrize("kernel", ["dense", "blockwise"])
def test_rows_without_allowed_keys_give_zeros(kernel):
    """Query rows whose segment has no key give zeros, not NaN, and don't enter S."""
    q, k, v = make_qkv(5, T, T, HEADS, 2)
    pos, seg = plain(T)
    q_seg = seg.copy()
    q_seg[20:] = 7  # no key carries segment 7

    def loss(q, k, v):
        out, _ = attend(
            q,
            k,
            v,
            q_pos=jnp.asarray(pos),
            k_pos=jnp.asarray(pos),
            q_seg=jnp.asarray(q_seg),
            k_seg=jnp.asarray(seg),
            causal=True,
            scale=SCALE,
            kernel=kernel,
            block_size=8,
        )
        return jnp.sum(out**2)

    out, s = run(q, k, v, pos, pos, q_seg, seg, causal=True, kernel=kernel, block_size=8)
    assert np.all(np.asarray(out)[20:] == 0)
    check(out, s, *np_attention(q, k, v, pos, pos, q_seg, seg, True, SCALE))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(grads[0])[20:] == 0)
    assert np.any(np.asarray(grads[0])[:20] != 0)


# --------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------


def _grads_fn(kernel, block, causal, pos, seg, w):
    """One jitted function: grads of a scalar of the output, and of sum(S)."""
    pos, seg = jnp.asarray(pos), jnp.asarray(seg)

    def fwd(q, k, v):
        return attend(
            q,
            k,
            v,
            q_pos=pos,
            k_pos=pos,
            q_seg=seg,
            k_seg=seg,
            causal=causal,
            scale=SCALE,
            kernel=kernel,
            block_size=block,
        )

    def out_loss(q, k, v):
        return jnp.sum(fwd(q, k, v)[0] * w)

    def s_loss(q, k, v):
        return jnp.sum(fwd(q, k, v)[1])

    @jax.jit
    def both(q, k, v):
        return (
            jax.grad(out_loss, argnums=(0, 1, 2))(q, k, v),
            jax.value_and_grad(s_loss, argnums=(0, 1, 2))(q, k, v),
        )

    return both


@pytest.mark.parametrize(
    "kv_heads,causal,layout,block",
    [
        (2, True, "plain", 8),
        (1, False, "packed", 16),
    ],
)
def test_gradients_dense_equal_blockwise_and_s_has_none(kv_heads, causal, layout, block):
    q, k, v = make_qkv(6, T, T, HEADS, kv_heads)
    pos, seg = plain(T) if layout == "plain" else packed(T)
    rng = np.random.default_rng(60)
    w = jnp.asarray(rng.standard_normal((T, HEADS, DV)), jnp.float32)
    g_dense, (s_dense, gs_dense) = _grads_fn("dense", 128, causal, pos, seg, w)(q, k, v)
    g_block, (s_block, gs_block) = _grads_fn("blockwise", block, causal, pos, seg, w)(q, k, v)
    for name, gd, gb in zip("qkv", g_dense, g_block):
        assert float(jnp.max(jnp.abs(gd))) > 1e-3, name  # a real gradient
        # measured max |diff| 3.5e-6, 23% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_allclose(
            np.asarray(gb), np.asarray(gd), rtol=5e-5, atol=5e-6, err_msg=f"grad wrt {name}"
        )

    # S carries no gradient, in either kernel.
    assert float(s_dense) != 0.0
    # bit-equal (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_array_equal(float(s_block), float(s_dense))
    for g in (*gs_dense, *gs_block):
        assert not np.any(np.asarray(g))

    # The gradient is also right: compare with central differences of the
    # float64 brute force along one random direction.
    dirs = [rng.standard_normal(x.shape).astype(np.float32) for x in (q, k, v)]
    eps = 1e-4

    def np_loss(q_, k_, v_):
        out, _ = np_attention(q_, k_, v_, pos, pos, seg, seg, causal, SCALE)
        return float(np.sum(out * np.asarray(w, np.float64)))

    qkv64 = [np.asarray(x, np.float64) for x in (q, k, v)]
    dirs64 = [np.asarray(d, np.float64) for d in dirs]
    plus = np_loss(*[x + eps * d for x, d in zip(qkv64, dirs64)])
    minus = np_loss(*[x - eps * d for x, d in zip(qkv64, dirs64)])
    fd = (plus - minus) / (2 * eps)
    analytic = sum(float(np.sum(np.asarray(g, np.float64) * d)) for g, d in zip(g_block, dirs))
    # measured rel 2.8e-6 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(analytic, fd, rtol=1.2e-5)


# --------------------------------------------------------------------------
# bfloat16
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["dense", "blockwise"])
def test_bf16_inputs_give_float32_s(kernel):
    q, k, v = make_qkv(8, T, T, HEADS, 2, dtype=jnp.bfloat16)
    pos, seg = plain(T)
    out, s = run(q, k, v, pos, pos, seg, seg, causal=True, kernel=kernel, block_size=8)
    assert out.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    # The same (bf16-rounded) values in float32: logits accumulate in float32, so
    # S agrees to float32 rounding; the output to bf16 rounding.
    q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v))
    out32, s32 = run(q32, k32, v32, pos, pos, seg, seg, causal=True, kernel="dense")
    # bit-equal (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s32))
    # measured (jax 0.10.2, CPU): 0.0064 at most, for outputs up to ~2
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(out32), atol=3e-2)
    assert np.all(np.isfinite(np.asarray(out, np.float32)))


def test_kv_heads_must_divide_heads():
    _, k, v = (jnp.asarray(x) for x in make_qkv(9, 5, 5, HEADS, 2))
    pos, seg = (jnp.asarray(a) for a in plain(5))
    q3 = jnp.asarray(np.zeros((5, 3, DK), np.float32))
    with pytest.raises(ValueError, match="kv_heads"):
        attend(q3, k, v, q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, causal=True, scale=SCALE)


def _plain_attention(q, k, v, allowed, scale):
    """Autodiff reference: einsum, masked softmax, einsum, differentiated by JAX."""
    group = q.shape[1] // k.shape[1]
    k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
    s = jnp.einsum("thd,shd->hts", q, k) * scale
    p = jax.nn.softmax(jnp.where(allowed, s, -jnp.inf), axis=-1)
    return jnp.einsum("hts,shd->thd", p, v)


@pytest.mark.parametrize("kernel,block", [("dense", 128), ("blockwise", 8), ("blockwise", 16)])
@pytest.mark.parametrize("kv_heads,layout", [(2, "plain"), (1, "packed"), (4, "packed")])
def test_hand_written_backward_equals_autodiff(kernel, block, kv_heads, layout):
    """The kernels' FlashAttention-2 backward against JAX's autodiff of plain
    attention, full gradients of q, k and v; with T = 37 and causal packed
    segments, the blockwise kernel skips whole tiles and pads the last one."""
    q, k, v = make_qkv(11, T, T, HEADS, kv_heads)
    pos, seg = plain(T) if layout == "plain" else packed(T)
    allowed = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
    w = jnp.asarray(np.random.default_rng(12).standard_normal((T, HEADS, DV)), jnp.float32)
    pos_, seg_ = jnp.asarray(pos), jnp.asarray(seg)

    def ours(q, k, v):
        out, _ = attend(
            q,
            k,
            v,
            q_pos=pos_,
            k_pos=pos_,
            q_seg=seg_,
            k_seg=seg_,
            causal=True,
            scale=SCALE,
            kernel=kernel,
            block_size=block,
        )
        return jnp.sum(out * w)

    def reference(q, k, v):
        return jnp.sum(_plain_attention(q, k, v, jnp.asarray(allowed), SCALE) * w)

    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(reference, argnums=(0, 1, 2)))(q, k, v)
    for name, g, r in zip("qkv", got, want):
        assert float(jnp.max(jnp.abs(r))) > 1e-2, name
        # measured max |diff| 2.5e-6, 24% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(r), rtol=2e-5, atol=4e-6, err_msg=f"grad wrt {name}"
        )


@pytest.mark.parametrize("kernel", ["dense", "blockwise"])
def test_extreme_segment_ids_are_ordinary(kernel):
    """No segment id is reserved: padding is masked by validity, so int32's
    extremes mark packed sequences like any other id."""
    q, k, v = make_qkv(13, T, T, HEADS, 2)
    pos, _ = plain(T)
    lo, hi = np.iinfo(np.int32).min, np.iinfo(np.int32).max
    seg = np.where(np.arange(T) < 15, lo, np.where(np.arange(T) < 30, lo + 1, hi)).astype(np.int32)
    out, s = run(q, k, v, pos, pos, seg, seg, causal=True, kernel=kernel, block_size=8)
    check(out, s, *np_attention(q, k, v, pos, pos, seg, seg, True, SCALE))


@pytest.mark.parametrize("kernel", ["dense", "blockwise"])
@pytest.mark.parametrize("causal", [True, False])
def test_extreme_segment_ids_keep_s_signed_with_padding(kernel, causal):
    """The ids a padding scheme might reserve (int32 min and min + 1) as real
    segments, with T = 37 padded to blocks of 8 and every logit negative: a
    padded key or query taking part would show as S = 0 (its logit q.k is 0)."""
    q, k, v = make_qkv(14, T, T, HEADS, 2)
    q, k = np.abs(q), -np.abs(k) - 0.1
    pos, _ = plain(T)
    lo = np.iinfo(np.int32).min
    seg = np.where(np.arange(T) < 20, lo, lo + 1).astype(np.int32)
    out, s = run(q, k, v, pos, pos, seg, seg, causal=causal, kernel=kernel, block_size=8)
    ref_out, ref_s = np_attention(q, k, v, pos, pos, seg, seg, causal, SCALE)
    assert np.all(ref_s < 0)
    check(out, s, ref_out, ref_s)


def test_blockwise_skips_empty_tiles_and_vmap_over_segments_matches_reference():
    """The blockwise kernel branches on whether a tile has an allowed pair (a
    ``cond`` in its program; the dense kernel, one tile, has none). Under vmap
    with per-example segment ids the branch becomes a select: the result still
    matches the float64 reference, to float32 rounding (`check`), not bit for bit."""
    q, k, v = make_qkv(14, T, T, HEADS, 2)
    pos, seg = plain(T)
    _, seg_b = packed(T)
    args = dict(q_pos=jnp.asarray(pos), k_pos=jnp.asarray(pos), causal=True, scale=SCALE)

    def f(kernel, q, k, v, s):
        return attend(q, k, v, q_seg=s, k_seg=s, kernel=kernel, block_size=8, **args)

    assert "cond" in str(jax.make_jaxpr(lambda *a: f("blockwise", *a))(q, k, v, jnp.asarray(seg)))
    assert "cond" not in str(jax.make_jaxpr(lambda *a: f("dense", *a))(q, k, v, jnp.asarray(seg)))
    segs = jnp.asarray(np.stack([seg, seg_b]))
    qs, ks, vs = (jnp.stack([x, x[::-1]]) for x in (q, k, v))
    out, s = jax.jit(jax.vmap(lambda *a: f("blockwise", *a)))(qs, ks, vs, segs)
    for i, sg in enumerate((seg, seg_b)):
        qi, ki, vi = (np.asarray(x[i]) for x in (qs, ks, vs))
        check(out[i], s[i], *np_attention(qi, ki, vi, pos, pos, sg, sg, True, SCALE))


# --------------------------------------------------------------------------
# kernel="dot_product_attention": the output from jax.nn.dot_product_attention,
# S exact (a max-only pass) or the log-sum-exp bound
# --------------------------------------------------------------------------

DPA = "dot_product_attention"
# The exact S is the max of the same float32 logits as the dense kernel's; XLA
# may sum a tile's q.k in another order than the whole matrix's: bit-equal on
# jax 0.10's XLA:CPU, within one ulp on jax 0.12's (measured rel 1.6e-7).
S_RTOL = 7e-7


@functools.partial(jax.jit, static_argnames=("causal", "max_logit", "block_size"))
def run_dpa(q, k, v, q_pos, k_pos, q_seg, k_seg, *, causal, max_logit, block_size=8):
    return attend(
        q,
        k,
        v,
        q_pos=q_pos,
        k_pos=k_pos,
        q_seg=q_seg,
        k_seg=k_seg,
        causal=causal,
        scale=SCALE,
        kernel=DPA,
        block_size=block_size,
        max_logit=max_logit,
    )


def _n_allowed(q_pos, k_pos, q_seg, k_seg, causal) -> int:
    """The most keys any query may attend to."""
    ok = q_seg[:, None] == k_seg[None, :]
    if causal:
        ok &= k_pos[None, :] <= q_pos[:, None]
    return int(ok.sum(axis=1).max())


DPA_CASES = [
    # (kv_heads, causal, layout, lo, hi): GQA, MQA and MHA; packed documents; a
    # shard of the queries with offset positions (context parallelism)
    (2, True, "plain", 0, T),
    (1, False, "packed", 0, T),
    (4, True, "packed", 0, T),
    (2, True, "packed", 13, 30),
]


@pytest.mark.parametrize("kv_heads,causal,layout,lo,hi", DPA_CASES)
def test_dot_product_attention_matches_dense_and_s_is_exact(kv_heads, causal, layout, lo, hi):
    """Output within float32 rounding of the dense kernel (and of the brute
    force); the exact S equal to the dense kernel's S up to the rounding of
    the logits (S_RTOL; maxed over block-8 key tiles, T = 37 padded); the LSE
    bound within S <= bound <= S + log(n_allowed)."""
    q, k, v = make_qkv(21, T, T, HEADS, kv_heads)
    pos, seg = plain(T) if layout == "plain" else packed(T)
    qa = (q[lo:hi], k, v, pos[lo:hi], pos, seg[lo:hi], seg)
    out_d, s_d = run(*qa, causal=causal, kernel="dense")
    out_e, s_e = run_dpa(*qa, causal=causal, max_logit="exact")
    out_b, s_b = run_dpa(*qa, causal=causal, max_logit="lse_bound")
    ref_out, ref_s = np_attention(*qa, causal, SCALE)
    assert (
        out_e.shape == (hi - lo, HEADS, DV) and s_e.shape == (HEADS,) and s_e.dtype == jnp.float32
    )
    check(out_e, s_e, ref_out, ref_s)
    for out in (out_e, out_b):
        # measured max |diff| 4.8e-7, 23% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_allclose(np.asarray(out), np.asarray(out_d), rtol=4e-6, atol=8e-7)
    np.testing.assert_allclose(np.asarray(s_e), np.asarray(s_d), rtol=S_RTOL)
    s_d, s_b = np.asarray(s_d, np.float64), np.asarray(s_b, np.float64)
    log_n = math.log(_n_allowed(pos[lo:hi], pos, seg[lo:hi], seg, causal))
    assert log_n > 1
    assert np.all(s_b >= s_d - 1e-6 * np.abs(s_d)), (s_b, s_d)
    assert np.all(s_b <= s_d + log_n + 1e-5), (s_b - s_d, log_n)
    assert np.all(s_b > s_d + 1e-3)  # a bound, not S: it must not pass for the exact kernel


def test_dot_product_attention_value_wider_than_key():
    """``jax.nn.dot_product_attention`` wants one head size for q, k and v; MLA
    has d_v != d_qk either way. Here d_v = 12 > d_qk = 8 (the other tests: 6 < 8)."""
    q, k, v = make_qkv(22, T, T, HEADS, 2)
    v = np.concatenate([v, 2 * v], axis=-1)
    pos, seg = packed(T)
    out_d, s_d = run(q, k, v, pos, pos, seg, seg, causal=True, kernel="dense")
    out_e, s_e = run_dpa(q, k, v, pos, pos, seg, seg, causal=True, max_logit="exact")
    assert out_e.shape == (T, HEADS, 12)
    # measured max |diff| 7.2e-7, 24% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(np.asarray(out_e), np.asarray(out_d), rtol=2e-6, atol=4e-7)
    np.testing.assert_allclose(np.asarray(s_e), np.asarray(s_d), rtol=S_RTOL)


@pytest.mark.parametrize("max_logit", ["exact", "lse_bound"])
def test_dot_product_attention_gradients_match_dense_and_s_has_none(max_logit):
    q, k, v = make_qkv(23, T, T, HEADS, 2)
    pos, seg = packed(T)
    w = jnp.asarray(np.random.default_rng(24).standard_normal((T, HEADS, DV)), jnp.float32)
    pos_, seg_ = jnp.asarray(pos), jnp.asarray(seg)

    def fwd(kernel, q, k, v):
        return attend(
            q,
            k,
            v,
            q_pos=pos_,
            k_pos=pos_,
            q_seg=seg_,
            k_seg=seg_,
            causal=True,
            scale=SCALE,
            kernel=kernel,
            block_size=8,
            max_logit=max_logit if kernel == DPA else "exact",
        )

    @functools.partial(jax.jit, static_argnums=0)
    def grads(kernel, q, k, v):
        return (
            jax.grad(lambda *a: jnp.sum(fwd(kernel, *a)[0] * w), argnums=(0, 1, 2))(q, k, v),
            jax.grad(lambda *a: jnp.sum(fwd(kernel, *a)[1]), argnums=(0, 1, 2))(q, k, v),
        )

    g_dense, _ = grads("dense", q, k, v)
    g_dpa, gs_dpa = grads(DPA, q, k, v)
    for name, gd, gf in zip("qkv", g_dense, g_dpa):
        assert float(jnp.max(jnp.abs(gd))) > 1e-3, name
        # measured max |diff| 2e-6, 23% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_allclose(
            np.asarray(gf), np.asarray(gd), rtol=2e-5, atol=2e-6, err_msg=f"grad wrt {name}"
        )
    for g in gs_dpa:
        assert not np.any(np.asarray(g))


def test_dot_product_attention_rows_without_allowed_keys_give_zeros():
    """As the other kernels: zeros (not the mean of v that a fully masked
    softmax gives), finite gradients, and such rows enter neither S nor the bound."""
    q, k, v = make_qkv(25, T, T, HEADS, 2)
    pos, seg = plain(T)
    q_seg = seg.copy()
    q_seg[20:] = 7  # no key carries segment 7
    ref_out, ref_s = np_attention(q, k, v, pos, pos, q_seg, seg, True, SCALE)
    out, s = run_dpa(q, k, v, pos, pos, q_seg, seg, causal=True, max_logit="exact")
    assert np.all(np.asarray(out)[20:] == 0)
    check(out, s, ref_out, ref_s)
    _, bound = run_dpa(q, k, v, pos, pos, q_seg, seg, causal=True, max_logit="lse_bound")
    assert np.all(np.asarray(bound) >= ref_s - 1e-5) and np.all(
        np.asarray(bound) <= ref_s + math.log(20)
    )
    k_, v_ = jnp.asarray(k), jnp.asarray(v)
    g = jax.jit(
        jax.grad(
            lambda q: jnp.sum(
                attend(
                    q,
                    k_,
                    v_,
                    q_pos=jnp.asarray(pos),
                    k_pos=jnp.asarray(pos),
                    q_seg=jnp.asarray(q_seg),
                    k_seg=jnp.asarray(seg),
                    causal=True,
                    scale=SCALE,
                    kernel=DPA,
                )[0]
                ** 2
            )
        )
    )(q)
    assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g)[20:] == 0)


@pytest.mark.parametrize("max_logit", ["exact", "lse_bound"])
def test_dot_product_attention_bf16(max_logit):
    """bf16 inputs: S in float32; the exact S equals the dense kernel's (S_RTOL); the
    bound, returned by JAX in bf16, is rounded up so that it stays >= S."""
    q, k, v = make_qkv(26, T, T, HEADS, 2, dtype=jnp.bfloat16)
    q = q * 4  # larger logits: a bf16 ulp of the bound is then ~0.03 or more
    pos, seg = plain(T)
    out_d, s_d = run(q, k, v, pos, pos, seg, seg, causal=True, kernel="dense")
    out, s = run_dpa(q, k, v, pos, pos, seg, seg, causal=True, max_logit=max_logit)
    assert out.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    # two bf16 results: measured one bf16 ulp (0.0156) apart at most; 2 ulps allowed
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(out_d, np.float32), atol=3e-2
    )
    if max_logit == "exact":
        # bit-equal (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_array_equal(np.asarray(s), np.asarray(s_d))
    else:
        assert np.all(np.asarray(s) >= np.asarray(s_d))
        assert np.all(np.asarray(s) <= np.asarray(s_d) + math.log(T) + 0.1)


def test_dot_product_attention_s_pass_is_blockwise():
    """The exact S pass reads keys in ``block_size`` tiles: a scan over
    ceil(37 / 8) = 5 tiles, whose largest f32 intermediate is [kv, group*tq, 8],
    never a [.., tq, tk] logit matrix beside the one jax.nn.dot_product_attention makes."""
    q, k, v = (jnp.asarray(x) for x in make_qkv(27, T, T, HEADS, 2))
    pos, seg = (jnp.asarray(a) for a in plain(T))

    def s_only(q, k, v):
        return attend(
            q,
            k,
            v,
            q_pos=pos,
            k_pos=pos,
            q_seg=seg,
            k_seg=seg,
            causal=True,
            scale=SCALE,
            kernel=DPA,
            block_size=8,
        )[1]

    text = str(jax.make_jaxpr(s_only)(q, k, v))
    assert "length=5" in text and "f32[2,74,8]" in text
    # reaching S alone needs no PV: dead-code elimination leaves no exp in the program
    lowered = jax.jit(s_only).lower(q, k, v).compile().as_text()
    assert "exponential" not in lowered


def test_lse_bound_only_with_dot_product_attention():
    from qkclip_eqx import GQAConfig, MLAConfig

    q, k, v = (jnp.asarray(x) for x in make_qkv(28, 5, 5, HEADS, 2))
    pos, seg = (jnp.asarray(a) for a in plain(5))
    with pytest.raises((ValueError, TypeError), match="lse_bound|max_logit"):
        attend(
            q,
            k,
            v,
            q_pos=pos,
            k_pos=pos,
            q_seg=seg,
            k_seg=seg,
            causal=True,
            scale=SCALE,
            kernel="blockwise",
            max_logit="lse_bound",
        )
    with pytest.raises(ValueError, match="max_logit"):
        GQAConfig(dim=16, n_heads=4, head_dim=4, max_logit="lse_bound")
    with pytest.raises(ValueError, match="max_logit"):
        MLAConfig(
            dim=16,
            n_heads=2,
            kv_lora_rank=8,
            qk_nope_head_dim=4,
            qk_rope_head_dim=4,
            v_head_dim=4,
            kernel=DPA,
            max_logit="max",
        )
    assert GQAConfig(dim=16, n_heads=4, head_dim=4, kernel=DPA, max_logit="lse_bound").kernel == DPA


def test_implementation_option_reaches_jax_and_is_checked(monkeypatch):
    """`implementation` is handed to jax.nn.dot_product_attention as given; in a
    bf16 Transformer the kernel receives bf16 q, k, v, as cuDNN needs. CI has no
    GPU, so "cudnn" itself is replaced by the XLA path here and its call recorded;
    every misuse fails with a ValueError that names it, before tracing where the
    config can tell."""
    import dataclasses

    import equinox as eqx

    from qkclip_eqx import GQAConfig, MLAConfig, Transformer, TransformerConfig

    calls = []
    real = jax.nn.dot_product_attention

    def spy(*args, implementation=None, **kwargs):
        calls.append((implementation, tuple(a.dtype for a in args[:3])))
        return real(*args, implementation=None, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    attn = MLAConfig(
        dim=16,
        n_heads=2,
        kv_lora_rank=8,
        qk_nope_head_dim=4,
        qk_rope_head_dim=4,
        v_head_dim=4,
        kernel=DPA,
        block_size=8,
        implementation="cudnn",
    )
    cfg = TransformerConfig(
        vocab_size=32, n_layers=2, mlp_hidden=16, attention=attn, compute_dtype="bfloat16"
    )
    model = Transformer(cfg, key=jax.random.key(0))
    reference = Transformer(
        dataclasses.replace(cfg, attention=dataclasses.replace(attn, implementation=None)),
        key=jax.random.key(0),
    )
    tokens = jnp.arange(12, dtype=jnp.int32) % 32
    logits, s = eqx.filter_jit(model)(tokens)
    assert calls and all(c == ("cudnn", (jnp.bfloat16,) * 3) for c in calls)
    # This comparison cannot fail for a wrong cuDNN kernel: the spy above hands
    # "cudnn" to the XLA path, so both models run the same XLA program. It only
    # shows that the option changes nothing else (no other code path, no other
    # dtype); what this test checks about "cudnn" is the spy's record of the call.
    logits_r, s_r = eqx.filter_jit(reference)(tokens)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(logits_r))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s_r))

    with pytest.raises(ValueError, match="compute_dtype='bfloat16'"):
        TransformerConfig(vocab_size=32, n_layers=1, mlp_hidden=16, attention=attn)
    with pytest.raises(ValueError, match="implementation='xla' needs kernel"):
        GQAConfig(dim=16, n_heads=4, head_dim=4, implementation="xla")
    with pytest.raises(ValueError, match="implementation"):
        GQAConfig(dim=16, n_heads=4, head_dim=4, kernel=DPA, implementation="pallas")
    q, k, v = (jnp.asarray(x) for x in make_qkv(31, 5, 5, HEADS, 2))
    pos, seg = (jnp.asarray(a) for a in plain(5))
    kw = dict(q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, causal=True, scale=SCALE)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        attend(q, k, v, **kw, kernel=DPA, implementation="cudnn")
    with pytest.raises(ValueError, match="needs kernel='dot_product_attention'"):
        attend(q, k, v, **kw, kernel="dense", implementation="xla")
    out_x, s_x = attend(q, k, v, **kw, kernel=DPA, implementation="xla")
    out_n, s_n = attend(q, k, v, **kw, kernel=DPA)
    np.testing.assert_array_equal(np.asarray(out_x), np.asarray(out_n))
    np.testing.assert_array_equal(np.asarray(s_x), np.asarray(s_n))


@pytest.mark.parametrize("which", ["mla", "gqa"])
def test_modules_with_dot_product_attention_equal_dense(which):
    """The same weights under kernel="dense" and "dot_product_attention" (exact
    S), MLA (d_v != d_qk, one shared k_R) and GQA, vmapped over a batch with
    per-example packed segments: outputs and S within float32 rounding."""
    import dataclasses

    import equinox as eqx

    from builders import init_from_numpy
    from qkclip_eqx import GQAConfig, GQAttention, MLAConfig, MLAttention

    if which == "mla":
        cfg = MLAConfig(
            dim=16,
            n_heads=4,
            kv_lora_rank=8,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=6,
            q_lora_rank=12,
        )
        cls = MLAttention
    else:
        cfg = GQAConfig(dim=16, n_heads=4, head_dim=8, n_kv_heads=2)
        cls = GQAttention
    dense = init_from_numpy(lambda key: cls(cfg, key=key), 29)
    fused_cfg = dataclasses.replace(cfg, kernel=DPA, block_size=8)
    template = eqx.filter_eval_shape(cls, fused_cfg, key=jax.random.key(0))
    fused = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(template), jax.tree.leaves(dense)
    )
    assert fused.config.kernel == DPA
    x = jnp.asarray(np.random.default_rng(30).standard_normal((2, T, 16)), jnp.float32)
    pos, seg = packed(T)
    segs = jnp.asarray(np.stack([seg, np.zeros_like(seg)]))
    poss = jnp.asarray(np.stack([pos, np.arange(T, dtype=np.int32)]))

    @eqx.filter_jit
    def call(m):
        return jax.vmap(lambda xi, p, s: m(xi, positions=p, segment_ids=s))(x, poss, segs)

    (y_d, s_d), (y_f, s_f) = call(dense), call(fused)
    # measured max |diff| 3.3e-7, 24% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(np.asarray(y_f), np.asarray(y_d), rtol=5e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(s_f), np.asarray(s_d), rtol=S_RTOL)


def test_bench_fused_attention_runs_and_removes_the_unused_s_pass(capsys):
    """scripts/bench_fused_attention.py on a tiny shape: its ``no_s`` baseline
    really lacks the S pass (fewer loops in the compiled program than ``exact``,
    which the script also checks), and it prints both overhead ratios."""
    from builders import load_script

    bench = load_script("bench_fused_attention")
    out = bench.main(
        [
            "--batch",
            "1",
            "--seq",
            "48",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--head-dim",
            "8",
            "--block-size",
            "16",
            "--repeats",
            "1",
            "--warmup",
            "0",
        ]
    )
    assert out["while_loops"]["no_s"] < out["while_loops"]["exact"]
    assert set(out["ratios"]) == {"exact", "lse_bound"}
    assert "exact/no_s" in capsys.readouterr().out
