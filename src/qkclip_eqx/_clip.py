"""QK-Clip (Kimi K2 report, arXiv 2507.20534, sec. 2.1, Algorithm 1).

For each head h with max logit S^h over a batch, after the optimizer update:

    gamma_h = tau / S^h   if S^h > tau,   else 1,

and the head's query/key weights are scaled so that every logit of head h is
multiplied by exactly gamma_h. Re-running the batch then gives
`min(S^h, tau)`. A head with S^h <= 0 or non-finite S^h gets gamma = 1: the
clip never writes NaN or inf into a model (`min(1, tau/S)` would, for S <= 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PyTree

from ._interfaces import AbstractQKClippable

# What a train step does with S: clip, only report it, or neither.
Mode = Literal["clip", "monitor", "off"]
MODES: tuple[str, ...] = get_args(Mode)


def clip_factors(
    max_logits: Float[Array, "*layers heads"], tau: float | Float[Array, ""]
) -> Float[Array, "*layers heads"]:
    """The per-head QK-Clip factors: gamma = tau / S where S > tau (and S
    finite), else exactly 1: `gamma_h = min(1, tau / S_max^h)` (Kimi K2 report,
    sec. 2.1).

    **Arguments:**

    - `max_logits`: S, the max attention logit per head, with any leading
      (layer) axes.
    - `tau`: the threshold.

    **Returns:**

    gamma in float32, with the shape of `max_logits`.
    """
    s = max_logits.astype(jnp.float32)
    over = jnp.isfinite(s) & (s > tau)
    return jnp.where(over, tau / jnp.where(over, s, 1.0), 1.0)


def is_clippable(x: object) -> bool:
    """Whether `x` is a QK-Clip target: the `is_leaf` that stops a tree walk there."""
    return isinstance(x, AbstractQKClippable)


def clippable_modules(model: PyTree) -> list[AbstractQKClippable]:
    """Every [`qkclip_eqx.AbstractQKClippable`][] in `model`, in tree-flattening order."""
    return [x for x in jax.tree.leaves(model, is_leaf=is_clippable) if is_clippable(x)]


def _scale(module: AbstractQKClippable, gamma: Array, alpha: float) -> AbstractQKClippable:
    """Apply per-head factors; leading axes of gamma are stacked (scanned) layers."""
    if gamma.ndim == 1:
        return module.scale_heads(gamma, alpha)
    return eqx.filter_vmap(lambda m, g: _scale(m, g, alpha))(module, gamma)


def _check_tau(tau) -> None:
    """Reject a concrete tau <= 0 (or NaN), whatever its type: Python number,
    NumPy scalar or concrete 0-d array. A traced tau (under jit) is not checked."""
    if isinstance(tau, jax.core.Tracer):  # pyright: ignore[reportAttributeAccessIssue]  # `import jax` imports jax.core
        return
    try:
        value = float(tau)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return
    if not value > 0:
        raise ValueError(f"tau must be > 0, got {tau}")


def check_tau_alpha(tau, alpha) -> None:
    """THE check of QK-Clip's two numbers: `tau > 0` and `0 <= alpha <= 1`."""
    _check_tau(tau)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def _stacked_layers(module: AbstractQKClippable) -> int | None:
    leaves = jax.tree.leaves(eqx.filter(module, eqx.is_array))
    return int(leaves[0].shape[0]) if leaves and leaves[0].ndim else None


def _split_layers(modules: list[AbstractQKClippable], s: Array) -> list[Array]:
    """One `[layers, heads]` S for several modules stacked over layers (a
    [`qkclip_eqx.Transformer`][] with MoE holds its dense and MoE layers in
    two stacks): split along the layers, in tree order, when the modules'
    layer counts add up to S's and the heads agree; else `[s]` unchanged, for
    the caller's error."""
    counts = [_stacked_layers(m) for m in modules]
    if (
        jnp.ndim(s) != 2
        or any(n is None for n in counts)
        or sum(n for n in counts if n is not None) != s.shape[0]
        or any(m.n_heads != s.shape[-1] for m in modules)
    ):
        return [s]
    bounds = [sum(n for n in counts[:i] if n is not None) for i in range(1, len(counts))]
    return jnp.split(s, bounds)


