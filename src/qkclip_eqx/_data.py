"""Token data for language-model training: bytes of text, a token file of any
vocabulary (`.npy`, raw uint16/uint32, nanoGPT `.bin`; memory-mapped, never
read whole), or text through a user's own `tokenizer.json`.

Everything here is a pure function of its arguments: there is no global state, and
batches are a function of `(seed, step)` alone, so a resumed run sees the same data.
"""

import dataclasses
import hashlib
import os
import pathlib
import sys
import sysconfig
import zlib

import numpy as np
from jaxtyping import Int32, Integer

__all__ = [
    "TokenData",
    "check_batch_tokens",
    "stdlib_corpus",
    "load_data",
    "get_batch",
    "eval_batches",
]

_BYTE_VOCAB = 256
_VOCAB_MULTIPLE = 64
_MIN_VAL_CAP = 64 * 1024  # bytes: the smallest validation cap for by-file corpora
_SNIFF_BYTES = 8192  # a file with a NUL byte in its first 8 KiB is treated as binary
_CHUNK_TOKENS = 1 << 24  # tokens per chunk when scanning a .bin file for its maximum
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
#: Token files by suffix: the little-endian dtype of their raw tokens (`.bin`:
#: nanoGPT's uint16). `.npy` files carry their own dtype.
TOKEN_SUFFIXES = {
    ".bin": "<u2",
    ".u16": "<u2",
    ".uint16": "<u2",
    ".u32": "<u4",
    ".uint32": "<u4",
}
_TEXT_CHUNK_BYTES = 1 << 22  # tokenizer: lines encoded per batch, about 4 MiB of text


@dataclasses.dataclass(frozen=True, eq=False)
class TokenData:
    """A train/validation pair of token streams.

    **Fields:**

    - `train`: the training tokens.
    - `val`: the validation tokens.
    - `vocab_size`: an exclusive upper bound on every token.
    - `description`: where the tokens came from, and how many there are.
    """

    train: Integer[np.ndarray, " n_train"]
    val: Integer[np.ndarray, " n_val"]
    vocab_size: int
    description: str


#
# Helpers
#


def _check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")


def _check_max_bytes(max_bytes: int | None) -> None:
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes must be None or a positive int, got {max_bytes}.")


def _is_val_file(relative_path: str, val_fraction: float) -> bool:
    """Whether a file (named by its POSIX relative path) belongs to validation."""
    return zlib.crc32(relative_path.encode()) % 10_000 < val_fraction * 10_000


def _list_files(root: pathlib.Path, *, suffix: str | None) -> list[str]:
    """Regular files below `root` as sorted POSIX relative paths.

    Skips `site-packages`/`dist-packages`/`__pycache__` and hidden entries; does not
    follow directory symlinks.
    """
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        for name in filenames:
            hidden = name.startswith(".")
            if hidden or (suffix is not None and not name.endswith(suffix)):
                continue
            full = os.path.join(dirpath, name)
            if os.path.isfile(full):
                out.append(pathlib.Path(os.path.relpath(full, root)).as_posix())
    return sorted(out)


def _bytes_to_tokens(data: bytes) -> Integer[np.ndarray, " n"]:
    tokens = np.frombuffer(data, dtype=np.uint8).astype(np.uint16)
    tokens.flags.writeable = False
    return tokens


