"""Rotary position embedding (Su et al. 2021, arXiv 2104.09864).

Two layouts of the rotated pairs:

- ``"half"``: pairs (x_i, x_{i+d/2}), as in Llama / GPT-NeoX ("rotate_half").
- ``"interleaved"``: pairs (x_{2i}, x_{2i+1}), the layout DeepSeek-V3 and Kimi K2
  checkpoints store their RoPE dimensions in (HF ``rope_interleave=True``).

Pair i rotates by angle ``position * theta^(-2i/d)``. Only dot products between
rotated queries and keys matter to attention, so both layouts give the same
attention output for weights stored in the matching layout.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ._config import RopeLayout


def apply_rope(
    x: Float[Array, "seq heads dim"],
    positions: Int[Array, " seq"],
    *,
    theta: float,
    layout: RopeLayout,
) -> Float[Array, "seq heads dim"]:
    """Rotate ``x`` by its positions; computed in float32, returned in x's dtype."""
    d = x.shape[-1]
    inv_freq = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angle = positions.astype(jnp.float32)[:, None] * inv_freq  # [seq, d/2]
    cos, sin = jnp.cos(angle)[:, None, :], jnp.sin(angle)[:, None, :]
    xf = x.astype(jnp.float32)
    if layout == "half":
        x1, x2 = xf[..., : d // 2], xf[..., d // 2 :]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xf.shape)
    return out.astype(x.dtype)
