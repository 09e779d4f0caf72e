"""Loading Hugging Face DeepseekV3Attention weights: output and per-head max
logits match golden files written by scripts/make_hf_golden.py from
transformers' own eager attention (q LoRA on and off), for both kernels; and
with YaRN RoPE scaling (DeepSeek-V3's and Kimi K2-Instruct-0905's
rope_scaling blocks, and one with mscale != mscale_all_dim) at positions past
the original context."""

from __future__ import annotations

import json
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkclip_eqx import MLAttention, YaRN, qk_clip
from qkclip_eqx._rope import rope_inv_freq
from qkclip_eqx.hf import mla_config_from_hf, mla_from_hf

DATA = pathlib.Path(__file__).parent / "data"
FILES = {"qlora": "hf_dsv3_attn_qlora.npz", "noqlora": "hf_dsv3_attn_noqlora.npz"}
YARN_FILES = {
    "yarn": "hf_dsv3_attn_yarn.npz",
    "yarn_mscale": "hf_dsv3_attn_yarn_mscale.npz",
    "k2_yarn": "hf_k2_attn_yarn.npz",
}
NOT_WEIGHTS = ("hidden_states", "output", "max_logits", "config_json", "versions", "position_ids")


def load(case):
    with np.load(DATA / {**FILES, **YARN_FILES}[case]) as f:
        arrays = {k: f[k] for k in f.files}
    hf_config = json.loads(str(arrays["config_json"]))
    state = {k: v for k, v in arrays.items() if k not in NOT_WEIGHTS}
    return arrays, hf_config, state


@pytest.fixture(scope="module", params=list(FILES))
def golden(request):
    return request.param, *load(request.param)


@eqx.filter_jit
def run(module, x):
    return module(x)


@pytest.mark.parametrize("kernel,block_size", [("dense", 128), ("blockwise", 5)])
def test_matches_hf_golden(golden, kernel, block_size):
    case, arrays, hf_config, state = golden
    config = mla_config_from_hf(hf_config, kernel=kernel, block_size=block_size)
    assert (config.q_lora_rank is None) == (case == "noqlora")
    assert config.rope_layout == "interleaved"
    # The golden's own record of HF's softmax scale is ours.
    assert config.qk_head_dim**-0.5 == pytest.approx(hf_config["scaling"], rel=1e-12)
    module = mla_from_hf(state, config)
    assert isinstance(module, MLAttention)
    out, max_logits = run(module, jnp.asarray(arrays["hidden_states"]))
    assert arrays["max_logits"].shape == (config.n_heads,)
    # measured max |diff| 1.4e-6, 20% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(
        np.asarray(max_logits), arrays["max_logits"], rtol=1.5e-6, atol=1.5e-7
    )
    # measured max |diff| 1.4e-6, 23% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(np.asarray(out), arrays["output"], rtol=5e-5, atol=5e-6)


def test_golden_files_are_not_trivial(golden):
    """Guards the comparison: heads differ, output is not ~0."""
    _, arrays, _, _ = golden
    assert np.ptp(arrays["max_logits"]) > 0.1
    assert np.abs(arrays["output"]).max() > 0.1


def test_weights_land_in_the_documented_layout(golden):
    """HF (out, in) weights, per-head rows head-major, reshape into ours."""
    case, _, hf_config, state = golden
    c = mla_config_from_hf(hf_config)
    m = mla_from_hf(state, c)
    h = c.n_heads
    q_name = "q_proj.weight" if case == "noqlora" else "q_b_proj.weight"
    np.testing.assert_array_equal(
        np.asarray(m.wq[1]), state[q_name][c.qk_head_dim : 2 * c.qk_head_dim]
    )
    per_head = c.qk_nope_head_dim + c.v_head_dim
    np.testing.assert_array_equal(np.asarray(m.wkv_b[h - 1]), state["kv_b_proj.weight"][-per_head:])
    np.testing.assert_array_equal(np.asarray(m.wkv_a), state["kv_a_proj_with_mqa.weight"])
    np.testing.assert_array_equal(np.asarray(m.kv_norm.weight), state["kv_a_layernorm.weight"])
    np.testing.assert_array_equal(np.asarray(m.wo), state["o_proj.weight"])
    if case == "qlora":
        np.testing.assert_array_equal(np.asarray(m.wq_a), state["q_a_proj.weight"])
        np.testing.assert_array_equal(np.asarray(m.q_norm.weight), state["q_a_layernorm.weight"])
    else:
        assert m.wq_a is None and m.q_norm is None


def test_bf16_load(golden):
    _, arrays, hf_config, state = golden
    module = mla_from_hf(state, mla_config_from_hf(hf_config), dtype=jnp.bfloat16)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(module))
    out, max_logits = run(module, jnp.asarray(arrays["hidden_states"], jnp.bfloat16))
    assert max_logits.dtype == jnp.float32
    # measured (jax 0.10.2, CPU): S 0.58% relative, outputs 0.74% of their
    # largest magnitude (qlora; noqlora 0.47%, 0.55%)
    np.testing.assert_allclose(np.asarray(max_logits), arrays["max_logits"], rtol=2.5e-2)
    np.testing.assert_allclose(
        np.asarray(out, np.float32), arrays["output"], atol=3e-2 * np.abs(arrays["output"]).max()
    )


