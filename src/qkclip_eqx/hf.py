"""Load Hugging Face `DeepseekV3Attention` weights (DeepSeek-V3, Kimi K2) into
[`qkclip_eqx.MLAttention`][].

HF stores `nn.Linear` weights as `(out, in)`, as this project does, with the
per-head rows head-major; the loader only reshapes. With `rope_interleave`
(the default of these checkpoints) the RoPE dimensions are stored as pairs
`(x_2i, x_2i+1)`: [`qkclip_eqx.MLAConfig`][] `rope_layout="interleaved"`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._attention import MLAttention
from ._config import MLAConfig, YaRN

_YARN_KEYS = frozenset(
    {
        "type",
        "rope_type",
        "rope_theta",
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    }
)


def _yarn_from_hf(rope: Mapping[str, Any], hf_config: Mapping[str, Any]) -> YaRN:
    """A [`qkclip_eqx.YaRN`][] from a `rope_scaling` block, with transformers' defaults
    (`beta_fast` 32, `beta_slow` 1, `truncate` True; `factor` from
    `max_position_embeddings / original_max_position_embeddings` if absent)."""
    unknown = sorted(k for k, v in rope.items() if k not in _YARN_KEYS and v is not None)
    if unknown:
        raise ValueError(f"yarn rope_scaling keys {unknown} are not supported")
    if "original_max_position_embeddings" not in rope:
        raise ValueError("yarn rope_scaling needs original_max_position_embeddings")
    original = rope["original_max_position_embeddings"]
    factor = rope.get("factor")
    if factor is None:
        factor = hf_config["max_position_embeddings"] / original
    return YaRN(
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(rope.get("beta_fast") or 32),
        beta_slow=float(rope.get("beta_slow") or 1),
        mscale=None if rope.get("mscale") is None else float(rope["mscale"]),
        mscale_all_dim=None
        if rope.get("mscale_all_dim") is None
        else float(rope["mscale_all_dim"]),
        truncate=bool(rope.get("truncate", True)),
    )


def mla_config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> MLAConfig:
    """An [`qkclip_eqx.MLAConfig`][] from a `DeepseekV3Config` (as a dict, e.g. config.json).

    The default RoPE and YaRN (`rope_scaling` or `rope_parameters` of type
    `yarn`, as in the published DeepSeek-V3 and Kimi K2 configs) are supported:
    YaRN becomes [`qkclip_eqx.YaRN`][], which sets the interpolated
    frequencies, the cos/sin factor and the softmax scale as transformers'
    `DeepseekV3Attention` does. Other RoPE types are refused.

    **Arguments:**

    - `hf_config`: the `DeepseekV3Config` as a dict.
    - `**overrides`: fields of [`qkclip_eqx.MLAConfig`][] that replace those
      read from `hf_config` (e.g. `kernel`).

    **Returns:**

    The [`qkclip_eqx.MLAConfig`][], with `rope_layout="interleaved"` unless
    `rope_interleave` is false.

    **Raises:**

    `ValueError` for a RoPE type other than default and YaRN, a YaRN block with
    unknown keys or without `original_max_position_embeddings`, or an invalid
    config; `KeyError` when a required key (e.g. `hidden_size`) is missing.
    """
    rope = hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise ValueError(f"rope type {rope_type!r} is not supported (only 'default' and 'yarn')")
    yarn = _yarn_from_hf(rope, hf_config) if rope_type == "yarn" else None
    theta = hf_config.get("rope_theta", rope.get("rope_theta", 10_000.0))
    fields = dict(
        dim=hf_config["hidden_size"],
        n_heads=hf_config["num_attention_heads"],
        q_lora_rank=hf_config.get("q_lora_rank"),
        kv_lora_rank=hf_config["kv_lora_rank"],
        qk_nope_head_dim=hf_config["qk_nope_head_dim"],
        qk_rope_head_dim=hf_config["qk_rope_head_dim"],
        v_head_dim=hf_config["v_head_dim"],
        rope_theta=float(theta),
        rope_layout="interleaved" if hf_config.get("rope_interleave", True) else "half",
        norm_eps=1e-6,  # HF builds q_a_layernorm / kv_a_layernorm with the default eps
        yarn=yarn,
    )
    fields.update(overrides)
    return MLAConfig(**fields)


def _expected_shapes(c: MLAConfig) -> dict[str, tuple[int, ...]]:
    shapes = {
        "kv_a_proj_with_mqa.weight": (c.kv_lora_rank + c.qk_rope_head_dim, c.dim),
        "kv_a_layernorm.weight": (c.kv_lora_rank,),
        "kv_b_proj.weight": (c.n_heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
        "o_proj.weight": (c.dim, c.n_heads * c.v_head_dim),
    }
    if c.q_lora_rank is None:
        shapes["q_proj.weight"] = (c.n_heads * c.qk_head_dim, c.dim)
    else:
        shapes["q_a_proj.weight"] = (c.q_lora_rank, c.dim)
        shapes["q_a_layernorm.weight"] = (c.q_lora_rank,)
        shapes["q_b_proj.weight"] = (c.n_heads * c.qk_head_dim, c.q_lora_rank)
    return shapes


def mla_from_hf(
    state_dict: Mapping[str, Any], config: MLAConfig, *, dtype: Any = jnp.float32
) -> MLAttention:
    """Build an [`qkclip_eqx.MLAttention`][] holding the weights of a `DeepseekV3Attention`.

    **Arguments:**

    - `state_dict`: maps that module's parameter names (`q_a_proj.weight`,
      ...; a layer prefix such as `model.layers.0.self_attn.` must be
      stripped) to arrays. Buffers such as `rotary_emb.inv_freq` are ignored.
    - `config`: e.g. from [`qkclip_eqx.hf.mla_config_from_hf`][].
    - `dtype`: the dtype the weights are stored in.

    **Returns:**

    The [`qkclip_eqx.MLAttention`][].

    **Raises:**

    `ValueError` for missing, unexpected or mis-shaped `*.weight`/`*.bias`
    entries, or a `config` whose `rope_layout` is not `"interleaved"`.
    """
    if config.rope_layout != "interleaved":
        raise ValueError("DeepSeek-V3 checkpoints need rope_layout='interleaved'")
    expected = _expected_shapes(config)
    params = {k: v for k, v in state_dict.items() if k.endswith(".weight") or k.endswith(".bias")}
    missing = sorted(set(expected) - set(params))
    unexpected = sorted(set(params) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match the config: missing {missing}, unexpected {unexpected}"
        )
    w = {}
    for name, shape in expected.items():
        array = np.asarray(params[name])
        if array.shape != shape:
            raise ValueError(f"{name} has shape {array.shape}, expected {shape} for this config")
        w[name] = jnp.asarray(array, dtype)
    c = config
    # The module's structure only: every array is replaced below, so running the
    # random initialiser (compiling and allocating a second copy) would be waste.
    module = eqx.filter_eval_shape(MLAttention, c, dtype=dtype, key=jax.random.key(0))
    h = c.n_heads
    if c.q_lora_rank is None:
        wq = w["q_proj.weight"].reshape(h, c.qk_head_dim, c.dim)
    else:
        wq = w["q_b_proj.weight"].reshape(h, c.qk_head_dim, c.q_lora_rank)
        module = eqx.tree_at(
            lambda m: (m.wq_a, m.q_norm.weight),
            module,
            (w["q_a_proj.weight"], w["q_a_layernorm.weight"]),
        )
    module = eqx.tree_at(
        lambda m: (m.wq, m.wkv_a, m.kv_norm.weight, m.wkv_b, m.wo),
        module,
        (
            wq,
            w["kv_a_proj_with_mqa.weight"],
            w["kv_a_layernorm.weight"],
            w["kv_b_proj.weight"].reshape(h, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank),
            w["o_proj.weight"],
        ),
    )
    left = [leaf for leaf in jax.tree.leaves(module) if isinstance(leaf, jax.ShapeDtypeStruct)]
    if left:  # a new MLAttention leaf this loader does not know about
        raise RuntimeError(f"mla_from_hf left {len(left)} MLAttention weights unloaded: {left}")
    return module
