"""Attention kernels on one example. They know nothing of MLA or GQA: they see
q, k, v and the mask, and return the output and the per-head max logit

    S^h = max over allowed (i, j) of  scale * q_i^h . k_j^h

(Kimi K2 report, arXiv 2507.20534, sec. 2.1, the S_max of Algorithm 1: the
signed max of the scaled pre-softmax logits, in float32, with no gradient).

A query may attend to a key when both carry the same segment id and, if causal,
the key's position is not after the query's. Positions and segment ids are
passed for queries and keys separately so that a caller holding a shard of the
queries (context parallelism) masks correctly across shard borders. Any int32
segment id is allowed: padding is masked by a validity flag, not by a reserved id.

Both kernels are one tiled algorithm with a hand-written backward pass
(FlashAttention-2, Dao 2023, arXiv 2307.08691, Algorithm 2): the forward keeps
an online softmax (Milakov & Gimelshein 2018) and a running max of the raw
masked logits, which is S exactly; it saves only q, k, v, the output and the
row log-sum-exp, and the backward recomputes each tile's probabilities.
`"dense"` is the case of one tile (the whole sequence); `"blockwise"` tiles
queries and keys by `block_size`, so memory is linear in the sequence length,
and skips every tile in which the mask allows no pair (under a causal mask,
about half of them), which changes neither the output nor S.

Layout inside: heads first, `[kv_heads, group * t, d]`, the query heads of a
KV group stacked along the rows, so that every matmul (and its vmap over the
batch) has its batch axes leading and its contraction axis last or second to
last: XLA:CPU then calls its matmul without a strided transpose of a
`t x t` tile.

`"dot_product_attention"` takes the output (and its gradient) from
`jax.nn.dot_product_attention`, a kernel that returns the output and at most
the row log-sum-exp, never the max. S then comes either from a separate
max-only pass (`max_logit="exact"`: q.k tile by tile over `block_size` keys,
masked and maxed; no softmax, no PV, no gradient, memory O(t * block_size)), or
from the log-sum-exp (`max_logit="lse_bound"`): for a row with n allowed keys,

    max_j l_ij  <=  LSE_i = log sum_j exp(l_ij)  <=  max_j l_ij + log n,

so the max over rows of LSE is an upper bound of S, off by at most log n
(FlashAttention-2, arXiv 2307.08691, sec. 3.1.1, for the log-sum-exp).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Bool, Float, Int

from ._config import (
    Implementation,
    Kernel,
    MaxLogit,
    check_cudnn_dtypes,
    check_kernel_options,
)


class _Side(NamedTuple):
    """Positions, segment ids and validity (False on padding) of queries or keys."""

    pos: Int[Array, " t"]
    seg: Int[Array, " t"]
    valid: Bool[Array, " t"]


def _allowed(q: _Side, k: _Side, causal: bool) -> Bool[Array, "tq tk"]:
    ok = (q.seg[:, None] == k.seg[None, :]) & q.valid[:, None] & k.valid[None, :]
    if causal:
        ok = ok & (k.pos[None, :] <= q.pos[:, None])
    return ok


def _tile_logits(q, k, allowed, scale: float, group: int):
    """q [kv, group*tq, d], k [kv, tk, d] -> f32 logits [kv, group*tq, tk], -inf where the
    [tq, tk] mask (the same for every head of a group) allows no attention."""
    s = jnp.einsum("krd,ksd->krs", q, k, preferred_element_type=jnp.float32) * jnp.float32(scale)
    return jnp.where(jnp.tile(allowed, (group, 1)), s, -jnp.inf)


class _Tiling(NamedTuple):
    group: int
    tq: int
    tk: int
    bq: int
    bk: int

    @property
    def nq(self) -> int:
        return self.tq // self.bq

    @property
    def nk(self) -> int:
        return self.tk // self.bk


def _q_tiles(x: Array, t: _Tiling) -> Array:
    """[kv, group*tq, ...] -> [nq, kv, group*bq, ...]."""
    kv, rest = x.shape[0], x.shape[2:]
    x = x.reshape(kv, t.group, t.nq, t.bq, *rest)
    x = jnp.moveaxis(x, 2, 0)
    return x.reshape(t.nq, kv, t.group * t.bq, *rest)


def _q_untile(x: Array, t: _Tiling) -> Array:
    """Inverse of `_q_tiles`."""
    kv, rest = x.shape[1], x.shape[3:]
    x = x.reshape(t.nq, kv, t.group, t.bq, *rest)
    x = jnp.moveaxis(x, 0, 2)
    return x.reshape(kv, t.group * t.tq, *rest)


def _k_tiles(x: Array, t: _Tiling) -> Array:
    """[kv, tk, ...] -> [nk, kv, bk, ...]."""
    kv, rest = x.shape[0], x.shape[2:]
    return jnp.moveaxis(x.reshape(kv, t.nk, t.bk, *rest), 1, 0)


def _k_untile(x: Array, t: _Tiling) -> Array:
    kv, rest = x.shape[1], x.shape[3:]
    return jnp.moveaxis(x, 0, 1).reshape(kv, t.tk, *rest)


def _side_tiles(side: _Side, n: int) -> _Side:
    return jax.tree.map(lambda x: x.reshape(n, -1), side)


def _maybe(allowed, compute, skip, skippable: bool):
    """`compute()` if a tile has an allowed pair, else `skip()` (no FLOPs spent).
    Under vmap with a batched mask (per-example segment ids) the cond becomes a
    select and both run; the default positions and segments are not batched."""
    if not skippable:
        return compute()
    return jax.lax.cond(jnp.any(allowed), compute, skip)


def _forward(q, k, v, qs: _Side, ks: _Side, t: _Tiling, causal: bool, scale: float):
    """q [kv, group*tq, d], k [kv, tk, d], v [kv, tk, dv] (tq, tk multiples of the tiles).
    Returns out [kv, group*tq, dv] (f32), lse [kv, group*tq] and S [kv, group]."""
    kv, dv = q.shape[0], v.shape[-1]
    qt, kt, vt = _q_tiles(q, t), _k_tiles(k, t), _k_tiles(v, t)
    skippable = t.nq * t.nk > 1

    def query_tile(qb, qsb):
        def key_tile(carry, xs):
            m, l, acc, s_max = carry
            kb, vb, ksb = xs
            allowed = _allowed(qsb, ksb, causal)

            def compute():
                s = _tile_logits(qb, kb, allowed, scale, t.group)
                tile_max = jnp.max(s, axis=-1)  # [kv, rows]
                m_new = jnp.maximum(m, tile_max)
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                p = jnp.exp(s - m_safe[..., None])
                corr = jnp.exp(m - m_safe)
                pv = jnp.einsum(
                    "krs,ksd->krd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32
                )
                return (
                    m_new,
                    l * corr + jnp.sum(p, axis=-1),
                    acc * corr[..., None] + pv,
                    jnp.maximum(s_max, tile_max),
                )

            carry = _maybe(allowed, compute, lambda: carry, skippable)
            return carry, None

        # Built from qb (not jnp.zeros) so that inside shard_map the carry varies
        # over the same mesh axes as the values the scan writes into it.
        zero = jnp.zeros_like(qb[..., 0], jnp.float32)
        init = (
            zero - jnp.inf,
            zero,
            jnp.zeros_like(qb[..., :1], jnp.float32) * jnp.zeros((dv,)),
            zero - jnp.inf,
        )
        (m, l, acc, s_max), _ = jax.lax.scan(key_tile, init, (kt, vt, _side_tiles(ks, t.nk)))
        has = l > 0  # rows with no allowed key give zeros, not NaN
        out = acc / jnp.where(has, l, 1.0)[..., None]
        lse = jnp.where(has, m + jnp.log(jnp.where(has, l, 1.0)), 0.0)
        return out, lse, s_max

    out, lse, s_max = jax.lax.map(lambda a: query_tile(*a), (qt, _side_tiles(qs, t.nq)))
    s_max = jnp.max(s_max.reshape(t.nq, kv, t.group, t.bq), axis=(0, 3))
    return _q_untile(out, t), _q_untile(lse, t), s_max


def _backward(
    q, k, v, qs: _Side, ks: _Side, t: _Tiling, causal: bool, scale: float, out, lse, d_out
):
    """FlashAttention-2's backward pass (Dao 2023, Algorithm 2), tile by tile."""
    qt, kt, vt = _q_tiles(q, t), _k_tiles(k, t), _k_tiles(v, t)
    dot_, lset = _q_tiles(d_out, t), _q_tiles(lse, t)
    delta = _q_tiles(jnp.sum(d_out * out, axis=-1), t)  # rowsum(dO * O), [nq, kv, rows]
    skippable = t.nq * t.nk > 1
    f32 = jnp.float32

    def query_tile(carry, xs):
        dk_all, dv_all = carry
        qb, dob, lseb, deltab, qsb = xs

        def key_tile(dq, ys):
            kb, vb, ksb = ys
            allowed = _allowed(qsb, ksb, causal)

            def compute():
                s = _tile_logits(qb, kb, allowed, scale, t.group)
                p = jnp.exp(s - lseb[..., None])  # 0 where not allowed
                # dV^T = dO^T P and dK^T = Q^T dS: contraction over the rows, which
                # come second, so the only transposes are of [rows, d] tiles.
                dv_t = jnp.einsum(
                    "krd,krs->kds", dob, p.astype(dob.dtype), preferred_element_type=f32
                )
                dp = jnp.einsum("krd,ksd->krs", dob, vb, preferred_element_type=f32)
                ds = p * (dp - deltab[..., None]) * f32(scale)
                dq_new = dq + jnp.einsum(
                    "krs,ksd->krd", ds.astype(kb.dtype), kb, preferred_element_type=f32
                )
                dk_t = jnp.einsum(
                    "krd,krs->kds", qb, ds.astype(qb.dtype), preferred_element_type=f32
                )
                return dq_new, dk_t, dv_t  # dK and dV transposed, [kv, d, bk]

            def skip():
                return (
                    dq,
                    jnp.zeros_like(jnp.swapaxes(kb, 1, 2), f32),
                    jnp.zeros_like(jnp.swapaxes(vb, 1, 2), f32),
                )

            dq, dkb, dvb = _maybe(allowed, compute, skip, skippable)
            return dq, (dkb, dvb)

        dq, (dk, dv) = jax.lax.scan(
            key_tile, jnp.zeros_like(qb, f32), (kt, vt, _side_tiles(ks, t.nk))
        )
        return (dk_all + dk, dv_all + dv), dq

    # dK, dV are accumulated transposed and turned once at the end: transposing each
    # tile's dot output would be folded by XLA into a dot that contracts a t x t tile's rows.
    init = (
        jnp.zeros_like(jnp.swapaxes(kt, 2, 3), f32),
        jnp.zeros_like(jnp.swapaxes(vt, 2, 3), f32),
    )
    (dk, dv), dq = jax.lax.scan(query_tile, init, (qt, dot_, lset, delta, _side_tiles(qs, t.nq)))
    dk, dv = jnp.swapaxes(dk, 2, 3), jnp.swapaxes(dv, 2, 3)
    return _q_untile(dq, t), _k_untile(dk, t), _k_untile(dv, t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, qs: _Side, ks: _Side, t: _Tiling, causal: bool, scale: float):
    out, _, s_max = _forward(q, k, v, qs, ks, t, causal, scale)
    return out, s_max


