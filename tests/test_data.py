import pathlib
import sysconfig
import zlib

import numpy as np
import pytest

from builders import synthetic_corpus, synthetic_text, tiny_tokenizer
from qkclip_eqx import _data
from qkclip_eqx._data import (
    TokenData,
    eval_batches,
    get_batch,
    load_data,
    stdlib_corpus,
)

_REAL_STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])


def _in_val(rel: str, val_fraction: float) -> bool:
    # The documented rule, restated independently of the implementation.
    return zlib.crc32(rel.encode()) % 10_000 < val_fraction * 10_000


def _windows_at(tokens: np.ndarray, row: np.ndarray) -> np.ndarray:
    """All offsets at which `row` occurs as a contiguous slice of `tokens`."""
    windows = np.lib.stride_tricks.sliding_window_view(tokens, len(row))
    return np.flatnonzero((windows == row).all(axis=1))


#
# stdlib corpus, on a fake standard library of known files
#

_N_FILES = 400  # *.py sources in the fake standard library


@pytest.fixture(scope="module")
def fake_stdlib(tmp_path_factory) -> tuple[pathlib.Path, dict[str, bytes]]:
    """A standard library of 400 *.py files (1.6 MB of fixed synthetic text, in
    nested packages) plus what must be skipped: site-packages, __pycache__,
    hidden entries and non-*.py files. Returns the root and {relative path: bytes}
    of the sources that count."""
    root = tmp_path_factory.mktemp("fake_stdlib")
    text = synthetic_text(1_600_000, seed=7)
    sizes = 1_000 + (np.arange(_N_FILES) * 7919) % 6_000  # 1000..6999 bytes, fixed
    offsets = np.concatenate([[0], np.cumsum(sizes)]) % (len(text) - 7_000)
    sources = {}
    for i, (off, n) in enumerate(zip(offsets, sizes)):
        rel = f"pkg{i % 7}/sub{i % 3}/mod{i:03d}.py"
        sources[rel] = b"def f%d():\n    import os\n" % i + text[off : off + n]
    for rel, data in sources.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    for rel in (
        "site-packages/skipped.py",
        "pkg0/__pycache__/skipped.py",
        ".hidden/skipped.py",
        "pkg1/.skipped.py",
        "pkg2/notes.txt",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"must not be read\n" * 10)
    return root, dict(sorted(sources.items()))


@pytest.fixture
def stdlib(fake_stdlib, monkeypatch):
    """``stdlib_corpus`` reads the fake standard library for this test."""
    root, sources = fake_stdlib
    real = sysconfig.get_paths
    monkeypatch.setattr(
        _data.sysconfig, "get_paths", lambda *a, **k: {**real(*a, **k), "stdlib": str(root)}
    )
    return root, sources


def _split_bytes(sources, val_fraction, train_cap, val_cap):
    """The documented by-file split, written here: files in sorted order, each
    to validation iff its CRC32 says so, each split read while under its cap."""
    parts = {False: b"", True: b""}
    caps = {False: train_cap, True: val_cap}
    for rel, data in sources.items():
        is_val = _in_val(rel, val_fraction)
        if caps[is_val] is None or len(parts[is_val]) < caps[is_val]:
            parts[is_val] += data
    cut = {k: parts[k] if caps[k] is None else parts[k][: caps[k]] for k in parts}
    return cut[False], cut[True]


def test_stdlib_default_nonempty_and_capped(stdlib):
    root, sources = stdlib
    data = load_data()  # None -> stdlib corpus, default caps (8 MB: above the fake's size)
    assert isinstance(data, TokenData)
    assert data.vocab_size == 256
    assert data.train.dtype == np.uint16 and data.val.dtype == np.uint16
    train, val = _split_bytes(sources, 0.05, 8_000_000, 400_000)
    assert len(train) == sum(len(d) for r, d in sources.items() if not _in_val(r, 0.05))
    assert data.train.astype(np.uint8).tobytes() == train
    assert data.val.astype(np.uint8).tobytes() == val
    assert "standard library" in data.description and "vocab 256" in data.description
    assert str(root) in data.description and f"of {_N_FILES} *.py files" in data.description
    assert b"must not be read" not in train + val


