"""`equinox.nn.MultiheadAttention`, clippable: the same weights and call, plus S.

The wrapper computes what `eqx.nn.MultiheadAttention.__call__` computes, op
for op (the projections, `q / sqrt(d_qk)`, the masked logits, the softmax in at
least float32, dropout, the output projection), and takes S, the max per head of
the logit entering the softmax over the allowed (unmasked) pairs, from the
same logits (Kimi K2 report, arXiv 2507.20534, sec. 2.1): no second q.k pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ._config import ParallelAxes
from ._interfaces import AbstractHeadwiseQKClippable

_Mask = Bool[Array, "q_seq kv_seq"] | Bool[Array, "num_heads q_seq kv_seq"]
_ProcessHeads = Callable[[Array, Array, Array], tuple[Array, Array, Array]]


def _scale_head_rows(w: Array, factor: Float[Array, " heads"]) -> Array:
    """Rows of head `h` (a head-major `[heads * size, ...]` weight or
    `[heads * size]` bias of ONE layer) times `factor[h]`, in w's dtype."""
    if w.ndim not in (1, 2) or factor.ndim != 1 or w.shape[0] % factor.shape[0]:
        raise ValueError(
            f"scale_heads acts on one layer: got a projection of shape {w.shape} and factors "
            f"of shape {factor.shape}; for stacked (scanned) layers give max_logits the same "
            "leading layer axes, e.g. [layers, heads]"
        )
    heads = factor.shape[0]
    f = factor.astype(w.dtype).reshape(heads, *(1,) * w.ndim)
    return (w.reshape(heads, -1, *w.shape[1:]) * f).reshape(w.shape)


