"""The defaults the Hugging Face loaders give a key that a config omits are
transformers' own: for every optional key the loaders read (found by recording
their reads, so a new key cannot be missed), a config without the key loads
exactly as one holding transformers' default for it, on probes that sit on
each default's boundaries (layers below and above `first_k_dense_replace`, a
YaRN block with and without `factor`, a head tied or not). And a config.json
value of the wrong JSON type (`true` for a size, a string for a number) is
refused by name, never read as 1 or parsed.

`TRANSFORMERS_DEFAULTS` is `DeepseekV3Config.__init__`'s defaults in
transformers 5.25.0 (`inspect.signature`), and `YARN_DEFAULTS` those of its
`_compute_yarn_parameters` (modeling_rope_utils.py: `beta_fast or 32`,
`beta_slow or 1`, `truncate` True, `mscale`/`mscale_all_dim` None, `factor`
None meaning `max_position_embeddings / original_max_position_embeddings`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from qkclip_eqx.hf import (
    mla_config_from_hf,
    transformer_config_from_hf,
    transformer_expected_shapes,
    transformer_from_hf,
)

ABSENT = object()  # a key transformers' config does not have: read as absent (falsy)

TRANSFORMERS_DEFAULTS: dict[str, Any] = {
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_interleave": True,
    "attention_bias": False,
    "attention_dropout": 0.0,
    # transformers 5 keeps rope_theta inside rope_parameters; older configs at the top level
    "rope_theta": 10_000.0,
    "rope_scaling": None,
    "rope_parameters": None,
    "mlp_bias": ABSENT,  # not a DeepseekV3Config field: its MLP has no bias
    "num_nextn_predict_layers": 1,  # the multi-token-prediction layers, skipped
    # keys of DeepSeek's own configs (remote code), not DeepseekV3Config fields: the
    # MoE loader refuses any value but the only router transformers implements
    "scoring_func": ABSENT,
    "topk_method": ABSENT,
    "moe_layer_freq": ABSENT,
    "quantization_config": ABSENT,
}
YARN_DEFAULTS: dict[str, Any] = {
    "rope_theta": 10_000.0,
    "beta_fast": 32,
    "beta_slow": 1,
    "truncate": True,
    "mscale": None,
    "mscale_all_dim": None,
    "factor": None,
    "rope_type": "default",
    "type": ABSENT,  # the old spelling of rope_type
}

# a small all-dense model; the keys the loaders require
REQUIRED = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
)
YARN = dict(
    rope_type="yarn",
    factor=40.0,
    original_max_position_embeddings=4096,
    beta_fast=32,
    beta_slow=1,
    truncate=True,
    mscale=1.0,
    mscale_all_dim=1.0,
)


class _Recording(dict):
    """A config dict that records every read that may find a key absent
    (`get`, `in`), nested blocks included, as `(block, key)`."""

    def __init__(self, values: dict, reads: set, block: str = ""):
        super().__init__(values)
        self._reads, self._block = reads, block

    def _wrap(self, key, value):
        if isinstance(value, dict) and not isinstance(value, _Recording):
            return _Recording(value, self._reads, key)
        return value

    def get(self, key, default=None):  # pyright: ignore[reportIncompatibleMethodOverride]
        self._reads.add((self._block, key))
        return self._wrap(key, super().get(key, default))

    def __contains__(self, key):
        self._reads.add((self._block, key))
        return super().__contains__(key)

    def __getitem__(self, key):
        return self._wrap(key, super().__getitem__(key))


def _state_dict(hf: dict) -> dict[str, np.ndarray]:
    """Distinct values for every weight of an all-dense config; no lm_head."""
    shapes = transformer_expected_shapes(transformer_config_from_hf(hf))
    rng = np.random.default_rng(0)
    return {
        "model." + k: rng.standard_normal(s).astype(np.float32)
        for k, s in shapes.items()
        if k != "lm_head.weight"
    }


def _outcome(fn: Callable[[], Any]) -> Any:
    try:
        return ("ok", fn())
    except Exception as e:  # the same error for both is the same behaviour
        return ("error", type(e).__name__, str(e))


def _loaded(hf: dict, reads: set) -> tuple:
    """What every loader makes of `hf`: the attention and model configs and,
    for an all-dense config, whether the loaded head is the embedding."""
    cfg = _Recording(hf, reads)
    out = [
        _outcome(lambda: mla_config_from_hf(cfg)),
        _outcome(lambda: transformer_config_from_hf(cfg)),
    ]
    if out[1][0] == "ok":
        state = _state_dict(hf)

        def head_is_embedding():
            model = transformer_from_hf(state, cfg)
            return np.array_equal(model.lm_head, model.embed)

        out.append(_outcome(head_is_embedding))
    return tuple(out)


def _with_defaults(probe: dict) -> dict:
    hf = {k: v for k, v in TRANSFORMERS_DEFAULTS.items() if v is not ABSENT}
    del hf["rope_theta"]  # transformers 5 writes it inside rope_parameters only
    hf["q_lora_rank"] = 32  # transformers' 1536 is tested below; smaller here
    hf.update(REQUIRED)
    hf.update(probe)
    return hf


SMALL_EXPERTS = {"n_routed_experts": 16, "moe_intermediate_size": 16}

# Each probe holds every key at transformers' default except those it sets:
# a default that moved across any of these boundaries changes a result.
PROBES = {
    "dense": {},
    # layers 3.. are MoE layers at the defaults (first_k_dense_replace = 3). Small
    # experts (16 of width 16: 8 groups of 2, 4 groups kept, 8 per token): at the
    # defaults (256 of width 2048) the weights are 0.4 GB a layer and 5-15 s a
    # case; the cases of those two keys still load their defaults
    "moe_layers": {"num_hidden_layers": 4, **SMALL_EXPERTS},
    "moe_layers_first_dense_1": {
        "num_hidden_layers": 4,
        "first_k_dense_replace": 1,
        **SMALL_EXPERTS,
    },
    "no_experts": {"num_hidden_layers": 4, "n_routed_experts": 0},
    "q_lora_default": {"q_lora_rank": 1536},
    "half_rope": {"rope_interleave": False},
    "eps": {"rms_norm_eps": 1e-5},
    "theta_inside": {"rope_parameters": {"rope_type": "default", "rope_theta": 50_000.0}},
    "yarn": {"rope_scaling": dict(YARN), "max_position_embeddings": 163840},
    "yarn_no_factor": {
        "rope_scaling": {k: v for k, v in YARN.items() if k != "factor"},
        "max_position_embeddings": 163840,
    },
    "yarn_no_factor_default_max_pos": {
        "rope_scaling": {k: v for k, v in YARN.items() if k != "factor"},
    },
    "yarn_other_betas": {
        "rope_scaling": {**YARN, "beta_fast": 16, "beta_slow": 2, "truncate": False},
    },
    "tied": {"tie_word_embeddings": True},
}


def _cases():
    for name, probe in PROBES.items():
        hf = _with_defaults(probe)
        for key, default in TRANSFORMERS_DEFAULTS.items():
            yield pytest.param(hf, (key,), default, id=f"{name}-{key}")
        for block in ("rope_scaling", "rope_parameters"):
            if isinstance(hf.get(block), dict):
                for key, default in YARN_DEFAULTS.items():
                    yield pytest.param(hf, (block, key), default, id=f"{name}-{block}.{key}")


def _set(hf: dict, path: tuple, value: Any) -> dict:
    """A deep copy of `hf` with `path` set to `value` (removed for `ABSENT`)."""
    out = copy.deepcopy(hf)
    d = out
    for k in path[:-1]:
        d = d[k]
    if value is ABSENT:
        d.pop(path[-1], None)
    else:
        d[path[-1]] = value
    return out


@pytest.mark.parametrize("hf, path, default", list(_cases()))
def test_an_omitted_key_loads_as_transformers_default(hf, path, default):
    omitted = _set(hf, path, ABSENT)
    explicit = _set(hf, path, default)
    if path == ("rope_scaling",) or path == ("rope_parameters",):
        # absent and null read alike; when the other block is the one in use, omitting
        # this one changes nothing there is to compare
        other = {"rope_scaling": "rope_parameters", "rope_parameters": "rope_scaling"}[path[0]]
        if isinstance(hf.get(other), dict):
            return  # the block in use is the other one: nothing to compare here
    if path == ("rope_theta",):
        # an omitted top-level rope_theta is the rope block's, else 10000
        block = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        explicit = _set(hf, path, block.get("rope_theta", default))
    if path[-1] == "factor" and "original_max_position_embeddings" not in hf[path[0]]:
        return  # not a YaRN block: factor is not read
    if path[-1] == "factor" and default is None:
        # transformers: factor None means max_position_embeddings / original
        explicit = _set(
            hf,
            path,
            hf.get("max_position_embeddings", TRANSFORMERS_DEFAULTS["max_position_embeddings"])
            / hf[path[0]]["original_max_position_embeddings"],
        )
    got = _loaded(omitted, set())
    if ("error", "KeyError", repr(path[-1])) in got:
        return  # a required key: its absence is refused by name (test_hf.py), not defaulted
    assert got == _loaded(explicit, set())


def test_every_optional_key_read_has_a_checked_default():
    """The keys the loaders read with `get` are all in the tables above: a new
    optional key fails here until its transformers default is recorded (and
    then tested by the test above)."""
    reads: set = set()
    for probe in PROBES.values():
        _loaded(_with_defaults(probe), reads)
    top = {k for block, k in reads if block == ""}
    nested = {k for block, k in reads if block in ("rope_scaling", "rope_parameters")}
    assert top - set(TRANSFORMERS_DEFAULTS) == set()
    required_by_transformers = {"original_max_position_embeddings"}
    assert nested - set(YARN_DEFAULTS) - required_by_transformers == set()
    assert {"q_lora_rank", "rope_interleave", "first_k_dense_replace", "rms_norm_eps"} <= top


def test_q_lora_rank_omitted_is_transformers_1536():
    """The bug this file found: an omitted q_lora_rank was read as None (no
    query LoRA), where transformers builds q_a_proj/q_b_proj of rank 1536."""
    hf = _with_defaults({})
    del hf["q_lora_rank"]
    assert mla_config_from_hf(hf).q_lora_rank == 1536


# --------------------------------------------------------------------------
# JSON type strictness of config.json values
# --------------------------------------------------------------------------

NUMBER_KEYS = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "q_lora_rank",
    "rms_norm_eps",
    "rope_theta",
    "first_k_dense_replace",
]
YARN_NUMBER_KEYS = [
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
]


@pytest.mark.parametrize("bad", [True, False, "64", [64]])
@pytest.mark.parametrize(
    "path", [(k,) for k in NUMBER_KEYS] + [("rope_scaling", k) for k in YARN_NUMBER_KEYS]
)
def test_a_number_of_the_wrong_json_type_is_refused_by_name(path, bad):
    """`true` is an int in Python: `int(True)` would load a one-wide layer."""
    hf = _with_defaults({"rope_scaling": dict(YARN), "max_position_embeddings": 163840})
    bad_hf = _set(hf, path, bad)
    with pytest.raises((ValueError, TypeError), match=path[-1]):
        transformer_config_from_hf(bad_hf)


@pytest.mark.parametrize(
    "path", [("rope_interleave",), ("tie_word_embeddings",), ("rope_scaling", "truncate")]
)
@pytest.mark.parametrize("bad", [1, 0, "false"])
def test_a_bool_of_the_wrong_json_type_is_refused_by_name(path, bad):
    hf = _with_defaults({"rope_scaling": dict(YARN), "max_position_embeddings": 163840})
    bad_hf = _set(hf, path, bad)
    with pytest.raises((ValueError, TypeError), match=path[-1]):
        transformer_from_hf(_state_dict(hf), bad_hf)
