"""MuonClip's optimizer half: Muon for the hidden matrices, AdamW for the rest.

Kimi K2 report (arXiv 2507.20534), Algorithm 1, and Moonlight (arXiv 2502.16982):

    M_t = mu M_{t-1} + G_t
    O_t = NewtonSchulz5(M_t) * sqrt(max(n, m)) * 0.2     (update RMS matched to AdamW)
    W_t = W_{t-1} - eta (O_t + lambda W_{t-1})

The momentum and Newton-Schulz iteration are ``optax.contrib.scale_by_muon``'s
(Nesterov, coefficients (3.4445, -4.7750, 2.0315), 5 steps). Its momentum is an
exponential average with bias correction rather than K2's plain sum; after the
Frobenius normalisation inside Newton-Schulz the two differ only by the bias
correction of the first few steps.

QK-Clip itself is weight surgery after the update and lives in ``_clip.py``;
the train step (``_step.py``) composes the two.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import PyTree
from optax.contrib import MuonDimensionNumbers

from ._model import Transformer


class _AdamW:
    """Marks a leaf routed to AdamW in a parameter spec."""

    def __repr__(self) -> str:
        return "ADAMW"


ADAMW = _AdamW()


def _is_spec(x) -> bool:
    return x is ADAMW or isinstance(x, MuonDimensionNumbers)


def _matrix(stacked: int) -> Callable:
    """Muon when the leaf, less its ``stacked`` leading axes, is a matrix.

    Layout is ``(out..., in)``: the last axis is the reduction (input) axis and
    every other non-stacked axis is an output axis, so a per-head weight
    [heads, head_dim, in] is orthogonalised as ONE (heads*head_dim, in) matrix,
    as K2 and Moonlight treat W_q (a per-head orthogonalisation would give each
    head an update of full rank, a different optimizer). Stacked (scanned)
    layers are batch axes: each layer is orthogonalised on its own.
    """

    def spec(x):
        if x.ndim - stacked < 2:
            return ADAMW
        return MuonDimensionNumbers(reduction_axis=x.ndim - 1, output_axis=tuple(range(stacked, x.ndim - 1)))

    return spec


def param_spec(params: PyTree) -> PyTree:
    """For every array leaf: a ``MuonDimensionNumbers`` (Muon) or ``ADAMW``.

    For a :class:`Transformer`: the matrices inside ``blocks`` go to Muon (the
    leading layer axis a batch axis); embedding, LM head and every norm gain
    to AdamW. For any other model: every leaf of rank >= 2 goes to Muon, in the
    ``(out..., in)`` layout; pass your own ``param_spec`` to ``muonclip``
    otherwise (an embedding must go to AdamW).
    """
    if isinstance(params, Transformer):
        top = jax.tree.map(lambda x: ADAMW, params)
        blocks = jax.tree.map(_matrix(1), params.blocks)
        return eqx.tree_at(lambda t: t.blocks, top, blocks)
    return jax.tree.map(_matrix(0), params)


def _scale_by_rms_match(
    spec_fn: Callable[[PyTree], PyTree], rms: float
) -> optax.GradientTransformation:
    """Multiply each orthogonalised update by ``rms * sqrt(max(fan_in, fan_out))``."""

    def scale(u, spec):
        fan_in = u.shape[spec.reduction_axis]
        fan_out = math.prod(u.shape[a] for a in spec.output_axis)
        return u * jnp.asarray(rms * math.sqrt(max(fan_in, fan_out)), u.dtype)

    def update(updates, state, params=None):
        del params
        return jax.tree.map(scale, updates, spec_fn(updates), is_leaf=_is_spec), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def muonclip(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    ns_steps: int = 5,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    eps: float = 1e-8,
    rms: float = 0.2,
    param_spec: Callable[[PyTree], PyTree] = param_spec,
) -> optax.GradientTransformation:
    """Muon (RMS-matched, decoupled weight decay) + AdamW, routed by ``param_spec``.

    Both halves share ``learning_rate`` and ``weight_decay``, as in K2. Apply it
    to ``eqx.filter(model, eqx.is_array)``. Pair it with QK-Clip through
    :func:`qkclip_eqx.make_train_step`.
    """
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    spec_fn = param_spec

    def labels(params):
        return jax.tree.map(lambda s: "adamw" if s is ADAMW else "muon", spec_fn(params), is_leaf=_is_spec)

    muon = optax.chain(
        optax.contrib.scale_by_muon(
            ns_steps=ns_steps, beta=momentum, eps=eps, nesterov=True,
            weight_dimension_numbers=spec_fn,
        ),
        _scale_by_rms_match(spec_fn, rms),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
    adamw = optax.adamw(learning_rate, b1=adam_b1, b2=adam_b2, eps=eps, weight_decay=weight_decay)
    return optax.partition({"muon": muon, "adamw": adamw}, labels)


def warmup_cosine(
    peak: float, *, warmup_steps: int, total_steps: int, final_fraction: float = 0.1
) -> optax.Schedule:
    """Linear warmup from 0 to ``peak``, then cosine decay to ``final_fraction * peak``."""
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup_steps, max(total_steps, warmup_steps + 1), peak * final_fraction
    )


def wsd(
    peak: float, *, warmup_steps: int, total_steps: int, decay_fraction: float = 0.2,
    final_fraction: float = 0.0,
) -> optax.Schedule:
    """Warmup-stable-decay: linear warmup, constant ``peak``, then a linear
    decay over the last ``decay_fraction`` of training (K2 uses WSD)."""
    # the decay ends at total_steps even when warmup + decay would not fit
    decay_steps = max(1, min(int(round(total_steps * decay_fraction)), total_steps - warmup_steps))
    stable_steps = max(0, total_steps - warmup_steps - decay_steps)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, peak, max(warmup_steps, 1)),
            optax.constant_schedule(peak),
            optax.linear_schedule(peak, peak * final_fraction, decay_steps),
        ],
        boundaries=[warmup_steps, warmup_steps + stable_steps],
    )