def test_stdlib_split_function_disjoint_and_sized(stdlib):
    root, sources = stdlib
    files = _data._list_files(root, suffix=".py")
    assert files == sorted(files) == list(sources)
    val = {f for f in files if _data._is_val_file(f, 0.05)}
    train = {f for f in files if not _data._is_val_file(f, 0.05)}
    assert val and train and val.isdisjoint(train) and val | train == set(files)
    assert val == {f for f in files if _in_val(f, 0.05)}
    assert 0.01 < len(val) / len(files) < 0.15
    # The threshold is strict: crc32 % 10_000 == 500 stays in train at 5%.
    boundary = "boundary/file13835.py"
    assert zlib.crc32(boundary.encode()) % 10_000 == 500
    assert not _data._is_val_file(boundary, 0.05)
    assert _data._is_val_file(boundary, 0.0501)
    # A bigger fraction puts a superset of files in validation.
    assert val <= {f for f in files if _data._is_val_file(f, 0.2)}


def test_stdlib_splits_are_the_files_concatenated(stdlib):
    _, sources = stdlib
    small = stdlib_corpus(max_bytes=200_000)
    train, val = _split_bytes(sources, 0.05, 200_000, 65536)
    assert len(train) == 200_000 and len(val) == 65536  # both caps bind on this corpus
    assert small.train.astype(np.uint8).tobytes() == train
    assert small.val.astype(np.uint8).tobytes() == val


def test_stdlib_caps_and_determinism(stdlib):
    # Train capped at max_bytes; val at max(max_bytes * val_fraction, 64 KiB).
    small = stdlib_corpus(max_bytes=200_000)
    assert len(small.train) == 200_000
    assert len(small.val) == 65536
    again = stdlib_corpus(max_bytes=200_000)
    np.testing.assert_array_equal(again.train, small.train)
    np.testing.assert_array_equal(again.val, small.val)
    assert again.description == small.description
    big = stdlib_corpus(max_bytes=1_000_000, val_fraction=0.2)
    assert len(big.train) == 1_000_000 and len(big.val) == 200_000
    # A smaller cap is a prefix of a bigger one (same file order).
    np.testing.assert_array_equal(
        stdlib_corpus(max_bytes=1_000).train,
        stdlib_corpus(max_bytes=5_000).train[:1_000],
    )


def test_real_stdlib_corpus_whatever_its_size():
    """The running interpreter's own standard library: the split and caps of
    the documented rule, with the expected bytes computed from its files here
    (however many there are)."""
    files = [f for f in _data._list_files(_REAL_STDLIB, suffix=".py")]
    assert files and not any("site-packages" in f.split("/") for f in files)
    cap = 100_000
    parts = {False: [], True: []}
    sizes = {False: 0, True: 0}
    caps = {False: cap, True: 65536}
    for rel in files:
        is_val = _in_val(rel, 0.05)
        if sizes[is_val] < caps[is_val]:
            data = (_REAL_STDLIB / rel).read_bytes()
            parts[is_val].append(data)
            sizes[is_val] += len(data)
        if sizes[False] >= cap and sizes[True] >= 65536:
            break
    train, val = b"".join(parts[False])[:cap], b"".join(parts[True])[:65536]
    data = stdlib_corpus(max_bytes=cap)
    assert data.train.astype(np.uint8).tobytes() == train
    assert data.val.astype(np.uint8).tobytes() == val
    assert b"def " in train and b"import " in train  # real Python source, as bytes


@pytest.fixture(scope="module")
def small_stdlib() -> TokenData:
    """Fixed synthetic text (the batch tests need tokens, not the stdlib)."""
    return synthetic_corpus(200_000)


#
# get_batch / eval_batches
#


def test_get_batch_deterministic_and_stateless(small_stdlib):
    tokens = small_stdlib.train
    kw = dict(batch_size=8, seq_len=32, seed=3)
    later = get_batch(tokens, step=5, **kw)
    for step in range(5):
        get_batch(tokens, step=step, **kw)
    again = get_batch(tokens, step=5, **kw)
    np.testing.assert_array_equal(later, again)
    assert later.dtype == np.int32 and later.shape == (8, 33)
    assert int(later.max()) < small_stdlib.vocab_size and int(later.min()) >= 0
    assert not np.array_equal(later, get_batch(tokens, step=6, **kw))
    other_seed = get_batch(tokens, step=5, batch_size=8, seq_len=32, seed=4)
    assert not np.array_equal(later, other_seed)


