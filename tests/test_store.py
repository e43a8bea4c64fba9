"""Tests for extract.store: atomic HDF5 writes, checksummed reads, corruption handling, the store, the lock."""
import fcntl
import json
import multiprocessing
import os
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from extract.cachefiles import file_lock
from extract.store import (
    FORMAT_VERSION,
    HEAD_FILE,
    CacheCorrupt,
    CachedSplit,
    CacheMissing,
    FeatureStore,
    array_digest,
    content_key,
    read_meta,
    read_verified,
    verify_file,
    write_h5_atomic,
)

N = 20


def entry_arrays(seed=0, n=N):
    rng = np.random.default_rng(seed)
    return {
        "logits": rng.normal(size=(n, 6)).astype(np.float32),
        "features": rng.random((n, 32)).astype(np.float32),
        "labels": rng.integers(0, 6, size=n).astype(np.int64),
        "activations/block1": np.maximum(rng.normal(size=(n, 4, 8, 8)), 0).astype(np.float32),
        "activations/block2": rng.normal(size=(n, 8, 4, 4)).astype(np.float16),
    }


def entry_meta(n=N, layers=("block1", "block2")):
    return {"kind": "features", "backbone": {"name": "tiny", "key": "k" * 16}, "dataset": "digits",
            "split": "test", "data_key": "d" * 16, "layers": list(layers), "n": n, "what": "digits/test"}


def write_entry(path, seed=0):
    return write_h5_atomic(path, entry_arrays(seed), entry_meta())


def data_offset(path, name):
    """File offset of the first raw byte of dataset ``name`` (contiguous or first chunk)."""
    with h5py.File(path, "r") as h5:
        dataset = h5[name]
        offset = dataset.id.get_offset()
        if offset is None:  # chunked (as the store writes them): the first chunk's address
            offset = dataset.id.get_chunk_info(0).byte_offset
        return offset


def flip_byte(path, offset, mask=0x01):
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def assert_rejected(path, fragment=None):
    """verify_file reports ``path``; read_verified raises; open_entry raises and moves it to .corrupt."""
    problems = verify_file(path)
    assert problems, f"{path} passed verification"
    assert any(str(path) in problem for problem in problems), problems
    if fragment is not None:
        assert any(fragment in problem for problem in problems), problems
    store = FeatureStore(path.parent)
    before = path.read_bytes()
    with pytest.raises(CacheCorrupt, match="moved to"):
        store.open_entry(path)
    assert not path.exists()
    quarantine = path.with_name(path.name + ".corrupt")
    assert quarantine.read_bytes() == before
    assert store.open_entry(path) is None  # nothing under the final name any more
    assert path not in store.files() and quarantine in store.files()


# ---------------------------------------------------------------- atomic write and verified read

def test_round_trip_values_dtypes_and_nested_names(tmp_path):
    path = tmp_path / "bb" / "digits.test.key.h5"
    arrays = entry_arrays()
    assert write_h5_atomic(path, arrays, entry_meta()) == path
    for name, expected in arrays.items():
        got = read_verified(path, name)
        assert got.dtype == expected.dtype, name
        assert got.shape == expected.shape, name
        np.testing.assert_array_equal(got, expected)
    assert read_meta(path) == entry_meta()
    assert verify_file(path) == []
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary files left


def test_file_is_plain_hdf5(tmp_path):
    path = write_entry(tmp_path / "e.h5")
    arrays = entry_arrays()
    with h5py.File(path, "r") as h5:
        np.testing.assert_array_equal(h5["logits"][()], arrays["logits"])
        np.testing.assert_array_equal(h5["features"][()], arrays["features"])
        np.testing.assert_array_equal(h5["labels"][()], arrays["labels"])
        assert h5["labels"].dtype == np.int64
        np.testing.assert_array_equal(h5["activations"]["block1"][()], arrays["activations/block1"])
        assert h5["activations/block2"].dtype == np.float16
        assert h5.attrs["format_version"] == FORMAT_VERSION
        assert json.loads(h5.attrs["meta"]) == entry_meta()
        assert h5["logits"].attrs["sha256"] == array_digest(arrays["logits"])
        assert h5["logits"].fletcher32


