"""The train step: loss and grads, optimizer update, then QK-Clip, in one jit.

Kimi K2 report (arXiv 2507.20534), Algorithm 1: S is taken from this step's
forward pass (it changes neither the forward nor the backward computation),
and the clip scales the *updated* weights. The optimizer state is not touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, use_abstract_mesh
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._clip import (
    MODES,
    Mode,
    apply_clip_factors,
    check_tau_alpha,
    clip_factors,
    heads_scaled,
    modules_and_s,
)
from ._config import ParallelAxes
from ._interfaces import AbstractPackedModel
from ._metric_schema import (
    CLIP_ACTIVE,
    FIRST_NONFINITE,
    GRAD_NORM,
    HEADS_CLIPPED,
    HEADS_OVER_TAU,
    LOSS,
    N_NONFINITE,
    NONFINITE,  # noqa: F401  # re-exported: what first_nonfinite indexes
    s_key,
    s_max_key,
)
from ._model import Transformer
from ._moe import RouterStats, expert_load_metrics, freeze_expert_bias, update_expert_bias
from ._parallel import (
    check_mesh,
    check_mesh_loss_fn,
    constrain_train_state,
    partition_specs,
    reduce_max_logits,
    shard_loss,
)

LossFn = Callable[[PyTree, Int[Array, "batch seq_plus_one"]], tuple[Float[Array, ""], PyTree]]


def next_token_loss(
    model: PyTree,
    tokens: Int[Array, "batch seq_plus_one"],
    *,
    parallel: ParallelAxes | None = None,
) -> tuple[Float[Array, ""], PyTree[Float[Array, "..."]]]:
    """Mean next-token cross-entropy, and S (max over the batch) per layer and head.

    `tokens[:, :-1]` are the inputs and `tokens[:, 1:]` the targets; `model` maps
    one example's tokens to `(logits, S)`. An
    [`qkclip_eqx.AbstractPackedModel`][] (as [`qkclip_eqx.Transformer`][] is) is
    given the batch as ONE packed example of `batch * seq` tokens, so that every projection is one
    flat matmul (on XLA:CPU a vmapped weight gradient, contracting over batch
    and sequence, is much slower); attention still runs per sequence. Any other
    model is `jax.vmap`-ed over the batch.

    **Arguments:**

    - `model`: e.g. a [`qkclip_eqx.Transformer`][].
    - `tokens`: `[batch, seq + 1]`.
    - `parallel`: only inside `jax.shard_map` (see [`qkclip_eqx.shard_loss`][]):
      `tokens` are then this device's rows and its sequence shard (plus the next
      token); the model is called with global `positions` and `parallel`, the
      loss is summed over `parallel.data`, `parallel.fsdp` and `parallel.seq`,
      S is reduced by `lax.pmax` over them and gathered over `parallel.model`.

    A [`qkclip_eqx.Transformer`][] with mixture-of-experts layers
    (`config.moe`) is run through its `forward`: the loss then adds
    `moe.seq_balance_weight` times the sequence-wise balance loss summed over
    the MoE layers (DeepSeek-V3 report, arXiv 2412.19437, eq. 17), and the
    second result is `(S, stats)`, the [`qkclip_eqx.RouterStats`][] of the
    batch (the load summed over it, across `parallel.data` and `parallel.seq`
    too; the balance loss averaged, per sequence shard under `parallel.seq`)
    for the train step's bias update and metrics. On a mesh the experts are
    replicated: every device of a `parallel.model` group runs them all.

    **Returns:**

    `(loss, S)`; S has the model's structure, `[layers, heads]` for a
    Transformer; `(loss, (S, stats))` for a mixture-of-experts Transformer.
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    batch, t = inputs.shape
    kw: dict[str, Any] = {} if parallel is None else {"parallel": parallel}
    seq_axis = None if parallel is None else parallel.seq
    seq_shards = 1 if seq_axis is None else jax.lax.axis_size(seq_axis)
    offset = 0 if seq_axis is None or seq_shards == 1 else jax.lax.axis_index(seq_axis) * t
    positions = offset + jnp.arange(t, dtype=jnp.int32)
    moe = model.config.moe if isinstance(model, Transformer) else None
    # a mixture-of-experts Transformer's forward also returns its router statistics
    call: Callable[..., Any] = model.forward if isinstance(model, Transformer) and moe else model
    if moe is not None and seq_shards > 1:
        raise NotImplementedError(
            f"a mixture-of-experts model (config.moe) on a mesh with a seq axis of {seq_shards}: "
            "not supported (the sequence-sharded path vmaps the model over the batch, and "
            "jax.lax.ragged_dot, the experts' grouped matmul, has no batching rule); use seq=1"
        )
    out: Any
    if seq_shards == 1 and isinstance(model, AbstractPackedModel):
        out = call(inputs.reshape(-1), positions=jnp.tile(positions, batch), segment_length=t, **kw)
        logits = out[0].reshape(batch, t, -1)
    else:
        if parallel is None:
            out = jax.vmap(call)(inputs)
        else:
            out = jax.vmap(lambda x: call(x, positions=positions, **kw))(inputs)
        logits = out[0]
        out = (
            out[0],
            jax.tree.map(lambda x: jnp.max(x, axis=0), out[1]),
            *([] if moe is None else [_sum_router_stats(out[2], axis=0)]),
        )
    s = out[1]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    if parallel is None:
        if moe is None:
            return ce.mean(), s
        stats = out[2]
        return ce.mean() + moe.seq_balance_weight * jnp.sum(stats.balance_loss), (s, stats)
    over = parallel.batch_axes()
    loss = jax.lax.psum(jnp.sum(ce), over) / jax.lax.psum(ce.size, over)
    s = reduce_max_logits(s, parallel)
    if moe is None:
        return loss, s
    # every device of a `model` group routes the same tokens (experts replicated)
    stats = out[2]
    stats = RouterStats(
        load=jax.lax.psum(stats.load, over),
        balance_loss=jax.lax.pmean(stats.balance_loss, over),
        dropped=jax.lax.psum(stats.dropped, over),
    )
    return loss + moe.seq_balance_weight * jnp.sum(stats.balance_loss), (s, stats)


