"""Load Hugging Face DeepSeek-V3-architecture weights (DeepSeek-V3, Kimi K2):
one `DeepseekV3Attention` into [`qkclip_eqx.MLAttention`][], or a whole
all-dense `DeepseekV3ForCausalLM` into [`qkclip_eqx.Transformer`][].

HF stores `nn.Linear` weights as `(out, in)`, as this project does, with the
per-head rows head-major; the loader only reshapes. With `rope_interleave`
(the default of these checkpoints) the RoPE dimensions are stored as pairs
`(x_2i, x_2i+1)`: [`qkclip_eqx.MLAConfig`][] `rope_layout="interleaved"`.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ._attention import MLAttention
from ._config import MLAConfig, TransformerConfig, YaRN
from ._model import Transformer

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
    original = _typed(rope, "original_max_position_embeddings", int)
    factor = _typed(rope, "factor", float, None)
    if factor is None:  # transformers: max_position_embeddings (default 4096) / original
        factor = _typed(hf_config, "max_position_embeddings", int, 4096) / original
    return YaRN(
        factor=factor,
        original_max_position_embeddings=original,
        beta_fast=float(_typed(rope, "beta_fast", float, None) or 32),
        beta_slow=float(_typed(rope, "beta_slow", float, None) or 1),
        mscale=_typed(rope, "mscale", float, None),
        mscale_all_dim=_typed(rope, "mscale_all_dim", float, None),
        truncate=_typed(rope, "truncate", bool, True),
    )


_REQUIRED = object()


def _typed(
    config: Mapping[str, Any],
    key: str,
    kind: type,
    default: Any = _REQUIRED,
    *,
    nullable: bool | None = None,
) -> Any:
    """`config[key]`, or `default` when absent (transformers' default; a
    `KeyError` when required), refused unless of JSON type `kind`, or null
    where `nullable` (default: where the default is None): JSON's `true` is no
    number (Python's `bool` is an `int`), `"64"` no int, and an int is a
    float. A float is returned as float."""
    if key not in config:
        if default is _REQUIRED:
            raise KeyError(key)
        return default
    value: Any = config[key]
    nullable = default is None if nullable is None else nullable
    if value is None and nullable:
        return None
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and isinstance(value, (int, float)):
            value = float(value)
    if not ok:
        raise ValueError(
            f"config key {key!r} must be a JSON {'number' if kind is float else kind.__name__}"
            f"{' or null' if nullable else ''}, got {value!r}"
        )
    return value


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
    unknown keys or without `original_max_position_embeddings`, a value of the
    wrong JSON type (naming the key: `true` is no size), or an invalid config;
    `KeyError` when a required key (e.g. `hidden_size`) is missing. An
    optional key that is absent takes transformers' default (`q_lora_rank`
    1536, `rope_interleave` true, `rope_theta` 10000).
    """
    rope = hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise ValueError(f"rope type {rope_type!r} is not supported (only 'default' and 'yarn')")
    yarn = _yarn_from_hf(rope, hf_config) if rope_type == "yarn" else None
    theta = _typed(hf_config, "rope_theta", float, _typed(rope, "rope_theta", float, 10_000.0))
    fields = dict(
        dim=_typed(hf_config, "hidden_size", int),
        n_heads=_typed(hf_config, "num_attention_heads", int),
        # DeepseekV3Config's default rank; a null in config.json: no query LoRA
        q_lora_rank=_typed(hf_config, "q_lora_rank", int, 1536, nullable=True),
        kv_lora_rank=_typed(hf_config, "kv_lora_rank", int),
        qk_nope_head_dim=_typed(hf_config, "qk_nope_head_dim", int),
        qk_rope_head_dim=_typed(hf_config, "qk_rope_head_dim", int),
        v_head_dim=_typed(hf_config, "v_head_dim", int),
        rope_theta=theta,
        rope_layout="interleaved"
        if _typed(hf_config, "rope_interleave", bool, True, nullable=True)
        else "half",
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


# --------------------------------------------------------------------------
# Whole DeepSeek-V3-architecture models
# --------------------------------------------------------------------------


def _dense_layers_only(hf_config: Mapping[str, Any]) -> None:
    """Refuse a config with mixture-of-experts layers, naming them."""
    n = _typed(hf_config, "num_hidden_layers", int)
    # DeepseekV3Config's defaults
    experts = _typed(hf_config, "n_routed_experts", int, 256, nullable=True)
    first_dense = _typed(hf_config, "first_k_dense_replace", int, 3, nullable=True)
    first_dense = n if first_dense is None else first_dense
    if experts and first_dense < n:
        raise ValueError(
            f"layers {first_dense}..{n - 1} of this config are mixture-of-experts layers "
            f"(n_routed_experts={experts}: DeepSeek-V3 replaces the dense MLP by routed "
            f"experts in every layer from first_k_dense_replace={first_dense} on), and "
            "qkclip_eqx.Transformer has dense SwiGLU MLPs only: they cannot be loaded. An "
            f"all-dense config sets first_k_dense_replace={n} (num_hidden_layers)"
        )
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported: the MLP is SwiGLU (silu)")
    if hf_config.get("attention_bias") or hf_config.get("mlp_bias"):
        raise ValueError("attention_bias and mlp_bias are not supported: the model has no biases")


def transformer_config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> TransformerConfig:
    """A [`qkclip_eqx.TransformerConfig`][] from a `DeepseekV3Config` (as a dict)
    whose layers are all dense.

    The attention is [`qkclip_eqx.hf.mla_config_from_hf`][]'s (YaRN included);
    `intermediate_size` is the SwiGLU MLP's hidden size and `rms_norm_eps` the
    block and final norms' eps.

    **Arguments:**

    - `hf_config`: the `DeepseekV3Config` as a dict (config.json).
    - `**overrides`: fields of [`qkclip_eqx.TransformerConfig`][] that replace
      those read from `hf_config` (e.g. `compute_dtype`).

    **Returns:**

    The [`qkclip_eqx.TransformerConfig`][].

    **Raises:**

    `ValueError` when a layer is a mixture-of-experts layer (the message names
    the layers), the activation is not silu, the config asks for biases, or as
    [`qkclip_eqx.hf.mla_config_from_hf`][]; `KeyError` for a missing key.
    """
    _dense_layers_only(hf_config)
    fields: dict[str, Any] = dict(
        vocab_size=_typed(hf_config, "vocab_size", int),
        n_layers=_typed(hf_config, "num_hidden_layers", int),
        mlp_hidden=_typed(hf_config, "intermediate_size", int),
        attention=mla_config_from_hf(hf_config),
        norm_eps=_typed(hf_config, "rms_norm_eps", float, 1e-6),
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a `.safetensors` file, or of every `*.safetensors` file
    in a directory (a sharded checkpoint), as NumPy arrays by name.

    Needs the `safetensors` package (`pip install "qkclip_eqx[hf]"`); NumPy has
    no bfloat16 or float8, so a checkpoint stored in those must be converted to
    float32 first.

    **Arguments:**

    - `path`: a file, or a directory holding the shards.

    **Returns:**

    A dict of name to array.

    **Raises:**

    `FileNotFoundError` when there is no such file or no shard in the
    directory; `ValueError` when two shards hold the same name; `ImportError`
    without `safetensors`.
    """
    try:
        from safetensors.numpy import load_file
    except ImportError as e:  # pragma: no cover - the test environment has it
        raise ImportError(
            'loading .safetensors needs the safetensors package: pip install "qkclip_eqx[hf]"'
        ) from e
    path = pathlib.Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not files[0].exists():
        raise FileNotFoundError(f"no .safetensors file at {path}")
    out: dict[str, np.ndarray] = {}
    for f in files:
        for name, array in load_file(f).items():
            if name in out:
                raise ValueError(f"{name!r} is in more than one shard ({f.name} among them)")
            out[name] = array
    return out


def transformer_expected_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """The state-dict names (without the `model.` prefix) and shapes a
    `DeepseekV3ForCausalLM` of this config holds, as
    [`qkclip_eqx.hf.transformer_from_hf`][] expects them."""
    c, d = config.attention, config.dim
    if not isinstance(c, MLAConfig):
        raise ValueError("DeepSeek-V3 models have MLA attention")
    shapes = {"embed_tokens.weight": (config.vocab_size, d), "norm.weight": (d,)}
    for i in range(config.n_layers):
        p = f"layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes[p + "mlp.gate_proj.weight"] = (config.mlp_hidden, d)
        shapes[p + "mlp.up_proj.weight"] = (config.mlp_hidden, d)
        shapes[p + "mlp.down_proj.weight"] = (d, config.mlp_hidden)
        shapes.update({p + "self_attn." + k: s for k, s in _expected_shapes(c).items()})
    shapes["lm_head.weight"] = (config.vocab_size, d)
    return shapes


def transformer_from_hf(
    state_dict: Mapping[str, Any] | str | os.PathLike,
    hf_config: Mapping[str, Any],
    **overrides: Any,
) -> Transformer:
    """Build a [`qkclip_eqx.Transformer`][] holding a whole all-dense
    `DeepseekV3ForCausalLM`: the embedding, every layer's norms, attention
    (YaRN included) and dense MLP, the final norm and the LM head.

    The names are those of transformers' `DeepseekV3ForCausalLM` state dict,
    with or without the `model.` prefix (listed in the documentation's Hugging
    Face page, and by [`qkclip_eqx.hf.transformer_expected_shapes`][]). A
    checkpoint without `lm_head.weight` and with `tie_word_embeddings` gets the
    embedding as its head (the model stores its own copy: training unties them).
    Buffers (`rotary_emb.inv_freq`) are ignored.

    **Arguments:**

    - `state_dict`: name to array (NumPy, or anything `np.asarray` takes), or
      the path of a `.safetensors` file or a directory of shards (see
      [`qkclip_eqx.hf.load_safetensors`][]).
    - `hf_config`: the `DeepseekV3Config` as a dict (config.json).
    - `**overrides`: as for [`qkclip_eqx.hf.transformer_config_from_hf`][].

    **Returns:**

    The [`qkclip_eqx.Transformer`][], its weights in `param_dtype`.

    **Raises:**

    `ValueError` for mixture-of-experts layers (naming them), missing,
    unexpected or mis-shaped entries (naming them), a name given both with
    and without the `model.` prefix, or as
    [`qkclip_eqx.hf.transformer_config_from_hf`][].
    """
    config = transformer_config_from_hf(hf_config, **overrides)
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = load_safetensors(state_dict)
    params: dict[str, Any] = {}
    for key, value in state_dict.items():
        if not (key.endswith(".weight") or key.endswith(".bias")):
            continue  # buffers
        name = key.removeprefix("model.")
        if name in params:
            raise ValueError(f"{name!r} is given both with and without the 'model.' prefix")
        params[name] = value
    expected = transformer_expected_shapes(config)
    tied = _typed(hf_config, "tie_word_embeddings", bool, False)
    if "lm_head.weight" not in params and tied:
        params["lm_head.weight"] = params.get("embed_tokens.weight")
    missing = sorted(set(expected) - set(params))
    unexpected = sorted(set(params) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match the config ({config.n_layers} dense layers): missing "
            f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected "
            f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    dtype = jnp.dtype(config.param_dtype)
    w = {}
    for name, shape in expected.items():
        array = np.asarray(params[name])
        if array.shape != shape:
            raise ValueError(f"{name} has shape {array.shape}, expected {shape} for this config")
        w[name] = array

    def stacked(suffix: str) -> Array:
        return jnp.asarray(
            np.stack([w[f"layers.{i}.{suffix}"] for i in range(config.n_layers)]), dtype
        )

    attentions = []
    for i in range(config.n_layers):
        p = f"layers.{i}.self_attn."
        layer = {k.removeprefix(p): v for k, v in w.items() if k.startswith(p)}
        attentions.append(mla_from_hf(layer, config.attention, dtype=dtype))  # pyright: ignore[reportArgumentType]  # MLA: checked by transformer_expected_shapes
    attn = jax.tree.map(lambda *xs: jnp.stack(xs), *attentions)
    # The structure only, as in mla_from_hf: every array is replaced below.
    model = eqx.filter_eval_shape(Transformer, config, key=jax.random.key(0))
    attn_leaves = jax.tree.leaves(attn)
    model_attn_leaves = jax.tree.leaves(model.blocks.attn)
    assert [a.shape for a in attn_leaves] == [a.shape for a in model_attn_leaves]
    model = eqx.tree_at(
        lambda m: (
            m.embed,
            m.final_norm.weight,
            m.lm_head,
            m.blocks.attn_norm.weight,
            m.blocks.mlp_norm.weight,
            m.blocks.mlp.w_gate,
            m.blocks.mlp.w_up,
            m.blocks.mlp.w_down,
            *jax.tree.leaves(m.blocks.attn),
        ),
        model,
        (
            jnp.asarray(w["embed_tokens.weight"], dtype),
            jnp.asarray(w["norm.weight"], dtype),
            jnp.asarray(w["lm_head.weight"], dtype),
            stacked("input_layernorm.weight"),
            stacked("post_attention_layernorm.weight"),
            stacked("mlp.gate_proj.weight"),
            stacked("mlp.up_proj.weight"),
            stacked("mlp.down_proj.weight"),
            *attn_leaves,
        ),
    )
    left = [leaf for leaf in jax.tree.leaves(model) if isinstance(leaf, jax.ShapeDtypeStruct)]
    if left:  # a new Transformer leaf this loader does not know about
        raise RuntimeError(f"transformer_from_hf left {len(left)} weights unloaded: {left}")
    return model
