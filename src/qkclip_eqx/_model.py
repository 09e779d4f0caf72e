"""A decoder-only Transformer whose layers are stacked and run with lax.scan."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from ._attention import GQAttention, MLAttention
from ._config import MLAConfig, ParallelAxes, TransformerConfig
from ._decode import KVCache, MLACache
from ._interfaces import AbstractPackedModel
from ._layers import RMSNorm, SwiGLU, init_weight, linear
from ._moe import MoE, RouterStats
from ._optim import matrix_dimension_numbers
from ._parallel import gather_fsdp, layer_specs, partition_specs

# What a scanned layer keeps for its backward pass: the projections' matmul
# outputs and the attention kernel's output and log-sum-exp; the elementwise
# work (norms, RoPE, SiLU) is recomputed. XLA:CPU spends more on stacking a
# scan's residuals (zero-filled buffers, a dynamic-update-slice per layer) than
# on recomputing them (docs/benchmarks.md, "Design choices", has the timing).
_SAVE_MATMULS_AND_ATTENTION = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    jax.checkpoint_policies.save_only_these_names("attention_out", "attention_lse"),
)


class Block(eqx.Module):
    """Pre-norm block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    attn_norm: RMSNorm
    attn: MLAttention | GQAttention
    mlp_norm: RMSNorm
    mlp: SwiGLU

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray):
        ka, km = jax.random.split(key)
        dtype, compute = jnp.dtype(config.param_dtype), jnp.dtype(config.compute_dtype)
        self.attn_norm, self.attn, self.mlp_norm = _attention_parts(config, ka)
        self.mlp = SwiGLU(config.dim, config.mlp_hidden, dtype=dtype, compute_dtype=compute, key=km)

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        *,
        positions: Int[Array, " seq"] | None = None,
        segment_ids: Int[Array, " seq"] | None = None,
        segment_length: int | None = None,
        parallel: ParallelAxes | None = None,
    ) -> tuple[Float[Array, "seq dim"], Float[Array, " heads"]]:
        """The block on one sequence.

        **Arguments:**

        As `MLAttention.__call__`, with `x` the residual stream.

        **Returns:**

        `(x, S)`: the new residual stream, and the attention's S per head.
        """
        x, max_logits = _attention_half(self, x, positions, segment_ids, segment_length, parallel)
        return x + self.mlp(self.mlp_norm(x), parallel=parallel), max_logits

    def decode(
        self, x: Float[Array, "t dim"], cache: MLACache | KVCache
    ) -> tuple[Float[Array, "t dim"], Float[Array, " heads"], MLACache | KVCache]:
        """As `__call__` for `t` new tokens over this layer's `cache`
        ([`qkclip_eqx.MLAttention.decode`][], absorbed MLA over the latent cache,
        or [`qkclip_eqx.GQAttention.decode`][] over the k/v cache).

        **Arguments:**

        - `x`: the new tokens' residual stream.
        - `cache`: this layer's cache holding the earlier tokens.

        **Returns:**

        `(x, S, cache)`: the new residual stream, S per head, and the updated
        cache.
        """
        h, max_logits, cache = self.attn.decode(self.attn_norm(x), cache)  # pyright: ignore[reportArgumentType]  # Transformer.decode pairs the cache with the attention
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), max_logits, cache


def _attention_parts(
    config: TransformerConfig, key: PRNGKeyArray
) -> tuple[RMSNorm, MLAttention | GQAttention, RMSNorm]:
    """A block's attention norm, attention and MLP norm."""
    dtype, compute = jnp.dtype(config.param_dtype), jnp.dtype(config.compute_dtype)
    attention = MLAttention if isinstance(config.attention, MLAConfig) else GQAttention
    return (
        RMSNorm(config.dim, eps=config.norm_eps, dtype=dtype),
        attention(config.attention, dtype=dtype, compute_dtype=compute, key=key),  # pyright: ignore[reportArgumentType]  # the class matches the config
        RMSNorm(config.dim, eps=config.norm_eps, dtype=dtype),
    )


def _attention_half(
    block: "Block | MoEBlock",
    x: Array,
    positions: Array | None,
    segment_ids: Array | None,
    segment_length: int | None,
    parallel: ParallelAxes | None,
) -> tuple[Array, Array]:
    """`x + attn(norm(x))` and S: the first half of either block."""
    h, max_logits = block.attn(
        block.attn_norm(x),
        positions=positions,
        segment_ids=segment_ids,
        segment_length=segment_length,
        parallel=parallel,
    )
    return x + h, max_logits


