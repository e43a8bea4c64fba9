"""Faults of the cache's file system and processes: a full disk, a read-only cache, permissions, a file
in the way, writers killed mid-write (their temporaries), and waits on a busy entry lock.

The full and read-only file systems are real: small tmpfs mounts (skipped, with the reason, where
this user may not mount). The rest injects the fault and runs everywhere.
"""
import errno
import fcntl
import json
import logging
import multiprocessing
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import extract.cachefiles as cachefiles
import extract.store as store_module
from extract.cachefiles import CacheWriteError, atomic_target, ensure_writable, file_lock, temporary_name
from extract.extraction import _save_chunk
from extract.store import CacheCorrupt, FeatureStore, read_verified, write_h5_atomic
from harness.config import MethodRef
from harness.evaluation import Evaluation
from harness.perf import write_synthetic_cache
from harness.resolution import Resolution, ResolvedBackbone, save_record
from methods.logit_scores import energy
from tests.conftest import remount_read_only

REPO = Path(__file__).resolve().parents[1]
CRASH_CODES = (-signal.SIGSEGV, -signal.SIGBUS, -signal.SIGABRT, 128 + signal.SIGSEGV, 128 + signal.SIGBUS)


def arrays(megabytes: float, seed: int = 0) -> dict[str, np.ndarray]:
    rows = max(1, int(megabytes * 1e6 / 4 / 64))
    rng = np.random.default_rng(seed)
    return {"logits": rng.standard_normal((rows, 64)).astype(np.float32), "labels": np.arange(rows)}


def leftovers(folder: Path) -> list[str]:
    """Every file under ``folder`` (temporaries included)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------- a full disk

SUBPROCESS_WRITE = """
import json, sys
from pathlib import Path
import extract.store as store
from extract.cachefiles import CacheWriteError
root, check_first = Path(sys.argv[1]), sys.argv[2] == "check"
if not check_first:
    store.h5_bytes_needed = lambda arrays: None  # as if the disk filled up after the check
import numpy as np
rng = np.random.default_rng(0)
arrays = {name: rng.standard_normal((3000, 64)).astype(np.float32) for name in ("logits", "features")}
arrays["activations/x"] = rng.standard_normal((3000, 64)).astype(np.float32)
try:
    store.write_h5_atomic(root / "bk" / "e.h5", arrays, {"n": 3000})
    print(json.dumps({"ok": True}))
except CacheWriteError as err:
    print(json.dumps({"ok": False, "type": type(err).__name__, "message": str(err), "errno": err.errno}))
