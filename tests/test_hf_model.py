"""Loading a whole all-dense DeepSeek-V3-architecture model (transformers'
`DeepseekV3ForCausalLM`) into `qkclip_eqx.Transformer`: logits and per-layer S
against a golden file written by scripts/make_hf_golden.py from transformers'
eager forward (2 dense layers, q LoRA, DeepSeek-V3's YaRN block at positions
past the original context, block norms' eps 1e-5 against the attention norms'
1e-6); with or without the `model.` prefix, from safetensors shards on disk,
with a tied head; bad state dicts refused by name."""

from __future__ import annotations

import json
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import qkclip_eqx as qc
from qkclip_eqx.hf import transformer_expected_shapes, transformer_from_hf

DATA = pathlib.Path(__file__).parent / "data"
NOT_WEIGHTS = ("input_ids", "position_ids", "logits", "max_logits", "config_json", "versions")


@pytest.fixture(scope="module")
def golden():
    with np.load(DATA / "hf_dsv3_model_yarn.npz") as f:
        arrays = {k: f[k] for k in f.files}
    hf_config = json.loads(str(arrays["config_json"]))
    state = {k: v for k, v in arrays.items() if k not in NOT_WEIGHTS}
    return arrays, hf_config, state


@eqx.filter_jit
def run(model, tokens, positions):
    return model(tokens, positions=positions)


def _logits_and_s(model, arrays):
    tokens, positions = jnp.asarray(arrays["input_ids"]), jnp.asarray(arrays["position_ids"])
    return map(np.asarray, run(model, tokens, positions))


def test_logits_and_s_match_transformers(golden):
    arrays, hf_config, state = golden
    model = transformer_from_hf(state, hf_config)
    c = model.config
    assert (c.n_layers, c.mlp_hidden, c.norm_eps, c.attention.norm_eps) == (2, 96, 1e-5, 1e-6)
    assert c.attention.yarn is not None and c.attention.q_lora_rank == 32  # pyright: ignore
    logits, s = _logits_and_s(model, arrays)
    ref = arrays["logits"]
    # float32 rounding: measured max |diff| 4.8e-6 of logits up to 5.3 (jax 0.10.2, CPU,
    # against transformers 5.25.0 / torch 2.14.1 CPU); allowed 1e-5 absolute (the block
    # norms at the attention norms' eps 1e-6 instead of 1e-5 give 3.4e-5)
    np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(s, arrays["max_logits"], rtol=5e-6)  # measured rel 9.8e-7
    assert np.abs(ref).max() > 1.0 and np.ptp(arrays["max_logits"]) > 1.0
    # the weights landed where they belong, as the state dict holds them
    np.testing.assert_array_equal(model.embed, state["model.embed_tokens.weight"])
    np.testing.assert_array_equal(model.lm_head, state["lm_head.weight"])
    np.testing.assert_array_equal(
        model.blocks.mlp.w_down[1], state["model.layers.1.mlp.down_proj.weight"]
    )
    np.testing.assert_array_equal(
        model.blocks.attn.wkv_a[1], state["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"]
    )


def test_without_model_prefix_and_from_safetensors_shards(golden, tmp_path):
    arrays, hf_config, state = golden
    bare = {k.removeprefix("model."): v for k, v in state.items()}
    ref = transformer_from_hf(state, hf_config)
    assert eqx.tree_equal(transformer_from_hf(bare, hf_config), ref)
    names = sorted(state)
    save_file({k: state[k] for k in names[::2]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(
        {k: state[k] for k in names[1::2]}, str(tmp_path / "model-00002-of-00002.safetensors")
    )
    assert eqx.tree_equal(transformer_from_hf(tmp_path, hf_config), ref)
    one = tmp_path / "one" / "model.safetensors"
    one.parent.mkdir()
    save_file(state, str(one))
    assert eqx.tree_equal(transformer_from_hf(str(one), hf_config), ref)
    assert set(qc.hf.load_safetensors(tmp_path)) == set(state)


def test_tied_head_is_the_embedding(golden):
    arrays, hf_config, state = golden
    tied = {k: v for k, v in state.items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\]"):
        transformer_from_hf(tied, hf_config)
    model = transformer_from_hf(tied, {**hf_config, "tie_word_embeddings": True})
    np.testing.assert_array_equal(model.lm_head, state["model.embed_tokens.weight"])


def test_moe_config_wants_moe_weights_by_name(golden):
    """A config with MoE layers (tests/test_hf_moe.py loads real ones) given a
    dense state dict: the missing router and experts are named."""
    _, hf_config, state = golden
    moe = {
        **hf_config,
        "first_k_dense_replace": 1,
        "n_routed_experts": 8,
        "n_group": 1,
        "topk_group": 1,
        "num_experts_per_tok": 2,
    }
    with pytest.raises(
        ValueError,
        match=r"1 dense layers and 1 mixture-of-experts layers\): missing "
        r"\['layers.1.mlp.experts.0.down_proj.weight'",
    ):
        transformer_from_hf(state, moe)


def test_bad_state_dicts_are_named(golden):
    _, hf_config, state = golden
    gone = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing \['layers.1.mlp.up_proj.weight'\]"):
        transformer_from_hf(gone, hf_config)
    extra = {**state, "model.layers.2.mlp.up_proj.weight": np.zeros((96, 64), np.float32)}
    no_mtp = {**hf_config, "num_nextn_predict_layers": 0}
    with pytest.raises(ValueError, match=r"unexpected \['layers.2.mlp.up_proj.weight'\]"):
        transformer_from_hf(extra, no_mtp)
    # with DeepseekV3Config's default of one multi-token-prediction layer, layer 2
    # is that layer (DeepSeek-V3's checkpoints hold it), skipped
    assert hf_config["num_nextn_predict_layers"] == 1
    assert eqx.tree_equal(
        transformer_from_hf(extra, hf_config), transformer_from_hf(state, hf_config)
    )
    both = {**state, "norm.weight": state["model.norm.weight"]}
    with pytest.raises(ValueError, match="both with and without the 'model.' prefix"):
        transformer_from_hf(both, hf_config)
    bad = {**state, "model.norm.weight": np.ones(3, np.float32)}
    with pytest.raises(ValueError, match=r"norm.weight has shape \(3,\), expected \(64,\)"):
        transformer_from_hf(bad, hf_config)


def test_expected_names_cover_the_state_dict(golden):
    _, hf_config, state = golden
    shapes = transformer_expected_shapes(qc.hf.transformer_config_from_hf(hf_config))
    assert {k.removeprefix("model."): v.shape for k, v in state.items()} == shapes
    assert jax.tree.structure(transformer_from_hf(state, hf_config)) == jax.tree.structure(
        qc.Transformer(qc.hf.transformer_config_from_hf(hf_config), key=jax.random.key(0))
    )