def test_get_batch_rows_are_contiguous_windows(small_stdlib):
    tokens = small_stdlib.train
    batch = get_batch(tokens, batch_size=16, seq_len=64, seed=0, step=11)
    for row in batch:
        assert len(_windows_at(tokens, row.astype(np.uint16))) >= 1
    # With distinct tokens the offset is the first value; rows are exact slices.
    ramp = np.arange(5_000, dtype=np.uint16)
    batch = get_batch(ramp, batch_size=32, seq_len=10, seed=1, step=2)
    for row in batch:
        np.testing.assert_array_equal(row, np.arange(row[0], row[0] + 11))


def test_get_batch_offsets_cover_exact_range():
    n, seq_len = 20, 4
    ramp = np.arange(n, dtype=np.uint16)
    starts = np.concatenate(
        [get_batch(ramp, batch_size=64, seq_len=seq_len, seed=0, step=s)[:, 0] for s in range(20)]
    )
    # Valid offsets are exactly [0, n - seq_len - 1]; all get drawn.
    assert set(starts.tolist()) == set(range(n - seq_len))
    # The smallest possible split: exactly one window.
    one = get_batch(ramp[:5], batch_size=3, seq_len=4, seed=0, step=0)
    np.testing.assert_array_equal(one, np.tile(np.arange(5), (3, 1)))


def test_eval_batches_consecutive():
    tokens = np.arange(1_000, dtype=np.uint16)
    out = eval_batches(tokens, batch_size=4, seq_len=10, max_batches=3)
    assert out.dtype == np.int32 and out.shape == (3, 4, 11)
    rows = out.reshape(-1, 11)
    np.testing.assert_array_equal(rows[:, 0], np.arange(12) * 10)
    # Targets tile the split from token 1 with no gaps and no overlap.
    np.testing.assert_array_equal(rows[:, 1:].reshape(-1), np.arange(1, 121))
    np.testing.assert_array_equal(rows[:, :-1].reshape(-1), np.arange(120))
    # Fewer batches when the split is short; deterministic.
    short = eval_batches(tokens[:95], batch_size=4, seq_len=10, max_batches=100)
    assert short.shape == (2, 4, 11)  # (95 - 1) // 10 = 9 windows -> 2 batches
    np.testing.assert_array_equal(short, out[:2])
    np.testing.assert_array_equal(
        eval_batches(tokens[:41], batch_size=4, seq_len=10, max_batches=5),
        out[:1],
    )


#
# load_data: files and directories
#


def test_bin_round_trip(tmp_path):
    tokens = np.array([0, 1, 255, 256, 300, 1_000, 50_000] * 30 + [50_256], dtype="<u2")
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    data = load_data(path, val_fraction=0.1)
    assert data.vocab_size == 50_304  # 50_257 rounded up to a multiple of 64
    n_val = round(len(tokens) * 0.1)
    assert len(data.val) == n_val and len(data.train) == len(tokens) - n_val
    np.testing.assert_array_equal(np.concatenate([data.train, data.val]), tokens)
    assert int(data.train.max()) == 50_000 and int(data.val[-1]) == 50_256
    assert "tokens.bin" in data.description
    batch = get_batch(data.train, batch_size=4, seq_len=8, seed=0, step=0)
    assert int(batch.max()) < data.vocab_size


def test_bin_vocab_rounding_and_chunked_max(tmp_path, monkeypatch):
    monkeypatch.setattr(_data, "_CHUNK_TOKENS", 7)  # force many chunks
    for biggest, vocab in [(0, 64), (62, 64), (63, 64), (64, 128), (1_000, 1_024)]:
        path = tmp_path / f"v{biggest}.bin"
        tokens = np.zeros(50, dtype="<u2")
        tokens[-3] = biggest  # in the last, partial chunk
        tokens.tofile(path)
        assert load_data(path).vocab_size == vocab


def test_nanogpt_directory(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 500, size=1_000).astype("<u2")
    val = rng.integers(0, 500, size=100).astype("<u2")
    val[7] = 4_000  # the vocab comes from both files
    train.tofile(tmp_path / "train.bin")
    val.tofile(tmp_path / "val.bin")
    (tmp_path / "meta.txt").write_text("ignored")
    data = load_data(tmp_path)
    np.testing.assert_array_equal(data.train, train)
    np.testing.assert_array_equal(data.val, val)
    assert data.vocab_size == 4_032
    assert "train.bin" in data.description


