"""Tensor-parallel correctness with NON-zero biases. A bias added on every
model shard before the reduction counts n times on a mesh of n; with zero
biases (or none) that bug is invisible. `ClippableMultiheadAttention` wraps
`eqx.nn.MultiheadAttention`, whose four projections may each have a bias:
the q, k and v biases are sharded with their heads, the output bias is
shared and must be added once, after the `psum` over `model`. (The library's
own MLA and GQA layers have no biases.)

On model=2 and data=2 x model=2 meshes, the loss, S per head and the gradient
of every leaf (each bias included) equal one device's."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

import qkclip_eqx as qc

VOCAB, HEADS, DIM, BATCH, T = 32, 4, 16, 4, 8
# of the largest gradient entry: measured 7.9e-8 (jax 0.10.2, CPU)
GRAD_ATOL = 3.2e-7


class BiasedLM(eqx.Module):
    embed: jax.Array
    attn: qc.ClippableMultiheadAttention
    head: jax.Array

    def __init__(self, *, key):
        ke, ka, kh, kb = jax.random.split(key, 4)
        self.embed = jax.random.normal(ke, (VOCAB, DIM))
        mha = eqx.nn.MultiheadAttention(
            HEADS,
            DIM,
            use_query_bias=True,
            use_key_bias=True,
            use_value_bias=True,
            use_output_bias=True,
            key=ka,
        )
        # biases well away from zero, each entry distinct
        biases = jax.random.uniform(kb, (4, DIM), minval=0.5, maxval=2.0)
        for i, name in enumerate(("query_proj", "key_proj", "value_proj", "output_proj")):
            mha = eqx.tree_at(lambda m, n=name: getattr(m, n).bias, mha, biases[i])
        self.attn = qc.ClippableMultiheadAttention(mha)
        self.head = jax.random.normal(kh, (VOCAB, DIM)) / DIM**0.5

    def __call__(self, tokens, *, positions=None, parallel=None):
        positions = jnp.arange(tokens.shape[0]) if positions is None else positions
        x = self.embed[tokens]
        causal = positions[:, None] >= positions[None, :]
        h, s = self.attn(x, x, x, causal, parallel=parallel)
        return (x + h) @ self.head.T, s


def _loss_and_grads(fn, model, tokens):
    (loss, s), grads = eqx.filter_value_and_grad(lambda m: fn(m, tokens), has_aux=True)(model)
    return loss, s, grads


@pytest.fixture(scope="module")
def reference():
    model = BiasedLM(key=jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (BATCH, T + 1)), jnp.int32)
    out = eqx.filter_jit(_loss_and_grads)(qc.next_token_loss, model, tokens)
    return model, tokens, out


@pytest.mark.parametrize("shape", [dict(model=2), dict(data=2, model=2)])
def test_biased_attention_on_a_mesh_equals_one_device(reference, shape):
    model, tokens, (loss, s, grads) = reference
    for name in ("query_proj", "key_proj", "value_proj", "output_proj"):
        assert float(jnp.min(jnp.abs(getattr(model.attn.mha, name).bias))) >= 0.5
    n = shape.get("data", 1) * shape.get("model", 1)
    mesh = qc.make_mesh(**shape, devices=jax.devices()[:n])
    specs = qc.partition_specs(model)
    placed = jax.tree.map(
        lambda x, p: x if p is None else jax.device_put(x, NamedSharding(mesh, p)),
        model,
        specs,
        is_leaf=lambda x: x is None,
    )
    fn = qc.shard_loss(qc.next_token_loss, mesh)
    got_loss, got_s, got_grads = eqx.filter_jit(_loss_and_grads)(fn, placed, tokens)
    # measured: bit-equal here (jax 0.10.2, CPU); another summation order may differ by ulps
    np.testing.assert_allclose(got_loss, loss, rtol=5e-7)
    np.testing.assert_allclose(got_s, s, rtol=5e-7)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(grads)]
    scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(grads))
    for name, a, b in zip(names, jax.tree.leaves(grads), jax.tree.leaves(got_grads), strict=True):
        # (the key bias's gradient is 0 up to rounding: softmax ignores a constant per row)
        np.testing.assert_allclose(b, a, rtol=0, atol=GRAD_ATOL * scale, err_msg=name)
