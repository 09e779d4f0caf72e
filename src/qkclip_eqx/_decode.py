"""Decoding with a cache: absorbed multi-head latent attention over a latent
KV cache, and grouped-query attention over a standard k/v cache.

MLA (DeepSeek-V2, arXiv 2405.04434, sec. 2.1.2 and 2.1.3) caches, per token
and layer, only the normalised latent `c_KV` (`kv_lora_rank` numbers) and
the shared RoPE key `k_R` (`qk_rope_head_dim` numbers). The key and value
up-projections are absorbed: with `W_UK^h`, `W_UV^h` the k and v rows of
head h of `W_kv_b`,

    q_C^h . k_C^h = q_C^h . (W_UK^h c_KV) = (W_UK^h^T q_C^h) . c_KV
    o^h = sum_j p_j W_UV^h c_KV,j = W_UV^h (sum_j p_j c_KV,j)

so attention runs in the latent space and `W_UV` is applied once per query.
The logit entering the softmax is

    scale * ((W_UK^h^T q_C^h) . c_KV,j + q_R^h . k_R,j)

which equals the full (non-absorbed) form's; its max over the new queries and
their allowed keys is S (Kimi K2 report, arXiv 2507.20534, sec. 2.1).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


class MLACache(eqx.Module):
    """The latent KV cache of [`qkclip_eqx.MLAttention`][]: state in, state out.

    `c_kv` holds the normalised latents `kv_norm(c_KV)` and `k_r` the
    rotated shared RoPE keys, slot `j` for position `j`; `length` is the
    number of slots filled (the position of the next token). A
    [`qkclip_eqx.Transformer`][]'s cache carries a leading layer axis on
    `c_kv` and `k_r` and one `length` for all layers. Per token and layer
    it holds `kv_lora_rank + qk_rope_head_dim` numbers.
    """

    c_kv: Float[Array, "*layers max_len kv_lora"]
    k_r: Float[Array, "*layers max_len rope"]
    length: Int[Array, ""]

    @property
    def max_len(self) -> int:
        """The number of slots, written or not."""
        return self.c_kv.shape[-2]


def absorbed_attention(
    q_c: Float[Array, "t heads nope"],
    q_r: Float[Array, "t heads rope"],
    c_kv: Float[Array, "max_len kv_lora"],
    k_r: Float[Array, "max_len rope"],
    q_pos: Int[Array, " t"],
    w_uk: Float[Array, "heads nope kv_lora"],
    w_uv: Float[Array, "heads v kv_lora"],
    scale: float,
) -> tuple[Float[Array, "t heads v"], Float[Array, " heads"]]:
    """Causal attention of `t` new queries over the cache, in the latent space.

    Query `i` (at position `q_pos[i]`) attends to cache slots
    `j <= q_pos[i]`. Everything here runs in float32 (the absorbed
    products, logits, softmax, S); the result is cast to `w_uv`'s dtype.

    **Arguments:**

    - `q_c`, `q_r`: the queries' non-RoPE and (rotated) RoPE parts.
    - `c_kv`, `k_r`: the cache, the new tokens already written.
    - `q_pos`: the queries' positions.
    - `w_uk`, `w_uv`: the k and v rows of `W_kv_b`, per head.
    - `scale`: the softmax scale.

    **Returns:**

    `(out, S)`: per-head outputs before `W_O`, and S per head.
    """
    f32 = jnp.float32
    dtype = w_uv.dtype
    q_c, q_r, c_kv, k_r, w_uk, w_uv = (a.astype(f32) for a in (q_c, q_r, c_kv, k_r, w_uk, w_uv))
    q_lat = jnp.einsum("thn,hnr->thr", q_c, w_uk)
    logits = jnp.einsum("thr,sr->hts", q_lat, c_kv) + jnp.einsum("thd,sd->hts", q_r, k_r)
    logits = logits * f32(scale)
    allowed = jnp.arange(c_kv.shape[0])[None, :] <= q_pos[:, None]  # [t, max_len]
    logits = jnp.where(allowed[None], logits, -jnp.inf)
    s_max = jax.lax.stop_gradient(jnp.max(logits, axis=(1, 2)))
    p = jax.nn.softmax(logits, axis=-1)  # slot 0 is always allowed: no empty row
    o_lat = jnp.einsum("hts,sr->thr", p, c_kv)
    out = jnp.einsum("thr,hvr->thv", o_lat, w_uv)
    return out.astype(dtype), s_max


def write_cache(
    cache: MLACache, c_kv: Float[Array, "t kv_lora"], k_r: Float[Array, "t rope"]
) -> MLACache:
    """Write `t` new tokens at slots `length .. length + t - 1`; `length`
    grows by `t`. Overflowing the cache is an error (at run time, also under jit)."""
    t = c_kv.shape[0]
    if t > cache.max_len:
        raise ValueError(f"{t} new tokens do not fit a cache of max_len {cache.max_len}")
    length = eqx.error_if(
        cache.length,
        cache.length + t > cache.max_len,
        "MLACache overflow: length + new tokens > max_len",
    )
    c_all = jax.lax.dynamic_update_slice(cache.c_kv, c_kv.astype(cache.c_kv.dtype), (length, 0))
    k_all = jax.lax.dynamic_update_slice(cache.k_r, k_r.astype(cache.k_r.dtype), (length, 0))
    return MLACache(c_all, k_all, length + t)


class KVCache(eqx.Module):
    """The k/v cache of [`qkclip_eqx.GQAttention`][] (MHA and MQA included):
    state in, state out.

    `k` holds the rotated keys and `v` the values of the key/value heads, slot
    `j` for position `j`; `length` is the number of slots filled (the position
    of the next token). A [`qkclip_eqx.Transformer`][]'s cache carries a
    leading layer axis on `k` and `v` and one `length` for all layers. Per
    token and layer it holds `2 * n_kv_heads * head_dim` numbers.
    """

    k: Float[Array, "*layers max_len kv_heads head_dim"]
    v: Float[Array, "*layers max_len kv_heads head_dim"]
    length: Int[Array, ""]

    @property
    def max_len(self) -> int:
        """The number of slots, written or not."""
        return self.k.shape[-3]


def write_kv_cache(
    cache: KVCache, k: Float[Array, "t kv_heads head_dim"], v: Float[Array, "t kv_heads head_dim"]
) -> KVCache:
    """Write `t` new tokens' keys and values at slots `length .. length + t - 1`;
    `length` grows by `t`. Overflowing the cache is an error (at run time, also
    under jit)."""
    t = k.shape[0]
    if t > cache.max_len:
        raise ValueError(f"{t} new tokens do not fit a cache of max_len {cache.max_len}")
    length = eqx.error_if(
        cache.length,
        cache.length + t > cache.max_len,
        "KVCache overflow: length + new tokens > max_len",
    )
    k_all = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (length, 0, 0))
    v_all = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (length, 0, 0))
    return KVCache(k_all, v_all, length + t)


def cached_attention(
    q: Float[Array, "t heads head_dim"],
    k: Float[Array, "max_len kv_heads head_dim"],
    v: Float[Array, "max_len kv_heads head_dim"],
    q_pos: Int[Array, " t"],
    scale: float,
) -> tuple[Float[Array, "t heads head_dim"], Float[Array, " heads"]]:
    """Causal grouped-query attention of `t` new queries over the k/v cache.

    Query head `h` reads key/value head `h // group` (Ainslie et al. 2023,
    arXiv 2305.13245); query `i` (at position `q_pos[i]`) attends to slots
    `j <= q_pos[i]`. Logits, softmax and S run in float32; the result is cast
    to `v`'s dtype. S is the max of `scale * q.k` over the new queries and
    their allowed slots (Kimi K2 report, arXiv 2507.20534, sec. 2.1), never
    over the unwritten slots.

    **Arguments:**

    - `q`: the new queries, rotated.
    - `k`, `v`: the cache, the new tokens already written.
    - `q_pos`: the queries' positions.
    - `scale`: the softmax scale.

    **Returns:**

    `(out, S)`: per-head outputs before `W_O`, and S per query head.
    """
    f32 = jnp.float32
    dtype = v.dtype
    group = q.shape[1] // k.shape[1]
    q, k, v = (a.astype(f32) for a in (q, k, v))
    k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
    logits = jnp.einsum("thd,shd->hts", q, k) * f32(scale)
    allowed = jnp.arange(k.shape[0])[None, :] <= q_pos[:, None]  # [t, max_len]
    logits = jnp.where(allowed[None], logits, -jnp.inf)
    s = jax.lax.stop_gradient(jnp.max(logits, axis=(1, 2)))  # over allowed slots only
    p = jax.nn.softmax(logits, axis=-1)  # slot 0 is always allowed: no empty row
    out = jnp.einsum("hts,shd->thd", p, v)
    return out.astype(dtype), s
