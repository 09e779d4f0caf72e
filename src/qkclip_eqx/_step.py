"""The train step: loss and grads, optimizer update, then QK-Clip, in one jit.

Kimi K2 report (arXiv 2507.20534), Algorithm 1: S is taken from this step's
forward pass (it changes neither the forward nor the backward computation),
and the clip scales the *updated* weights. The optimizer state is not touched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int, PyTree

from ._clip import clip_factors, clipped_heads, qk_clip
from ._parallel import check_mesh, constrain_train_state, sharded_next_token_loss

Mode = Literal["clip", "monitor", "off"]
LossFn = Callable[[PyTree, Int[Array, "batch seq_plus_one"]], tuple[Float[Array, ""], PyTree]]


def next_token_loss(
    model: PyTree, tokens: Int[Array, "batch seq_plus_one"]
) -> tuple[Float[Array, ""], Float[Array, "layers heads"]]:
    """Mean next-token cross-entropy and S (max over the batch) per layer and head.

    ``tokens[:, :-1]`` are the inputs and ``tokens[:, 1:]`` the targets.
    """
    logits, max_logits = jax.vmap(model)(tokens[:, :-1])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return loss, jnp.max(max_logits, axis=0)


def _tree_max(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.maximum, a, b)


def _loss_grads_and_s(loss_fn: LossFn, params, static, tokens, accum_steps: int):
    """Gradient of the mean loss over ``accum_steps`` micro-batches; S combined
    by max (never by sum: a summed S would clip far too hard).

    Micro-batch ``j`` is rows ``j, j + accum_steps, j + 2 accum_steps, ...``:
    with the batch sharded over ``data`` in contiguous blocks, each device's
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
    init = (
        jnp.zeros(loss_shape.shape, loss_shape.dtype),
        jax.tree.map(jnp.zeros_like, params),
        jax.tree.map(lambda x: jnp.full(x.shape, -jnp.inf, x.dtype), s_shape),
    )

    def body(carry, j):
        loss, grads, s = carry
        (l, s_new), g = grad_fn(params, strided[:, j])
        return (loss + l, jax.tree.map(jnp.add, grads, g), _tree_max(s, s_new)), None

    (loss, grads, s), _ = jax.lax.scan(body, init, jnp.arange(accum_steps))
    scale = 1.0 / accum_steps
    return loss * scale, jax.tree.map(lambda g: g * scale, grads), s


def make_train_step(
    optimizer: optax.GradientTransformation,
    *,
    mode: Mode = "clip",
    tau: float = 100.0,
    alpha: float = 0.5,
    accum_steps: int = 1,
    loss_fn: LossFn = next_token_loss,
    mesh: Mesh | None = None,
) -> Callable:
    """Build ``step(model, opt_state, tokens) -> (model, opt_state, metrics)``.

    One ``eqx.filter_jit`` with the model and optimizer state donated. Modes:

    - ``"clip"``: QK-Clip at ``tau`` after every update (MuonClip).
    - ``"monitor"``: S is reported but the weights are never clipped.
    - ``"off"``: S is neither reduced nor reported (the speed baseline).

    ``tokens`` is ``[batch, seq + 1]``; with ``accum_steps > 1`` the batch is cut
    into that many micro-batches. ``metrics``: ``loss``, ``grad_norm``,
    ``max_logits`` (S per layer and head), ``max_logit`` (global max),
    ``heads_over_tau`` (the (layer, head) pairs with S > tau),
    ``heads_clipped`` (the pairs whose q/k weights the clip scaled: those over
    tau and, in GQA ``"group"`` mode, their group-mates; 0 unless mode is clip)
    and ``n_nonfinite`` (heads with non-finite S, never clipped).

    With a ``mesh`` (``qkclip_eqx.make_mesh``; the model and optimizer state
    placed by ``qkclip_eqx.shard_train_state``) the loss, gradients and S are
    computed inside one ``shard_map`` with S reduced by ``lax.pmax`` over
    ``data`` and ``seq`` (see ``_parallel.py``); the mesh must divide the heads,
    the micro-batch and the sequence, checked before compiling.
    """
    if mode not in ("clip", "monitor", "off"):
        raise ValueError(f"mode must be 'clip', 'monitor' or 'off', got {mode!r}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not (isinstance(accum_steps, int) and accum_steps >= 1):
        raise ValueError(f"accum_steps must be a positive int, got {accum_steps!r}")
    if mesh is not None:
        if loss_fn is not next_token_loss:
            raise ValueError("a custom loss_fn is not supported with a mesh")

        def loss_fn(model, tokens):
            params, static = eqx.partition(model, eqx.is_array)
            return sharded_next_token_loss(params, static, tokens, mesh)

    def keep_sharding(model, opt_state):
        """Pin the updated state to its specs, so that no later step recompiles."""
        if mesh is None:
            return model, opt_state
        return constrain_train_state(model, opt_state, optimizer, mesh)

    @eqx.filter_jit(donate="all-except-first")
    def step(tokens, model, opt_state):
        params, static = eqx.partition(model, eqx.is_array)
        loss, grads, s = _loss_grads_and_s(loss_fn, params, static, tokens, accum_steps)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        model = eqx.combine(optax.apply_updates(params, updates), static)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        if mode == "off":
            return *keep_sharding(model, opt_state), metrics
        if mode == "clip":
            scaled = sum(jnp.sum(x) for x in clipped_heads(model, s, tau))
            model = qk_clip(model, s, tau, alpha=alpha)
        else:
            scaled = jnp.zeros((), jnp.int32)
        model, opt_state = keep_sharding(model, opt_state)
        leaves = jax.tree.leaves(s)
        over = [jnp.sum(clip_factors(x, tau) < 1) for x in leaves]
        metrics.update(
            max_logits=s,
            max_logit=jnp.max(jnp.stack([jnp.max(x) for x in leaves])),
            heads_over_tau=sum(over),
            heads_clipped=scaled,
            n_nonfinite=sum(jnp.sum(~jnp.isfinite(x)) for x in leaves),
        )
        return model, opt_state, metrics

    def train_step(model: PyTree, opt_state: PyTree, tokens: Int[Array, "batch seq_plus_one"]):
        if tokens.shape[0] % accum_steps:
            raise ValueError(
                f"batch size {tokens.shape[0]} is not divisible by accum_steps={accum_steps}"
            )
        if mesh is not None:
            check_mesh(mesh, model, tokens.shape[0] // accum_steps, tokens.shape[1] - 1)
        return step(tokens, model, opt_state)

    return train_step