def _flash_fwd(q, k, v, qs, ks, t, causal, scale):
    out, lse, s_max = _forward(q, k, v, qs, ks, t, causal, scale)
    # named, so that a remat policy can keep them (see _model.py) rather than rerun the kernel
    out, lse = checkpoint_name(out, "attention_out"), checkpoint_name(lse, "attention_lse")
    return (out, s_max), (q, k, v, qs, ks, out, lse)


def _flash_bwd(t, causal, scale, res, cts):
    q, k, v, qs, ks, out, lse = res
    d_out, _ = cts  # S has no gradient
    dq, dk, dv = _backward(q, k, v, qs, ks, t, causal, scale, out, lse, d_out)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_to(x: Array, n: int, axis: int, value=0) -> Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _side(pos: Array, seg: Array, n: int | None = None) -> _Side:
    """Int32 positions and segment ids, all valid; or padded to `n` entries,
    the padding invalid."""
    pos, seg = pos.astype(jnp.int32), seg.astype(jnp.int32)
    if n is None:
        return _Side(pos, seg, jnp.ones(pos.shape, bool))
    return _Side(_pad_to(pos, n, 0), _pad_to(seg, n, 0), jnp.arange(n) < pos.shape[0])


def _group_major(q: Array, kv_heads: int) -> Array:
    """`[t, kv_heads * group, d] -> [kv_heads, group * t, d]`: the query heads
    of a KV group stacked along the rows."""
    t, heads, d = q.shape
    group = heads // kv_heads
    return q.reshape(t, kv_heads, group, d).transpose(1, 2, 0, 3).reshape(kv_heads, group * t, d)


