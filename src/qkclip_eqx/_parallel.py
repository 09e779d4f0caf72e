"""Meshes, the partition specs, and the loss on a mesh.

Mesh axes: `data` (batch), `model` (attention heads: tensor parallelism) and
`seq` (sequence: context parallelism); any may have size 1.

The loss, gradients and S are computed inside ONE `jax.shard_map` over the
whole mesh ([`shard_loss`][qkclip_eqx.shard_loss]): each device runs the loss function on its batch
and sequence shard, with its heads, and the loss function reduces over the
axes named in its `parallel` argument (see [`qkclip_eqx.next_token_loss`][]:
the loss by `psum`, the per-head S by an explicit `lax.pmax` over `data` and
`seq`). Gradients of parameters replicated over an axis are summed over it by
shard_map's autodiff (the transpose of the implicit broadcast). The optimizer
update and QK-Clip then run on the sharded arrays under `jit`; the clip is an
elementwise scaling along the head axis, so it needs no collective.

Which leaves are sharded over `model` is declared by each attention module
([`qkclip_eqx.AbstractQKClippable.head_axes`][]); nothing here knows a concrete
attention class.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int, PyTree

from ._attention import AbstractQKClippable
from ._clip import clippable_modules, is_clippable
from ._config import ParallelAxes
from ._moe import MoE

AXES = ("data", "model", "seq")
PARALLEL = ParallelAxes(data="data", model="model", seq="seq")
LossFn = Callable[..., tuple[Float[Array, ""], PyTree]]


def make_mesh(data: int = 1, model: int = 1, seq: int = 1, *, devices=None) -> Mesh:
    """A `(data, model, seq)` mesh over `devices`.

    **Arguments:**

    - `data`: the data-parallel size (the batch is split over it).
    - `model`: the tensor-parallel size (the heads are split over it).
    - `seq`: the context-parallel size (the sequence is split over it).
    - `devices`: the devices; default all of them.

    **Returns:**

    A `jax.sharding.Mesh` with axes `("data", "model", "seq")`.

    **Raises:**

    `ValueError` when `data * model * seq` is not the number of devices.
    """
    devices = jax.devices() if devices is None else devices
    if data * model * seq != len(devices):
        raise ValueError(
            f"mesh data={data} x model={model} x seq={seq} = {data * model * seq} "
            f"does not match the {len(devices)} devices"
        )
    return jax.make_mesh((data, model, seq), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _model_axes(module) -> tuple:
    """The `(where, axes)` a module declares for sharding over `model`: a
    clippable module's `head_axes`, a MoE layer's `expert_axes`."""
    return module.head_axes() if is_clippable(module) else module.expert_axes()


def _shards_over_model(x) -> bool:
    return is_clippable(x) or isinstance(x, MoE)


def _module_specs(module: AbstractQKClippable | MoE) -> PyTree:
    """Specs for one module's arrays: the leaves of its head (or expert) axis
    over `model`."""
    specs = jax.tree.map(lambda x: P() if eqx.is_array(x) else None, module)
    where, axes = _model_axes(module)
    what = "head_axes" if is_clippable(module) else "expert_axes"
    leaves = where(module)
    if len(leaves) != len(axes):
        raise ValueError(
            f"{type(module).__name__}.{what}() selects {len(leaves)} leaves but gives "
            f"{len(axes)} axes"
        )
    by_head = []
    for leaf, axis in zip(leaves, axes):
        if not (eqx.is_array(leaf) and -leaf.ndim <= axis < 0):
            raise ValueError(
                f"{type(module).__name__}.{what}(): axis {axis} must be negative and "
                f"within the rank of its leaf {getattr(leaf, 'shape', leaf)!r}"
            )
        by_head.append(P(*(None,) * (leaf.ndim + axis), "model"))
    return eqx.tree_at(where, specs, tuple(by_head))


def partition_specs(model: PyTree) -> PyTree:
    """A `PartitionSpec` for every array leaf of `model` (`None` elsewhere).

    The leaves each [`qkclip_eqx.AbstractQKClippable`][] module names in its
    `head_axes` are sharded over `model` along their head axis, and those a
    [`qkclip_eqx.MoE`][] names in its `expert_axes` along their expert axis;
    everything else (embedding, norms, MLP, router, LM head) is replicated. The optimizer state follows
    the params, and the batch is sharded over `data` and `seq`.
    """

    def spec(x):
        if _shards_over_model(x):
            return _module_specs(x)
        return P() if eqx.is_array(x) else None

    return jax.tree.map(spec, model, is_leaf=_shards_over_model)


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
    """Errors, before compiling, for a mesh that cannot shard this run."""
    sizes = dict(mesh.shape)
    for axis in AXES:
        if axis not in sizes:
            raise ValueError(f"mesh has no axis {axis!r} (axes: {tuple(sizes)}); use make_mesh")
    n = sizes["model"]
    for module in clippable_modules(model):
        name = type(module).__name__
        if module.n_heads % n:
            raise ValueError(
                f"{name}: n_heads={module.n_heads} is not divisible by the mesh's model axis ({n})"
            )
        where, axes = module.head_axes()
        for path, (leaf, axis) in zip(_where_paths(module, where), zip(where(module), axes)):
            if leaf.shape[axis] % n:
                raise ValueError(
                    f"{name}{path} has {leaf.shape[axis]} along its head axis ({axis}), which is "
                    f"not divisible by the mesh's model axis ({n})"
                )
    for moe in [
        x for x in jax.tree.leaves(model, is_leaf=_shards_over_model) if isinstance(x, MoE)
    ]:
        experts = moe.config.n_routed_experts
        if experts % n:
            raise ValueError(
                f"MoE: n_routed_experts={experts} is not divisible by the mesh's model axis ({n})"
            )
    if batch_size % sizes["data"]:
        raise ValueError(
            f"batch size {batch_size} is not divisible by the mesh's data axis ({sizes['data']})"
        )
    if seq_len % sizes["seq"]:
        raise ValueError(
            f"sequence length {seq_len} is not divisible by the mesh's seq axis ({sizes['seq']})"
        )


def _where_paths(module: PyTree, where: Callable) -> list[str]:
    """Readable paths (`.wq`) of the leaves `where` selects, for error messages."""
    marked = eqx.tree_at(where, module, replace_fn=lambda x: _Marker())
    flat, _ = jax.tree_util.tree_flatten_with_path(marked, is_leaf=lambda x: isinstance(x, _Marker))
    return [jax.tree_util.keystr(p) for p, x in flat if isinstance(x, _Marker)]


class _Marker:
    pass


def _shardings(specs: PyTree, mesh: Mesh) -> PyTree:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def shard(tree: PyTree, specs: PyTree, mesh: Mesh) -> PyTree:
    """`device_put` every array leaf with its spec (non-arrays pass through)."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.device_put(arrays, _shardings(specs, mesh)), static)


