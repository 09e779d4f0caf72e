"""Absorbed-MLA decoding with the latent KV cache.

The absorbed form (q_C^h W_UK^h against the cached latent, W_UV^h after the
softmax) against the full, non-absorbed forward at every position: outputs,
logits and S, q LoRA on and off, before and after a QK-Clip, with YaRN; S per
decoded position against a float64 NumPy reference of the per-query max logit
written here from the documented weight layout; the cache's size per token
from its shapes."""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from builders import init_from_numpy
from qkclip_eqx import (
    GQAConfig,
    GQAttention,
    KVCache,
    MLACache,
    MLAConfig,
    MLAttention,
    Transformer,
    TransformerConfig,
    YaRN,
    qk_clip,
)

T = 9  # sequence length
PREFILL = 3  # then T - PREFILL steps of one token
ATTN = {
    "qlora": MLAConfig(
        dim=32,
        n_heads=3,
        kv_lora_rank=12,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        q_lora_rank=10,
    ),
    "noqlora": MLAConfig(
        dim=32, n_heads=3, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=6
    ),
}
DSV3_YARN = YaRN(
    factor=40.0,
    original_max_position_embeddings=4,
    beta_fast=32.0,
    beta_slow=1.0,
    mscale=1.0,
    mscale_all_dim=1.0,
)


def build_attention(config, seed=0):
    rng = np.random.default_rng(seed)
    shape_tree = eqx.filter_eval_shape(MLAttention, config, key=jax.random.key(0))

    def fill(path, leaf):
        if "norm" in jax.tree_util.keystr(path):
            w = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
        else:  # larger than 1/fan_in so that logits spread over several units
            w = 2.0 * rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[-1])
        return jnp.asarray(w, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shape_tree)


clip = eqx.filter_jit(qk_clip)


@eqx.filter_jit
def full(module, x):
    return module(x)


@eqx.filter_jit
def decode(module, x, cache):
    return module.decode(x, cache)


def decode_in_steps(module, x, max_len=T + 2):
    """Prefill PREFILL tokens, then one token per step: outputs and S per call."""
    cache = module.init_cache(max_len)
    out, s, cache = decode(module, x[:PREFILL], cache)
    outs, ss = [out], [s]
    for i in range(PREFILL, x.shape[0]):
        out, s, cache = decode(module, x[i : i + 1], cache)
        outs.append(out)
        ss.append(s)
    return jnp.concatenate(outs), jnp.stack(ss), cache


