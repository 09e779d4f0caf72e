"""Sharded, atomic, validated checkpoints of training-state PyTrees, on Orbax.

A checkpoint is a directory `ckpt_{step:08d}` written by `orbax-checkpoint`'s
`CheckpointManager` with two items:

- `state`: every stored leaf of the PyTree, as arrays. Each process writes the
  shards it holds (no gather to one host); a restore places each array on the
  sharding asked for, so a checkpoint written on one mesh loads on any other.
- `meta`: JSON: the caller's `meta` (run config, step, ...), a description (key
  path, kind, shape, dtype) of every stored leaf, and a 32-bit fingerprint of
  each leaf's bits. Loading checks the structure against `like` before any
  array is read, and the fingerprints after, so a truncated, corrupt or
  mismatched checkpoint is reported precisely rather than silently mis-loaded.

Orbax writes into a temporary directory and renames it when every process has
finished, so a crash (even `kill -9`) mid-save leaves the previous checkpoints
intact and no directory under a checkpoint name.

Which leaves are stored: JAX arrays (new-style typed PRNG keys as their
`jax.random.key_data`, re-wrapped with `like`'s impl on load), NumPy arrays and
scalars, and Python `bool`/`int`/`float`/`complex` (as 64-bit NumPy values).
Every other leaf (e.g. an activation function) is taken from `like` on load,
as `eqx.tree_deserialise_leaves` does.

The module runs past 500 lines because the writer and the reader share one
format: how a leaf is stored, described and fingerprinted is defined once here
and used by both, so that a change to it cannot reach one side only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import pathlib
import re
import shutil
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

_FORMAT = "qkclip-ckpt 2"
_NAME_RE = re.compile(r"ckpt_(\d{8,})")
_MAX_REPORTED_MISMATCHES = 10


class CheckpointError(ValueError):
    """Every problem with a checkpoint: not a checkpoint, unreadable or corrupt,
    a structure that does not match `like`, or metadata that does not match
    `expect_meta`. The message always names the checkpoint."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint is readable but belongs to another run: its metadata or
    its structure differs from what was asked for. An older checkpoint of the
    same run would differ the same way, so resume does not fall back."""


def _ocp():
    import orbax.checkpoint as ocp  # imported on first use: a few seconds

    return ocp


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


def _leaf_kind(x: Any) -> str | None:
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


def _stored(tree: PyTree) -> list[tuple[str, str, Any]]:
    """(key path, kind, leaf) of every stored leaf, in flattening order."""
    out = []
    for path, leaf in jtu.tree_flatten_with_path(tree)[0]:
        kind = _leaf_kind(leaf)
        if kind is not None:
            out.append((jtu.keystr(path), kind, leaf))
    return out


def _record(path: str, kind: str, leaf: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"path": path, "kind": kind}
    if kind == "key":
        data = _key_data_like(leaf)
        record.update(shape=list(data.shape), dtype=str(data.dtype), impl=str(_key_impl(leaf)))
    elif kind == "python":
        record.update(shape=[], dtype=type(leaf).__name__)
    else:
        record.update(shape=list(leaf.shape), dtype=str(leaf.dtype))
    return record


def _array_of(kind: str, leaf: Any) -> Any:
    """What Orbax stores for a leaf: a JAX array (sharded as it is) or NumPy."""
    if kind == "key":
        return jax.random.key_data(leaf)
    if kind == "jax":
        return leaf
    return np.asarray(leaf)


def _target_of(kind: str, leaf: Any) -> Any:
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


def _from_array(kind: str, like: Any, x: Any) -> Any:
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


def _fingerprint_all(arrays: list[Any]) -> list[str]:
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


def _to_json_value(x: Any) -> Any:
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


def _structure_diffs(stored: list[Any], wanted: list[dict[str, Any]]) -> list[str]:
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


#
# Directories
#


def _step_of(path: pathlib.Path) -> int | None:
    match = _NAME_RE.fullmatch(path.name)
    return None if match is None else int(match.group(1))


def list_checkpoints(directory: str | os.PathLike) -> list[pathlib.Path]:
    """The finished checkpoints `ckpt_XXXXXXXX` in `directory`, oldest first.
    Orbax's temporary directories (an interrupted save) and any other files are
    ignored; nothing is validated."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    found = [(_step_of(p), p) for p in directory.iterdir() if p.is_dir()]
    return [p for s, p in sorted((s, p) for s, p in found if s is not None)]


