"""The training scenario every mesh must reproduce (shared by the in-process
and the two-process tests): a small MLA (or GQA) Transformer, MuonClip, three
steps with QK-Clip active."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from qkclip_eqx import (
    GQAConfig,
    MLAConfig,
    Transformer,
    TransformerConfig,
    make_train_step,
    muon_adamw,
    shard_batch,
    shard_train_state,
)

TAU = 3.0
STEPS = 3


def config(attention: str = "mla") -> TransformerConfig:
    if attention == "mla":
        attn = MLAConfig(
            dim=32,
            n_heads=4,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=8,
        )
    else:
        attn = GQAConfig(dim=32, n_heads=4, n_kv_heads=2, head_dim=8)
    return TransformerConfig(vocab_size=64, n_layers=2, mlp_hidden=64, attention=attn)


def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 64, size=(STEPS, 8, 17), dtype=np.int32)


def run_scenario(mesh=None, attention: str = "mla"):
    """Returns (parameter leaves as host arrays, metrics stacked over steps).

    Every process passes the whole batch to ``shard_batch``."""
    model = Transformer(config(attention), key=jax.random.key(0))
    opt = muon_adamw(1e-2)
    opt_state = opt.init(eqx.filter(model, eqx.is_array))
    if mesh is not None:
        model, opt_state = shard_train_state(model, opt_state, opt, mesh)
    step = make_train_step(opt, tau=TAU, mesh=mesh)
    history = {"loss": [], "grad_norm": [], "max_logits": [], "heads_clipped": []}
    for batch in tokens():
        batch = jnp.asarray(batch) if mesh is None else shard_batch(batch, mesh)
        model, opt_state, m = step(model, opt_state, batch)
        for k in history:
            history[k].append(_host(m[k]))
    params = [_host(x) for x in jax.tree.leaves(eqx.filter(model, eqx.is_array))]
    return params, {k: np.stack(v) for k, v in history.items()}


def _host(x) -> np.ndarray:
    """A host copy; for arrays spanning processes, gathered (a collective:
    every process calls this in the same order)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
