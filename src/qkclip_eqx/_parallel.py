"""Meshes, the one table of partition specs, and the sharded loss.

Mesh axes: ``data`` (batch), ``model`` (attention heads: tensor parallelism)
and ``seq`` (sequence: context parallelism); any may have size 1.

The loss, gradients and S are computed inside ONE ``jax.shard_map`` over the
whole mesh: each device runs the model on its batch and sequence shard, with
its heads. The per-head S is reduced by an explicit ``lax.pmax`` over
``data`` and ``seq``; heads sharded over ``model`` belong to one device group
and need no reduction. Gradients of parameters replicated over an axis are
summed over it by shard_map's autodiff (the transpose of the implicit
broadcast). The optimizer update and QK-Clip then run on the sharded arrays
under ``jit``; the clip is an elementwise scaling along the head axis, so it
needs no all-gather.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Float, Int, PyTree

from ._attention import GQAttention, MLAttention
from ._config import ParallelAxes
from ._model import Transformer

AXES = ("data", "model", "seq")
PARALLEL = ParallelAxes(model="model", seq="seq")


def make_mesh(data: int = 1, model: int = 1, seq: int = 1, *, devices=None) -> Mesh:
    """A ``(data, model, seq)`` mesh over ``devices`` (default: all of them)."""
    devices = jax.devices() if devices is None else devices
    if data * model * seq != len(devices):
        raise ValueError(
            f"mesh data={data} x model={model} x seq={seq} = {data * model * seq} "
            f"does not match the {len(devices)} devices"
        )
    return jax.make_mesh((data, model, seq), AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def _attention_specs(attn, stacked: int):
    """Heads over ``model``: the head axis of q/k/v per-head weights, and the
    (head-major) input columns of the output projection."""
    lead = (None,) * stacked
    spec = jax.tree.map(lambda _: P(), eqx.filter(attn, eqx.is_array))
    heads = P(*lead, "model")
    wo = P(*lead, None, "model")
    if isinstance(attn, MLAttention):
        return eqx.tree_at(lambda a: (a.wq, a.wkv_b, a.wo), spec, (heads, heads, wo))
    if isinstance(attn, GQAttention):
        return eqx.tree_at(lambda a: (a.wq, a.wk, a.wv, a.wo), spec, (heads, heads, heads, wo))
    raise TypeError(f"no partition rule for {type(attn).__name__}")


def param_specs(model: Transformer) -> PyTree:
    """THE table: a PartitionSpec for every array leaf of a Transformer.

    Attention heads are sharded over ``model``; everything else (embedding,
    norms, MLP, head) is replicated. The optimizer state follows the params
    (see :func:`state_specs`), the batch is sharded over ``data`` and ``seq``.
    """
    specs = jax.tree.map(lambda _: P(), eqx.filter(model, eqx.is_array))
    return eqx.tree_at(lambda m: m.blocks.attn, specs, _attention_specs(model.blocks.attn, stacked=1))


def state_specs(optimizer: optax.GradientTransformation, opt_state: PyTree, specs: PyTree) -> PyTree:
    """Optimizer-state specs: a leaf that mirrors a parameter gets its spec."""
    def spec_of(leaf, spec):
        # optax.partition masks the other branch's leaves: keep those masked.
        return leaf if isinstance(leaf, optax.MaskedNode) else spec

    return optax.tree_map_params(
        optimizer, spec_of, opt_state, specs,
        transform_non_params=lambda _: P(),
        is_leaf=lambda x: isinstance(x, (P, optax.MaskedNode)),
    )


def check_mesh(mesh: Mesh, model: Transformer, batch_size: int, seq_len: int) -> None:
    """Errors, before compiling, for a mesh that cannot shard this run."""
    sizes = dict(mesh.shape)
    for axis in AXES:
        if axis not in sizes:
            raise ValueError(f"mesh has no axis {axis!r} (axes: {tuple(sizes)}); use make_mesh")
    c = model.config.attention
    if c.n_heads % sizes["model"]:
        raise ValueError(f"n_heads={c.n_heads} is not divisible by the mesh's model axis ({sizes['model']})")
    n_kv = getattr(c, "n_kv_heads", c.n_heads)
    if n_kv % sizes["model"]:
        raise ValueError(f"n_kv_heads={n_kv} is not divisible by the mesh's model axis ({sizes['model']})")
    if batch_size % sizes["data"]:
        raise ValueError(f"batch size {batch_size} is not divisible by the mesh's data axis ({sizes['data']})")
    if seq_len % sizes["seq"]:
        raise ValueError(f"sequence length {seq_len} is not divisible by the mesh's seq axis ({sizes['seq']})")


def _shardings(specs: PyTree, mesh: Mesh) -> PyTree:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def shard(tree: PyTree, specs: PyTree, mesh: Mesh) -> PyTree:
    """``device_put`` every array leaf with its spec (non-arrays pass through)."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.device_put(arrays, _shardings(specs, mesh)), static)


