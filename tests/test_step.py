"""The train step (`qkclip_eqx.make_train_step`): loss and grads, optimizer update,
then QK-Clip, in one jit (Kimi K2 report, Algorithm 1).

The step is checked against the same computation done by hand outside it: S
from this step's forward (before the update), the optimizer update, then
``qk_clip`` of the UPDATED weights with that S; the optimizer state untouched
by the clip.
"""

import inspect
import json
import math
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest

from builders import init_from_numpy as _init
from qkclip_eqx import (
    GQAConfig,
    MLAConfig,
    Transformer,
    TransformerConfig,
    clipped_heads,
    make_train_step,
    muon_adamw,
    next_token_loss,
    qk_clip,
)
from reference import assert_leaves_close, heads_scaled, leaves_by_path, np_qk_clip, tree_from_paths

VOCAB = 32
LR = 0.05


def _copy(tree):
    """Fresh buffers: the step donates the model and optimizer state."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, tree)


def _assert_trees_bit_equal(a, b, what: str):
    la, ta = jtu.tree_flatten_with_path(eqx.filter(a, eqx.is_array))
    lb, tb = jtu.tree_flatten_with_path(eqx.filter(b, eqx.is_array))
    assert ta == tb, what
    for (path, x), (_, y) in zip(la, lb, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y)), f"{what}: {jtu.keystr(path)} differs"


def _n_differing_leaves(a, b) -> int:
    la = jax.tree.leaves(eqx.filter(a, eqx.is_array))
    lb = jax.tree.leaves(eqx.filter(b, eqx.is_array))
    return sum(not np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


_forward = eqx.filter_jit(next_token_loss)


@pytest.fixture(scope="module")
def model():
    att = MLAConfig(
        dim=16,
        n_heads=4,
        kv_lora_rank=8,
        qk_nope_head_dim=4,
        qk_rope_head_dim=4,
        v_head_dim=4,
        q_lora_rank=8,
    )
    cfg = TransformerConfig(vocab_size=VOCAB, n_layers=2, mlp_hidden=32, attention=att)
    return _init(lambda k: Transformer(cfg, key=k), 0)


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (4, 9)), jnp.int32)


@pytest.fixture(scope="module")
def optimizer():
    return muon_adamw(LR, weight_decay=0.1)


@pytest.fixture(scope="module")
def opt_state(optimizer, model):
    return optimizer.init(eqx.filter(model, eqx.is_array))


@pytest.fixture(scope="module")
def before(model, tokens):
    """Loss and S of the model BEFORE the step, from a plain forward pass."""
    loss, s = _forward(model, tokens)
    return float(loss), np.asarray(s)


@pytest.fixture(scope="module")
def tau(before):
    s = np.sort(before[1].ravel())
    return float((s[len(s) // 2 - 1] + s[len(s) // 2]) / 2)  # median: splits the heads


@pytest.fixture(scope="module")
def by_hand(optimizer, model, opt_state, tokens):
    """The step's arithmetic written out: grads, optimizer update, no clip."""

    @eqx.filter_jit
    def update(model, state, tokens):
        params, static = eqx.partition(model, eqx.is_array)

        def loss_fn(p):
            return next_token_loss(eqx.combine(p, static), tokens)

        (loss, s), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, state = optimizer.update(grads, state, params)
        return (
            eqx.combine(optax.apply_updates(params, updates), static),
            state,
            loss,
            s,
            optax.tree.norm(grads),
        )

    return update(model, opt_state, tokens)


def _run(mode, optimizer, model, opt_state, tokens, tau, **kw):
    step = make_train_step(optimizer, mode=mode, tau=tau, **kw)
    m, st = _copy(model), _copy(opt_state)
    new_model, new_state, metrics = step(m, st, tokens)
    # the inputs were donated; the tokens were not
    assert all(x.is_deleted() for x in jax.tree.leaves(eqx.filter(m, eqx.is_array)))
    assert not tokens.is_deleted()
    return new_model, new_state, jax.device_get(metrics)