def _by_file_split(
    root: pathlib.Path,
    relative_paths: list[str],
    *,
    max_bytes: int | None,
    val_fraction: float,
    skip_binary: bool,
) -> tuple[bytes, bytes, int, int, int]:
    """Concatenate files into train/val by the CRC32 rule, with byte caps.

    Returns `(train, val, n_train_files, n_val_files, n_skipped_binary)`. Files are
    only read while their split is still below its cap.
    """
    if max_bytes is None:
        caps = {False: None, True: None}
    else:
        val_cap = max(int(max_bytes * val_fraction), _MIN_VAL_CAP)
        caps = {False: max_bytes, True: val_cap}
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    sizes = {False: 0, True: 0}
    n_files = {False: 0, True: 0}
    n_skipped = 0

    def full(is_val: bool) -> bool:
        cap = caps[is_val]
        return cap is not None and sizes[is_val] >= cap

    for rel in relative_paths:
        if full(False) and full(True):
            break
        is_val = _is_val_file(rel, val_fraction)
        if full(is_val):
            continue
        with open(root / rel, "rb") as f:
            head = f.read(_SNIFF_BYTES)
            if skip_binary and b"\0" in head:
                n_skipped += 1
                continue
            data = head + f.read()
        if data:
            parts[is_val].append(data)
            sizes[is_val] += len(data)
            n_files[is_val] += 1
    train = b"".join(parts[False])[: caps[False]]
    val = b"".join(parts[True])[: caps[True]]
    return train, val, n_files[False], n_files[True], n_skipped


def _token_file(path: pathlib.Path, dtype: str | None = None) -> Integer[np.ndarray, " n"]:
    """Memory-map a 1-D token file: `.npy` (its own dtype, any integer type), or
    raw little-endian tokens of `dtype` (by default the suffix's, `TOKEN_SUFFIXES`)."""
    if path.suffix.lower() == ".npy":
        try:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{path}: not a .npy array file ({e}).") from None
        if tokens.ndim != 1 or tokens.dtype.kind not in "ui":
            raise ValueError(
                f"{path}: a token file holds a 1-D array of integer token ids, this one is "
                f"{tokens.dtype} of shape {tokens.shape}."
            )
        if tokens.size == 0:
            raise ValueError(f"{path}: token file is empty.")
        return tokens
    dtype = dtype or TOKEN_SUFFIXES[path.suffix.lower()]
    item = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path}: token file is empty.")
    if size % item != 0:
        which = "odd byte length" if item == 2 else "byte length"
        raise ValueError(
            f"{path}: {which} {size}; a {path.suffix} file holds little-endian "
            f"{np.dtype(dtype).name} tokens, so its length must be a multiple of {item}."
        )
    return np.memmap(path, dtype=dtype, mode="r")


def _chunks(array: Integer[np.ndarray, " n"]):
    """`array` in chunks of `_CHUNK_TOKENS`; a memory-mapped file is read by
    `np.fromfile` into one chunk's buffer at a time, so that a scan of a file
    larger than memory leaves no mapped pages behind."""
    name = getattr(array, "filename", None)
    base = getattr(array, "offset", None)
    if (
        isinstance(array, np.memmap)
        and name is not None
        and base is not None
        and os.path.getsize(name) - base == array.nbytes  # the whole file, not a view of it
    ):
        with open(name, "rb") as f:
            f.seek(base)
            while (chunk := np.fromfile(f, dtype=array.dtype, count=_CHUNK_TOKENS)).size:
                yield chunk
        return
    for start in range(0, len(array), _CHUNK_TOKENS):
        yield np.asarray(array[start : start + _CHUNK_TOKENS])


def _vocab_size(*arrays: Integer[np.ndarray, " _"], path: object = "data") -> int:
    """`max token + 1`, rounded up to a multiple of 64; scans in chunks.
    A negative token is an error naming `path`."""
    biggest, smallest = 0, 0
    for array in arrays:
        for chunk in _chunks(array):
            if chunk.size:
                biggest = max(biggest, int(chunk.max()))
                smallest = min(smallest, int(chunk.min()))
    if smallest < 0:
        raise ValueError(f"{path}: token ids must be >= 0, found {smallest}.")
    return _round_vocab(biggest + 1)


