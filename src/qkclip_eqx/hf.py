"""Load Hugging Face DeepSeek-V3-architecture weights (DeepSeek-V3, Kimi K2,
Moonlight): one `DeepseekV3Attention` into [`qkclip_eqx.MLAttention`][], or a
whole `DeepseekV3ForCausalLM`, its mixture-of-experts layers included, into
[`qkclip_eqx.Transformer`][].

HF stores `nn.Linear` weights as `(out, in)`, as this project does, with the
per-head rows head-major; the loader only reshapes. With `rope_interleave`
(the default of these checkpoints) the RoPE dimensions are stored as pairs
`(x_2i, x_2i+1)`: [`qkclip_eqx.MLAConfig`][] `rope_layout="interleaved"`.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Iterator, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ._attention import MLAttention
from ._config import MLAConfig, MoEConfig, TransformerConfig, YaRN
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


def _has_moe_layers(hf_config: Mapping[str, Any]) -> bool:
    n = _typed(hf_config, "num_hidden_layers", int)
    # DeepseekV3Config's defaults
    experts = _typed(hf_config, "n_routed_experts", int, 256, nullable=True)
    first_dense = _typed(hf_config, "first_k_dense_replace", int, 3, nullable=True)
    first_dense = n if first_dense is None else first_dense
    return bool(experts) and first_dense < n


def moe_config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> MoEConfig:
    """A [`qkclip_eqx.MoEConfig`][] from a `DeepseekV3Config` (as a dict) with
    mixture-of-experts layers, with `DeepseekV3Config`'s defaults for absent
    keys (as transformers reads config.json).

    Only DeepSeek-V3's router is supported: sigmoid scores with the correction
    bias (`scoring_func` "sigmoid", `topk_method` "noaux_tc" where the config
    names them, as DeepSeek-V3, Kimi K2 and Moonlight do) and every layer from
    `first_k_dense_replace` on a MoE layer (`moe_layer_freq` 1).

    **Arguments:**

    - `hf_config`: the `DeepseekV3Config` as a dict (config.json).
    - `**overrides`: fields of [`qkclip_eqx.MoEConfig`][] to set (the training
      options `bias_update_rate`, `seq_balance_weight`).

    **Raises:**

    `ValueError` for another router (DeepSeek-V2's softmax scores,
    `topk_method` "greedy" or "group_limited_greedy"), `moe_layer_freq` other
    than 1, `first_k_dense_replace` 0, or an invalid config.
    """
    scoring = hf_config.get("scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise ValueError(
            f"scoring_func {scoring!r} is not supported: the router is DeepSeek-V3's (sigmoid "
            "scores with a correction bias); DeepSeek-V2's softmax router is not implemented"
        )
    method = hf_config.get("topk_method", "noaux_tc")
    if method != "noaux_tc":
        raise ValueError(
            f"topk_method {method!r} is not supported: only DeepSeek-V3's 'noaux_tc' "
            "(group-limited top-k of the bias-corrected sigmoid scores)"
        )
    freq = hf_config.get("moe_layer_freq", 1)
    if freq != 1:
        raise ValueError(
            f"moe_layer_freq={freq} is not supported: every layer after the "
            "first_k_dense_replace dense ones must be a MoE layer (1)"
        )
    first = _typed(hf_config, "first_k_dense_replace", int, 3)
    if first == 0:
        raise ValueError(
            "first_k_dense_replace=0 (no dense first layer) is not supported: "
            "qkclip_eqx.MoEConfig needs at least one"
        )
    # DeepseekV3Config's defaults for absent keys; a null group count is 1
    fields: dict[str, Any] = dict(
        n_routed_experts=_typed(hf_config, "n_routed_experts", int, 256),
        num_experts_per_tok=_typed(hf_config, "num_experts_per_tok", int, 8),
        moe_intermediate_size=_typed(hf_config, "moe_intermediate_size", int, 2048),
        n_shared_experts=_typed(hf_config, "n_shared_experts", int, 1, nullable=True) or 0,
        n_group=_typed(hf_config, "n_group", int, 8, nullable=True) or 1,
        topk_group=_typed(hf_config, "topk_group", int, 4, nullable=True) or 1,
        norm_topk_prob=_typed(hf_config, "norm_topk_prob", bool, True),
        routed_scaling_factor=_typed(hf_config, "routed_scaling_factor", float, 2.5),
        first_k_dense_replace=first,
    )
    fields.update(overrides)
    return MoEConfig(**fields)


def _check_supported(hf_config: Mapping[str, Any]) -> None:
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported: the MLP is SwiGLU (silu)")
    if hf_config.get("attention_bias") or hf_config.get("mlp_bias"):
        raise ValueError("attention_bias and mlp_bias are not supported: the model has no biases")
    if hf_config.get("quantization_config"):
        raise ValueError(
            "this config describes a quantized checkpoint (quantization_config: "
            f"{hf_config['quantization_config']!r}); the published DeepSeek-V3 and Kimi K2 "
            "weights are FP8 with block scales: dequantize them to bfloat16 or float32 first"
        )


def transformer_config_from_hf(
    hf_config: Mapping[str, Any], *, moe: Mapping[str, Any] | None = None, **overrides: Any
) -> TransformerConfig:
    """A [`qkclip_eqx.TransformerConfig`][] from a `DeepseekV3Config` (as a dict).

    The attention is [`qkclip_eqx.hf.mla_config_from_hf`][]'s (YaRN included);
    `intermediate_size` is the dense MLP's hidden size and `rms_norm_eps` the
    block and final norms' eps; mixture-of-experts layers (`n_routed_experts`
    and `first_k_dense_replace < num_hidden_layers`) give `moe`, from
    [`qkclip_eqx.hf.moe_config_from_hf`][].

    **Arguments:**

    - `hf_config`: the `DeepseekV3Config` as a dict (config.json).
    - `moe`: fields of [`qkclip_eqx.MoEConfig`][] to set (e.g.
      `{"bias_update_rate": 1e-4}`).
    - `**overrides`: fields of [`qkclip_eqx.TransformerConfig`][] that replace
      those read from `hf_config` (e.g. `compute_dtype`).

    **Returns:**

    The [`qkclip_eqx.TransformerConfig`][].

    **Raises:**

    `ValueError` when the activation is not silu, the config asks for biases or
    describes a quantized checkpoint, as
    [`qkclip_eqx.hf.moe_config_from_hf`][] for an unsupported router, or as
    [`qkclip_eqx.hf.mla_config_from_hf`][]; `KeyError` for a missing key.
    """
    _check_supported(hf_config)
    fields: dict[str, Any] = dict(
        vocab_size=_typed(hf_config, "vocab_size", int),
        n_layers=_typed(hf_config, "num_hidden_layers", int),
        mlp_hidden=_typed(hf_config, "intermediate_size", int),
        attention=mla_config_from_hf(hf_config),
        norm_eps=_typed(hf_config, "rms_norm_eps", float, 1e-6),
        moe=moe_config_from_hf(hf_config, **(moe or {})) if _has_moe_layers(hf_config) else None,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


_INDEX = "model.safetensors.index.json"


class _Shards(Mapping[str, np.ndarray]):
    """The tensors of a `.safetensors` file or a directory of shards, read
    one at a time on access (the index file's `weight_map` names each
    tensor's shard; without it, every shard's header is read)."""

    def __init__(self, path: pathlib.Path):
        from safetensors import safe_open

        self._open = safe_open
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        if not files or not files[0].exists():
            raise FileNotFoundError(f"no .safetensors file at {path}")
        index = path / _INDEX if path.is_dir() else None
        self._where: dict[str, pathlib.Path] = {}
        if index is not None and index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._where = {k: path / v for k, v in weight_map.items()}
            absent = sorted({str(f) for f in self._where.values() if not f.exists()})
            if absent:
                raise FileNotFoundError(f"{index} names shards that are not there: {absent}")
            return
        for f in files:
            with safe_open(f, framework="numpy") as handle:
                for name in handle.keys():
                    if name in self._where:
                        raise ValueError(
                            f"{name!r} is in more than one shard ({f.name} among them)"
                        )
                    self._where[name] = f

    def __getitem__(self, name: str) -> np.ndarray:
        with self._open(self._where[name], framework="numpy") as handle:
            return handle.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a `.safetensors` file, or of every `*.safetensors` file
    in a directory (a sharded checkpoint), as NumPy arrays by name.

    Needs the `safetensors` package (`pip install "qkclip_eqx[hf]"`).
    [`qkclip_eqx.hf.transformer_from_hf`][] given a path does not call this:
    it reads the tensors one at a time.

    **Arguments:**

    - `path`: a file, or a directory holding the shards.

    **Returns:**

    A dict of name to array.

    **Raises:**

    `FileNotFoundError` when there is no such file or no shard in the
    directory; `ValueError` when two shards hold the same name; `ImportError`
    without `safetensors`.
    """
    return dict(_shards(path).items())


