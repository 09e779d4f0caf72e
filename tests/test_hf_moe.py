"""Loading whole DeepSeek-V3-architecture models WITH mixture-of-experts
layers (transformers' `DeepseekV3ForCausalLM`) into `qkclip_eqx.Transformer`:
logits and per-layer S against golden files written by
scripts/make_hf_golden.py from transformers' eager forward, for a Kimi K2-style
router (one group), a DeepSeek-V3-style one (4 groups, the best 2 kept) and a
Moonlight-shaped model with norm_topk_prob off; a wrong routing detail fails
the parity; the per-expert (checkpoint) and fused (transformers) layouts,
safetensors shards with an index, and decoding the loaded model."""

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
import qkclip_eqx._moe as moe_module
from qkclip_eqx.hf import transformer_expected_shapes, transformer_from_hf

DATA = pathlib.Path(__file__).parent / "data"
NOT_WEIGHTS = ("input_ids", "position_ids", "logits", "max_logits", "config_json", "versions")
# file -> the logits' absolute tolerance. Measured max |diff| of logits (up to
# 5.3-6.9) against transformers 5.25.0 / torch 2.13.0+cpu eager (experts too),
# jax 0.10.2 CPU: 4.1e-6 (dsv3), 6.2e-6 (moonlight), 1.0e-4 (k2, whose float64
# forward transformers itself misses by 5.7e-6: K2's yarn block at positions
# near 5000 rad, where float32 cos/sin differ by implementation; see
# test_hf.py's test_yarn_matches_hf_golden)
CASES = {
    "hf_k2_moe.npz": 4e-4,
    "hf_dsv3_moe_groups.npz": 1.6e-5,
    "hf_moonlight_moe_unnormed.npz": 2.5e-5,
}
MUTANT = 0.05  # a wrong routing detail moves some logit by more than this


def _golden(name: str):
    with np.load(DATA / name) as f:
        arrays = {k: f[k] for k in f.files}
    hf_config = json.loads(str(arrays["config_json"]))
    state = {k: v for k, v in arrays.items() if k not in NOT_WEIGHTS}
    return arrays, hf_config, state


@pytest.fixture(scope="module", params=sorted(CASES))
def golden(request):
    return request.param, *_golden(request.param)


@eqx.filter_jit
def run(model, tokens, positions):
    return model(tokens, positions=positions)


def _logits_and_s(model, arrays):
    tokens, positions = jnp.asarray(arrays["input_ids"]), jnp.asarray(arrays["position_ids"])
    return map(np.asarray, run(model, tokens, positions))


def test_logits_and_s_match_transformers(golden):
    name, arrays, hf_config, state = golden
    model = transformer_from_hf(state, hf_config)
    c = model.config
    assert c.moe is not None and c.moe.n_group == hf_config["n_group"]
    assert c.moe.norm_topk_prob == hf_config["norm_topk_prob"]
    logits, s = _logits_and_s(model, arrays)
    ref = arrays["logits"]
    np.testing.assert_allclose(logits, ref, rtol=0, atol=CASES[name])
    # measured rel 9.2e-6 (k2), 8.3e-7 (dsv3), 3.6e-7 (moonlight)
    np.testing.assert_allclose(s, arrays["max_logits"], rtol=4e-5)
    assert np.abs(ref).max() > 1.0
    # the weights landed where they belong
    np.testing.assert_array_equal(
        model.moe_blocks.mlp.experts.w_up[0, 5],
        state[f"model.layers.{c.n_dense_layers}.mlp.experts.5.up_proj.weight"],
    )
    np.testing.assert_array_equal(
        model.moe_blocks.mlp.expert_bias[-1],
        state[f"model.layers.{c.n_layers - 1}.mlp.gate.e_score_correction_bias"],
    )


def _mutant_route(kind: str):
    original = moe_module.route

    def route(logits, bias, config):
        if kind == "softmax":  # softmax scores instead of sigmoid
            scores = jax.nn.softmax(logits, axis=-1)
            logits = jnp.log(scores) - jnp.log1p(-scores)  # so that sigmoid(logits) = scores
            return original(logits, bias, config)
        experts, weights, scores = original(logits, bias, config)
        # the bias used in the weights too
        picked = jnp.take_along_axis(scores + bias, experts, axis=-1)
        if config.norm_topk_prob:
            picked = picked / jnp.sum(picked, axis=-1, keepdims=True)
        return experts, picked * config.routed_scaling_factor, scores

    return route


@pytest.mark.parametrize("kind", ["bias_in_weights", "softmax"])
def test_a_wrong_routing_detail_fails_the_parity(golden, kind, monkeypatch):
    name, arrays, hf_config, state = golden
    model = transformer_from_hf(state, hf_config)
    monkeypatch.setattr(moe_module, "route", _mutant_route(kind))
    logits, _ = map(
        np.asarray,
        eqx.filter_jit(lambda m, t, p: m(t, positions=p))(
            model, jnp.asarray(arrays["input_ids"]), jnp.asarray(arrays["position_ids"])
        ),
    )
    assert np.abs(logits - arrays["logits"]).max() > MUTANT