def _sum_router_stats(stats: RouterStats, axis: int) -> RouterStats:
    """Router statistics of several calls as one: loads and drops summed,
    the balance loss averaged."""
    return RouterStats(
        load=jnp.sum(stats.load, axis=axis),
        balance_loss=jnp.mean(stats.balance_loss, axis=axis),
        dropped=jnp.sum(stats.dropped, axis=axis),
    )


def split_aux(aux: PyTree) -> tuple[PyTree, RouterStats | None]:
    """A loss function's second result: S, or `(S, RouterStats)`."""
    if isinstance(aux, tuple) and len(aux) == 2 and isinstance(aux[1], RouterStats):
        return aux
    return aux, None


def _tree_max(a: PyTree, b: PyTree) -> PyTree:
    """Two micro-batches' aux combined: S by max, router statistics summed
    (the balance loss is averaged by the caller's final scale)."""
    (sa, ra), (sb, rb) = split_aux(a), split_aux(b)
    s = jax.tree.map(jnp.maximum, sa, sb)
    if ra is None or rb is None:
        return s
    return s, jax.tree.map(jnp.add, ra, rb)


def _loss_grads_and_s(loss_fn: LossFn, params, static, tokens, accum_steps: int):
    """Gradient of the mean loss over `accum_steps` micro-batches; S combined
    by max (never by sum: a summed S would clip far too hard).

    Micro-batch `j` is rows `j, j + accum_steps, j + 2 accum_steps, ...`:
    with the batch sharded over `data` in contiguous blocks, each device's
    share of every micro-batch is among its own rows, so the split moves no
    data. Every micro-batch, the first included, is traced once, in the scan.
    """

    def micro(p, t):
        return loss_fn(eqx.combine(p, static), t)

    grad_fn = jax.value_and_grad(micro, has_aux=True)
    if accum_steps == 1:
        (loss, s), grads = grad_fn(params, tokens)
        return loss, grads, s
    strided = tokens.reshape(-1, accum_steps, *tokens.shape[1:])  # [batch / accum, accum, ...]
    (loss_shape, s_shape), _ = jax.eval_shape(grad_fn, params, strided[:, 0])
    s_part, router_part = split_aux(s_shape)
    s_init = jax.tree.map(lambda x: jnp.full(x.shape, -jnp.inf, x.dtype), s_part)
    if router_part is not None:
        s_init = (s_init, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), router_part))
    init = (
        jnp.zeros(loss_shape.shape, loss_shape.dtype),
        jax.tree.map(jnp.zeros_like, params),
        s_init,
    )

    def body(carry, j):
        loss, grads, s = carry
        (l, s_new), g = grad_fn(params, strided[:, j])
        return (loss + l, jax.tree.map(jnp.add, grads, g), _tree_max(s, s_new)), None

    (loss, grads, s), _ = jax.lax.scan(body, init, jnp.arange(accum_steps))
    scale = 1.0 / accum_steps
    s_part, router = split_aux(s)
    if router is not None:  # the loads stay summed; the balance loss is a mean
        s = (s_part, eqx.tree_at(lambda r: r.balance_loss, router, router.balance_loss * scale))
    return loss * scale, jax.tree.map(lambda g: g * scale, grads), s