def modules_and_s(model: PyTree, max_logits, what: str) -> tuple[list, list]:
    """The clippable modules of `model` and their S arrays, paired and checked."""
    modules = clippable_modules(model)
    if not modules:
        raise ValueError(f"no AbstractQKClippable attention module found in {type(model).__name__}")
    s_list = [max_logits] if not isinstance(max_logits, Sequence) else list(max_logits)
    if len(s_list) == 1 and len(modules) > 1:
        s_list = _split_layers(modules, s_list[0])
    if len(s_list) != len(modules):
        raise ValueError(
            f"{what}: got {len(s_list)} max-logit arrays for {len(modules)} clippable modules"
        )
    for i, (m, s) in enumerate(zip(modules, s_list)):
        if s.shape[-1] != m.n_heads:
            raise ValueError(
                f"max_logits[{i}] has {s.shape[-1]} heads, module {type(m).__name__} has {m.n_heads}"
            )
        lead = tuple(s.shape[:-1])
        for leaf in jax.tree.leaves(eqx.filter(m, eqx.is_array)):
            if tuple(leaf.shape[: len(lead)]) != lead:
                raise ValueError(
                    f"max_logits[{i}] has leading (layer) axes {lead}, but {type(m).__name__} "
                    f"holds an array of shape {leaf.shape}: S needs one leading axis per "
                    "stacked layer axis of the module"
                )
    return modules, s_list


def qk_clip(
    model: PyTree,
    # Sequence items: sizes unchecked across items (modules may differ in heads/layers).
    max_logits: Float[Array, "*layers heads"] | Sequence[Float[Array, "*_layers _heads"]],
    tau: float | Float[Array, ""],
    *,
    alpha: float = 0.5,
) -> PyTree:
    """Return `model` with QK-Clip applied; pure and jit-safe.

    `model` is an attention module, a [`qkclip_eqx.Transformer`][], or any
    PyTree holding [`qkclip_eqx.AbstractQKClippable`][] modules. `max_logits` is one
    array per such module, in tree-flattening order (a single array when there
    is one). For a module whose array leaves are stacked along leading axes
    (the Transformer's scanned layers), its S carries the same leading axes,
    `[layers, heads]`, and every layer gets its own gamma.

    **Arguments:**

    - `model`: the PyTree to clip.
    - `max_logits`: S per head, one array per clippable module.
    - `tau`: the threshold; heads with S > tau get gamma = tau / S (see
      [`qkclip_eqx.clip_factors`][]).
    - `alpha`: the share of gamma given to the query side (`gamma^alpha` on q,
      `gamma^(1-alpha)` on k; 0.5 in the Kimi K2 report, sec. 2.1).

    **Returns:**

    `model`, with every clippable module replaced by its `scale_heads` copy.

    **Raises:**

    `ValueError` when `tau <= 0`, `alpha` is outside `[0, 1]`, `model` holds no
    clippable module, or `max_logits` does not match the modules in number,
    heads or leading axes.
    """
    check_tau_alpha(tau, alpha)
    modules, s_list = modules_and_s(model, max_logits, "qk_clip")
    return apply_clip_factors(model, modules, [clip_factors(s, tau) for s in s_list], alpha)


def apply_clip_factors(
    model: PyTree, modules: list[AbstractQKClippable], gammas: list[Array], alpha: float
) -> PyTree:
    """`model` with each of its clippable `modules` (in tree-flattening order,
    as [`clippable_modules`][qkclip_eqx.clippable_modules] lists them) scaled by
    its factors: the tree surgery of [`qkclip_eqx.qk_clip`][], for factors
    already computed (the train step computes gamma once and shares it with its
    metrics)."""
    clipped = [_scale(m, g, alpha) for m, g in zip(modules, gammas)]
    leaves, treedef = jax.tree.flatten(model, is_leaf=is_clippable)
    replacements = iter(clipped)
    leaves = [next(replacements) if is_clippable(x) else x for x in leaves]
    return jax.tree.unflatten(treedef, leaves)


def heads_scaled(module: AbstractQKClippable, gamma: Array) -> Array:
    """`module.heads_scaled(gamma)`; leading axes of gamma are stacked (scanned) layers."""
    if gamma.ndim == 1:
        return module.heads_scaled(gamma)
    return eqx.filter_vmap(heads_scaled)(module, gamma)


def clipped_heads(
    model: PyTree,
    max_logits: Float[Array, "*layers heads"] | Sequence[Float[Array, "*_layers _heads"]],
    tau: float | Float[Array, ""],
) -> list[Bool[Array, "*_layers _heads"]]:
    """Which heads [`qkclip_eqx.qk_clip`][] scales, per clippable module (same order and
    shapes as `max_logits`): the heads with S > tau, plus any other head
    whose module's rule scales it with them (GQA `"group"` mode scales every
    head of a group that has a head over tau; see
    [`qkclip_eqx.AbstractQKClippable.heads_scaled`][]).

    **Arguments:**

    - `model`: as for [`qkclip_eqx.qk_clip`][].
    - `max_logits`: as for [`qkclip_eqx.qk_clip`][].
    - `tau`: the threshold.

    **Returns:**

    One boolean array per clippable module, with the shape of its S.

    **Raises:**

    `ValueError` as [`qkclip_eqx.qk_clip`][] does (but for `alpha`).
    """
    _check_tau(tau)
    modules, s_list = modules_and_s(model, max_logits, "clipped_heads")
    return [heads_scaled(m, clip_factors(s, tau)) for m, s in zip(modules, s_list)]
