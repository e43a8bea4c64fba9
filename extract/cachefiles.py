"""Cache files on disk: atomic writes, writes that cannot happen, temporaries and locks.

Every file of the cache (HDF5 entries, extraction chunks, weights, records) is written through
``atomic_target``: to a hidden temporary beside its final name (``.<name>.tmp-<pid>-<hex>``),
then renamed, so a file under its final name is complete. A write that cannot happen (full
disk, quota, read-only file system, no permission, a file in the way) is one ``CacheWriteError``
naming the directory and the reason, checked before writing where it can be. Temporaries left by
killed writers are found (``temporary``) and removed (``remove_stale_temporaries``) without ever
touching a live writer's. ``file_lock`` keeps two processes from writing one file and says, while
it waits, who holds it and since when. Nothing here knows HDF5 or OOD detection.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- writes that cannot happen

# The errors that mean "this directory cannot take the file", not "the file's contents are wrong".
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR})
READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})  # a cache this user can read, not write
FULL_BELOW = 1 << 20  # a write that failed with less than this free (in bytes) failed for want of space
FIX = "point --cache-dir elsewhere"


class CacheWriteError(OSError):
    """A cache write that cannot happen: no space left (or quota), a read-only file system, no
    permission, or a file where the cache needs a directory.

    The message is self-contained (the CLI prints it as one ``error:`` line): the directory, the
    reason and, for a full disk, the space needed and free. Attributes: ``directory``, ``errno``
    (ENOSPC, EDQUOT, EROFS, EACCES, EPERM or ENOTDIR), ``needed`` and ``free`` (bytes, or None).
    Nothing is left half-written: the temporary file of the write is removed.
    """

    def __init__(self, message: str, *, directory: Path | None = None, code: int | None = None,
                 needed: int | None = None, free: int | None = None):
        super().__init__(message)
        self.errno = code  # ``strerror`` stays None, so str() is the message alone
        self.directory, self.needed, self.free = directory, needed, free

    @property
    def read_only(self) -> bool:
        """The cache is read-only to this process (a read-only file system, or no permission), as
        opposed to full or in the way: what can skip caching may go on without it."""
        return self.errno in READ_ONLY_ERRNOS

    def __reduce__(self):  # pickled across joblib workers with its attributes
        return (type(self), (self.args[0],),
                {"errno": self.errno, "directory": self.directory, "needed": self.needed, "free": self.free})

    @classmethod
    def about(cls, directory: Path, code: int, needed: int | None = None) -> CacheWriteError:
        """The error for ``directory`` failing with ``code``, its message naming the reason and the fix."""
        directory = Path(directory)
        free = free_bytes(directory) if code in (errno.ENOSPC, errno.EDQUOT) else None
        where = f"cannot write to {directory}"
        if code in (errno.ENOSPC, errno.EDQUOT):
            sizes = [f"needs about {_size(needed)}"] if needed else []
            sizes += [f"{_size(free)} free"] if free is not None else []
            what = "no space left on device" if code == errno.ENOSPC else "disk quota exceeded"
            detail = f" ({', '.join(sizes)})" if sizes else ""
            message = f"{where}: {what}{detail}; free some space or {FIX}"
        elif code == errno.EROFS:
            message = f"{where}: it is on a read-only file system; remount it read-write or {FIX}"
        elif code == errno.ENOTDIR:
            blocker = nearest_existing(directory)
            message = f"{where}: {blocker} is a file, not a directory; move it away or {FIX}"
        else:
            message = f"{where}: permission denied (user {_user()} may not create files there); fix its " \
                      f"permissions or {FIX}"
        return cls(message, directory=directory, code=code, needed=needed, free=free)


def _size(count: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError, AttributeError):
        return str(getattr(os, "geteuid", lambda: "?")())


def nearest_existing(directory: Path) -> Path:
    """``directory`` or its nearest ancestor that exists (where a new folder would be made)."""
    return next((p for p in (directory, *directory.parents) if p.exists()), Path("/"))


def free_bytes(directory: Path) -> int | None:
    """Bytes free for this user on the file system that holds (or would hold) ``directory``."""
    try:
        return shutil.disk_usage(nearest_existing(Path(directory))).free
    except OSError:
        return None


def _unwritable(directory: Path) -> int | None:
    """Why no file can be created in ``directory`` (made when missing), as an errno, or None."""
    base = nearest_existing(Path(directory))
    if not base.is_dir():
        return errno.ENOTDIR
    try:
        flags = os.statvfs(base).f_flag
    except OSError:
        flags = 0
    if flags & os.ST_RDONLY:
        return errno.EROFS
    if not os.access(base, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        return errno.EACCES
    return None


def move_aside(path: Path) -> Path | None:
    """Rename a damaged cache file to ``<name>.corrupt``, where it is never read again (``cache
    verify`` lists it); the new path, or None when another process moved or removed it first. Any
    other failure (a read-only cache) is the caller's ``OSError``."""
    quarantine = path.with_name(path.name + ".corrupt")
    try:
        os.replace(path, quarantine)
    except FileNotFoundError:
        return None
    return quarantine