# --------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(FILES))
def test_missing_key_is_named(case):
    _, hf_config, state = load(case)
    config = mla_config_from_hf(hf_config)
    for name in state:
        bad = {k: v for k, v in state.items() if k != name}
        with pytest.raises(ValueError, match=rf"missing.*{name}"):
            mla_from_hf(bad, config)


@pytest.mark.parametrize("case", list(FILES))
@pytest.mark.parametrize("extra", ["q_a_proj.bias", "o_proj.bias", "extra_proj.weight"])
def test_unexpected_key_is_named(case, extra):
    _, hf_config, state = load(case)
    with pytest.raises(ValueError, match=rf"unexpected.*{extra}"):
        mla_from_hf({**state, extra: np.zeros(3, np.float32)}, mla_config_from_hf(hf_config))


def test_layer_prefix_not_stripped_is_refused():
    _, hf_config, state = load("qlora")
    prefixed = {f"model.layers.0.self_attn.{k}": v for k, v in state.items()}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.kv_b_proj\.weight"):
        mla_from_hf(prefixed, mla_config_from_hf(hf_config))


def test_weights_of_the_other_query_path_are_refused():
    """q LoRA weights for a config without q LoRA (and vice versa) are named."""
    _, cfg_q, state_q = load("qlora")
    _, cfg_n, state_n = load("noqlora")
    with pytest.raises(ValueError, match=r"q_a_proj\.weight"):
        mla_from_hf(state_q, mla_config_from_hf(cfg_n))
    with pytest.raises(ValueError, match=r"q_proj\.weight"):
        mla_from_hf(state_n, mla_config_from_hf(cfg_q))


@pytest.mark.parametrize("case", list(FILES))
def test_wrong_shape_is_named(case):
    _, hf_config, state = load(case)
    config = mla_config_from_hf(hf_config)
    for name, value in state.items():
        bad = dict(state)
        bad[name] = value[:-1]
        with pytest.raises(ValueError, match=rf"{name}.*shape"):
            mla_from_hf(bad, config)
        bad[name] = value.T if value.ndim == 2 and value.shape[0] != value.shape[1] else value[None]
        with pytest.raises(ValueError, match=rf"{name}.*shape"):
            mla_from_hf(bad, config)


def test_config_mismatch_is_refused():
    """Weights of one size with a config of another fail on shape, not later."""
    _, hf_config, state = load("qlora")
    with pytest.raises(ValueError, match=r"shape"):
        mla_from_hf(state, mla_config_from_hf({**hf_config, "kv_lora_rank": 8}))


def test_unsupported_rope_is_refused():
    _, hf_config, state = load("qlora")
    dynamic = {"rope_type": "dynamic", "factor": 4.0}
    with pytest.raises(ValueError, match=r"dynamic"):
        mla_config_from_hf({**hf_config, "rope_scaling": dynamic, "rope_parameters": None})
    with pytest.raises(ValueError, match=r"dynamic"):
        mla_config_from_hf({**hf_config, "rope_scaling": None, "rope_parameters": dynamic})
    yarn = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096}
    with pytest.raises(ValueError, match=r"attention_factor"):
        mla_config_from_hf({**hf_config, "rope_scaling": {**yarn, "attention_factor": 1.2}})
    with pytest.raises(ValueError, match=r"original_max_position_embeddings"):
        mla_config_from_hf({**hf_config, "rope_scaling": {"type": "yarn", "factor": 40.0}})
    # Non-interleaved RoPE storage is not the DeepSeek layout: the loader refuses.
    half = mla_config_from_hf({**hf_config, "rope_interleave": False})
    assert half.rope_layout == "half"
    with pytest.raises(ValueError, match=r"interleaved"):
        mla_from_hf(state, half)


