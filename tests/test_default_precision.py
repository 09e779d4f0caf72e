"""The train step, the clip identity and decoding at the matmul precision
users get by default.

``tests/conftest.py`` sets ``jax_default_matmul_precision`` to "highest" for
the whole suite; this module runs with it unset (jax's default, None), each
test compiling its own programs. On CPU, XLA computes a float32 matmul in
float32 at either setting; on a GPU the default may use TF32 (a 10-bit
mantissa, ~1e-3 relative), which the tolerances below do not cover: they are
set from what CPU measures.

Each check is the same as the suite's at "highest": the step is QK-Clip (in
NumPy) of the unclipped update made by hand, with this step's S; re-running
the clipped module on the same inputs gives min(S, tau); decoding with the
latent cache equals the full forward, and its S the float64 reference.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from builders import init_from_numpy
from qkclip_eqx import (
    MLAConfig,
    MLAttention,
    Transformer,
    TransformerConfig,
    make_train_step,
    muon_adamw,
    next_token_loss,
    qk_clip,
)
from reference import assert_leaves_close, np_qk_clip
from test_decode import np_row_max_logits

VOCAB, T = 32, 9
ATTN = MLAConfig(
    dim=16,
    n_heads=4,
    kv_lora_rank=8,
    qk_nope_head_dim=4,
    qk_rope_head_dim=4,
    v_head_dim=4,
    q_lora_rank=8,
)
CONFIG = TransformerConfig(vocab_size=VOCAB, n_layers=2, mlp_hidden=32, attention=ATTN)


@pytest.fixture(autouse=True, scope="module")
def default_precision():
    assert jax.config.jax_default_matmul_precision == "highest"  # conftest's
    with jax.default_matmul_precision(None):
        assert jax.config.jax_default_matmul_precision is None
        yield


@pytest.fixture(scope="module")
def model():
    m = init_from_numpy(lambda k: Transformer(CONFIG, key=k), seed=21)
    return eqx.tree_at(lambda m: m.blocks.attn.wq, m, 3.0 * m.blocks.attn.wq)


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(22).integers(0, VOCAB, (4, T)), jnp.int32)


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, tree)


def _tau_splitting(s) -> float:
    v = np.sort(np.asarray(s, np.float64).ravel())
    return float(np.float32((v[len(v) // 2 - 1] + v[len(v) // 2]) / 2))


def test_step_is_the_clip_of_the_update_by_hand(model, tokens):
    """MuonClip step: loss, S and grad norm are the by-hand forward's, bit for
    bit (the same arithmetic); the model is NumPy's QK-Clip of the by-hand
    update. Measured on CPU: the weights within one float32 rounding (1.2e-7
    relative)."""
    opt = muon_adamw(0.02, weight_decay=0.1)
    state = opt.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def by_hand(model, state, tokens):
        params, static = eqx.partition(model, eqx.is_array)
        (loss, s), grads = jax.value_and_grad(
            lambda p: next_token_loss(eqx.combine(p, static), tokens), has_aux=True
        )(params)
        updates, _ = opt.update(grads, state, params)
        return eqx.combine(optax.apply_updates(params, updates), static), loss, s, grads

    updated, loss, s, grads = by_hand(model, state, tokens)
    s = np.asarray(s)
    tau = _tau_splitting(s)
    new, _, metrics = make_train_step(opt, mode="clip", tau=tau)(_copy(model), _copy(state), tokens)
    np.testing.assert_array_equal(metrics["loss"], loss)
    np.testing.assert_array_equal(metrics["max_logits"], s)
    np.testing.assert_array_equal(metrics["grad_norm"], optax.tree.norm(grads))
    assert int(metrics["heads_clipped"]) == int((s > tau).sum()) > 0
    assert_leaves_close(new, np_qk_clip(updated, s, tau), rtol=5e-7)


def test_clip_identity(model, tokens):
    """One MLA module (layer 0's weights) on a batch: after QK-Clip at a tau
    that splits the heads, S' = min(S, tau); heads at or below tau exactly as
    before. Measured on CPU: equal (to the last bit) on the clipped heads too;
    the tolerance allows 4 float32 roundings."""
    attn = jax.tree.map(lambda a: a[0], model.blocks.attn)
    assert isinstance(attn, MLAttention)
    x = model.embed[tokens]

    @eqx.filter_jit
    def s_of(module, x):
        return jnp.max(jax.vmap(module)(x)[1], axis=0)

    s = np.asarray(s_of(attn, x))
    tau = _tau_splitting(s)
    s_after = np.asarray(s_of(qk_clip(attn, jnp.asarray(s), tau), x))
    assert np.any(s > tau) and np.any(s < tau)
    np.testing.assert_allclose(s_after, np.minimum(s, tau), rtol=5e-7)
    assert np.array_equal(s_after[s <= tau], s[s <= tau])


def test_decode_equals_full_forward_and_float64_s(model, tokens):
    """Prefill 3 tokens, then one at a time: the logits at every position are
    the full forward's, S over all calls is the full forward's, and layer 0's
    S per call is the float64 reference's. Measured on CPU: logits 5e-7 of
    their largest magnitude, S 4.4e-7 relative; against float64, at most 1.6e-6
    (where S is near 0: a tolerance of 2e-6 relative plus 1e-6 is 4x what
    that needs)."""
    seq = tokens[0]

    @eqx.filter_jit
    def decode(m, t, cache):
        return m.decode(t, cache)

    cache = model.init_cache(T)
    logits, s, cache = decode(model, seq[:3], cache)
    all_logits, ss = [logits], [s]
    for i in range(3, T):
        logits, s, cache = decode(model, seq[i : i + 1], cache)
        all_logits.append(logits)
        ss.append(s)
    logits, ss = np.concatenate(all_logits), np.stack(ss)
    full_logits, full_s = eqx.filter_jit(lambda m, t: m(t))(model, seq)
    scale = float(np.abs(full_logits).max())
    np.testing.assert_allclose(logits, full_logits, rtol=0, atol=2.5e-6 * scale)
    np.testing.assert_allclose(ss.max(0), full_s, rtol=2e-6)
    attn0 = jax.tree.map(lambda a: a[0], model.blocks.attn)
    e = np.asarray(model.embed, np.float64)[np.asarray(seq)]
    x0 = e / np.sqrt(np.mean(e * e, -1, keepdims=True) + CONFIG.norm_eps)
    x0 = x0 * np.asarray(model.blocks.attn_norm.weight[0], np.float64)
    rows = np_row_max_logits(attn0, x0)
    expected = np.concatenate([rows[:3].max(0, keepdims=True), rows[3:]])
    np.testing.assert_allclose(ss[:, 0], expected, rtol=2e-6, atol=1e-6)
    assert np.ptp(expected) > 1.0