def np_row_max_logits(m: MLAttention, x) -> np.ndarray:
    """[seq, heads]: per query, the max over keys j <= i of the scaled logit
    (q_C.k_C + q_R.k_R) / sqrt(d_qk), non-absorbed, float64, plain interleaved RoPE."""
    c = m.config
    w = {
        k: np.asarray(v, np.float64)
        for k, v in (
            ("wq", m.wq),
            ("wkv_a", m.wkv_a),
            ("wkv_b", m.wkv_b),
            ("kv_norm", m.kv_norm.weight),
        )
    }
    x = np.asarray(x, np.float64)

    def rms(a, g):
        return g * a / np.sqrt(np.mean(a * a, -1, keepdims=True) + c.norm_eps)

    def rope(a):  # [seq, ..., d], pairs (2i, 2i+1)
        d = a.shape[-1]
        ang = np.arange(a.shape[0])[:, None] * c.rope_theta ** (-np.arange(0, d, 2) / d)
        ang = ang.reshape(a.shape[0], *([1] * (a.ndim - 2)), d // 2)
        a1, a2 = a[..., 0::2], a[..., 1::2]
        return np.stack(
            [a1 * np.cos(ang) - a2 * np.sin(ang), a2 * np.cos(ang) + a1 * np.sin(ang)], -1
        ).reshape(a.shape)

    q_in = (
        x
        if m.wq_a is None
        else rms(x @ np.asarray(m.wq_a, np.float64).T, np.asarray(m.q_norm.weight, np.float64))
    )
    q = np.einsum("si,hdi->shd", q_in, w["wq"])
    nope, r = c.qk_nope_head_dim, c.kv_lora_rank
    kv_a = x @ w["wkv_a"].T
    k_c = np.einsum("sr,hdr->shd", rms(kv_a[:, :r], w["kv_norm"]), w["wkv_b"][:, :nope])
    logits = (
        np.einsum("qhd,khd->hqk", q[..., :nope], k_c)
        + np.einsum("qhd,kd->hqk", rope(q[..., nope:]), rope(kv_a[:, r:]))
    ) / np.sqrt(c.qk_head_dim)
    causal = np.tril(np.ones((x.shape[0], x.shape[0]), bool))
    return np.where(causal, logits, -np.inf).max(-1).T


@pytest.fixture(scope="module", params=list(ATTN))
def attention(request):
    module = build_attention(ATTN[request.param])
    x = jnp.asarray(np.random.default_rng(1).standard_normal((T, module.config.dim)), jnp.float32)
    return request.param, module, x


def test_attention_decode_equals_full_forward_at_every_position(attention):
    _, module, x = attention
    out_full, s_full = full(module, x)
    out, s_steps, cache = decode_in_steps(module, x)
    scale = float(jnp.abs(out_full).max())
    # measured abs 5.2e-6 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(np.asarray(out), np.asarray(out_full), rtol=0, atol=1.5e-6 * scale)
    # measured max |diff| 1.4e-6, 21% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(np.asarray(s_steps.max(0)), np.asarray(s_full), rtol=8e-7, atol=8e-7)
    # S of each call: the max over its own new queries of the logit entering the softmax.
    rows = np_row_max_logits(module, x)
    expected = np.concatenate([rows[:PREFILL].max(0, keepdims=True), rows[PREFILL:]])
    # measured max |diff| 2.4e-6, 20% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(np.asarray(s_steps), expected, rtol=2e-6, atol=2e-6)
    assert np.ptp(expected) > 1.0  # heads and positions differ: the comparison can fail
    assert int(cache.length) == T


def test_attention_decode_after_qk_clip_is_min_s_tau(attention):
    """After QK-Clip, the absorbed form sees the clipped weights exactly as the
    full one: S' = min(S, tau) per head, and outputs still agree."""
    _, module, x = attention
    _, s = full(module, x)
    tau = float(np.median(np.asarray(s)))
    clipped = clip(module, s, tau)
    out_full, s_full = full(clipped, x)
    out, s_steps, _ = decode_in_steps(clipped, x)
    # measured rel 1.3e-7 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(np.asarray(s_full), np.minimum(np.asarray(s), tau), rtol=6e-7)
    # measured rel 1.9e-7 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(
        np.asarray(s_steps.max(0)), np.minimum(np.asarray(s), tau), rtol=8e-7
    )
    # measured abs 4.5e-6 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(out_full), atol=1.2e-6 * float(jnp.abs(out_full).max())
    )


