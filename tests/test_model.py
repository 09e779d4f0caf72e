"""The scanned Transformer: shapes and dtypes, per-layer S equal to an unrolled
run of the stacked blocks, causality, vmap over a batch, and a jaxpr whose size
does not depend on depth."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkclip_eqx import GQAConfig, MLAConfig, Transformer, TransformerConfig, next_token_loss

T = 10
VOCAB = 48
LAYERS = 3

ATTENTION = {
    "mla": MLAConfig(
        dim=32,
        n_heads=4,
        kv_lora_rank=8,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        q_lora_rank=8,
    ),
    "gqa": GQAConfig(dim=32, n_heads=4, head_dim=8, n_kv_heads=2),
}


def config(kind, n_layers=LAYERS, **dtypes):
    return TransformerConfig(
        vocab_size=VOCAB, n_layers=n_layers, mlp_hidden=32, attention=ATTENTION[kind], **dtypes
    )


def build(cfg, seed=0):
    """The model's structure from its constructor (traced, not run), with every
    weight drawn by NumPy: eager jax.random compiles one kernel per shape."""
    shapes = eqx.filter_eval_shape(Transformer, cfg, key=jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            w = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
        elif "embed" in name:
            w = rng.standard_normal(leaf.shape)
        else:
            w = 1.5 * rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[-1])
        return jnp.asarray(w.astype(np.float32), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@eqx.filter_jit
def forward(model, tokens, positions=None, segment_ids=None):
    return model(tokens, positions=positions, segment_ids=segment_ids)


def tokens_for(seed, t=T):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, size=t, dtype=np.int32))


@pytest.fixture(scope="module")
def models():
    return {kind: build(config(kind), seed=i) for i, kind in enumerate(ATTENTION)}


@pytest.mark.parametrize("kind", list(ATTENTION))
def test_shapes_and_dtypes(models, kind):
    model = models[kind]
    assert jax.tree.leaves(model.blocks)[0].shape[0] == LAYERS  # stacked, not a list
    logits, s = forward(model, tokens_for(0))
    assert logits.shape == (T, VOCAB) and logits.dtype == jnp.float32
    assert s.shape == (LAYERS, ATTENTION[kind].n_heads) and s.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits))) and np.all(np.isfinite(np.asarray(s)))


def test_bf16_model_gives_float32_logits():
    """Pure bf16 storage (param_dtype) still gives float32 logits and S; the
    bf16-compute policy with float32 weights is tested in test_precision.py."""
    model = build(config("gqa", param_dtype="bfloat16", compute_dtype="bfloat16"))
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(model))
    logits, s = forward(model, tokens_for(0))
    assert logits.dtype == jnp.float32 and s.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits))) and np.all(np.isfinite(np.asarray(s)))


def layer(blocks, i):
    """Layer i of the stacked blocks."""
    return jax.tree.map(lambda a: a[i], blocks)


def rms_norm(x, norm, eps):
    """Zhang & Sennrich 2019, written here: w * x / sqrt(mean(x^2) + eps)."""
    return norm.weight * x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def swiglu(x, mlp):
    """Shazeer 2020 (arXiv 2002.05202), written here: W_down (silu(W_gate x) * W_up x)."""
    g = x @ mlp.w_gate.T
    return (g * jax.nn.sigmoid(g) * (x @ mlp.w_up.T)) @ mlp.w_down.T


@eqx.filter_jit
def unrolled(model, tokens, positions, segment_ids):
    """The model written out layer by layer, from the stacked weights: the
    pre-norm residual block, RMSNorm and SwiGLU written here (the attention
    module is the library's, checked against NumPy in test_attention.py)."""
    eps = model.config.norm_eps
    x = model.embed[tokens]
    s_per_layer = []
    for i in range(model.config.n_layers):
        blk = layer(model.blocks, i)
        h, s_i = blk.attn(
            rms_norm(x, blk.attn_norm, eps), positions=positions, segment_ids=segment_ids
        )
        x = x + h
        x = x + swiglu(rms_norm(x, blk.mlp_norm, eps), blk.mlp)
        s_per_layer.append(s_i)
    return rms_norm(x, model.final_norm, eps) @ model.lm_head.T, jnp.stack(s_per_layer)


@pytest.mark.parametrize("kind", list(ATTENTION))
def test_per_layer_s_equals_unrolled_layers(models, kind):
    """Row i of S is layer i's own max logits: guards against a scan that mixes
    the layers' weights or reports one layer's S for all."""
    model = models[kind]
    tokens = tokens_for(1)
    # Two packed documents, positions restarting: the scan must hand positions
    # and segment ids to every layer.
    positions = jnp.asarray(np.r_[np.arange(4), np.arange(T - 4)].astype(np.int32))
    segments = jnp.asarray(np.r_[np.zeros(4), np.ones(T - 4)].astype(np.int32))
    logits, s = forward(model, tokens, positions, segments)
    ref_logits, ref_s = unrolled(model, tokens, positions, segments)
    s, ref_s = np.asarray(s), np.asarray(ref_s)
    # measured max |diff| 2.4e-6, 22% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(s, ref_s, rtol=4e-6, atol=4e-7)
    # measured max |diff| 3.8e-6, 22% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=8e-5, atol=8e-6)
    # The layers really differ, so a mix-up could not pass.
    for i in range(LAYERS):
        for j in range(i):
            assert np.max(np.abs(s[i] - s[j])) > 1e-3, (i, j, s)
    # And the segments matter (so the check above covers their passing on).
    _, s_one_doc = unrolled(
        model, tokens, positions * 0 + jnp.arange(T, dtype=jnp.int32), segments * 0
    )
    assert not np.allclose(np.asarray(s_one_doc), ref_s, atol=1e-3)


@pytest.mark.parametrize("kind", list(ATTENTION))
def test_logits_are_causal(models, kind):
    model = models[kind]
    tokens = tokens_for(2)
    t = 6
    changed = tokens.at[t].set((tokens[t] + 7) % VOCAB)
    logits, _ = forward(model, tokens)
    logits2, _ = forward(model, changed)
    logits, logits2 = np.asarray(logits), np.asarray(logits2)
    # bit-equal (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_array_equal(logits2[:t], logits[:t])
    assert np.all(np.max(np.abs(logits2[t:] - logits[t:]), axis=-1) > 1e-4)


def test_vmap_over_a_batch(models):
    model = models["mla"]
    batch = jnp.stack([tokens_for(10 + b) for b in range(3)])
    logits, s = eqx.filter_jit(lambda m, b: jax.vmap(m)(b))(model, batch)
    assert logits.shape == (3, T, VOCAB) and s.shape == (3, LAYERS, ATTENTION["mla"].n_heads)
    for b in range(3):
        lb, sb = forward(model, batch[b])
        # bit-equal (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_array_equal(np.asarray(logits[b]), np.asarray(lb))
        # bit-equal (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_array_equal(np.asarray(s[b]), np.asarray(sb))
    assert not np.allclose(np.asarray(s[0]), np.asarray(s[1]))  # examples differ


@pytest.mark.parametrize("kind", list(ATTENTION))
def test_packed_batch_equals_the_vmapped_batch(models, kind):
    """next_token_loss packs the batch into one sequence with segment_length:
    the loss, S and gradients equal those of the model vmapped over the rows."""
    model = models[kind]
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, VOCAB, (3, T + 1)), jnp.int32)

    def vmapped(m, tokens):
        logits, s = jax.vmap(m)(tokens[:, :-1])
        ce = -jax.nn.log_softmax(logits)[jnp.arange(3)[:, None], jnp.arange(T), tokens[:, 1:]]
        return ce.mean(), s.max(axis=0)

    grad = eqx.filter_jit(eqx.filter_value_and_grad(lambda m, t, f: f(m, t), has_aux=True))
    (loss_p, s_p), g_p = grad(model, tokens, next_token_loss)
    (loss_v, s_v), g_v = grad(model, tokens, vmapped)
    # measured rel 9.9e-8 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(loss_p, loss_v, rtol=4e-7)
    np.testing.assert_array_equal(s_p, s_v)  # the same kernel on the same tiles
    for a, b in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_v)):
        # measured max |diff| 9.5e-8 where rtol does not cover it (jax 0.12.1, CPU;
        # 6e-8 on jax 0.10.2 and 0.12.0.1): 32% of this atol
        np.testing.assert_allclose(a, b, rtol=6e-6, atol=3e-7)
    # positions restart in every segment: the rows are independent sequences
    logits, _ = eqx.filter_jit(lambda m, x: m(x, segment_length=T))(
        model, tokens[:, :-1].reshape(-1)
    )
    one, _ = forward(model, tokens[1, :-1])
    # bit-equal (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_array_equal(logits[T : 2 * T], one)


