"""The interfaces the library acts on, apart from any concrete module:
[`qkclip_eqx.AbstractQKClippable`][] (an attention QK-Clip can scale, and that
knows its head layout), [`qkclip_eqx.AbstractHeadwiseQKClippable`][] (the
same with the common per-head rule fixed), and
[`qkclip_eqx.AbstractPackedModel`][] (a language model that takes a batch
packed into one sequence). `_clip`, `_parallel` and `_step` import these, not
the attention modules."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._config import ParallelAxes


class AbstractQKClippable(eqx.Module):
    """An attention module QK-Clip can act on, and that knows its own head layout.

    Every member is abstract (equinox's abstract-or-final rule). To make your
    own attention clippable, subclass
    [`qkclip_eqx.AbstractHeadwiseQKClippable`][] (which fixes `heads_scaled`
    and `reports_lse_bound` for the common case) and provide:

    - `n_heads`: the number of query heads (the length of its `max_logits`);
    - [`scale_heads`][qkclip_eqx.AbstractQKClippable.scale_heads]: a copy whose head-`h` logits are all multiplied by
      exactly `gamma[h]` (`eqx.tree_at` on the q/k weights);
    - [`head_axes`][qkclip_eqx.AbstractQKClippable.head_axes]: which array leaves carry the head axis, and where.

    Subclass this class itself when your rule also scales heads with
    `gamma == 1` (then `heads_scaled` says which) or your module reports an
    upper bound of S (`reports_lse_bound`).

    [`qkclip_eqx.qk_clip`][] finds every such module in a model's tree;
    [`qkclip_eqx.partition_specs`][] shards the leaves named by `head_axes`
    over the mesh's `model` axis, and the mesh check requires that axis to
    divide `n_heads` and every such leaf's head axis. Nothing else about the
    module is assumed.
    """

    n_heads: eqx.AbstractVar[int]

    @abc.abstractmethod
    def scale_heads(self, gamma: Float[Array, " heads"], alpha: float) -> "AbstractQKClippable":
        """Return a copy with every logit of head `h` multiplied by `gamma[h]`.

        **Arguments:**

        - `gamma`: one factor per head; 1 for heads that are not clipped, and the
          module must then leave those heads' weights bit-identical.
        - `alpha`: the share of the factor given to the query side
          (`gamma^alpha` on q, `gamma^(1-alpha)` on k), where the module has a
          free choice.

        **Returns:**

        A module of the same type and structure, with the q/k weights scaled.
        """

    @abc.abstractmethod
    def head_axes(self) -> tuple[Callable[[Any], tuple[Array, ...]], tuple[int, ...]]:
        """The leaves that carry the head axis: `(where, axes)`.

        `where` selects array leaves as for `eqx.tree_at`, and `axes` gives for
        each the axis along which its heads lie, counted from the end (negative),
        so that stacked (scanned) layers may add leading axes. Along that axis
        the heads must be contiguous and in head order (a head-major
        `heads * head_dim` axis qualifies). Every other array leaf is shared by
        all heads and is replicated under tensor parallelism.
        """

    @abc.abstractmethod
    def heads_scaled(self, gamma: Float[Array, " heads"]) -> Bool[Array, " heads"]:
        """The heads whose logits [`scale_heads`][qkclip_eqx.AbstractQKClippable.scale_heads]
        scales for this `gamma`: those with `gamma < 1`, and any others the rule
        also scales (GQA's `"group"` mode scales a whole group)."""

    @abc.abstractmethod
    def reports_lse_bound(self) -> bool:
        """Whether `__call__` returns, instead of S, an upper bound on it (the
        log-sum-exp bound of `max_logit="lse_bound"`): the train step then names
        its S metrics `..._lse_bound`."""


class AbstractHeadwiseQKClippable(AbstractQKClippable):
    """An [`qkclip_eqx.AbstractQKClippable`][] whose clip scales each head by
    its own gamma only (the heads scaled are those with `gamma < 1`), and
    whose `__call__` returns S itself. Provide `n_heads`, `scale_heads` and
    `head_axes`."""

    def heads_scaled(self, gamma: Float[Array, " heads"]) -> Bool[Array, " heads"]:
        """The heads with `gamma < 1`."""
        return gamma < 1

    def reports_lse_bound(self) -> bool:
        """False: S itself."""
        return False


class AbstractPackedModel(eqx.Module):
    """A language model that takes a batch packed as ONE example:
    `model(tokens, positions=..., segment_length=seq)` on `batch * seq` tokens,
    attention staying within each `seq`-long segment, returning `(logits, S)`.
    [`qkclip_eqx.next_token_loss`][] packs the batch for such a model (every
    projection is then one flat matmul) and `jax.vmap`s any other."""

    @abc.abstractmethod
    def __call__(
        self,
        tokens: Int[Array, " seq"],
        *,
        positions: Int[Array, " seq"] | None = None,
        segment_ids: Int[Array, " seq"] | None = None,
        segment_length: int | None = None,
        parallel: ParallelAxes | None = None,
    ) -> tuple[Float[Array, "seq vocab"], PyTree[Float[Array, "..."]]]:
        """`(logits, S)` of one (packed) sequence."""