def test_raw_file(tmp_path):
    content = bytes(range(1, 256)) * 40 + b"\0" * 4  # a NUL past the first 8 KiB: text
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    data = load_data(path, val_fraction=0.25)
    assert data.vocab_size == 256
    n_val = round(len(content) * 0.25)
    assert data.train.astype(np.uint8).tobytes() == content[:-n_val]
    assert data.val.astype(np.uint8).tobytes() == content[-n_val:]


def _names(val_fraction: float, want_val: bool, count: int, prefix: str) -> list[str]:
    out = [f"{prefix}{i}.txt" for i in range(1_000)]
    return [r for r in out if _in_val(r, val_fraction) == want_val][:count]


def test_text_directory_split_by_file(tmp_path):
    val_names = _names(0.3, True, 2, "doc") + _names(0.3, True, 1, "sub/doc")
    train_names = _names(0.3, False, 3, "doc") + _names(0.3, False, 2, "sub/doc")
    contents = {}
    for rel in val_names + train_names:
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        contents[rel] = f"<{rel}>\n".encode() * 3
        (tmp_path / rel).write_bytes(contents[rel])
    # Skipped: binary files (NUL in the first 8 KiB), hidden files and directories.
    for rel in _names(0.3, False, 1, "bin") + _names(0.3, True, 1, "bin"):
        (tmp_path / rel).write_bytes(b"text\0binary")
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main")

    data = load_data(tmp_path, val_fraction=0.3)
    assert data.vocab_size == 256
    expect_train = b"".join(contents[r] for r in sorted(train_names))
    expect_val = b"".join(contents[r] for r in sorted(val_names))
    assert data.train.astype(np.uint8).tobytes() == expect_train
    assert data.val.astype(np.uint8).tobytes() == expect_val
    assert "5 train files" in data.description and "3 val files" in data.description
    assert "2 binary files skipped" in data.description

    # max_bytes caps the train split (val cap: at least 64 KiB).
    capped = load_data(tmp_path, val_fraction=0.3, max_bytes=10)
    assert capped.train.astype(np.uint8).tobytes() == expect_train[:10]
    np.testing.assert_array_equal(capped.val, data.val)


#
# Errors
#


def test_errors_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin: data path does not exist"):
        load_data(tmp_path / "nope.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.bin: token file is empty"):
        load_data(tmp_path / "empty.bin")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.txt: file is empty"):
        load_data(tmp_path / "empty.txt")
    (tmp_path / "one.txt").write_bytes(b"x")
    with pytest.raises(ValueError, match="one.txt: only 1 token"):
        load_data(tmp_path / "one.txt")
    empty_dir = tmp_path / "d"
    empty_dir.mkdir()
    (empty_dir / "blank.txt").write_bytes(b"")
    (empty_dir / "blob.dat").write_bytes(b"\0\1\2")
    with pytest.raises(ValueError, match="no non-empty text files"):
        load_data(empty_dir)


