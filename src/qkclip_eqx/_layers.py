"""Small building blocks: RMSNorm, SwiGLU, and the weight initialiser.

Weight layout throughout the project: a matrix is stored ``(out..., in)``, the
input axis LAST, as ``eqx.nn.Linear`` does; per-head matrices split ``out`` into
``(heads, head_dim)``. The Muon routing in ``_optim.py`` relies on this.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


def linear(x: Float[Array, "*rows n_in"], w: Float[Array, "*n_out n_in"]) -> Float[Array, "..."]:
    """``x @ w.T`` for a weight stored ``(out..., in)``: a per-head weight
    ``[heads, head_dim, in]`` gives ``[..., heads, head_dim]``."""
    y = x @ w.reshape(-1, w.shape[-1]).T
    return y.reshape(*x.shape[:-1], *w.shape[:-1])


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