@pytest.fixture(scope="module")
def clip_run(optimizer, model, opt_state, tokens, tau):
    return _run("clip", optimizer, model, opt_state, tokens, tau)


@pytest.fixture(scope="module")
def monitor_run(optimizer, model, opt_state, tokens, tau):
    return _run("monitor", optimizer, model, opt_state, tokens, tau)


# --------------------------------------------------------------------------
# clip mode
# --------------------------------------------------------------------------


def test_clip_metrics_are_this_steps_forward(clip_run, before, by_hand, tau):
    _, _, metrics = clip_run
    loss, s = before
    assert metrics["max_logits"].shape == (2, 4)
    np.testing.assert_array_equal(metrics["max_logits"], s)  # bit-equal
    np.testing.assert_array_equal(metrics["loss"], loss)  # bit-equal
    assert float(metrics["max_logit"]) == float(np.max(metrics["max_logits"]))
    n_over = int(np.sum(s > tau))
    assert 0 < n_over < s.size
    assert int(metrics["heads_over_tau"]) == n_over
    assert int(metrics["heads_clipped"]) == n_over
    assert int(metrics["n_nonfinite"]) == 0
    np.testing.assert_array_equal(metrics["grad_norm"], by_hand[4])  # bit-equal


def test_clip_model_is_qk_clip_of_the_manual_update(clip_run, by_hand, tau):
    new_model, new_state, metrics = clip_run
    updated, state, _, s_hand, _ = by_hand
    np.testing.assert_array_equal(metrics["max_logits"], s_hand)
    expected = qk_clip(updated, jnp.asarray(metrics["max_logits"]), tau)
    _assert_trees_bit_equal(new_model, expected, "clipped model")
    # the clip really changed something (q/k weights), nothing else
    assert _n_differing_leaves(new_model, updated) == 2  # wq and wkv_b
    # the optimizer state is the plain update's: the clip does not touch it
    _assert_trees_bit_equal(new_state, state, "optimizer state")


# --------------------------------------------------------------------------
# monitor and off modes
# --------------------------------------------------------------------------


def test_monitor_reports_but_does_not_clip(monitor_run, by_hand, before, tau):
    new_model, new_state, metrics = monitor_run
    updated, state, *_ = by_hand
    _assert_trees_bit_equal(new_model, updated, "monitor-mode model")
    _assert_trees_bit_equal(new_state, state, "monitor-mode optimizer state")
    s = before[1]
    np.testing.assert_array_equal(metrics["max_logits"], s)  # bit-equal
    assert int(metrics["heads_over_tau"]) == int(np.sum(s > tau)) > 0
    assert int(metrics["heads_clipped"]) == 0
    assert int(metrics["n_nonfinite"]) == 0


def test_off_mode_has_no_max_logits(optimizer, model, opt_state, tokens, tau, by_hand):
    new_model, new_state, metrics = _run("off", optimizer, model, opt_state, tokens, tau)
    assert set(metrics) == {"loss", "grad_norm", "first_nonfinite"}
    assert int(metrics["first_nonfinite"]) == 0  # a finite step
    updated, state, loss, *_ = by_hand
    _assert_trees_bit_equal(new_model, updated, "off-mode model")
    _assert_trees_bit_equal(new_state, state, "off-mode optimizer state")
    np.testing.assert_array_equal(metrics["loss"], loss)  # bit-equal


# --------------------------------------------------------------------------
# gradient accumulation
# --------------------------------------------------------------------------


def _grad_capture(lr: float) -> optax.GradientTransformation:
    """SGD whose state is the gradient it was given: the step's gradients come
    back exactly in ``opt_state``, and its update is ``-lr * g``."""

    def init(params):
        return jax.tree.map(jnp.zeros_like, params)

    def update(grads, state, params=None):
        return jax.tree.map(lambda g: -lr * g, grads), grads

    return optax.GradientTransformation(init, update)


CAPTURE = _grad_capture(LR)