def test_attention_decode_s_with_every_logit_negative(attention):
    """S when every real logit is negative: the max over the cache slots
    written so far, never over the unwritten (zero) slots, whose logit would
    be 0. Positive inputs, latent and key weights, and negative q_C weights
    make every q_C.k_C negative; small q_R weights keep q_R.k_R below it. S of
    each call against the float64 reference, which has no cache."""
    _, module, x = attention
    nope = module.config.qk_nope_head_dim
    wq = np.asarray(module.wq)
    wq = np.concatenate([-np.abs(wq[:, :nope]), 0.01 * wq[:, nope:]], axis=1)
    pos = {
        "wkv_a": jnp.abs(module.wkv_a),
        "kv_norm": jnp.abs(module.kv_norm.weight),
        "wkv_b": module.wkv_b.at[:, :nope].set(jnp.abs(module.wkv_b[:, :nope])),
    }
    negative = eqx.tree_at(
        lambda m: (m.wq, m.wkv_a, m.kv_norm.weight, m.wkv_b),
        module,
        (jnp.asarray(wq), pos["wkv_a"], pos["kv_norm"], pos["wkv_b"]),
    )
    if module.wq_a is not None:
        negative = eqx.tree_at(
            lambda m: (m.wq_a, m.q_norm.weight),
            negative,
            (jnp.abs(module.wq_a), jnp.abs(module.q_norm.weight)),
        )
    x = jnp.abs(x)
    rows = np_row_max_logits(negative, x)
    assert rows.max() < -0.1  # every allowed logit is negative, by a margin
    _, s_steps, cache = decode_in_steps(negative, x)  # two slots stay unwritten
    assert cache.max_len - int(cache.length) == 2
    expected = np.concatenate([rows[:PREFILL].max(0, keepdims=True), rows[PREFILL:]])
    # float32 against float64: measured 0.02 of rtol 1e-5 + atol 1e-6 (a few
    # float32 roundings); 1e-6 + 1e-7 allowed
    np.testing.assert_allclose(np.asarray(s_steps), expected, rtol=1e-6, atol=1e-7)
    _, s_full = full(negative, x)
    # measured max |diff| 7.8e-6, 23% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(np.asarray(s_full), rows.max(0), rtol=5e-7, atol=5e-8)


def test_attention_decode_with_yarn_and_clip(attention):
    """YaRN (the DeepSeek-V3 block, with a tiny original context so that the
    ramp bites) changes frequencies and the softmax scale; decode still equals
    the full forward, and QK-Clip still gives min(S, tau) exactly."""
    _, module, x = attention
    yarn = build_attention(dataclasses.replace(module.config, yarn=DSV3_YARN))  # the same weights
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(yarn), jax.tree.leaves(module)))
    out_plain, s_plain = full(module, x)
    out_full, s_full = full(yarn, x)
    assert not np.allclose(np.asarray(s_full), np.asarray(s_plain), rtol=1e-2)
    out, s_steps, _ = decode_in_steps(yarn, x)
    # measured abs 7.6e-6 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(out_full), atol=2e-6 * float(jnp.abs(out_full).max())
    )
    # measured rel 2e-7 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(np.asarray(s_steps.max(0)), np.asarray(s_full), rtol=1e-6)
    tau = float(np.median(np.asarray(s_full)))
    clipped = clip(yarn, s_full, tau)
    _, s_clipped = full(clipped, x)
    _, s_dec, _ = decode_in_steps(clipped, x)
    # measured rel 2.7e-7 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(
        np.asarray(s_clipped), np.minimum(np.asarray(s_full), tau), rtol=1.2e-6
    )
    # measured rel 2e-7 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(
        np.asarray(s_dec.max(0)), np.minimum(np.asarray(s_full), tau), rtol=1e-6
    )


# --------------------------------------------------------------------------
# The Transformer: prefill + incremental decode with a stacked cache
# --------------------------------------------------------------------------

VOCAB, LAYERS = 48, 2


def transformer_config(name):
    return TransformerConfig(vocab_size=VOCAB, n_layers=LAYERS, mlp_hidden=48, attention=ATTN[name])


@pytest.fixture(scope="module", params=list(ATTN))
def model(request):
    m = init_from_numpy(lambda k: Transformer(transformer_config(request.param), key=k), seed=3)
    # larger query weights, so that S spreads and a clip at the median acts
    m = eqx.tree_at(lambda m: m.blocks.attn.wq, m, 3.0 * m.blocks.attn.wq)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, VOCAB, T), jnp.int32)
    return m, tokens


@eqx.filter_jit
def forward(m, tokens):
    return m(tokens)


@eqx.filter_jit
def model_decode(m, tokens, cache):
    return m.decode(tokens, cache)


def model_in_steps(m, tokens):
    cache = m.init_cache(T)
    logits, s, cache = model_decode(m, tokens[:PREFILL], cache)
    all_logits, ss = [logits], [s]
    for i in range(PREFILL, T):
        logits, s, cache = model_decode(m, tokens[i : i + 1], cache)
        all_logits.append(logits)
        ss.append(s)
    return jnp.concatenate(all_logits), jnp.stack(ss), cache


