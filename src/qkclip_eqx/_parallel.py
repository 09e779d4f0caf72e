"""Meshes, the partition specs, and the loss on a mesh.

Mesh axes: `data` (batch: replicas), `fsdp` (batch, and every parameter and
optimizer-state leaf: ZeRO-3 / FSDP), `model` (attention heads and the MLP's
hidden units: tensor parallelism) and `seq` (sequence: context parallelism);
any may have size 1.

The loss, gradients and S are computed inside ONE `jax.shard_map` over the
whole mesh ([`shard_loss`][qkclip_eqx.shard_loss]): each device runs the loss function on its batch
and sequence shard, with its heads, and the loss function reduces over the
axes named in its `parallel` argument (see [`qkclip_eqx.next_token_loss`][]:
the loss by `psum`, the per-head S by an explicit `lax.pmax` over `data`,
`fsdp` and `seq`). Gradients of parameters replicated over an axis are summed
over it by shard_map's autodiff (the transpose of the implicit broadcast); a
parameter sharded over `fsdp` is all-gathered where it is used, one layer at a
time inside the layer scan, and its gradient is reduce-scattered by the
transpose of that all-gather. The optimizer update and QK-Clip then run on the
sharded arrays under `jit`; the clip is an elementwise scaling along the head
axis, so it needs no collective.

Which leaves are sharded over `model` is declared by each module: attention
by [`qkclip_eqx.AbstractQKClippable.head_axes`][], any other module by a
`model_axes()` method of the same form (`SwiGLU.model_axes` (`_layers.py`));
nothing here knows a concrete class. Every array leaf is sharded over `fsdp`
along its last axis not split over `model` (see
[`partition_specs`][qkclip_eqx.partition_specs]).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int, PyTree

from ._clip import clippable_modules, is_clippable
from ._config import ParallelAxes
from ._moe import MoE

AXES = ("data", "fsdp", "model", "seq")
BATCH = ("data", "fsdp")  # the mesh axes the batch is split over
PARALLEL = ParallelAxes(data="data", model="model", seq="seq", fsdp="fsdp")
LossFn = Callable[..., tuple[Float[Array, ""], PyTree]]


def make_mesh(data: int = 1, fsdp: int = 1, model: int = 1, seq: int = 1, *, devices=None) -> Mesh:
    """A `(data, fsdp, model, seq)` mesh over `devices`.

    **Arguments:**

    - `data`: the data-parallel size (the batch is split over it; the
      parameters are replicated over it).
    - `fsdp`: the fully-sharded data-parallel size (the batch is split over it,
      and so are the parameters, gradients and optimizer state: ZeRO-3).
    - `model`: the tensor-parallel size (the heads and the MLP's hidden units
      are split over it).
    - `seq`: the context-parallel size (the sequence is split over it).
    - `devices`: the devices; default all of them.

    **Returns:**

    A `jax.sharding.Mesh` with axes `("data", "fsdp", "model", "seq")`.

    **Raises:**

    `ValueError` when `data * fsdp * model * seq` is not the number of devices.
    """
    devices = jax.devices() if devices is None else devices
    sizes = dict(data=data, fsdp=fsdp, model=model, seq=seq)
    if any(not isinstance(v, int) or v < 1 for v in sizes.values()):
        raise ValueError(f"mesh axis sizes must be positive ints, got {sizes}")
    n = data * fsdp * model * seq
    if n != len(devices):
        shape = " x ".join(f"{k}={v}" for k, v in sizes.items())
        raise ValueError(f"mesh {shape} = {n} does not match the {len(devices)} devices")
    return jax.make_mesh(
        (data, fsdp, model, seq), AXES, axis_types=(AxisType.Auto,) * 4, devices=devices
    )


def declares_model_axes(x: object) -> bool:
    """Whether `x` is a module that declares leaves split over `model`: an
    attention module (`head_axes`) or any module with a `model_axes` method."""
    return is_clippable(x) or (
        isinstance(x, eqx.Module) and callable(getattr(x, "model_axes", None))
    )


def _declared(module: eqx.Module) -> tuple[Callable, tuple[int, ...], str]:
    if is_clippable(module):
        return (*module.head_axes(), "head_axes")  # pyright: ignore[reportAttributeAccessIssue]
    return (*module.model_axes(), "model_axes")  # pyright: ignore[reportAttributeAccessIssue]


def _module_specs(module: eqx.Module) -> PyTree:
    """Specs for one declaring module's arrays: its declared leaves over `model`."""
    specs = jax.tree.map(lambda x: P() if eqx.is_array(x) else None, module)
    where, axes, method = _declared(module)
    leaves = where(module)
    if len(leaves) != len(axes):
        raise ValueError(
            f"{type(module).__name__}.{method}() selects {len(leaves)} leaves but gives "
            f"{len(axes)} axes"
        )
    split = []
    for leaf, axis in zip(leaves, axes):
        if not (eqx.is_array(leaf) and -leaf.ndim <= axis < 0):
            raise ValueError(
                f"{type(module).__name__}.{method}(): axis {axis} must be negative and "
                f"within the rank of its leaf {getattr(leaf, 'shape', leaf)!r}"
            )
        split.append(P(*(None,) * (leaf.ndim + axis), "model"))
    return eqx.tree_at(where, specs, tuple(split))