@pytest.fixture(scope="module")
def accum_step():
    # the optimizer does not matter here: SGD keeps the compile small
    return make_train_step(CAPTURE, mode="monitor", tau=1.0, accum_steps=2)


@pytest.mark.parametrize("second", ["repeated_token", "periodic"])
def test_accumulation_maxes_s_and_means_loss(accum_step, model, second):
    rng = np.random.default_rng(5)
    a = rng.integers(0, VOCAB, (2, 9))
    if second == "repeated_token":
        b = np.full((2, 9), 7)  # one token repeated: a very different, small S
    else:
        b = np.tile(rng.integers(0, VOCAB, (1, 3)), (2, 3))
    a, b = jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32)
    loss_a, s_a = map(np.asarray, _forward(model, a))
    loss_b, s_b = map(np.asarray, _forward(model, b))
    assert not np.allclose(s_a, s_b, rtol=1e-2)
    if second == "periodic":  # each micro-batch wins somewhere: the max is elementwise
        assert np.any(s_a > s_b) and np.any(s_b > s_a)

    params = eqx.filter(model, eqx.is_array)
    _, _, metrics = accum_step(_copy(model), CAPTURE.init(params), jnp.concatenate([a, b]))
    s = np.asarray(metrics["max_logits"])
    np.testing.assert_array_equal(s, np.maximum(s_a, s_b))  # bit-equal
    # regression: the public defect summed micro-batch S; that is a different answer
    assert not np.allclose(s, s_a + s_b, rtol=1e-3)
    np.testing.assert_array_equal(metrics["loss"], (loss_a + loss_b) / 2)  # bit-equal


@pytest.fixture(scope="module")
def big_batch_by_hand(model):
    """Four rows whose halves differ a lot (the second is one repeated token),
    and the loss, gradients and grad norm of ONE batch of all four, by hand."""
    rng = np.random.default_rng(6)
    tokens = jnp.asarray(
        np.concatenate([rng.integers(0, VOCAB, (2, 9)), np.full((2, 9), 3)]), jnp.int32
    )
    params, static = eqx.partition(model, eqx.is_array)

    @jax.jit
    def grads_of(p, t):
        return jax.value_and_grad(lambda p: next_token_loss(eqx.combine(p, static), t)[0])(p)

    loss, grads = grads_of(params, tokens)
    _, first_half = grads_of(params, tokens[:2])
    g = jax.tree.leaves(grads)
    norm = math.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in g))
    return tokens, float(loss), grads, norm, first_half


def test_accumulation_equals_one_big_batch(accum_step, model, big_batch_by_hand):
    """Two micro-batches of two rows give the gradients, the grad norm, the loss
    and the updated weights of one batch of four: the gradient is the mean over
    micro-batches (not the first one's, not the sum)."""
    tokens, loss, grads, norm, first_half = big_batch_by_hand
    params = eqx.filter(model, eqx.is_array)
    new_model, got_grads, metrics = accum_step(_copy(model), CAPTURE.init(params), tokens)
    ref = leaves_by_path(grads)
    got = leaves_by_path(got_grads)
    assert got.keys() == ref.keys()
    for k in ref:
        scale = np.max(np.abs(ref[k]))
        assert scale > 0, k
        # measured: 0.73% of rtol=1e-4, atol=1e-5 * scale (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_allclose(got[k], ref[k], rtol=3e-6, atol=3e-7 * scale, err_msg=k)
    # measured rel 5.4e-8 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=2.5e-7)
    np.testing.assert_array_equal(float(metrics["loss"]), loss)  # bit-equal
    # the updated weights: W - lr * g of the big batch, in float64
    before, after = leaves_by_path(model), leaves_by_path(new_model)
    for k in ref:
        # measured: 11% of rtol=1e-6, atol=1e-6 * LR * max|g| (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_allclose(
            after[k],
            before[k].astype(np.float64) - LR * ref[k],
            rtol=4e-7,
            atol=4e-7 * LR * np.max(np.abs(ref[k])),
            err_msg=k,
        )
    # the test data tells the mean from the first micro-batch and from the sum
    first = leaves_by_path(first_half)
    assert max(np.max(np.abs(first[k] - ref[k])) / np.max(np.abs(ref[k])) for k in ref) > 0.1
    assert float(metrics["grad_norm"]) < 0.75 * 2 * norm