def test_empty_and_single_row_arrays(tmp_path):
    path = write_h5_atomic(tmp_path / "e.h5", {"empty": np.zeros((0, 3), np.float32),
                                               "one": np.arange(1, dtype=np.int64)}, {"n": 0})
    assert read_verified(path, "empty").shape == (0, 3)
    np.testing.assert_array_equal(read_verified(path, "one"), [0])
    assert verify_file(path) == []


def test_array_digest_and_content_key():
    a = np.arange(6, dtype=np.float32)
    assert array_digest(a) == array_digest(a.copy())
    assert array_digest(a) != array_digest(a.reshape(2, 3))  # shape is part of the digest
    assert array_digest(a) != array_digest(a.astype(np.float64))  # so is the dtype
    assert array_digest(a[::2]) == array_digest(np.ascontiguousarray(a[::2]))
    key = content_key("entry", {"b": 1, "a": [1, 2]})
    assert key == content_key("entry", {"a": [1, 2], "b": 1}) and len(key) == 16
    assert key != content_key("entry", {"a": [1, 2], "b": 2})


def test_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "e.h5"
    bad = {"logits": np.zeros((3, 2), np.float32), "objects": np.array([object()] * 3, dtype=object)}
    with pytest.raises(TypeError):
        write_h5_atomic(path, bad, {"n": 3})
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_previous_file(tmp_path):
    path = write_entry(tmp_path / "e.h5", seed=0)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_h5_atomic(path, {"logits": np.zeros(3), "x": np.array([object()], dtype=object)}, {"n": 3})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.h5"]
    np.testing.assert_array_equal(read_verified(path, "logits"), entry_arrays(0)["logits"])


def test_read_verified_missing_array_is_cache_missing(tmp_path):
    path = write_entry(tmp_path / "e.h5")
    with pytest.raises(CacheMissing, match="activations/block9"):
        read_verified(path, "activations/block9")


# ---------------------------------------------------------------- corruption

def test_truncated_file_is_rejected(tmp_path):
    path = write_entry(tmp_path / "e.h5")
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)
    with pytest.raises(CacheCorrupt, match="unreadable"):
        read_verified(path, "logits")
    with pytest.raises(CacheCorrupt):
        read_meta(path)
    assert_rejected(path)


@pytest.mark.parametrize("name", ["logits", "features", "labels", "activations/block1", "activations/block2"])
def test_bit_flip_in_array_data_is_rejected(tmp_path, name):
    path = write_entry(tmp_path / "e.h5")
    flip_byte(path, data_offset(path, name) + 5)
    with pytest.raises(CacheCorrupt):
        read_verified(path, name)
    others = [other for other in entry_arrays() if other != name]
    for other in others:  # the damage is confined to one array, and reported for that one
        np.testing.assert_array_equal(read_verified(path, other), entry_arrays()[other])
    problems = verify_file(path)
    assert len(problems) == 1 and repr(name) in problems[0], problems
    assert_rejected(path)


def test_rewritten_values_fail_the_sha256_even_with_valid_fletcher32(tmp_path):
    """Data changed through HDF5 itself (fresh fletcher32 sums) is still caught by the stored sha256."""
    path = write_entry(tmp_path / "e.h5")
    with h5py.File(path, "r+") as h5:
        h5["features"][3, 7] += 1.0
    with pytest.raises(CacheCorrupt, match="checksum"):
        read_verified(path, "features")
    assert_rejected(path, "'features'")


def test_wrong_format_version_is_rejected(tmp_path):
    path = write_entry(tmp_path / "e.h5")
    with h5py.File(path, "r+") as h5:
        h5.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(CacheCorrupt, match="format version"):
        read_meta(path)
    assert_rejected(path, "format version")


def test_missing_format_version_is_rejected(tmp_path):
    path = write_entry(tmp_path / "e.h5")
    with h5py.File(path, "r+") as h5:
        del h5.attrs["format_version"]
    assert_rejected(path, "format version")