def _add_fsdp(x: Any, spec: P | None) -> P | None:
    """`spec` with `fsdp` on the last axis of `x` that is not split over `model`
    (a scalar, or a vector split over `model`, stays replicated over `fsdp`)."""
    if spec is None or not eqx.is_array(x):
        return spec
    entries = [*spec, *(None,) * (x.ndim - len(spec))]
    for d in reversed(range(x.ndim)):
        if entries[d] is None:
            entries[d] = "fsdp"
            return P(*entries)
    return spec


def partition_specs(model: PyTree) -> PyTree:
    """A `PartitionSpec` for every array leaf of `model` (`None` elsewhere).

    - `model`: the leaves each module declares are split along their declared
      axis: an [`qkclip_eqx.AbstractQKClippable`][]'s `head_axes` (heads), a
      `model_axes()` method elsewhere (`SwiGLU`: column-parallel
      `w_gate`/`w_up`, row-parallel `w_down`). An MoE layer's expert leaves
      would declare their expert axis the same way.
    - `fsdp`: EVERY array leaf is split along its last axis that is not split
      over `model` (the input axis of a `(out..., in)` matrix, else its output
      axis; never a stacked layer axis, which comes first), so that the state
      per device is the total divided by the mesh (ZeRO-3). A scalar, or a
      vector split over `model`, is replicated.

    The spec depends on the leaves' ranks and the declarations only, not on
    their sizes, so a model inside `shard_map` (holding its shards) finds the
    same specs for itself ([`qkclip_eqx.Transformer`][] does, to gather each
    layer). The optimizer state follows the params, and the batch is split
    over `data` and `fsdp`, the sequence over `seq`.
    """

    def spec(x):
        if declares_model_axes(x):
            return _module_specs(x)
        return P() if eqx.is_array(x) else None

    specs = jax.tree.map(spec, model, is_leaf=declares_model_axes)
    return jax.tree.map(_add_fsdp, model, specs, is_leaf=lambda x: x is None)


def gather_fsdp(tree: PyTree, specs: PyTree, axis: str | None) -> PyTree:
    """Inside `shard_map`: every array leaf of `tree` whose spec names `axis`
    all-gathered over it along that dimension (tiled: the whole leaf, up to
    the `model` split). The transpose, under autodiff, is the gradient's
    reduce-scatter over `axis`. A no-op for `axis` None or of size 1."""
    if axis is None or jax.lax.axis_size(axis) == 1:
        return tree

    def gather(spec, x):
        if spec is None or not eqx.is_array(x) or axis not in tuple(spec):
            return x
        return jax.lax.all_gather(x, axis, axis=tuple(spec).index(axis), tiled=True)

    return jax.tree.map(gather, specs, tree, is_leaf=lambda s: isinstance(s, P) or s is None)


