"""Generate golden files for testing MLA against Hugging Face's DeepseekV3Attention.

How to run (from the repository root, in a virtual environment that has torch,
transformers and numpy installed -- NOT the project's own JAX environment):

    python scripts/make_hf_golden.py

    python scripts/make_hf_golden.py hf_dsv3_attn_yarn.npz   # only the files named

It writes one file per case, two per query path of Multi-head Latent
Attention with plain RoPE, and two with YaRN RoPE scaling:

    tests/data/hf_dsv3_attn_qlora.npz    (q_lora_rank=32: q_a_proj -> RMSNorm -> q_b_proj)
    tests/data/hf_dsv3_attn_noqlora.npz  (q_lora_rank=None: a single q_proj)
    tests/data/hf_dsv3_attn_yarn.npz     (q_lora_rank=32 and DeepSeek-V3's own
                                          rope_scaling block: yarn, factor 40,
                                          original_max_position_embeddings 4096,
                                          beta_fast 32, beta_slow 1, mscale 1,
                                          mscale_all_dim 1)
    tests/data/hf_dsv3_attn_yarn_mscale.npz  (q_lora_rank=None, yarn with factor 32
                                          and mscale 0.707 != mscale_all_dim 1, so
                                          that HF also scales cos and sin)
    tests/data/hf_k2_attn_yarn.npz       (q_lora_rank=32, Kimi K2-Instruct-0905's
                                          block: factor 64, beta_fast = beta_slow = 1,
                                          rope_theta 50000)

one whole all-dense model (`DeepseekV3ForCausalLM`):

    tests/data/hf_dsv3_model_yarn.npz    (2 dense layers, first_k_dense_replace=2,
                                          q_lora_rank=32, DeepSeek-V3's yarn block,
                                          vocab 97, intermediate_size 96,
                                          rms_norm_eps 1e-5 != the attention norms'
                                          1e-6, untied head)

and three whole models with DeepSeek-V3 mixture-of-experts layers (random
e_score_correction_bias ~ U(0, 0.3), stored in the published checkpoints'
per-expert layout `mlp.experts.{j}.{gate,up,down}_proj.weight`):

    tests/data/hf_k2_moe.npz             (Kimi K2's router: 8 experts, 2 per token,
                                          n_group 1, norm_topk_prob, scaling 2.827,
                                          1 shared expert, K2's yarn block)
    tests/data/hf_dsv3_moe_groups.npz    (DeepSeek-V3's router: 16 experts, 3 per
                                          token, n_group 4, topk_group 2, scaling 2.5,
                                          DeepSeek-V3's yarn block)
    tests/data/hf_moonlight_moe_unnormed.npz  (Moonlight's shape: no q LoRA, 2
                                          shared experts, rope_theta 50000, plain
                                          RoPE; n_group 2, topk_group 1,
                                          norm_topk_prob off)

The YaRN cases run at positions 5000..5000+seq-1, past the original context,
where the interpolated frequencies differ from plain RoPE's.

so the project's tests can compare against HF without needing torch in CI.

Each .npz holds:
  * every state-dict entry of the attention module under its exact state-dict
    name ("q_a_proj.weight", "kv_b_proj.weight", ...), float32, torch layout
    ([out_features, in_features] for linear weights);
  * "hidden_states"  [seq, hidden]   the input (batch dimension dropped);
  * "output"         [seq, hidden]   DeepseekV3Attention's output (eager, float32);
  * "max_logits"     [heads]         per head, max over causally allowed (j <= i)
                                     query/key pairs of the scaled pre-softmax
                                     logit q_i . k_j * scaling, captured from
                                     HF's own eager attention computation;
  * "position_ids"   [seq]           the positions the input sits at;
  * "config_json"    0-d str         the config used (plus "scaling", HF's rotary
                                     "rope_inv_freq" and "rope_attention_scaling"), as JSON;
  * "versions"       0-d str         torch / transformers / numpy versions, as JSON.

The plain-RoPE inputs use position ids 0..seq-1; every case a standard causal mask.

The whole-model file holds every state-dict entry of the model under its
transformers name (with the `model.` prefix), "input_ids" [seq], "position_ids"
[seq], "logits" [seq, vocab] (eager, float32), "max_logits" [layers, heads]
(captured as above, one softmax per layer), "config_json" (config.to_dict())
and "versions".
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import sys

import numpy as np
import torch
import transformers
from transformers import DeepseekV3Config
from transformers.masking_utils import create_causal_mask
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_dsv3

OUT_DIR = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data"

SEED = 0
SEQ_LEN = 12
LINEAR_STD = 0.2  # std of the normal init of every linear weight
NORM_STD = 0.1  # RMSNorm weights are 1 + NORM_STD * normal

# Shared by both configs; only q_lora_rank differs.
BASE_CONFIG = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    rope_theta=10000.0,
    rope_scaling=None,
    attention_bias=False,
    rope_interleave=True,  # DeepSeek checkpoint layout: rope dims in (even, odd) pairs
    rms_norm_eps=1e-6,
    attention_dropout=0.0,
    max_position_embeddings=128,
)

# DeepSeek-V3's published config.json block (Kimi K2's has factor 32).
DSV3_YARN = dict(
    type="yarn",
    factor=40.0,
    original_max_position_embeddings=4096,
    beta_fast=32,
    beta_slow=1,
    mscale=1.0,
    mscale_all_dim=1.0,
)
YARN_MSCALE = dict(
    type="yarn",
    factor=32.0,
    original_max_position_embeddings=4096,
    beta_fast=32,
    beta_slow=1,
    mscale=0.707,
    mscale_all_dim=1.0,
)
# Kimi K2-Instruct-0905's published block (with its rope_theta 50000).
K2_YARN = dict(
    type="yarn",
    factor=64.0,
    original_max_position_embeddings=4096,
    beta_fast=1.0,
    beta_slow=1.0,
    mscale=1.0,
    mscale_all_dim=1.0,
)
YARN_START = 5000  # first position of the YaRN inputs

# file -> (q_lora_rank, rope_scaling, first position, rope_theta)
CASES = {
    "hf_dsv3_attn_qlora.npz": (32, None, 0, 10000.0),
    "hf_dsv3_attn_noqlora.npz": (None, None, 0, 10000.0),
    "hf_dsv3_attn_yarn.npz": (32, DSV3_YARN, YARN_START, 10000.0),
    "hf_dsv3_attn_yarn_mscale.npz": (None, YARN_MSCALE, YARN_START, 10000.0),
    "hf_k2_attn_yarn.npz": (32, K2_YARN, YARN_START, 50000.0),
}


def make_config(
    q_lora_rank: int | None, rope_scaling: dict | None = None, rope_theta: float = 10000.0
) -> DeepseekV3Config:
    base = dict(BASE_CONFIG, rope_theta=rope_theta)
    if rope_scaling is not None:
        # the extended context, as the published configs set it (DeepSeek-V3: 40 * 4096 = 163840)
        extended = int(rope_scaling["factor"] * rope_scaling["original_max_position_embeddings"])
        base.update(rope_scaling=dict(rope_scaling), max_position_embeddings=extended)
    config = DeepseekV3Config(
        **base,
        q_lora_rank=q_lora_rank,
        attn_implementation="eager",
        dtype="float32",
    )
    # Recent transformers fold rope_theta/rope_scaling into `rope_parameters`.
    # Make sure we really got the RoPE asked for, with the requested theta.
    rope = getattr(config, "rope_parameters", None)
    if rope is not None:
        wanted = "default" if rope_scaling is None else "yarn"
        assert rope.get("rope_type", "default") == wanted, rope
        assert float(rope["rope_theta"]) == rope_theta, rope
    assert config.rope_interleave is True
    assert config._attn_implementation == "eager"
    return config


def init_weights(attn: torch.nn.Module, generator: torch.Generator) -> None:
    """Deterministically overwrite every parameter, in state-dict order."""
    with torch.no_grad():
        for name, param in attn.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if "layernorm" in name:
                param.copy_(1.0 + NORM_STD * noise)
            elif name.endswith(".weight"):
                param.copy_(LINEAR_STD * noise)
            else:  # biases (none with attention_bias=False, but keep it total)
                param.copy_(LINEAR_STD * noise)


@contextlib.contextmanager
def capture_pre_softmax_logits(store: list):
    """Record the input of the softmax inside HF's eager attention.

    With the eager implementation, DeepseekV3Attention calls the module-level
    `eager_attention_forward`, which computes

        attn_weights = matmul(query, key^T) * scaling + attention_mask
        softmax(attn_weights, dim=-1, dtype=float32)

    We wrap that function and, for the duration of its call only, wrap
    torch.nn.functional.softmax to stash its input: the scaled logits plus the
    additive mask. Where the mask allows attention it is exactly 0.0, so those
    entries are exactly HF's scaled logits.
    """
    original_eager = hf_dsv3.eager_attention_forward
    original_softmax = torch.nn.functional.softmax

    def recording_softmax(x, *args, **kwargs):
        store.append(x.detach().clone())
        return original_softmax(x, *args, **kwargs)

    def recording_eager(*args, **kwargs):
        torch.nn.functional.softmax = recording_softmax
        try:
            return original_eager(*args, **kwargs)
        finally:
            torch.nn.functional.softmax = original_softmax

    hf_dsv3.eager_attention_forward = recording_eager
    try:
        yield
    finally:
        hf_dsv3.eager_attention_forward = original_eager
        torch.nn.functional.softmax = original_softmax


def make_golden(
    q_lora_rank: int | None,
    out_path: pathlib.Path,
    rope_scaling: dict | None = None,
    start: int = 0,
    rope_theta: float = 10000.0,
) -> dict:
    config = make_config(q_lora_rank, rope_scaling, rope_theta)
    generator = torch.Generator().manual_seed(SEED)

    attn = hf_dsv3.DeepseekV3Attention(config, layer_idx=0).to(torch.float32).eval()
    init_weights(attn, generator)

    hidden_states = torch.randn(
        1, SEQ_LEN, config.hidden_size, generator=generator, dtype=torch.float32
    )
    position_ids = start + torch.arange(SEQ_LEN)[None, :]

    rotary = hf_dsv3.DeepseekV3RotaryEmbedding(config)
    position_embeddings = rotary(
        hidden_states, position_ids
    )  # (cos, sin), each [1, seq, qk_rope_head_dim]

    # The causal mask exactly as DeepseekV3Model builds it for eager attention:
    # float [batch, 1, q, kv], 0.0 where j <= i, finfo(float32).min where j > i.
    mask = create_causal_mask(
        config=config,
        inputs_embeds=hidden_states,
        attention_mask=None,
        cache=None,
        position_ids=position_ids,
    )
    allowed = torch.ones(SEQ_LEN, SEQ_LEN, dtype=torch.bool).tril()
    expected_mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]
    assert mask is not None and mask.dtype == torch.float32
    assert torch.equal(mask, expected_mask), "unexpected eager causal-mask format"

    captured: list[torch.Tensor] = []
    with torch.no_grad(), capture_pre_softmax_logits(captured):
        output, attn_probs = attn(
            hidden_states=hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=mask,
        )
    assert len(captured) == 1, (
        f"expected one softmax call inside eager attention, got {len(captured)}"
    )

    logits = captured[0]  # [1, heads, q, kv]: scaled logits + mask
    assert logits.shape == (1, config.num_attention_heads, SEQ_LEN, SEQ_LEN)
    masked = torch.where(allowed, logits, torch.tensor(-torch.inf))
    max_logits = masked.amax(dim=(-1, -2))[0]  # [heads]

    # Sanity: the captured logits reproduce HF's attention probabilities.
    probs_again = torch.softmax(logits, dim=-1)
    assert torch.allclose(probs_again, attn_probs, atol=1e-6)

    config_record = {
        **BASE_CONFIG,
        "rope_theta": rope_theta,
        **(
            {}
            if rope_scaling is None
            else {
                "rope_scaling": rope_scaling,
                "max_position_embeddings": config.max_position_embeddings,
            }
        ),
        "q_lora_rank": q_lora_rank,
        "qk_head_dim": config.qk_nope_head_dim + config.qk_rope_head_dim,
        "scaling": float(attn.scaling),
        "attn_implementation": "eager",
        "dtype": "float32",
        "seq_len": SEQ_LEN,
        "seed": SEED,
        "rope_parameters": getattr(config, "rope_parameters", None),
        "rope_inv_freq": rotary.inv_freq.tolist(),
        **(
            {}
            if rope_scaling is None
            else {"rope_attention_scaling": float(rotary.attention_scaling)}
        ),
    }
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }

    arrays = {
        name: t.detach().cpu().numpy().astype(np.float32) for name, t in attn.state_dict().items()
    }
    arrays["hidden_states"] = hidden_states[0].numpy().astype(np.float32)
    arrays["output"] = output[0].numpy().astype(np.float32)
    arrays["max_logits"] = max_logits.numpy().astype(np.float32)
    if rope_scaling is not None:
        arrays["position_ids"] = position_ids[0].numpy().astype(np.int32)
    arrays["config_json"] = np.array(json.dumps(config_record, sort_keys=True))
    arrays["versions"] = np.array(json.dumps(versions, sort_keys=True))

    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out_path, **arrays)
    return arrays


# --------------------------------------------------------------------------
# Independent numpy re-implementation, used only to check the saved files:
# it documents the layout conventions a loader must follow.
# --------------------------------------------------------------------------


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return weight * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _rope_interleaved(
    x: np.ndarray, positions: np.ndarray, theta: float, inv_freq=None, amplitude: float = 1.0
) -> np.ndarray:
    """DeepSeek RoPE: pairs (x[2i], x[2i+1]) rotated by angle pos * theta^(-2i/d)
    (or by the given ``inv_freq``), cos and sin times ``amplitude``.

    Returns the rotated pairs in HF's output order [all evens..., all odds...];
    q and k share that permutation, so dot products are unchanged.
    """
    d = x.shape[-1]
    if inv_freq is None:
        inv_freq = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    ang = positions[:, None] * np.asarray(inv_freq, np.float64)[None, :]  # [seq, d/2]
    if x.ndim == 3:  # [heads, seq, d]
        ang = ang[None]
    cos, sin = amplitude * np.cos(ang), amplitude * np.sin(ang)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def numpy_reference(arrays: dict) -> tuple[np.ndarray, np.ndarray]:
    cfg = json.loads(str(arrays["config_json"]))
    w = {k: v.astype(np.float64) for k, v in arrays.items() if k.endswith(".weight")}
    x = arrays["hidden_states"].astype(np.float64)
    seq = x.shape[0]
    h, dn, dr, dv = (
        cfg["num_attention_heads"],
        cfg["qk_nope_head_dim"],
        cfg["qk_rope_head_dim"],
        cfg["v_head_dim"],
    )
    r_kv = cfg["kv_lora_rank"]
    eps = 1e-6  # HF builds q_a_layernorm / kv_a_layernorm with the default eps=1e-6
    pos = arrays.get("position_ids", np.arange(seq)).astype(np.float64)
    yarn = cfg.get("rope_scaling") is not None
    rope = dict(
        inv_freq=cfg["rope_inv_freq"] if yarn else None,
        amplitude=cfg.get("rope_attention_scaling", 1.0),
    )

    if cfg["q_lora_rank"] is None:
        q = x @ w["q_proj.weight"].T
    else:
        q = (
            _rms_norm(x @ w["q_a_proj.weight"].T, w["q_a_layernorm.weight"], eps)
            @ w["q_b_proj.weight"].T
        )
    q = q.reshape(seq, h, dn + dr).transpose(1, 0, 2)  # [h, seq, dn+dr], head-major columns
    q_nope, q_pe = q[..., :dn], _rope_interleaved(q[..., dn:], pos, cfg["rope_theta"], **rope)

    ckv = x @ w["kv_a_proj_with_mqa.weight"].T  # [seq, r_kv + dr]
    c_kv = _rms_norm(ckv[:, :r_kv], w["kv_a_layernorm.weight"], eps)
    k_pe = _rope_interleaved(
        ckv[:, r_kv:], pos, cfg["rope_theta"], **rope
    )  # [seq, dr], shared by all heads
    kv = (c_kv @ w["kv_b_proj.weight"].T).reshape(seq, h, dn + dv).transpose(1, 0, 2)
    k_nope, v = kv[..., :dn], kv[..., dn:]

    logits = (
        np.einsum("hqd,hkd->hqk", q_nope, k_nope) + np.einsum("hqd,kd->hqk", q_pe, k_pe)
    ) * cfg["scaling"]
    allowed = np.tril(np.ones((seq, seq), dtype=bool))
    logits = np.where(allowed, logits, -np.inf)
    max_logits = logits.max(axis=(-1, -2))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("hqk,hkd->qhd", p, v).reshape(seq, h * dv)  # concat heads: index = head * dv + d
    return o @ w["o_proj.weight"].T, max_logits


def check_file(path: pathlib.Path) -> None:
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    cfg = json.loads(str(arrays["config_json"]))
    mscale = 1.0
    if (
        cfg.get("rope_scaling") is not None
    ):  # DeepSeek-V3: softmax scale times mscale(mscale_all_dim)^2
        y = cfg["rope_scaling"]
        mscale = (0.1 * y["mscale_all_dim"] * np.log(y["factor"]) + 1.0) ** 2
    assert (
        abs(cfg["scaling"] - mscale * (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]) ** -0.5)
        < 1e-12
    )
    out, max_logits = numpy_reference(arrays)
    err_out = np.abs(out - arrays["output"]).max()
    err_ml = np.abs(max_logits - arrays["max_logits"]).max()
    assert err_out < 1e-4 and err_ml < 1e-4, (err_out, err_ml)
    shapes = {k: v.shape for k, v in arrays.items() if k.endswith(".weight")}
    print(
        f"{path.name}: {path.stat().st_size} bytes; numpy reference max|diff| output={err_out:.2e} "
        f"max_logits={err_ml:.2e}"
    )
    print(f"  weights: {shapes}")
    print(f"  max_logits: {arrays['max_logits']}")
    print(f"  versions: {arrays['versions']}")


MODEL_FILE = "hf_dsv3_model_yarn.npz"
MODEL_VOCAB, MODEL_LAYERS, MODEL_INTERMEDIATE, MODEL_EPS = 97, 2, 96, 1e-5


def _randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter of a whole model, in state-dict order: norms
    1 + NORM_STD * N(0, 1), the embedding N(0, 1), the rest LINEAR_STD * N(0, 1)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if "norm" in name:
                param.copy_(1.0 + NORM_STD * noise)
            elif "embed_tokens" in name:
                param.copy_(noise)
            else:
                param.copy_(LINEAR_STD * noise)


def _run_model(model: torch.nn.Module, generator: torch.Generator, start: int) -> dict:
    """Random input ids at positions `start ..`, the eager forward's logits and
    per-layer S, and the state dict: the arrays of a whole-model golden file."""
    config = model.config
    input_ids = torch.randint(0, config.vocab_size, (1, SEQ_LEN), generator=generator)
    position_ids = start + torch.arange(SEQ_LEN)[None, :]
    captured: list[torch.Tensor] = []
    with torch.no_grad(), capture_pre_softmax_logits(captured):
        logits = model(input_ids=input_ids, position_ids=position_ids).logits
    assert len(captured) == config.num_hidden_layers, len(captured)
    allowed = torch.ones(SEQ_LEN, SEQ_LEN, dtype=torch.bool).tril()
    max_logits = torch.stack(
        [torch.where(allowed, c, torch.tensor(-torch.inf)).amax(dim=(-1, -2))[0] for c in captured]
    )
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }
    arrays = {
        name: t.detach().cpu().numpy().astype(np.float32) for name, t in model.state_dict().items()
    }
    arrays["input_ids"] = input_ids[0].numpy().astype(np.int32)
    arrays["position_ids"] = position_ids[0].numpy().astype(np.int32)
    arrays["logits"] = logits[0].numpy().astype(np.float32)
    arrays["max_logits"] = max_logits.numpy().astype(np.float32)
    arrays["config_json"] = np.array(json.dumps(config.to_dict(), sort_keys=True, default=str))
    arrays["versions"] = np.array(json.dumps(versions, sort_keys=True))
    return arrays


def make_model_golden(out_path: pathlib.Path) -> dict:
    """A small random all-dense DeepseekV3ForCausalLM: its state dict, logits and S."""
    base = dict(BASE_CONFIG, rms_norm_eps=MODEL_EPS)
    extended = int(DSV3_YARN["factor"] * DSV3_YARN["original_max_position_embeddings"])
    base.update(rope_scaling=dict(DSV3_YARN), max_position_embeddings=extended)
    config = DeepseekV3Config(
        **base,
        q_lora_rank=32,
        vocab_size=MODEL_VOCAB,
        num_hidden_layers=MODEL_LAYERS,
        intermediate_size=MODEL_INTERMEDIATE,
        first_k_dense_replace=MODEL_LAYERS,  # every layer dense
        tie_word_embeddings=False,
        attn_implementation="eager",
        dtype="float32",
    )
    generator = torch.Generator().manual_seed(SEED)
    model = transformers.DeepseekV3ForCausalLM(config).to(torch.float32).eval()
    assert all(isinstance(layer.mlp, hf_dsv3.DeepseekV3MLP) for layer in model.model.layers), (
        "expected dense MLPs only"
    )
    _randomize(model, generator)
    arrays = _run_model(model, generator, YARN_START)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out_path, **arrays)
    shapes = {k: v.shape for k, v in arrays.items() if k.endswith(".weight")}
    print(f"{out_path.name}: {out_path.stat().st_size} bytes; {len(shapes)} weights")
    print(f"  max_logits: {arrays['max_logits']}")
    print(f"  versions: {arrays['versions']}")
    return arrays


# --------------------------------------------------------------------------
# Whole models with DeepSeek-V3 mixture-of-experts layers
# --------------------------------------------------------------------------

MOE_VOCAB, MOE_INTERMEDIATE, MOE_EXPERT_INTERMEDIATE = 97, 96, 16
BIAS_MAX = 0.3  # e_score_correction_bias ~ U(0, BIAS_MAX): it changes the choice

# file -> the DeepseekV3Config fields of the case (on top of BASE_CONFIG)
MOE_CASES = {
    # Kimi K2's router: one group, norm_topk_prob, routed_scaling_factor 2.827,
    # one shared expert, K2-Instruct-0905's yarn block and rope_theta 50000
    "hf_k2_moe.npz": dict(
        num_hidden_layers=3,
        first_k_dense_replace=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.827,
        n_shared_experts=1,
        q_lora_rank=32,
        rope_theta=50000.0,
        rope_scaling=K2_YARN,
    ),
    # DeepSeek-V3's router: group-limited top-k (4 groups, the best 2 kept),
    # routed_scaling_factor 2.5, DeepSeek-V3's yarn block
    "hf_dsv3_moe_groups.npz": dict(
        num_hidden_layers=3,
        first_k_dense_replace=1,
        n_routed_experts=16,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        n_shared_experts=1,
        q_lora_rank=32,
        rope_scaling=DSV3_YARN,
    ),
    # Moonlight's shape (no q LoRA, two shared experts, rope_theta 50000, no
    # yarn) with 2 groups and norm_topk_prob off
    "hf_moonlight_moe_unnormed.npz": dict(
        num_hidden_layers=2,
        first_k_dense_replace=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        norm_topk_prob=False,
        routed_scaling_factor=2.446,
        n_shared_experts=2,
        q_lora_rank=None,
        rope_theta=50000.0,
        rope_scaling=None,
    ),
}


def _hub_layout(arrays: dict, config: DeepseekV3Config) -> dict:
    """transformers' fused expert tensors (`mlp.experts.gate_up_proj`
    [experts, 2 * hidden, dim], gate rows first, and `mlp.experts.down_proj`)
    as the per-expert names of the published checkpoints."""
    out, h = {}, config.moe_intermediate_size
    for name, array in arrays.items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            p = name.removesuffix("gate_up_proj")
            for j, w in enumerate(array):
                out[f"{p}{j}.gate_proj.weight"] = w[:h]
                out[f"{p}{j}.up_proj.weight"] = w[h:]
        elif name.endswith(".mlp.experts.down_proj"):
            p = name.removesuffix("down_proj")
            for j, w in enumerate(array):
                out[f"{p}{j}.down_proj.weight"] = w
        else:
            out[name] = array
    return out


def make_moe_golden(out_path: pathlib.Path, case: dict) -> dict:
    """A small random DeepseekV3ForCausalLM with MoE layers: its state dict in
    the checkpoints' per-expert layout, logits and S."""
    case = dict(case)
    rope_scaling = case.pop("rope_scaling")
    base = dict(BASE_CONFIG, rms_norm_eps=MODEL_EPS, rope_theta=case.pop("rope_theta", 10000.0))
    if rope_scaling is not None:
        extended = int(rope_scaling["factor"] * rope_scaling["original_max_position_embeddings"])
        base.update(rope_scaling=dict(rope_scaling), max_position_embeddings=extended)
    config = DeepseekV3Config(
        **base,
        **case,
        vocab_size=MOE_VOCAB,
        intermediate_size=MOE_INTERMEDIATE,
        moe_intermediate_size=MOE_EXPERT_INTERMEDIATE,
        tie_word_embeddings=False,
        attn_implementation="eager",
        # the reference loop over experts (plain F.linear in float32), not the
        # default grouped_mm kernel
        experts_implementation="eager",
        dtype="float32",
    )
    generator = torch.Generator().manual_seed(SEED)
    model = transformers.DeepseekV3ForCausalLM(config).to(torch.float32).eval()
    assert model.config._experts_implementation == "eager"
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    first = case["first_k_dense_replace"]
    assert kinds == ["DeepseekV3MLP"] * first + ["DeepseekV3MoE"] * (len(kinds) - first), kinds
    _randomize(model, generator)
    with torch.no_grad():
        for layer in model.model.layers[first:]:
            bias = layer.mlp.gate.e_score_correction_bias
            bias.copy_(BIAS_MAX * torch.rand(bias.shape, generator=generator))
    arrays = _run_model(model, generator, 0 if rope_scaling is None else YARN_START)
    names = set(model.state_dict())
    weights = _hub_layout({k: v for k, v in arrays.items() if k in names}, config)
    arrays = {**weights, **{k: v for k, v in arrays.items() if k not in names}}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_path, **arrays)
    logits_max = np.abs(arrays["logits"]).max()
    print(f"{out_path.name}: {out_path.stat().st_size} bytes; logits max {logits_max:.3f}")
    print(f"  versions: {arrays['versions']}")
    return arrays


def main(names: list[str]) -> None:
    known = [*CASES, MODEL_FILE, *MOE_CASES]
    for name in names:
        if name not in known:
            raise SystemExit(f"unknown case {name!r}; choose from {sorted(known)}")
    if not names or MODEL_FILE in names:
        make_model_golden(OUT_DIR / MODEL_FILE)
    for filename, case in MOE_CASES.items():
        if not names or filename in names:
            make_moe_golden(OUT_DIR / filename, case)
    for filename, (q_lora_rank, rope_scaling, start, rope_theta) in CASES.items():
        if names and filename not in names:
            continue
        path = OUT_DIR / filename
        make_golden(q_lora_rank, path, rope_scaling, start, rope_theta)
        check_file(path)


if __name__ == "__main__":
    main(sys.argv[1:])
