"""Loading Hugging Face DeepseekV3Attention weights: output and per-head max
logits match golden files written by scripts/make_hf_golden.py from
transformers' own eager attention (q LoRA on and off), for both kernels."""

from __future__ import annotations

import json
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkclip_eqx import MLAttention
from qkclip_eqx.hf import mla_config_from_hf, mla_from_hf

DATA = pathlib.Path(__file__).parent / "data"
FILES = {"qlora": "hf_dsv3_attn_qlora.npz", "noqlora": "hf_dsv3_attn_noqlora.npz"}
NOT_WEIGHTS = ("hidden_states", "output", "max_logits", "config_json", "versions")


def load(case):
    with np.load(DATA / FILES[case]) as f:
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
    assert config.qk_head_dim ** -0.5 == pytest.approx(hf_config["scaling"], rel=1e-12)
    module = mla_from_hf(state, config)
    assert isinstance(module, MLAttention)
    out, max_logits = run(module, jnp.asarray(arrays["hidden_states"]))
    assert arrays["max_logits"].shape == (config.n_heads,)
    np.testing.assert_allclose(np.asarray(max_logits), arrays["max_logits"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out), arrays["output"], rtol=1e-4, atol=1e-5)


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
    np.testing.assert_array_equal(np.asarray(m.wq[1]), state[q_name][c.qk_head_dim:2 * c.qk_head_dim])
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
    np.testing.assert_allclose(np.asarray(max_logits), arrays["max_logits"], rtol=5e-2, atol=5e-2)
    np.testing.assert_allclose(np.asarray(out, np.float32), arrays["output"],
                               atol=5e-2 * np.abs(arrays["output"]).max())


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
    yarn = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096}
    with pytest.raises(ValueError, match=r"yarn"):
        mla_config_from_hf({**hf_config, "rope_scaling": yarn, "rope_parameters": None})
    with pytest.raises(ValueError, match=r"yarn"):
        mla_config_from_hf({**hf_config, "rope_scaling": None, "rope_parameters": yarn})
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