def _heads_first(x: Array, n: int) -> Array:
    """`[t, kv_heads, d] -> [kv_heads, n, d]`, zero-padded to `n` rows."""
    return _pad_to(x, n, 0).transpose(1, 0, 2)


def _exact_max_logits(q, k, qs: _Side, ks: _Side, t: _Tiling, causal: bool, scale: float):
    """S alone, by a max-only pass over key tiles: q [kv, group*tq, d] (one
    query tile), k [kv, tk, d] -> S [kv, group]. Tiles with no allowed pair are
    skipped; nothing here is differentiated."""
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    kv = q.shape[0]
    skippable = t.nk > 1

    def key_tile(s_max, xs):
        kb, ksb = xs
        allowed = _allowed(qs, ksb, causal)

        def compute():
            s = _tile_logits(q, kb, allowed, scale, t.group)  # [kv, group*tq, bk]
            return jnp.maximum(s_max, jnp.max(s.reshape(kv, t.group, -1), axis=-1))

        return _maybe(allowed, compute, lambda: s_max, skippable), None

    init = jnp.zeros_like(q[:, : t.group, 0], jnp.float32) - jnp.inf  # varies as q does
    s_max, _ = jax.lax.scan(key_tile, init, (_k_tiles(k, t), _side_tiles(ks, t.nk)))
    return s_max


