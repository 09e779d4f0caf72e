"""Every bad configuration fails at construction with a ValueError naming the field."""

from __future__ import annotations

import dataclasses
import re

import pytest

from qkclip_eqx import GQAConfig, MLAConfig, TransformerConfig

MLA = dict(dim=32, n_heads=4, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
GQA = dict(dim=32, n_heads=4, head_dim=8, n_kv_heads=2)


def transformer(**overrides):
    fields = dict(vocab_size=64, n_layers=2, mlp_hidden=32, attention=GQAConfig(**GQA))
    fields.update(overrides)
    return TransformerConfig(**fields)


def test_good_configs_construct():
    mla = MLAConfig(**MLA, q_lora_rank=16)
    assert mla.qk_head_dim == 12 and mla.kernel == "dense" and mla.rope_layout == "interleaved"
    assert MLAConfig(**MLA).q_lora_rank is None
    gqa = GQAConfig(dim=32, n_heads=4, head_dim=8)
    assert gqa.n_kv_heads == 4  # MHA by default
    assert GQAConfig(**{**GQA, "n_kv_heads": 1}).n_kv_heads == 1  # MQA
    t = transformer(attention=mla, compute_dtype="bfloat16")
    assert t.dim == 32 and t.n_heads == 4
    assert (t.param_dtype, t.compute_dtype) == ("float32", "bfloat16")


BAD_SIZES = [0, -1, 2.0, True, None, "8"]


@pytest.mark.parametrize(
    "field",
    [
        "dim",
        "n_heads",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
        "q_lora_rank",
        "block_size",
    ],
)
@pytest.mark.parametrize("value", BAD_SIZES)
def test_mla_sizes_must_be_positive_ints(field, value):
    if field == "q_lora_rank" and value is None:
        assert MLAConfig(**MLA, q_lora_rank=None).q_lora_rank is None  # None: no q LoRA
        return
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        MLAConfig(**{**MLA, field: value})


@pytest.mark.parametrize("field", ["dim", "n_heads", "head_dim", "n_kv_heads", "block_size"])
@pytest.mark.parametrize("value", BAD_SIZES)
def test_gqa_sizes_must_be_positive_ints(field, value):
    if field == "n_kv_heads" and value is None:
        assert GQAConfig(**{**GQA, field: None}).n_kv_heads == GQA["n_heads"]  # None: MHA
        return
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        GQAConfig(**{**GQA, field: value})


@pytest.mark.parametrize("field", ["vocab_size", "n_layers", "mlp_hidden"])
@pytest.mark.parametrize("value", BAD_SIZES)
def test_transformer_sizes_must_be_positive_ints(field, value):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        transformer(**{field: value})


def test_rope_dims_must_be_even():
    with pytest.raises(ValueError, match=r"qk_rope_head_dim"):
        MLAConfig(**{**MLA, "qk_rope_head_dim": 5})
    with pytest.raises(ValueError, match=r"head_dim"):
        GQAConfig(**{**GQA, "head_dim": 7})
    # The no-RoPE part of an MLA head may be odd.
    assert MLAConfig(**{**MLA, "qk_nope_head_dim": 7}).qk_head_dim == 11


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 3), (4, 8), (6, 4)])
def test_n_kv_heads_must_divide_n_heads(n_heads, n_kv_heads):
    with pytest.raises(ValueError, match=r"n_kv_heads"):
        GQAConfig(**{**GQA, "n_heads": n_heads, "n_kv_heads": n_kv_heads})


@pytest.mark.parametrize("cls,base", [(MLAConfig, MLA), (GQAConfig, GQA)])
@pytest.mark.parametrize(
    "field,value",
    [
        ("kernel", "flash"),
        ("kernel", "Dense"),
        ("kernel", None),
        ("rope_layout", "neox"),
        ("rope_layout", ""),
    ],
)
def test_bad_choices(cls, base, field, value):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        cls(**{**base, field: value})


@pytest.mark.parametrize("value", ["both", "max", None])
def test_bad_clip_mode(value):
    with pytest.raises(ValueError, match=r"clip_mode"):
        GQAConfig(**GQA, clip_mode=value)


@pytest.mark.parametrize("field", ["param_dtype", "compute_dtype"])
@pytest.mark.parametrize("value", ["float16", "bf16", "float64", None])
def test_bad_dtype(field, value):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        transformer(**{field: value})


def test_old_dtype_field_is_gone():
    """``dtype="bfloat16"`` used to mean bf16 parameters and optimizer state;
    it is not silently accepted with another meaning."""
    with pytest.raises(TypeError, match="dtype"):
        transformer(dtype="bfloat16")


@pytest.mark.parametrize(
    "cls,base,field",
    [(MLAConfig, MLA, "rope_theta"), (GQAConfig, GQA, "rope_theta"), (MLAConfig, MLA, "norm_eps")],
)
@pytest.mark.parametrize("value", [0, -1.0, 0.0, float("nan"), "1e4", None])
def test_rope_theta_and_norm_eps_must_be_positive_numbers(cls, base, field, value):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        cls(**{**base, field: value})


def test_gqa_has_no_norm_eps():
    """GQA attention has no norm of its own (the block's norms use TransformerConfig.norm_eps)."""
    with pytest.raises(TypeError, match="norm_eps"):
        GQAConfig(**{**GQA, "norm_eps": 1e-5})


@pytest.mark.parametrize("value", [0, -1e-6, "1e-6", None])
def test_transformer_norm_eps(value):
    with pytest.raises(ValueError, match=r"norm_eps"):
        transformer(norm_eps=value)


@pytest.mark.parametrize("cls,base", [(MLAConfig, MLA), (GQAConfig, GQA)])
@pytest.mark.parametrize("value", ["false", 0, None])
def test_causal_must_be_a_bool(cls, base, value):
    # "false" is truthy: accepting it would silently build a causal model.
    with pytest.raises(ValueError, match=r"causal"):
        cls(**base, causal=value)


@pytest.mark.parametrize("attention", [None, dict(GQA), "gqa", 3, object()])
def test_attention_config_of_wrong_type(attention):
    with pytest.raises(ValueError, match=r"attention"):
        transformer(attention=attention)


def test_configs_are_frozen_and_hashable():
    c = GQAConfig(**GQA)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.dim = 64  # type: ignore[misc]
    # Hashable and equal by value: they are static fields of the modules, so jit
    # caches rely on this.
    assert hash(c) == hash(GQAConfig(**GQA)) and c == GQAConfig(**GQA)
    assert c != dataclasses.replace(c, kernel="blockwise")


def test_error_names_the_class_and_value():
    with pytest.raises(ValueError) as info:
        MLAConfig(**{**MLA, "v_head_dim": -3})
    assert re.search(r"MLAConfig\.v_head_dim", str(info.value)) and "-3" in str(info.value)