_SKIPPED_WRITES: set[str] = set()  # the optional writes this process said it skipped (once each)


def skip_read_only(err: CacheWriteError, what: str, message: str) -> None:
    """An optional write (a cache of what can be computed again) that failed with ``err``: raised
    again unless the cache is read-only to this process (a read-only file system, no permission);
    then it is skipped, and ``message`` is logged as a warning once per process and ``what``."""
    if not err.read_only:
        raise err
    if what not in _SKIPPED_WRITES:
        _SKIPPED_WRITES.add(what)
        log.warning("%s", message)


def ensure_writable(directory: Path, needed: int | None = None) -> None:
    """Raise ``CacheWriteError`` now, before any work, when ``directory`` cannot take new files: a
    file in its way, a read-only file system, no permission or, given ``needed`` bytes, less free."""
    code = _unwritable(directory)
    if code is not None:
        raise CacheWriteError.about(directory, code)
    if needed is not None:
        free = free_bytes(directory)
        if free is not None and free < needed:
            raise CacheWriteError.about(directory, errno.ENOSPC, needed)


def write_failure(err: BaseException, directory: Path) -> int | None:
    """The errno that makes ``err``, raised while writing into ``directory``, a ``CacheWriteError``, or
    None when it is no write failure. Libraries that hide the errno (torch's zip writer says "unexpected
    pos", h5py "Can't close dataset") are judged by the file system: read-only, or nearly full."""
    if isinstance(err, CacheWriteError):
        return err.errno
    if isinstance(err, FileExistsError):  # mkdir: a file where the directory should be
        return errno.ENOTDIR if not nearest_existing(Path(directory)).is_dir() or Path(directory).is_file() else None
    if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
        return err.errno
    if not isinstance(err, (OSError, RuntimeError)):
        return None
    text = str(err)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        if os.strerror(code) in text or f"errno = {code}," in text:
            return code
    code = _unwritable(directory)
    if code is not None:
        return code
    free = free_bytes(directory)
    return errno.ENOSPC if free is not None and free < FULL_BELOW else None


# ---------------------------------------------------------------- temporary files of writes

# .<target>.tmp-<pid>-<hex>; hex: <host 8><writer identity 8><random 4>, or 8 random (older names)
TEMPORARY = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<pid>\d+)-(?P<tag>[0-9a-f]{20}|[0-9a-f]{8})$")
UNKNOWN_IDENTITY = "0" * 8
START_SLACK = 2.0  # seconds: /proc gives a process's start to within the second of the boot time


