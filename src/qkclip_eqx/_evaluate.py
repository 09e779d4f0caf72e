"""Evaluation of a run's model on its validation split, and S as a table."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array

from ._data import TokenData, eval_batches
from ._model import Transformer
from ._parallel import place_batch, shard_loss, to_host
from ._run_config import RunConfig
from ._step import next_token_loss, split_aux

_eval_loss = eqx.filter_jit(next_token_loss)  # one compile for every evaluation


@eqx.filter_jit
def _sharded_eval_loss(model: Transformer, tokens: Array, mesh: Mesh):
    return shard_loss(next_token_loss, mesh)(model, tokens)


def evaluate(
    model: Transformer, data: TokenData, cfg: RunConfig, mesh: Mesh | None = None
) -> tuple[float, np.ndarray]:
    """Mean validation loss and S (max over the validation batches) per layer and
    head; on a mesh, by the same sharded loss as training.

    **Arguments:**

    - `model`: the [`qkclip_eqx.Transformer`][].
    - `data`: its `val` split is read by [`qkclip_eqx.eval_batches`][].
    - `cfg`: gives `batch_size`, `seq_len` and `eval_batches`.
    - `mesh`: the mesh the model is placed on, or None.

    **Returns:**

    `(loss, S)`: a float, and S `[layers, heads]`.
    """
    batches = eval_batches(
        data.val, batch_size=cfg.batch_size, seq_len=cfg.seq_len, max_batches=cfg.eval_batches
    )
    results = []
    for b in batches:  # dispatch every batch, then fetch: one host sync
        tokens = place_batch(b, mesh)
        results.append(
            _eval_loss(model, tokens) if mesh is None else _sharded_eval_loss(model, tokens, mesh)
        )
    losses, s = [], None
    for loss, aux in to_host(results):
        s_b, _ = split_aux(aux)  # a mixture-of-experts model's router statistics dropped
        losses.append(float(loss))
        s = s_b if s is None else np.maximum(s, s_b)
    return float(np.mean(losses)), np.asarray(s)


def marked_tau(cfg: RunConfig) -> float | None:
    """The tau whose excess `format_table` marks for a run: its tau in clip and
    in monitor mode (the heads a clip would act on), none when S is off."""
    return None if cfg.mode == "off" else cfg.tau


def format_table(max_logits: Any, tau: float | None = None) -> str:
    """S per layer (rows) and head (columns) as a text table; '*' marks S > tau."""
    s = np.asarray(max_logits, dtype=float)
    head = "layer " + " ".join(f"{f'h{h}':>8}" for h in range(s.shape[1]))
    rows = [head]
    for i, row in enumerate(s):
        cells = [f"{x:8.2f}" + ("*" if tau is not None and x > tau else " ") for x in row]
        rows.append(f"{i:5d} " + "".join(cells))
    return "\n".join(rows)