@pytest.mark.parametrize("damage", ["version-array", "meta-not-text", "meta-not-json", "meta-not-mapping",
                                   "meta-missing", "sha256-missing"])
def test_damaged_attributes_are_reported_not_raised(tmp_path, damage):
    path = write_entry(tmp_path / "e.h5")
    with h5py.File(path, "r+") as h5:
        if damage == "version-array":
            h5.attrs["format_version"] = np.array([FORMAT_VERSION, FORMAT_VERSION])
        elif damage == "meta-not-text":
            h5.attrs["meta"] = np.arange(3)
        elif damage == "meta-not-json":
            h5.attrs["meta"] = '{"kind": "features", "n": 2'
        elif damage == "meta-not-mapping":
            h5.attrs["meta"] = "[1, 2]"
        elif damage == "meta-missing":
            del h5.attrs["meta"]
        else:
            del h5["labels"].attrs["sha256"]
    if damage == "sha256-missing":
        with pytest.raises(CacheCorrupt):
            read_verified(path, "labels")
    else:
        with pytest.raises(CacheCorrupt):
            read_meta(path)
    assert_rejected(path)


@pytest.mark.parametrize("which", [0, 1, -1])
def test_flipped_object_header_is_reported_not_raised(tmp_path, which):
    """Damage to the HDF5 structure (a byte inside an object header, which file format v110
    checksums) makes h5py raise while opening or visiting; verify_file must report it and
    open_entry must quarantine the file."""
    path = write_entry(tmp_path / "e.h5")
    data = path.read_bytes()
    headers = [i for i in range(len(data)) if data.startswith(b"OHDR", i)]
    assert len(headers) >= 3  # the root group and the datasets
    flip_byte(path, headers[which] + 6)
    assert_rejected(path)


def test_flipped_metadata_json_syntax_is_rejected(tmp_path):
    path = write_entry(tmp_path / "e.h5")
    text = json.dumps(entry_meta(), sort_keys=True).encode()
    offset = path.read_bytes().find(text)
    assert offset > 0
    flip_byte(path, offset, mask=0x04)  # '{' -> '\x7f': no longer JSON
    with pytest.raises(CacheCorrupt, match="unreadable"):
        read_meta(path)
    assert_rejected(path)


def test_flipped_metadata_value_is_rejected(tmp_path):
    """A flip that keeps the meta valid JSON ('"n": 20' -> '"n": 30') fails the file's checksum."""
    path = write_entry(tmp_path / "e.h5")
    offset = path.read_bytes().find(b'"n": 20')
    assert offset > 0
    flip_byte(path, offset + len('"n": '))  # '2' (0x32) -> '3' (0x33)
    with pytest.raises(CacheCorrupt, match="metadata does not match its checksum"):
        read_meta(path)
    assert_rejected(path, "checksum")


def test_renamed_array_and_changed_digest_attribute_are_rejected(tmp_path):
    path = write_entry(tmp_path / "e.h5")
    with h5py.File(path, "r+") as h5:
        h5.move("features", "featurez")
    assert_rejected(path, "checksum")
    path = write_entry(tmp_path / "f.h5")
    with h5py.File(path, "r+") as h5:
        h5["labels"].attrs["sha256"] = "0" * 64
    assert_rejected(path, "checksum")


def test_open_entry_absent_and_sound(tmp_path):
    store = FeatureStore(tmp_path)
    assert store.open_entry(tmp_path / "nothing.h5") is None
    path = write_entry(tmp_path / "e.h5")
    entry = store.open_entry(path)
    assert isinstance(entry, CachedSplit)
    assert path.exists() and not path.with_name("e.h5.corrupt").exists()


