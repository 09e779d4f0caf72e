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

How a leaf is stored, described and fingerprinted, and how a restore compares
with `like`, is in `_checkpoint_format.py`; this module writes, finds, reads
and validates checkpoints with it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
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

import jax.tree_util as jtu
from jaxtyping import PyTree

from ._checkpoint_format import (
    array_of,
    fingerprint_all,
    from_array,
    leaf_kind,
    leaf_record,
    meta_diffs,
    stored_leaves,
    structure_diffs,
    target_of,
    to_json_value,
)

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
        stored = stored_leaves(state)
        arrays = [array_of(kind, leaf) for _, kind, leaf in stored]
        header = {
            "format": _FORMAT,
            "step": step,
            "meta": to_json_value(meta),
            "leaves": [leaf_record(*s) for s in stored],
            "fingerprints": fingerprint_all(arrays),
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
    to_json_value(meta)  # a TypeError now, not in a background thread
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
        diffs = meta_diffs(to_json_value(expect_meta), header["meta"])
        if diffs:
            raise CheckpointMismatchError(
                f"{path}: checkpoint is from a different run/config; meta mismatch:\n  "
                + "\n  ".join(diffs)
            )
    stored = stored_leaves(like)
    diffs = structure_diffs(header["leaves"], [leaf_record(*s) for s in stored])
    if diffs:
        shown = diffs[:_MAX_REPORTED_MISMATCHES]
        if len(diffs) > len(shown):
            shown.append(f"... and {len(diffs) - len(shown)} more")
        raise CheckpointMismatchError(
            f"{path}: checkpoint structure does not match `like`:\n  " + "\n  ".join(shown)
        )
    ocp = _ocp()
    targets = {f"leaf_{i:05d}": target_of(kind, leaf) for i, (_, kind, leaf) in enumerate(stored)}
    try:
        items = _restore(path, state=ocp.args.StandardRestore(targets)).state
        arrays = [items[f"leaf_{i:05d}"] for i in range(len(stored))]
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint: {_short(e)}") from e
    fingerprints = fingerprint_all(arrays)
    for (leaf_path, _, _), have, want in zip(stored, fingerprints, header["fingerprints"]):
        if have != want:
            raise CheckpointError(
                f"{path}: corrupt checkpoint: leaf {leaf_path} does not match its saved "
                f"fingerprint ({have}, saved {want})."
            )
    values = iter(from_array(kind, leaf, a) for (_, kind, leaf), a in zip(stored, arrays))
    leaves, treedef = jtu.tree_flatten(like)
    state = jtu.tree_unflatten(
        treedef, [next(values) if leaf_kind(x) is not None else x for x in leaves]
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