@pytest.mark.parametrize("clipped", [False, True], ids=["before_clip", "after_clip"])
def test_transformer_decode_equals_full_forward(model, clipped):
    m, tokens = model
    if clipped:
        _, s = forward(m, tokens)
        m = clip(m, s, float(np.median(np.asarray(s))))
    logits_full, s_full = forward(m, tokens)
    logits, s_steps, cache = model_in_steps(m, tokens)
    # Targets: max abs diff of the logits <= 1e-4 relative, at every position.
    rel = (
        np.abs(np.asarray(logits) - np.asarray(logits_full)).max(-1)
        / np.abs(np.asarray(logits_full)).max()
    )
    assert rel.shape == (T,) and rel.max() <= 1e-4, rel
    # S per layer and head: the prefill's is the full forward's on the prefix;
    # over all calls, the full forward's on the whole sequence.
    _, s_prefix = forward(m, tokens[:PREFILL])
    # measured max |diff| 2.4e-6, 22% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(
        np.asarray(s_steps[0]), np.asarray(s_prefix), rtol=2.5e-6, atol=2.5e-7
    )
    # measured max |diff| 4.3e-6, 24% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(np.asarray(s_steps.max(0)), np.asarray(s_full), rtol=3e-6, atol=3e-7)
    assert s_steps.shape == (T - PREFILL + 1, LAYERS, m.config.n_heads)
    assert int(cache.length) == T
    # Layer 0 at every decoded position: its input is norm(embed[tokens]), so the
    # NumPy per-query max logit gives each call's S.
    attn0 = jax.tree.map(lambda a: a[0], m.blocks.attn)
    e = np.asarray(m.embed, np.float64)[np.asarray(tokens)]
    x0 = e / np.sqrt(np.mean(e * e, -1, keepdims=True) + m.config.norm_eps)
    x0 = x0 * np.asarray(m.blocks.attn_norm.weight[0], np.float64)
    rows = np_row_max_logits(attn0, x0)
    expected = np.concatenate([rows[:PREFILL].max(0, keepdims=True), rows[PREFILL:]])
    # measured max |diff| 1.5e-6, 24% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(np.asarray(s_steps[:, 0]), expected, rtol=1.5e-6, atol=1.5e-6)


def test_cache_holds_the_latent_and_rope_key_only(model):
    """kv_lora_rank + qk_rope_head_dim numbers per token per layer, read from
    the cache's shapes (a non-absorbed cache of k and v would hold
    heads * (qk_head_dim + v_head_dim))."""
    m, tokens = model
    c, max_len = m.config.attention, T
    cache = m.init_cache(max_len)
    assert isinstance(cache, MLACache)
    arrays = [a for a in jax.tree.leaves(cache) if a.ndim > 0]
    per_token_per_layer = sum(a.size for a in arrays) / (LAYERS * max_len)
    assert per_token_per_layer == c.kv_lora_rank + c.qk_rope_head_dim
    assert per_token_per_layer < c.n_heads * (c.qk_head_dim + c.v_head_dim)
    assert cache.c_kv.shape == (LAYERS, max_len, c.kv_lora_rank)
    assert cache.k_r.shape == (LAYERS, max_len, c.qk_rope_head_dim)
    _, _, after = model_decode(m, tokens[:PREFILL], cache)
    assert jax.tree.map(jnp.shape, after) == jax.tree.map(jnp.shape, cache)
    assert int(after.length) == PREFILL
    # written slots hold the latent, the rest is untouched
    assert np.all(np.asarray(after.c_kv[:, PREFILL:]) == 0)
    assert np.all(np.any(np.asarray(after.c_kv[:, :PREFILL]) != 0, axis=-1))


