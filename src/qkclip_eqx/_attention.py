"""Attention modules that return their per-head max logits.

Each module's `__call__` takes ONE example `x: [seq, dim]` and returns
`(out: [seq, dim], max_logits: [heads])`; batch with `jax.vmap` and take the
max over the batch. Each module also knows which of its weights are q and k of
each head, and exposes `AbstractQKClippable.scale_heads` for QK-Clip.

The module runs past 500 lines because each class keeps its clipping rule
(`scale_heads`, with its derivation in the docstring) next to the weight layout
the rule depends on; the kernels and the decoding maths live in `_kernels.py`
and `_decode.py`.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ._config import GQAConfig, MLAConfig, ParallelAxes
from ._decode import (
    KVCache,
    MLACache,
    absorbed_attention,
    cached_attention,
    write_cache,
    write_kv_cache,
)
from ._interfaces import AbstractQKClippable
from ._kernels import attend, softmax_scale
from ._layers import RMSNorm, cast_arrays, init_weight, linear
from ._rope import apply_rope


def _positions_and_segments(seq: int, positions, segment_ids, segment_length: int | None):
    if segment_length is not None and (segment_length <= 0 or seq % segment_length):
        raise ValueError(
            f"segment_length={segment_length} does not divide the sequence length {seq}"
        )
    n, length = (1, seq) if segment_length is None else (seq // segment_length, segment_length)
    if positions is None:
        positions = jnp.tile(jnp.arange(length, dtype=jnp.int32), n)
    if segment_ids is None:
        segment_ids = jnp.repeat(jnp.arange(n, dtype=jnp.int32), length)
    return positions.astype(jnp.int32), segment_ids.astype(jnp.int32)


def _gather_seq(parallel: ParallelAxes | None, *arrays: Array) -> tuple[Array, ...]:
    """All-gather along the sequence (axis 0) over the context-parallel axis."""
    if parallel is None or parallel.seq is None:
        return arrays
    return tuple(jax.lax.all_gather(a, parallel.seq, axis=0, tiled=True) for a in arrays)


def _attend_and_project(
    c: MLAConfig | GQAConfig,
    q: Array,
    k: Array,
    v: Array,
    *,
    q_pos: Array,
    q_seg: Array,
    k_pos: Array,
    k_seg: Array,
    scale: float,
    wo: Array,
    parallel: ParallelAxes | None,
    segment_length: int | None,
) -> tuple[Array, Array]:
    """The kernel, then the output projection. Under tensor parallelism each
    device holds its heads' columns of `wo`, and the partial sums are added
    over the model axis. The projection accumulates in float32 and the sum runs
    in float32; the result is returned in the compute dtype (`v`'s).

    With `segment_length` the sequence is a packing of equal, independent
    segments, and the kernel runs on them as a batch (no work on the pairs the
    segment mask would empty)."""

    def kernel(q, k, v, q_pos, k_pos, q_seg, k_seg):
        return attend(
            q,
            k,
            v,
            q_pos=q_pos,
            k_pos=k_pos,
            q_seg=q_seg,
            k_seg=k_seg,
            causal=c.causal,
            scale=scale,
            kernel=c.kernel,
            block_size=c.block_size,
            max_logit=c.max_logit,
            implementation=c.implementation,
        )

    if segment_length is None:
        out, max_logits = kernel(q, k, v, q_pos, k_pos, q_seg, k_seg)
    else:
        if k.shape[0] != q.shape[0]:
            raise ValueError(
                "segment_length cannot be used with a sequence sharded over a mesh axis"
            )
        n = q.shape[0] // segment_length

        def split(x):
            return x.reshape(n, segment_length, *x.shape[1:])

        out, max_logits = jax.vmap(kernel)(*map(split, (q, k, v, q_pos, k_pos, q_seg, k_seg)))
        out, max_logits = out.reshape(q.shape[0], *out.shape[2:]), jnp.max(max_logits, axis=0)
    y = linear(out.reshape(out.shape[0], -1), wo, out_dtype=jnp.float32)
    if parallel is not None and parallel.model is not None:
        y = jax.lax.psum(y, parallel.model)
    return y.astype(v.dtype), max_logits


def _scale_rows(w: Array, factor: Float[Array, " heads"], rows: slice) -> Array:
    """`w[h, rows, :] *= factor[h]` in w's dtype (factor 1 leaves bits unchanged).

    `w` is ONE layer's per-head weight [heads, rows, in]: on a stacked one the
    indexing would hit the wrong axes silently, so that is an error (qk_clip
    gives a stacked module S with the same leading axes and vmaps over them)."""
    if w.ndim != 3 or factor.shape != (w.shape[0],):
        raise ValueError(
            f"scale_heads acts on one layer: got a weight of shape {w.shape} and factors of "
            f"shape {factor.shape}; for stacked (scanned) layers give max_logits the same "
            "leading layer axes, e.g. [layers, heads]"
        )
    f = factor.astype(w.dtype)[:, None, None]
    return w.at[:, rows, :].multiply(f)


def _check_max_len(max_len: object) -> None:
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len <= 0:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")


class AbstractAttention(AbstractQKClippable):
    """What [`qkclip_eqx.MLAttention`][] and [`qkclip_eqx.GQAttention`][]
    share: the config (`kernel`, `max_logit`, the mask), the call keywords and
    their handling (the compute-dtype cast, positions and segments, the kernel
    and the output projection), `n_heads` and `reports_lse_bound`. A concrete
    attention provides `_qkv`: its projections, RoPE and what context
    parallelism gathers."""

    config: eqx.AbstractVar[MLAConfig | GQAConfig]
    if TYPE_CHECKING:  # fields of each subclass; not declared here, which would move
        # them ahead of the subclass's own fields and change the checkpoints' leaf order
        wo: Float[Array, "dim heads_v"]
        compute_dtype: str | None

    @property
    def n_heads(self) -> int:
        """The number of query heads, `config.n_heads`."""
        return self.config.n_heads

    def reports_lse_bound(self) -> bool:
        """Whether S is the log-sum-exp bound (`config.max_logit == "lse_bound"`)."""
        return self.config.max_logit == "lse_bound"

    @abc.abstractmethod
    def _qkv(
        self, x: Array, positions: Array, segment_ids: Array, parallel: ParallelAxes | None
    ) -> tuple[Array, Array, Array, Array, Array | None, float]:
        """`(q, k, v, k_positions, k_segments, softmax_scale)` of `x` (already
        in the compute dtype)."""

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        *,
        positions: Int[Array, " seq"] | None = None,
        segment_ids: Int[Array, " seq"] | None = None,
        segment_length: int | None = None,
        parallel: ParallelAxes | None = None,
    ) -> tuple[Float[Array, "seq dim"], Float[Array, " heads"]]:
        """The attention over one sequence.

        **Arguments:**

        - `x`: the inputs, `[seq, dim]`.
        - `positions`: the RoPE positions; default `0..seq-1` (pass the global
          positions of a sequence shard).
        - `segment_ids`: mark packed sequences; a query attends only to keys of
          its own segment.
        - `segment_length`: says that `x` packs independent sequences of exactly
          that length (positions then restart at each), and lets the kernel
          batch them.
        - `parallel`: only inside `jax.shard_map`; the heads are then this
          device's shard of the heads.

        **Returns:**

        `(out, S)`: the outputs `[seq, dim]`, and S per head, the max of the
        logit entering the softmax (Kimi K2 report, sec. 2.1).

        **Raises:**

        `ValueError` when `segment_length` does not divide `seq`.
        """
        self, x = cast_arrays((self, x), self.compute_dtype)
        positions, segment_ids = _positions_and_segments(
            x.shape[0], positions, segment_ids, segment_length
        )
        q, k, v, k_pos, k_seg, scale = self._qkv(x, positions, segment_ids, parallel)
        return _attend_and_project(
            self.config,
            q,
            k,
            v,
            q_pos=positions,
            q_seg=segment_ids,
            k_pos=k_pos,
            k_seg=k_seg,
            scale=scale,
            wo=self.wo,
            parallel=parallel,
            segment_length=segment_length,
        )


def _mla_softmax_factor(c: MLAConfig) -> float:
    """What the softmax scale `1/sqrt(d_qk)` is multiplied by: 1, or YaRN's
    `mscale^2` (see [`qkclip_eqx.YaRN`][])."""
    return 1.0 if c.yarn is None else c.yarn.softmax_factor


class MLAttention(AbstractAttention):
    """Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434, sec. 2.1;
    DeepSeek-V3, arXiv 2412.19437), as Kimi K2 uses it.

    Weights (`(out..., in)` layout):

    - `wq_a` [q_lora_rank, dim], `q_norm`: optional low-rank query path;
    - `wq` [heads, nope + rope, q_in]: per-head rows `[:nope]` give q_C,
      `[nope:]` give q_R; `q_in` is `q_lora_rank` or `dim`;
    - `wkv_a` [kv_lora_rank + rope, dim]: the latent c_KV, then ONE RoPE key
      k_R shared by all heads; `kv_norm` on the latent;
    - `wkv_b` [heads, nope + v, kv_lora_rank]: rows `[:nope]` give k_C,
      `[nope:]` give v;
    - `wo` [dim, heads * v].

    Weights are stored in `dtype` (the float32 master copy QK-Clip scales);
    `__call__` casts them and `x` once to `compute_dtype` (None: no cast).
    With `config.yarn` the RoPE frequencies and the softmax scale are YaRN's;
    S is the logit entering the softmax, so QK-Clip stays exact.
    `decode` is the absorbed form over a latent cache (`init_cache`).
    """

    config: MLAConfig = eqx.field(static=True)
    wq_a: Float[Array, "q_lora dim"] | None
    q_norm: RMSNorm | None
    wq: Float[Array, "heads qk q_in"]
    wkv_a: Float[Array, "kv_lora_rope dim"]
    kv_norm: RMSNorm
    wkv_b: Float[Array, "heads nope_v kv_lora"]
    wo: Float[Array, "dim heads_v"]
    compute_dtype: str | None = eqx.field(static=True)

    def __init__(
        self, config: MLAConfig, *, dtype=jnp.float32, compute_dtype=None, key: PRNGKeyArray
    ):
        c = config
        kqa, kq, kkva, kkvb, ko = jax.random.split(key, 5)
        self.config = c
        if c.q_lora_rank is None:
            self.wq_a, self.q_norm, q_in = None, None, c.dim
        else:
            self.wq_a = init_weight(kqa, (c.q_lora_rank, c.dim), dtype)
            self.q_norm = RMSNorm(c.q_lora_rank, eps=c.norm_eps, dtype=dtype)
            q_in = c.q_lora_rank
        self.wq = init_weight(kq, (c.n_heads, c.qk_head_dim, q_in), dtype)
        self.wkv_a = init_weight(kkva, (c.kv_lora_rank + c.qk_rope_head_dim, c.dim), dtype)
        self.kv_norm = RMSNorm(c.kv_lora_rank, eps=c.norm_eps, dtype=dtype)
        self.wkv_b = init_weight(
            kkvb, (c.n_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank), dtype
        )
        self.wo = init_weight(ko, (c.dim, c.n_heads * c.v_head_dim), dtype)
        self.compute_dtype = None if compute_dtype is None else jnp.dtype(compute_dtype).name

    def _qkv(
        self, x: Array, positions: Array, segment_ids: Array, parallel: ParallelAxes | None
    ) -> tuple[Array, Array, Array, Array, Array | None, float]:
        """q, k, v `[t, heads, d]` (keys gathered over `parallel.seq`), the
        keys' positions and segments, and the softmax scale (YaRN's factor
        included). Context parallelism moves only the latent and the shared
        RoPE key."""
        c, heads = self.config, self.wq.shape[0]
        q_c, q_r, c_kv, k_r = self._project(x, positions)
        c_kv, k_r, k_pos, k_seg = _gather_seq(parallel, c_kv, k_r, positions, segment_ids)
        kv = linear(self.kv_norm(c_kv), self.wkv_b)
        k_c, v = kv[..., : c.qk_nope_head_dim], kv[..., c.qk_nope_head_dim :]
        q = jnp.concatenate([q_c, q_r], axis=-1)
        k = jnp.concatenate(
            [k_c, jnp.broadcast_to(k_r, (k_r.shape[0], heads, k_r.shape[-1]))], axis=-1
        )
        return q, k, v, k_pos, k_seg, softmax_scale(c.qk_head_dim) * _mla_softmax_factor(c)

    def _project(self, x: Array, positions: Array) -> tuple[Array, Array, Array, Array]:
        """The projections of `__call__` and `decode`: q_C `[t, heads, nope]`,
        the rotated q_R `[t, heads, rope]`, the latent c_KV `[t, kv_lora_rank]`
        (before `kv_norm`) and the rotated shared key k_R `[t, 1, rope]`."""
        c, nope = self.config, self.config.qk_nope_head_dim
        q_in = x
        if self.wq_a is not None and self.q_norm is not None:
            q_in = self.q_norm(linear(x, self.wq_a))
        q = linear(q_in, self.wq)
        kv_a = linear(x, self.wkv_a)
        rope: dict = dict(theta=c.rope_theta, layout=c.rope_layout, yarn=c.yarn)
        q_r = apply_rope(q[..., nope:], positions, **rope)
        k_r = apply_rope(kv_a[:, None, c.kv_lora_rank :], positions, **rope)
        return q[..., :nope], q_r, kv_a[:, : c.kv_lora_rank], k_r

    def head_axes(self):
        """`wq` and `wkv_b` [heads, rows, in] by head; `wo`'s head-major columns."""
        return (lambda m: (m.wq, m.wkv_b, m.wo)), (-3, -3, -1)

    def init_cache(self, max_len: int) -> MLACache:
        """An empty latent cache of `max_len` slots for `decode`, in the
        compute dtype (the weights' dtype when that is None).

        Raises `ValueError` when `max_len` is not a positive int.
        """
        _check_max_len(max_len)
        c = self.config
        dtype = self.wkv_a.dtype if self.compute_dtype is None else jnp.dtype(self.compute_dtype)
        return MLACache(
            jnp.zeros((max_len, c.kv_lora_rank), dtype),
            jnp.zeros((max_len, c.qk_rope_head_dim), dtype),
            jnp.zeros((), jnp.int32),
        )

    def decode(
        self, x: Float[Array, "t dim"], cache: MLACache
    ) -> tuple[Float[Array, "t dim"], Float[Array, " heads"], MLACache]:
        """Absorbed attention of `t` new tokens at positions
        `cache.length .. cache.length + t - 1` over the cache and themselves (causal).

        Only `kv_norm(c_KV)` and the rotated `k_R` are cached; `W_kv_b`'s k
        rows are absorbed into the query and its v rows into the output (see
        `_decode.py`). Equal to `__call__` on the whole sequence, at every
        new position, within float32 rounding. `t` is the prompt length for a
        prefill and 1 for a step.

        **Arguments:**

        - `x`: the new tokens' inputs.
        - `cache`: the cache holding the earlier tokens.

        **Returns:**

        `(out, S, cache)`: the new tokens' outputs, S per head (the max of the
        logit entering the softmax over the new queries), and the cache with
        the new tokens written.

        **Raises:**

        `ValueError` when the config is not causal.
        """
        c = self.config
        if not c.causal:
            raise ValueError("decode needs a causal MLAConfig (causal=True)")
        self, x = cast_arrays((self, x), self.compute_dtype)
        t, nope = x.shape[0], c.qk_nope_head_dim
        positions = cache.length + jnp.arange(t, dtype=jnp.int32)
        q_c, q_r, c_kv, k_r = self._project(x, positions)
        cache = write_cache(cache, self.kv_norm(c_kv), k_r[:, 0])
        scale = softmax_scale(c.qk_head_dim) * _mla_softmax_factor(c)
        out, max_logits = absorbed_attention(
            q_c,
            q_r,
            cache.c_kv,
            cache.k_r,
            positions,
            self.wkv_b[:, :nope],
            self.wkv_b[:, nope:],
            scale,
        )
        y = linear(out.reshape(t, -1), self.wo, out_dtype=jnp.float32)
        return y.astype(x.dtype), max_logits, cache

    def scale_heads(self, gamma: Float[Array, " heads"], alpha: float) -> "MLAttention":
        """q_C by gamma^alpha, k_C by gamma^(1-alpha), q_R by gamma; k_R untouched
        (it is shared by all heads). Kimi K2 report, sec. 2.1.

        **Arguments:**

        - `gamma`: one factor per head, `[heads]`.
        - `alpha`: the share of the factor given to the query side.

        **Returns:**

        A copy with `wq` and `wkv_b` scaled; every head-`h` logit is multiplied
        by `gamma[h]`.
        """
        nope = self.config.qk_nope_head_dim
        wq = _scale_rows(self.wq, gamma**alpha, slice(0, nope))
        wq = _scale_rows(wq, gamma, slice(nope, None))
        wkv_b = _scale_rows(self.wkv_b, gamma ** (1 - alpha), slice(0, nope))
        return eqx.tree_at(lambda m: (m.wq, m.wkv_b), self, (wq, wkv_b))

    def heads_scaled(self, gamma: Float[Array, " heads"]) -> Bool[Array, " heads"]:
        """The heads with `gamma < 1` (each head's logits are scaled alone)."""
        return gamma < 1


