"""How a checkpoint stores a PyTree (see `_checkpoint.py`): which leaves are
stored and as what, the record describing each, the fingerprint of each
leaf's bits, and the comparisons a restore makes against `like` and
`expect_meta`. The writer and the reader both take these from here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

#
# Leaf classification
#


def _is_typed_key(x: Any) -> bool:
    return isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) and jnp.issubdtype(
        x.dtype, jax.dtypes.prng_key
    )


def _key_impl(x: Any) -> Any:
    """The PRNG impl of a typed key array, or of a `ShapeDtypeStruct` of one."""
    if isinstance(x, jax.ShapeDtypeStruct):
        out = []
        jax.eval_shape(lambda k: out.append(jax.random.key_impl(k)), x)
        return out[0]
    return jax.random.key_impl(x)


def _key_data_like(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        data = jax.eval_shape(jax.random.key_data, x)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)
    return jax.random.key_data(x)


def leaf_kind(x: Any) -> str | None:
    """How a leaf is stored, or `None` if it is not stored (taken from `like`)."""
    if _is_typed_key(x):
        return "key"
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
        return "jax"
    if isinstance(x, (np.ndarray, np.generic)):
        return "numpy"
    if isinstance(x, (bool, int, float, complex)):
        return "python"
    return None


def stored_leaves(tree: PyTree) -> list[tuple[str, str, Any]]:
    """(key path, kind, leaf) of every stored leaf, in flattening order."""
    out = []
    for path, leaf in jtu.tree_flatten_with_path(tree)[0]:
        kind = leaf_kind(leaf)
        if kind is not None:
            out.append((jtu.keystr(path), kind, leaf))
    return out


def leaf_record(path: str, kind: str, leaf: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"path": path, "kind": kind}
    if kind == "key":
        data = _key_data_like(leaf)
        record.update(shape=list(data.shape), dtype=str(data.dtype), impl=str(_key_impl(leaf)))
    elif kind == "python":
        record.update(shape=[], dtype=type(leaf).__name__)
    else:
        record.update(shape=list(leaf.shape), dtype=str(leaf.dtype))
    return record


def array_of(kind: str, leaf: Any) -> Any:
    """What Orbax stores for a leaf: a JAX array (sharded as it is) or NumPy."""
    if kind == "key":
        return jax.random.key_data(leaf)
    if kind == "jax":
        return leaf
    return np.asarray(leaf)


def target_of(kind: str, leaf: Any) -> Any:
    """What Orbax restores a leaf as: a `ShapeDtypeStruct` on the sharding of
    `like`'s leaf (the default device when it has none), or a NumPy array."""
    if kind in ("jax", "key"):
        data = _key_data_like(leaf) if kind == "key" else leaf
        sharding = getattr(data, "sharding", None)
        if isinstance(leaf, jax.Array) and not getattr(leaf, "committed", True):
            sharding = None
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    return np.zeros(np.shape(leaf), np.asarray(leaf).dtype)


def from_array(kind: str, like: Any, x: Any) -> Any:
    if kind == "key":
        return jax.random.wrap_key_data(x, impl=_key_impl(like))
    if kind == "python":
        return type(like)(np.asarray(x).item())
    if kind == "numpy":
        x = np.asarray(x)
        return x[()] if isinstance(like, np.generic) else x
    return x


#
# Fingerprints: one uint32 per leaf, the same whatever the sharding
#


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 words (8-byte elements give two words)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size >= 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)


@jax.jit
def _fingerprints(leaves: list[jax.Array]) -> list[jax.Array]:
    """`sum_i w_i * (2 i + 1) mod 2^32` over the words `w_i` in row-major order:
    integer sums are exact in any order, so every mesh gives the same value, and
    any one flipped bit changes it."""
    out = []
    for x in leaves:
        w = _words(x)
        index = jnp.zeros(w.shape, jnp.uint32)
        stride = 1
        for d in reversed(range(w.ndim)):
            index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride)
            stride *= w.shape[d]
        out.append(jnp.sum(w * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32))
    return out