def test_cache_overflow_is_an_error(model):
    m, tokens = model
    with pytest.raises(ValueError, match="max_len"):
        m.decode(tokens, m.init_cache(T - 1))
    # filled to max_len by the same compiled calls as above; one more token overflows
    _, _, cache = model_in_steps(m, tokens)
    assert int(cache.length) == cache.max_len == T
    with pytest.raises(Exception, match="overflow"):
        jax.block_until_ready(model_decode(m, tokens[:1], cache))


def test_bad_inputs_are_named(model):
    m, _ = model
    with pytest.raises(ValueError, match="max_len"):
        m.init_cache(0)
    gqa = TransformerConfig(
        vocab_size=VOCAB,
        n_layers=1,
        mlp_hidden=8,
        attention=GQAConfig(dim=8, n_heads=2, head_dim=4),
    )
    g = Transformer(gqa, key=jax.random.key(0))
    assert isinstance(g.init_cache(4), KVCache)
    with pytest.raises(ValueError, match="expected a KVCache"):  # an MLA model's cache
        g.decode(jnp.zeros(1, jnp.int32), m.init_cache(4))
    with pytest.raises(ValueError, match="expected a MLACache"):
        m.decode(jnp.zeros(1, jnp.int32), g.init_cache(4))
    bidir = dataclasses.replace(ATTN["qlora"], causal=False)
    a = build_attention(bidir)
    with pytest.raises(ValueError, match="causal"):
        a.decode(jnp.zeros((1, bidir.dim)), a.init_cache(2))


def test_bf16_compute_decode_is_close():
    """bf16 matmuls, f32 logits and S: decode stays near the bf16 full forward."""
    cfg = dataclasses.replace(transformer_config("qlora"), compute_dtype="bfloat16")
    m = init_from_numpy(lambda k: Transformer(cfg, key=k), seed=3)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, VOCAB, T), jnp.int32)
    logits_full, s_full = forward(m, tokens)
    logits, s_steps, cache = model_in_steps(m, tokens)
    assert (
        cache.c_kv.dtype == jnp.bfloat16
        and logits.dtype == jnp.float32
        and s_steps.dtype == jnp.float32
    )
    # measured (jax 0.10.2, CPU): logits 0.71% of their largest magnitude, S 1.1%
    scale = float(jnp.abs(logits_full).max())
    np.testing.assert_allclose(np.asarray(logits), np.asarray(logits_full), atol=3e-2 * scale)
    np.testing.assert_allclose(np.asarray(s_steps.max(0)), np.asarray(s_full), rtol=3e-2)


# --------------------------------------------------------------------------
# GQA and MHA: the standard k/v cache
# --------------------------------------------------------------------------

GQA_ATTN = {
    "gqa": GQAConfig(dim=32, n_heads=4, n_kv_heads=2, head_dim=8),
    "mha": GQAConfig(dim=32, n_heads=3, head_dim=8),
}


def build_gqa(config, seed=0):
    rng = np.random.default_rng(seed)
    shape_tree = eqx.filter_eval_shape(GQAttention, config, key=jax.random.key(0))
    return jax.tree.map(  # larger than 1/fan_in so that logits spread over several units
        lambda a: jnp.asarray(2.0 * rng.standard_normal(a.shape) / np.sqrt(a.shape[-1]), a.dtype),
        shape_tree,
    )