def test_open_entry_when_the_file_vanishes_during_verification(tmp_path, monkeypatch):
    """Another process may move a corrupt file aside between our exists() and our quarantine."""
    import extract.store as store_module

    path = write_entry(tmp_path / "e.h5")

    def verify_and_vanish(p):
        p.unlink()
        return [f"cache file {p} is unreadable"]

    monkeypatch.setattr(store_module, "verify_file", verify_and_vanish)
    assert FeatureStore(tmp_path).open_entry(path) is None


# ---------------------------------------------------------------- CachedSplit

def test_cached_split_reads_lazily_and_verified(tmp_path):
    store = FeatureStore(tmp_path)
    path = store.entry_path("bbkey", "digits", "test", "d" * 16)
    write_entry(path)
    weight = np.arange(6 * 32, dtype=np.float32).reshape(6, 32)
    bias = np.linspace(-1, 1, 6, dtype=np.float32)
    write_h5_atomic(store.head_path("bbkey"), {"W": weight, "b": bias}, {"kind": "head"})
    entry = CachedSplit(path)
    arrays = entry_arrays()
    assert entry.name == "digits/test" and len(entry) == N and entry.data_key == "d" * 16
    np.testing.assert_array_equal(entry.logits, arrays["logits"])
    np.testing.assert_array_equal(entry.features, arrays["features"])
    np.testing.assert_array_equal(entry.labels, arrays["labels"])
    np.testing.assert_array_equal(entry.activations("block2"), arrays["activations/block2"])
    W, b = entry.head
    np.testing.assert_array_equal(W, weight)
    np.testing.assert_array_equal(b, bias)
    with pytest.raises(CacheMissing, match="block3"):
        entry.activations("block3")


def test_cached_split_detects_damage_on_first_read(tmp_path):
    path = write_entry(tmp_path / "e.h5")
    entry = CachedSplit(path)
    flip_byte(path, data_offset(path, "features") + 1)
    with pytest.raises(CacheCorrupt):
        _ = entry.features


# ---------------------------------------------------------------- the store: paths, ls, rm

def test_store_layout(tmp_path):
    store = FeatureStore(tmp_path)
    assert store.entry_path("bk", "digits", "ood", "dk") == tmp_path / "bk" / "digits.ood.dk.h5"
    assert store.head_path("bk") == tmp_path / "bk" / HEAD_FILE
    assert store.scores_path("bk", "msp", "sk") == tmp_path / "bk" / "scores" / "msp.sk.h5"
    assert FeatureStore("~/x").root == Path.home() / "x"


def populate(store):
    head = write_h5_atomic(store.head_path("bk"), {"W": np.ones((6, 32), np.float32), "b": np.zeros(6, np.float32)},
                           {"kind": "head", "backbone": {"name": "tiny", "key": "bk"}})
    entry = write_h5_atomic(store.entry_path("bk", "digits", "test", "dk"), entry_arrays(), entry_meta())
    scores = write_h5_atomic(store.scores_path("bk", "msp", "sk"), {"scores": np.arange(5.0)},
                             {"kind": "scores", "backbone_name": "tiny", "what": "MSP on digits/test", "n": 5})
    broken = store.entry_path("bk", "digits", "ood", "dk")
    broken.write_bytes(b"not an hdf5 file at all")
    return head, entry, scores, broken