@functools.lru_cache(maxsize=None)
def host_tag() -> str:
    """Eight hex digits of this host's name: a writer's pid means something only on the host that
    wrote it (a cache on a shared file system)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


@functools.lru_cache(maxsize=None)
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat from the state on ([state, ppid, ...]); None when unreadable.
    Raises ProcessLookupError when /proc exists and the process does not."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            raise ProcessLookupError(pid) from None
        return None
    except (OSError, IndexError):
        return None


def process_identity(pid: int) -> str | None:
    """Eight hex digits that name process ``pid`` for its whole life and no other process: a hash of
    this boot's id and the process's start time (Linux /proc). None where that cannot be read."""
    try:
        fields = _proc_stat(pid)
    except ProcessLookupError:
        return None
    if fields is None or not _boot_id():
        return None
    return hashlib.sha256(f"{_boot_id()}:{fields[19]}".encode()).hexdigest()[:8]


@functools.lru_cache(maxsize=None)
def _own_identity(pid: int) -> str:
    return process_identity(pid) or UNKNOWN_IDENTITY


def temporary_name(target: str) -> str:
    """``.<target>.tmp-<pid>-<host><identity><random>``: beside the target, hidden, never listed as
    an entry; the name says which host and which process (see ``process_identity``) writes it."""
    pid = os.getpid()
    return f".{target}.tmp-{pid}-{host_tag()}{_own_identity(pid)}{uuid.uuid4().hex[:4]}"


@dataclass(frozen=True)
class Temporary:
    """A temporary file of a write in progress, or left by a writer that was killed."""

    path: Path
    target: Path  # the file it becomes when its write completes
    pid: int  # its writer
    alive: bool | None  # whether the writer still runs: None when it ran on another host (cannot tell)
    bytes: int
    modified: float  # mtime, seconds since the epoch

    @property
    def stale(self) -> bool:
        """Its writer is gone: the file will never be completed and can be removed."""
        return self.alive is False

    def describe(self) -> str:
        state = {True: "still writing", False: "gone", None: "on another host"}[self.alive]
        return f"{self.path} ({_size(self.bytes)}, for {self.target.name}; writer pid {self.pid} {state})"


@functools.lru_cache(maxsize=None)
def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def writer_alive(pid: int, identity: str | None = None, modified: float | None = None) -> bool:
    """Whether process ``pid`` of this host is still the writer that ran under that pid.

    It must exist and not be a zombie. A pid is reused once its process is gone, so with the
    writer's ``identity`` (``process_identity`` when it started writing) the process must be that
    very one; without it (older names), it must have started before ``modified`` (the file's last
    write, give or take ``START_SLACK``). Without /proc an existing pid counts as alive: a reused
    pid then keeps a stale file, never the reverse. Limit: a writer in another pid namespace under
    the same host name (containers sharing a cache and a hostname) is invisible from here; give
    such containers their own hostnames (Docker's default)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process, which exists
        pass
    try:
        fields = _proc_stat(pid)
    except ProcessLookupError:
        return False
    if fields is None:
        return True
    if fields[0] in ("Z", "X"):  # exited, not yet reaped: it writes nothing more
        return False
    if identity and identity != UNKNOWN_IDENTITY and _boot_id():
        return process_identity(pid) == identity
    boot = _boot_time()
    if modified is None or boot is None:
        return True
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK") <= modified + START_SLACK


def temporary(path: Path) -> Temporary | None:
    """The ``Temporary`` that ``path`` is (None when its name is no temporary's, or it is gone)."""
    match = TEMPORARY.match(path.name)
    if not match:
        return None
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    pid, tag = int(match["pid"]), match["tag"]
    if len(tag) == 8:  # an older name: no host, no identity; taken for this host's
        alive = writer_alive(pid, modified=st.st_mtime)
    else:
        alive = writer_alive(pid, tag[8:16], st.st_mtime) if tag[:8] == host_tag() else None
    return Temporary(path, path.with_name(match["target"]), pid, alive, st.st_size, st.st_mtime)


def remove_stale_temporaries(paths, quiet: bool = True) -> list[Temporary]:
    """Remove the temporaries among ``paths`` whose writer is gone (checked again just before); the
    removed ones. One that cannot be removed (a read-only cache) is left alone when ``quiet``, else
    it is a ``CacheWriteError``."""
    removed = []
    for path in paths:
        found = temporary(Path(path))
        if found is None or not found.stale:
            continue
        try:
            found.path.unlink()
        except FileNotFoundError:
            continue
        except OSError as err:
            code = write_failure(err, found.path.parent)
            if quiet:
                log.debug("cannot remove stale temporary %s: %s", found.path, err)
                continue
            if code is None:
                raise
            raise CacheWriteError.about(found.path.parent, code) from err
        removed.append(found)
    return removed


def _temporaries_of(path: Path) -> list[Path]:
    prefix = f".{path.name}.tmp-"
    try:
        with os.scandir(path.parent) as entries:
            return [path.parent / e.name for e in entries if e.name.startswith(prefix)]
    except OSError:
        return []


@contextlib.contextmanager
def atomic_target(path: Path, needed: int | None = None):
    """A temporary path beside ``path`` to write to; it replaces ``path`` (fsynced, one rename) when
    the block completes and is removed when it fails, so readers see the old file or the whole new
    one, never part of it.

    Every cache writer goes through here, so here a write that cannot happen becomes one
    ``CacheWriteError`` naming the directory and the reason: checked first (a file in the way, a
    read-only file system, no permission, less free space than ``needed`` bytes when given), and
    translated when the write fails (no space, quota, read-only, permission). Temporaries of the same
    target left by writers that are gone (killed) are removed first."""
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        code = write_failure(err, directory)
        if code is None:
            raise
        raise CacheWriteError.about(directory, code, needed) from err
    remove_stale_temporaries(_temporaries_of(path))  # first: their space counts as free
    ensure_writable(directory, needed)
    tmp = path.with_name(temporary_name(path.name))
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except CacheWriteError:
        raise
    except Exception as err:
        code = write_failure(err, directory)  # judged before the temporary's space is given back
        if code is None:
            raise
        _unlink_quietly(tmp)
        raise CacheWriteError.about(directory, code, needed) from err
    finally:
        _unlink_quietly(tmp)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # a read-only file system: nothing was written there either
        pass


# ---------------------------------------------------------------- the per-entry lock

LOCK_REPORT_AFTER = 2.0  # seconds of waiting before a lock wait is reported (shards wait briefly all the time)
LOCK_REPORT_EVERY = 60.0  # and then every this many seconds while it lasts
_HELD_LOCKS: set[int] = set()  # the fd of each lock file this process has open


def _forget_inherited_locks() -> None:
    """In a child just forked (a DataLoader worker, a multiprocessing process): close the lock files
    inherited from the parent. A flock belongs to the open file, which every forked copy shares, so
    a child outliving a killed parent would otherwise keep the entry locked; closing the child's
    copy leaves the parent's lock as it is."""
    for fd in list(_HELD_LOCKS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited_locks)


def _holder_record() -> bytes:
    command = " ".join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]])
    pid = os.getpid()
    return json.dumps({"pid": pid, "identity": _own_identity(pid), "host": socket.gethostname(),
                       "since": time.time(), "command": command[:200]}).encode() + b"\n"