def layer_specs(specs: PyTree) -> PyTree:
    """The specs of one layer of stacked ones: the leading (layer) entry dropped."""
    return jax.tree.map(lambda s: P(*tuple(s)[1:]), specs, is_leaf=lambda s: isinstance(s, P))


def state_specs(
    optimizer: optax.GradientTransformation, opt_state: PyTree, specs: PyTree
) -> PyTree:
    """Optimizer-state specs: a leaf that mirrors a parameter gets its spec."""

    def spec_of(leaf, spec):
        # optax.partition masks the other branch's leaves: keep those masked.
        return leaf if isinstance(leaf, optax.MaskedNode) else spec

    return optax.tree_map_params(
        optimizer,
        spec_of,
        opt_state,
        specs,
        transform_non_params=lambda _: P(),
        is_leaf=lambda x: isinstance(x, (P, optax.MaskedNode)),
    )


def check_mesh(mesh: Mesh, model: PyTree, batch_size: int, seq_len: int) -> None:
    """Errors, before compiling, for a mesh that cannot shard this run: each
    names the leaf, its dimension and the mesh axis that does not divide it."""
    sizes = dict(mesh.shape)
    for axis in AXES:
        if axis not in sizes:
            raise ValueError(f"mesh has no axis {axis!r} (axes: {tuple(sizes)}); use make_mesh")
    n = sizes["model"]
    for module in clippable_modules(model):
        if module.n_heads % n:
            raise ValueError(
                f"{type(module).__name__}: n_heads={module.n_heads} is not divisible by the "
                f"mesh's model axis ({n})"
            )
    for moe in [
        x for x in jax.tree.leaves(model, is_leaf=declares_model_axes) if isinstance(x, MoE)
    ]:
        experts = moe.config.n_routed_experts
        if experts % n:
            raise ValueError(
                f"MoE: n_routed_experts={experts} is not divisible by the mesh's model axis ({n})"
            )
    specs = partition_specs(model)
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda s: isinstance(s, P))[0]
    leaves = jax.tree.leaves(eqx.filter(model, eqx.is_array))
    for (path, spec), leaf in zip(flat, leaves, strict=True):
        for d, axis in enumerate(tuple(spec)):
            if axis is not None and leaf.shape[d] % sizes[axis]:
                raise ValueError(
                    f"{type(model).__name__}{jax.tree_util.keystr(path)} of shape "
                    f"{tuple(leaf.shape)}: its dimension {d} ({leaf.shape[d]}) is not divisible "
                    f"by the mesh's {axis} axis ({sizes[axis]})"
                )
    n_batch = sizes["data"] * sizes["fsdp"]
    if batch_size % n_batch:
        raise ValueError(
            f"batch size {batch_size} is not divisible by the mesh's data x fsdp axes "
            f"({sizes['data']} x {sizes['fsdp']} = {n_batch})"
        )
    if seq_len % sizes["seq"]:
        raise ValueError(
            f"sequence length {seq_len} is not divisible by the mesh's seq axis ({sizes['seq']})"
        )