def np_gqa_row_max_logits(m: GQAttention, x) -> np.ndarray:
    """[seq, heads]: per query, the max over keys j <= i of q.k / sqrt(head_dim),
    float64, "half" RoPE (pairs (i, i + d/2)), query head h on key head h // group."""
    c = m.config
    x = np.asarray(x, np.float64)
    q = np.einsum("si,hdi->shd", x, np.asarray(m.wq, np.float64))
    k = np.einsum("si,hdi->shd", x, np.asarray(m.wk, np.float64))

    def rope(a):
        d = a.shape[-1]
        ang = np.arange(a.shape[0])[:, None, None] * c.rope_theta ** (-np.arange(0, d, 2) / d)
        a1, a2 = a[..., : d // 2], a[..., d // 2 :]
        return np.concatenate(
            [a1 * np.cos(ang) - a2 * np.sin(ang), a2 * np.cos(ang) + a1 * np.sin(ang)], -1
        )

    q, k = rope(q), np.repeat(rope(k), c.n_heads // k.shape[1], axis=1)
    logits = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(c.head_dim)
    causal = np.tril(np.ones((x.shape[0], x.shape[0]), bool))
    return np.where(causal, logits, -np.inf).max(-1).T


@pytest.fixture(scope="module", params=list(GQA_ATTN))
def gqa_attention(request):
    module = build_gqa(GQA_ATTN[request.param])
    x = jnp.asarray(np.random.default_rng(1).standard_normal((T, module.config.dim)), jnp.float32)
    return module, x


@pytest.mark.parametrize("clipped", [False, True], ids=["before_clip", "after_clip"])
def test_gqa_decode_equals_full_forward_and_s_the_float64_reference(gqa_attention, clipped):
    module, x = gqa_attention
    if clipped:
        _, s = full(module, x)
        module = clip(module, s, float(np.median(np.asarray(s))))
    out_full, s_full = full(module, x)
    out, s_steps, cache = decode_in_steps(module, x)
    scale = float(jnp.abs(out_full).max())
    np.testing.assert_allclose(np.asarray(out), np.asarray(out_full), rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(np.asarray(s_steps.max(0)), np.asarray(s_full), rtol=1e-5, atol=1e-5)
    rows = np_gqa_row_max_logits(module, x)
    expected = np.concatenate([rows[:PREFILL].max(0, keepdims=True), rows[PREFILL:]])
    np.testing.assert_allclose(np.asarray(s_steps), expected, rtol=1e-5, atol=1e-5)
    assert np.ptp(expected) > 1.0
    c = module.config
    assert cache.k.shape == cache.v.shape == (T + 2, c.n_kv_heads, c.head_dim)
    assert int(cache.length) == T and np.all(np.asarray(cache.k[T:]) == 0)


@pytest.fixture(scope="module", params=list(GQA_ATTN))
def gqa_model(request):
    cfg = TransformerConfig(
        vocab_size=VOCAB, n_layers=LAYERS, mlp_hidden=48, attention=GQA_ATTN[request.param]
    )
    m = init_from_numpy(lambda k: Transformer(cfg, key=k), seed=3)
    m = eqx.tree_at(lambda m: m.blocks.attn.wq, m, 3.0 * m.blocks.attn.wq)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, VOCAB, T), jnp.int32)
    return m, tokens


def test_gqa_transformer_decode_equals_full_forward(gqa_model):
    m, tokens = gqa_model
    logits_full, s_full = forward(m, tokens)
    logits, s_steps, cache = model_in_steps(m, tokens)
    rel = (
        np.abs(np.asarray(logits) - np.asarray(logits_full)).max(-1)
        / np.abs(np.asarray(logits_full)).max()
    )
    assert rel.shape == (T,) and rel.max() <= 1e-4, rel
    np.testing.assert_allclose(np.asarray(s_steps.max(0)), np.asarray(s_full), rtol=1e-5, atol=1e-6)
    assert isinstance(cache, KVCache) and int(cache.length) == T
    c = m.config.attention
    assert cache.k.shape == (LAYERS, T, c.n_kv_heads, c.head_dim)
    # layer 0 at every decoded position, against the float64 reference
    attn0 = jax.tree.map(lambda a: a[0], m.blocks.attn)
    e = np.asarray(m.embed, np.float64)[np.asarray(tokens)]
    x0 = e / np.sqrt(np.mean(e * e, -1, keepdims=True) + m.config.norm_eps)
    x0 = x0 * np.asarray(m.blocks.attn_norm.weight[0], np.float64)
    rows = np_gqa_row_max_logits(attn0, x0)
    expected = np.concatenate([rows[:PREFILL].max(0, keepdims=True), rows[PREFILL:]])
    np.testing.assert_allclose(np.asarray(s_steps[:, 0]), expected, rtol=1e-5, atol=1e-5)
