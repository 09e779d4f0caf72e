"""Every check over several leaves (or heads, rows, fields) tested with them in
MIXED states: one bad among good, the bad one neither first nor last. A check
tested only with every leaf alike (all NaN, all finite, all equal) cannot tell
`any` from `all`; each test here fails when one is swapped for the other.

The places: the step's `first_nonfinite` (loss, gradient norm, every element
of every parameter), GQA group mode's heads scaled, the checkpoint's
fingerprint check and structure comparison (one leaf of many), its meta
comparison (one element of a list, one key of a dict), the cuDNN dtype check
(one dtype of three), Muon's routing axes (one axis of two) and RunConfig's union
types (a value fitting one arm only)."""

from __future__ import annotations

import json
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import qkclip_eqx as qc
from qkclip_eqx._checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    load_checkpoint,
    save_checkpoint,
)
from qkclip_eqx._checkpoint_format import meta_diffs
from qkclip_eqx._step import NONFINITE, _first_nonfinite

NAN = float("nan")


def _params(bad_leaf: int | None = None, bad_index: int = 3, value: float = NAN):
    """Five parameter leaves; `bad_leaf` (if any) with one element `value`."""
    leaves = [jnp.arange(8.0).reshape(2, 4) + i for i in range(5)]
    if bad_leaf is not None:
        leaves[bad_leaf] = leaves[bad_leaf].at[bad_index // 4, bad_index % 4].set(value)
    return {"w": leaves, "count": jnp.arange(3)}  # an int leaf is no parameter


@pytest.mark.parametrize(
    "loss, grad_norm, bad_leaf, expected",
    [
        (1.0, 1.0, None, 0),
        (NAN, 1.0, None, 1),
        (1.0, NAN, None, 2),  # loss finite, grad norm not: `all` of the three, not `any`
        (1.0, float("inf"), None, 2),
        (1.0, 1.0, 2, 3),  # one element of one middle leaf
        (1.0, 1.0, 0, 3),
        (1.0, 1.0, 4, 3),
        (NAN, NAN, 1, 1),  # the first that is not finite
        (1.0, NAN, 1, 2),
    ],
)
def test_first_nonfinite_with_quantities_in_mixed_states(loss, grad_norm, bad_leaf, expected):
    got = _first_nonfinite(jnp.float32(loss), jnp.float32(grad_norm), _params(bad_leaf))
    assert int(got) == expected
    if expected:
        assert NONFINITE[expected - 1] == ("loss", "grad_norm", "parameters")[expected - 1]


def test_first_nonfinite_one_inf_element_among_finite_ones():
    params = _params(3, bad_index=6, value=float("-inf"))
    assert int(_first_nonfinite(jnp.float32(0.5), jnp.float32(2.0), params)) == 3


def test_group_mode_scales_a_group_with_one_head_over_tau():
    """Group mode: one head of a group over tau scales the whole group, a group
    with none over tau is untouched (heads [0, 1] and [2, 3] of 2 kv heads)."""
    cfg = qc.GQAConfig(dim=16, n_heads=4, n_kv_heads=2, head_dim=4, clip_mode="group")
    attn = qc.GQAttention(cfg, key=jax.random.key(0))
    gamma = jnp.array([1.0, 0.5, 1.0, 1.0])
    assert attn.heads_scaled(gamma).tolist() == [True, True, False, False]
    gamma = jnp.array([0.5, 0.5, 1.0, 1.0])
    assert attn.heads_scaled(gamma).tolist() == [True, True, False, False]
    for mode in ("query", "query_key"):
        attn_m = qc.GQAttention(
            qc.GQAConfig(dim=16, n_heads=4, n_kv_heads=2, head_dim=4, clip_mode=mode),
            key=jax.random.key(0),
        )
        assert attn_m.heads_scaled(jnp.array([1.0, 0.5, 1.0, 1.0])).tolist() == [
            False,
            True,
            False,
            False,
        ]


# --------------------------------------------------------------------------
# checkpoints: one leaf of many
# --------------------------------------------------------------------------


def _state():
    return {f"leaf_{i}": jnp.arange(6.0) * (i + 1) for i in range(5)}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(
        tmp_path_factory.mktemp("ckpt"), 1, _state(), meta={"cfg": {"betas": [0.9, 0.95], "n": 4}}
    )


def _edit_header(path, edit):
    meta_file = path / "meta" / "metadata"
    header = json.loads(meta_file.read_text())
    edit(header)
    meta_file.write_text(json.dumps(header))


def test_one_corrupt_leaf_among_good_ones_is_named(ckpt, tmp_path):
    """Every leaf's fingerprint is checked: one wrong in the middle is caught."""
    import shutil

    path = tmp_path / ckpt.name
    shutil.copytree(ckpt, path)

    def flip(header):
        header["fingerprints"][2] = "%08x" % (int(header["fingerprints"][2], 16) ^ 1)

    _edit_header(path, flip)
    with pytest.raises(CheckpointError, match=re.escape("corrupt checkpoint: leaf ['leaf_2']")):
        load_checkpoint(path, _state())


def test_one_leaf_of_another_shape_among_matching_ones_is_named(ckpt):
    like = _state()
    like["leaf_2"] = jnp.zeros(7)
    with pytest.raises(CheckpointError, match=re.escape("leaf ['leaf_2']")) as info:
        load_checkpoint(ckpt, like)
    assert "leaf_1" not in str(info.value) and "leaf_3" not in str(info.value)


@pytest.mark.parametrize(
    "expect, named",
    [
        ({"cfg": {"betas": [0.9, 0.99]}}, "cfg.betas"),  # one list element of two
        ({"cfg": {"betas": [0.8, 0.95]}}, "cfg.betas"),
        ({"cfg": {"betas": [0.9, 0.95], "n": 5}}, "cfg.n"),  # one key of two
        ({"cfg": {"betas": [0.9, True]}}, "cfg.betas"),  # True is not 0.95, nor 1
    ],
)
def test_meta_with_one_element_differing_is_refused(ckpt, expect, named):
    with pytest.raises(CheckpointMismatchError, match=re.escape(named)):
        load_checkpoint(ckpt, _state(), expect_meta=expect)


def test_meta_diffs_mixed():
    stored = {"a": [1, 2, 3], "b": {"c": 1, "d": [True, 1.0]}}
    assert meta_diffs({"a": [1, 2, 3], "b": {"c": 1, "d": [True, 1.0]}}, stored) == []
    assert len(meta_diffs({"a": [1, 9, 3]}, stored)) == 1
    assert len(meta_diffs({"b": {"c": 1, "d": [True, 2.0]}}, stored)) == 1
    assert len(meta_diffs({"b": {"c": 1, "d": [1, 1.0]}}, stored)) == 1  # 1 is not True
    assert len(meta_diffs({"b": {"c": 2, "d": [True, 1.0]}}, stored)) == 1
    # a dict inside a list: one value of two differs
    in_list = {"l": [{"x": 1, "y": 2}]}
    assert meta_diffs({"l": [{"x": 1, "y": 2}]}, in_list) == []
    assert len(meta_diffs({"l": [{"x": 1, "y": 3}]}, in_list)) == 1
    assert len(meta_diffs({"l": [{"x": 0, "y": 2}]}, in_list)) == 1


# --------------------------------------------------------------------------
# other checks over several values
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtypes, ok",
    [
        (("bfloat16", "bfloat16", "bfloat16"), True),
        (("bfloat16", "float32", "bfloat16"), False),  # one of three
        (("float16", "bfloat16", "float32"), False),
        (("float32", "float32", "float32"), False),
    ],
)
def test_cudnn_dtype_check_with_one_dtype_of_three_wrong(dtypes, ok):
    from qkclip_eqx._config import check_cudnn_dtypes

    if ok:
        check_cudnn_dtypes("cudnn", *dtypes)
    else:
        with pytest.raises(ValueError, match="float32"):
            check_cudnn_dtypes("cudnn", *dtypes)
    check_cudnn_dtypes("xla", *dtypes)  # only cuDNN cares


