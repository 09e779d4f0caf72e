"""RMSNorm and SwiGLU (`qkclip_eqx._layers`) against float64 NumPy written from
the papers: RMSNorm (Zhang & Sennrich 2019), ``w * x / sqrt(mean(x^2) + eps)``;
SwiGLU (Shazeer 2020, arXiv 2002.05202, eq. 6), ``W_down (silu(W_gate x) * W_up x)``
with silu(z) = z sigmoid(z) (the Swish of beta = 1)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkclip_eqx._layers import RMSNorm, SwiGLU
from reference import np_rms_norm, np_swiglu

DIM, HIDDEN, T = 12, 20, 7


def _rng(seed):
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def x():
    # rows of very different scales: the normalisation must be per row
    scales = np.geomspace(1e-2, 1e2, T)[:, None]
    return (scales * _rng(0).standard_normal((T, DIM))).astype(np.float32)


@pytest.mark.parametrize("eps", [1e-6, 0.5])
def test_rms_norm_matches_numpy(x, eps):
    norm = eqx.tree_at(
        lambda n: n.weight,
        RMSNorm(DIM, eps=eps),
        jnp.asarray(1 + 0.3 * _rng(1).standard_normal(DIM), jnp.float32),
    )
    got = np.asarray(eqx.filter_jit(lambda n, x: n(x))(norm, jnp.asarray(x)))
    ref = np_rms_norm(x, norm.weight, eps)
    # measured max |diff| 1.6e-7, 23% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(got, ref, rtol=4e-7, atol=4e-8)
    # the large-eps case really differs from eps -> 0 on the small rows
    if eps == 0.5:
        assert not np.allclose(got[0], np_rms_norm(x, norm.weight, 1e-6)[0], rtol=1e-2)


def test_rms_norm_in_bf16_is_computed_in_float32(x):
    norm = RMSNorm(DIM, dtype=jnp.bfloat16)
    xb = jnp.asarray(x, jnp.bfloat16)
    got = eqx.filter_jit(lambda n, x: n(x))(norm, xb)
    assert got.dtype == jnp.bfloat16
    ref = np_rms_norm(np.asarray(xb, np.float64), 1.0, norm.eps)
    # the bf16 result's rounding (2^-9 relative at most): measured 0.32%
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=1e-2)


@pytest.fixture(scope="module")
def mlp():
    rng = _rng(2)
    m = eqx.filter_eval_shape(SwiGLU, DIM, HIDDEN, key=jax.random.key(0))
    return eqx.tree_at(
        lambda m: (m.w_gate, m.w_up, m.w_down),
        m,
        tuple(
            jnp.asarray(rng.standard_normal(s) / np.sqrt(s[-1]), jnp.float32)
            for s in ((HIDDEN, DIM), (HIDDEN, DIM), (DIM, HIDDEN))
        ),
    )


def test_swiglu_matches_numpy(mlp, x):
    x = x / np.sqrt(
        np.mean(x * x, axis=-1, keepdims=True)
    )  # unit rows: gates in silu's curved part
    got = np.asarray(eqx.filter_jit(lambda m, x: m(x))(mlp, jnp.asarray(x)))
    ref = np_swiglu(x, mlp.w_gate, mlp.w_up, mlp.w_down)
    # measured max |diff| 2.1e-7, 20% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(got, ref, rtol=4e-6, atol=4e-7)
    # other gated MLPs give other answers on this input: GeGLU, and the gate
    # and the up projection swapped
    g, u = x @ np.asarray(mlp.w_gate, np.float64).T, x @ np.asarray(mlp.w_up, np.float64).T
    gelu = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))
    geglu = (gelu * u) @ np.asarray(mlp.w_down, np.float64).T
    swapped = np_swiglu(x, mlp.w_up, mlp.w_gate, mlp.w_down)
    for other in (geglu, swapped):
        assert np.max(np.abs(other - ref)) > 100 * np.max(np.abs(got - ref)) + 1e-3


def test_linear_is_the_matmul_of_each_head_with_its_gradients():
    """``linear(x, w)`` with a per-head weight ``[heads, d, in]`` is the einsum
    ``td,hed->the``, in value and gradient, on one example and under vmap (the
    gradient of the unbatched call must work: a user differentiates one example)."""
    from qkclip_eqx._layers import linear

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((3, 5, 7)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, 4, 7)), jnp.float32)  # [heads, d, in]
    ct = jnp.asarray(rng.standard_normal((3, 5, 2, 4)), jnp.float32)

    def ours(x, w):
        return jnp.sum(jax.vmap(lambda xx: linear(xx, w))(x) * ct)

    def plain(x, w):
        return jnp.sum(jnp.einsum("btr,hdr->bthd", x, w) * ct)

    for a, b in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w), strict=True):
        # measured max |diff| 9.5e-7, 22% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=8e-7, atol=8e-7)
    one = jax.grad(lambda w: jnp.sum(linear(x[0], w) * ct[0]))(w)
    # bit-equal (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_array_equal(one, jnp.einsum("tr,thd->hdr", x[0], ct[0]))