def _round_vocab(n: int) -> int:
    return -(-n // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE


def check_batch_tokens(batch: Integer[np.ndarray, "..."], vocab_size: int, what: str) -> None:
    """Raise `ValueError` when a token of `batch` lies outside `[0, vocab_size)`
    (a stated `vocab_size` too small for the data): embedding lookups would
    clamp it silently."""
    if batch.size and (int(batch.max()) >= vocab_size or int(batch.min()) < 0):
        raise ValueError(
            f"{what} holds token {int(batch.max())} (min {int(batch.min())}), outside the "
            f"vocabulary [0, {vocab_size}): state a larger vocab size, or none to scan the data"
        )


def _tail_split_size(n: int, val_fraction: float, path: pathlib.Path) -> int:
    if n < 2:
        raise ValueError(f"{path}: only {n} token(s); need at least 2 to make a train/val split.")
    return min(max(round(n * val_fraction), 1), n - 1)


def _require_nonempty(train: np.ndarray, val: np.ndarray, what: str) -> None:
    for name, split in (("train", train), ("val", val)):
        if len(split) == 0:
            raise ValueError(f"{what}: the {name} split is empty.")


#
# Sources
#


def stdlib_corpus(*, max_bytes: int | None = 8_000_000, val_fraction: float = 0.05) -> TokenData:
    """The running Python's standard-library sources as byte tokens (vocab 256).

    All `*.py` files below `sysconfig.get_paths()["stdlib"]` (skipping
    `site-packages`), sorted by relative path and split by file: a file is in
    validation iff `zlib.crc32(relative_path.encode()) % 10_000` is below
    `val_fraction * 10_000`.
    Needs no download.

    **Arguments:**

    - `max_bytes`: caps the train split at `max_bytes` bytes, the validation
      split at `max(max_bytes * val_fraction, 64 KiB)`; `None` means no cap.
    - `val_fraction`: about the share of files in validation.

    **Returns:**

    A [`qkclip_eqx.TokenData`][].

    **Raises:**

    `ValueError` when `val_fraction` or `max_bytes` is out of range, or a split
    is empty; `FileNotFoundError` when the standard library is not found.
    """
    _check_val_fraction(val_fraction)
    _check_max_bytes(max_bytes)
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: standard-library directory does not exist.")
    files = _list_files(root, suffix=".py")
    if not files:
        raise ValueError(f"{root}: no *.py files found in the standard library.")
    train, val, n_train, n_val, _ = _by_file_split(
        root, files, max_bytes=max_bytes, val_fraction=val_fraction, skip_binary=False
    )
    what = f"Python {sys.version.split()[0]} standard library at {root}"
    train_tokens, val_tokens = _bytes_to_tokens(train), _bytes_to_tokens(val)
    _require_nonempty(train_tokens, val_tokens, what)
    description = (
        f"{what}: {n_train} train files ({len(train):,} bytes), {n_val} val files "
        f"({len(val):,} bytes), of {len(files)} *.py files; byte tokens, vocab 256"
    )
    return TokenData(train_tokens, val_tokens, _BYTE_VOCAB, description)


def _tokenised(path: pathlib.Path, tokenizer: pathlib.Path) -> tuple[pathlib.Path, int, bool]:
    """Text at `path` (a file, or a directory's text files in sorted order)
    encoded by the Hugging Face `tokenizers` library with `tokenizer`
    (a `tokenizer.json`), once: the ids go to a raw token file beside the data,
    `<path>.<hash of tokenizer.json>.tokens.u16` (`.u32` past 65,536 ids),
    rebuilt when a text file is newer than it. Text is encoded line by line
    (lines keep their newline), without special tokens. Returns the cache, the
    tokenizer's vocabulary size, and whether the cache was built now."""
    try:
        from tokenizers import Tokenizer  # the tokenizer.json format's own reader
    except ImportError as e:
        raise ImportError(
            '--tokenizer needs the tokenizers package: pip install "qkclip_eqx[tokenizers]"'
        ) from e
    if not tokenizer.is_file():
        raise FileNotFoundError(f"{tokenizer}: tokenizer file does not exist.")
    try:
        tok = Tokenizer.from_file(str(tokenizer))
    except Exception as e:  # the library raises its own Exception subclass
        raise ValueError(f"{tokenizer}: not a tokenizer.json ({e}).") from None
    n_vocab = tok.get_vocab_size(with_added_tokens=True)
    suffix, dtype = (".u16", "<u2") if n_vocab <= 1 << 16 else (".u32", "<u4")
    digest = hashlib.sha256(tokenizer.read_bytes()).hexdigest()[:12]
    cache = path.parent / f"{path.name}.{digest}.tokens{suffix}"
    if path.is_dir():
        files = [path / rel for rel in _list_files(path, suffix=None) if ".tokens." not in rel]
        files = [f for f in files if not _is_binary(f)]
    else:
        files = [path]
    if cache.is_file() and all(f.stat().st_mtime <= cache.stat().st_mtime for f in files):
        return cache, n_vocab, False
    partial = cache.with_name(cache.name + ".partial")
    with partial.open("wb") as out:
        for name in files:
            with open(name, encoding="utf-8", errors="replace", newline="") as f:
                while lines := f.readlines(_TEXT_CHUNK_BYTES):
                    encodings = tok.encode_batch(lines, add_special_tokens=False)
                    ids = [i for e in encodings for i in e.ids]
                    np.asarray(ids, dtype=dtype).tofile(out)
    partial.replace(cache)  # atomic: a killed run never leaves half a cache
    return cache, n_vocab, True


def _is_binary(path: pathlib.Path) -> bool:
    with path.open("rb") as f:
        return b"\0" in f.read(_SNIFF_BYTES)


def _tail_split(
    tokens: Integer[np.ndarray, " n"],
    vocab_size: int,
    val_fraction: float,
    path: pathlib.Path,
    what: str,
) -> TokenData:
    n_val = _tail_split_size(len(tokens), val_fraction, path)
    train, val = tokens[:-n_val], tokens[-n_val:]
    description = (
        f"{what}: {len(train):,} train + {len(val):,} val tokens (the last "
        f"{val_fraction:g}), vocab {vocab_size}"
    )
    return TokenData(train, val, vocab_size, description)


def _stated_vocab(vocab_size: int | None, path: object, *arrays: np.ndarray) -> int:
    """`vocab_size` when stated (every batch is then checked against it), else
    the data's, scanned."""
    if vocab_size is None:
        return _vocab_size(*arrays, path=path)
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}.")
    return vocab_size


