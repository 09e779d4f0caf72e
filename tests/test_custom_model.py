"""A researcher's own clippable attention in their own Equinox model: nothing in
this file is from the library except the public API. It trains with QK-Clip on
one device and on a `data=2, model=2` mesh, and the two runs agree."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import Array, Float, Int, PRNGKeyArray

import qkclip_eqx as qc

VOCAB, DIM, HEADS, HEAD_DIM, BATCH, SEQ, STEPS, TAU = 32, 16, 4, 8, 4, 8, 3, 1.5


class MyAttention(qc.AbstractHeadwiseQKClippable):
    """Causal MHA without RoPE, written from scratch with jnp."""

    wq: Float[Array, "heads head_dim dim"]
    wk: Float[Array, "heads head_dim dim"]
    wv: Float[Array, "heads head_dim dim"]
    wo: Float[Array, "dim heads_head_dim"]
    n_heads: int = eqx.field(static=True)

    def __init__(self, *, key: PRNGKeyArray):
        kq, kk, kv, ko = jax.random.split(key, 4)
        self.wq = jax.random.normal(kq, (HEADS, HEAD_DIM, DIM))
        self.wk = jax.random.normal(kk, (HEADS, HEAD_DIM, DIM))
        self.wv = jax.random.normal(kv, (HEADS, HEAD_DIM, DIM)) / DIM**0.5
        self.wo = jax.random.normal(ko, (DIM, HEADS * HEAD_DIM)) / DIM**0.5
        self.n_heads = HEADS

    def __call__(self, x, positions, parallel):
        q, k, v = (jnp.einsum("hdD,sD->hsd", w, x) for w in (self.wq, self.wk, self.wv))
        logits = jnp.einsum("hsd,htd->hst", q, k) / HEAD_DIM**0.5
        allowed = positions[:, None] >= positions[None, :]
        s = jax.lax.stop_gradient(jnp.max(jnp.where(allowed, logits, -jnp.inf), axis=(1, 2)))
        p = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
        out = jnp.einsum("hst,htd->shd", p, v).reshape(x.shape[0], -1)
        y = out @ self.wo.T
        if parallel is not None and parallel.model is not None:
            y = jax.lax.psum(y, parallel.model)  # this device's heads' share of wo
        return y, s

    def scale_heads(self, gamma, alpha):
        wq = self.wq * (gamma**alpha)[:, None, None]
        wk = self.wk * (gamma ** (1 - alpha))[:, None, None]
        return eqx.tree_at(lambda m: (m.wq, m.wk), self, (wq, wk))

    def head_axes(self):
        return (lambda m: (m.wq, m.wk, m.wv, m.wo)), (-3, -3, -3, -1)


class MyLM(eqx.Module):
    embed: Float[Array, "vocab dim"]
    attn: MyAttention
    head: Float[Array, "vocab dim"]

    def __init__(self, *, key: PRNGKeyArray):
        ke, ka, kh = jax.random.split(key, 3)
        self.embed = jax.random.normal(ke, (VOCAB, DIM))
        self.attn = MyAttention(key=ka)
        self.head = jax.random.normal(kh, (VOCAB, DIM)) / DIM**0.5

    def __call__(self, tokens: Int[Array, " seq"], *, positions=None, parallel=None):
        positions = jnp.arange(tokens.shape[0]) if positions is None else positions
        x = self.embed[tokens]
        h, s = self.attn(x, positions, parallel)
        return (x + h) @ self.head.T, s

    def muon_dimension_numbers(self):
        """Muon for the attention matrices, AdamW for embedding and head."""
        adamw = jax.tree.map(lambda _: None, self)
        return eqx.tree_at(lambda m: m.attn, adamw, qc.matrix_dimension_numbers(self.attn))


def _run(mesh):
    model = MyLM(key=jax.random.key(0))
    opt = qc.muon_adamw(3e-2)
    state = opt.init(eqx.filter(model, eqx.is_array))
    if mesh is not None:
        model, state = qc.shard_train_state(model, state, opt, mesh)
    step = qc.make_train_step(opt, mode="clip", tau=TAU, mesh=mesh)
    rng = np.random.default_rng(0)
    metrics = []
    for _ in range(STEPS):
        tokens = rng.integers(0, VOCAB, (BATCH, SEQ + 1)).astype(np.int32)
        tokens = jnp.asarray(tokens) if mesh is None else qc.shard_batch(tokens, mesh)
        model, state, m = step(model, state, tokens)
        metrics.append(jax.device_get(m))
    return model, metrics


@pytest.fixture(scope="module")
def runs():
    mesh = qc.make_mesh(data=2, model=2, devices=jax.devices()[:4])
    return _run(None), _run(mesh)


def test_user_model_on_a_mesh_matches_one_device_with_the_clip_acting(runs):
    (ref_model, ref_m), (model, m) = runs
    assert sum(int(x["heads_clipped"]) for x in ref_m) > 0, "the clip must act"
    for a, b in zip(ref_m, m):
        assert int(a["heads_clipped"]) == int(b["heads_clipped"])
        # measured rel 1.6e-7 (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_allclose(a["max_logits"], b["max_logits"], rtol=8e-7)
        # measured rel 2.2e-7 (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(ref_model), jax.tree.leaves(model)):
        # measured max |diff| 5.3e-6, 21% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_allclose(a, b, rtol=2.5e-5, atol=2.5e-6)
    # the heads really were sharded: each device holds 2 of the 4
    assert tuple(model.attn.wq.sharding.spec)[0] == "model"
    assert {s.data.shape for s in model.attn.wq.addressable_shards} == {(HEADS // 2, HEAD_DIM, DIM)}
    assert tuple(model.attn.wo.sharding.spec)[1] == "model"


def test_clip_identity_holds_for_the_user_module():
    """After a clip, re-running the batch gives min(S, tau) per head."""
    model = MyLM(key=jax.random.key(1))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (BATCH, SEQ + 1)), jnp.int32)
    _, s = qc.next_token_loss(model, tokens)
    tau = float(np.median(np.asarray(s)))
    _, s2 = qc.next_token_loss(qc.qk_clip(model, s, tau), tokens)
    # measured rel 1.8e-7 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(s2, np.minimum(np.asarray(s), tau), rtol=8e-7)
    assert np.sum(np.asarray(s) > tau) > 0


def test_mesh_check_reads_the_user_module_layout():
    mesh = qc.make_mesh(data=1, model=8)
    model = MyLM(key=jax.random.key(0))
    opt = qc.muon_adamw(1e-2)
    step = qc.make_train_step(opt, mesh=mesh)
    with pytest.raises(
        ValueError, match="MyAttention: n_heads=4 is not divisible by the mesh's model axis"
    ):
        step(model, opt.init(eqx.filter(model, eqx.is_array)), jnp.zeros((8, SEQ + 1), jnp.int32))


def test_a_loss_without_parallel_is_refused_on_a_mesh():
    def my_loss(model, tokens):
        return qc.next_token_loss(model, tokens)

    with pytest.raises(TypeError, match="must take a `parallel` keyword"):
        qc.make_train_step(qc.muon_adamw(1e-2), loss_fn=my_loss, mesh=qc.make_mesh(data=8))


def test_a_custom_loss_with_parallel_runs_on_a_mesh(runs):
    """A loss that wraps next_token_loss (here: twice the loss) trains on a mesh."""

    def doubled(model, tokens, *, parallel=None):
        loss, s = qc.next_token_loss(model, tokens, parallel=parallel)
        return 2 * loss, s

    mesh = qc.make_mesh(data=2, model=2, devices=jax.devices()[:4])
    model = MyLM(key=jax.random.key(0))
    opt = qc.muon_adamw(3e-2)
    state = opt.init(eqx.filter(model, eqx.is_array))
    model, state = qc.shard_train_state(model, state, opt, mesh)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ + 1)).astype(np.int32)
    step = qc.make_train_step(opt, mode="clip", tau=TAU, loss_fn=doubled, mesh=mesh)
    _, _, m = step(model, state, qc.shard_batch(tokens, mesh))
    (_, ref_m) = runs[0]
    # measured rel 1.1e-7 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(m["loss"], 2 * ref_m[0]["loss"], rtol=5e-7)
    # measured rel 1.1e-7 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(m["max_logits"], ref_m[0]["max_logits"], rtol=5e-7)