def test_config_fields_from_hf():
    _, hf_config, _ = load("qlora")
    c = mla_config_from_hf(hf_config)
    assert (c.dim, c.n_heads, c.q_lora_rank, c.kv_lora_rank) == (64, 4, 32, 16)
    assert (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (16, 8, 16)
    assert c.rope_theta == 10_000.0 and c.norm_eps == 1e-6 and c.causal
    # rope_theta given only inside rope_parameters (recent transformers) is read.
    moved = {k: v for k, v in hf_config.items() if k != "rope_theta"}
    moved["rope_parameters"] = {"rope_type": "default", "rope_theta": 50_000.0}
    assert mla_config_from_hf(moved).rope_theta == 50_000.0


# --------------------------------------------------------------------------
# YaRN (DeepSeek-V3 / Kimi K2 rope_scaling)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(YARN_FILES))
def yarn_golden(request):
    return request.param, *load(request.param)


@eqx.filter_jit
def run_at(module, x, positions):
    return module(x, positions=positions)


def test_yarn_config_from_hf(yarn_golden):
    case, _, hf_config, _ = yarn_golden
    c = mla_config_from_hf(hf_config)
    y = hf_config["rope_scaling"]
    assert c.yarn == YaRN(
        factor=y["factor"],
        original_max_position_embeddings=4096,
        beta_fast=y["beta_fast"],
        beta_slow=1.0,
        mscale=y["mscale"],
        mscale_all_dim=1.0,
    )
    assert c.rope_theta == (50_000.0 if case == "k2_yarn" else 10_000.0)
    # HF's own record: its rotary inverse frequencies, its cos/sin factor and softmax scale
    # measured rel 1.1e-7 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(
        rope_inv_freq(c.qk_rope_head_dim, c.rope_theta, c.yarn),
        hf_config["rope_inv_freq"],
        rtol=5e-7,
    )
    assert c.yarn.rope_factor == pytest.approx(hf_config["rope_attention_scaling"], rel=1e-12)
    # measured rel 1.5e-16 (jax 0.10.2 and 0.12.0.1, CPU)
    assert c.qk_head_dim**-0.5 * c.yarn.softmax_factor == pytest.approx(
        hf_config["scaling"], rel=6e-16
    )
    # the interpolation acts on some pairs and not on others
    plain = rope_inv_freq(c.qk_rope_head_dim, c.rope_theta)
    assert plain[0] == rope_inv_freq(c.qk_rope_head_dim, c.rope_theta, c.yarn)[0]
    assert not np.allclose(plain, hf_config["rope_inv_freq"], rtol=1e-3)
    if case == "yarn":
        assert c.yarn.rope_factor == 1.0 and c.yarn.softmax_factor == pytest.approx(
            (0.1 * np.log(40) + 1) ** 2,
            rel=1e-15,  # measured exact (float64)
        )


@pytest.mark.parametrize("kernel,block_size", [("dense", 128), ("blockwise", 5)])
def test_yarn_matches_hf_golden(yarn_golden, kernel, block_size):
    _, arrays, hf_config, state = yarn_golden
    module = mla_from_hf(state, mla_config_from_hf(hf_config, kernel=kernel, block_size=block_size))
    x, positions = jnp.asarray(arrays["hidden_states"]), jnp.asarray(arrays["position_ids"])
    assert int(positions[0]) > 4096  # past the original context: the interpolation matters
    out, max_logits = run_at(module, x, positions)
    # measured max |diff| 2.6e-5, 21% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(np.asarray(max_logits), arrays["max_logits"], rtol=3e-5, atol=3e-6)
    # Angles near 5000 rad lose ~3e-4 rad to float32 in HF and here alike, and
    # cos/sin differ there by implementation: the golden's float64 NumPy check
    # (scripts/make_hf_golden.py) sees up to 4e-5 on outputs of size ~4.
    np.testing.assert_allclose(
        np.asarray(out), arrays["output"], rtol=1e-4, atol=2e-5 * np.abs(arrays["output"]).max()
    )
    # guard: plain RoPE with the same weights does not match
    plain = mla_from_hf(state, mla_config_from_hf(hf_config, yarn=None))
    _, s_plain = run_at(plain, x, positions)
    assert np.abs(np.asarray(s_plain) - arrays["max_logits"]).max() > 0.1


def test_qk_clip_is_exact_under_yarn(yarn_golden):
    """S is the logit entering the softmax, YaRN's mscale^2 included: after a
    clip at tau, re-running gives min(S, tau) per head."""
    _, arrays, hf_config, state = yarn_golden
    module = mla_from_hf(state, mla_config_from_hf(hf_config))
    x, positions = jnp.asarray(arrays["hidden_states"]), jnp.asarray(arrays["position_ids"])
    _, s = run_at(module, x, positions)
    tau = float(np.median(arrays["max_logits"]))
    _, s_clipped = run_at(qk_clip(module, s, tau), x, positions)
    # measured rel 6.5e-6 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(
        np.asarray(s_clipped), np.minimum(arrays["max_logits"], tau), rtol=3e-5
    )
    assert np.sum(arrays["max_logits"] > tau) >= 1 and np.sum(arrays["max_logits"] <= tau) >= 1


@pytest.mark.parametrize(
    "field,value",
    [
        ("factor", 0.0),
        ("factor", float("nan")),
        ("original_max_position_embeddings", 0),
        ("original_max_position_embeddings", 4096.0),
        ("beta_fast", -1.0),
        ("beta_slow", 0),
        ("mscale", -1.0),
        ("mscale_all_dim", "1"),
        ("truncate", 1),
    ],
)
def test_yarn_bad_field_is_named(field, value):
    fields = dict(factor=40.0, original_max_position_embeddings=4096)
    with pytest.raises(ValueError, match=rf"YaRN\.{field}"):
        YaRN(**{**fields, field: value})


def test_yarn_field_must_be_a_yarn():
    _, hf_config, _ = load("qlora")
    with pytest.raises(ValueError, match=r"MLAConfig\.yarn"):
        mla_config_from_hf(hf_config, yarn={"factor": 40.0})