def _first_nonfinite(loss: Array, grad_norm: Array, model: PyTree) -> Int[Array, ""]:
    """0 if the step is finite, else 1 + the index in `NONFINITE` of the first
    quantity that is not: the loss, the gradient norm, the updated parameters."""
    params = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    params_ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in params]))
    oks = jnp.stack([jnp.isfinite(loss), jnp.isfinite(grad_norm), params_ok])
    return jnp.where(jnp.all(oks), 0, 1 + jnp.argmin(oks))


def _clip_and_report(
    model: PyTree,
    s: PyTree,
    *,
    tau: float,
    alpha: float,
    clip: bool,
    active: Bool[Array, ""] | None,
) -> tuple[PyTree, dict[str, Array]]:
    """QK-Clip on the updated model (when `clip`), and the S metrics.

    gamma = min(1, tau / S) per head is computed once and serves both: the heads
    over tau are those with gamma < 1, and the clip scales by gamma. With
    `active` False (after `clip_until`) every gamma is exactly 1, a bit-exact
    no-op, and the clip is reported inactive.
    """
    modules, s_list = modules_and_s(model, s, "the train step")
    gammas = [clip_factors(x, tau) for x in s_list]
    bound = any(m.reports_lse_bound() for m in modules)
    metrics = {  # the keys say when the values bound S rather than are S
        s_key(bound): s,
        s_max_key(bound): jnp.max(jnp.stack([jnp.max(x) for x in s_list])),
        HEADS_OVER_TAU.key: sum(jnp.sum(g < 1) for g in gammas),
        HEADS_CLIPPED.key: jnp.zeros((), jnp.int32),
        N_NONFINITE.key: sum(jnp.sum(~jnp.isfinite(x)) for x in s_list),
    }
    if not clip:
        return model, metrics
    if active is not None:
        gammas = [jnp.where(active, g, 1.0) for g in gammas]
        metrics[CLIP_ACTIVE.key] = active.astype(jnp.int32)
    metrics[HEADS_CLIPPED.key] = sum(jnp.sum(heads_scaled(m, g)) for m, g in zip(modules, gammas))
    return apply_clip_factors(model, modules, gammas, alpha), metrics


