"""The reproduction's corpus: one fixed list of standard-library files, the
same bytes on every supported Python.

``corpus_manifest.txt`` lists the ``*.py`` files of the standard library
(outside ``site-packages``) that are byte-identical in CPython 3.11.7, 3.12.1
and 3.13.0, each with its SHA-256 and size, and in its header the hash of the
whole corpus. :func:`load_corpus` reads those files from the running
interpreter's standard library, checks each file's hash, and returns byte
tokens split by file (a file is validation iff ``crc32(path) % 10000 < 500``,
as in ``qkclip_eqx.stdlib_corpus``). A file that is missing or differs is
left out, which changes the corpus hash: :func:`load_corpus` then warns on
stderr, and the pipeline prints the mismatch at the top of ``results.md``.
"""

from __future__ import annotations

import hashlib
import pathlib
import sys
import sysconfig
import warnings
import zlib
from collections.abc import Iterable

import numpy as np

import qkclip_eqx as qc

MANIFEST = pathlib.Path(__file__).resolve().parent / "corpus_manifest.txt"
VAL_PER_10000 = 500


class CorpusMismatchWarning(UserWarning):
    """The corpus read here is not the pre-registered one."""


def corpus_hash(entries: Iterable[tuple[str, bytes]]) -> str:
    """SHA-256 over ``path NUL size NUL bytes`` of each file, in order."""
    h = hashlib.sha256()
    for rel, data in entries:
        h.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()


def read_manifest(path: pathlib.Path = MANIFEST) -> tuple[str, list[tuple[str, int, str]]]:
    """``(expected corpus hash, [(sha256, size, relative path), ...])``."""
    expected, rows = "", []
    for line in path.read_text().splitlines():
        if line.startswith("# corpus-sha256:"):
            expected = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            sha, size, rel = line.split(" ", 2)
            rows.append((sha, int(size), rel))
    if not expected or not rows:
        raise ValueError(f"{path}: not a corpus manifest (no hash header or no files)")
    return expected, rows


def build_manifest(roots: list[pathlib.Path], path: pathlib.Path = MANIFEST) -> str:
    """Write the manifest: the ``*.py`` files (outside ``site-packages``)
    present and byte-identical under every root, sorted by path. Returns the
    corpus hash. Run once, by hand, with the standard-library roots of the
    interpreters the corpus must be identical on."""

    def files(root: pathlib.Path) -> set[str]:
        return {
            p.relative_to(root).as_posix()
            for p in root.rglob("*.py")
            if "site-packages" not in p.relative_to(root).parts and p.is_file()
        }

    common = sorted(set.intersection(*(files(r) for r in roots)))
    rows, entries = [], []
    for rel in common:
        blobs = [(r / rel).read_bytes() for r in roots]
        if all(b == blobs[0] for b in blobs[1:]):
            rows.append(f"{hashlib.sha256(blobs[0]).hexdigest()} {len(blobs[0])} {rel}")
            entries.append((rel, blobs[0]))
    h = corpus_hash(entries)
    header = [
        "# kimi_k2 corpus: *.py files byte-identical in the standard libraries of",
        *(f"#   {r.name} (stdlib directory name)" for r in roots),
        f"# files: {len(rows)}, bytes: {sum(len(b) for _, b in entries)}",
        f"# corpus-sha256: {h}",
    ]
    path.write_text("\n".join(header + rows) + "\n")
    return h


def load_corpus(
    root: str | pathlib.Path | None = None,
    *,
    max_bytes: int | None = None,
    manifest: pathlib.Path = MANIFEST,
) -> tuple[qc.TokenData, dict]:
    """The manifest's files, read from ``root`` (default: the running
    interpreter's standard library), as a :class:`qkclip_eqx.TokenData` of
    byte tokens; and a record ``{"sha256", "expected_sha256", "matches",
    "files", "bytes", "missing", "differing", "python"}`` for every run's
    config. ``max_bytes`` caps the train split (files in manifest order)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    expected, rows = read_manifest(manifest)
    entries, missing, differing = [], [], []
    for sha, size, rel in rows:
        p = root / rel
        if not p.is_file():
            missing.append(rel)
            continue
        data = p.read_bytes()
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
            differing.append(rel)
            continue
        entries.append((rel, data))
    h = corpus_hash(entries)
    record = {
        "sha256": h,
        "expected_sha256": expected,
        "matches": h == expected,
        "files": len(entries),
        "bytes": sum(len(b) for _, b in entries),
        "missing": missing,
        "differing": differing,
        "root": str(root),
        "python": sys.version.split()[0],
    }
    if not record["matches"]:
        warnings.warn(
            f"CORPUS MISMATCH: the corpus read from {root} has sha256 {h[:16]}..., not the "
            f"pre-registered {expected[:16]}... ({len(missing)} file(s) missing, {len(differing)} "
            "differing); results from it are not comparable with the committed ones.",
            CorpusMismatchWarning,
            stacklevel=2,
        )
    train, val = bytearray(), bytearray()
    for rel, data in entries:
        if zlib.crc32(rel.encode()) % 10_000 < VAL_PER_10000:
            val += data
        elif max_bytes is None or len(train) < max_bytes:
            train += data
    if max_bytes is not None:
        train = train[:max_bytes]
    if not train or not val:
        raise ValueError(f"{root}: the corpus has an empty train or val split")
    as_tokens = lambda b: np.frombuffer(bytes(b), np.uint8).astype(np.uint16)  # noqa: E731
    desc = (
        f"kimi_k2 corpus ({len(entries)} stdlib files, sha256 {h[:16]}...): "
        f"{len(train):,} train bytes, {len(val):,} val bytes; byte tokens, vocab 256"
    )
    return qc.TokenData(as_tokens(train), as_tokens(val), 256, desc), record


if __name__ == "__main__":  # python -m paper_repro.kimi_k2.corpus ROOT ROOT ...
    print(build_manifest([pathlib.Path(a) for a in sys.argv[1:]]))
