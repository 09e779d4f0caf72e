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
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, PyTree
from optax.contrib import MuonDimensionNumbers

# optax's Newton-Schulz itself (its public `scale_by_muon` offers no hook around
# it); pinned to optax < 0.3 in pyproject.toml
from optax.contrib._muon import orthogonalize_via_newton_schulz

DimensionNumbers = Callable[[PyTree], PyTree]
NS_SHARDINGS = ("owner", "gather")
OWNER_AXES = ("fsdp", "model")  # the mesh axes parameters are split over


def matrix_dimension_numbers(
    params: PyTree, *, stacked_axes: int = 0, exclude: Callable[[PyTree], Any] | None = None
) -> PyTree:
    """Muon for every leaf that is a matrix once its `stacked_axes` leading axes
    are set aside; `None` (AdamW) for the rest and for what `exclude` selects.

    The layout is `(out..., in)`: the last axis is the reduction (input) axis
    and every other non-stacked axis an output axis, so a per-head weight
    `[heads, head_dim, in]` is orthogonalised as ONE `(heads * head_dim, in)`
    matrix, as K2 and Moonlight treat W_q (a per-head orthogonalisation would
    give each head an update of full rank: a different optimizer). Stacked
    (scanned) layers are batch axes: each layer is orthogonalised on its own.

    An embedding table or an LM head is a matrix too, and belongs to AdamW
    (Moonlight, arXiv 2502.16982, sec. 2.2): name it in `exclude`. The routing of
    a model of your own is then one call, which [`qkclip_eqx.muon_adamw`][]
    makes on whatever params it is given (optax hands it masked copies):

    ```
    opt = qc.muon_adamw(1e-3, weight_dimension_numbers=lambda p: qc.matrix_dimension_numbers(
        p, exclude=lambda m: (m.embedding, m.head)))
    ```

    **Arguments:**

    - `params`: the parameters (or any PyTree of arrays of their shapes, or a
      masked copy of them).
    - `stacked_axes`: how many leading axes of every leaf stack layers.
    - `exclude`: a function of `params` selecting leaves or whole subtrees (as
      `where` of `eqx.tree_at`) that go to AdamW whatever their shape.

    **Returns:**

    A PyTree of the structure of `params`: an `optax.contrib.MuonDimensionNumbers`
    or `None` per leaf, for `weight_dimension_numbers` of
    [`qkclip_eqx.muon_adamw`][].

    **Raises:**

    `ValueError` when `stacked_axes` is not an int >= 0, or `exclude` selects
    something that is not part of `params`.
    """
    if not (isinstance(stacked_axes, int) and stacked_axes >= 0):
        raise ValueError(f"stacked_axes must be an int >= 0, got {stacked_axes!r}")

    def dims(x):
        if x is _EXCLUDED or x.ndim - stacked_axes < 2:
            return None
        return MuonDimensionNumbers(
            reduction_axis=x.ndim - 1, output_axis=tuple(range(stacked_axes, x.ndim - 1))
        )

    # a tree with no leaves (optax.tree_map_params' placeholder) has nothing to exclude
    if exclude is not None and jax.tree.leaves(params):
        try:
            params = eqx.tree_at(
                exclude, params, replace_fn=lambda x: jax.tree.map(lambda _: _EXCLUDED, x)
            )
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(
                f"exclude= must select leaves or subtrees of the params (as `where` of "
                f"eqx.tree_at, e.g. `lambda m: (m.embedding, m.head)`); it failed on a "
                f"{type(params).__name__}: {e}"
            ) from e
    return jax.tree.map(dims, params)


class _Excluded:
    """The mark `exclude=` leaves on a leaf routed to AdamW."""

    def __repr__(self) -> str:
        return "<excluded>"


_EXCLUDED = _Excluded()


def _is_dims_leaf(x) -> bool:
    return x is None or isinstance(x, (MuonDimensionNumbers, optax.MaskedNode))


