"""Atomic, validated checkpoints of arbitrary training-state PyTrees.

A checkpoint file `ckpt_{step:08d}.eqx` is laid out as

```
QKCLIP-CKPT 1\\n                       <- fixed magic line
{"step": ..., "meta": {...}, ...}\\n  <- one JSON header line
<payload>                             <- `eqx.tree_serialise_leaves` bytes
```

The header records the caller's `meta` dictionary (run config, step, data position,
...), the payload's length and sha256, and a description (key path, kind, shape,
dtype) of every leaf that is stored in the payload. Loading validates all of these
before any array is materialised, so that a truncated, corrupt or mismatched
checkpoint is reported precisely rather than silently mis-loaded.

Which leaves are stored:

- JAX arrays (including new-style typed PRNG keys from `jax.random.key`, which are
  stored as `jax.random.key_data` and re-wrapped with the impl of the corresponding
  leaf of `like` on load; raw `uint32` keys are just arrays);
- NumPy arrays and NumPy scalars (at their own dtype, so also `float64`);
- Python `bool`/`int`/`float`/`complex` (as 64-bit NumPy values, so that e.g. a Python
  `float` round-trips exactly even without `jax_enable_x64`).

Every other leaf (e.g. the activation function of an `eqx.nn.MLP`) is not stored,
and is taken from `like` on load -- exactly as `eqx.tree_deserialise_leaves` does.
"""

import dataclasses
import hashlib
import io
import json
import math
import os
import pathlib
import re
import secrets
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree


_MAGIC = b"QKCLIP-CKPT 1\n"
_MAGIC_PREFIX = b"QKCLIP-CKPT "
_NAME_RE = re.compile(r"ckpt_(\d{8,})\.eqx")
_MAX_REPORTED_MISMATCHES = 10


class CheckpointError(ValueError):
    """Raised for every problem with a checkpoint file: not a checkpoint, malformed
    header, truncated or corrupt payload, a structure that does not match `like`, or
    metadata that does not match `expect_meta`. The message always names the file.
    """


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

        def _capture(k):
            out.append(jax.random.key_impl(k))

        jax.eval_shape(_capture, x)
        return out[0]
    return jax.random.key_impl(x)


