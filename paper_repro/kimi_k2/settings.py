"""Every size, learning rate and step count of the reproduction, per mode.

Why these numbers (full mode, the one whose results are committed):

- Model: the ``small`` preset of qkclip_eqx: an MLA Transformer with 4 layers,
  width 128, 4 heads (q/k: 32 no-RoPE + 16 RoPE dims, v 32, kv latent 64, no
  q latent), SwiGLU 384, byte vocabulary 256, 0.93M parameters; 16 heads
  in all, so one head is 6.25% of the heads.
- Data: the built-in corpus (the Python standard library as bytes, 8 MB train).
- Batch 8 x 128 tokens (half the preset's 16): 0.15-0.3 s/step on 2 shared CPU
  cores, which is what lets the full run's 11,000 steps (29 runs) fit in ~43 min.
- Schedule in K2's proportions: K2 trains 15.5T tokens, 10T at constant lr
  after a 500-step warmup, then 5.5T decaying (35%). Here: WSD, decay over the
  last 35% (``decay_fraction=0.35``, linear to 0 as qkclip_eqx's ``wsd``
  does; K2 decays by cosine to 0.1x). Warmup 20 steps (4%): K2's 500 of ~220k
  steps would be a single step here. Weight decay 0.1 as in K2.
- Main runs 500 steps (512k tokens): long enough for S to rise, be capped,
  and fall during the decay; far too short to say anything about K2's 220k.
- lr sweep: the first 150 steps of each run (warmup, then constant lr: the
  decay starts at step 325, so the max logit at step 149 measures growth, not
  decay), lr in {3e-3, 1e-2, 3e-2, 1e-1} for Muon, AdamW, MuonClip and AdamW
  with QK-Clip (``optimizer="adamw", mode="clip"``; both clips at tau_low). The
  runs the later experiments need are continued from there (bit-exact). Muon
  and AdamW get the same lr: Muon's update RMS is matched to AdamW's by the
  0.2 factor, as K2 does. A half-decade grid: four points is what the budget
  allows, and it spans S from ~15 to ~1000.
- Seeds 0, 1, 2 for the Muon-vs-MuonClip loss comparison (Fig. 12), at every
  stable swept lr whose Muon S exceeded tau; the seed sets both the
  initialisation and the batch order.
- tau: K2's 100, and a lower tau chosen from the monitor run (see
  ``choose_tau_low``): 30, the K2 ablation's value, when the monitor run's
  largest S is at least 45; otherwise half of that S.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# The model of qkclip_eqx's ``small`` preset (the RunConfig defaults), written
# out so that this file states it.
SMALL_MODEL: dict[str, Any] = dict(
    attention="mla",
    n_layers=4,
    dim=128,
    n_heads=4,
    q_lora_rank=None,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    mlp_hidden=384,
)
TINY_MODEL: dict[str, Any] = dict(
    attention="mla",
    n_layers=2,
    dim=32,
    n_heads=2,
    q_lora_rank=None,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    mlp_hidden=64,
)
GPU_MODEL: dict[str, Any] = dict(
    attention="mla",
    n_layers=8,
    dim=512,
    n_heads=8,
    q_lora_rank=256,
    kv_lora_rank=128,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    mlp_hidden=1536,
)


@dataclasses.dataclass(frozen=True)
class Settings:
    name: str
    model: dict[str, Any]
    batch_size: int
    seq_len: int
    max_bytes: int
    steps: int  # main runs (Fig. 2, App. D, Fig. 12)
    warmup_steps: int
    decay_fraction: float  # WSD decay phase, K2: 5.5T of 15.5T tokens
    weight_decay: float
    sweep_steps: int  # lr sweep (App. E), constant lr after warmup
    sweep_lrs: tuple[float, ...]
    seeds: tuple[int, ...]  # Fig. 12
    tau_k2: float = 100.0
    tau_ablation: float = 30.0
    eval_every: int = 100
    eval_batches: int = 16
    ckpt_every: int = 100
    spike_window: int = 20  # loss spike: loss > spike_factor x median of the previous 20 steps
    spike_factor: float = 1.5
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def run_fields(self) -> dict[str, Any]:
        """RunConfig fields shared by every run of this mode."""
        return dict(
            **self.model,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            max_bytes=self.max_bytes,
            weight_decay=self.weight_decay,
            eval_batches=self.eval_batches,
            keep=1,
            **self.extra,
        )


FULL = Settings(
    name="full",
    model=SMALL_MODEL,
    batch_size=8,
    seq_len=128,
    max_bytes=8_000_000,
    steps=500,
    warmup_steps=20,
    decay_fraction=0.35,
    weight_decay=0.1,
    sweep_steps=150,
    sweep_lrs=(3e-3, 1e-2, 3e-2, 1e-1),
    seeds=(0, 1, 2),
    eval_every=100,
    eval_batches=16,
    ckpt_every=100,
)

# The same pipeline at test size: every stage runs, on qkclip_eqx's ``tiny``
# model, with a few dozen steps; its numbers mean nothing.
QUICK = Settings(
    name="quick",
    model=TINY_MODEL,
    batch_size=4,
    seq_len=32,
    max_bytes=400_000,
    steps=48,
    warmup_steps=4,
    decay_fraction=0.35,
    weight_decay=0.1,
    sweep_steps=24,
    sweep_lrs=(1e-2, 1e-1),
    seeds=(0, 1),
    eval_every=24,
    eval_batches=2,
    ckpt_every=24,
    spike_window=8,
)

# For an accelerator (not run on the CPU machine): ~25M parameters, 10x the
# steps, 4x the sequence; same proportions. The lr grid moves down because a
# wider model is stable at a lower lr.
GPU = Settings(
    name="gpu",
    model=GPU_MODEL,
    batch_size=32,
    seq_len=512,
    max_bytes=64_000_000,
    steps=5000,
    warmup_steps=100,
    decay_fraction=0.35,
    weight_decay=0.1,
    sweep_steps=1000,
    sweep_lrs=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    seeds=(0, 1, 2),
    eval_every=250,
    eval_batches=32,
    ckpt_every=250,
    extra=dict(kernel="blockwise", block_size=128, compute_dtype="bfloat16"),
)

MODES = {"full": FULL, "quick": QUICK, "gpu": GPU}


def choose_tau_low(peak_s: float, tau_ablation: float = 30.0) -> float:
    """The lower threshold for Fig. 2 right / Fig. 12, from the monitor run's
    largest S: K2's ablation value 30 when S reaches 1.5x that; otherwise half
    the largest S, rounded to a multiple of 0.25 (exact in float32, so the
    clip's float32 comparison and this analysis agree)."""
    if peak_s >= 1.5 * tau_ablation:
        return float(tau_ablation)
    return max(0.25, round(peak_s / 2 * 4) / 4)
