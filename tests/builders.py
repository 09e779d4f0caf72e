"""Shared test helper: build modules fast."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np


def init_from_numpy(make, seed: int):
    """``make(key)``'s structure, filled from NumPy with the library's own init
    distribution: N(0, 1/fan_in) matrices, N(0, 1) embedding, unit norm gains.

    Building through ``eqx.filter_eval_shape`` avoids compiling a random-number
    kernel for every weight shape, which costs seconds per model on 2 cores."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        name = jtu.keystr(path)
        if "norm" in name:
            return jnp.ones(leaf.shape, leaf.dtype)
        scale = 1.0 if name.endswith(".embed") else 1.0 / math.sqrt(leaf.shape[-1])
        return jnp.asarray(rng.standard_normal(leaf.shape) * scale, leaf.dtype)

    return jtu.tree_map_with_path(fill, eqx.filter_eval_shape(make, jax.random.key(0)))