def load_data(
    path: str | os.PathLike | None = None,
    *,
    max_bytes: int | None = 8_000_000,
    val_fraction: float = 0.05,
    vocab_size: int | None = None,
    tokenizer: str | os.PathLike | None = None,
) -> TokenData:
    """Load token data from `path`.

    **Arguments:**

    - `path`: one of
        - `None`: [`qkclip_eqx.stdlib_corpus`][].
        - A token file, memory-mapped (never read whole): `.npy` (a 1-D array
          of any integer dtype), raw little-endian `.u16`/`.uint16` or
          `.u32`/`.uint32` tokens, or a nanoGPT `.bin` (uint16). The last
          `val_fraction` of the tokens is validation. `vocab_size` is
          `max token + 1` rounded up to a multiple of 64, found by one scan
          in chunks (bounded memory) unless stated.
        - A directory holding `train.bin` and `val.bin`: those two (nanoGPT
          layout).
        - With `tokenizer`: a text file or a directory of text files, encoded
          once by the `tokenizers` library and cached beside the data as a raw
          token file (`<path>.<hash>.tokens.u16`); the vocabulary is the
          tokenizer's, rounded up to a multiple of 64.
        - Any other file: its raw bytes (vocab 256); the last `val_fraction` is
          validation. A file with a NUL byte in its first 8 KiB is refused:
          binary data (a token array under another suffix) is never read as
          text.
        - Any other directory: all regular, non-hidden files below it that have
          no NUL byte in their first 8 KiB, as bytes, split by file as in
          [`qkclip_eqx.stdlib_corpus`][].
    - `max_bytes`: caps the by-file corpora (`None` and directories of text) as
      in [`qkclip_eqx.stdlib_corpus`][]; token files and single files are used
      whole.
    - `val_fraction`: the share of the data in validation.
    - `vocab_size`: the vocabulary of a token file, stated: skips the scan of
      its maximum (a file larger than memory starts at once); a batch holding
      a token at or above it is then an error (`check_batch_tokens`).
    - `tokenizer`: a Hugging Face `tokenizer.json` for text at `path` (the
      `tokenizers` extra).

    **Returns:**

    A [`qkclip_eqx.TokenData`][].

    **Raises:**

    `FileNotFoundError` when `path` does not exist; `ValueError` when
    `val_fraction` or `max_bytes` is out of range, a directory has only one of
    `train.bin`/`val.bin`, a token file is not 1-D integers or holds a negative
    id, a single non-token file is binary, or the data or a split is empty.
    """
    _check_val_fraction(val_fraction)
    _check_max_bytes(max_bytes)
    if path is None:
        if tokenizer is not None:
            raise ValueError("a tokenizer needs text data: give a text file or directory.")
        return stdlib_corpus(max_bytes=max_bytes, val_fraction=val_fraction)
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: data path does not exist.")
    suffix = path.suffix.lower()
    is_token_file = path.is_file() and (suffix == ".npy" or suffix in TOKEN_SUFFIXES)

    if tokenizer is not None:
        if is_token_file or (path / "train.bin").is_file():
            raise ValueError(
                f"{path}: already tokens; a tokenizer applies to text (a file or a directory)."
            )
        cache, n_vocab, built = _tokenised(path, pathlib.Path(tokenizer))
        tokens = _token_file(cache)
        vocab = _round_vocab(n_vocab) if vocab_size is None else vocab_size
        if vocab < n_vocab:
            raise ValueError(f"vocab_size {vocab} is below the tokenizer's {n_vocab} ids.")
        what = f"{path} tokenised by {tokenizer} ({n_vocab:,} ids; cache {cache.name}, " + (
            "built now)" if built else "reused)"
        )
        return _tail_split(tokens, vocab, val_fraction, path, what)

    if path.is_dir():
        has_train = (path / "train.bin").is_file()
        has_val = (path / "val.bin").is_file()
        if has_train and has_val:
            train = _token_file(path / "train.bin")
            val = _token_file(path / "val.bin")
            vocab = _stated_vocab(vocab_size, path, train, val)
            description = (
                f"nanoGPT token directory {path}: {len(train):,} train tokens "
                f"(train.bin), {len(val):,} val tokens (val.bin), vocab {vocab}"
            )
            return TokenData(train, val, vocab, description)
        if has_train or has_val:
            present, missing = ("train", "val") if has_train else ("val", "train")
            raise ValueError(
                f"{path}: has {present}.bin but no {missing}.bin; a nanoGPT data "
                "directory needs both."
            )
        files = _list_files(path, suffix=None)
        train, val, n_train, n_val, n_skipped = _by_file_split(
            path,
            files,
            max_bytes=max_bytes,
            val_fraction=val_fraction,
            skip_binary=True,
        )
        if not train and not val:
            raise ValueError(f"{path}: directory holds no non-empty text files.")
        for name, split in (("train", train), ("val", val)):
            if not split:
                raise ValueError(
                    f"{path}: the by-file split left the {name} split empty "
                    f"({n_train} train files, {n_val} val files at "
                    f"val_fraction={val_fraction}); add files, change val_fraction, "
                    "or pass a single file."
                )
        description = (
            f"text directory {path}: {n_train} train files ({len(train):,} bytes), "
            f"{n_val} val files ({len(val):,} bytes), {n_skipped} binary files "
            "skipped; byte tokens, vocab 256"
        )
        return TokenData(_bytes_to_tokens(train), _bytes_to_tokens(val), _BYTE_VOCAB, description)

    if is_token_file:
        tokens = _token_file(path)
        vocab = _stated_vocab(vocab_size, path, tokens)
        kind = "nanoGPT token file" if suffix == ".bin" else f"token file ({tokens.dtype.name})"
        return _tail_split(tokens, vocab, val_fraction, path, f"{kind} {path}")

    if _is_binary(path):
        raise ValueError(
            f"{path}: binary (a NUL byte in its first {_SNIFF_BYTES} bytes), not text: a token "
            f"array is read as .npy or as raw {', '.join(sorted(TOKEN_SUFFIXES))} tokens "
            "(rename it to say its dtype)."
        )
    data = path.read_bytes()
    if not data:
        raise ValueError(f"{path}: file is empty.")
    tokens = _bytes_to_tokens(data)
    n_val = _tail_split_size(len(tokens), val_fraction, path)
    description = (
        f"raw bytes of {path}: {len(tokens) - n_val:,} train + {n_val:,} val byte tokens, vocab 256"
    )
    return TokenData(tokens[:-n_val], tokens[-n_val:], _BYTE_VOCAB, description)