"""


@pytest.mark.parametrize("check_first", ["check", "during"])
def test_full_disk_is_one_clean_error_not_a_crash(tmpfs, check_first):
    """The issue's crash: an HDF5 file bigger than a small tmpfs (2.3 MB onto 1.5 MB) ended in h5py's
    RuntimeError and then a segmentation fault (HDF5 flushed a dataset it had half closed after the
    failed write). Run in a subprocess, so a crash fails this test instead of killing pytest:
    'check' is the free-space check before writing, 'during' the disk filling up during the write."""
    root = tmpfs("1536k")
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", SUBPROCESS_WRITE, str(root), check_first],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode not in CRASH_CODES, f"crashed ({done.returncode}): {done.stderr[-2000:]}"
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Segmentation fault" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["type"] == "CacheWriteError" and result["errno"] == errno.ENOSPC
    assert result["message"].startswith(f"cannot write to {root / 'bk'}: no space left on device (")
    assert re.search(r"\d+\.\d MB free\); free some space or point --cache-dir elsewhere$", result["message"])
    if check_first == "check":
        assert re.search(r"\(needs about 2\.\d MB, 1\.\d MB free\)", result["message"]), result["message"]
    assert leftovers(root) == []  # nothing half-written, no temporary left


def test_full_disk_checked_before_writing(tmp_path, monkeypatch):
    """The space an HDF5 entry needs is checked before anything is written (the free space faked)."""
    monkeypatch.setattr(cachefiles, "free_bytes", lambda directory: 1_100_000)
    with pytest.raises(CacheWriteError) as caught:
        write_h5_atomic(tmp_path / "bk" / "e.h5", arrays(12), {"n": 1})
    err = caught.value
    assert err.errno == errno.ENOSPC and err.free == 1_100_000 and err.needed > 12_000_000
    assert str(err) == (f"cannot write to {tmp_path / 'bk'}: no space left on device (needs about 12.8 MB, 1.1 MB "
                        "free); free some space or point --cache-dir elsewhere")
    assert isinstance(err, OSError)  # the CLI prints any OSError as one `error:` line
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_filling_during_an_hdf5_write_is_translated(tmp_path, monkeypatch, code):
    """Injected: the OS refuses a write after 100 kB; HDF5 completes and closes (its writes go
    through the deferring file object), then the error surfaces as a CacheWriteError."""
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        if offset + len(data) > 100_000:
            raise OSError(code, os.strerror(code))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(store_module.os, "pwrite", pwrite)
    with pytest.raises(CacheWriteError) as caught:
        write_h5_atomic(tmp_path / "e.h5", arrays(1), {"n": 1})
    monkeypatch.undo()
    what = "no space left on device" if code == errno.ENOSPC else "disk quota exceeded"
    assert caught.value.errno == code and f"cannot write to {tmp_path}: {what} (needs about 1.3 MB" in str(caught.value)
    assert leftovers(tmp_path) == []
    write_h5_atomic(tmp_path / "e.h5", arrays(1), {"n": 1})  # the same write, with space, is sound
    np.testing.assert_array_equal(read_verified(tmp_path / "e.h5", "logits"), arrays(1)["logits"])


def test_every_writer_reports_a_full_disk(tmpfs):
    """npz chunks (extraction), JSON records, torch weights (an error without errno: judged by the
    file system) and HDF5 files on a real 1 MiB tmpfs: one CacheWriteError each, nothing left over."""
    import torch

    root = tmpfs("1m")
    big = arrays(1.5)
    with pytest.raises(CacheWriteError, match=r"no space left on device \(needs about 1\.\d MB, 1\.0 MB free\)"):
        _save_chunk(root / "e.h5.partial" / "chunk-000000.npz", big, ("logits", "labels"))
    with pytest.raises(CacheWriteError, match="no space left on device"):  # past the check: written until full
        with atomic_target(root / "runs" / "digits.json") as tmp:
            tmp.write_text("x" * 2_000_000)
    with pytest.raises(CacheWriteError, match=f"cannot write to {root / 'weights'}: no space left on device"):
        with atomic_target(root / "weights" / "net.pt") as tmp:  # as the weights writer does
            torch.save({"w": torch.zeros(400_000)}, tmp)  # torch says only "unexpected pos 576 vs 534"
    with pytest.raises(CacheWriteError, match="no space left on device"):
        write_h5_atomic(root / "bk" / "e.h5", big, {"n": 1})
    assert leftovers(root) == []


# ---------------------------------------------------------------- read-only, not writable, in the way

@pytest.fixture
def readonly_cache(tmpfs, tmp_path):
    """A small synthetic cache (head, entries, a cached score, a corrupt entry, a held-before lock
    file) on a tmpfs remounted read-only, with its resolution."""
    root = tmpfs("8m")
    shape = {"features": 8, "classes": 3, "fit": 30, "id_test": 20, "ood": (15,)}
    fit, tests = write_synthetic_cache(root, shape)
    store = FeatureStore(root)
    key = "synthetic-imagenet"
    rel = {name: str(p.relative_to(root)) for name, p in zip(("id-fit", "id-test", "ood-0"), [fit, *tests])}
    backbone = ResolvedBackbone("synthetic", 0, key, {}, rel)
    resolution = Resolution("synthetic", "", "id", (0,), (MethodRef("energy"),), "id-fit", "id-test",
                            {"ood-0": ""}, None, [], [backbone], "id-val")
    evaluation = Evaluation(resolution, store, tmp_path / "out")
    cached = evaluation.scores(backbone, MethodRef("energy", {"T": 1.0}), evaluation.open_entries(backbone))
    corrupt = root / key / "broken.test.x.h5"
    corrupt.write_bytes(b"not hdf5")
    with file_lock(store.head_path(key)):  # leaves head.h5.lock behind, as any earlier run would
        pass
    (root / key / ".head.h5.tmp-999999999-abcd1234").write_bytes(b"a killed writer's")
    remount_read_only(root)
    return store, resolution, backbone, cached, corrupt


def test_readonly_cache_scores_still_work_uncached_and_warn_once(readonly_cache, tmp_path, caplog):
    store, resolution, backbone, cached, _ = readonly_cache
    root = store.root
    evaluation = Evaluation(resolution, store, tmp_path / "out")
    entries = evaluation.open_entries(backbone)
    with caplog.at_level(logging.WARNING):
        again = evaluation.scores(backbone, MethodRef("energy", {"T": 1.0}), entries)  # cached before: read
        t3 = evaluation.scores(backbone, MethodRef("energy", {"T": 3.0}), entries)  # new: computed, not cached
        t4 = evaluation.scores(backbone, MethodRef("energy", {"T": 4.0}), entries)
    for label in ("id-test", "ood-0"):
        np.testing.assert_array_equal(again[label].scores, cached[label].scores)
        np.testing.assert_allclose(t3[label].scores, energy(entries[label].logits, 3.0), rtol=1e-12)
        np.testing.assert_allclose(t4[label].scores, energy(entries[label].logits, 4.0), rtol=1e-12)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # said once, for every uncached score of the process
    assert warnings[0].startswith(f"scores are not cached: cannot write to {root / backbone.key}")
    assert "read-only file system" in warnings[0] and "the next run computes them again" in warnings[0]
    assert f"{root / backbone.key / 'scores'}" in warnings[0]


def test_readonly_cache_records_nothing_and_says_so(readonly_cache, caplog):
    store, resolution, *_ = readonly_cache
    with caplog.at_level(logging.WARNING):
        assert save_record(store.root / "runs" / "synthetic.json", resolution, []) is None
        assert save_record(store.root / "runs" / "synthetic.json", resolution, []) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "read-only file system" in warnings[0] and "resolves it again" in warnings[0]


def test_readonly_cache_writes_that_must_happen_raise_one_clear_error(readonly_cache):
    store, resolution, backbone, _, corrupt = readonly_cache
    folder = store.root / backbone.key
    message = f"cannot write to {folder}: it is on a read-only file system; remount it read-write or point " \
              "--cache-dir elsewhere"
    new_entry = store.entry_path(backbone.key, "cifar10", "test", "k" * 16)
    with pytest.raises(CacheWriteError) as caught:
        write_h5_atomic(new_entry, arrays(0.01), {"n": 1})
    assert str(caught.value) == message and caught.value.errno == errno.EROFS and caught.value.read_only
    with pytest.raises(CacheWriteError, match="read-only file system"):  # an extraction chunk, in a new folder
        _save_chunk(folder / "x.h5.partial" / "chunk.npz", arrays(0.01), ("logits",))
    ran = []
    with pytest.raises(CacheWriteError) as caught:  # the lock of an entry to compute: before any work
        with file_lock(new_entry):
            ran.append(True)
    assert str(caught.value) == message and ran == []
    with file_lock(store.head_path(backbone.key)):  # a complete file: read under its (read-only) lock
        ran.append("head")
    with file_lock(store.root / backbone.entries["id-fit"]):
        ran.append("entry without a lock file")
    assert ran == ["head", "entry without a lock file"]
    with pytest.raises(CacheWriteError, match="read-only file system"):
        ensure_writable(folder)
    with pytest.raises(CacheCorrupt, match="could not be moved aside"):  # never used, never an OSError
        store.open_entry(corrupt)
    with pytest.raises(CacheWriteError, match="read-only file system"):
        store.remove([corrupt])
    assert [t.stale for t in store.temporaries()] == [True]
    with pytest.raises(CacheWriteError, match=f"cannot write to {folder}: it is on a read-only file system"):
        store.remove_stale()


def test_permission_denied_and_a_file_in_the_way(tmp_path):
    """EACCES/EPERM from any writer (injected: root ignores permissions), and a cache path that is a file."""
    for code in (errno.EACCES, errno.EPERM):
        with pytest.raises(CacheWriteError) as caught:
            with atomic_target(tmp_path / "bk" / "e.h5") as tmp:
                raise PermissionError(code, os.strerror(code), str(tmp))
        assert caught.value.read_only and str(caught.value).startswith(
            f"cannot write to {tmp_path / 'bk'}: permission denied (user ")
    blocker = tmp_path / "cache"
    blocker.write_text("a file, not the cache folder")
    for target in (blocker / "bk" / "e.h5", blocker / "e.h5"):
        with pytest.raises(CacheWriteError) as caught:
            write_h5_atomic(target, arrays(0.01), {"n": 1})
        assert caught.value.errno == errno.ENOTDIR and not caught.value.read_only
        assert f": {blocker} is a file, not a directory; move it away or point --cache-dir elsewhere" \
            in str(caught.value)
    err = pickle.loads(pickle.dumps(caught.value))  # crosses joblib's process boundary intact
    assert (type(err), str(err), err.errno, err.directory) == (CacheWriteError, str(caught.value), errno.ENOTDIR,
                                                                caught.value.directory)
    assert leftovers(tmp_path) == ["cache"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_folder_without_write_permission(tmp_path):
    folder = tmp_path / "bk"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(CacheWriteError, match=f"cannot write to {folder}: permission denied"):
            write_h5_atomic(folder / "e.h5", arrays(0.01), {"n": 1})
    finally:
        folder.chmod(0o755)


# ---------------------------------------------------------------- temporaries of killed writers

KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from extract.cachefiles import atomic_target
with atomic_target(Path(sys.argv[1])) as tmp:
    tmp.write_bytes(b"half an entry")
    print(tmp, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def killed_writer(target: Path) -> tuple[Path, int]:
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    return Path(done.stdout.strip()), int(Path(done.stdout.strip()).name.split("-")[-2])


def test_temporaries_of_killed_writers_are_listed_and_removed(tmp_path):
    store = FeatureStore(tmp_path)
    target = store.entry_path("bk", "digits", "test", "dk")
    stale, pid = killed_writer(target)
    live = target.with_name(temporary_name(target.name))  # this process, writing now
    live.write_bytes(b"in progress")
    reused = target.with_name(f".{target.name}.tmp-{os.getpid()}-{cachefiles.host_tag()}0badf00d1234")
    reused.write_bytes(b"old")  # this pid, but another process's identity: the writer's pid was reused
    other_host = "0" * 8 if cachefiles.host_tag() != "0" * 8 else "1" * 8
    remote = target.with_name(f".{target.name}.tmp-{pid}-{other_host}123456781234")
    remote.write_bytes(b"another host's write")
    legacy = tmp_path / "runs" / ".digits.json.tmp-999999999-abcd1234"  # an old name: no host tag, no such pid
    legacy.parent.mkdir()
    legacy.write_bytes(b"{")

    found = {t.path: t for t in store.temporaries()}
    assert set(found) == {stale, live, reused, remote, legacy}
    assert (found[stale].pid, found[stale].alive, found[stale].stale, found[stale].target) == (pid, False, True, target)
    assert found[stale].bytes == len(b"half an entry") and "writer pid" in found[stale].describe()
    assert (found[live].pid, found[live].alive) == (os.getpid(), True)
    assert found[reused].alive is False and found[remote].alive is None and found[legacy].alive is False
    assert store.files() == [] and store.listing() == []  # never taken for entries

    removed = store.remove_stale()
    assert sorted(t.path for t in removed) == sorted([stale, reused, legacy])
    assert sorted(t.path for t in store.temporaries()) == sorted([live, remote])


def test_the_next_writer_of_an_entry_removes_its_stale_temporaries(tmp_path):
    target = tmp_path / "bk" / "e.h5"
    stale, _ = killed_writer(target)
    other, _ = killed_writer(tmp_path / "bk" / "other.h5")
    live = target.with_name(temporary_name(target.name))
    live.write_bytes(b"in progress")
    write_h5_atomic(target, arrays(0.01), {"n": 1})
    assert not stale.exists() and live.exists() and other.exists()  # only the same target's, only stale ones


def test_a_live_writer_on_this_host_is_never_taken_for_stale(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        identity = cachefiles.process_identity(child.pid)
        assert identity is not None and identity != cachefiles.process_identity(os.getpid())
        named = tmp_path / f".e.h5.tmp-{child.pid}-{cachefiles.host_tag()}{identity}abcd"
        named.write_bytes(b"x")
        reused = tmp_path / f".f.h5.tmp-{child.pid}-{cachefiles.host_tag()}{'0' * 7}1abcd"  # another identity
        reused.write_bytes(b"x")
        legacy = tmp_path / f".g.h5.tmp-{child.pid}-abcd1234"  # no identity: judged by the file's age
        legacy.write_bytes(b"x")  # written after the child started: it can be the writer
        alive = {p.name[1:4]: cachefiles.temporary(p).alive for p in (named, reused, legacy)}
        assert alive == {"e.h": True, "f.h": False, "g.h": True}
        assert [t.path for t in FeatureStore(tmp_path).remove_stale()] == [reused]
        os.utime(legacy, (time.time() - 3600, time.time() - 3600))  # written before it started: pid reused
        assert cachefiles.temporary(legacy).alive is False
    finally:
        child.kill()
        child.wait()
    assert cachefiles.temporary(named).alive is False  # exited
    assert sorted(p.name for p in tmp_path.iterdir()) == [named.name, legacy.name]


# ---------------------------------------------------------------- lock waits say who and since when

def _hold(path, acquired, release):
    with file_lock(Path(path)):
        acquired.set()
        release.wait(20)


def test_a_lock_wait_says_what_it_waits_for_and_since_when(tmp_path, caplog):
    ctx = multiprocessing.get_context("fork")
    path = tmp_path / "entry.h5"
    acquired, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(path), acquired, release))
    holder.start()
    try:
        assert acquired.wait(20)
        record = json.loads(path.with_name("entry.h5.lock").read_text())
        assert record["pid"] == holder.pid and abs(record["since"] - time.time()) < 20
        threading.Timer(1.0, release.set).start()
        started = time.time()
        with caplog.at_level(logging.WARNING, logger="extract.cachefiles"):
            with file_lock(path, report_after=0.1, report_every=0.3):
                waited = time.time() - started
    finally:
        release.set()
        holder.join(20)
    assert 0.8 < waited < 10
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    waits = [m for m in messages if m.startswith("waiting for")]
    assert len(waits) >= 2, messages  # said at once (after report_after), then again every report_every
    assert re.match(rf"waiting for {re.escape(str(path))}: locked since \d\d:\d\d:\d\d by pid {holder.pid} \(.*, "
                    r"writing it\); waiting since \d\d:\d\d:\d\d \(\d+ s so far\)$", waits[0]), waits[0]
    assert messages[-1].startswith(f"got the lock of {path} after waiting")
    assert path.with_name("entry.h5.lock").read_text() == ""  # released: nothing recorded


def test_a_lock_held_by_the_orphans_of_a_dead_run_says_so(tmp_path, caplog):
    path = tmp_path / "entry.h5"
    lock = path.with_name("entry.h5.lock")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    lock.write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "since": time.time() - 360,
                                "command": "oodbench run digits"}))
    with open(lock, "r") as orphan:  # what a worker that inherited the lock still holds
        fcntl.flock(orphan.fileno(), fcntl.LOCK_EX)
        threading.Timer(0.5, fcntl.flock, (orphan.fileno(), fcntl.LOCK_UN)).start()
        with caplog.at_level(logging.WARNING, logger="extract.cachefiles"):
            with file_lock(path, report_after=0.05, report_every=5):
                pass
    wait = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for"))
    assert f"by pid {dead} (oodbench run digits, writing it)" in wait
    assert f"pid {dead} has exited, so a process it started (an orphaned DataLoader worker?) still holds the lock" \
           in wait and f"`fuser -v {lock}`" in wait


FORKING_HOLDER = """
import os, sys, time
from pathlib import Path
from extract.cachefiles import file_lock
with file_lock(Path(sys.argv[1])):
    child = os.fork()
    if child == 0:
        for fd in (1, 2):  # let the test's pipes close
            os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
        time.sleep(30)  # a worker that outlives its parent
        os._exit(0)
    print(child, flush=True)
    os._exit(0)  # killed while holding the lock: no release
"""


def test_a_forked_child_does_not_keep_its_parents_lock(tmp_path):
    path = tmp_path / "entry.h5"
    done = subprocess.run([sys.executable, "-c", FORKING_HOLDER, str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    child = int(done.stdout)
    try:
        os.kill(child, 0)  # the orphan is still running...
        with open(path.with_name("entry.h5.lock")) as handle:  # ...and the lock is free all the same
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.kill(child, signal.SIGKILL)
