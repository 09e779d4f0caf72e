"""MuonClip's optimizer half: Muon for the hidden matrices, AdamW for the rest.

Kimi K2 report (arXiv 2507.20534), Algorithm 1, and Moonlight (arXiv 2502.16982):

    M_t = mu M_{t-1} + G_t
    O_t = NewtonSchulz5(M_t) * sqrt(max(n, m)) * 0.2     (update RMS matched to AdamW)
    W_t = W_{t-1} - eta (O_t + lambda W_{t-1})

The momentum and Newton-Schulz iteration are `optax.contrib.scale_by_muon`'s
(coefficients (3.4445, -4.7750, 2.0315), 5 steps), with two differences from
K2's formula that we keep on purpose:

- the momentum is an exponential average with bias correction,
  `M_t = mu M_{t-1} + (1 - mu) G_t` (divided by `1 - mu^t`), rather than the plain
  sum; after the Frobenius normalisation inside Newton-Schulz the scale drops
  out, so this alone changes only the first few steps;
- it is Nesterov momentum (`nesterov=True`, as Moonlight's and Keller Jordan's
  Muon): Newton-Schulz is applied to `mu M_t + (1 - mu) G_t`, not to `M_t`, so
  the direction differs from K2's at every step. It is the variant the Muon
  papers tune and report; pass `nesterov=False` for K2's plain momentum.

QK-Clip itself is weight surgery after the update and lives in `_clip.py`; the
train step (`_step.py`) composes the two.

Routing follows optax's Muon convention (`optax.contrib.muon`'s
`muon_weight_dimension_numbers`): a function of the params returning, for every
array leaf, a `MuonDimensionNumbers` (Muon, with that matrix layout) or `None`
(AdamW).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PyTree
from optax.contrib import MuonDimensionNumbers

DimensionNumbers = Callable[[PyTree], PyTree]


def matrix_dimension_numbers(params: PyTree, *, stacked_axes: int = 0) -> PyTree:
    """Muon for every leaf that is a matrix once its `stacked_axes` leading axes
    are set aside; `None` (AdamW) for the rest.

    The layout is `(out..., in)`: the last axis is the reduction (input) axis
    and every other non-stacked axis an output axis, so a per-head weight
    `[heads, head_dim, in]` is orthogonalised as ONE `(heads * head_dim, in)`
    matrix, as K2 and Moonlight treat W_q (a per-head orthogonalisation would
    give each head an update of full rank: a different optimizer). Stacked
    (scanned) layers are batch axes: each layer is orthogonalised on its own.

    An embedding table is a matrix too, and belongs to AdamW: route it yourself
    (see [`qkclip_eqx.Transformer.muon_dimension_numbers`][] for an example).

    **Arguments:**

    - `params`: the parameters (or any PyTree of arrays of their shapes).
    - `stacked_axes`: how many leading axes of every leaf stack layers.

    **Returns:**

    A PyTree of the structure of `params`: an `optax.contrib.MuonDimensionNumbers`
    or `None` per leaf, for `weight_dimension_numbers` of
    [`qkclip_eqx.muon_adamw`][].

    **Raises:**

    `ValueError` when `stacked_axes` is not an int >= 0.
    """
    if not (isinstance(stacked_axes, int) and stacked_axes >= 0):
        raise ValueError(f"stacked_axes must be an int >= 0, got {stacked_axes!r}")

    def dims(x):
        if x.ndim - stacked_axes < 2:
            return None
        return MuonDimensionNumbers(
            reduction_axis=x.ndim - 1, output_axis=tuple(range(stacked_axes, x.ndim - 1))
        )

    return jax.tree.map(dims, params)


def _default_dims(params: PyTree) -> PyTree:
    method = getattr(params, "muon_dimension_numbers", None)
    if method is None and not jax.tree.leaves(params):
        return params  # a tree with no leaves (optax.tree_map_params' placeholder)
    if method is None:
        raise TypeError(
            f"muon_adamw cannot tell which leaves of a {type(params).__name__} are hidden-layer "
            "matrices: pass weight_dimension_numbers=, a function of the params returning a "
            "MuonDimensionNumbers (Muon) or None (AdamW) per leaf, e.g. built with "
            "qkclip_eqx.matrix_dimension_numbers(params, stacked_axes=...) for a model "
            "whose layers are stacked along that many leading axes (embedding to AdamW); or "
            "give the model a muon_dimension_numbers() method"
        )
    return method()


def _scale_by_rms_match(dims_fn: DimensionNumbers, rms: float) -> optax.GradientTransformation:
    """Multiply each orthogonalised update by `rms * sqrt(max(fan_in, fan_out))`."""

    def scale(u, dims):
        fan_in = u.shape[dims.reduction_axis]
        fan_out = math.prod(u.shape[a] for a in dims.output_axis)
        return u * jnp.asarray(rms * math.sqrt(max(fan_in, fan_out)), u.dtype)

    def update(updates, state, params=None):
        del params
        return jax.tree.map(scale, updates, dims_fn(updates)), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def muon_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float | Float[Array, ""] = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    eps: float = 1e-8,
    rms: float = 0.2,
    weight_dimension_numbers: DimensionNumbers | None = None,
) -> optax.GradientTransformation:
    """Muon (RMS-matched, decoupled weight decay) for the hidden matrices, AdamW
    for the rest: the optimizer of MuonClip. It never clips; pair it with
    QK-Clip through [`qkclip_eqx.make_train_step`][].

    Both halves share `learning_rate` and `weight_decay`, as in K2. Apply it to
    `eqx.filter(model, eqx.is_array)`.

    **Arguments:**

    - `learning_rate`: a float or an optax schedule.
    - `weight_decay`: decoupled, multiplied by the learning rate. It may be
      traced, so that `optax.inject_hyperparams(muon_adamw, static_args=...)`
      can change it (and the learning rate) between steps without a recompile.
    - `momentum`, `nesterov`, `ns_steps`: Muon's momentum and Newton-Schulz steps.
    - `adam_b1`, `adam_b2`, `eps`: AdamW's.
    - `rms`: the update RMS Muon is matched to (0.2, Moonlight sec. 2.2).
    - `weight_dimension_numbers`: `params -> PyTree[MuonDimensionNumbers | None]`
      routing each leaf to Muon (with its matrix layout) or AdamW (`None`), as
      in `optax.contrib.muon`. Default: the params' own
      `muon_dimension_numbers()` ([`qkclip_eqx.Transformer`][] has one); any
      other model must pass it (see [`qkclip_eqx.matrix_dimension_numbers`][]).

    **Returns:**

    An `optax.GradientTransformation`.

    **Raises:**

    `ValueError` when `weight_decay < 0`; `TypeError` (at `init`) when
    `weight_dimension_numbers` is not given and the params have no
    `muon_dimension_numbers()`.
    """
    if not isinstance(weight_decay, jax.core.Tracer) and not weight_decay >= 0:  # pyright: ignore[reportAttributeAccessIssue]  # `import jax` imports jax.core
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    dims_fn = _default_dims if weight_dimension_numbers is None else weight_dimension_numbers

    def labels(params):
        # a leaf of params meets its whole subtree of dims: None or a MuonDimensionNumbers
        return jax.tree.map(lambda _, d: "adamw" if d is None else "muon", params, dims_fn(params))

    muon = optax.chain(
        optax.contrib.scale_by_muon(
            ns_steps=ns_steps,
            beta=momentum,
            eps=eps,
            nesterov=nesterov,
            weight_dimension_numbers=dims_fn,
        ),
        _scale_by_rms_match(dims_fn, rms),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
    adamw = optax.adamw(learning_rate, b1=adam_b1, b2=adam_b2, eps=eps, weight_decay=weight_decay)
    return optax.partition({"muon": muon, "adamw": adamw}, labels)


def warmup_cosine(
    peak: float, *, warmup_steps: int, total_steps: int, final_fraction: float = 0.1
) -> optax.Schedule:
    """Linear warmup from 0 to `peak`, then cosine decay to `final_fraction * peak`.

    **Arguments:**

    - `peak`: the learning rate after warmup.
    - `warmup_steps`: the length of the warmup.
    - `total_steps`: the step at which the decay ends.
    - `final_fraction`: the final learning rate, as a fraction of `peak`.

    **Returns:**

    An `optax.Schedule`.
    """
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup_steps, max(total_steps, warmup_steps + 1), peak * final_fraction
    )


def wsd(
    peak: float,
    *,
    warmup_steps: int,
    total_steps: int,
    decay_fraction: float = 0.2,
    final_fraction: float = 0.0,
) -> optax.Schedule:
    """Warmup-stable-decay: linear warmup, constant `peak`, then a linear
    decay over the last `decay_fraction` of training (K2 uses WSD).

    **Arguments:**

    - `peak`: the learning rate of the stable phase.
    - `warmup_steps`: the length of the linear warmup from 0.
    - `total_steps`: the step at which the decay ends.
    - `decay_fraction`: the share of `total_steps` spent decaying (at most the
      steps after warmup, at least 1).
    - `final_fraction`: the final learning rate, as a fraction of `peak`.

    **Returns:**

    An `optax.Schedule`.
    """
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
