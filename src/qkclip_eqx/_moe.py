"""DeepSeek-V3 mixture-of-experts feed-forward layer (DeepSeek-V3 report,
arXiv 2412.19437, sec. 2.1.2), as Kimi K2 and Moonlight use it, and its
auxiliary-loss-free load balancing.

For a token with hidden state `u` (the layer's input, after the block's norm),
`N_r` routed experts with router rows `e_i` and correction biases `b_i`:

    s_i  = sigmoid(u . e_i)                                   (the affinity)
    g'_i = s_i   if s_i + b_i is among the K largest of the experts in the
                 `topk_group` best of `n_group` groups, else 0
    g_i  = g'_i / sum_j g'_j   (when norm_topk_prob)
    h    = sum_shared FFN_s(u) + routed_scaling_factor * sum_i g_i FFN_i(u)

A group's score is the sum of the two largest `s_i + b_i` in it, as in
DeepSeek-V3's and transformers' `DeepseekV3TopkRouter`. The bias `b` changes
which experts are chosen, never their weights; it is not trained by gradient
but moved after each step by `gamma * sign(mean load - load_i)`
([`qkclip_eqx.update_expert_bias`][]).

Dispatch is dropless: the `T * K` (token, expert) pairs are sorted by expert
and every expert's tokens go through one grouped matrix multiplication
(`jax.lax.ragged_dot_general`), so the work is that of the `K` chosen experts
per token, not of all `N_r`.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from ._config import MoEConfig, ParallelAxes
from ._layers import SwiGLU, cast_arrays, init_weight
from ._metric_schema import (
    BALANCE_LOSS,
    DROPPED_TOKENS,
    EXPERT_LOAD,
    EXPERT_LOAD_CV,
    EXPERT_LOAD_RATIO,
)

# x [m, in] by a weight [experts, out, in] stored (out, in) per expert: contract
# x's axis 1 with the weight's axis 2; the rows of x are ragged over the experts.
_RAGGED = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((1,), (2,)), ((), ())),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0],
)


class RouterStats(eqx.Module):
    """What a MoE layer's forward pass reports for balancing, per layer.

    - `load`: float32 `[experts]`, the tokens routed to each expert (counted
      over every token of the call).
    - `balance_loss`: the sequence-wise balance loss `sum_i f_i P_i`
      (DeepSeek-V3 report, eqs. 17-20), averaged over the sequences of the call.
    - `dropped`: the (token, expert) pairs routed but not computed, counted
      as `K * tokens - sum(load)`: 0, the dispatch being dropless.
    """

    load: Float[Array, "*layers experts"]
    balance_loss: Float[Array, "*layers"]
    dropped: Float[Array, "*layers"]


class Experts(eqx.Module):
    """`n` routed SwiGLU experts, their weights stacked on a leading expert axis
    (each expert's matrices stored `(out, in)`)."""

    w_gate: Float[Array, "experts hidden dim"]
    w_up: Float[Array, "experts hidden dim"]
    w_down: Float[Array, "experts dim hidden"]

    def __init__(self, n: int, dim: int, hidden: int, *, dtype=jnp.float32, key: PRNGKeyArray):
        k1, k2, k3 = jax.random.split(key, 3)
        self.w_gate = init_weight(k1, (n, hidden, dim), dtype)
        self.w_up = init_weight(k2, (n, hidden, dim), dtype)
        self.w_down = init_weight(k3, (n, dim, hidden), dtype)

    def __call__(
        self, x: Float[Array, "rows dim"], group_sizes: Int[Array, " experts"]
    ) -> Float[Array, "rows dim"]:
        """The experts on rows sorted by expert: expert `i` takes the
        `group_sizes[i]` rows after those of experts `0 .. i - 1`."""

        def mm(a, w):
            return jax.lax.ragged_dot_general(a, w, group_sizes, _RAGGED)

        return mm(jax.nn.silu(mm(x, self.w_gate)) * mm(x, self.w_up), self.w_down)


def route(
    logits: Float[Array, "seq experts"],
    bias: Float[Array, " experts"],
    config: MoEConfig,
) -> tuple[Int[Array, "seq k"], Float[Array, "seq k"], Float[Array, "seq experts"]]:
    """DeepSeek-V3's routing of each token (see the module docstring).

    **Arguments:**

    - `logits`: the router's logits `u . e_i`, float32.
    - `bias`: the correction bias (selection only; no gradient flows to it).
    - `config`: the layer's config.

    **Returns:**

    `(experts, weights, scores)`: the `K` chosen experts per token, their
    weights `g_i` (times `routed_scaling_factor`), and the sigmoid scores of
    every expert.
    """
    c = config
    scores = jax.nn.sigmoid(logits)
    choice = scores + jax.lax.stop_gradient(bias)
    if c.n_group > 1:
        t, e = choice.shape
        grouped = choice.reshape(t, c.n_group, e // c.n_group)
        group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [seq, n_group]
        best = jax.lax.top_k(group_scores, c.topk_group)[1]
        keep = jnp.any(jax.nn.one_hot(best, c.n_group, dtype=jnp.bool_), axis=1)
        keep = jnp.repeat(keep, e // c.n_group, axis=-1)
        choice = jnp.where(keep, choice, -jnp.inf)
    experts = jax.lax.top_k(jax.lax.stop_gradient(choice), c.num_experts_per_tok)[1]
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if c.norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return experts, weights * c.routed_scaling_factor, scores


def sequence_balance_loss(
    experts: Int[Array, "seq k"], scores: Float[Array, "seq experts"], n_experts: int
) -> Float[Array, ""]:
    """`sum_i f_i P_i` over one sequence of `T` tokens (DeepSeek-V3 report,
    eqs. 17-20): `f_i = N_r / (K T) * #{t : i chosen for t}` and
    `P_i = 1/T sum_t s_{i,t} / sum_j s_{j,t}`. `f` carries no gradient; 1
    when the load and the normalised scores are both uniform."""
    t, k = experts.shape
    counts = jnp.sum(jax.nn.one_hot(experts, n_experts, dtype=jnp.float32), axis=(0, 1))
    f = jax.lax.stop_gradient(counts * n_experts / (k * t))
    p = jnp.mean(scores / jnp.sum(scores, axis=-1, keepdims=True), axis=0)
    return jnp.sum(f * p)


class MoE(eqx.Module):
    """A DeepSeek-V3 mixture-of-experts feed-forward layer (see the module
    docstring for the routing maths): shared experts (one SwiGLU, or none),
    routed [`Experts`][qkclip_eqx.Experts], the router `router` `[experts, dim]`
    and the correction bias `expert_bias` `[experts]`.

    The router and the bias are float32 whatever `compute_dtype` (the routing
    decision is made in float32, as in transformers); the experts compute in
    `compute_dtype`. `expert_bias` is not a trained parameter: no gradient
    reaches it, and the train step keeps the optimizer's update off it (see
    [`qkclip_eqx.update_expert_bias`][]).
    """

    config: MoEConfig = eqx.field(static=True)
    router: Float[Array, "experts dim"]
    expert_bias: Float[Array, " experts"]
    experts: Experts
    shared: SwiGLU | None
    compute_dtype: str | None = eqx.field(static=True)

    def __init__(
        self,
        config: MoEConfig,
        dim: int,
        *,
        dtype=jnp.float32,
        compute_dtype=None,
        key: PRNGKeyArray,
    ):
        kr, ke, ks = jax.random.split(key, 3)
        c = config
        self.config = c
        self.router = init_weight(kr, (c.n_routed_experts, dim), dtype)
        self.expert_bias = jnp.zeros((c.n_routed_experts,), dtype)
        self.experts = Experts(
            c.n_routed_experts, dim, c.moe_intermediate_size, dtype=dtype, key=ke
        )
        self.shared = (
            SwiGLU(
                dim,
                c.n_shared_experts * c.moe_intermediate_size,
                dtype=dtype,
                compute_dtype=compute_dtype,
                key=ks,
            )
            if c.n_shared_experts
            else None
        )
        self.compute_dtype = None if compute_dtype is None else jnp.dtype(compute_dtype).name

    def model_axes(self) -> tuple:
        """`(where, axes)`, as [`qkclip_eqx.AbstractQKClippable.head_axes`][]:
        the routed experts' weights and their expert axis, which
        [`qkclip_eqx.partition_specs`][] shards over the mesh's `model` axis
        (expert parallelism)."""
        return (
            lambda m: (m.experts.w_gate, m.experts.w_up, m.experts.w_down),
            (-3, -3, -3),
        )

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        *,
        segment_length: int | None = None,
        parallel: ParallelAxes | None = None,
    ) -> tuple[Float[Array, "seq dim"], RouterStats]:
        """The layer on one sequence (or `seq / segment_length` packed ones).

        **Arguments:**

        - `x`: the normed residual stream.
        - `segment_length`: `x` packs sequences of this length; the balance
          loss is per sequence (the routing is per token either way).
        - `parallel`: inside `jax.shard_map`, with the experts sharded over
          `parallel.model` ([`qkclip_eqx.partition_specs`][]): every device
          routes all its tokens (they are the same across `model`), runs the
          rows of its own experts, and the routed outputs are summed over
          `model` (expert parallelism without an all-to-all, the tokens being
          replicated over that axis as for tensor-parallel attention).

        **Returns:**

        `(y, stats)`: the layer's output in the compute dtype, and its
        [`qkclip_eqx.RouterStats`][].
        """
        c = self.config
        t, k, n = x.shape[0], c.num_experts_per_tok, c.n_routed_experts
        logits = jnp.matmul(
            x.astype(jnp.float32), self.router.astype(jnp.float32).T, precision="highest"
        )
        experts, weights, scores = route(logits, self.expert_bias.astype(jnp.float32), c)
        xc, routed = cast_arrays((x, self.experts), self.compute_dtype)
        flat = experts.reshape(-1)  # pair j = (token j // k, its (j % k)-th expert)
        order = jnp.argsort(flat, stable=True)
        group_sizes = jnp.bincount(flat, length=n).astype(jnp.int32)
        rows = xc[order // k]  # [t * k, dim], sorted by expert
        local = routed.w_gate.shape[0]
        if local == n:
            y = routed(rows, group_sizes)
        else:  # this device holds experts first .. first + local - 1: their rows only
            if parallel is None or parallel.model is None:
                raise ValueError(
                    f"this MoE holds {local} of its {n} experts (sharded over a mesh's model "
                    "axis): call it inside jax.shard_map with parallel=ParallelAxes(model=...)"
                )
            first = jax.lax.axis_index(parallel.model) * local
            start = (jnp.cumsum(group_sizes) - group_sizes)[first]
            mine = jax.lax.dynamic_slice(group_sizes, (first,), (local,))
            # rows past this device's experts come back as zeros
            y = jnp.roll(routed(jnp.roll(rows, -start, axis=0), mine), start, axis=0)
        y = y[jnp.argsort(order)].reshape(t, k, -1)  # back in (token, choice) order
        out = jnp.einsum("tkd,tk->td", y, weights.astype(y.dtype))
        if local != n:
            out = jax.lax.psum(out, parallel.model)  # pyright: ignore[reportOptionalMemberAccess]  # checked above
        if self.shared is not None:
            out = out + self.shared(x)
        segment = t if segment_length is None else segment_length
        balance = jax.vmap(lambda e, s: sequence_balance_loss(e, s, n))(
            experts.reshape(-1, segment, k), scores.reshape(-1, segment, n)
        )
        load = group_sizes.astype(jnp.float32)
        stats = RouterStats(
            load=load, balance_loss=jnp.mean(balance), dropped=t * k - jnp.sum(load)
        )
        return out.astype(xc.dtype), stats


def expert_load_metrics(stats: RouterStats) -> dict[str, Array]:
    """The per-step load metrics of a model's MoE layers, from the tokens each
    expert got in each layer (the [`qkclip_eqx.RouterStats`][] of a step,
    `load` `[layers, experts]` summed over its batch):

    - `expert_load_ratio`: the worst layer's max/min load ratio (1 is
      perfectly balanced; inf when an expert got no token);
    - `expert_load_cv`: the mean over layers of the load's coefficient of
      variation (std / mean);
    - `expert_load`: the load itself; `balance_loss`: the sequence-wise
      balance loss summed over the layers;
    - `dropped_tokens`: routed (token, expert) pairs not computed: 0, the
      dispatch being dropless (counted, not assumed: `K * tokens - sum(load)`
      per layer, summed).
    """
    load = stats.load
    ratio = jnp.max(jnp.max(load, axis=-1) / jnp.min(load, axis=-1))
    mean = jnp.mean(load, axis=-1)
    cv = jnp.mean(jnp.std(load, axis=-1) / mean)
    return {
        EXPERT_LOAD.key: load,
        EXPERT_LOAD_RATIO.key: ratio,
        EXPERT_LOAD_CV.key: cv,
        DROPPED_TOKENS.key: jnp.sum(stats.dropped).astype(jnp.int32),
        BALANCE_LOSS.key: jnp.sum(stats.balance_loss),
    }


def _moe_modules(model: PyTree) -> list["MoE"]:
    return [x for x in jax.tree.leaves(model, is_leaf=_is_moe) if _is_moe(x)]


def _replace_moe_modules(model: PyTree, new: list["MoE"]) -> PyTree:
    it = iter(new)
    leaves, treedef = jax.tree.flatten(model, is_leaf=_is_moe)
    return jax.tree.unflatten(treedef, [next(it) if _is_moe(x) else x for x in leaves])


def update_expert_bias(
    model: PyTree,
    load: Float[Array, "*layers experts"] | list[Float[Array, "*layers experts"]],
    rate: float | Float[Array, ""] | None = None,
) -> PyTree:
    """DeepSeek-V3's auxiliary-loss-free balancing (report, arXiv 2412.19437,
    sec. 2.1.2): `b_i <- b_i + gamma * sign(mean_j load_j - load_i)` in every
    [`qkclip_eqx.MoE`][] of `model` (an overloaded expert's bias goes down, an
    underloaded one's up; an expert at the mean load keeps its bias). Pure
    `model -> model`, outside the gradient; the train step applies it after
    the optimizer update.

    **Arguments:**

    - `model`: a PyTree holding `MoE` modules (possibly stacked over layers).
    - `load`: one `load` array per `MoE` module, in tree order (a single
      array for one module), with the module's leading (layer) axes.
    - `rate`: gamma; None: each module's `config.bias_update_rate`.

    **Returns:**

    `model` with the biases moved.

    **Raises:**

    `ValueError` when the loads do not match the modules in number or shape.
    """
    modules = _moe_modules(model)
    loads = list(load) if isinstance(load, (list, tuple)) else [load]
    if len(loads) != len(modules):
        raise ValueError(f"got {len(loads)} load arrays for {len(modules)} MoE modules")

    def moved(m: MoE, n: Array) -> MoE:
        if jnp.shape(n) != m.expert_bias.shape:
            raise ValueError(
                f"load of shape {jnp.shape(n)} for an MoE whose expert_bias is "
                f"{m.expert_bias.shape}"
            )
        gamma = m.config.bias_update_rate if rate is None else rate
        n = n.astype(jnp.float32)
        step = gamma * jnp.sign(jnp.mean(n, axis=-1, keepdims=True) - n)
        return eqx.tree_at(
            lambda x: x.expert_bias, m, m.expert_bias + step.astype(m.expert_bias.dtype)
        )

    return _replace_moe_modules(model, [moved(m, n) for m, n in zip(modules, loads)])


def freeze_expert_bias(updates: PyTree) -> PyTree:
    """`updates` (an optimizer's, in the model's structure) with every
    [`qkclip_eqx.MoE`][]'s `expert_bias` update set to zero: the bias is moved
    only by [`qkclip_eqx.update_expert_bias`][], never by the optimizer (whose
    decoupled weight decay would otherwise shrink it)."""
    return _replace_moe_modules(
        updates,
        [
            m
            if m.expert_bias is None
            else eqx.tree_at(lambda x: x.expert_bias, m, jnp.zeros_like(m.expert_bias))
            for m in _moe_modules(updates)
        ],
    )


def _is_moe(x: object) -> bool:
    return isinstance(x, MoE)
