"""Attention kernels on one example. They know nothing of MLA or GQA: they see
q, k, v and the mask, and return the output and the per-head max logit

    S^h = max over allowed (i, j) of  scale * q_i^h . k_j^h

(Kimi K2 report, arXiv 2507.20534, eq. for S_max; the signed max of the scaled
pre-softmax logits, in float32, with no gradient through it).

A query may attend to a key when both carry the same segment id and, if causal,
the key's position is not after the query's. Segment ids must be above
``int32 min + 1``: the blockwise kernel pads with those two values. Positions and segment ids are
passed for queries and keys separately so that a caller holding a shard of the
queries (context parallelism) masks correctly across shard borders.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ._config import Kernel


def _allowed(
    q_pos: Int[Array, " tq"],
    k_pos: Int[Array, " tk"],
    q_seg: Int[Array, " tq"],
    k_seg: Int[Array, " tk"],
    causal: bool,
) -> Bool[Array, "tq tk"]:
    mask = q_seg[:, None] == k_seg[None, :]
    if causal:
        mask = mask & (k_pos[None, :] <= q_pos[:, None])
    return mask


def _logits(q: Array, k: Array, scale: float) -> Float[Array, "kv group tq tk"]:
    # q: [tq, kv, group, d], k: [tk, kv, d]; float32 accumulation whatever the dtype.
    s = jnp.einsum("tkgd,skd->kgts", q, k, preferred_element_type=jnp.float32)
    return s * jnp.float32(scale)


def _dense(q, k, v, mask, scale):
    s = _logits(q, k, scale)
    s = jnp.where(mask, s, -jnp.inf)
    s_max = jnp.max(s, axis=(-2, -1))  # [kv, group]
    # Rows with no allowed key (only possible with padding) give zeros, not NaN.
    row_max = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("kgts,skd->tkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out, s_max


def _pad(x: Array, n: int, value) -> Array:
    pad = [(0, n - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, pad, constant_values=value)


def _blockwise(q, k, v, q_pos, k_pos, q_seg, k_seg, causal, scale, block):
    """Flash-style: for each query block, scan over key blocks with an online
    softmax (Milakov & Gimelshein 2018; Dao et al. 2022) and a running max of the
    raw masked logits, which is S exactly. Each query block is rematerialised in
    the backward pass, so memory is linear in sequence length."""
    tq, tk = q.shape[0], k.shape[0]
    nq, nk = -(-tq // block), -(-tk // block)
    # Padded keys get a segment id no query has; padded queries are dropped.
    pad_seg = jnp.iinfo(jnp.int32).min
    q = _pad(q, nq * block, 0).reshape(nq, block, *q.shape[1:])
    q_pos = _pad(q_pos, nq * block, 0).reshape(nq, block)
    q_seg = _pad(q_seg, nq * block, pad_seg + 1).reshape(nq, block)
    k = _pad(k, nk * block, 0).reshape(nk, block, *k.shape[1:])
    v = _pad(v, nk * block, 0).reshape(nk, block, *v.shape[1:])
    k_pos = _pad(k_pos, nk * block, 0).reshape(nk, block)
    k_seg = _pad(k_seg, nk * block, pad_seg).reshape(nk, block)
    kv, group, dv = q.shape[2], q.shape[3], v.shape[-1]

    @jax.checkpoint
    def one_query_block(qb, qpb, qsb):
        def step(carry, kblock):
            m, l, acc, s_max = carry
            kb, vb, kpb, ksb = kblock
            s = _logits(qb, kb, scale)
            s = jnp.where(_allowed(qpb, kpb, qsb, ksb, causal), s, -jnp.inf)
            s_max = jnp.maximum(s_max, jnp.max(s, axis=(-2, -1)))
            m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(s, axis=-1)))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            correction = jnp.exp(m - m_safe)
            l = l * correction + jnp.sum(p, axis=-1)
            pv = jnp.einsum("kgts,skd->kgtd", p.astype(vb.dtype), vb,
                            preferred_element_type=jnp.float32)
            acc = acc * correction[..., None] + pv
            return (m_new, l, acc, s_max), None

        init = (
            jnp.full((kv, group, block), -jnp.inf, jnp.float32),
            jnp.zeros((kv, group, block), jnp.float32),
            jnp.zeros((kv, group, block, dv), jnp.float32),
            jnp.full((kv, group), -jnp.inf, jnp.float32),
        )
        (_, l, acc, s_max), _ = jax.lax.scan(step, init, (k, v, k_pos, k_seg))
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]
        return jnp.moveaxis(out, 2, 0), s_max  # [block, kv, group, dv]

    out, s_max = jax.lax.map(lambda a: one_query_block(*a), (q, q_pos, q_seg))
    out = out.reshape(nq * block, kv, group, dv)[:tq]
    return out, jnp.max(s_max, axis=0)


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
) -> tuple[Float[Array, "tq heads dv"], Float[Array, " heads"]]:
    """Softmax attention (softmax in float32) returning ``(out, S)``.

    ``kv_heads`` must divide ``heads``; query head h uses key head
    ``h // (heads // kv_heads)``. ``S`` has no gradient.
    """
    tq, heads, dk = q.shape
    kv_heads = k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"kv_heads={kv_heads} must divide heads={heads}")
    group = heads // kv_heads
    qg = q.reshape(tq, kv_heads, group, dk)
    if kernel == "dense":
        out, s_max = _dense(qg, k, v, _allowed(q_pos, k_pos, q_seg, k_seg, causal), scale)
    elif kernel == "blockwise":
        out, s_max = _blockwise(qg, k, v, q_pos, k_pos, q_seg, k_seg, causal, scale, block_size)
    else:
        raise ValueError(f"unknown attention kernel {kernel!r}")
    out = out.reshape(tq, heads, v.shape[-1]).astype(v.dtype)
    return out, jax.lax.stop_gradient(s_max.reshape(heads))


def softmax_scale(qk_head_dim: int) -> float:
    """1/sqrt(d_qk), the scale in Vaswani et al. 2017."""
    return 1.0 / math.sqrt(qk_head_dim)
