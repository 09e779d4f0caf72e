"""Rotary position embedding (Su et al. 2021, arXiv 2104.09864).

Two layouts of the rotated pairs:

- `"half"`: pairs (x_i, x_{i+d/2}), as in Llama / GPT-NeoX ("rotate_half").
- `"interleaved"`: pairs (x_{2i}, x_{2i+1}), the layout DeepSeek-V3 and Kimi K2
  checkpoints store their RoPE dimensions in (HF `rope_interleave=True`).

Pair i rotates by angle `position * theta^(-2i/d)`. Only dot products between
rotated queries and keys matter to attention, so both layouts give the same
attention output for weights stored in the matching layout. With a
[`qkclip_eqx.YaRN`][] config the frequencies are interpolated and cos, sin
scaled as that class describes.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ._config import RopeLayout, YaRN


def rope_inv_freq(d: int, theta: float, yarn: YaRN | None = None) -> Float[np.ndarray, " half"]:
    """The `d/2` inverse frequencies, float32: `theta^(-2i/d)`, or YaRN's
    interpolation of them (Peng et al. 2023, arXiv 2309.00071, sec. 3.2, the
    "NTK-by-parts" ramp; DeepSeek-V3's `find_correction_range`).

    **Arguments:**

    - `d`: the rotated dimension (even).
    - `theta`: the RoPE base.
    - `yarn`: the scaling, or None for plain RoPE.
    """
    pos_freqs = np.float32(theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))
    extrapolation = (1.0 / pos_freqs).astype(np.float32)
    if yarn is None:
        return extrapolation
    interpolation = (1.0 / (np.float32(yarn.factor) * pos_freqs)).astype(np.float32)

    def correction_dim(rotations: float) -> float:
        return (
            d
            * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(theta))
        )

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # as the reference: no division by zero
    ramp = np.clip(
        (np.arange(d // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1
    )
    keep = (1 - ramp).astype(np.float32)  # 1: the original frequency, 0: interpolated
    return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32)


def apply_rope(
    x: Float[Array, "seq heads dim"],
    positions: Int[Array, " seq"],
    *,
    theta: float,
    layout: RopeLayout,
    yarn: YaRN | None = None,
) -> Float[Array, "seq heads dim"]:
    """Rotate `x` by its positions; computed in float32, returned in x's dtype.
    `yarn`: YaRN scaling (None: plain RoPE)."""
    d = x.shape[-1]
    if yarn is None:
        inv_freq = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    else:
        inv_freq = jnp.asarray(rope_inv_freq(d, theta, yarn))
    angle = positions.astype(jnp.float32)[:, None] * inv_freq  # [seq, d/2]
    cos, sin = jnp.cos(angle)[:, None, :], jnp.sin(angle)[:, None, :]
    if yarn is not None and yarn.rope_factor != 1.0:
        cos, sin = cos * jnp.float32(yarn.rope_factor), sin * jnp.float32(yarn.rope_factor)
    xf = x.astype(jnp.float32)
    if layout == "half":
        x1, x2 = xf[..., : d // 2], xf[..., d // 2 :]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xf.shape)
    return out.astype(x.dtype)