class MoEBlock(eqx.Module):
    """Pre-norm block with a DeepSeek-V3 mixture-of-experts feed-forward layer
    ([`qkclip_eqx.MoE`][]): `x + attn(norm(x))`, then `x + moe(norm(x))`."""

    attn_norm: RMSNorm
    attn: MLAttention | GQAttention
    mlp_norm: RMSNorm
    mlp: MoE

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray):
        if config.moe is None:
            raise ValueError("MoEBlock needs a TransformerConfig with moe set")
        ka, km = jax.random.split(key)
        dtype, compute = jnp.dtype(config.param_dtype), jnp.dtype(config.compute_dtype)
        self.attn_norm, self.attn, self.mlp_norm = _attention_parts(config, ka)
        self.mlp = MoE(config.moe, config.dim, dtype=dtype, compute_dtype=compute, key=km)

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        *,
        positions: Int[Array, " seq"] | None = None,
        segment_ids: Int[Array, " seq"] | None = None,
        segment_length: int | None = None,
        parallel: ParallelAxes | None = None,
    ) -> tuple[Float[Array, "seq dim"], Float[Array, " heads"], RouterStats]:
        """As [`qkclip_eqx.Block.__call__`][], plus the layer's
        [`qkclip_eqx.RouterStats`][]: `(x, S, stats)`."""
        x, max_logits = _attention_half(self, x, positions, segment_ids, segment_length, parallel)
        y, stats = self.mlp(self.mlp_norm(x), segment_length=segment_length, parallel=parallel)
        return x + y, max_logits, stats

    def decode(
        self, x: Float[Array, "t dim"], cache: MLACache | KVCache
    ) -> tuple[Float[Array, "t dim"], Float[Array, " heads"], MLACache | KVCache]:
        """As [`qkclip_eqx.Block.decode`][] (the router's statistics dropped)."""
        h, max_logits, cache = self.attn.decode(self.attn_norm(x), cache)  # pyright: ignore[reportArgumentType]  # Transformer.decode pairs the cache with the attention
        x = x + h
        return x + self.mlp(self.mlp_norm(x))[0], max_logits, cache


def _scan(
    stacked: eqx.Module, x: Array, fn, specs: PyTree = None, fsdp: str | None = None
) -> tuple[Array, PyTree]:
    """`lax.scan` of `fn(layer, x) -> (x, per-layer results)` over the layers
    of `stacked` (a block whose array leaves carry a leading layer axis), each
    layer under the remat policy above. With `specs` (`stacked`'s partition
    specs) and an `fsdp` axis, each layer's weights are all-gathered over it
    inside the scan body, one layer at a time (ZeRO-3; the gathered layer is
    recomputed, not stored, for the backward pass)."""
    params, static = eqx.partition(stacked, eqx.is_array)

    def layer(x, block_params):
        if specs is not None:  # this layer's whole weights (up to the model split)
            block_params = gather_fsdp(block_params, layer_specs(specs), fsdp)
        return fn(eqx.combine(block_params, static), x)

    return jax.lax.scan(jax.checkpoint(layer, policy=_SAVE_MATMULS_AND_ATTENTION), x, params)