def test_segment_length_must_divide_the_sequence(models):
    with pytest.raises(ValueError, match="segment_length=4 does not divide the sequence length 10"):
        models["gqa"](tokens_for(0), segment_length=4)


def _count_eqns(jaxpr) -> int:
    """Equations of a jaxpr, including those of every nested jaxpr (scan body,
    pjit, custom_jvp, ...)."""
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                # both have .eqns (jax 0.12 merges the two and deprecates .jaxpr)
                if isinstance(sub, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
                    n += _count_eqns(sub)
    return n


@pytest.mark.parametrize("kind", list(ATTENTION))
def test_program_size_does_not_grow_with_depth(kind):
    tokens = tokens_for(3)
    sizes, scans = {}, {}
    for n_layers in (2, 8):
        model = eqx.filter_eval_shape(Transformer, config(kind, n_layers), key=jax.random.key(0))
        jaxpr = jax.make_jaxpr(lambda m, t: m(t))(model, tokens)
        sizes[n_layers] = (len(jaxpr.eqns), _count_eqns(jaxpr))
        scans[n_layers] = [e.params["length"] for e in jaxpr.eqns if e.primitive.name == "scan"]
    assert sizes[2] == sizes[8], sizes
    assert sizes[2][1] > 50  # a real model was traced
    assert scans == {2: [2], 8: [8]}  # one scan over the layers, of the right length