# --------------------------------------------------------------------------
# GQA group mode: the metric counts the heads whose weights were scaled
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gqa_group_model():
    att = GQAConfig(dim=16, n_heads=4, head_dim=4, n_kv_heads=2, clip_mode="group")
    cfg = TransformerConfig(vocab_size=VOCAB, n_layers=2, mlp_hidden=32, attention=att)
    return _init(lambda k: Transformer(cfg, key=k), 3)


def test_group_mode_counts_the_heads_it_scales(gqa_group_model, tokens):
    """In "group" mode a head over tau scales its whole group (Megatron-Core's
    rule): ``heads_clipped`` counts every head whose q/k weights were scaled,
    group-mates below tau included, while ``heads_over_tau`` counts S > tau. The
    weights are the clip (alpha = 0.3) of the unclipped update, in NumPy."""
    model = gqa_group_model
    _, s = map(np.asarray, _forward(model, tokens))
    # tau between the two heads of the group holding the largest S: that group
    # is scaled with one head below tau
    l, h = np.unravel_index(np.argmax(s), s.shape)
    pair = np.sort(s[l, 2 * (h // 2) : 2 * (h // 2) + 2])
    tau = float((pair[0] + pair[1]) / 2)
    scaled = heads_scaled(model, s, tau)
    assert scaled.sum() > (s > tau).sum() > 0
    opt = optax.sgd(LR)
    state = opt.init(eqx.filter(model, eqx.is_array))
    alpha = 0.3
    updated, _, _ = make_train_step(opt, mode="monitor", tau=tau)(
        _copy(model), _copy(state), tokens
    )
    clipped, _, metrics = make_train_step(opt, mode="clip", tau=tau, alpha=alpha)(
        _copy(model), _copy(state), tokens
    )
    np.testing.assert_array_equal(metrics["max_logits"], s)  # bit-equal
    assert int(metrics["heads_over_tau"]) == int((s > tau).sum())
    assert int(metrics["heads_clipped"]) == int(scaled.sum())
    assert_leaves_close(clipped, np_qk_clip(updated, s, tau, alpha), rtol=6e-7)  # measured 1.2e-7


# --------------------------------------------------------------------------
# the metrics at the boundary: S exactly at tau is not over tau and not clipped
# --------------------------------------------------------------------------

BOUNDARY_TAU = 3.0  # exact in float32
_AT = np.float32(BOUNDARY_TAU)
_BELOW, _ABOVE = np.nextafter(_AT, np.float32(-np.inf)), np.nextafter(_AT, np.float32(np.inf))
# [layers, heads]; heads (0, 1) and (2, 3) share a key head in the GQA models.
# Layer 0: group (at, 1 ulp below) has no head over tau; group (1 ulp above, at)
# does. Layer 1: group (below, 1.25 tau) does; group (at, at) does not. (One
# ulp over tau gives gamma = 1 - 2^-24, whose powers may round to 1: only the
# head at 1.25 tau is sure to move its weights.)
BOUNDARY_S = np.array([[_AT, _BELOW, _ABOVE, _AT], [_BELOW, 1.25 * _AT, _AT, _AT]], np.float32)
BOUNDARY_ATTENTION = {
    "mla": MLAConfig(
        dim=16, n_heads=4, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4
    ),
    "mha": GQAConfig(dim=16, n_heads=4, head_dim=4),
    **{
        f"gqa_{mode}": GQAConfig(dim=16, n_heads=4, head_dim=4, n_kv_heads=2, clip_mode=mode)
        for mode in ("query", "query_key", "group")
    },
}


def _loss_with_boundary_s(model, tokens):
    """A zero loss (zero gradients) of the params, and the fixed S above."""
    return 0.0 * jnp.mean(model.lm_head), jnp.asarray(BOUNDARY_S)


@pytest.mark.parametrize("kind", list(BOUNDARY_ATTENTION))
def test_heads_at_tau_are_neither_over_tau_nor_clipped(kind, tokens):
    """S exactly at tau, one float32 ulp below and one above, in every clip
    mode: ``heads_over_tau`` counts S > tau only, ``heads_clipped`` and
    ``clipped_heads`` name the heads NumPy's rule scales (S > tau; in GQA
    "group" mode with their group-mates), and the weights are NumPy's clip, a
    head at tau whose group has no head over tau bit-identical. Monitor mode
    counts the same heads over tau and clips none. (SGD with lr 0: the update
    leaves the weights as they were, so the step's model is the clip alone.)"""
    cfg = TransformerConfig(
        vocab_size=VOCAB, n_layers=2, mlp_hidden=16, attention=BOUNDARY_ATTENTION[kind]
    )
    model = _init(lambda k: Transformer(cfg, key=k), 6)
    s, tau = BOUNDARY_S, BOUNDARY_TAU
    assert (s == tau).sum() == 4 and (s > tau).sum() == 2 and (s < tau).sum() == 2
    want = heads_scaled(model, s, tau)  # NumPy's rule
    n_want = 4 if kind == "gqa_group" else 2
    assert int(want.sum()) == n_want
    np.testing.assert_array_equal(np.asarray(clipped_heads(model, jnp.asarray(s), tau)[0]), want)
    opt = optax.sgd(0.0)
    state = opt.init(eqx.filter(model, eqx.is_array))
    for mode in ("clip", "monitor"):
        step = make_train_step(opt, mode=mode, tau=tau, alpha=0.3, loss_fn=_loss_with_boundary_s)
        new, _, metrics = step(_copy(model), _copy(state), tokens)
        np.testing.assert_array_equal(metrics["max_logits"], s)
        assert int(metrics["heads_over_tau"]) == 2, mode
        assert int(metrics["heads_clipped"]) == (n_want if mode == "clip" else 0), mode
        if mode == "monitor":
            _assert_trees_bit_equal(new, model, "monitor-mode model")
            continue
        # measured: one float32 rounding (1.2e-7 relative) at most
        assert_leaves_close(new, np_qk_clip(model, s, tau, alpha=0.3), rtol=5e-7)
        # the q rows the clip may not move (no head over tau in their group, or
        # alone) are bit-identical; those of layer 1's clipped group moved
        group = 1 if kind in ("mla", "mha", "gqa_query") else 2
        quiet = ~np.repeat((s > tau).reshape(2, -1, group).any(-1), group, axis=-1)
        q_new, q_old = np.asarray(new.blocks.attn.wq), np.asarray(model.blocks.attn.wq)
        assert np.array_equal(q_new[quiet], q_old[quiet]) and quiet.sum() >= 4
        moved = ~quiet & (np.arange(2) == 1)[:, None] & (np.arange(4) < 2)[None, :]
        assert moved.sum() == group and not np.any(
            np.all(q_new[moved] == q_old[moved], axis=(-2, -1))
        )


# --------------------------------------------------------------------------
# bfloat16
# --------------------------------------------------------------------------


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bf16_step_trains_and_clips(tokens, param_dtype):
    """A step with bfloat16 matmuls, float32 (mixed precision) or bfloat16
    parameters: the loss is finite, the parameters keep their dtype, S is the
    plain forward's, and the model is NumPy's clip of the unclipped update (to
    bf16 rounding of the scaled weights when they are stored in bf16)."""
    att = MLAConfig(
        dim=16,
        n_heads=4,
        kv_lora_rank=8,
        qk_nope_head_dim=4,
        qk_rope_head_dim=4,
        v_head_dim=4,
        q_lora_rank=8,
    )
    cfg = TransformerConfig(
        vocab_size=VOCAB,
        n_layers=2,
        mlp_hidden=32,
        attention=att,
        param_dtype=param_dtype,
        compute_dtype="bfloat16",
    )
    model = _init(lambda k: Transformer(cfg, key=k), 4)
    dtype = jnp.dtype(param_dtype)
    assert all(x.dtype == dtype for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    _, s = map(np.asarray, _forward(model, tokens))
    v = np.sort(s.ravel())
    tau = float(np.float32((v[3] + v[4]) / 2))
    # SGD that hands back its gradients: the unclipped update W - lr g is made here
    state = CAPTURE.init(eqx.filter(model, eqx.is_array))
    clipped, grads, metrics = make_train_step(CAPTURE, mode="clip", tau=tau)(
        _copy(model), state, tokens
    )
    g = leaves_by_path(grads)
    updated = tree_from_paths(
        model,
        {
            k: (w.astype(np.float64) - LR * g[k].astype(np.float64)).astype(w.dtype)
            for k, w in leaves_by_path(model).items()
        },
    )
    assert np.isfinite(float(metrics["loss"]))
    # the step's forward is compiled with its backward: in bf16 compute its
    # activations may round differently from a forward-only program's (by a
    # bf16 ulp, 2^-8), so S agrees to bf16 precision, not bit for bit (measured
    # 0.13% relative, jax 0.10.2, CPU)
    np.testing.assert_allclose(metrics["max_logits"], s, rtol=5e-3)
    s = np.asarray(metrics["max_logits"])  # the S the clip acted on
    assert int(metrics["heads_clipped"]) == int(np.sum(s > tau)) == 4
    assert all(x.dtype == dtype for x in jax.tree.leaves(eqx.filter(clipped, eqx.is_array)))
    expected = np_qk_clip(updated, s, tau)
    got = leaves_by_path(clipped)
    for k, want in expected.items():
        want = want.astype(np.float32)
        # bf16 storage: the two sides round W - lr g to bf16 from different
        # arithmetic, so an element may differ by a bf16 ulp of the leaf's
        # largest value (2^-8 of it), whatever its own size; measured (jax
        # 0.10.2, CPU) at most 0.44 of that, in most leaves 0 to 0.05 of it
        atol = 1e-7 if param_dtype == "float32" else 2**-8 * np.max(np.abs(want))
        rtol = 2e-6 if param_dtype == "float32" else 1e-2
        np.testing.assert_allclose(got[k].astype(np.float32), want, rtol=rtol, atol=atol, err_msg=k)
    # the clip moved the q weights of the heads over tau by more than bf16 rounding
    plain = leaves_by_path(updated)[".blocks.attn.wq"].astype(np.float32)
    assert np.max(np.abs(got[".blocks.attn.wq"].astype(np.float32) - plain)) > 0.02 * np.max(
        np.abs(plain)
    )


# --------------------------------------------------------------------------
# non-finite S from a custom loss_fn
# --------------------------------------------------------------------------


def _loss_with_bad_heads(model, tokens):
    loss, s = next_token_loss(model, tokens)
    # two non-finite heads, and two with S <= 0 (valid values, all logits negative)
    return loss, s.at[0, 1].set(jnp.nan).at[1, 2].set(jnp.inf).at[0, 2].set(-1.0).at[1, 0].set(0.0)


def test_nonfinite_s_counted_and_never_clipped(optimizer, model, opt_state, tokens, by_hand):
    """Non-finite S is counted in n_nonfinite and never clipped; S <= 0 is
    never clipped and not counted, as docs/qk-clip.md says."""
    tau = 1e-3  # every positive finite head is over tau
    new_model, _, metrics = _run(
        "clip", optimizer, model, opt_state, tokens, tau, loss_fn=_loss_with_bad_heads
    )
    assert int(metrics["n_nonfinite"]) == 2
    assert int(metrics["heads_over_tau"]) == int(metrics["heads_clipped"]) == 8 - 4
    doc = " ".join((pathlib.Path(__file__).parents[1] / "docs" / "qk-clip.md").read_text().split())
    assert (
        "Only a non-finite $S$ is counted in the step's `n_nonfinite` metric; $S \\le 0$ "
        "(every allowed logit of the head negative) is a valid value, counted nowhere." in doc
    )
    assert np.isnan(metrics["max_logits"][0, 1]) and np.isinf(metrics["max_logits"][1, 2])
    leaves = jax.tree.leaves(eqx.filter(new_model, eqx.is_array))
    assert all(np.all(np.isfinite(x)) for x in leaves)
    # the unclipped update is the same as the default loss's (S has no gradient)
    updated = by_hand[0]
    new_attn, upd_attn = new_model.blocks.attn, updated.blocks.attn
    for layer, head in [(0, 1), (1, 2), (0, 2), (1, 0)]:
        assert np.array_equal(new_attn.wq[layer, head], upd_attn.wq[layer, head])
        assert np.array_equal(new_attn.wkv_b[layer, head], upd_attn.wkv_b[layer, head])
    for layer, head in [(0, 0), (1, 3)]:
        assert not np.array_equal(new_attn.wq[layer, head], upd_attn.wq[layer, head])


# --------------------------------------------------------------------------
# bad inputs: ValueError before anything is traced or compiled
# --------------------------------------------------------------------------


def test_bad_inputs_raise_before_compiling(optimizer):
    # under the test suite's runtime type checks the Literal annotation rejects a
    # bad mode first (a TypeError); the function's own check is a ValueError
    with pytest.raises((ValueError, TypeError), match="mode|clipped"):
        make_train_step(optimizer, mode="clipped")
    with pytest.raises(ValueError, match="mode"):
        inspect.unwrap(make_train_step)(optimizer, mode="clipped")
    for tau in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="tau"):
            make_train_step(optimizer, tau=tau)
    for accum in (0, -2):
        with pytest.raises(ValueError, match="accum_steps"):
            make_train_step(optimizer, accum_steps=accum)
    step = make_train_step(optimizer, accum_steps=3)
    # the model and state are placeholders: the check must come before any tracing
    with pytest.raises(ValueError, match="divisible"):
        step(object(), object(), jnp.zeros((4, 9), jnp.int32))


# --------------------------------------------------------------------------
# clip_until: the clip stops after a given step; S is still reported
# --------------------------------------------------------------------------


def test_clip_until_clips_before_and_not_after(
    optimizer, model, opt_state, tokens, tau, clip_run, monitor_run
):
    """From the same state, steps 0 and 1 (< clip_until = 2) give the clip
    step's model bit for bit, steps 2 and 9 the monitor step's; S and
    heads_over_tau are reported either way. The step index is traced: four
    indices, one trace."""
    assert _n_differing_leaves(clip_run[0], monitor_run[0]) > 0  # the clip matters here
    traces = []

    def counting_loss(m, t):
        traces.append(1)
        return next_token_loss(m, t)

    step = make_train_step(optimizer, mode="clip", tau=tau, clip_until=2, loss_fn=counting_loss)
    for i, ref in (
        (0, clip_run),
        (jnp.int32(1), clip_run),
        (2, monitor_run),
        (np.int64(9), monitor_run),
    ):
        new_model, _, metrics = step(_copy(model), _copy(opt_state), tokens, step=i)
        metrics = jax.device_get(metrics)
        _assert_trees_bit_equal(new_model, ref[0], f"step {i}")
        active = int(i) < 2
        assert int(metrics["clip_active"]) == active
        assert int(metrics["heads_over_tau"]) == int(clip_run[2]["heads_over_tau"]) > 0
        assert int(metrics["heads_clipped"]) == (int(clip_run[2]["heads_clipped"]) if active else 0)
        np.testing.assert_array_equal(metrics["max_logits"], clip_run[2]["max_logits"])
    assert len(traces) == 1


def test_clip_until_bad_inputs_raise_before_compiling(optimizer):
    for bad in (-1, True):
        with pytest.raises((ValueError, TypeError), match="clip_until"):
            make_train_step(optimizer, clip_until=bad)
    with pytest.raises(ValueError, match="clip_until"):
        inspect.unwrap(make_train_step)(optimizer, clip_until=2.5)
    with pytest.raises(ValueError, match="mode='clip'"):
        make_train_step(optimizer, mode="monitor", clip_until=3)
    step = make_train_step(optimizer, clip_until=3)
    with pytest.raises(ValueError, match="step=i"):
        step(object(), object(), jnp.zeros((4, 9), jnp.int32))


def test_train_clip_until_counts_the_steps_across_a_resume(tmp_path, monkeypatch):
    """``qkclip-train --clip-until 4``: the flag reaches RunConfig, and the loop's
    step (restored from the checkpoint on resume) decides: steps 0-3 clip,
    steps 4-5 don't, with the run stopped after step 2 and resumed."""
    import argparse

    import qkclip_eqx._train as train_mod
    from builders import synthetic_corpus
    from qkclip_eqx.cli._flags import add_run_flags, run_config_from_args

    real, built = train_mod.make_train_step, []

    def built_once(*args, **kwargs):  # the resumed run reuses the compiled step
        if not built:
            built.append(real(*args, **kwargs))
        return built[0]

    monkeypatch.setattr(train_mod, "make_train_step", built_once)
    parser = argparse.ArgumentParser()
    add_run_flags(parser)
    out = tmp_path / "run"

    def config(steps):
        return run_config_from_args(
            parser.parse_args(
                [
                    "--preset",
                    "tiny",
                    "--clip-until",
                    "4",
                    "--tau",
                    "0.01",
                    "--steps",
                    str(steps),
                    "--ckpt-every",
                    "3",
                    "--eval-every",
                    "100",
                    "--out",
                    str(out),
                ]
            )
        )

    assert config(3).clip_until == 4 and config(3).mode == "clip"
    data = synthetic_corpus(100_000)
    assert train_mod.train(config(3), progress=False, data=data).step == 3
    assert train_mod.train(config(6), resume=True, progress=False, data=data).step == 6
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(6))
    assert [r["clip_active"] for r in records] == [1, 1, 1, 1, 0, 0]
    over = [r["heads_over_tau"] for r in records]
    assert all(n > 0 for n in over)  # S is still measured (and over tau) after the clip stops
    assert [r["heads_clipped"] for r in records] == over[:4] + [0, 0]


def test_lse_bound_metrics_say_bound(tokens):
    """With ``max_logit="lse_bound"`` the model reports the log-sum-exp bound,
    and the step's S metrics are named ``*_lse_bound``: no ``max_logits`` key
    holds something that is not S. The bound lies in [S, S + log(seq)], S from
    the same weights under the exact kernel."""
    att = GQAConfig(
        dim=16,
        n_heads=4,
        head_dim=4,
        n_kv_heads=2,
        kernel="dot_product_attention",
        max_logit="lse_bound",
    )
    cfg = TransformerConfig(vocab_size=VOCAB, n_layers=2, mlp_hidden=32, attention=att)
    model = _init(lambda k: Transformer(cfg, key=k), 4)
    exact_cfg = TransformerConfig(
        vocab_size=VOCAB,
        n_layers=2,
        mlp_hidden=32,
        attention=GQAConfig(dim=16, n_heads=4, head_dim=4, n_kv_heads=2),
    )
    template = eqx.filter_eval_shape(Transformer, exact_cfg, key=jax.random.key(0))
    exact = jtu.tree_unflatten(jtu.tree_structure(template), jax.tree.leaves(model))
    _, s = map(np.asarray, _forward(exact, tokens))
    opt = optax.sgd(LR)
    _, _, metrics = make_train_step(opt, mode="monitor")(
        _copy(model), opt.init(eqx.filter(model, eqx.is_array)), tokens
    )
    assert "max_logits" not in metrics and "max_logit" not in metrics
    bound = np.asarray(metrics["max_logits_lse_bound"])
    assert bound.shape == s.shape
    assert np.all(bound >= s - 1e-5) and np.all(bound <= s + math.log(tokens.shape[1] - 1) + 1e-5)
    assert float(metrics["max_logit_lse_bound"]) == float(bound.max())
