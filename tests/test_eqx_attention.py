"""`qkclip_eqx.ClippableMultiheadAttention`: an `eqx.nn.MultiheadAttention`,
unchanged, returning S. Its output is the wrapped module's; S equals a float64
NumPy brute force; after QK-Clip at tau re-running gives min(S, tau) per head
(Kimi K2 report, sec. 2.1); a user model with it trains on a data=2, fsdp=2,
model=2 mesh as on one device; and it serialises as the plain module does."""

import io

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import qkclip_eqx as qc

HEADS, DIM, QK, SEQ, KV_SEQ = 4, 16, 6, 7, 9


def _mha(key=0, **kw):
    kw = dict(use_query_bias=True, use_key_bias=True, use_output_bias=True) | kw
    return eqx.nn.MultiheadAttention(
        HEADS, DIM, qk_size=QK, vo_size=5, key=jax.random.key(key), **kw
    )


def _inputs(seed=1):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((SEQ, DIM)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((KV_SEQ, DIM)), jnp.float32)
    mask2 = jnp.asarray(rng.random((SEQ, KV_SEQ)) < 0.6).at[:, 0].set(True)
    mask3 = jnp.asarray(rng.random((HEADS, SEQ, KV_SEQ)) < 0.6).at[:, :, 0].set(True)
    return q, kv, mask2, mask3


def _rope(q, k, v):
    rope = eqx.nn.RotaryPositionalEmbedding(QK)
    along = lambda x: jax.vmap(rope, in_axes=1, out_axes=1)(x)  # noqa: E731
    return along(q), along(k), v