def shard_batch(tokens: np.ndarray, mesh: Mesh) -> Int[Array, "batch seq_plus_one"]:
    """Place a host batch ``[batch, seq + 1]`` sharded over ``data``.

    ``tokens`` is the whole global batch, the same on every process (each
    builds it from ``(seed, step)``); each device takes its rows by
    ``jax.make_array_from_callback``, which is right for every mesh and
    process layout, including one where ``model`` or ``seq`` spans processes."""
    tokens = np.asarray(tokens)
    sharding = NamedSharding(mesh, P("data"))
    return jax.make_array_from_callback(tokens.shape, sharding, lambda index: tokens[index])


def sharded_next_token_loss(
    params: PyTree, static: PyTree, tokens: Int[Array, "batch seq_plus_one"], mesh: Mesh
) -> tuple[Float[Array, ""], Float[Array, "layers heads"]]:
    """Mean next-token loss and S over the global batch, computed shard-wise.

    Differentiable in ``params`` (the shard_map is inside the function)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    batch, seq = inputs.shape

    def local(params, inputs, targets):
        model = eqx.combine(params, static)
        t = inputs.shape[1]
        positions = jax.lax.axis_index("seq") * t + jnp.arange(t, dtype=jnp.int32)
        logits, s = jax.vmap(lambda x: model(x, positions=positions, parallel=PARALLEL))(inputs)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        loss = jax.lax.psum(jnp.sum(ce), ("data", "seq")) / (batch * seq)
        s = jax.lax.pmax(jnp.max(s, axis=0), ("data", "seq"))
        return loss, s

    specs = param_specs(eqx.combine(params, static))
    fn = jax.shard_map(
        local, mesh=mesh,
        in_specs=(specs, P("data", "seq"), P("data", "seq")),
        out_specs=(P(), P(None, "model")),
    )
    return fn(params, inputs, targets)


def shard_train_state(
    model: Transformer, opt_state: PyTree, optimizer: optax.GradientTransformation, mesh: Mesh
) -> tuple[Transformer, PyTree]:
    """Place a model and its optimizer state on ``mesh`` by :func:`param_specs`."""
    specs = param_specs(model)
    return shard(model, specs, mesh), shard(opt_state, state_specs(optimizer, opt_state, specs), mesh)


def constrain_train_state(
    model: Transformer, opt_state: PyTree, optimizer: optax.GradientTransformation, mesh: Mesh
) -> tuple[Transformer, PyTree]:
    """Inside jit: ``with_sharding_constraint`` of model and state to their specs."""
    params, static = eqx.partition(model, eqx.is_array)
    specs = param_specs(model)
    params = jax.lax.with_sharding_constraint(params, _shardings(specs, mesh))
    opt_state = jax.lax.with_sharding_constraint(
        opt_state, _shardings(state_specs(optimizer, opt_state, specs), mesh)
    )
    return eqx.combine(params, static), opt_state