def test_files_and_listing(tmp_path):
    store = FeatureStore(tmp_path / "cache")
    assert store.files() == [] and store.listing() == []
    head, entry, scores, broken = populate(store)
    bk = tmp_path / "cache" / "bk"
    quarantined = bk / "old.h5.corrupt"
    quarantined.write_bytes(b"xyz")
    weights = tmp_path / "cache" / "weights" / "digits-net.abc.pt"
    weights.parent.mkdir()
    weights.write_bytes(b"w" * 7)
    # things that are not cache files: temporaries, hidden files, locks, partial chunks
    (bk / ".digits.test.dk.h5.tmp-1-abcd").write_bytes(b"x")
    (bk / ".hidden.h5").write_bytes(b"x")
    (bk / "digits.test.dk.h5.lock").touch()
    partial = bk / "digits.train.dk.h5.partial"
    partial.mkdir()
    (partial / "chunk-000000-of-000002-bs16.npz").write_bytes(b"x")
    assert store.files() == sorted([head, entry, scores, broken, quarantined, weights])
    rows = {row["path"]: row for row in store.listing()}
    assert set(rows) == {"bk/head.h5", "bk/digits.test.dk.h5", "bk/scores/msp.sk.h5", "bk/digits.ood.dk.h5",
                         "bk/old.h5.corrupt", "weights/digits-net.abc.pt"}
    assert rows["bk/head.h5"]["kind"] == "head"
    assert rows["bk/digits.test.dk.h5"] == {"path": "bk/digits.test.dk.h5", "bytes": entry.stat().st_size,
                                            "kind": "features", "what": "digits/test"}
    assert rows["bk/scores/msp.sk.h5"]["kind"] == "scores"
    assert rows["bk/digits.ood.dk.h5"] == {"path": "bk/digits.ood.dk.h5", "bytes": len(b"not an hdf5 file at all"),
                                           "kind": "CORRUPT", "what": "fails verification"}
    assert rows["bk/old.h5.corrupt"]["kind"] == "CORRUPT" and rows["bk/old.h5.corrupt"]["bytes"] == 3
    assert rows["weights/digits-net.abc.pt"]["kind"] == "weights"
    assert rows["weights/digits-net.abc.pt"]["bytes"] == 7


def test_remove_deletes_file_lock_and_partial(tmp_path):
    store = FeatureStore(tmp_path)
    head, entry, scores, broken = populate(store)
    lock = entry.with_name(entry.name + ".lock")
    with file_lock(entry):
        pass
    assert lock.exists()
    partial = entry.with_name(entry.name + ".partial")
    partial.mkdir()
    (partial / "chunk-000000-of-000001-bs16.npz").write_bytes(b"x")
    store.remove([entry, broken, tmp_path / "bk" / "never.h5"])  # a missing path is no error
    assert not entry.exists() and not lock.exists() and not partial.exists() and not broken.exists()
    assert store.files() == sorted([head, scores])
    np.testing.assert_array_equal(read_verified(scores, "scores"), np.arange(5.0))


# ---------------------------------------------------------------- file_lock

def _hold_lock(path, log, barrier, hold):
    barrier.wait()
    with file_lock(Path(path)):
        with open(log, "a") as handle:
            handle.write(f"start {os.getpid()} {time.monotonic()}\n")
        time.sleep(hold)
        with open(log, "a") as handle:
            handle.write(f"end {os.getpid()} {time.monotonic()}\n")


def test_file_lock_serializes_processes(tmp_path):
    ctx = multiprocessing.get_context("fork")
    path, log = tmp_path / "entry.h5", tmp_path / "log.txt"
    barrier = ctx.Barrier(3)
    workers = [ctx.Process(target=_hold_lock, args=(str(path), str(log), barrier, 0.5)) for _ in range(2)]
    for worker in workers:
        worker.start()
    barrier.wait()
    deadline = time.monotonic() + 20
    while not (log.exists() and log.read_text().startswith("start")):  # one worker is inside, the other waits
        assert time.monotonic() < deadline
        time.sleep(0.005)
    with open(path.with_name("entry.h5.lock"), "a") as handle:  # the lock really is held
        with pytest.raises(BlockingIOError):
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    for worker in workers:
        worker.join(20)
        assert worker.exitcode == 0
    events = [line.split() for line in log.read_text().splitlines()]
    assert [e[0] for e in events] == ["start", "end", "start", "end"]
    assert events[0][1] == events[1][1] and events[2][1] == events[3][1] and events[0][1] != events[2][1]
    first_end, second_start = float(events[1][2]), float(events[2][2])
    assert second_start >= first_end  # intervals do not overlap


def test_file_lock_released_after_an_exception(tmp_path):
    path = tmp_path / "sub" / "entry.h5"
    with pytest.raises(RuntimeError):
        with file_lock(path):
            raise RuntimeError("boom")
    with open(path.with_name("entry.h5.lock"), "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # would raise if still held
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