def _shards(path: str | os.PathLike) -> _Shards:
    try:
        import safetensors  # noqa: F401
    except ImportError as e:  # pragma: no cover - the test environment has it
        raise ImportError(
            'loading .safetensors needs the safetensors package: pip install "qkclip_eqx[hf]"'
        ) from e
    return _Shards(pathlib.Path(path))


def _mlp_shapes(prefix: str, hidden: int, d: int) -> dict[str, tuple[int, ...]]:
    return {
        prefix + "gate_proj.weight": (hidden, d),
        prefix + "up_proj.weight": (hidden, d),
        prefix + "down_proj.weight": (d, hidden),
    }


def transformer_expected_shapes(
    config: TransformerConfig, *, fused_experts: bool = False
) -> dict[str, tuple[int, ...]]:
    """The state-dict names (without the `model.` prefix) and shapes a
    `DeepseekV3ForCausalLM` of this config holds, as
    [`qkclip_eqx.hf.transformer_from_hf`][] expects them.

    A mixture-of-experts layer holds `mlp.gate.weight` (the router),
    `mlp.gate.e_score_correction_bias`, `mlp.shared_experts.*` and, in the
    checkpoints' layout, `mlp.experts.{j}.{gate,up,down}_proj.weight` per
    expert; with `fused_experts`, the layout of transformers' own state dict
    (5.x): `mlp.experts.gate_up_proj` `[experts, 2 * hidden, dim]` and
    `mlp.experts.down_proj` `[experts, dim, hidden]`.
    """
    c, d = config.attention, config.dim
    if not isinstance(c, MLAConfig):
        raise ValueError("DeepSeek-V3 models have MLA attention")
    shapes = {"embed_tokens.weight": (config.vocab_size, d), "norm.weight": (d,)}
    moe = config.moe
    for i in range(config.n_layers):
        p = f"layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        if moe is None or i < moe.first_k_dense_replace:
            shapes.update(_mlp_shapes(p + "mlp.", config.mlp_hidden, d))
        else:
            e, h = moe.n_routed_experts, moe.moe_intermediate_size
            shapes[p + "mlp.gate.weight"] = (e, d)
            shapes[p + "mlp.gate.e_score_correction_bias"] = (e,)
            if fused_experts:
                shapes[p + "mlp.experts.gate_up_proj"] = (e, 2 * h, d)
                shapes[p + "mlp.experts.down_proj"] = (e, d, h)
            else:
                for j in range(e):
                    shapes.update(_mlp_shapes(f"{p}mlp.experts.{j}.", h, d))
            if moe.n_shared_experts:
                shapes.update(_mlp_shapes(p + "mlp.shared_experts.", moe.n_shared_experts * h, d))
        shapes.update({p + "self_attn." + k: s for k, s in _expected_shapes(c).items()})
    shapes["lm_head.weight"] = (config.vocab_size, d)
    return shapes