def shard_batch(tokens: np.ndarray, mesh: Mesh) -> Int[Array, "batch seq_plus_one"]:
    """Place a host batch `[batch, seq + 1]` sharded over `data`.

    `tokens` is the whole global batch, the same on every process (each
    builds it from `(seed, step)`); each device takes its rows by
    `jax.make_array_from_callback`, which is right for every mesh and
    process layout, including one where `model` or `seq` spans processes.

    **Arguments:**

    - `tokens`: the global host batch, `[batch, seq + 1]`.
    - `mesh`: e.g. from [`qkclip_eqx.make_mesh`][].

    **Returns:**

    A global `jax.Array` sharded over `data`.
    """
    tokens = np.asarray(tokens)
    sharding = NamedSharding(mesh, P("data"))
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
            "parallel=ParallelAxes(data='data', model='model', seq='seq') and must reduce its "
            "loss and S over those axes, as qkclip_eqx.next_token_loss does)"
        )


def shard_loss(loss_fn: LossFn, mesh: Mesh, specs: PyTree | None = None) -> Callable:
    """`loss_fn(model, tokens, *, parallel)` as one `jax.shard_map` over `mesh`.

    Returns `fn(model, tokens) -> (loss, S)` for a global batch `tokens`
    `[batch, seq + 1]`. Each device calls `loss_fn` on its rows and its
    sequence shard (its `t` inputs plus the next token), with
    `parallel=ParallelAxes(data="data", model="model", seq="seq")`; `loss_fn`
    must reduce its loss over `data` and `seq` and return S for all heads
    (replicated), as [`qkclip_eqx.next_token_loss`][] does. Differentiable in
    the model's arrays.

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

        def local(params, windows):
            return loss_fn(eqx.combine(params, static), windows[:, 0], parallel=PARALLEL)

        sharded = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(partition_specs(model) if specs is None else specs, P("data", "seq")),
            out_specs=P(),
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
    `parallel.data` and `parallel.seq`; this device's heads are then gathered
    into all heads over `parallel.model`, by a `psum` of zero-padded shards
    (exact: every other term is 0).
    """
    over = tuple(a for a in (parallel.data, parallel.seq) if a is not None)

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