class ClippableMultiheadAttention(AbstractHeadwiseQKClippable):
    """A clippable `equinox.nn.MultiheadAttention`: `__call__` returns
    `(output, S)`, with `output` that of the wrapped module and S per head.

    The wrapped module is the field `mha`, kept as it is: its weights are the
    ones trained and clipped, and `.mha` is the plain module back (a model
    holding the wrapper serialises to the same leaves, in the same order, as
    one holding the plain module, so `eqx.tree_serialise_leaves` checkpoints
    load into either). [`qkclip_eqx.qk_clip`][] scales the query and key
    projections of each head (weights and biases, so that the head's logits
    are multiplied by exactly gamma_h, Kimi K2 report, sec. 2.1), and
    [`qkclip_eqx.partition_specs`][] shards the heads over a mesh's `model`
    axis. QK-Clip is exact when `process_heads` is linear in q and k (RoPE
    is); a nonlinear one (a norm of q or k) makes the clip approximate.
    """

    mha: eqx.nn.MultiheadAttention

    def __init__(self, mha: eqx.nn.MultiheadAttention):
        """**Arguments:**

        - `mha`: the module to wrap, with its weights as they are.

        **Raises:**

        `TypeError` when `mha` is not an `equinox.nn.MultiheadAttention`.
        """
        if not isinstance(mha, eqx.nn.MultiheadAttention):
            raise TypeError(
                f"ClippableMultiheadAttention wraps an equinox.nn.MultiheadAttention, got "
                f"{type(mha).__name__}"
            )
        self.mha = mha

    @property
    def n_heads(self) -> int:
        """The number of heads, `mha.num_heads`."""
        return self.mha.num_heads

    def __call__(
        self,
        query: Float[Array, "q_seq q_size"],
        key_: Float[Array, "kv_seq k_size"],
        value: Float[Array, "kv_seq v_size"],
        mask: _Mask | None = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
        process_heads: _ProcessHeads | None = None,
        parallel: ParallelAxes | None = None,
    ) -> tuple[Float[Array, "q_seq o_size"], Float[Array, " heads"]]:
        """`mha(query, key_, value, mask, key=, inference=, process_heads=)`, and S.

        **Arguments:**

        As `equinox.nn.MultiheadAttention.__call__`, and:

        - `parallel`: only inside `jax.shard_map` (see
          [`qkclip_eqx.shard_loss`][]): the projections are then this device's
          shard of the heads, and the output projection's partial sums are
          added over `parallel.model` before its bias.

        **Returns:**

        `(output, S)`: the module's output `[q_seq, output_size]`, and S per
        head (of this device's heads under `parallel`), the max of the logit
        `q.k / sqrt(qk_size)` over the pairs the mask allows (`-inf` for a
        head whose mask allows none), in float32 and without gradient.

        **Raises:**

        `ValueError` when key and value differ in length, the mask's shape is
        not `[q_seq, kv_seq]` or `[num_heads, q_seq, kv_seq]`, `process_heads`
        changes a shape, or the sequence is split over a mesh axis (the mask
        is the caller's, so a sequence shard cannot be handled here).
        """
        m = self.mha
        if key_.shape[0] != value.shape[0]:
            raise ValueError("key and value must both be sequences of equal length.")
        if mask is not None and mask.shape[-2:] != (query.shape[0], key_.shape[0]):
            raise ValueError(
                f"mask must have shape (query_seq_length, kv_seq_length)=({query.shape[0]}, "
                f"{key_.shape[0]}), optionally after a leading num_heads axis. Got {mask.shape}."
            )
        model_axis = None if parallel is None else parallel.model
        if parallel is not None and parallel.seq is not None:
            if jax.lax.axis_size(parallel.seq) > 1:
                raise ValueError(
                    "ClippableMultiheadAttention cannot run with the sequence split over the "
                    "mesh's seq axis (the mask is the caller's): use a mesh with seq=1"
                )

        def project(lin: eqx.nn.Linear, x: Array, size: int) -> Array:
            # as eqx's _project, with the head count read from the (local) weight
            return jax.vmap(lin)(x).reshape(x.shape[0], -1, size)

        q = project(m.query_proj, query, m.qk_size)
        k = project(m.key_proj, key_, m.qk_size)
        v = project(m.value_proj, value, m.vo_size)
        if process_heads is not None:
            shapes = (q.shape, k.shape, v.shape)
            q, k, v = process_heads(q, k, v)
            if (q.shape, k.shape, v.shape) != shapes:
                raise ValueError("process_heads must not change the shape of the heads.")
        heads = q.shape[1]
        if mask is not None and mask.ndim == 3 and model_axis is not None and mask.shape[0] > heads:
            start = jax.lax.axis_index(model_axis) * heads
            mask = jax.lax.dynamic_slice_in_dim(mask, start, heads, axis=0)

        def one_head(q, k, v, mask, key):
            # eqx.nn._attention.dot_product_attention, keeping the logits' max
            q = q / math.sqrt(q.shape[-1])
            logits = jnp.einsum("sd,Sd->sS", q, k)
            if mask is None:
                s = jnp.max(logits)
            else:
                s = jnp.max(jnp.where(mask, logits, -jnp.inf))
                logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
            with jax.numpy_dtype_promotion("standard"):
                dtype = jnp.result_type(logits.dtype, jnp.float32)
            weights = jax.nn.softmax(logits.astype(dtype)).astype(logits.dtype)
            weights = m.dropout(weights, key=key, inference=inference)
            out = jnp.einsum("sS,Sd->sd", weights, v)
            return out, jax.lax.stop_gradient(s.astype(jnp.float32))

        keys = None if key is None else jax.random.split(key, heads)
        mask_axis = None if mask is None or mask.ndim == 2 else 0
        out, s = jax.vmap(one_head, in_axes=(1, 1, 1, mask_axis, 0 if key else None))(
            q, k, v, mask, keys
        )
        out = jnp.moveaxis(out, 0, 1).reshape(query.shape[0], -1)
        y = jax.vmap(lambda a: m.output_proj.weight @ a)(out)
        if model_axis is not None:
            y = jax.lax.psum(y, model_axis)  # this device's heads' columns of W_o
        if m.output_proj.bias is not None:
            y = y + m.output_proj.bias
        return y, s

    def head_axes(self):
        """Rows of the q, k, v projections (weights and biases; head-major) by
        head; the output projection's columns. Its bias is shared."""
        names = ["query_proj", "key_proj", "value_proj"]
        biased = [n for n in names if getattr(self.mha, n).bias is not None]

        def where(m):
            mha = m.mha
            return (
                *(getattr(mha, n).weight for n in names),
                mha.output_proj.weight,
                *(getattr(mha, n).bias for n in biased),
            )

        return where, (-2, -2, -2, -1, *(-1,) * len(biased))

    def scale_heads(
        self, gamma: Float[Array, " heads"], alpha: float
    ) -> "ClippableMultiheadAttention":
        """Head `h`'s query rows (weight and bias) by `gamma[h]^alpha`, its key
        rows by `gamma[h]^(1-alpha)`: every logit of head `h` is multiplied by
        `gamma[h]` (Kimi K2 report, sec. 2.1).

        **Arguments:**

        - `gamma`: one factor per head, `[heads]`.
        - `alpha`: the share of the factor given to the query side.

        **Returns:**

        A copy with the query and key projections scaled.
        """
        m = self.mha
        new, where = [], []
        for name, factor in (("query_proj", gamma**alpha), ("key_proj", gamma ** (1 - alpha))):
            lin = getattr(m, name)
            new.append(_scale_head_rows(lin.weight, factor))
            where.append(lambda c, name=name: getattr(c.mha, name).weight)
            if lin.bias is not None:
                new.append(_scale_head_rows(lin.bias, factor))
                where.append(lambda c, name=name: getattr(c.mha, name).bias)
        return eqx.tree_at(lambda c: tuple(w(c) for w in where), self, tuple(new))