def _is_parameter(name: str) -> bool:
    """A state-dict entry the loader reads (not a buffer such as
    `rotary_emb.inv_freq`)."""
    return name.endswith((".weight", ".bias", ".e_score_correction_bias")) or bool(
        re.search(r"\.experts\.(gate_up_proj|down_proj)$", name)
    )


def transformer_from_hf(
    state_dict: Mapping[str, Any] | str | os.PathLike,
    hf_config: Mapping[str, Any],
    *,
    moe: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> Transformer:
    """Build a [`qkclip_eqx.Transformer`][] holding a whole
    `DeepseekV3ForCausalLM`: the embedding, every layer's norms, attention
    (YaRN included) and feed-forward layer (the dense MLP of the first
    `first_k_dense_replace` layers, the mixture-of-experts layers after them:
    router, correction bias, routed and shared experts), the final norm and
    the LM head.

    The names are those of transformers' `DeepseekV3ForCausalLM` state dict,
    with or without the `model.` prefix (listed in the documentation's Hugging
    Face page, and by [`qkclip_eqx.hf.transformer_expected_shapes`][]); the
    routed experts in the checkpoints' per-expert layout
    (`mlp.experts.{j}.gate_proj.weight`, ...) or in transformers' fused one
    (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`). A checkpoint
    without `lm_head.weight` and with `tie_word_embeddings` gets the embedding
    as its head (the model stores its own copy: training unties them).
    Buffers (`rotary_emb.inv_freq`) and the multi-token-prediction layers
    (`layers.{n}..`, `num_nextn_predict_layers` of them) are skipped.

    From a path, the tensors are read one at a time, each converted to
    `param_dtype` and placed, so the checkpoint is never held twice in host
    memory; bfloat16 checkpoints load (FP8 ones with block scales must be
    dequantized first).

    **Arguments:**

    - `state_dict`: name to array (NumPy, or anything `np.asarray` takes), or
      the path of a `.safetensors` file or a directory of shards (with
      `model.safetensors.index.json` or without).
    - `hf_config`: the `DeepseekV3Config` as a dict (config.json).
    - `moe`, `**overrides`: as for
      [`qkclip_eqx.hf.transformer_config_from_hf`][].

    **Returns:**

    The [`qkclip_eqx.Transformer`][], its weights in `param_dtype`.

    **Raises:**

    `ValueError` for missing, unexpected or mis-shaped entries (naming them),
    FP8 scale tensors (`*.weight_scale_inv`), a name given both with and
    without the `model.` prefix, or as
    [`qkclip_eqx.hf.transformer_config_from_hf`][].
    """
    config = transformer_config_from_hf(hf_config, moe=moe, **overrides)
    source: Mapping[str, Any] = (
        _shards(state_dict) if isinstance(state_dict, (str, os.PathLike)) else state_dict
    )
    n = config.n_layers
    mtp = range(n, n + (_typed(hf_config, "num_nextn_predict_layers", int, 1, nullable=True) or 0))
    keys: dict[str, str] = {}  # name without the prefix -> key in the source
    for key in source:
        name = key.removeprefix("model.")
        if name.endswith("weight_scale_inv"):
            raise ValueError(
                f"{key!r} is an FP8 block scale: this checkpoint is FP8-quantized; dequantize "
                "it to bfloat16 or float32 first"
            )
        layer = re.match(r"layers\.(\d+)\.", name)
        if not _is_parameter(name) or (layer and int(layer.group(1)) in mtp):
            continue  # buffers, multi-token-prediction layers
        if name in keys:
            raise ValueError(f"{name!r} is given both with and without the 'model.' prefix")
        keys[name] = key
    k = config.n_dense_layers
    fused = config.moe is not None and f"layers.{k}.mlp.experts.gate_up_proj" in keys
    expected = transformer_expected_shapes(config, fused_experts=fused)
    tied = _typed(hf_config, "tie_word_embeddings", bool, False)
    if "lm_head.weight" not in keys and tied:
        keys["lm_head.weight"] = keys.get("embed_tokens.weight", "embed_tokens.weight")
    missing = sorted(set(expected) - set(keys))
    unexpected = sorted(set(keys) - set(expected))
    if missing or unexpected:
        layers = f"{k} dense layers" + (
            f" and {n - k} mixture-of-experts layers" if config.moe is not None else ""
        )
        raise ValueError(
            f"state dict does not match the config ({layers}): missing "
            f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected "
            f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    dtype = jnp.dtype(config.param_dtype)

    def read(name: str) -> np.ndarray:
        array = np.asarray(source[keys[name]])
        if array.shape != expected[name]:
            raise ValueError(
                f"{name} has shape {array.shape}, expected {expected[name]} for this config"
            )
        return array.astype(np.float32) if array.dtype != np.float32 else array

    def stacked(suffix: str, layers: range) -> Array:
        return jnp.asarray(np.stack([read(f"layers.{i}.{suffix}") for i in layers]), dtype)

    def attention(layers: range) -> list[Array]:
        out = []
        for i in layers:
            p = f"layers.{i}.self_attn."
            layer = {name.removeprefix(p): read(name) for name in expected if name.startswith(p)}
            out.append(mla_from_hf(layer, config.attention, dtype=dtype))  # pyright: ignore[reportArgumentType]  # MLA: checked by transformer_expected_shapes
        return jax.tree.leaves(jax.tree.map(lambda *xs: jnp.stack(xs), *out))

    dense = range(k)
    # The structure only, as in mla_from_hf: every array is replaced below.
    model = eqx.filter_eval_shape(Transformer, config, key=jax.random.key(0))
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
            jnp.asarray(read("embed_tokens.weight"), dtype),
            jnp.asarray(read("norm.weight"), dtype),
            jnp.asarray(read("lm_head.weight"), dtype),
            stacked("input_layernorm.weight", dense),
            stacked("post_attention_layernorm.weight", dense),
            stacked("mlp.gate_proj.weight", dense),
            stacked("mlp.up_proj.weight", dense),
            stacked("mlp.down_proj.weight", dense),
            *attention(dense),
        ),
    )
    if config.moe is not None:
        model = _load_moe_layers(model, config, range(k, n), read, stacked, attention, fused)
    left = [leaf for leaf in jax.tree.leaves(model) if isinstance(leaf, jax.ShapeDtypeStruct)]
    if left:  # a new Transformer leaf this loader does not know about
        raise RuntimeError(f"transformer_from_hf left {len(left)} weights unloaded: {left}")
    return model


