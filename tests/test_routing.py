"""Optimizer routing of a user's own Equinox model in one call
(`matrix_dimension_numbers(p, exclude=...)`), and the mistakes a user makes on
the way getting an error that names the leaf and the fix before optax sees them.

Two model shapes: an `eqx.nn.MLP` between an embedding and a head, and an
embedding + `eqx.nn.MultiheadAttention` + head. Routing (Moonlight, arXiv
2502.16982, sec. 2.2): hidden matrices to Muon; embedding, head and vectors to
AdamW."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
from optax.contrib import MuonDimensionNumbers

import qkclip_eqx as qc

LR, WD = 1e-2, 0.1


class MLPModel(eqx.Module):
    embedding: eqx.nn.Embedding
    mlp: eqx.nn.MLP
    head: eqx.nn.Linear

    def __init__(self, *, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.embedding = eqx.nn.Embedding(11, 8, key=k1)
        self.mlp = eqx.nn.MLP(8, 8, 12, 2, key=k2)
        self.head = eqx.nn.Linear(8, 11, key=k3)

    def __call__(self, tokens):
        return jax.vmap(lambda t: self.head(self.mlp(self.embedding(t))))(tokens)


class AttentionModel(eqx.Module):
    embedding: eqx.nn.Embedding
    attn: eqx.nn.MultiheadAttention
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, *, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.embedding = eqx.nn.Embedding(11, 8, key=k1)
        self.attn = eqx.nn.MultiheadAttention(2, 8, use_query_bias=True, key=k2)
        self.norm = eqx.nn.LayerNorm(8)
        self.head = eqx.nn.Linear(8, 11, use_bias=False, key=k3)

    def __call__(self, tokens):
        x = jax.vmap(self.embedding)(tokens)
        x = x + self.attn(x, x, x)
        return jax.vmap(lambda v: self.head(self.norm(v)))(x)


def _exclude(m):
    return (m.embedding, m.head)


def _routing(p):
    return qc.matrix_dimension_numbers(p, exclude=_exclude)


def _routes(model) -> dict[str, object]:
    """The route of every array leaf, by path."""
    params = eqx.filter(model, eqx.is_array)
    dims = _routing(params)
    flat = jtu.tree_flatten_with_path(
        dims, is_leaf=lambda x: x is None or isinstance(x, MuonDimensionNumbers)
    )
    arrays = {jtu.keystr(p) for p, _ in jtu.tree_flatten_with_path(params)[0]}
    return {jtu.keystr(p): d for p, d in flat[0] if jtu.keystr(p) in arrays}


def _loss(model, tokens):
    return jnp.mean(model(tokens) ** 2)


@pytest.mark.parametrize("make", [MLPModel, AttentionModel])
def test_one_call_routes_hidden_matrices_to_muon_and_the_rest_to_adamw(make):
    model = make(key=jax.random.key(0))
    params = eqx.filter(model, eqx.is_array)
    routes = _routes(model)
    leaves = {jtu.keystr(p): x for p, x in jtu.tree_flatten_with_path(params)[0]}
    assert set(routes) == set(leaves)
    for path, leaf in leaves.items():
        hidden = leaf.ndim == 2 and not path.startswith((".embedding", ".head"))
        assert routes[path] == (MuonDimensionNumbers(1, (0,)) if hidden else None), path
    assert sum(r is not None for r in routes.values()) >= 3  # three MLP layers / q, k, v, o

    # One step of muon_adamw: the AdamW leaves get exactly optax.adamw's update,
    # the Muon leaves exactly what the same routing given leaf by leaf gives.
    grads = eqx.filter_grad(_loss)(model, jnp.arange(5) % 11)
    opt = qc.muon_adamw(LR, weight_decay=WD, weight_dimension_numbers=_routing)
    updates, _ = opt.update(grads, opt.init(params), params)
    adamw = optax.adamw(LR, b1=0.9, b2=0.95, eps=1e-8, weight_decay=WD)
    ref, _ = adamw.update(grads, adamw.init(params), params)
    by_path = lambda t: {jtu.keystr(p): x for p, x in jtu.tree_flatten_with_path(t)[0]}  # noqa: E731
    got, ref = by_path(updates), by_path(ref)
    for path, route in routes.items():
        if route is None:
            np.testing.assert_array_equal(got[path], ref[path], err_msg=path)
        else:
            # Muon's update is orthogonalised: RMS 0.2 * sqrt(max(n, m)) / sqrt(n m) * lr, not AdamW's
            assert not np.allclose(got[path], ref[path]), path


def test_a_fixed_tree_with_none_written_in_is_refused_by_leaf_and_fix():
    """The first try: build the tree once from the full params, write None into
    the embedding and head, and hand it over. optax calls the routing on masked
    copies, whose AdamW leaves are MaskedNode, not None."""
    model = MLPModel(key=jax.random.key(0))
    params = eqx.filter(model, eqx.is_array)
    dims = qc.matrix_dimension_numbers(params)
    dims = eqx.tree_at(
        lambda d: (d.embedding.weight, d.head.weight),
        dims,
        (None, None),
        is_leaf=lambda x: isinstance(x, MuonDimensionNumbers),
    )
    opt = qc.muon_adamw(LR, weight_dimension_numbers=lambda p: dims)
    state = opt.init(params)  # the labels see the full params: no mismatch yet
    grads = eqx.filter_grad(_loss)(model, jnp.arange(5) % 11)
    with pytest.raises(ValueError, match=r"at \.embedding\.weight, the params are masked") as e:
        opt.update(grads, state, params)
    assert "lambda p: qc.matrix_dimension_numbers(p, exclude=" in str(e.value)


def test_a_wrong_structure_or_layout_is_refused_by_leaf():
    model = AttentionModel(key=jax.random.key(0))
    params = eqx.filter(model, eqx.is_array)
    as_dict = qc.muon_adamw(LR, weight_dimension_numbers=lambda p: {"attn": None})
    with pytest.raises(ValueError, match=r"at \.embedding\.weight, .* has nothing"):
        as_dict.init(params)

    def bad_axis(p):
        d = qc.matrix_dimension_numbers(p, exclude=_exclude)
        return eqx.tree_at(lambda d: d.attn.query_proj.weight, d, MuonDimensionNumbers(2, (0,)))

    with pytest.raises(ValueError, match=r"at \.attn\.query_proj\.weight, .* does not fit"):
        qc.muon_adamw(LR, weight_dimension_numbers=bad_axis).init(params)
    with pytest.raises(ValueError, match=r"at \.norm\.weight, an array of shape \(8,\) is routed"):
        qc.muon_adamw(
            LR,
            weight_dimension_numbers=lambda p: eqx.tree_at(
                lambda d: d.norm.weight, _routing(p), "adamw", is_leaf=lambda x: x is None
            ),
        ).init(params)
    # (under the test suite's runtime type checker, its own TypeError comes first)
    with pytest.raises(TypeError, match="weight_dimension_numbers"):
        qc.muon_adamw(LR, weight_dimension_numbers={"w": None})  # pyright: ignore


def test_exclude_that_misses_the_tree_is_refused():
    params = eqx.filter(MLPModel(key=jax.random.key(0)), eqx.is_array)
    with pytest.raises(ValueError, match="exclude= must select leaves or subtrees"):
        qc.matrix_dimension_numbers(params, exclude=lambda m: m.embed)