def test_errors_bin_format(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\1\2\3")
    with pytest.raises(ValueError, match="odd.bin: odd byte length 3"):
        load_data(tmp_path / "odd.bin")
    half = tmp_path / "half"
    half.mkdir()
    np.arange(10, dtype="<u2").tofile(half / "train.bin")
    with pytest.raises(ValueError, match="has train.bin but no val.bin"):
        load_data(half)
    odd = tmp_path / "oddsplit"
    odd.mkdir()
    np.arange(10, dtype="<u2").tofile(odd / "train.bin")
    (odd / "val.bin").write_bytes(b"\1\2\3")
    with pytest.raises(ValueError, match="val.bin: odd byte length 3"):
        load_data(odd)


def test_errors_text_directory_empty_split(tmp_path):
    rel = _names(0.05, False, 1, "only")[0]
    (tmp_path / rel).write_text("a single training file")
    with pytest.raises(ValueError, match="left the val split empty"):
        load_data(tmp_path)


def test_errors_arguments(tmp_path):
    with pytest.raises(ValueError, match="val_fraction must be in"):
        load_data(val_fraction=1.0)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        stdlib_corpus(val_fraction=0.0)
    with pytest.raises(ValueError, match="max_bytes must be"):
        stdlib_corpus(max_bytes=0)


def test_errors_split_too_short():
    tokens = np.arange(8, dtype=np.uint16)
    with pytest.raises(ValueError, match="8 tokens.*seq_len=8 needs 9"):
        get_batch(tokens, batch_size=2, seq_len=8, seed=0, step=0)
    with pytest.raises(ValueError, match="0 tokens.*seq_len=4"):
        get_batch(tokens[:0], batch_size=2, seq_len=4, seed=0, step=0)
    with pytest.raises(ValueError, match="8 tokens.*seq_len=8 needs 9"):
        eval_batches(tokens, batch_size=1, seq_len=8, max_batches=1)
    with pytest.raises(ValueError, match="8 tokens.*batch_size=4.*seq_len=4 needs 17"):
        eval_batches(tokens, batch_size=4, seq_len=4, max_batches=1)
    with pytest.raises(ValueError, match="max_batches must be positive"):
        eval_batches(tokens, batch_size=1, seq_len=2, max_batches=0)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        get_batch(tokens, batch_size=0, seq_len=2, seed=0, step=0)
    with pytest.raises(ValueError, match="non-negative"):
        get_batch(tokens, batch_size=1, seq_len=2, seed=0, step=-1)


#
# Token files of any vocabulary, and text through a tokenizer.json
#


def test_npy_token_file_of_any_vocab_is_tokens_not_bytes(tmp_path):
    """The silent-wrong-data case: uint32 ids up to 1000 in a .npy were once
    trained as the file's raw bytes with a vocab of 256. Now they are the
    tokens, memory-mapped, with the vocabulary they need."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 1_000, size=4_000).astype(np.uint32)
    ids[17] = 1_000
    path = tmp_path / "tokens.npy"
    np.save(path, ids)
    data = load_data(path, val_fraction=0.1)
    assert isinstance(data.train, np.memmap)
    assert data.vocab_size == 1_024  # 1_001 rounded up to a multiple of 64
    np.testing.assert_array_equal(np.concatenate([data.train, data.val]), ids)
    assert len(data.val) == 400
    batch = get_batch(data.train, batch_size=3, seq_len=16, seed=0, step=0)
    assert batch.dtype == np.int32 and batch.max() < data.vocab_size
    # the same ids under a suffix that does not say their dtype: refused, not bytes
    ids.tofile(tmp_path / "tokens.dat")
    with pytest.raises(ValueError, match=r"tokens.dat: binary .* \(rename it to say its dtype\)"):
        load_data(tmp_path / "tokens.dat")


@pytest.mark.parametrize(
    ("suffix", "dtype", "top"), [(".u16", "<u2", 65_535), (".u32", "<u4", 100_000)]
)
def test_raw_token_files_by_suffix(tmp_path, suffix, dtype, top):
    ids = (np.arange(3_000) * 7919 % (top + 1)).astype(dtype)
    ids[-1] = top
    path = tmp_path / f"data{suffix}"
    ids.tofile(path)
    data = load_data(path, val_fraction=0.05)
    np.testing.assert_array_equal(np.concatenate([data.train, data.val]), ids)
    assert data.vocab_size == -(-(top + 1) // 64) * 64
    (tmp_path / f"odd{suffix}").write_bytes(b"\1\2\3")
    with pytest.raises(ValueError, match=f"odd{suffix}: .*byte length 3"):
        load_data(tmp_path / f"odd{suffix}")


def test_token_file_errors(tmp_path):
    np.save(tmp_path / "two_d.npy", np.zeros((4, 4), np.int32))
    with pytest.raises(ValueError, match=r"two_d.npy: .*1-D array of integer .* shape \(4, 4\)"):
        load_data(tmp_path / "two_d.npy")
    np.save(tmp_path / "floats.npy", np.zeros(40, np.float32))
    with pytest.raises(ValueError, match="floats.npy: .*float32"):
        load_data(tmp_path / "floats.npy")
    neg = np.arange(40, dtype=np.int64)
    neg[30] = -2
    np.save(tmp_path / "neg.npy", neg)
    with pytest.raises(ValueError, match="neg.npy: token ids must be >= 0, found -2"):
        load_data(tmp_path / "neg.npy")


def test_stated_vocab_skips_the_scan_and_every_batch_is_checked(tmp_path, monkeypatch):
    ids = np.arange(2_000, dtype=np.uint16) % 700
    path = tmp_path / "t.u16"
    ids.tofile(path)

    def no_scan(*a, **k):
        raise AssertionError("scanned")

    monkeypatch.setattr(_data, "_vocab_size", no_scan)
    data = load_data(path, vocab_size=512)
    assert data.vocab_size == 512
    batch = get_batch(data.train, batch_size=8, seq_len=64, seed=0, step=0)
    assert batch.max() >= 512  # a stated vocab that is too small ...
    with pytest.raises(
        ValueError, match=r"step 0 holds token \d+ .* outside the vocabulary \[0, 512\)"
    ):
        _data.check_batch_tokens(batch, 512, "the batch of step 0")
    _data.check_batch_tokens(batch, 768, "the batch of step 0")  # ... and one that fits


def test_scan_reads_a_memory_mapped_file_in_chunks_without_mapping_it(tmp_path, monkeypatch):
    monkeypatch.setattr(_data, "_CHUNK_TOKENS", 7)
    ids = np.arange(100, dtype=np.uint32)
    ids[-2] = 5_000
    ids.tofile(tmp_path / "t.u32")
    tokens = _data._token_file(tmp_path / "t.u32")
    chunks = list(_data._chunks(tokens))
    assert [len(c) for c in chunks] == [7] * 14 + [2]
    assert not any(isinstance(c, np.memmap) for c in chunks)  # read, not mapped
    np.testing.assert_array_equal(np.concatenate(chunks), ids)
    # a view (the train split) is scanned as the view, not as its whole file
    view = tokens[:-10]
    np.testing.assert_array_equal(np.concatenate(list(_data._chunks(view))), ids[:-10])


def _mapped_rss_kib(path: pathlib.Path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in pathlib.Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isalnum() and "-" in line.split()[0] and ":" not in line.split()[0]:
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_a_token_file_larger_than_memory_is_never_read_whole(tmp_path):
    """A sparse 32 GiB uint16 file (more than the 24 GiB of the machine the
    suite was written on; `truncate` costs no disk) with a stated vocab: the
    batches of 20 steps and the validation batches touch a few pages of it,
    measured as the resident memory of its mapping."""
    path = tmp_path / "huge.u16"
    with path.open("wb") as f:
        f.truncate(32 << 30)
        f.seek(5 << 30)
        f.write(np.arange(1_000, dtype="<u2").tobytes())
    data = load_data(path, vocab_size=1_024)
    assert len(data.train) + len(data.val) == 16 << 30
    for step in range(20):
        batch = get_batch(data.train, batch_size=8, seq_len=128, seed=0, step=step)
        _data.check_batch_tokens(batch, data.vocab_size, f"step {step}")
    eval_batches(data.val, batch_size=8, seq_len=128, max_batches=4)
    # measured: 10,304 KiB resident (fault-around maps ~64 KiB per window) of 33,554,432 KiB
    assert 0 < _mapped_rss_kib(path) < 40 * 1024


#
# Text through the user's own tokenizer.json (the tokenizers library)
#


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    pytest.importorskip("tokenizers")
    return tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def test_text_with_a_tokenizer_is_encoded_once_and_cached(tmp_path, tokenizer_json):
    from tokenizers import Tokenizer

    text = synthetic_text(20_000, seed=2).decode("utf-8", "replace")
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8", newline="")
    data = load_data(path, tokenizer=tokenizer_json, val_fraction=0.1)
    tok = Tokenizer.from_file(str(tokenizer_json))
    lines = text.splitlines(keepends=True)
    want = [i for e in tok.encode_batch(lines, add_special_tokens=False) for i in e.ids]
    np.testing.assert_array_equal(np.concatenate([data.train, data.val]), want)
    assert tok.decode(want) == text  # byte-level: the ids are the text, losslessly
    assert data.vocab_size == 320  # the tokenizer's 300 ids, rounded up to 64
    (cache,) = tmp_path.glob("corpus.txt.*.tokens.u16")
    assert "built now" in data.description
    assert "reused" in load_data(path, tokenizer=tokenizer_json).description
    with pytest.raises(ValueError, match="already tokens; a tokenizer applies to text"):
        load_data(cache, tokenizer=tokenizer_json)
    with pytest.raises(FileNotFoundError, match="nope.json: tokenizer file does not exist"):
        load_data(path, tokenizer=tmp_path / "nope.json")