def _load_moe_layers(model, config, layers, read, stacked, attention, fused) -> Transformer:
    """Place the mixture-of-experts layers `layers` into `model.moe_blocks`."""
    moe, dtype = config.moe, jnp.dtype(config.param_dtype)
    e, h = moe.n_routed_experts, moe.moe_intermediate_size

    def experts(i: int, which: str) -> np.ndarray:
        p = f"layers.{i}.mlp.experts."
        if fused:  # gate_up_proj holds gate rows then up rows, per expert
            if which == "down_proj":
                return read(p + "down_proj")
            gate_up = read(p + "gate_up_proj")
            return gate_up[:, :h] if which == "gate_proj" else gate_up[:, h:]
        return np.stack([read(f"{p}{j}.{which}.weight") for j in range(e)])

    def routed(which: str) -> Array:
        return jnp.asarray(np.stack([experts(i, which) for i in layers]), dtype)

    where = [
        lambda m: m.moe_blocks.attn_norm.weight,
        lambda m: m.moe_blocks.mlp_norm.weight,
        lambda m: m.moe_blocks.mlp.router,
        lambda m: m.moe_blocks.mlp.expert_bias,
        lambda m: m.moe_blocks.mlp.experts.w_gate,
        lambda m: m.moe_blocks.mlp.experts.w_up,
        lambda m: m.moe_blocks.mlp.experts.w_down,
    ]
    values = [
        stacked("input_layernorm.weight", layers),
        stacked("post_attention_layernorm.weight", layers),
        stacked("mlp.gate.weight", layers),
        stacked("mlp.gate.e_score_correction_bias", layers),
        routed("gate_proj"),
        routed("up_proj"),
        routed("down_proj"),
    ]
    if moe.n_shared_experts:
        where += [
            lambda m: m.moe_blocks.mlp.shared.w_gate,
            lambda m: m.moe_blocks.mlp.shared.w_up,
            lambda m: m.moe_blocks.mlp.shared.w_down,
        ]
        values += [
            stacked("mlp.shared_experts.gate_proj.weight", layers),
            stacked("mlp.shared_experts.up_proj.weight", layers),
            stacked("mlp.shared_experts.down_proj.weight", layers),
        ]
    model = eqx.tree_at(lambda m: tuple(w(m) for w in where), model, tuple(values))
    return eqx.tree_at(
        lambda m: jax.tree.leaves(m.moe_blocks.attn), model, tuple(attention(layers))
    )