def lock_holder(lock_path: Path) -> dict | None:
    """What the holder of ``lock_path`` recorded when it took the lock: pid, identity (see
    ``process_identity``), host, since (epoch seconds), command. None when nothing is recorded (free,
    or held by an older harness)."""
    try:
        record = json.loads(Path(lock_path).read_text() or "null")
        return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _clock(seconds: float) -> str:
    moment = time.localtime(seconds)
    same_day = time.strftime("%Y-%m-%d", moment) == time.strftime("%Y-%m-%d")
    return time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S", moment)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min {seconds % 60:02d} s"


def lock_wait_message(path: Path, lock_path: Path, waiting_since: float) -> str:
    """What a process waiting for the lock of ``path`` says: who holds it since when, and how long
    it has waited."""
    holder = lock_holder(lock_path)
    waited = f"waiting since {_clock(waiting_since)} ({_duration(time.time() - waiting_since)} so far)"
    find = f"`fuser -v {lock_path}` shows who has it open"
    if holder is None:
        return (f"waiting for {path}: locked by a process that recorded nothing (an older oodbench, or one "
                f"taking it this moment); {waited}; {find}")
    pid, host = holder["pid"], holder.get("host")
    elsewhere = host and host != socket.gethostname()
    since = _clock(holder["since"]) if isinstance(holder.get("since"), (int, float)) else "?"
    who = f"pid {pid}" + (f" on {host}" if elsewhere else "")
    what = holder.get("command") or "another oodbench process"
    message = f"waiting for {path}: locked since {since} by {who} ({what}, writing it); {waited}"
    if not elsewhere and not writer_alive(pid, holder.get("identity"), float(holder.get("since") or time.time())):
        message += (f"; pid {pid} has exited, so a process it started (an orphaned DataLoader worker?) still "
                    f"holds the lock: {find}, and ending that process frees it")
    return message