def _routing_error(path: str, problem: str) -> ValueError:
    return ValueError(
        f"weight_dimension_numbers: at {path or 'the root'}, {problem}. It must be a function "
        "of the params it is given, returning for each array leaf a MuonDimensionNumbers "
        "(Muon) or None (AdamW), in the params' own structure; optax calls it on masked copies "
        "too (the AdamW leaves replaced by optax.MaskedNode), so build the tree inside the "
        "function from its argument, e.g. `weight_dimension_numbers=lambda p: "
        "qc.matrix_dimension_numbers(p, exclude=lambda m: (m.embedding, m.head))`, never "
        "once outside it"
    )


def _check_routing(params: PyTree, dims: PyTree) -> None:
    """Raise, naming the leaf, where `dims` is not a routing of `params`."""
    p_flat = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
    )[0]
    d_flat = jax.tree_util.tree_flatten_with_path(dims, is_leaf=_is_dims_leaf)[0]
    d_by_path = {jax.tree_util.keystr(p): d for p, d in d_flat}
    p_paths = [jax.tree_util.keystr(p) for p, _ in p_flat]
    for path, (_, leaf) in zip(p_paths, p_flat):
        if path not in d_by_path:
            raise _routing_error(
                path, f"the params hold {_describe(leaf)} but the routing has nothing"
            )
        d = d_by_path[path]
        if isinstance(leaf, optax.MaskedNode):
            if not isinstance(d, optax.MaskedNode):
                raise _routing_error(
                    path, f"the params are masked (optax.MaskedNode) but the routing has {d!r}"
                )
        elif not (d is None or isinstance(d, MuonDimensionNumbers)):
            raise _routing_error(path, f"{_describe(leaf)} is routed by {d!r}")
        elif isinstance(d, MuonDimensionNumbers):
            axes = [
                a
                for group in (d.reduction_axis, d.output_axis)
                for a in ((group,) if isinstance(group, int) else tuple(group))
            ]
            ndim = jnp.ndim(leaf)
            inside = all(isinstance(a, int) and -ndim <= a < ndim for a in axes)
            if not inside or len({a % ndim for a in axes}) != len(axes):
                raise _routing_error(path, f"{d!r} does not fit {_describe(leaf)}")
    # a None where the params hold no leaf (a filtered-out field) is no entry
    extra = [path for path, d in d_by_path.items() if d is not None and path not in set(p_paths)]
    if extra:
        raise _routing_error(extra[0], "the routing has an entry the params do not hold")


def _describe(leaf) -> str:
    if isinstance(leaf, optax.MaskedNode):
        return "a masked placeholder (optax.MaskedNode)"
    return f"an array of shape {tuple(jnp.shape(leaf))}"


def _checked(dims_fn: DimensionNumbers) -> DimensionNumbers:
    """`dims_fn`, with its result checked against the params before optax sees it."""

    def fn(params):
        dims = dims_fn(params)
        if jax.tree.leaves(params):  # not optax.tree_map_params' leafless placeholder
            _check_routing(params, dims)
        return dims

    return fn