def test_muon_routing_with_one_axis_of_two_outside_the_leaf():
    from optax.contrib import MuonDimensionNumbers

    params = {"w": jnp.zeros((4, 6))}
    opt = qc.muon_adamw(
        1e-3,
        weight_dimension_numbers=lambda p: {
            "w": MuonDimensionNumbers(reduction_axis=0, output_axis=5)
        },
    )
    with pytest.raises(ValueError, match="does not fit"):
        opt.init(params)
    opt = qc.muon_adamw(
        1e-3,
        weight_dimension_numbers=lambda p: {
            "w": MuonDimensionNumbers(reduction_axis=7, output_axis=1)
        },
    )
    with pytest.raises(ValueError, match="does not fit"):
        opt.init(params)
    opt = qc.muon_adamw(
        1e-3,
        weight_dimension_numbers=lambda p: {
            "w": MuonDimensionNumbers(reduction_axis=0, output_axis=1)
        },
    )
    opt.init(params)


def test_union_field_value_fitting_one_arm_only():
    """`int | None`: None and an int fit, a string fits neither arm."""
    fields = {
        name
        for name, hint in __import__("typing").get_type_hints(qc.RunConfig).items()
        if hint == (int | None)
    }
    assert fields, "RunConfig has optional int fields"
    for name in sorted(fields):
        qc.RunConfig.from_dict({name: None})
        with pytest.raises(ValueError, match=name):
            qc.RunConfig.from_dict({name: "4"})
        with pytest.raises(ValueError, match=name):
            qc.RunConfig.from_dict({name: True})


def test_eqx_filter_sees_only_inexact_leaves():
    """The int leaf of `_params` is no parameter: the NaN check ignores it."""
    assert len(jax.tree.leaves(eqx.filter(_params(), eqx.is_inexact_array))) == 5


def test_clip_factors_per_head_with_heads_in_mixed_states():
    """One vector holding a head over tau, one under, one at tau, NaN and
    infinities: each head gets its own gamma (non-finite S is never clipped)."""
    tau = 4.0
    s = jnp.array([8.0, 2.0, NAN, 4.0, float("inf"), -float("inf"), 16.0])
    assert qc.clip_factors(s, tau).tolist() == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.25]


@pytest.mark.parametrize(
    "field, value",
    [("step", True), ("step", "1"), ("fingerprints", {}), ("leaves", None), ("meta", [])],
)
def test_one_malformed_header_field_among_good_ones_is_named(ckpt, tmp_path, field, value):
    """The header's fields are each checked, a JSON `true` is no step."""
    import shutil

    path = tmp_path / ckpt.name
    shutil.copytree(ckpt, path)
    _edit_header(path, lambda header: header.__setitem__(field, value))
    with pytest.raises(CheckpointError, match=f"field '{field}'"):
        load_checkpoint(path, _state())