def latest_checkpoint(directory: str | os.PathLike) -> pathlib.Path | None:
    """The checkpoint in `directory` with the highest step, or `None` if there
    is none (or `directory` does not exist). Not validated: see
    `load_latest_checkpoint` for a restore that falls back to older ones."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def _manager_options(keep: int, async_save: bool) -> Any:
    ocp = _ocp()
    return ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        step_prefix="ckpt",
        step_format_fixed_length=8,
        enable_async_checkpointing=async_save,
    )


class Checkpointer:
    """Writes `ckpt_{step:08d}` checkpoints into one directory, keeping the
    newest `keep`. Every process of a multi-process run must make the same calls
    (each writes its own shards).

    With `async_save=True`, `save` returns once the arrays are copied off the
    devices, and the files are written while training continues; `wait` (or the
    next `save`, or `close`) waits for the write to finish.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"`keep` must be at least 1, got {keep}.")
        self.directory = pathlib.Path(directory).absolute()
        self._manager = _ocp().CheckpointManager(
            self.directory, options=_manager_options(keep, async_save), item_names=("state", "meta")
        )

    def save(self, step: int, state: PyTree, *, meta: dict) -> pathlib.Path:
        """Starts writing `state` (any PyTree: see the module docstring for which
        leaves are stored) with the JSON-able `meta`, as the checkpoint of `step`.

        **Arguments:**

        - `step`: the training step, in the directory's name; non-negative.
        - `state`: the PyTree to store.
        - `meta`: JSON-able metadata, returned by `read_meta` / `load_checkpoint`.

        **Returns:**

        The path the checkpoint will have once written.
        """
        if step < 0:
            raise ValueError(f"`step` must be non-negative, got {step}.")
        ocp = _ocp()
        stored = _stored(state)
        arrays = [_array_of(kind, leaf) for _, kind, leaf in stored]
        header = {
            "format": _FORMAT,
            "step": step,
            "meta": _to_json_value(meta),
            "leaves": [_record(*s) for s in stored],
            "fingerprints": _fingerprint_all(arrays),
        }
        items = {f"leaf_{i:05d}": a for i, a in enumerate(arrays)}
        path = self.directory / f"ckpt_{step:08d}"
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(items), meta=ocp.args.JsonSave(header)
            ),
            force=True,
        )
        return path

    def wait(self) -> None:
        """Blocks until the last `save` is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save_checkpoint(
    directory: str | os.PathLike, step: int, state: PyTree, *, meta: dict, keep: int = 3
) -> pathlib.Path:
    """Writes `state` as `directory/ckpt_{step:08d}` and waits until it is on
    disk, keeping the newest `keep` checkpoints (see `Checkpointer`).

    **Arguments:**

    - `directory`: where to write; created if needed.
    - `step`: the training step, non-negative.
    - `state`: any PyTree (see the module docstring for which leaves are stored).
    - `meta`: JSON-able metadata.
    - `keep`: how many checkpoints (by step) to keep.

    **Returns:**

    The path of the written checkpoint.
    """
    _to_json_value(meta)  # a TypeError now, not in a background thread
    with Checkpointer(directory, keep=keep, async_save=False) as ckpt:
        path = ckpt.save(step, state, meta=meta)
        ckpt.wait()
    return path


def _short(e: BaseException) -> str:
    """An exception in at most 300 characters (TensorStore's carry their whole spec)."""
    text = f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _drop_failed_tensorstore_futures(record: logging.LogRecord) -> bool:
    """asyncio's "Future exception was never retrieved" for a TensorStore read
    of a failed restore (each carries its whole spec)."""
    return "tensorstore_spec" not in record.getMessage()


_STRAGGLERS_QUIET_S = 0.1  # a failed restore's late callbacks come within ms of each other
_STRAGGLERS_MAX_S = 2.0


@contextlib.contextmanager
def _quiet_failed_reads() -> Iterator[None]:
    """Orbax's noise around a restore, dropped while this is open: the "Event
    loop is closed" errors of TensorStore callbacks that arrive after Orbax
    closed the event loop of a failed restore, asyncio's log of the failed
    reads, and the warnings about their coroutines that never ran. Every other
    unraisable exception still reaches the `sys.unraisablehook` in place
    before, every other record the asyncio log, every other warning its
    filters; all are as they were on exit.

    When the body raises, the exit waits until no late callback has come for
    `_STRAGGLERS_QUIET_S` (at most `_STRAGGLERS_MAX_S`), then lets go of the
    failed reads and collects them, so that their noise comes while it is open."""
    previous = sys.unraisablehook
    logger = logging.getLogger("asyncio")
    last = [0.0]  # when the latest late callback came

    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            last[0] = time.monotonic()
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    logger.addFilter(_drop_failed_tensorstore_futures)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
            try:
                yield
            except BaseException as e:
                start = last[0] = time.monotonic()
                while time.monotonic() - last[0] < _STRAGGLERS_QUIET_S:
                    if time.monotonic() - start > _STRAGGLERS_MAX_S:
                        break
                    time.sleep(_STRAGGLERS_QUIET_S / 10)
                # The traceback's frames and the late callbacks held one failed
                # future per array, which asyncio logs when it is collected.
                traceback.clear_frames(e.__traceback__)
                gc.collect()
                raise
    finally:
        logger.removeFilter(_drop_failed_tensorstore_futures)
        if sys.unraisablehook is hook:  # unless the program replaced it meanwhile
            sys.unraisablehook = previous


def _restore(path: pathlib.Path, **items: Any) -> Any:
    """Orbax's restore of some items of the checkpoint directory `path`."""
    ocp = _ocp()
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    with _quiet_failed_reads():
        try:
            return checkpointer.restore(path.absolute(), args=ocp.args.Composite(**items))
        finally:
            checkpointer.close()


def _read_header(path: pathlib.Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint.")
    if not path.is_dir() or not (path / "meta").is_dir() or not (path / "state").is_dir():
        raise CheckpointError(
            f"{path}: not a qkclip checkpoint (expected a directory ckpt_XXXXXXXX holding "
            "the Orbax items 'state' and 'meta')."
        )
    ocp = _ocp()
    try:
        header = _restore(path, meta=ocp.args.JsonRestore()).meta
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata: {_short(e)}") from e
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise CheckpointError(
            f"{path}: not a qkclip checkpoint (format {found!r}, expected {_FORMAT!r})."
        )
    for name, type_ in {"step": int, "meta": dict, "leaves": list, "fingerprints": list}.items():
        if not isinstance(header.get(name), type_) or isinstance(header.get(name), bool):
            raise CheckpointError(
                f"{path}: malformed checkpoint metadata: field {name!r} is missing or not of "
                f"type {type_.__name__} (got {header.get(name)!r})."
            )
    return header


def read_meta(path: str | os.PathLike) -> dict:
    """The `meta` dictionary stored with a checkpoint, without reading arrays.

    **Raises:**

    `CheckpointError` if `path` is not a qkclip checkpoint or its metadata is malformed.
    """
    return _read_header(pathlib.Path(path))["meta"]


def load_checkpoint(
    path: str | os.PathLike, like: PyTree, *, expect_meta: dict | None = None
) -> tuple[PyTree, dict]:
    """Validates and loads a checkpoint written by `Checkpointer.save`.

    **Arguments:**

    - `path`: the checkpoint directory `ckpt_XXXXXXXX`.
    - `like`: a PyTree with the structure, shapes and dtypes of the saved state,
        e.g. a fresh state or `eqx.filter_eval_shape(init, ...)`. Arrays are placed
        on the sharding of `like`'s leaf (a committed array, or a
        `ShapeDtypeStruct` with a sharding), whatever mesh wrote them; leaves
        that are not stored come from `like`.
    - `expect_meta`: if given, every key in it must equal the stored meta
        (recursively; keys absent from `expect_meta` are not compared).

    **Returns:**

    `(state, meta)`; `state` is bit-identical to what was saved.

    **Raises:**

    `CheckpointMismatchError` (a `CheckpointError`) when `expect_meta` or the
    structure differ, each differing field named with both values;
    `CheckpointError` when `path` is not a checkpoint, or is unreadable,
    truncated or corrupt (a leaf whose bits differ from the saved fingerprint).
    """
    path = pathlib.Path(path)
    header = _read_header(path)
    if expect_meta is not None:
        diffs = meta_diffs(_to_json_value(expect_meta), header["meta"])
        if diffs:
            raise CheckpointMismatchError(
                f"{path}: checkpoint is from a different run/config; meta mismatch:\n  "
                + "\n  ".join(diffs)
            )
    stored = _stored(like)
    diffs = _structure_diffs(header["leaves"], [_record(*s) for s in stored])
    if diffs:
        shown = diffs[:_MAX_REPORTED_MISMATCHES]
        if len(diffs) > len(shown):
            shown.append(f"... and {len(diffs) - len(shown)} more")
        raise CheckpointMismatchError(
            f"{path}: checkpoint structure does not match `like`:\n  " + "\n  ".join(shown)
        )
    ocp = _ocp()
    targets = {f"leaf_{i:05d}": _target_of(kind, leaf) for i, (_, kind, leaf) in enumerate(stored)}
    try:
        items = _restore(path, state=ocp.args.StandardRestore(targets)).state
        arrays = [items[f"leaf_{i:05d}"] for i in range(len(stored))]
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint: {_short(e)}") from e
    fingerprints = _fingerprint_all(arrays)
    for (leaf_path, _, _), have, want in zip(stored, fingerprints, header["fingerprints"]):
        if have != want:
            raise CheckpointError(
                f"{path}: corrupt checkpoint: leaf {leaf_path} does not match its saved "
                f"fingerprint ({have}, saved {want})."
            )
    values = iter(_from_array(kind, leaf, a) for (_, kind, leaf), a in zip(stored, arrays))
    leaves, treedef = jtu.tree_flatten(like)
    state = jtu.tree_unflatten(
        treedef, [next(values) if _leaf_kind(x) is not None else x for x in leaves]
    )
    return state, header["meta"]


def load_latest_checkpoint(
    directory: str | os.PathLike,
    like: PyTree,
    *,
    expect_meta: dict | None = None,
    warn: Callable[[str], None] = print,
) -> tuple[PyTree, dict, pathlib.Path] | None:
    """The newest checkpoint in `directory` that restores, falling back to older
    ones: each that fails is reported through `warn`, naming it, why, and the one
    tried next.

    **Arguments:**

    - `directory`: the directory holding `ckpt_XXXXXXXX` checkpoints.
    - `like`, `expect_meta`: as for `load_checkpoint`.
    - `warn`: called with one message per checkpoint that could not be used.

    **Returns:**

    `(state, meta, path)`, or `None` if `directory` holds no checkpoint.

    **Raises:**

    `CheckpointMismatchError` at once when a checkpoint is of another run (an
    older one would be too); `CheckpointError` naming every failure when none
    restores.
    """
    found = list_checkpoints(directory)[::-1]
    failures = []
    for i, path in enumerate(found):
        try:
            state, meta = load_checkpoint(path, like, expect_meta=expect_meta)
        except CheckpointMismatchError:
            raise
        except CheckpointError as e:
            failures.append(str(e))
            nxt = (
                f"trying the older {found[i + 1].name}"
                if i + 1 < len(found)
                else "no older checkpoint is left"
            )
            warn(f"checkpoint {path.name} failed to restore ({e}); {nxt}")
            continue
        return state, meta, path
    if failures:
        raise CheckpointError(f"{directory}: no checkpoint restores:\n  " + "\n  ".join(failures))
    return None


def set_aside(path: str | os.PathLike) -> pathlib.Path:
    """Renames an unusable checkpoint `ckpt_X` to `ckpt_X.unusable` (numbered if
    taken), keeping it for inspection and freeing its step for a new save."""
    path = pathlib.Path(path)
    for n in range(1000):
        dest = path.with_name(f"{path.name}.unusable" + (f"{n}" if n else ""))
        if not dest.exists():
            shutil.move(path, dest)
            return dest
    raise CheckpointError(f"{path}: too many set-aside copies next to it")