def _default_dims(params: PyTree) -> PyTree:
    method = getattr(params, "muon_dimension_numbers", None)
    if method is None and not jax.tree.leaves(params):
        return params  # a tree with no leaves (optax.tree_map_params' placeholder)
    if method is None:
        raise TypeError(
            f"muon_adamw cannot tell which leaves of a {type(params).__name__} are hidden-layer "
            "matrices: pass weight_dimension_numbers=, a function of the params returning a "
            "MuonDimensionNumbers (Muon) or None (AdamW) per leaf, e.g. "
            "`lambda p: qkclip_eqx.matrix_dimension_numbers(p, exclude=lambda m: (m.embedding, "
            "m.head))` (stacked_axes=... for a model whose layers are stacked along that many "
            "leading axes); or give the model a muon_dimension_numbers() method"
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


def _to_matrices(x: Array, d: MuonDimensionNumbers) -> tuple[Array, Callable[[Array], Array]]:
    """`x` as a stack of `(reduction, output)` matrices `[batch, m, n]` (as optax
    lays them out for Newton-Schulz), and the inverse."""
    red = (d.reduction_axis,) if isinstance(d.reduction_axis, int) else tuple(d.reduction_axis)
    out = (d.output_axis,) if isinstance(d.output_axis, int) else tuple(d.output_axis)
    red, out = tuple(a % x.ndim for a in red), tuple(a % x.ndim for a in out)
    batch = tuple(a for a in range(x.ndim) if a not in red + out)
    perm = batch + red + out
    shape = tuple(x.shape[a] for a in perm)
    flat = (
        math.prod(shape[: len(batch)]),
        math.prod(x.shape[a] for a in red),
        math.prod(x.shape[a] for a in out),
    )
    inverse = tuple(sorted(range(x.ndim), key=lambda i: perm[i]))
    return x.transpose(perm).reshape(flat), lambda y: y.reshape(shape).transpose(inverse)


def _owners() -> tuple[tuple[str, ...], int]:
    """The mesh axes (of the abstract mesh the step runs under) that split the
    parameters, and how many devices they make; `((), 1)` without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    sizes = {} if mesh.empty else dict(mesh.shape)
    axes = tuple(a for a in OWNER_AXES if sizes.get(a, 1) > 1)
    return axes, math.prod(sizes[a] for a in axes)


def _orthogonalize_all(
    mats: list[Array], ns: Callable[[Array], Array], ns_sharding: str
) -> list[Array]:
    """Newton-Schulz on every matrix of every stack `[batch_i, m, n]`.

    Under a mesh whose `fsdp`/`model` axes split the parameters:

    - `"owner"`: the stacks of one matrix shape are concatenated, padded with
      zero matrices to a multiple of the devices, and resharded so that each
      device holds whole matrices (an all-to-all); each matrix is
      orthogonalised once, on its owner, and resharded back. Compute per
      device: 1/devices of the total (plus padding).
    - `"gather"`: every stack is all-gathered whole on every device, which
      orthogonalises all of it and keeps its slice (Moonlight's Distributed
      Muon, arXiv 2502.16982, sec. 2.3, gathering over all the parameter
      shards): every matrix orthogonalised on every device.

    Either way each matrix sees the same arithmetic as on one device.
    """
    axes, n = _owners()
    constrain = jax.lax.with_sharding_constraint
    if ns_sharding == "gather":
        return [constrain(jax.vmap(ns)(constrain(x, P())), P()) for x in mats]
    out: list[Array | None] = [None] * len(mats)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(mats):
        by_shape.setdefault(x.shape[1:], []).append(i)
    for idx in by_shape.values():
        x = jnp.concatenate([mats[i] for i in idx], axis=0)
        count = x.shape[0]
        x = jnp.pad(x, ((0, -count % n), (0, 0), (0, 0)))
        y = constrain(jax.vmap(ns)(constrain(x, P(axes))), P(axes))[:count]
        starts = np.cumsum([0] + [mats[i].shape[0] for i in idx])
        for i, a, b in zip(idx, starts[:-1], starts[1:]):
            out[i] = y[a:b]
    return out  # pyright: ignore[reportReturnType]  # every index was filled


def scale_by_sharded_muon(
    *,
    ns_steps: int = 5,
    beta: float = 0.95,
    eps: float = 1e-8,
    nesterov: bool = True,
    weight_dimension_numbers: DimensionNumbers,
    ns_sharding: str = "owner",
) -> optax.GradientTransformation:
    """`optax.contrib.scale_by_muon` (the same state, momentum, and
    Newton-Schulz arithmetic per matrix) with the Newton-Schulz step placed for
    sharded state: see `_orthogonalize_all` for `ns_sharding`. Run under a mesh
    ([`qkclip_eqx.make_train_step`][] with `mesh=` sets it), the momentum stays
    sharded as the parameters are; without one it is optax's."""
    if ns_sharding not in NS_SHARDINGS:
        raise ValueError(f"ns_sharding must be one of {NS_SHARDINGS}, got {ns_sharding!r}")
    base = optax.contrib.scale_by_muon(
        ns_steps=ns_steps,
        beta=beta,
        eps=eps,
        nesterov=nesterov,
        weight_dimension_numbers=weight_dimension_numbers,
    )

    def update(updates, state, params=None):
        if not _owners()[0]:  # no mesh splits the matrices: optax's own update
            return base.update(updates, state, params)
        dims = weight_dimension_numbers(updates)
        mu = optax.tree.update_moment(updates, state.mu, beta, 1)
        count = optax.safe_increment(state.count)
        if nesterov:
            mu_hat = jax.tree.map(
                lambda m, g: beta * m + (1 - beta) * g,
                optax.tree.bias_correction(mu, beta, optax.safe_increment(count)),
                optax.tree.bias_correction(updates, beta, count),
            )
        else:
            mu_hat = optax.tree.bias_correction(mu, beta, count)

        def ns(x):
            return orthogonalize_via_newton_schulz(x, state.ns_coeffs, ns_steps, "frobenius", eps)

        leaves, treedef = jax.tree.flatten(mu_hat)
        dim_leaves = treedef.flatten_up_to(dims)
        flat = [_to_matrices(x, d) for x, d in zip(leaves, dim_leaves)]
        done = _orthogonalize_all([m for m, _ in flat], ns, ns_sharding)
        new = treedef.unflatten([inv(y) for (_, inv), y in zip(flat, done)])
        return new, state._replace(count=count, mu=mu)

    return optax.GradientTransformation(base.init, update)


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
    ns_sharding: str = "owner",
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
    - `ns_sharding`: on a mesh whose `fsdp`/`model` axes split the matrices,
      where Newton-Schulz runs: `"owner"` (each whole matrix orthogonalised
      once, by the device that owns it; the momentum resharded there and back
      by all-to-alls) or `"gather"` (every matrix all-gathered and
      orthogonalised on every device, as Moonlight's Distributed Muon, arXiv
      2502.16982, sec. 2.3). Both equal the one-device optimizer; docs/
      parallelism.md has the bytes and FLOPs of each. Without a mesh: unused.

    **Returns:**

    An `optax.GradientTransformation`.

    **Raises:**

    `ValueError` when `weight_decay < 0` or `ns_sharding` is unknown, and (at `init` or `update`, before
    optax sees it) when the routing is not one of the params it was given: the
    message names the leaf. `TypeError` when `weight_dimension_numbers` is not
    callable, or (at `init`) not given while the params have no
    `muon_dimension_numbers()`.
    """
    if not isinstance(weight_decay, jax.core.Tracer) and not weight_decay >= 0:  # pyright: ignore[reportAttributeAccessIssue]  # `import jax` imports jax.core
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if weight_dimension_numbers is not None and not callable(weight_dimension_numbers):
        raise TypeError(
            "weight_dimension_numbers must be a function of the params (optax also calls it on "
            "masked copies), e.g. `lambda p: qkclip_eqx.matrix_dimension_numbers(p, exclude=...)`; "
            f"got a {type(weight_dimension_numbers).__name__}"
        )
    dims_fn = _checked(
        _default_dims if weight_dimension_numbers is None else weight_dimension_numbers
    )

    def labels(params):
        # a leaf of params meets its whole subtree of dims: None or a MuonDimensionNumbers
        return jax.tree.map(lambda _, d: "adamw" if d is None else "muon", params, dims_fn(params))

    muon = optax.chain(
        scale_by_sharded_muon(
            ns_steps=ns_steps,
            beta=momentum,
            eps=eps,
            nesterov=nesterov,
            weight_dimension_numbers=dims_fn,
            ns_sharding=ns_sharding,
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