class Transformer(AbstractPackedModel):
    """Token embedding, `n_layers` stacked blocks ([`qkclip_eqx.Block`][]), final norm, untied head.

    `blocks` is ONE [`qkclip_eqx.Block`][] whose array leaves carry a leading layer
    axis; `__call__` scans over it, so compile time does not grow with depth.
    With `config.moe`, `blocks` holds the first `moe.first_k_dense_replace`
    (dense) layers and `moe_blocks`, ONE stacked [`qkclip_eqx.MoEBlock`][], the
    mixture-of-experts layers after them, scanned in turn; without, it is None.

    Parameters are stored in `config.param_dtype`; the residual stream and the
    matmuls run in `config.compute_dtype`, each module casting its own weights
    at entry; the LM head accumulates in float32.

    Under FSDP (`parallel.fsdp`, see [`qkclip_eqx.shard_loss`][]) the model
    holds this device's shard of every parameter, and all-gathers each where it
    is used: a layer's weights inside the scan's body, one layer at a time (so
    one layer's whole weights live at once, never the stack's), the embedding
    at the lookup, the final norm and the LM head at the head.
    """

    # inside shard_map it all-gathers its own fsdp-sharded parameters (see __call__)
    gathers_fsdp_params: ClassVar[bool] = True
    config: TransformerConfig = eqx.field(static=True)
    embed: Float[Array, "vocab dim"]
    blocks: Block
    moe_blocks: MoEBlock | None
    final_norm: RMSNorm
    lm_head: Float[Array, "vocab dim"]

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray):
        ke, kb, kh = jax.random.split(key, 3)
        dtype = jnp.dtype(config.param_dtype)
        self.config = config
        self.embed = jax.random.normal(ke, (config.vocab_size, config.dim), jnp.float32).astype(
            dtype
        )
        block_keys = jax.random.split(kb, config.n_layers)
        k = config.n_dense_layers
        self.blocks = eqx.filter_vmap(lambda k: Block(config, key=k))(block_keys[:k])
        self.moe_blocks = (
            None
            if config.moe is None
            else eqx.filter_vmap(lambda k: MoEBlock(config, key=k))(block_keys[k:])
        )
        self.final_norm = RMSNorm(config.dim, eps=config.norm_eps, dtype=dtype)
        self.lm_head = init_weight(kh, (config.vocab_size, config.dim), dtype)

    def __call__(
        self,
        tokens: Int[Array, " seq"],
        *,
        positions: Int[Array, " seq"] | None = None,
        segment_ids: Int[Array, " seq"] | None = None,
        segment_length: int | None = None,
        parallel: ParallelAxes | None = None,
    ) -> tuple[Float[Array, "seq vocab"], Float[Array, "layers heads"]]:
        """The model on one example.

        **Arguments:**

        - `tokens`: the input tokens.
        - `positions`, `segment_ids`: as for `MLAttention.__call__`.
        - `segment_length`: `tokens` packs independent sequences of exactly
          this length (see [`qkclip_eqx.next_token_loss`][], which packs a batch
          so that every matmul sees one flat `[batch * seq, dim]` operand).
        - `parallel`: for use inside `jax.shard_map` (see
          [`qkclip_eqx.shard_loss`][]).

        **Returns:**

        `(logits, S)`: float32 logits `[seq, vocab]`, and S per layer and head
        `[layers, heads]` for this example.
        """
        logits, max_logits, _ = self.forward(
            tokens,
            positions=positions,
            segment_ids=segment_ids,
            segment_length=segment_length,
            parallel=parallel,
        )
        return logits, max_logits

    def forward(
        self,
        tokens: Int[Array, " seq"],
        *,
        positions: Int[Array, " seq"] | None = None,
        segment_ids: Int[Array, " seq"] | None = None,
        segment_length: int | None = None,
        parallel: ParallelAxes | None = None,
    ) -> tuple[Float[Array, "seq vocab"], Float[Array, "layers heads"], RouterStats | None]:
        """As `__call__`, plus the router statistics of the mixture-of-experts
        layers: `(logits, S, stats)`, `stats` a [`qkclip_eqx.RouterStats`][]
        with a leading axis over the MoE layers, or None without `config.moe`.
        S covers every layer, the dense ones first."""
        kw = dict(
            positions=positions,
            segment_ids=segment_ids,
            segment_length=segment_length,
            parallel=parallel,
        )
        fsdp = None if parallel is None else parallel.fsdp
        specs = partition_specs(self) if fsdp is not None else None
        embed, final_norm, lm_head = self.embed, self.final_norm, self.lm_head
        if specs is not None:
            embed, final_norm, lm_head = gather_fsdp(
                (embed, final_norm, lm_head),
                (specs.embed, specs.final_norm, specs.lm_head),
                fsdp,
            )
        compute = jnp.dtype(self.config.compute_dtype)
        x = embed[tokens].astype(compute)
        x, max_logits = _scan(
            self.blocks,
            x,
            lambda block, x: block(x, **kw),
            None if specs is None else specs.blocks,
            fsdp,
        )
        stats = None
        if self.moe_blocks is not None:

            def moe_layer(block, x):
                x, s, layer_stats = block(x, **kw)
                return x, (s, layer_stats)

            x, (moe_logits, stats) = _scan(
                self.moe_blocks,
                x,
                moe_layer,
                None if specs is None else specs.moe_blocks,
                fsdp,
            )
            max_logits = jnp.concatenate([max_logits, moe_logits])
        logits = linear(final_norm(x), lm_head.astype(compute), out_dtype=jnp.float32)
        return logits, max_logits, stats

    def muon_dimension_numbers(self) -> "Transformer":
        """Optimizer routing for [`qkclip_eqx.muon_adamw`][]: the matrices inside
        `blocks` go to Muon, each layer on its own (the leading layer axis is a
        batch axis); the embedding, the LM head and every norm gain to AdamW
        (`None`). In `moe_blocks` the router is one matrix per layer and every
        routed expert's matrix is orthogonalised on its own (layer and expert
        axes are batch axes); the correction bias is a vector (AdamW's half),
        but gets no gradient and the train step keeps every update off it.
        Works on a masked copy of the params, as optax passes them."""
        adamw = jax.tree.map(lambda _: None, self)
        dims = eqx.tree_at(
            lambda t: t.blocks, adamw, matrix_dimension_numbers(self.blocks, stacked_axes=1)
        )
        if self.moe_blocks is None:
            return dims
        # MoE layers: the router [layers, experts, dim] is one matrix per layer;
        # the routed experts' [layers, experts, out, in] one matrix per expert
        moe = matrix_dimension_numbers(self.moe_blocks, stacked_axes=1)
        moe = eqx.tree_at(
            lambda b: b.mlp.experts,
            moe,
            matrix_dimension_numbers(self.moe_blocks.mlp.experts, stacked_axes=2),
        )
        return eqx.tree_at(lambda t: t.moe_blocks, dims, moe)

    def init_cache(self, max_len: int) -> MLACache | KVCache:
        """An empty cache for `decode`, in the compute dtype, `length` 0: for
        MLA the latent cache, `c_kv` [layers, max_len, kv_lora_rank] and `k_r`
        [layers, max_len, qk_rope_head_dim]; for GQA (and MHA) the k/v cache,
        `k` and `v` [layers, max_len, kv_heads, head_dim].

        Raises `ValueError` when `max_len` is not a positive int.
        """
        # one layer's cache (which checks max_len), with a leading layer axis
        one = self.blocks.attn.init_cache(max_len)
        n = self.config.n_layers
        stacked = jax.tree.map(lambda x: jnp.zeros((n, *x.shape), x.dtype), one)
        return eqx.tree_at(lambda c: c.length, stacked, one.length)

    def decode(
        self, tokens: Int[Array, " t"], cache: MLACache | KVCache
    ) -> tuple[Float[Array, "t vocab"], Float[Array, "layers heads"], MLACache | KVCache]:
        """Prefill (`t` = the prompt's length, on an empty cache) or an
        incremental step (`t = 1`): the new tokens sit at positions
        `cache.length .. cache.length + t - 1`.

        Equal, at every new position, to `__call__` on the whole sequence so
        far, within float32 rounding; S is the max of the logit entering the
        softmax over the new queries only, per layer and head. Pure: state in,
        state out, usable under `jax.jit` and `jax.lax.scan`.

        **Arguments:**

        - `tokens`: the new tokens.
        - `cache`: from `init_cache` or an earlier call.

        **Returns:**

        `(logits, S, cache)`: float32 logits of the new positions, S
        [layers, heads], and the cache with the new tokens written.

        **Raises:**

        `ValueError` when `cache` is not one of this model's (see
        [`qkclip_eqx.Transformer.init_cache`][]).
        """
        kind = MLACache if isinstance(self.config.attention, MLAConfig) else KVCache
        first = cache.c_kv if isinstance(cache, MLACache) else cache.k
        rank = 3 if kind is MLACache else 4
        if (
            not isinstance(cache, kind)
            or first.ndim != rank
            or first.shape[0] != self.config.n_layers
        ):
            raise ValueError(
                f"expected a {kind.__name__} with a leading layer axis of {self.config.n_layers} "
                f"(from Transformer.init_cache) for {type(self.config.attention).__name__} "
                f"attention; got a {type(cache).__name__} of shapes "
                f"{[a.shape for a in jax.tree.leaves(cache)]}"
            )
        length = cache.length
        # every array but `length` is per layer: scan over them, `length` shared
        layers = eqx.tree_at(lambda c: c.length, cache, None)
        k = self.config.n_dense_layers

        def run(stacked, x, layer_caches):
            params, static = eqx.partition(stacked, eqx.is_array)

            def layer(x, xs):
                block_params, layer_cache = xs
                block = eqx.combine(block_params, static)
                layer_cache = eqx.tree_at(
                    lambda c: c.length, layer_cache, length, is_leaf=lambda v: v is None
                )
                x, max_logits, new = block.decode(x, layer_cache)
                return x, (max_logits, eqx.tree_at(lambda c: c.length, new, None))

            return jax.lax.scan(layer, x, (params, layer_caches))

        compute = jnp.dtype(self.config.compute_dtype)
        x = self.embed[tokens].astype(compute)
        x, (max_logits, new) = run(self.blocks, x, jax.tree.map(lambda a: a[:k], layers))
        if self.moe_blocks is not None:
            x, (moe_logits, moe_new) = run(
                self.moe_blocks, x, jax.tree.map(lambda a: a[k:], layers)
            )
            max_logits = jnp.concatenate([max_logits, moe_logits])
            new = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), new, moe_new)
        logits = linear(self.final_norm(x), self.lm_head.astype(compute), out_dtype=jnp.float32)
        new = eqx.tree_at(
            lambda c: c.length, new, length + tokens.shape[0], is_leaf=lambda v: v is None
        )
        return logits, max_logits, new