class GQAttention(AbstractAttention):
    """Grouped-query attention (Ainslie et al. 2023, arXiv 2305.13245) with RoPE.

    `wq` [heads, head_dim, dim], `wk`/`wv` [kv_heads, head_dim, dim],
    `wo` [dim, heads * head_dim]. Query head h reads key head `h // group`.
    Stored in `dtype`, computed in `compute_dtype` (as [`qkclip_eqx.MLAttention`][]).
    """

    config: GQAConfig = eqx.field(static=True)
    wq: Float[Array, "heads head_dim dim"]
    wk: Float[Array, "kv_heads head_dim dim"]
    wv: Float[Array, "kv_heads head_dim dim"]
    wo: Float[Array, "dim heads_head_dim"]
    compute_dtype: str | None = eqx.field(static=True)

    def __init__(
        self, config: GQAConfig, *, dtype=jnp.float32, compute_dtype=None, key: PRNGKeyArray
    ):
        c = config
        kq, kk, kv, ko = jax.random.split(key, 4)
        self.config = c
        self.wq = init_weight(kq, (c.n_heads, c.head_dim, c.dim), dtype)
        self.wk = init_weight(kk, (c.kv_heads, c.head_dim, c.dim), dtype)
        self.wv = init_weight(kv, (c.kv_heads, c.head_dim, c.dim), dtype)
        self.wo = init_weight(ko, (c.dim, c.n_heads * c.head_dim), dtype)
        self.compute_dtype = None if compute_dtype is None else jnp.dtype(compute_dtype).name

    def _qkv(
        self, x: Array, positions: Array, segment_ids: Array, parallel: ParallelAxes | None
    ) -> tuple[Array, Array, Array, Array, Array | None, float]:
        """As `MLAttention._qkv`: RoPE on q and k, k and v gathered over
        `parallel.seq`."""
        c = self.config
        rope: dict = dict(theta=c.rope_theta, layout=c.rope_layout)
        q = apply_rope(linear(x, self.wq), positions, **rope)
        k = apply_rope(linear(x, self.wk), positions, **rope)
        v = linear(x, self.wv)
        k, v, k_pos, k_seg = _gather_seq(parallel, k, v, positions, segment_ids)
        return q, k, v, k_pos, k_seg, softmax_scale(c.head_dim)

    def init_cache(self, max_len: int) -> KVCache:
        """An empty k/v cache of `max_len` slots for `decode`, `[max_len,
        kv_heads, head_dim]` each, in the compute dtype (the weights' dtype when
        that is None).

        Raises `ValueError` when `max_len` is not a positive int.
        """
        _check_max_len(max_len)
        dtype = self.wk.dtype if self.compute_dtype is None else jnp.dtype(self.compute_dtype)
        shape = (max_len, *self.wk.shape[-3:-1])  # [kv_heads, head_dim], also when stacked
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

    def decode(
        self, x: Float[Array, "t dim"], cache: KVCache
    ) -> tuple[Float[Array, "t dim"], Float[Array, " heads"], KVCache]:
        """Attention of `t` new tokens at positions `cache.length ..
        cache.length + t - 1` over the cache and themselves (causal).

        The rotated keys and the values are cached; equal to `__call__` on the
        whole sequence, at every new position, within float32 rounding. `t` is
        the prompt length for a prefill and 1 for a step.

        **Arguments:**

        - `x`: the new tokens' inputs.
        - `cache`: the cache holding the earlier tokens.

        **Returns:**

        `(out, S, cache)`: the new tokens' outputs, S per query head (the max
        of the logit entering the softmax over the new queries), and the cache
        with the new tokens written.

        **Raises:**

        `ValueError` when the config is not causal.
        """
        c = self.config
        if not c.causal:
            raise ValueError("decode needs a causal GQAConfig (causal=True)")
        self, x = cast_arrays((self, x), self.compute_dtype)
        t = x.shape[0]
        positions = cache.length + jnp.arange(t, dtype=jnp.int32)
        rope: dict = dict(theta=c.rope_theta, layout=c.rope_layout)
        q = apply_rope(linear(x, self.wq), positions, **rope)
        k = apply_rope(linear(x, self.wk), positions, **rope)
        cache = write_kv_cache(cache, k, linear(x, self.wv))
        out, max_logits = cached_attention(
            q, cache.k, cache.v, positions, softmax_scale(c.head_dim)
        )
        y = linear(out.reshape(t, -1), self.wo, out_dtype=jnp.float32)
        return y.astype(x.dtype), max_logits, cache

    def head_axes(self):
        """`wq` by query head, `wk`/`wv` by key head (query head `h` reads key
        head `h // group`, so contiguous shards stay paired); `wo`'s columns."""
        return (lambda m: (m.wq, m.wk, m.wv, m.wo)), (-3, -3, -3, -1)

    def scale_heads(self, gamma: Float[Array, " heads"], alpha: float) -> "GQAttention":
        """MHA (group of one): W_q^h by gamma^alpha, W_k^h by gamma^(1-alpha).

        Shared keys (group > 1), by `config.clip_mode`, with eta = the
        smallest gamma of a group (its largest S):

        - `"query"` (default): each query head by its own gamma_h, the shared
          key untouched, as K2 treats the shared k_R. Exact per head: a head
          below tau is never touched because a group-mate was clipped.
        - `"query_key"`: the shared key by eta^(1-alpha), each query head by
          gamma_h / eta^(1-alpha). Every head's logits are multiplied by exactly
          gamma_h, as in `"query"`, and the key takes the part of the
          shrinkage that alpha gives it, as in MHA (to which it reduces for a
          group of one). A group with no head over tau (eta = 1) is untouched,
          bit for bit; in a clipped group the heads below tau get the factors
          1/eta^(1-alpha) on q and eta^(1-alpha) on k, whose product is 1: their
          logits are unchanged up to float rounding.
        - `"group"` (Megatron-Core's experimental rule): its queries by
          eta^alpha, the shared key by eta^(1-alpha). Every head of the group is
          scaled by eta, so heads below tau are clipped too.

        **Arguments:**

        - `gamma`: one factor per query head, `[heads]`.
        - `alpha`: the share of the factor given to the query side.

        **Returns:**

        A copy with `wq` scaled, and `wk` too except in `"query"` mode with
        group > 1.
        """
        c = self.config
        group = c.group
        everything = slice(None)
        if group == 1:
            q_factor, k_factor = gamma**alpha, gamma ** (1 - alpha)
        elif c.clip_mode == "query":
            return eqx.tree_at(lambda m: m.wq, self, _scale_rows(self.wq, gamma, everything))
        else:
            eta = jnp.min(gamma.reshape(c.n_kv_heads, group), axis=1)
            k_factor = eta ** (1 - alpha)
            if c.clip_mode == "query_key":
                # eta = 1 gives k_factor = 1 exactly, so gamma / 1 = gamma: bit-exact no-op
                q_factor = gamma / jnp.repeat(k_factor, group)
            else:
                q_factor = jnp.repeat(eta**alpha, group)
        wq = _scale_rows(self.wq, q_factor, everything)
        wk = _scale_rows(self.wk, k_factor, everything)
        return eqx.tree_at(lambda m: (m.wq, m.wk), self, (wq, wk))

    def heads_scaled(self, gamma: Float[Array, " heads"]) -> Bool[Array, " heads"]:
        """The heads whose logits `scale_heads` scales: `gamma < 1`, and
        in `"group"` mode (group > 1) every head of a group in which one head
        has `gamma < 1`. In `"query_key"` mode only `gamma < 1`: the
        group-mates' q rows and shared key change by reciprocal factors, which
        leave their logits as they were."""
        c = self.config
        group = c.group
        if group == 1 or c.clip_mode != "group":
            return gamma < 1
        return jnp.repeat(jnp.any(gamma.reshape(c.n_kv_heads, group) < 1, axis=1), group)
