"""Frozen, validated configuration dataclasses.

Every config is checked in `__post_init__` so that a bad one fails at
construction, before anything is traced or compiled, with an error that names
the offending field.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, get_args, no_type_check

from ._options import MUST_MATCH_RULE, doc

# Resume rules shared by several fields (docs/checkpoints.md).
_AS_MESH = "as mesh"
_FUNCTION = (
    "the same weights compute another function from the resume step on "
    "(they were trained with the old value)"
)

# Every set of allowed values is one Literal, declared here; the tuples the
# checks (and the CLI's choices) use are derived from it.
Kernel = Literal["dense", "blockwise", "dot_product_attention"]
MaxLogit = Literal["exact", "lse_bound"]
Implementation = Literal["xla", "cudnn"]  # of kernel="dot_product_attention"
RopeLayout = Literal["interleaved", "half"]
GQAClipMode = Literal["query", "query_key", "group"]
Dtype = Literal["float32", "bfloat16"]
KERNELS: tuple[str, ...] = get_args(Kernel)
MAX_LOGITS: tuple[str, ...] = get_args(MaxLogit)
IMPLEMENTATIONS: tuple[str, ...] = get_args(Implementation)
ROPE_LAYOUTS: tuple[str, ...] = get_args(RopeLayout)
GQA_CLIP_MODES: tuple[str, ...] = get_args(GQAClipMode)
DTYPES: tuple[str, ...] = get_args(Dtype)


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive int, got {value!r}")


def _choice(obj: object, name: str, options: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in options:
        raise ValueError(f"{type(obj).__name__}.{name} must be one of {options}, got {value!r}")


def _positive_number(obj: object, name: str) -> None:
    value = getattr(obj, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value > 0):
        raise ValueError(
            f"{type(obj).__name__}.{name} must be a positive finite number, got {value!r}"
        )


def _bool(obj: object, name: str) -> None:
    value = getattr(obj, name)
    if not isinstance(value, bool):
        raise ValueError(f"{type(obj).__name__}.{name} must be a bool, got {value!r}")


def _even(obj: object, name: str) -> None:
    value = getattr(obj, name)
    if value % 2:
        raise ValueError(f"{type(obj).__name__}.{name} must be even for RoPE, got {value}")


def check_kernel_options(
    kernel: object, max_logit: object, implementation: object, *, owner: str = ""
) -> None:
    """THE check of the attention kernel options, shared by the configs (at
    construction) and [`qkclip_eqx.attend`][] (for direct callers): each is
    one of its allowed values, and `max_logit="lse_bound"` and an
    `implementation` only go with `kernel="dot_product_attention"`. `owner`
    (e.g. `"MLAConfig."`) prefixes the field names in the messages."""
    for name, value, options in (("kernel", kernel, KERNELS), ("max_logit", max_logit, MAX_LOGITS)):
        if value not in options:
            raise ValueError(f"{owner}{name} must be one of {options}, got {value!r}")
    if max_logit == "lse_bound" and kernel != "dot_product_attention":
        raise ValueError(
            f"{owner}max_logit='lse_bound' needs kernel='dot_product_attention' "
            f"(kernel {kernel!r} computes the exact S at no extra cost)"
        )
    if implementation is None:
        return
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{owner}implementation must be None or one of {IMPLEMENTATIONS}, "
            f"got {implementation!r}"
        )
    if kernel != "dot_product_attention":
        raise ValueError(
            f"{owner}implementation={implementation!r} needs kernel='dot_product_attention' "
            f"(kernel {kernel!r} is plain JAX)"
        )


CUDNN_DTYPES: tuple[str, ...] = ("bfloat16", "float16")


def check_cudnn_dtypes(implementation: object, *dtypes: Any, owner: str = "") -> None:
    """THE check of cuDNN's input dtypes: with `implementation="cudnn"`, every
    one of `dtypes` (of q, k and v, or the compute dtype) is bfloat16 or
    float16."""
    names = [str(d) for d in dtypes]
    if implementation == "cudnn" and not all(n in CUDNN_DTYPES for n in names):
        raise ValueError(
            f"{owner}implementation='cudnn' needs bfloat16 or float16 q, k and v (cuDNN's "
            f"fused attention takes no float32), got {', '.join(names)}; use "
            "compute_dtype='bfloat16'"
        )


def _check_common(obj: Any) -> None:
    check_kernel_options(
        obj.kernel, obj.max_logit, obj.implementation, owner=f"{type(obj).__name__}."
    )
    _choice(obj, "rope_layout", ROPE_LAYOUTS)
    _positive(obj, "block_size")
    _positive_number(obj, "rope_theta")
    _bool(obj, "causal")


# The options MLAConfig and GQAConfig share, declared once (a dataclass field
# object belongs to one class, so each is made by a function).


def _rope_theta() -> Any:
    return dataclasses.field(
        default=10_000.0, metadata=doc("RoPE base frequency theta", resume=_FUNCTION)
    )


def _kernel() -> Any:
    return dataclasses.field(
        default="dense",
        metadata=doc(
            "attention kernel: dense, blockwise (FlashAttention-style), or "
            "dot_product_attention (jax.nn)",
            resume=_AS_MESH,
        ),
    )


def _block_size() -> Any:
    return dataclasses.field(
        default=128, metadata=doc("blockwise kernel: query/key block length", resume=_AS_MESH)
    )


def _max_logit() -> Any:
    return dataclasses.field(
        default="exact",
        metadata=doc(
            "dot_product_attention kernel: S exact, or its log-sum-exp upper bound",
            resume="from the resume step on, QK-Clip acts on (and the metrics report) the new "
            "choice: S, or its log-sum-exp upper bound",
        ),
    )


def _implementation() -> Any:
    return dataclasses.field(
        default=None,
        metadata=doc(
            "dot_product_attention kernel: xla or cudnn (none: JAX chooses)",
            resume=_AS_MESH,
            run_name="attention_implementation",
        ),
    )


@no_type_check
@dataclasses.dataclass(frozen=True)
class YaRN:
    """YaRN RoPE scaling (Peng et al. 2023, arXiv 2309.00071) as DeepSeek-V3 and
    Kimi K2 define it (their `rope_scaling` block of `type: yarn`), following
    Hugging Face's `DeepseekV3` code.

    RoPE pair `i` of `d` has the base inverse frequency
    `f_i = theta^(-2i/d)`. With `low`, `high` the pair indices at which the
    original context `L = original_max_position_embeddings` turns `beta_fast`
    and `beta_slow` times, `idx(b) = d ln(L / (2 pi b)) / (2 ln theta)`
    (floored / ceiled when `truncate`, clipped to `[0, d - 1]`), and the ramp
    `r_i = clip((i - low) / (high - low), 0, 1)`, the frequency is

        f'_i = (1 - r_i) f_i + r_i f_i / factor

    (high-frequency pairs kept, low-frequency pairs interpolated by `factor`).
    With `m(s, a) = 0.1 a ln s + 1` (1 for `s <= 1`):

    - the softmax scale `1/sqrt(d_qk)` is multiplied by
      `m(factor, mscale_all_dim)^2` when `mscale_all_dim` is set (non-zero);
    - cos and sin are multiplied by `m(factor, mscale) / m(factor, mscale_all_dim)`
      when both are set, else by `m(factor, 1)`.

    The published DeepSeek-V3 and K2 blocks set `mscale = mscale_all_dim = 1`:
    cos and sin are unchanged and every logit is multiplied by
    `(0.1 ln factor + 1)^2`. Both are applied whatever the sequence length,
    as in transformers; DeepSeek-V3's own inference code applies them only
    when its configured `max_seq_len` exceeds the original context.
    """

    factor: float = dataclasses.field(
        metadata=doc("context extension factor (new context / original)")
    )
    original_max_position_embeddings: int = dataclasses.field(
        metadata=doc("the context the model was trained at")
    )
    beta_fast: float = dataclasses.field(
        default=32.0, metadata=doc("RoPE turns at the ramp's start")
    )
    beta_slow: float = dataclasses.field(default=1.0, metadata=doc("RoPE turns at the ramp's end"))
    mscale: float | None = dataclasses.field(default=None, metadata=doc("cos/sin magnitude scale"))
    mscale_all_dim: float | None = dataclasses.field(
        default=None, metadata=doc("softmax scale's magnitude scale (none: 1)")
    )
    truncate: bool = dataclasses.field(
        default=True, metadata=doc("floor/ceil the ramp's pair indices")
    )

    def __post_init__(self) -> None:
        _positive_number(self, "factor")
        _positive(self, "original_max_position_embeddings")
        _positive_number(self, "beta_fast")
        _positive_number(self, "beta_slow")
        for name in ("mscale", "mscale_all_dim"):
            value = getattr(self, name)
            ok = (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
            )
            if value is not None and not (ok and value >= 0):
                raise ValueError(f"YaRN.{name} must be None or a finite number >= 0, got {value!r}")
        _bool(self, "truncate")

    def _m(self, a: float) -> float:
        return 1.0 if self.factor <= 1 else 0.1 * a * math.log(self.factor) + 1.0

    @property
    def softmax_factor(self) -> float:
        """What the softmax scale is multiplied by: `m(factor, mscale_all_dim)^2`."""
        return self._m(self.mscale_all_dim) ** 2 if self.mscale_all_dim else 1.0

    @property
    def rope_factor(self) -> float:
        """What cos and sin are multiplied by (the YaRN "attention factor")."""
        if self.mscale and self.mscale_all_dim:
            return self._m(self.mscale) / self._m(self.mscale_all_dim)
        return self._m(1.0)


# The configs validate themselves in __post_init__ and raise ValueError naming the
# field. `no_type_check` keeps jaxtyping's import hook (enabled in the tests)
# from replacing that with a generic type-check error on the generated __init__.


@no_type_check
@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3, Kimi K2).

    `q_lora_rank=None` gives a direct query projection W_q; otherwise queries
    go through a rank-`q_lora_rank` down-projection, an RMSNorm and a per-head
    up-projection. Keys and values share a `kv_lora_rank` latent, plus one
    RoPE key of `qk_rope_head_dim` shared by all heads (k_R). `yarn`: YaRN
    RoPE scaling (frequencies and softmax scale), None for plain RoPE.

    `kernel`, `max_logit` and `implementation` choose the attention kernel,
    what it reports as S, and (for `kernel="dot_product_attention"` only)
    the backend of `jax.nn.dot_product_attention`; see
    [`qkclip_eqx.attend`][]. `max_logit="lse_bound"` (only with
    `kernel="dot_product_attention"`) reports an upper bound of S, not S, and
    the train step names its metrics accordingly.
    """

    dim: int = dataclasses.field(metadata=doc("model width", resume=MUST_MATCH_RULE, run=128))
    n_heads: int = dataclasses.field(
        metadata=doc("attention (query) heads per layer", resume=MUST_MATCH_RULE, run=4)
    )
    kv_lora_rank: int = dataclasses.field(
        metadata=doc("rank of the compressed key/value latent", resume=MUST_MATCH_RULE, run=64)
    )
    qk_nope_head_dim: int = dataclasses.field(
        metadata=doc(
            "per-head query/key width without rotary embedding", resume=MUST_MATCH_RULE, run=32
        )
    )
    qk_rope_head_dim: int = dataclasses.field(
        metadata=doc(
            "per-head query/key width with rotary embedding (shared key)",
            resume=MUST_MATCH_RULE,
            run=16,
        )
    )
    v_head_dim: int = dataclasses.field(
        metadata=doc("per-head value width", resume=MUST_MATCH_RULE, run=32)
    )
    q_lora_rank: int | None = dataclasses.field(
        default=None,
        metadata=doc(
            "rank of the query's low-rank projection (none: a full projection)",
            resume=MUST_MATCH_RULE,
        ),
    )
    rope_theta: float = _rope_theta()
    rope_layout: RopeLayout = dataclasses.field(
        default="interleaved",
        metadata=doc(
            "RoPE pairs: interleaved (DeepSeek/K2 checkpoints) or half (Llama)",
            resume=_FUNCTION,
        ),
    )
    norm_eps: float = dataclasses.field(
        default=1e-6,
        metadata=doc(
            "epsilon of the latent RMSNorms (q and kv)",
            resume=_FUNCTION,
            run_name="latent_norm_eps",
        ),
    )
    causal: bool = dataclasses.field(
        default=True,
        metadata=doc("causal mask", run=None),  # a language-model run is causal
    )
    kernel: Kernel = _kernel()
    block_size: int = _block_size()
    yarn: YaRN | None = dataclasses.field(
        default=None,
        metadata=doc(
            "YaRN RoPE scaling (none: plain RoPE)",
            resume="RoPE frequencies and the softmax scale change from the resume step on "
            "(a context extension)",
        ),
    )
    max_logit: MaxLogit = _max_logit()
    implementation: Implementation | None = _implementation()

    def __post_init__(self) -> None:
        _positive(
            self,
            "dim",
            "n_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
        )
        if self.q_lora_rank is not None:
            _positive(self, "q_lora_rank")
        _even(self, "qk_rope_head_dim")
        _positive_number(self, "norm_eps")
        _check_common(self)
        if self.yarn is not None and not isinstance(self.yarn, YaRN):
            raise ValueError(f"MLAConfig.yarn must be a YaRN or None, got {self.yarn!r}")

    @property
    def qk_head_dim(self) -> int:
        """The query/key head dimension, `qk_nope_head_dim + qk_rope_head_dim`."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@no_type_check
@dataclasses.dataclass(frozen=True)
class GQAConfig:
    """Grouped-query attention: MHA when `n_kv_heads == n_heads`, MQA when 1.

    `clip_mode` chooses how QK-Clip treats a key head shared by several query
    heads (`"query"`, `"query_key"` or `"group"`); see
    [`qkclip_eqx.GQAttention.scale_heads`][]. `kernel`, `max_logit` and
    `implementation` as in [`qkclip_eqx.MLAConfig`][].
    """

    dim: int = dataclasses.field(metadata=doc("model width", resume=MUST_MATCH_RULE, run=128))
    n_heads: int = dataclasses.field(
        metadata=doc("attention (query) heads per layer", resume=MUST_MATCH_RULE, run=4)
    )
    head_dim: int = dataclasses.field(
        metadata=doc("per-head width", resume=MUST_MATCH_RULE, run=32)
    )
    n_kv_heads: int | None = dataclasses.field(
        default=None,
        metadata=doc("key/value heads (none: n-heads, i.e. MHA; 1: MQA)", resume=MUST_MATCH_RULE),
    )
    rope_theta: float = _rope_theta()
    rope_layout: RopeLayout = dataclasses.field(
        default="half",
        metadata=doc(
            "RoPE pairs: interleaved (DeepSeek/K2 checkpoints) or half (Llama)",
            resume=_FUNCTION,
        ),
    )
    causal: bool = dataclasses.field(default=True, metadata=doc("causal mask", run=None))
    kernel: Kernel = _kernel()
    block_size: int = _block_size()
    max_logit: MaxLogit = _max_logit()
    implementation: Implementation | None = _implementation()
    clip_mode: GQAClipMode = dataclasses.field(
        default="query",
        metadata=doc(
            "QK-Clip of a shared key head: query, query_key or group (see GQAttention.scale_heads)",
            resume="as tau",
        ),
    )

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        _positive(self, "dim", "n_heads", "head_dim", "n_kv_heads")
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"GQAConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}"
            )
        _even(self, "head_dim")
        _choice(self, "clip_mode", GQA_CLIP_MODES)
        _check_common(self)

    @property
    def kv_heads(self) -> int:
        """`n_kv_heads` as an `int`: the field is never None once constructed
        (None becomes `n_heads`), which this tells the type checker."""
        n = self.n_kv_heads
        return self.n_heads if n is None else n

    @property
    def group(self) -> int:
        """The query heads per key head, `n_heads // n_kv_heads`."""
        return self.n_heads // self.kv_heads


AttentionConfig = MLAConfig | GQAConfig


def _non_negative_number(obj: object, name: str) -> None:
    value = getattr(obj, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value >= 0):
        raise ValueError(f"{type(obj).__name__}.{name} must be a finite number >= 0, got {value!r}")


@no_type_check
@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """DeepSeek-V3 mixture-of-experts feed-forward layers (DeepSeek-V3 report,
    arXiv 2412.19437, sec. 2.1.2; Kimi K2 and Moonlight use the same layer).
    The field names are those of transformers' `DeepseekV3Config`.

    Every layer from `first_k_dense_replace` on replaces the dense SwiGLU MLP by
    `n_shared_experts` shared experts (one SwiGLU of hidden size
    `n_shared_experts * moe_intermediate_size`) plus `n_routed_experts` routed
    SwiGLU experts of hidden size `moe_intermediate_size`, of which each token
    uses `num_experts_per_tok`. The router's scores are sigmoids; a per-expert
    correction bias enters the selection only; the selection is limited to the
    best `topk_group` of `n_group` expert groups; the weights are the unbiased
    scores of the chosen experts, normalised to sum 1 when `norm_topk_prob`,
    times `routed_scaling_factor` (see [`qkclip_eqx.MoE`][]).

    Training (see [`qkclip_eqx.update_expert_bias`][]):

    - `bias_update_rate`: the auxiliary-loss-free balancing's speed gamma: after
      each step every expert's bias moves by `gamma * sign(mean load - load)`
      (0.001 in DeepSeek-V3's pre-training; 0 freezes the bias).
    - `seq_balance_weight`: alpha of the complementary sequence-wise balance
      loss added to the training loss (0.0001 in DeepSeek-V3; 0, the default,
      leaves it out).
    """

    n_routed_experts: int = dataclasses.field(metadata=doc("routed experts per MoE layer"))
    num_experts_per_tok: int = dataclasses.field(metadata=doc("routed experts each token uses"))
    moe_intermediate_size: int = dataclasses.field(
        metadata=doc("hidden width of each expert's SwiGLU")
    )
    n_shared_experts: int = dataclasses.field(
        default=1, metadata=doc("shared experts (one SwiGLU of n times the expert width)")
    )
    n_group: int = dataclasses.field(default=1, metadata=doc("expert groups of the router"))
    topk_group: int = dataclasses.field(
        default=1, metadata=doc("groups a token's experts may come from")
    )
    norm_topk_prob: bool = dataclasses.field(
        default=True, metadata=doc("normalise the chosen experts' weights to sum 1")
    )
    routed_scaling_factor: float = dataclasses.field(
        default=1.0, metadata=doc("factor on the routed experts' weights")
    )
    first_k_dense_replace: int = dataclasses.field(
        default=1, metadata=doc("the first layers keep the dense MLP")
    )
    bias_update_rate: float = dataclasses.field(
        default=1e-3,
        metadata=doc("auxiliary-loss-free balancing: the bias step per training step"),
    )
    seq_balance_weight: float = dataclasses.field(
        default=0.0, metadata=doc("weight of the sequence-wise balance loss (0: none)")
    )

    def __post_init__(self) -> None:
        _positive(
            self,
            "n_routed_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "n_group",
            "topk_group",
            "first_k_dense_replace",
        )
        n_shared = self.n_shared_experts
        if not isinstance(n_shared, int) or isinstance(n_shared, bool) or n_shared < 0:
            raise ValueError(f"MoEConfig.n_shared_experts must be an int >= 0, got {n_shared!r}")
        _bool(self, "norm_topk_prob")
        _positive_number(self, "routed_scaling_factor")
        _non_negative_number(self, "bias_update_rate")
        _non_negative_number(self, "seq_balance_weight")
        e, g = self.n_routed_experts, self.n_group
        if e % g:
            raise ValueError(f"MoEConfig.n_group={g} must divide n_routed_experts={e}")
        if g > 1 and e // g < 2:
            raise ValueError(
                f"MoEConfig: n_group={g} groups of {e // g} expert: a group's score is the sum "
                "of its best two experts' scores, so each group needs at least 2"
            )
        if self.topk_group > g:
            raise ValueError(f"MoEConfig.topk_group={self.topk_group} exceeds n_group={g}")
        eligible = self.topk_group * (e // g)
        if self.num_experts_per_tok > eligible:
            raise ValueError(
                f"MoEConfig.num_experts_per_tok={self.num_experts_per_tok} exceeds the "
                f"{eligible} experts of the topk_group={self.topk_group} groups a token may use"
            )


@no_type_check
@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """A decoder-only language model: embedding, `n_layers` pre-norm blocks
    (RMSNorm, attention, RMSNorm, SwiGLU MLP), final RMSNorm, untied LM head.

    `moe`: with a [`qkclip_eqx.MoEConfig`][], layers
    `moe.first_k_dense_replace ..` have DeepSeek-V3 mixture-of-experts
    feed-forward layers instead of the dense MLP (of hidden size `mlp_hidden`,
    which the first layers keep).

    Precision (mixed-precision training with float32 master weights,
    Micikevicius et al. 2018, arXiv 1710.03740):

    - `param_dtype`: the dtype the parameters are stored in, and so the
      optimizer state and the weights QK-Clip scales. Keep `"float32"`.
      `"bfloat16"` is pure bf16 storage and is NOT mixed precision: `p + u`
      is rounded to 8 bits of mantissa, so an update below half an ulp of `p`
      (decoupled weight decay `lr * wd` below ~2e-3, small AdamW/Muon steps
      late in a decay) is lost. It is kept for experiments on that loss only.
    - `compute_dtype`: each module casts its weights and its input to this
      dtype at the start of `__call__`; matmuls run in it. Attention logits,
      softmax, S, the output projection (and its psum across devices), the LM
      logits and the loss accumulate in float32 whatever it is.
    """

    vocab_size: int = dataclasses.field(metadata=doc("vocabulary size", run=None))  # from the data
    n_layers: int = dataclasses.field(
        metadata=doc("Transformer blocks", resume=MUST_MATCH_RULE, run=4)
    )
    mlp_hidden: int = dataclasses.field(
        metadata=doc("hidden width of each block's MLP", resume=MUST_MATCH_RULE, run=384)
    )
    attention: AttentionConfig = dataclasses.field(
        metadata=doc("the attention", run=None)
    )  # RunConfig.attention
    norm_eps: float = dataclasses.field(
        default=1e-6, metadata=doc("epsilon of the blocks' RMSNorms", resume=_FUNCTION)
    )
    param_dtype: Dtype = dataclasses.field(
        default="float32",
        metadata=doc(
            "dtype of the stored parameters and optimizer state (keep float32)",
            resume=MUST_MATCH_RULE,
        ),
    )
    compute_dtype: Dtype = dataclasses.field(
        default="float32",
        metadata=doc("dtype of the matmuls (bfloat16 on an accelerator)", resume=_AS_MESH),
    )
    moe: MoEConfig | None = dataclasses.field(
        default=None,
        metadata=doc(
            "DeepSeek-V3 mixture-of-experts layers (none: every layer dense)",
            resume=MUST_MATCH_RULE,
        ),
    )

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "n_layers", "mlp_hidden")
        if self.moe is not None:
            if not isinstance(self.moe, MoEConfig):
                raise ValueError(
                    f"TransformerConfig.moe must be a MoEConfig or None, got {self.moe!r}"
                )
            if self.moe.first_k_dense_replace >= self.n_layers:
                raise ValueError(
                    f"TransformerConfig: moe.first_k_dense_replace="
                    f"{self.moe.first_k_dense_replace} leaves none of the n_layers="
                    f"{self.n_layers} layers a mixture-of-experts layer; use moe=None for an "
                    "all-dense model"
                )
        if not isinstance(self.attention, (MLAConfig, GQAConfig)):
            raise ValueError(
                "TransformerConfig.attention must be an MLAConfig or GQAConfig, "
                f"got {type(self.attention).__name__}"
            )
        _choice(self, "param_dtype", DTYPES)
        _choice(self, "compute_dtype", DTYPES)
        _positive_number(self, "norm_eps")
        check_cudnn_dtypes(
            self.attention.implementation, self.compute_dtype, owner="TransformerConfig: attention "
        )

    @property
    def n_dense_layers(self) -> int:
        """The layers with a dense MLP: all of them, or the first
        `moe.first_k_dense_replace`."""
        return self.n_layers if self.moe is None else self.moe.first_k_dense_replace

    @property
    def dim(self) -> int:
        """The model dimension, the attention config's `dim`."""
        return self.attention.dim

    @property
    def n_heads(self) -> int:
        """The number of query heads per layer, the attention config's `n_heads`."""
        return self.attention.n_heads


@dataclasses.dataclass(frozen=True)
class ParallelAxes:
    """Mesh axis names a model uses inside `jax.shard_map`; outside it, pass nothing.

    - `data`: the batch is sharded over this axis; a loss sums over it.
    - `model`: heads are sharded over this axis (tensor parallelism); the output
      projection's partial sums are `psum`-ed over it.
    - `seq`: the sequence is sharded over this axis (context parallelism); keys
      and values (for MLA the latent c_KV and the shared k_R) are all-gathered
      over it, and a loss sums over it.
    - `fsdp`: the batch is sharded over this axis too (a loss sums over it), and
      so is every parameter (ZeRO-3 / FSDP): a model that gathers its own
      parameters all-gathers each one over this axis where it is used (see
      [`qkclip_eqx.Transformer`][]); any other model is given them gathered.
    """

    data: str | None = None
    model: str | None = None
    seq: str | None = None
    fsdp: str | None = None

    def batch_axes(self) -> tuple[str, ...]:
        """The axes the batch and the sequence are split over (`data`, `fsdp`,
        `seq`, those that are set): a loss sums over them and S is their `pmax`."""
        return tuple(a for a in (self.data, self.fsdp, self.seq) if a is not None)
