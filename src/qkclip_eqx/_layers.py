"""Small building blocks: RMSNorm, SwiGLU, and the weight initialiser.

Weight layout throughout the project: a matrix is stored ``(out..., in)``, the
input axis LAST, as ``eqx.nn.Linear`` does; per-head matrices split ``out`` into
``(heads, head_dim)``. The Muon routing in ``_optim.py`` relies on this.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jaxtyping import Array, Float, PRNGKeyArray


@custom_vmap
def _matmul_t(x: Array, w: Array) -> Array:
    return x @ w.T


@_matmul_t.def_vmap
def _matmul_t_vmap(axis_size, in_batched, x, w):
    x_batched, w_batched = in_batched
    if x_batched and not w_batched:
        # vmap over the rows of x: one matmul over all of them.
        y = x.reshape(-1, x.shape[-1]) @ w.T
        return y.reshape(*x.shape[:-1], w.shape[0]), True
    in_axes = (0 if x_batched else None, 0 if w_batched else None)
    return jax.vmap(lambda a, b: a @ b.T, in_axes=in_axes)(x, w), True


def linear(x: Float[Array, "*rows n_in"], w: Float[Array, "*n_out n_in"]) -> Float[Array, "*rows *n_out"]:
    """``x @ w.T`` for a weight stored ``(out..., in)``, batched by ``jax.vmap`` as ONE matmul.

    Under ``vmap`` over examples the plain matmul's weight gradient contracts
    two axes (batch and sequence); XLA:CPU canonicalises that dot with a strided
    transpose of the activation gradient, fused into its elementwise producer,
    which cost as much as the matmuls of the MLP's backward pass. Here vmap
    flattens the batch into the rows instead, so the gradient is one matmul
    with a single contraction axis. The result is the same function.
    """
    out_shape = w.shape[:-1]
    w2 = w.reshape(-1, w.shape[-1])
    y = _matmul_t(x.reshape(-1, x.shape[-1]), w2)
    return y.reshape(*x.shape[:-1], *out_shape)


def init_weight(key: PRNGKeyArray, shape: tuple[int, ...], dtype) -> Float[Array, "..."]:
    """N(0, 1/fan_in), fan_in being the last axis."""
    return (jax.random.normal(key, shape, jnp.float32) / jnp.sqrt(shape[-1])).astype(dtype)


class RMSNorm(eqx.Module):
    """RMSNorm (Zhang & Sennrich 2019): ``w * x / sqrt(mean(x^2) + eps)``, in float32."""

    weight: Float[Array, " dim"]
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32):
        self.weight = jnp.ones((dim,), dtype)
        self.eps = eps

    def __call__(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight * xf.astype(x.dtype)


class SwiGLU(eqx.Module):
    """``W_down (silu(W_gate x) * W_up x)`` (Shazeer 2020, arXiv 2002.05202)."""

    w_gate: Float[Array, "hidden dim"]
    w_up: Float[Array, "hidden dim"]
    w_down: Float[Array, "dim hidden"]

    def __init__(self, dim: int, hidden: int, *, dtype=jnp.float32, key: PRNGKeyArray):
        k1, k2, k3 = jax.random.split(key, 3)
        self.w_gate = init_weight(k1, (hidden, dim), dtype)
        self.w_up = init_weight(k2, (hidden, dim), dtype)
        self.w_down = init_weight(k3, (dim, hidden), dtype)

    def __call__(self, x: Float[Array, "seq dim"]) -> Float[Array, "seq dim"]:
        return linear(jax.nn.silu(linear(x, self.w_gate)) * linear(x, self.w_up), self.w_down)
