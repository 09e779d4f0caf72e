"""An independent reference for the whole model and one train step.

A small MLA Transformer is written here in plain JAX from the maths, calling
no library module: token embedding; per layer, pre-norm multi-head latent
attention (DeepSeek-V2, arXiv 2405.04434, sec. 2.1: a low-rank query path,
the latent c_KV with its RMSNorm, one RoPE key shared by all heads, RoPE on
interleaved pairs (2i, 2i+1) with frequencies theta^(-2i/d), causal softmax
of (q_C.k_C + q_R.k_R) / sqrt(d_nope + d_rope)) and a pre-norm SwiGLU MLP
(Shazeer 2020, arXiv 2002.05202); a final RMSNorm (Zhang & Sennrich 2019)
and an untied head. It reads the library model's weights by their documented
layout (`(out..., in)`, per-head rows head-major) and nothing else.

Checked against it: ``qc.Transformer``'s logits and S (the max of the logit
entering the softmax per layer and head, Kimi K2 report, arXiv 2507.20534,
sec. 2.1), and one ``make_train_step`` MuonClip step: the loss, S and gradient
norm from ``jax.grad`` of this forward, the update of the float64 NumPy
Muon + AdamW of ``tests/reference.py``, then NumPy's QK-Clip of the updated
weights with this step's S (K2 Algorithm 1).
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from builders import init_from_numpy
from qkclip_eqx import MLAConfig, Transformer, TransformerConfig, make_train_step, muon_adamw
from reference import (
    NumpyMuonClip,
    assert_leaves_close,
    leaves_by_path,
    np_qk_clip,
    tree_from_paths,
)

VOCAB, LAYERS, BATCH, SEQ = 40, 2, 3, 8
LR, WD = 0.02, 0.1
ATTN = MLAConfig(
    dim=24,
    n_heads=3,
    q_lora_rank=12,
    kv_lora_rank=10,
    qk_nope_head_dim=6,
    qk_rope_head_dim=4,
    v_head_dim=5,
)
CONFIG = TransformerConfig(vocab_size=VOCAB, n_layers=LAYERS, mlp_hidden=20, attention=ATTN)
EPS, THETA = CONFIG.norm_eps, ATTN.rope_theta


# --------------------------------------------------------------------------
# the reference, from the maths
# --------------------------------------------------------------------------


def _rms(x, g):
    return g * x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + EPS)


def _rope(a):
    """Rotate pairs (a_2i, a_2i+1) of the last axis by position * theta^(-2i/d);
    the first axis is the position."""
    d = a.shape[-1]
    angle = jnp.arange(a.shape[0])[:, None] * THETA ** (-jnp.arange(0, d, 2) / d)
    angle = angle.reshape(a.shape[0], *([1] * (a.ndim - 2)), d // 2)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    a1, a2 = a[..., 0::2], a[..., 1::2]
    return jnp.stack([a1 * cos - a2 * sin, a2 * cos + a1 * sin], axis=-1).reshape(a.shape)


def _attention(w, layer, x):
    """One layer's MLA on one sequence x [t, dim]: (output [t, dim], S [heads])."""
    p = {k: w[f".blocks.attn.{k}"][layer] for k in ("wq_a", "wq", "wkv_a", "wkv_b", "wo")}
    nope, r = ATTN.qk_nope_head_dim, ATTN.kv_lora_rank
    q_in = _rms(x @ p["wq_a"].T, w[".blocks.attn.q_norm.weight"][layer])
    q = jnp.einsum("ti,hdi->thd", q_in, p["wq"])
    q_c, q_r = q[..., :nope], _rope(q[..., nope:])
    kv_a = x @ p["wkv_a"].T
    c_kv = _rms(kv_a[:, :r], w[".blocks.attn.kv_norm.weight"][layer])
    k_r = _rope(kv_a[:, r:])  # [t, rope]: one key for every head
    kv = jnp.einsum("tr,hdr->thd", c_kv, p["wkv_b"])
    k_c, v = kv[..., :nope], kv[..., nope:]
    logits = jnp.einsum("qhd,khd->hqk", q_c, k_c) + jnp.einsum("qhd,kd->hqk", q_r, k_r)
    logits = logits / math.sqrt(nope + ATTN.qk_rope_head_dim)
    t = x.shape[0]
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
    logits = jnp.where(causal, logits, -jnp.inf)
    s = jnp.max(logits, axis=(1, 2))
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("hqk,khd->qhd", probs, v).reshape(t, -1)
    return out @ p["wo"].T, s


def _swiglu(w, layer, x):
    g = x @ w[".blocks.mlp.w_gate"][layer].T
    return (g * jax.nn.sigmoid(g) * (x @ w[".blocks.mlp.w_up"][layer].T)) @ w[".blocks.mlp.w_down"][
        layer
    ].T