def _attend_dot_product_attention(
    q,
    k,
    v,
    q_pos,
    k_pos,
    q_seg,
    k_seg,
    causal: bool,
    scale: float,
    block_size: int,
    max_logit: MaxLogit,
    implementation: Implementation | None,
):
    """`jax.nn.dot_product_attention` for the output; S exact or bounded."""
    tq, heads, dk = q.shape
    tk, kv_heads, dv = v.shape
    group = heads // kv_heads
    qs = _side(q_pos, q_seg)
    allowed = _allowed(qs, _side(k_pos, k_seg), causal)
    has_any = jnp.any(allowed, axis=1)  # rows with no allowed key give zeros, as the other kernels
    # It needs one head size for q, k and v: pad the smaller with zeros (the
    # scale is explicit, so the padding changes neither logits nor output).
    d = max(dk, dv)
    res = jax.nn.dot_product_attention(
        _pad_to(q, d, 2),
        _pad_to(k, d, 2),
        _pad_to(v, d, 2),
        mask=allowed[None, None],
        scale=scale,
        return_residual=max_logit == "lse_bound",
        implementation=implementation,
    )
    out, lse = res if isinstance(res, tuple) else (res, None)
    out = (out[..., :dv] * has_any[:, None, None].astype(out.dtype)).astype(v.dtype)
    if lse is not None:
        lse_dtype = lse.dtype
        lse = jax.lax.stop_gradient(lse).astype(jnp.float32)
        if jnp.finfo(lse_dtype).bits < 32:  # returned rounded to the inputs' dtype: round up
            lse = lse + jnp.abs(lse) * jnp.float32(jnp.finfo(lse_dtype).eps)
        s_max = jnp.max(jnp.where(has_any[:, None], lse, -jnp.inf), axis=0)
        return out, s_max
    bk = min(block_size, tk)
    t = _Tiling(group=group, tq=tq, tk=-(-tk // bk) * bk, bq=tq, bk=bk)
    ks = _side(k_pos, k_seg, t.tk)
    qh, kh = _group_major(q, kv_heads), _heads_first(k, t.tk)
    s_max = _exact_max_logits(qh, kh, qs, ks, t, causal, float(scale))
    return out, s_max.reshape(heads)


def _attend_flash(
    q, k, v, q_pos, k_pos, q_seg, k_seg, causal: bool, scale: float, kernel: Kernel, block_size: int
):
    """The `"dense"` and `"blockwise"` kernels: pad to whole tiles, lay the
    heads out group-major, run the tiled kernel and undo the layout."""
    tq, heads, _ = q.shape
    tk, kv_heads, dv = v.shape
    group = heads // kv_heads
    if kernel == "dense":
        bq, bk = tq, tk
    else:
        bq, bk = min(block_size, tq), min(block_size, tk)
    t = _Tiling(group=group, tq=-(-tq // bq) * bq, tk=-(-tk // bk) * bk, bq=bq, bk=bk)
    qs, ks = _side(q_pos, q_seg, t.tq), _side(k_pos, k_seg, t.tk)
    qh = _group_major(_pad_to(q, t.tq, 0), kv_heads)
    kh, vh = _heads_first(k, t.tk), _heads_first(v, t.tk)
    out, s_max = _flash(qh, kh, vh, qs, ks, t, causal, scale)  # pyright: ignore[reportGeneralTypeIssues]  # partial(custom_vjp) hides the type
    out = out.reshape(kv_heads, group, t.tq, dv)[:, :, :tq].transpose(2, 0, 1, 3)
    return out.reshape(tq, heads, dv).astype(v.dtype), s_max.reshape(heads)


def attend(
    q: Float[Array, "tq heads dk"],
    k: Float[Array, "tk kv_heads dk"],
    v: Float[Array, "tk kv_heads dv"],
    *,
    q_pos: Int[Array, " tq"],
    k_pos: Int[Array, " tk"],
    q_seg: Int[Array, " tq"],
    k_seg: Int[Array, " tk"],
    causal: bool,
    scale: float,
    kernel: Kernel = "dense",
    block_size: int = 128,
    max_logit: MaxLogit = "exact",
    implementation: Implementation | None = None,
) -> tuple[Float[Array, "tq heads dv"], Float[Array, " heads"]]:
    """Softmax attention (logits, softmax and S in float32) returning `(out, S)`.

    `kv_heads` must divide `heads`; query head h uses key head
    `h // (heads // kv_heads)`. `S` has no gradient.

    **Arguments:**

    - `q`, `k`, `v`: the queries, keys and values, heads second.
    - `q_pos`, `k_pos`: the positions; with `causal`, a query attends only to
      keys at positions `<=` its own.
    - `q_seg`, `k_seg`: segment ids; a query attends only to keys of its own
      segment.
    - `causal`: whether to apply the causal mask.
    - `scale`: the factor on `q . k` (the logit).
    - `kernel`: one of
        - `"dense"`: each head's whole `tq x tk` logit matrix at once;
        - `"blockwise"`: `block_size` tiles (memory linear in the sequence
          length), skipping tiles that the mask leaves empty;
        - `"dot_product_attention"`: the output from
          `jax.nn.dot_product_attention` (with a boolean mask built from
          positions and segment ids), and S by a
          max-only pass over `block_size` key tiles (`max_logit="exact"`) or as
          the log-sum-exp bound `S <= max_i LSE_i <= S + log n`
          (`"lse_bound"`, n the most keys a query may attend to), which costs
          nothing extra.
    - `block_size`: the tile size of `"blockwise"`, and of the S pass of
      `"dot_product_attention"`.
    - `max_logit`: `"exact"` or `"lse_bound"`. `"lse_bound"` is only offered
      by `"dot_product_attention"`; the other kernels' S is exact at no cost.
    - `implementation`: for `"dot_product_attention"` only, its backend:
      `None` (JAX's choice: XLA in jax <= 0.12), `"xla"`, or `"cudnn"`
      (cuDNN's fused flash attention; NVIDIA GPUs, bfloat16 or float16
      inputs; it accumulates logits and softmax in float32 internally, and
      its log-sum-exp comes back rounded to the inputs' dtype, which the
      `"lse_bound"` path rounds up so that the bound still holds).

    **Returns:**

    `(out, S)`: the outputs `[tq, heads, dv]`, and S per head, the max logit
    over the unmasked pairs.

    **Raises:**

    `ValueError` when `kv_heads` does not divide `heads`, `kernel`,
    `max_logit` or `implementation` is unknown, `"lse_bound"` or an
    `implementation` is asked of another kernel, or `"cudnn"` gets float32
    inputs.
    """
    heads, kv_heads = q.shape[1], v.shape[1]
    if heads % kv_heads:
        raise ValueError(f"kv_heads={kv_heads} must divide heads={heads}")
    check_kernel_options(kernel, max_logit, implementation)
    check_cudnn_dtypes(implementation, q.dtype, k.dtype, v.dtype)
    sides = (q_pos, k_pos, q_seg, k_seg)
    if kernel == "dot_product_attention":
        out, s_max = _attend_dot_product_attention(
            q, k, v, *sides, causal, float(scale), block_size, max_logit, implementation
        )
    else:
        out, s_max = _attend_flash(q, k, v, *sides, causal, float(scale), kernel, block_size)
    return out, jax.lax.stop_gradient(s_max)


def softmax_scale(qk_head_dim: int) -> float:
    """1/sqrt(d_qk), the scale in Vaswani et al. 2017."""
    return 1.0 / math.sqrt(qk_head_dim)