def _open_lock(path: Path, lock_path: Path) -> int | None:
    """The lock file, open (created when missing), or None when there is none to take and none is
    needed. When it cannot be created or written (a read-only cache, a full disk, another user's lock
    file): opened read-only (flock needs no write access) if it exists; without one, the caller may
    go on only when ``path`` is already there (it then only reads it), else ``CacheWriteError``."""
    directory = lock_path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        return os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as err:
        code = write_failure(err, directory)
        if code is None:
            raise
        failure = CacheWriteError.about(directory, code)
        failure.__cause__ = err
    try:
        fd = os.open(lock_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        fd = None
    if path.exists() or (fd is not None and _unwritable(directory) is None):
        return fd
    if fd is not None:
        os.close(fd)
    raise failure


@contextlib.contextmanager
def file_lock(path: Path, *, report_after: float = LOCK_REPORT_AFTER, report_every: float = LOCK_REPORT_EVERY):
    """An exclusive advisory lock on ``path``.lock, so two processes never write one entry.

    Taken without blocking when free. When busy, the process waits and says so (a ``logging``
    warning, shown under ``--quiet`` too) after ``report_after`` seconds and then every
    ``report_every``: what it waits for, who holds it since when (the holder records its pid, host,
    start time and command in the lock file), and, when that pid has exited, that a process it
    started still holds it. A lock never outlives the process that took it in a forked child.

    On a cache that cannot be written (read-only, full, another user's): the lock is taken through a
    read-only handle, or skipped when ``path`` is already complete (the caller only reads it);
    otherwise ``CacheWriteError`` is raised before any work is done."""
    lock_path = path.with_name(path.name + ".lock")
    fd = _open_lock(path, lock_path)
    if fd is None:
        yield
        return
    owner = os.getpid()
    _HELD_LOCKS.add(fd)
    try:
        _acquire(fd, path, lock_path, report_after, report_every)
        _record(fd, _holder_record())
        try:
            yield
        finally:
            if os.getpid() == owner:  # a forked child leaving this block releases nothing (its copy is closed)
                _record(fd, b"")
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        if os.getpid() == owner:
            _HELD_LOCKS.discard(fd)
            with contextlib.suppress(OSError):
                os.close(fd)


def _record(fd: int, data: bytes) -> None:
    """Best effort: a lock opened read-only or on a full disk records nothing and still locks."""
    try:
        os.ftruncate(fd, 0)
        if data:
            os.pwrite(fd, data, 0)
    except OSError:
        pass


def _acquire(fd: int, path: Path, lock_path: Path, report_after: float, report_every: float) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    waiting_since, started = time.time(), time.monotonic()
    report_at, delay = started + report_after, 0.005
    while True:
        if time.monotonic() >= report_at:
            log.warning("%s", lock_wait_message(path, lock_path, waiting_since))
            report_at = time.monotonic() + report_every
        time.sleep(min(delay, max(0.0, report_at - time.monotonic()) + 0.001))
        delay = min(delay * 2, 0.25)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            continue
    waited = time.monotonic() - started
    (log.warning if waited >= report_after else log.debug)("got the lock of %s after waiting %s", path,
                                                             _duration(waited))
