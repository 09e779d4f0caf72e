"""Small building blocks: RMSNorm, SwiGLU, and the weight initialiser.

Weight layout throughout the project: a matrix is stored `(out..., in)`, the
input axis LAST, as `eqx.nn.Linear` does; per-head matrices split `out` into
`(heads, head_dim)`. The Muon routing in `_optim.py` relies on this.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ._config import ParallelAxes


def linear(
    x: Float[Array, "*rows n_in"], w: Float[Array, "*n_out n_in"], out_dtype=None
) -> Float[Array, "..."]:
    """`x @ w.T` for a weight stored `(out..., in)`: a per-head weight
    `[heads, head_dim, in]` gives `[..., heads, head_dim]`. `out_dtype`
    (e.g. float32 for bf16 inputs) is the matmul's accumulation and result
    dtype (`preferred_element_type`); by default the inputs' dtype."""
    y = jnp.matmul(x, w.reshape(-1, w.shape[-1]).T, preferred_element_type=out_dtype)
    return y.reshape(*x.shape[:-1], *w.shape[:-1])


def cast_arrays(tree: PyTree, dtype) -> PyTree:
    """Every floating-point array leaf of `tree` in `dtype` (the compute
    copy of a module's float32 master weights; a no-op where they agree, and
    for `dtype=None`)."""
    if dtype is None:
        return tree
    dtype = jnp.dtype(dtype)

    def cast(a):
        if eqx.is_inexact_array(a) and a.dtype != dtype:
            return a.astype(dtype)
        return a

    return jax.tree.map(cast, tree)


def init_weight(key: PRNGKeyArray, shape: tuple[int, ...], dtype) -> Float[Array, "..."]:
    """N(0, 1/fan_in), fan_in being the last axis."""
    return (jax.random.normal(key, shape, jnp.float32) / jnp.sqrt(shape[-1])).astype(dtype)


class RMSNorm(eqx.Module):
    """RMSNorm (Zhang & Sennrich 2019): `w * x / sqrt(mean(x^2) + eps)`, in float32."""

    weight: Float[Array, " dim"]
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32):
        self.weight = jnp.ones((dim,), dtype)
        self.eps = eps

    def __call__(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (self.weight.astype(jnp.float32) * xf).astype(x.dtype)


class SwiGLU(eqx.Module):
    """`W_down (silu(W_gate x) * W_up x)` (Shazeer 2020, arXiv 2002.05202).

    Weights stored in `dtype`; computed in `compute_dtype` (weights and
    input cast once at entry; None: as given), the output in `compute_dtype`.

    Tensor-parallel over a mesh's `model` axis (Megatron-LM, Shoeybi et al.
    2019, arXiv 1909.08053, sec. 3): `W_gate` and `W_up` column-parallel (each
    device holds its block of hidden rows), `W_down` row-parallel (the matching
    hidden columns); the partial outputs are summed by one `psum`
    (`model_axes` declares the split)."""

    w_gate: Float[Array, "hidden dim"]
    w_up: Float[Array, "hidden dim"]
    w_down: Float[Array, "dim hidden"]
    compute_dtype: str | None = eqx.field(static=True)

    def __init__(
        self, dim: int, hidden: int, *, dtype=jnp.float32, compute_dtype=None, key: PRNGKeyArray
    ):
        k1, k2, k3 = jax.random.split(key, 3)
        self.w_gate = init_weight(k1, (hidden, dim), dtype)
        self.w_up = init_weight(k2, (hidden, dim), dtype)
        self.w_down = init_weight(k3, (dim, hidden), dtype)
        self.compute_dtype = None if compute_dtype is None else jnp.dtype(compute_dtype).name

    def __call__(
        self, x: Float[Array, "seq dim"], *, parallel: ParallelAxes | None = None
    ) -> Float[Array, "seq dim"]:
        """The MLP on one sequence; with `parallel.model` (inside `jax.shard_map`)
        the weights are this device's hidden block and the partial outputs are
        `psum`-ed over it, in float32."""
        m, x = cast_arrays((self, x), self.compute_dtype)
        h = jax.nn.silu(linear(x, m.w_gate)) * linear(x, m.w_up)
        if parallel is None or parallel.model is None:
            return linear(h, m.w_down)
        y = jax.lax.psum(linear(h, m.w_down, out_dtype=jnp.float32), parallel.model)
        return y.astype(x.dtype)

    def model_axes(self) -> tuple[Callable[[Any], tuple[Array, ...]], tuple[int, ...]]:
        """The leaves split over the mesh's `model` axis and the axis of each
        (negative: stacked layers add leading axes), as
        [`qkclip_eqx.AbstractQKClippable.head_axes`][]: `w_gate`, `w_up` by hidden
        row, `w_down` by hidden column."""
        return (lambda m: (m.w_gate, m.w_up, m.w_down)), (-2, -2, -1)