def _np_s(mha, query, kv, mask, rope):
    """S per head in float64: the masked max of q.k / sqrt(d_qk)."""
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    q = f64(query) @ f64(mha.query_proj.weight).T + f64(mha.query_proj.bias)
    k = f64(kv) @ f64(mha.key_proj.weight).T + f64(mha.key_proj.bias)
    q, k = q.reshape(SEQ, HEADS, QK), k.reshape(KV_SEQ, HEADS, QK)
    if rope:  # RoPE in float64, eqx's convention: rotate halves, theta 10000

        def rot(x):
            pos = np.arange(x.shape[0])[:, None, None]
            freqs = 10000.0 ** (-np.arange(0, QK, 2) / QK)
            ang = np.concatenate([pos * freqs, pos * freqs], axis=-1)
            half = np.concatenate([-x[..., QK // 2 :], x[..., : QK // 2]], axis=-1)
            return x * np.cos(ang) + half * np.sin(ang)

        q, k = rot(q), rot(k)
    logits = np.einsum("shd,Shd->hsS", q, k) / np.sqrt(QK)
    m = np.broadcast_to(np.asarray(mask), logits.shape)
    return np.where(m, logits, -np.inf).max(axis=(1, 2))


CASES = {"mask2": (2, None), "mask3": (3, None), "rope": (2, _rope), "no_mask": (0, None)}


@pytest.mark.parametrize("case", list(CASES))
def test_output_is_the_modules_and_s_is_the_float64_brute_force(case):
    ndim, process = CASES[case]
    mha = _mha()
    q, kv, mask2, mask3 = _inputs()
    mask = {0: None, 2: mask2, 3: mask3}[ndim]
    ours = qc.ClippableMultiheadAttention(mha)
    out, s = eqx.filter_jit(lambda m: m(q, kv, kv, mask, process_heads=process))(ours)
    ref = eqx.filter_jit(lambda m: m(q, kv, kv, mask, process_heads=process))(mha)
    # the same ops in the same order: equal bit for bit (measured: max |diff| 0.0)
    np.testing.assert_array_equal(out, ref)
    full = np.ones((SEQ, KV_SEQ), bool) if mask is None else mask
    # measured rel 1.1e-7 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(s, _np_s(mha, q, kv, full, process is not None), rtol=5e-7)
    assert s.dtype == jnp.float32 and s.shape == (HEADS,)


def test_clip_identity_per_head_with_biases_and_rope():
    """After qk_clip at tau, S is min(S, tau) per head; heads below tau keep
    their q/k weights and biases bit for bit."""
    mha = _mha(2)
    ours = qc.ClippableMultiheadAttention(mha)
    q, kv, mask, _ = _inputs(3)
    run = eqx.filter_jit(lambda m: m(q, kv, kv, mask, process_heads=_rope)[1])
    s = np.asarray(run(ours))
    tau = float(np.median(s))
    assert np.sum(s > tau) == 2
    clipped = qc.qk_clip(ours, jnp.asarray(s), tau)
    # measured rel 2.6e-7 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(run(clipped), np.minimum(s, tau), rtol=1.2e-6)
    rows = np.repeat(s <= tau, QK)
    for name in ("query_proj", "key_proj"):
        for part in ("weight", "bias"):
            before = np.asarray(getattr(getattr(mha, name), part))
            after = np.asarray(getattr(getattr(clipped.mha, name), part))
            assert np.array_equal(before[rows], after[rows])
            assert not np.any(np.isclose(before[~rows], after[~rows]))
    # the value and output projections are never touched
    assert eqx.tree_equal(clipped.mha.value_proj, mha.value_proj)
    assert eqx.tree_equal(clipped.mha.output_proj, mha.output_proj)


def test_back_to_the_plain_module_and_the_same_checkpoint():
    class Plain(eqx.Module):
        attn: eqx.Module
        head: jax.Array

    mha = _mha(4)
    plain, wrapped = (
        Plain(mha, jnp.ones(3)),
        Plain(qc.ClippableMultiheadAttention(mha), jnp.ones(3)),
    )
    assert isinstance(wrapped.attn.mha, eqx.nn.MultiheadAttention)  # pyright: ignore
    assert eqx.tree_equal(wrapped.attn.mha, mha)  # pyright: ignore
    buf_plain, buf_wrapped = io.BytesIO(), io.BytesIO()
    eqx.tree_serialise_leaves(buf_plain, plain)
    eqx.tree_serialise_leaves(buf_wrapped, wrapped)
    assert buf_plain.getvalue() == buf_wrapped.getvalue()
    buf_wrapped.seek(0)
    loaded = eqx.tree_deserialise_leaves(buf_wrapped, Plain(_mha(5), jnp.zeros(3)))
    assert eqx.tree_equal(loaded, plain)


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match="mha"):  # the runtime type checker may answer first
        qc.ClippableMultiheadAttention(eqx.nn.Linear(2, 2, key=jax.random.key(0)))  # pyright: ignore
    q, kv, _, _ = _inputs()
    ours = qc.ClippableMultiheadAttention(_mha())
    with pytest.raises((ValueError, TypeError), match="mask"):  # or the type checker first
        ours(q, kv, kv, jnp.ones((SEQ, SEQ), bool))


# ---- a user's model on a mesh -------------------------------------------------------------------

VOCAB, BATCH, T, STEPS, TAU = 32, 4, 8, 3, 1.0


class UserLM(eqx.Module):
    """A user's model: embedding, eqx.nn.MultiheadAttention (wrapped), head."""

    embed: jax.Array
    attn: qc.ClippableMultiheadAttention
    head: jax.Array

    def __init__(self, *, key):
        ke, ka, kh = jax.random.split(key, 3)
        self.embed = jax.random.normal(ke, (VOCAB, DIM))
        mha = eqx.nn.MultiheadAttention(HEADS, DIM, use_query_bias=True, key=ka)
        self.attn = qc.ClippableMultiheadAttention(mha)
        self.head = jax.random.normal(kh, (VOCAB, DIM)) / DIM**0.5

    def __call__(self, tokens, *, positions=None, parallel=None):
        positions = jnp.arange(tokens.shape[0]) if positions is None else positions
        x = self.embed[tokens] * 3.0
        causal = positions[:, None] >= positions[None, :]
        h, s = self.attn(x, x, x, causal, parallel=parallel)
        return (x + h) @ self.head.T, s


def _routing(p):
    return qc.matrix_dimension_numbers(p, exclude=lambda m: (m.embed, m.head))


def _train(mesh):
    model = UserLM(key=jax.random.key(0))
    opt = qc.muon_adamw(3e-2, weight_dimension_numbers=_routing)
    state = opt.init(eqx.filter(model, eqx.is_array))
    if mesh is not None:
        model, state = qc.shard_train_state(model, state, opt, mesh)
    step = qc.make_train_step(opt, mode="clip", tau=TAU, mesh=mesh)
    rng = np.random.default_rng(0)
    metrics = []
    for _ in range(STEPS):
        tokens = rng.integers(0, VOCAB, (BATCH, T + 1)).astype(np.int32)
        tokens = jnp.asarray(tokens) if mesh is None else qc.shard_batch(tokens, mesh)
        model, state, m = step(model, state, tokens)
        metrics.append(jax.device_get(m))
    return model, metrics


def test_user_model_on_a_data2_fsdp2_model2_mesh_matches_one_device():
    """Under FSDP too: the user's model is gathered whole at the loss's entry
    (it does not gather its own layers), its gradients and state stay sharded."""
    ref_model, ref_m = _train(None)
    model, m = _train(qc.make_mesh(data=2, fsdp=2, model=2))
    assert sum(int(x["heads_clipped"]) for x in ref_m) > 0, "the clip must act"
    for a, b in zip(ref_m, m):
        assert int(a["heads_clipped"]) == int(b["heads_clipped"])
        # measured rel 3.9e-7 and 1.5e-7 (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_allclose(a["max_logits"], b["max_logits"], rtol=2e-6)
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=7.5e-7)
    for a, b in zip(jax.tree.leaves(ref_model), jax.tree.leaves(model)):
        # measured: 11% of rtol=1e-4, atol=1e-5 (jax 0.12.0.1; 0.4% on 0.10.2, CPU)
        np.testing.assert_allclose(a, b, rtol=4.5e-5, atol=4.5e-6)
    wq = model.attn.mha.query_proj.weight
    assert wq.sharding.spec == P("model", "fsdp")
    assert {s.data.shape for s in wq.addressable_shards} == {(DIM // 2, DIM // 2)}
    # a vector split over `model` has no axis left for fsdp: replicated over it
    assert model.attn.mha.query_proj.bias.sharding.spec == P("model")  # pyright: ignore
    assert model.attn.mha.output_proj.weight.sharding.spec == P("fsdp", "model")
    assert model.embed.sharding.spec == P(None, "fsdp")
