"""Plain log lines for a run without a progress bar (a cluster job's log file),
and the model FLOPs behind their TFLOP/s and MFU."""

from __future__ import annotations

import collections
import sys
from collections.abc import Mapping
from typing import IO, Any

import equinox as eqx
import jax
import jax.numpy as jnp

from ._config import MLAConfig, TransformerConfig
from ._metric_schema import find_s, s_max_key
from ._model import Transformer

__all__ = ["LogLines", "train_flops_per_token"]


def train_flops_per_token(config: TransformerConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward and backward) of the model of `config`
    on sequences of `seq_len` tokens, from its shape:

    $$6N + 6\\,L\\,T\\,H\\,(d_{qk} + d_v),$$

    with $N$ the parameters other than the embedding table (a lookup, no
    FLOPs) and, in mixture-of-experts layers, other than the routed experts a
    token does not visit: of $E$ routed experts, $k$ per token, $N$ counts
    $k/E$ of their weights (the router, the shared experts and the expert
    bias in full). $L$ layers, $T$ = `seq_len`, $H$ query heads, and the per-head
    query/key and value widths ($d_{qk}$ = nope + rope width for MLA). The
    first term is the matmuls' $2N$ forward and $4N$ backward; the second is
    $QK^\\top$ and $PV$, counted over every (query, key) pair as PaLM does
    (Chowdhery et al., arXiv 2204.02311, App. B: $6N + 12\\,L\\,H\\,Q\\,T$ with
    $Q = d_{qk} = d_v$); a causal kernel that skips masked blocks does less.
    """
    model = eqx.filter_eval_shape(Transformer, config, key=jax.random.key(0))
    n = sum(
        x.size
        for x in jax.tree.leaves(model)
        if isinstance(x, jax.ShapeDtypeStruct) and jnp.issubdtype(x.dtype, jnp.floating)
    )
    n -= config.vocab_size * config.attention.dim  # the embedding table
    if model.moe_blocks is not None and config.moe is not None:
        experts = model.moe_blocks.mlp.experts
        routed = experts.w_gate.size + experts.w_up.size + experts.w_down.size
        e, k = config.moe.n_routed_experts, config.moe.num_experts_per_tok
        n -= routed * (e - k) // e  # the experts a token skips
    attn = config.attention
    if isinstance(attn, MLAConfig):
        d_qk, d_v = attn.qk_nope_head_dim + attn.qk_rope_head_dim, attn.v_head_dim
    else:
        d_qk = d_v = attn.head_dim
    return 6.0 * n + 6.0 * config.n_layers * seq_len * attn.n_heads * (d_qk + d_v)


class LogLines:
    """A [`qkclip_eqx.MetricSink`][] that prints one plain line every `every`
    steps (and at every evaluation and the last step), for logs read as files:

        step=120/600 loss=3.2145 S_max=28.31 heads_clipped=2/8 heads_over_tau=2/8 tok/s=12,345 TFLOP/s=0.52 MFU=0.26%

    `tok/s` is the median of the last 20 steps read, leaving out the first (the
    compile); TFLOP/s is that times `flops_per_token`; MFU divides it by
    `peak_tflops` (per device) times the device count, and is left out without
    a peak."""

    def __init__(
        self,
        every: int,
        total: int,
        flops_per_token: float,
        peak_tflops: float | None = None,
        n_devices: int = 1,
        file: IO[str] | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"--log-every must be >= 1, got {every}")
        if peak_tflops is not None and not peak_tflops > 0:
            raise ValueError(f"--peak-tflops must be > 0, got {peak_tflops}")
        self.every, self.total, self.flops = every, total, flops_per_token
        self.peak, self.n_devices, self.file = peak_tflops, n_devices, file
        self.recent: collections.deque[float] = collections.deque(maxlen=20)
        self.first = True

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        rate = metrics.get("tokens_per_s")
        if not self.first and isinstance(rate, (int, float)):
            self.recent.append(float(rate))
        self.first = False
        done = step + 1
        if done % self.every and done != self.total and "val_loss" not in metrics:
            return
        print(self.line(done, metrics), file=self.file or sys.stdout, flush=True)

    def line(self, done: int, metrics: Mapping[str, Any]) -> str:
        parts = [f"step={done}/{self.total}", f"loss={metrics['loss']:.4f}"]
        if "val_loss" in metrics:
            parts.append(f"val_loss={metrics['val_loss']:.4f}")
        rows, bound = find_s(metrics)
        s_max = metrics.get(s_max_key(bound))
        if isinstance(s_max, (int, float)):
            parts.append(f"{'S_bound' if bound else 'S_max'}={s_max:.2f}")
        rows = rows or []
        heads = sum(len(r) for r in rows)
        for name in ("heads_clipped", "heads_over_tau"):  # over tau: a monitor run's count
            if name in metrics and heads:
                parts.append(f"{name}={metrics[name]}/{heads}")
        if self.recent:
            tokens = sorted(self.recent)[len(self.recent) // 2]
            tflops = tokens * self.flops / 1e12
            parts += [f"tok/s={tokens:,.0f}", f"TFLOP/s={tflops:.3g}"]
            if self.peak is not None:
                parts.append(f"MFU={100 * tflops / (self.peak * self.n_devices):.2f}%")
        return " ".join(parts)

    def close(self) -> None:
        pass