def _forward_one(w, tokens):
    """One sequence: logits [t, vocab] and S [layers, heads]."""
    x = w[".embed"][tokens]
    s_layers = []
    for layer in range(LAYERS):
        h, s = _attention(w, layer, _rms(x, w[".blocks.attn_norm.weight"][layer]))
        x = x + h
        x = x + _swiglu(w, layer, _rms(x, w[".blocks.mlp_norm.weight"][layer]))
        s_layers.append(s)
    return _rms(x, w[".final_norm.weight"]) @ w[".lm_head"].T, jnp.stack(s_layers)


@jax.jit
def ref_forward(w, tokens):
    """A batch [b, t]: logits [b, t, vocab], S [b, layers, heads]."""
    return jax.vmap(lambda t: _forward_one(w, t))(tokens)


def _ref_loss(w, tokens):
    """Mean next-token cross-entropy over the batch, and S (max over the batch)."""
    logits, s = ref_forward(w, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)
    return jnp.mean(nll), jnp.max(s, axis=0)


ref_loss_and_grads = jax.jit(jax.value_and_grad(_ref_loss, has_aux=True))


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    m = init_from_numpy(lambda k: Transformer(CONFIG, key=k), seed=11)
    # larger query weights, so that S spreads over heads and a clip at the median acts
    return eqx.tree_at(lambda m: m.blocks.attn.wq, m, 3.0 * m.blocks.attn.wq)


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(12).integers(0, VOCAB, (BATCH, SEQ + 1)), jnp.int32)


@pytest.fixture(scope="module")
def weights(model):
    return {k: jnp.asarray(v) for k, v in leaves_by_path(model).items()}


def test_reference_reads_every_weight(weights):
    """The reference uses every array of the model (no weight left out)."""
    used = set()

    class Recorder(dict):
        def __getitem__(self, key):
            used.add(key)
            return super().__getitem__(key)

    jax.eval_shape(lambda w, t: _forward_one(Recorder(w), t), dict(weights), jnp.zeros(4, int))
    assert used == set(weights)


def test_transformer_logits_and_s_match_the_reference(model, weights, tokens):
    """Each example's logits and S. Measured (jax 0.10.2, CPU, float32 at
    "highest" precision, XLA backend level 0): logits differ by at most 3.7e-7
    of their largest magnitude, S by 3.6e-7 relative."""
    inputs = tokens[:, :-1]
    logits, s = eqx.filter_jit(jax.vmap(model))(inputs)
    ref_logits, ref_s = ref_forward(weights, inputs)
    scale = float(jnp.abs(ref_logits).max())
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=2e-6 * scale)
    np.testing.assert_allclose(s, ref_s, rtol=1.5e-6)
    assert np.ptp(np.asarray(ref_s)) > 1.0  # heads differ: the comparison can fail


def test_one_train_step_matches_the_reference(model, weights, tokens):
    """One MuonClip step of ``make_train_step`` against the reference step:
    loss, S and the gradient norm from jax.grad of the reference forward; the
    new weights are the float64 NumPy Muon + AdamW update of those gradients,
    then NumPy's QK-Clip with the reference S at a tau that splits the heads."""
    (loss, s), grads = ref_loss_and_grads(weights, tokens)
    s = np.asarray(s, np.float64)
    v = np.sort(s.ravel())
    tau = float(np.float32((v[len(v) // 2 - 1] + v[len(v) // 2]) / 2))
    assert 0 < (s > tau).sum() < s.size

    opt = muon_adamw(LR, weight_decay=WD)
    state = opt.init(eqx.filter(model, eqx.is_array))
    copy = jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, model)
    new, _, metrics = make_train_step(opt, mode="clip", tau=tau)(copy, state, tokens)

    grads = {k: np.asarray(g, np.float64) for k, g in grads.items()}
    params = {k: np.asarray(p, np.float64) for k, p in weights.items()}
    updates = NumpyMuonClip(params, LR, weight_decay=WD).update(grads, params)
    updated = tree_from_paths(model, {k: params[k] + updates[k] for k in params})
    grad_norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))

    # measured (as above): loss 1.1e-7, S 5.4e-7, grad norm 3.1e-7 relative
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=5e-7)
    np.testing.assert_allclose(metrics["max_logits"], s, rtol=1.5e-6)
    np.testing.assert_allclose(float(metrics["grad_norm"]), grad_norm, rtol=1.5e-6)
    assert int(metrics["heads_clipped"]) == int((s > tau).sum())
    # the weights: measured at most 6e-8 off (3e-6 of the update's scale, LR),
    # but for the clipped q rows, scaled by gamma from the reference S (5e-7
    # from the step's): 4.8e-7 there, 3e-7 relative
    assert_leaves_close(new, np_qk_clip(updated, s, tau), rtol=6e-7, atol=1e-5 * LR)
    # and the step did move every weight by more than that
    moved = {k: np.abs(a - params[k]).max() for k, a in leaves_by_path(new).items()}
    assert min(moved.values()) > 0.05 * LR, moved