@pytest.mark.parametrize(
    "name, groups",
    [
        ("hf_dsv3_moe_groups.npz", {"n_group": 1, "topk_group": 1}),
        ("hf_dsv3_moe_groups.npz", {"n_group": 2, "topk_group": 1}),
        ("hf_k2_moe.npz", {"n_group": 4, "topk_group": 1}),
    ],
)
def test_a_wrong_group_count_fails_the_parity(name, groups):
    arrays, hf_config, state = _golden(name)
    model = transformer_from_hf(state, {**hf_config, **groups})
    logits, _ = _logits_and_s(model, arrays)
    assert np.abs(logits - arrays["logits"]).max() > MUTANT


def test_fused_layout_and_safetensors_shards_with_index(tmp_path):
    arrays, hf_config, state = _golden("hf_dsv3_moe_groups.npz")
    ref = transformer_from_hf(state, hf_config)
    # transformers' own state dict: gate_up_proj [experts, 2 * hidden, dim], gate rows first
    fused = {k: v for k, v in state.items() if ".mlp.experts." not in k}
    for i in (1, 2):
        p = f"model.layers.{i}.mlp.experts."
        fused[p + "gate_up_proj"] = np.stack(
            [
                np.concatenate([state[f"{p}{j}.gate_proj.weight"], state[f"{p}{j}.up_proj.weight"]])
                for j in range(16)
            ]
        )
        fused[p + "down_proj"] = np.stack([state[f"{p}{j}.down_proj.weight"] for j in range(16)])
    assert eqx.tree_equal(transformer_from_hf(fused, hf_config), ref)
    # shards named by an index, bfloat16 on disk as the Hub's are for Moonlight
    names = sorted(state)
    weight_map = {}
    for part, chunk in enumerate((names[::2], names[1::2])):
        shard = f"model-0000{part + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in chunk}, str(tmp_path / shard))
        weight_map.update({k: shard for k in chunk})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    assert eqx.tree_equal(transformer_from_hf(tmp_path, hf_config), ref)
    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    save_file(
        {k: np.asarray(jnp.asarray(v, jnp.bfloat16)) for k, v in state.items()},
        str(bf16 / "model.safetensors"),
    )
    loaded = transformer_from_hf(bf16, hf_config)
    want = np.asarray(
        jnp.asarray(state["model.layers.2.mlp.gate.weight"], jnp.bfloat16), np.float32
    )
    np.testing.assert_array_equal(np.asarray(loaded.moe_blocks.mlp.router[1]), want)


def test_expected_names_cover_the_state_dict():
    for name in sorted(CASES):
        _, hf_config, state = _golden(name)
        shapes = transformer_expected_shapes(qc.hf.transformer_config_from_hf(hf_config))
        assert {k.removeprefix("model."): v.shape for k, v in state.items()} == shapes


def test_decode_of_a_loaded_moe_model_equals_forward():
    arrays, hf_config, state = _golden("hf_k2_moe.npz")
    model = transformer_from_hf(state, hf_config)
    tokens, positions = jnp.asarray(arrays["input_ids"]), jnp.asarray(arrays["position_ids"])
    # decode runs at positions 0..; compare with the forward at the same positions
    full, _ = run(model, tokens, jnp.arange(12))
    cache = model.init_cache(12)
    logits, _, cache = model.decode(tokens[:8], cache)
    rest = [model.decode(tokens[i : i + 1], cache) for i in range(8, 9)]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:8]), rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(rest[0][0]), np.asarray(full[8:9]), rtol=0, atol=2e-5)
    del positions


def test_unsupported_configs_are_named():
    _, hf_config, state = _golden("hf_k2_moe.npz")
    for changes, message in [
        ({"scoring_func": "softmax"}, "scoring_func 'softmax' is not supported"),
        ({"topk_method": "greedy"}, "topk_method 'greedy' is not supported"),
        ({"moe_layer_freq": 2}, "moe_layer_freq=2 is not supported"),
        ({"first_k_dense_replace": 0}, "first_k_dense_replace=0"),
        ({"quantization_config": {"quant_method": "fp8"}}, "FP8 with block scales"),
    ]:
        with pytest.raises(ValueError, match=message):
            transformer_from_hf(state, {**hf_config, **changes})
    fp8 = {**state, "model.layers.1.mlp.gate.weight_scale_inv": np.ones(1, np.float32)}
    with pytest.raises(ValueError, match="weight_scale_inv' is an FP8 block scale"):
        transformer_from_hf(fp8, hf_config)
    gone = {k: v for k, v in state.items() if k != "model.layers.2.mlp.experts.7.up_proj.weight"}
    with pytest.raises(
        ValueError,
        match=r"1 dense layers and 2 mixture-of-experts layers\): missing "
        r"\['layers.2.mlp.experts.7.up_proj.weight'\]",
    ):
        transformer_from_hf(gone, hf_config)
    # the multi-token-prediction layer of DeepSeek-V3's checkpoints is skipped
    mtp = {**state, "model.layers.3.mlp.gate.weight": np.ones((8, 64), np.float32)}
    assert hf_config["num_nextn_predict_layers"] == 1  # DeepseekV3Config's default
    with pytest.raises(ValueError, match=r"unexpected \['layers.3.mlp.gate.weight'\]"):
        transformer_from_hf(mtp, {**hf_config, "num_nextn_predict_layers": 0})
    loaded = transformer_from_hf(mtp, hf_config)
    assert loaded.config.n_layers == 3