#
# Batches
#


def _check_batch_args(n: int, batch_size: int, seq_len: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}.")
    if n < seq_len + 1:
        raise ValueError(
            f"split too short: it has {n} tokens, but one sequence with "
            f"seq_len={seq_len} needs {seq_len + 1}."
        )


def get_batch(
    tokens: Integer[np.ndarray, " n"],
    *,
    batch_size: int,
    seq_len: int,
    seed: int,
    step: int,
) -> Int32[np.ndarray, "batch_size seq_len_plus_one"]:
    """A training batch: `batch_size` windows of `seq_len + 1` tokens.

    Start offsets are uniform on `[0, n - seq_len - 1]` and drawn from
    `np.random.default_rng([seed, step])`, so the batch depends on `(seed, step)`
    only. Inputs are `batch[:, :-1]` and targets `batch[:, 1:]`.

    **Arguments:**

    - `tokens`: a split, e.g. `TokenData.train`.
    - `batch_size`: the number of windows.
    - `seq_len`: the inputs' length; each window holds `seq_len + 1` tokens.
    - `seed`, `step`: select the batch.

    **Returns:**

    An int32 array `[batch_size, seq_len + 1]`.

    **Raises:**

    `ValueError` when `batch_size` or `seq_len` is not positive, `seed` or
    `step` is negative, or `tokens` holds fewer than `seq_len + 1` tokens.
    """
    n = len(tokens)
    _check_batch_args(n, batch_size, seq_len)
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be non-negative, got {seed=}, {step=}.")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, n - seq_len, size=batch_size)
    return np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int32)