def _shardings(specs: PyTree, mesh: Mesh) -> PyTree:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def shard(tree: PyTree, specs: PyTree, mesh: Mesh) -> PyTree:
    """`device_put` every array leaf with its spec (non-arrays pass through)."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.device_put(arrays, _shardings(specs, mesh)), static)


def shard_batch(tokens: np.ndarray, mesh: Mesh) -> Int[Array, "batch seq_plus_one"]:
    """Place a host batch `[batch, seq + 1]` sharded over `data` and `fsdp`.

    `tokens` is the whole global batch, the same on every process (each
    builds it from `(seed, step)`); each device takes its rows by
    `jax.make_array_from_callback`, which is right for every mesh and
    process layout, including one where `model` or `seq` spans processes.

    **Arguments:**

    - `tokens`: the global host batch, `[batch, seq + 1]`.
    - `mesh`: e.g. from [`qkclip_eqx.make_mesh`][].

    **Returns:**

    A global `jax.Array` sharded over `data` and `fsdp`.
    """
    tokens = np.asarray(tokens)
    sharding = NamedSharding(mesh, P(BATCH))
    return jax.make_array_from_callback(tokens.shape, sharding, lambda index: tokens[index])


def _token_windows(
    tokens: Int[Array, "batch seq_plus_one"], n: int
) -> Int[Array, "batch n t_plus_one"]:
    """`[batch, n * t + 1]` -> `[batch, n, t + 1]`: shard `i` of the sequence
    gets its `t` inputs and the one token after them (its last target)."""
    t = (tokens.shape[1] - 1) // n
    starts = np.arange(n) * t
    return jnp.stack(
        [jax.lax.dynamic_slice_in_dim(tokens, s, t + 1, axis=1) for s in starts], axis=1
    )


def takes_keyword(fn: Callable, name: str, *, or_var_keyword: bool = False) -> bool:
    """Whether `fn` takes the keyword `name` (or any keyword, with `or_var_keyword`)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or (
        or_var_keyword and any(p.kind is p.VAR_KEYWORD for p in params.values())
    )


def check_mesh_loss_fn(loss_fn: Callable) -> None:
    """A loss runs on a mesh only if it takes `parallel`: a clear error otherwise."""
    if not takes_keyword(loss_fn, "parallel", or_var_keyword=True):
        raise TypeError(
            f"loss_fn {getattr(loss_fn, '__name__', loss_fn)!r} cannot run on a mesh: it must take "
            "a `parallel` keyword (it is called inside shard_map with "
            "parallel=ParallelAxes(data='data', model='model', seq='seq', fsdp='fsdp') and must "
            "reduce its "
            "loss and S over those axes, as qkclip_eqx.next_token_loss does)"
        )


def shard_loss(loss_fn: LossFn, mesh: Mesh, specs: PyTree | None = None) -> Callable:
    """`loss_fn(model, tokens, *, parallel)` as one `jax.shard_map` over `mesh`.

    Returns `fn(model, tokens) -> (loss, S)` for a global batch `tokens`
    `[batch, seq + 1]`. Each device calls `loss_fn` on its rows and its
    sequence shard (its `t` inputs plus the next token), with
    `parallel=ParallelAxes(data="data", model="model", seq="seq", fsdp="fsdp")`;
    `loss_fn` must reduce its loss over `data`, `fsdp` and `seq`
    (`parallel.batch_axes()`) and return S for all heads (replicated), as
    [`qkclip_eqx.next_token_loss`][] does. Differentiable in the model's arrays.

    The parameters arrive sharded over `fsdp`. A model whose class sets
    `gathers_fsdp_params = True` ([`qkclip_eqx.Transformer`][]) all-gathers
    them itself where it uses them (one layer at a time in its scan); any other
    model is given its parameters all-gathered over `fsdp` once, at entry
    (its gradients and optimizer state stay sharded).

    **Arguments:**

    - `loss_fn`: e.g. [`qkclip_eqx.next_token_loss`][]; it must take a
      `parallel` keyword.
    - `mesh`: e.g. from [`qkclip_eqx.make_mesh`][].
    - `specs`: the model's specs; default [`partition_specs`][qkclip_eqx.partition_specs] of the model.

    **Returns:**

    `fn(model, tokens) -> (loss, S)`.

    **Raises:**

    `TypeError` when `loss_fn` takes no `parallel` keyword.
    """
    check_mesh_loss_fn(loss_fn)
    n_seq = dict(mesh.shape)["seq"]

    def fn(model, tokens):
        params, static = eqx.partition(model, eqx.is_array)
        model_specs = partition_specs(model) if specs is None else specs
        gathers_own = getattr(model, "gathers_fsdp_params", False)

        def local(params, windows):
            if not gathers_own:  # the whole model, gathered once (ZeRO-3 without layering)
                params = gather_fsdp(params, model_specs, PARALLEL.fsdp)
            return loss_fn(eqx.combine(params, static), windows[:, 0], parallel=PARALLEL)

        sharded = jax.shard_map(
            local, mesh=mesh, in_specs=(model_specs, P(BATCH, "seq")), out_specs=P()
        )
        return sharded(params, _token_windows(tokens, n_seq))

    return fn