def _key_data_like(x: Any) -> Any:
    """A typed key leaf -> its `uint32` key data (or a `ShapeDtypeStruct` thereof)."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.eval_shape(jax.random.key_data, x)
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


def _describe_leaves(tree: PyTree) -> list[dict[str, Any]]:
    """One JSON-able record per stored leaf, in serialisation order."""
    records = []
    for path, leaf in jtu.tree_flatten_with_path(tree)[0]:
        kind = _leaf_kind(leaf)
        if kind is None:
            continue
        record: dict[str, Any] = {"path": jtu.keystr(path), "kind": kind}
        if kind == "key":
            data = _key_data_like(leaf)
            record["shape"] = list(data.shape)
            record["dtype"] = str(data.dtype)
            record["impl"] = str(_key_impl(leaf))
        elif kind == "python":
            record["shape"] = []
            record["dtype"] = type(leaf).__name__
        else:
            record["shape"] = list(leaf.shape)
            record["dtype"] = str(leaf.dtype)
        records.append(record)
    return records


def _unwrap_keys(tree: PyTree) -> PyTree:
    return jtu.tree_map(lambda x: _key_data_like(x) if _is_typed_key(x) else x, tree)


#
# Payload (de)serialisation
#


def _serialise_leaf(f: io.IOBase, x: Any) -> None:
    kind = _leaf_kind(x)
    if kind in ("jax", "numpy", "python"):
        # `np.asarray` keeps each leaf's own dtype: 64-bit for Python scalars and NumPy
        # `float64`, and `ml_dtypes` types (stored as raw bytes, viewed back on load).
        np.save(f, np.asarray(x), allow_pickle=False)
    elif kind is not None:
        raise AssertionError(f"Unexpected leaf kind {kind} at serialisation time.")


def _deserialise_leaf(f: io.IOBase, x: Any) -> Any:
    kind = _leaf_kind(x)
    if kind is None:
        return x
    out = np.load(f, allow_pickle=False)
    if kind == "python":
        return type(x)(out.item())
    if out.dtype != x.dtype and out.dtype.kind == "V":
        # `bfloat16`, `float8_*`, ... are written by `np.save` as opaque void bytes.
        out = out.view(x.dtype)
    if kind == "jax":
        return jnp.asarray(out)
    if isinstance(x, np.generic):
        return out[()]
    return out


def _rewrap_and_place(loaded: Any, like: Any) -> Any:
    """Re-wrap typed keys with `like`'s impl; put arrays on `like`'s sharding."""
    if _is_typed_key(like):
        loaded = jax.random.wrap_key_data(loaded, impl=_key_impl(like))
    if isinstance(like, jax.Array):
        if getattr(like, "committed", False):
            loaded = jax.device_put(loaded, like.sharding)
    elif isinstance(like, jax.ShapeDtypeStruct):
        if like.sharding is not None:
            loaded = jax.device_put(loaded, like.sharding)
    return loaded


#
# Header
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
    """What `x` becomes after a round trip through the header (tuples -> lists...)."""
    return json.loads(json.dumps(x, default=_json_default))


def _read_header(f: io.IOBase, path: pathlib.Path) -> tuple[dict[str, Any], int]:
    """Validates the magic line and parses the JSON header.

    Returns the header and the byte offset at which the payload starts.
    """
    magic = f.read(len(_MAGIC))
    if magic != _MAGIC:
        if magic.startswith(_MAGIC_PREFIX) and magic.endswith(b"\n"):
            version = magic[len(_MAGIC_PREFIX) : -1].decode("ascii", "replace")
            raise CheckpointError(
                f"{path}: unsupported qkclip checkpoint format version {version!r} "
                f"(this code reads version 1)."
            )
        raise CheckpointError(
            f"{path}: not a qkclip checkpoint (bad magic: expected {_MAGIC!r}, found "
            f"{magic!r})."
        )
    line = f.readline()
    if not line.endswith(b"\n"):
        raise CheckpointError(
            f"{path}: truncated checkpoint: the file ends inside the JSON header "
            f"({len(line)} header bytes, no terminating newline)."
        )
    try:
        header = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: checkpoint header is not valid JSON: {e}.") from e
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: malformed checkpoint header: expected a JSON object, got "
            f"{type(header).__name__}."
        )
    expected_types = {
        "step": int,
        "meta": dict,
        "payload_bytes": int,
        "payload_sha256": str,
        "leaves": list,
    }
    for name, type_ in expected_types.items():
        if not isinstance(header.get(name), type_) or isinstance(
            header.get(name), bool
        ):
            raise CheckpointError(
                f"{path}: malformed checkpoint header: field {name!r} is missing or "
                f"not of type {type_.__name__} (got {header.get(name)!r})."
            )
    return header, len(_MAGIC) + len(line)


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


def _meta_diffs(expected: dict, stored: dict, prefix: str) -> list[str]:
    diffs = []
    for key, want in expected.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if key not in stored:
            diffs.append(
                f"{name}: expected {want!r}, but the checkpoint has no such field"
            )
            continue
        have = stored[key]
        if isinstance(want, dict) and isinstance(have, dict):
            diffs.extend(_meta_diffs(want, have, name))
        elif not _json_equal(want, have):
            diffs.append(f"{name}: checkpoint has {have!r}, expected {want!r}")
    return diffs


def _format_record(record: dict[str, Any]) -> str:
    shape = tuple(record.get("shape", ()))
    out = f"{record.get('kind')} shape={shape} dtype={record.get('dtype')}"
    if record.get("kind") == "key":
        out += f" impl={record.get('impl')}"
    return out


def _structure_diffs(stored: list[Any], wanted: list[dict[str, Any]]) -> list[str]:
    if len(stored) != len(wanted):
        diffs = [
            f"different number of stored leaves: checkpoint has {len(stored)}, `like` "
            f"has {len(wanted)}"
        ]
        for i, (s, w) in enumerate(zip(stored, wanted)):
            if not isinstance(s, dict) or s.get("path") != w["path"]:
                have = s.get("path") if isinstance(s, dict) else s
                diffs.append(
                    f"first differing leaf is #{i}: checkpoint {have!r}, `like` "
                    f"{w['path']!r}"
                )
                break
        else:
            if len(stored) > len(wanted):
                extra = stored[len(wanted)]
                extra = extra.get("path") if isinstance(extra, dict) else extra
                diffs.append(f"first extra leaf (in the checkpoint) is {extra!r}")
            else:
                extra = wanted[len(stored)]["path"]
                diffs.append(f"first extra leaf (in `like`) is {extra!r}")
        return diffs
    diffs = []
    for i, (s, w) in enumerate(zip(stored, wanted)):
        if not isinstance(s, dict):
            diffs.append(f"leaf #{i}: malformed record {s!r}")
        elif s.get("path") != w["path"]:
            diffs.append(
                f"leaf #{i}: key path differs: checkpoint {s.get('path')!r}, `like` "
                f"{w['path']!r}"
            )
        elif _format_record(s) != _format_record(w):
            diffs.append(
                f"leaf {w['path']}: checkpoint has {_format_record(s)}, `like` has "
                f"{_format_record(w)}"
            )
    return diffs


#
# Files and directories
#


def _step_of(path: pathlib.Path) -> int | None:
    match = _NAME_RE.fullmatch(path.name)
    return None if match is None else int(match.group(1))


def _list_checkpoints(directory: pathlib.Path) -> list[tuple[int, pathlib.Path]]:
    """All `ckpt_XXXXXXXX.eqx` regular files, sorted by step (oldest first)."""
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        step = _step_of(entry)
        if step is not None and entry.is_file():
            found.append((step, entry))
    return sorted(found)


def _fsync_directory(directory: pathlib.Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows, where directories cannot be opened.
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#
# Public API
#


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    state: PyTree,
    *,
    meta: dict,
    keep: int = 3,
) -> pathlib.Path:
    """Atomically writes `state` to `directory/ckpt_{step:08d}.eqx`, then deletes all
    but the newest `keep` checkpoints in `directory`.

    **Arguments:**

    - `directory`: where to write; created (with parents) if needed.
    - `step`: the training step, used in the file name. Must be non-negative.
    - `state`: any PyTree: Equinox modules, optax states, Python scalars, raw or typed
        PRNG keys, ... See the module docstring for which leaves are stored.
    - `meta`: JSON-able metadata (run config, step, data position, ...), stored in the
        header verbatim and returned by `read_meta` / `load_checkpoint`.
    - `keep`: how many checkpoints (by step number) to keep in `directory`. The file
        just written is never deleted, even when older than `keep` others.

    **Returns:**

    The path of the written checkpoint.

    **Raises:**

    `TypeError` if `meta` is not JSON-serialisable, `ValueError` for a negative `step`
    or `keep < 1`, `OSError` if writing fails (in which case no partial file is left
    under a checkpoint name, and the temporary file is removed).
    """
    if step < 0:
        raise ValueError(f"`step` must be non-negative, got {step}.")
    if keep < 1:
        raise ValueError(f"`keep` must be at least 1, got {keep}.")
    directory = pathlib.Path(directory)
    final = directory / f"ckpt_{step:08d}.eqx"

    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, _unwrap_keys(state), filter_spec=_serialise_leaf)
    payload = buffer.getbuffer()
    header = {
        "step": step,
        "meta": meta,
        "payload_bytes": payload.nbytes,
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "leaves": _describe_leaves(state),
    }
    # One line: `json.dumps` without `indent` never emits a raw newline.
    header_line = json.dumps(header, default=_json_default).encode("utf-8") + b"\n"

    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{final.name}.{secrets.token_hex(8)}.tmp"
    # `O_EXCL` with mode 0o666 gives the usual umask-respecting permissions.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC)
            f.write(header_line)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_directory(directory)

    checkpoints = _list_checkpoints(directory)
    for _, old in checkpoints[: max(len(checkpoints) - keep, 0)]:
        if old.name != final.name:
            try:
                old.unlink()
            except FileNotFoundError:
                pass
    return final


def latest_checkpoint(directory: str | os.PathLike) -> pathlib.Path | None:
    """The checkpoint in `directory` with the highest step, or `None` if there is none
    (or `directory` does not exist). Temporary files left by an interrupted
    `save_checkpoint`, and any other files, are ignored. The file is not validated.
    """
    checkpoints = _list_checkpoints(pathlib.Path(directory))
    return checkpoints[-1][1] if checkpoints else None


def read_meta(path: str | os.PathLike) -> dict:
    """The `meta` dictionary stored in a checkpoint's header, without reading the
    payload.

    **Raises:**

    `CheckpointError` if `path` is not a qkclip checkpoint or its header is malformed.
    """
    path = pathlib.Path(path)
    with open(path, "rb") as f:
        header, _ = _read_header(f, path)
    return header["meta"]


def load_checkpoint(
    path: str | os.PathLike,
    like: PyTree,
    *,
    expect_meta: dict | None = None,
) -> tuple[PyTree, dict]:
    """Validates and loads a checkpoint written by `save_checkpoint`.

    **Arguments:**

    - `path`: the checkpoint file.
    - `like`: a PyTree with the structure, shapes and dtypes of the saved state, e.g.
        a freshly initialised state or `eqx.filter_eval_shape(init_state, ...)`.
        Leaves that are not stored (functions, ...) are taken from `like`. Typed PRNG
        keys are re-wrapped with the impl of `like`'s key. Arrays are placed on the
        sharding of the corresponding `like` leaf when that leaf is a committed array,
        or a `ShapeDtypeStruct` with a sharding.
    - `expect_meta`: if given, every key in it must equal the stored meta (recursively
        into nested dictionaries; only keys present in `expect_meta` are compared).

    **Returns:**

    A 2-tuple `(state, meta)`; `state` is bit-identical to what was saved.

    **Raises:**

    `CheckpointError`, with a message naming the file and the problem, if: the file is
    not a qkclip checkpoint; its header is not valid JSON; it is truncated; its payload
    is corrupt (checksum mismatch); `expect_meta` does not match (each differing field
    is named with both values); or its structure does not match `like` (different
    number of stored leaves, or a leaf whose key path, shape or dtype differs).
    """
    path = pathlib.Path(path)
    with open(path, "rb") as f:
        header, offset = _read_header(f, path)
        recorded = header["payload_bytes"]
        actual = os.fstat(f.fileno()).st_size - offset
        if actual < recorded:
            raise CheckpointError(
                f"{path}: truncated checkpoint: payload has {actual} bytes but the "
                f"header records {recorded} bytes."
            )
        if actual > recorded:
            raise CheckpointError(
                f"{path}: corrupt checkpoint: payload has {actual} bytes but the "
                f"header records {recorded} bytes ({actual - recorded} trailing bytes)."
            )

        if expect_meta is not None:
            diffs = _meta_diffs(_to_json_value(expect_meta), header["meta"], "")
            if diffs:
                raise CheckpointError(
                    f"{path}: checkpoint is from a different run/config; meta "
                    "mismatch:\n  " + "\n  ".join(diffs)
                )

        diffs = _structure_diffs(header["leaves"], _describe_leaves(like))
        if diffs:
            shown = diffs[:_MAX_REPORTED_MISMATCHES]
            if len(diffs) > len(shown):
                shown.append(f"... and {len(diffs) - len(shown)} more")
            raise CheckpointError(
                f"{path}: checkpoint structure does not match `like`:\n  "
                + "\n  ".join(shown)
            )

        payload = f.read(recorded)
    if len(payload) != recorded:  # The file shrank under us.
        raise CheckpointError(
            f"{path}: truncated checkpoint: payload has {len(payload)} bytes but the "
            f"header records {recorded} bytes."
        )
    digest = hashlib.sha256(payload).hexdigest()
    if digest != header["payload_sha256"]:
        raise CheckpointError(
            f"{path}: corrupt checkpoint: payload sha256 checksum mismatch (header "
            f"records {header['payload_sha256']}, payload hashes to {digest})."
        )

    buffer = io.BytesIO(payload)
    try:
        loaded = eqx.tree_deserialise_leaves(
            buffer, _unwrap_keys(like), filter_spec=_deserialise_leaf
        )
    except Exception as e:
        msg = f"{path}: payload does not deserialise into `like`: {e}"
        raise CheckpointError(msg) from e
    if buffer.tell() != recorded:
        raise CheckpointError(
            f"{path}: payload does not match its header: read {buffer.tell()} of "
            f"{recorded} payload bytes."
        )
    state = jtu.tree_map(_rewrap_and_place, loaded, like)
    return state, header["meta"]