def eval_batches(
    tokens: Integer[np.ndarray, " n"],
    *,
    batch_size: int,
    seq_len: int,
    max_batches: int,
) -> Int32[np.ndarray, "n_batches batch_size seq_len_plus_one"]:
    """Validation batches: consecutive windows from the start of `tokens`.

    Window `i` is `tokens[i * seq_len : (i + 1) * seq_len + 1]`: consecutive windows
    share one boundary token, so inputs (and targets) never overlap and every token
    after the first is a target exactly once.

    **Arguments:**

    - `tokens`: a split, e.g. `TokenData.val`.
    - `batch_size`: windows per batch.
    - `seq_len`: the inputs' length; each window holds `seq_len + 1` tokens.
    - `max_batches`: the most batches returned.

    **Returns:**

    An int32 array `[n_batches, batch_size, seq_len + 1]` of
    `min(max_batches, (n - 1) // seq_len // batch_size)` batches; at least one.

    **Raises:**

    `ValueError` when `batch_size`, `seq_len` or `max_batches` is not positive,
    or `tokens` is too short for one batch.
    """
    n = len(tokens)
    _check_batch_args(n, batch_size, seq_len)
    if max_batches < 1:
        raise ValueError(f"max_batches must be positive, got {max_batches}.")
    n_batches = min(max_batches, (n - 1) // seq_len // batch_size)
    if n_batches == 0:
        raise ValueError(
            f"split too short: it has {n} tokens, but one eval batch of "
            f"batch_size={batch_size} windows with seq_len={seq_len} needs "
            f"{batch_size * seq_len + 1}."
        )
    n_windows = n_batches * batch_size
    prefix = np.asarray(tokens[: n_windows * seq_len + 1])
    windows = np.lib.stride_tricks.sliding_window_view(prefix, seq_len + 1)[::seq_len]
    return windows.astype(np.int32).reshape(n_batches, batch_size, seq_len + 1)