def shard_train_state(
    model: PyTree, opt_state: PyTree, optimizer: optax.GradientTransformation, mesh: Mesh
) -> tuple[PyTree, PyTree]:
    """Place a model and its optimizer state on `mesh` by [`partition_specs`][qkclip_eqx.partition_specs].

    **Arguments:**

    - `model`: the model.
    - `opt_state`: `optimizer`'s state for the model's arrays; a leaf that
      mirrors a parameter gets that parameter's spec.
    - `optimizer`: the optimizer that made `opt_state`.
    - `mesh`: e.g. from [`qkclip_eqx.make_mesh`][].

    **Returns:**

    `(model, opt_state)`, each array leaf placed with its spec.
    """
    specs = partition_specs(model)
    return shard(model, specs, mesh), shard(
        opt_state, state_specs(optimizer, opt_state, specs), mesh
    )


def constrain_train_state(
    model: PyTree,
    opt_state: PyTree,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    specs: PyTree,
) -> tuple[PyTree, PyTree]:
    """Inside jit: `with_sharding_constraint` of model and state to their specs."""
    params, static = eqx.partition(model, eqx.is_array)
    params = jax.lax.with_sharding_constraint(params, _shardings(specs, mesh))
    opt_state = jax.lax.with_sharding_constraint(
        opt_state, _shardings(state_specs(optimizer, opt_state, specs), mesh)
    )
    return eqx.combine(params, static), opt_state


def reduce_max_logits(
    s: PyTree[Float[Array, "*layers heads"]], parallel: ParallelAxes
) -> PyTree[Float[Array, "*layers all_heads"]]:
    """Inside `shard_map`: this device's S (its batch and sequence shard, its
    heads) to the global S of every head, replicated on every device.

    The max over the batch and the sequence is an explicit `lax.pmax` over
    `parallel.data`, `parallel.fsdp` and `parallel.seq`; this device's heads are then gathered
    into all heads over `parallel.model`, by a `psum` of zero-padded shards
    (exact: every other term is 0).
    """
    over = parallel.batch_axes()

    def reduce(x):
        x = jax.lax.pmax(x, over)
        if parallel.model is None:
            return x
        n, h = jax.lax.axis_size(parallel.model), x.shape[-1]
        full = jnp.zeros((*x.shape[:-1], n * h), x.dtype)
        start = jax.lax.axis_index(parallel.model) * h
        full = jax.lax.dynamic_update_slice_in_dim(full, x, start, axis=x.ndim - 1)
        return jax.lax.psum(full, parallel.model)

    return jax.tree.map(reduce, s)


def place_batch(batch: np.ndarray, mesh: Mesh | None) -> Int[Array, "batch seq_plus_one"]:
    """The global host batch (every process builds the same one) on the
    devices: one device without a mesh, else sharded by [`shard_batch`][qkclip_eqx.shard_batch]."""
    return jnp.asarray(batch) if mesh is None else shard_batch(batch, mesh)


def to_host(tree: PyTree) -> PyTree:
    """Host (NumPy) copies of `tree`'s arrays, whatever their sharding; across
    processes, gathered (every process gets the whole arrays)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)