def fingerprint_all(arrays: list[Any]) -> list[str]:
    groups: dict[tuple[int, ...], list[int]] = {}  # one jit call per set of devices
    for i, a in enumerate(arrays):
        if isinstance(a, jax.Array):
            groups.setdefault(tuple(sorted(d.id for d in a.sharding.device_set)), []).append(i)
    fps: list[str] = [""] * len(arrays)
    for idx in groups.values():
        for i, fp in zip(idx, _fingerprints([arrays[i] for i in idx])):
            fps[i] = f"{int(np.asarray(fp.addressable_data(0))):08x}"
    for i, a in enumerate(arrays):
        if not isinstance(a, jax.Array):
            a = np.ascontiguousarray(a)
            fps[i] = hashlib.sha256(a.tobytes() + str(a.dtype).encode()).hexdigest()[:8]
    return fps


#
# Metadata
#


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    raise TypeError(
        f"Object of type {type(x).__name__} is not JSON serialisable: checkpoint "
        "`meta` must hold JSON-able values (dict/list/str/int/float/bool/None)."
    )


def to_json_value(x: Any) -> Any:
    """What `x` becomes after a round trip through JSON (tuples -> lists, ...)."""
    return json.loads(json.dumps(x, default=_json_default))


def _json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values, not conflating `True` with `1`; NaN equals NaN."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return a == b


def meta_diffs(expected: dict, stored: dict, prefix: str = "") -> list[str]:
    """One line per field of `expected` that `stored` lacks or holds otherwise
    (recursively into nested dictionaries), naming both values."""
    diffs = []
    for key, want in expected.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if key not in stored:
            diffs.append(f"{name}: expected {want!r}, but the checkpoint has no such field")
            continue
        have = stored[key]
        if isinstance(want, dict) and isinstance(have, dict):
            diffs.extend(meta_diffs(want, have, name))
        elif not _json_equal(want, have):
            diffs.append(f"{name}: checkpoint has {have!r}, expected {want!r}")
    return diffs


def _format_record(record: dict[str, Any]) -> str:
    out = f"{record.get('kind')} shape={tuple(record.get('shape', ()))} dtype={record.get('dtype')}"
    if record.get("kind") == "key":
        out += f" impl={record.get('impl')}"
    return out


def structure_diffs(stored: list[Any], wanted: list[dict[str, Any]]) -> list[str]:
    if len(stored) != len(wanted):
        diffs = [
            f"different number of stored leaves: checkpoint has {len(stored)}, `like` has {len(wanted)}"
        ]
        for i, (s, w) in enumerate(zip(stored, wanted)):
            if not isinstance(s, dict) or s.get("path") != w["path"]:
                have = s.get("path") if isinstance(s, dict) else s
                diffs.append(
                    f"first differing leaf is #{i}: checkpoint {have!r}, `like` {w['path']!r}"
                )
                break
        else:
            if len(stored) > len(wanted):
                extra = stored[len(wanted)]
                diffs.append(
                    f"first extra leaf (in the checkpoint) is {extra.get('path') if isinstance(extra, dict) else extra!r}"
                )
            else:
                diffs.append(f"first extra leaf (in `like`) is {wanted[len(stored)]['path']!r}")
        return diffs
    diffs = []
    for i, (s, w) in enumerate(zip(stored, wanted)):
        if not isinstance(s, dict):
            diffs.append(f"leaf #{i}: malformed record {s!r}")
        elif s.get("path") != w["path"]:
            diffs.append(
                f"leaf #{i}: key path differs: checkpoint {s.get('path')!r}, `like` {w['path']!r}"
            )
        elif _format_record(s) != _format_record(w):
            diffs.append(
                f"leaf {w['path']}: checkpoint has {_format_record(s)}, `like` has {_format_record(w)}"
            )
    return diffs
