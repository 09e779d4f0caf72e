"""Sampling from a [`qkclip_eqx.Transformer`][] with its cache (latent for MLA, k/v for GQA)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._model import Transformer


def sample_token(
    logits: Float[Array, " vocab"],
    key: PRNGKeyArray | None,
    *,
    temperature: float,
    top_k: int | None,
) -> Int[Array, ""]:
    """One token from `logits`: the argmax when `temperature == 0`, else a
    draw from `softmax(logits / temperature)` restricted to the `top_k`
    largest logits (ties at the k-th value kept; None: all).

    **Arguments:**

    - `logits`: float32 logits of one position.
    - `key`: the draw's key (unused when greedy).
    - `temperature`: 0 for greedy, else > 0.
    - `top_k`: how many of the largest logits may be drawn, or None.

    **Returns:**

    The token, an int32 scalar.

    **Raises:**

    `ValueError` when `temperature > 0` and `key` is None.
    """
    if temperature == 0:
        return jnp.argmax(logits).astype(jnp.int32)
    if key is None:
        raise ValueError("sampling with temperature > 0 needs a key")
    logits = logits.astype(jnp.float32) / jnp.float32(temperature)
    if top_k is not None and top_k < logits.shape[0]:
        kth = jax.lax.top_k(logits, top_k)[0][-1]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    return jax.random.categorical(key, logits).astype(jnp.int32)


def _check(temperature, top_k, key, max_new_tokens, prompt_len) -> None:
    ok = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not (ok and temperature >= 0 and temperature != float("inf")):
        raise ValueError(
            f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}"
        )
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k <= 0):
        raise ValueError(f"top_k must be None or a positive int, got {top_k!r}")
    if temperature > 0 and key is None:
        raise ValueError("sampling with temperature > 0 needs an explicit key")
    if (
        not isinstance(max_new_tokens, int)
        or isinstance(max_new_tokens, bool)
        or max_new_tokens <= 0
    ):
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if prompt_len == 0:
        raise ValueError("the prompt must hold at least one token")


def generate(
    model: Transformer,
    prompt: Int[Array, " prompt"],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    key: PRNGKeyArray | None = None,
) -> tuple[Int[Array, " new"], Float[Array, "layers heads"]]:
    """Continue `prompt` by `max_new_tokens` tokens: one prefill of the
    prompt, then one cached step per token (`Transformer.decode` over a cache
    of `len(prompt) + max_new_tokens` slots: absorbed MLA over the latent
    cache, or GQA over the k/v cache), in a
    `jax.lax.scan`. Jit it with `eqx.filter_jit` (`max_new_tokens`,
    `temperature` and `top_k` are static); vmap it over keys for several
    samples of one prompt.

    Token `i` is drawn with `jax.random.split(key, max_new_tokens)[i]` by
    [`qkclip_eqx.sample_token`][]; greedy decoding (`temperature=0`) uses no key and
    is deterministic.

    **Arguments:**

    - `model`: a [`qkclip_eqx.Transformer`][] (MLA or GQA attention).
    - `prompt`: the prompt's tokens (at least one).
    - `max_new_tokens`: how many tokens to generate.
    - `temperature`: 0 for greedy (the default), else the sampling temperature.
    - `top_k`: sample among the `top_k` most likely tokens only (None: all).
    - `key`: needed when `temperature > 0`.

    **Returns:**

    `(tokens, S)`: the generated tokens, and S per layer and head, the max
    over the prompt and every generated position but the last (whose logits
    are not needed).

    **Raises:**

    `ValueError` when `temperature` is negative or not finite, `top_k` or
    `max_new_tokens` is not a positive int, `temperature > 0` without a `key`,
    or `prompt` is empty.
    """
    _check(temperature, top_k, key, max_new_tokens, prompt.shape[0])
    cache = model.init_cache(prompt.shape[0] + max_new_tokens)
    if key is None:
        keys = jnp.zeros((max_new_tokens,), jnp.uint32)  # unused: greedy
    else:
        keys = jax.random.split(key, max_new_tokens)

    def draw(logits, k):
        return sample_token(
            logits, None if key is None else k, temperature=temperature, top_k=top_k
        )

    logits, s_max, cache = model.decode(prompt, cache)
    first = draw(logits[-1], keys[0])

    def step(carry, k):
        token, cache, s_max = carry
        logits, s, cache = model.decode(token[None], cache)
        new = draw(logits[0], k)
        return (new, cache, jnp.maximum(s_max, s)), new

    (_, _, s_max), rest = jax.lax.scan(step, (first, cache, s_max), keys[1:])
    return jnp.concatenate([first[None], rest]), s_max