def make_train_step(
    optimizer: optax.GradientTransformation,
    *,
    mode: Mode = "clip",
    tau: float = 100.0,
    alpha: float = 0.5,
    accum_steps: int = 1,
    loss_fn: LossFn = next_token_loss,
    mesh: Mesh | None = None,
    clip_until: int | None = None,
) -> Callable:
    """Build `step(model, opt_state, tokens, step=None) -> (model, opt_state, metrics)`.

    One `eqx.filter_jit` with the model and optimizer state donated.
    `tokens` is `[batch, seq + 1]`.

    **Arguments:**

    - `optimizer`: e.g. [`qkclip_eqx.muon_adamw`][].
    - `mode`: one of
        - `"clip"`: QK-Clip at `tau` after every update (MuonClip).
        - `"monitor"`: S is reported but the weights are never clipped.
        - `"off"`: S is neither reduced nor reported (the speed baseline).
    - `tau`, `alpha`: QK-Clip's threshold and query share (see
      [`qkclip_eqx.qk_clip`][]).
    - `accum_steps`: with `accum_steps > 1` the batch is cut into that many
      micro-batches.
    - `loss_fn`: `loss_fn(model, tokens) -> (loss, S)`, as
      [`qkclip_eqx.next_token_loss`][] (the default).
    - `mesh`: with a mesh ([`qkclip_eqx.make_mesh`][]; the model and optimizer
      state placed by [`qkclip_eqx.shard_train_state`][]) the loss, gradients
      and S are computed inside one `shard_map` with S reduced by `lax.pmax`
      over `data` and `seq` (see [`qkclip_eqx.shard_loss`][]); the mesh must
      divide the heads, the micro-batch and the sequence, checked before
      compiling.
    - `clip_until` (clip mode only): the clip acts on the updates of steps
      `0 .. clip_until - 1` and not after; S is still computed and reported.
      In K2 the max logit decays below tau after about 30% of training, and
      the clip then no longer acts (Kimi K2 report, arXiv 2507.20534, sec.
      2.1). The step index is then required: pass `step=i`, the index of the
      update being taken (the train loop's step, restored from the checkpoint
      on resume); it is traced, so changing it does not recompile. `metrics`
      then also holds `clip_active` (1 or 0).

    **Returns:**

    The `step` function (`step.lower(model, opt_state, tokens)` lowers it
    without running it; `.compile().compiled` is the `jax.stages.Compiled`,
    with `.as_text()` and `.memory_analysis()`). Its `metrics` (declared in
    `_metric_schema.py`): `loss`, `grad_norm`, `max_logits` (S per layer and
    head), `max_logit` (global max), `heads_over_tau` (the (layer, head) pairs
    with S > tau), `heads_clipped` (the pairs whose
    logits the clip scaled: those over tau and, in GQA `"group"` mode, their
    group-mates; 0 unless mode is clip), `n_nonfinite` (heads with
    non-finite S, never clipped) and, in every mode, `first_nonfinite`: 0
    when the step is finite, else the first quantity that is not: 1 the loss,
    2 the gradient norm, 3 an updated parameter. When the model's attention
    reports the log-sum-exp bound instead of S (`max_logit="lse_bound"`), the two S
    metrics are named `max_logits_lse_bound` and `max_logit_lse_bound`, and
    the clip acts on the bound (it then clips at least as hard as on S).

    With a mixture-of-experts model (a loss whose second result is
    `(S, RouterStats)`, as [`qkclip_eqx.next_token_loss`][] gives for a
    Transformer with `config.moe`), the step also moves every MoE layer's
    correction bias by its `bias_update_rate` towards balance
    ([`qkclip_eqx.update_expert_bias`][]; the optimizer's update of the bias
    is dropped), and `metrics` holds `expert_load` (tokens per expert,
    `[moe layers, experts]`), `expert_load_ratio`, `expert_load_cv`,
    `dropped_tokens` (see [`qkclip_eqx.expert_load_metrics`][]) and
    `balance_loss` (the sequence-wise balance loss, summed over layers).

    **Raises:**

    `ValueError` when `mode` is unknown, `tau <= 0`, `alpha` is outside
    `[0, 1]`, `accum_steps` is not a positive int, or `clip_until` is not a
    non-negative int or is given outside clip mode; `TypeError` when a `mesh`
    is given and `loss_fn` takes no `parallel` keyword.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be 'clip', 'monitor' or 'off', got {mode!r}")
    check_tau_alpha(tau, alpha)
    if not (isinstance(accum_steps, int) and accum_steps >= 1):
        raise ValueError(f"accum_steps must be a positive int, got {accum_steps!r}")
    if clip_until is not None:
        if not (
            isinstance(clip_until, int) and not isinstance(clip_until, bool) and clip_until >= 0
        ):
            raise ValueError(f"clip_until must be a non-negative int or None, got {clip_until!r}")
        if mode != "clip":
            raise ValueError(f"clip_until={clip_until} needs mode='clip', got mode={mode!r}")
    if mesh is not None:
        check_mesh_loss_fn(loss_fn)

    @eqx.filter_jit(donate="all-except-first")
    def step(not_donated, model, opt_state):
        tokens, step_index = not_donated
        params, static = eqx.partition(model, eqx.is_array)
        specs = None if mesh is None else partition_specs(model)  # once per trace
        loss_of = loss_fn if mesh is None else shard_loss(loss_fn, mesh, specs)
        loss, grads, aux = _loss_grads_and_s(loss_of, params, static, tokens, accum_steps)
        s, router = split_aux(aux)
        # under the mesh, so that Muon can place its Newton-Schulz step (see muon_adamw)
        with contextlib.nullcontext() if mesh is None else use_abstract_mesh(mesh.abstract_mesh):
            updates, opt_state = optimizer.update(grads, opt_state, params)
        # the MoE correction bias is no trained parameter: no optimizer update
        # (weight decay included) reaches it
        updates = freeze_expert_bias(updates)
        model = eqx.combine(optax.apply_updates(params, updates), static)
        metrics = {LOSS.key: loss, GRAD_NORM.key: optax.tree.norm(grads)}
        if router is not None:  # auxiliary-loss-free balancing, outside the gradient
            model = update_expert_bias(model, router.load)
            metrics.update(expert_load_metrics(router))
        if mode != "off":
            active = None if clip_until is None else step_index < clip_until
            model, s_metrics = _clip_and_report(
                model, s, tau=tau, alpha=alpha, clip=mode == "clip", active=active
            )
            metrics.update(s_metrics)
        metrics[FIRST_NONFINITE.key] = _first_nonfinite(loss, metrics[GRAD_NORM.key], model)
        if mesh is not None and specs is not None:  # pin the state: no later step recompiles
            model, opt_state = constrain_train_state(model, opt_state, optimizer, mesh, specs)
        return model, opt_state, metrics

    jitted_step = step  # train_step's argument `step` is the step index

    def arguments(model, opt_state, tokens, step):
        if clip_until is not None and step is None:
            raise ValueError(
                f"clip_until={clip_until}: pass the index of this step, train_step(..., step=i)"
            )
        if tokens.shape[0] % accum_steps:
            raise ValueError(
                f"batch size {tokens.shape[0]} is not divisible by accum_steps={accum_steps}"
            )
        if mesh is not None:
            check_mesh(mesh, model, tokens.shape[0] // accum_steps, tokens.shape[1] - 1)
        step_index = None if clip_until is None else jnp.asarray(step, jnp.int32)
        return (tokens, step_index), model, opt_state

    def train_step(
        model: PyTree,
        opt_state: PyTree,
        tokens: Int[Array, "batch seq_plus_one"],
        step: int | np.integer | Int[Array, ""] | None = None,
    ):
        return jitted_step(*arguments(model, opt_state, tokens, step))

    # the compiled program, for its HLO and memory_analysis(): `step.lower(...).compile()`
    train_step.lower = lambda model, opt_state, tokens, step=None: jitted_step.lower(  # pyright: ignore[reportFunctionMemberAccess]
        *arguments(model, opt_state, tokens, step)
    )
    return train_step
