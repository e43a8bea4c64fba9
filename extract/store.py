"""The HDF5 feature store: one file per (backbone entry, dataset, split), keyed by content.

Layout under the cache root::

    <root>/<backbone_key>/head.h5                        W (C,D), b (C,), attrs: backbone description
    <root>/<backbone_key>/<dataset>.<split>.<data_key>.h5
        logits (N,C) float32, features (N,D) float32, labels (N,) int64,
        activations/<layer> (N,...) for configured layers
        attrs: meta (JSON: backbone, dataset, split, fingerprint, layers, ...), format_version
    <root>/<backbone_key>/derived/<dataset>.<split>.<method>.<derived_key>.h5
        a network method's outputs on that entry's images (ASH at an inner layer, ODIN, ...):
        logits, features, labels (+ predictions where the method classifies from another pass),
        keyed by the entry's data_key, the method and the parameters of its network pass
    <root>/<backbone_key>/scores/<method>.<score_key>.h5  per-sample scores and predictions
    <root>/weights/                                      trained weights (extract.training)

Every file is written atomically (``extract.cachefiles.atomic_target``: a temporary, then a
rename), so a file under its final name is complete; a write that cannot happen is one
``CacheWriteError``. Every array carries its sha256 as an attribute and is stored with HDF5's
fletcher32 chunk checksums; reads verify the sha256, so a truncated or bit-flipped file raises
``CacheCorrupt`` instead of being used. Plain h5py reads everything.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import h5py
import numpy as np

from extract.cachefiles import (
    CacheWriteError,
    Temporary,
    atomic_target,
    file_lock,
    move_aside,
    remove_stale_temporaries,
    temporary,
    write_failure,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
HEAD_FILE = "head.h5"
DERIVED_DIR = "derived"


class CacheCorrupt(RuntimeError):
    """A cache file exists but cannot be trusted (truncated, bit-flipped, wrong format)."""


class CacheMissing(LookupError):
    """A cache entry that a command needs has not been computed."""


def array_digest(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}|{array.shape}|".encode())
    digest.update(array.reshape(-1).view(np.uint8))  # the buffer itself, not a copy of its bytes
    return digest.hexdigest()


def content_key(*parts) -> str:
    """16 hex digits of sha256 over the JSON of ``parts``: the store's content keys."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def metadata_digest(version, meta_text: str, array_digests: dict[str, str]) -> str:
    """sha256 over what a file says about itself: format version, meta JSON, array names and digests."""
    return hashlib.sha256(json.dumps([int(version), meta_text, array_digests], sort_keys=True).encode()).hexdigest()


class _DeferredErrorFile:
    """The file object h5py writes an HDF5 file through (its ``fileobj`` driver), failing no write.

    HDF5 cannot recover from a failed write: with a full disk, closing a dataset whose chunk cache
    cannot be flushed fails half-way, leaving a freed dataset among the file's open objects, and
    closing the file then flushes it (H5F__dest -> H5D_flush_all) - a segmentation fault, or one at
    interpreter exit when the close raised first. So HDF5 never sees a failure: the first one (or a
    Ctrl-C) is kept, later writes are dropped, HDF5 completes and closes normally, and
    ``raise_deferred`` raises it afterwards. Reads return what is on disk (zeros past it)."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
        self.position = self.size = 0
        self.error: BaseException | None = None

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.position, os.SEEK_END: self.size}[whence]
        self.position = base + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        count = len(view)
        try:
            if self.error is None:
                done = 0
                while done < count:
                    written = os.pwrite(self.fd, view[done:], self.position + done)
                    if written <= 0:
                        raise OSError(errno.EIO, f"short write at byte {self.position + done}")
                    done += written
        except BaseException as err:  # noqa: B036 - a Ctrl-C too: raised once HDF5 has closed the file
            self.error = err
        self.position += count
        self.size = max(self.size, self.position)
        return count

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        try:
            data = os.pread(self.fd, len(view), self.position)
        except BaseException as err:  # noqa: B036
            self.error = self.error or err
            data = b""
        view[:len(data)] = data
        view[len(data):] = bytes(len(view) - len(data))
        self.position += len(view)
        return len(view)

    def read(self, size: int = -1) -> bytes:
        buffer = bytearray(max(0, self.size - self.position) if size < 0 else size)
        self.readinto(buffer)
        return bytes(buffer)

    def truncate(self, size: int | None = None) -> int:
        size = self.position if size is None else size
        try:
            if self.error is None:
                os.ftruncate(self.fd, size)
        except BaseException as err:  # noqa: B036
            self.error = err
        self.size = size
        return size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def raise_deferred(self) -> None:
        if self.error is not None:
            raise self.error


def h5_bytes_needed(arrays: dict[str, np.ndarray]) -> int:
    """A generous estimate of the file ``write_h5_atomic`` makes of ``arrays``: the raw bytes plus
    1% and 256 kB (HDF5 metadata, chunk index, checksums; compressed activations take less)."""
    raw = sum(int(np.asarray(array).nbytes) for array in arrays.values())
    return raw + raw // 100 + (256 << 10)


def write_h5_atomic(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Write ``arrays`` (names may contain '/') and ``meta`` to ``path`` atomically.

    Arrays are chunked along the first axis with fletcher32 checksums (gzip for activations,
    which are sparse after ReLU) and carry their sha256 in the ``sha256`` attribute. The file's
    ``checksum`` attribute covers the format version, the meta JSON and every array's name and
    sha256; HDF5's own metadata is checksummed too (file format v110).

    The free space is checked first (``h5_bytes_needed``), and HDF5 writes through
    ``_DeferredErrorFile``, so a disk that fills up meanwhile is one ``CacheWriteError`` (see
    ``atomic_target``), never a crash inside HDF5.
    """
    meta_text = json.dumps(meta, sort_keys=True)
    digests = {}
    with atomic_target(path, needed=h5_bytes_needed(arrays)) as tmp:
        sink = _DeferredErrorFile(tmp)
        try:
            _write_h5(sink, arrays, meta_text, digests)
        except Exception:
            if sink.error is None:
                raise
            # else HDF5 tripped over the writes dropped after the first failure: that failure is the cause
        finally:
            sink.close()
        sink.raise_deferred()
    return path


def _write_h5(sink, arrays: dict[str, np.ndarray], meta_text: str, digests: dict[str, str]) -> None:
    with h5py.File(sink, "w", libver=("v110", "latest")) as h5:
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            options = {}
            if array.size:
                row_bytes = max(1, array[:1].nbytes)
                options = {"chunks": (max(1, min(len(array), (1 << 20) // row_bytes)), *array.shape[1:]),
                           "fletcher32": True}
                if name.startswith("activations/"):
                    options.update(compression="gzip", compression_opts=1, shuffle=True)
            dataset = h5.create_dataset(name, data=array, **options)
            dataset.attrs["sha256"] = digests[name] = array_digest(array)
        h5.attrs["format_version"] = FORMAT_VERSION
        h5.attrs["meta"] = meta_text
        h5.attrs["checksum"] = metadata_digest(FORMAT_VERSION, meta_text, digests)


def read_header(path: Path) -> tuple[dict, dict[str, str]]:
    """Open ``path`` and return (metadata, {array name: sha256}), raising ``CacheCorrupt`` for anything
    unreadable or inconsistent with the file's ``checksum`` (a changed meta value, array list or digest)."""
    try:
        with h5py.File(path, "r") as h5:
            version = h5.attrs.get("format_version")
            meta_text = h5.attrs["meta"]
            checksum = h5.attrs["checksum"]
            digests = {}
            h5.visititems(lambda name, obj: digests.__setitem__(name, obj.attrs["sha256"])
                          if isinstance(obj, h5py.Dataset) else None)
            meta = json.loads(meta_text)
            if not isinstance(meta, dict):
                raise ValueError(f"metadata is a {type(meta).__name__}, not a mapping")
    except Exception as err:  # damaged HDF5 metadata surfaces as OSError, KeyError, RuntimeError, TypeError...
        raise CacheCorrupt(f"cache file {path} is unreadable ({err}); remove it with `oodbench cache rm`"
                           " or re-run to recompute it") from err
    if not (np.ndim(version) == 0 and version == FORMAT_VERSION):
        raise CacheCorrupt(f"cache file {path} has format version {version}, this harness writes "
                           f"{FORMAT_VERSION}; re-run to recompute it")
    if metadata_digest(version, meta_text, digests) != checksum:
        raise CacheCorrupt(f"cache file {path}: its metadata does not match its checksum (bit rot or "
                           "tampering); it will not be used")
    return meta, digests


def read_meta(path: Path) -> dict:
    """The metadata of a sound cache file (``CacheCorrupt`` otherwise)."""
    return read_header(path)[0]


def read_verified(path: Path, name: str) -> np.ndarray:
    """Read one array and check it against its stored sha256."""
    try:
        with h5py.File(path, "r") as h5:
            if name not in h5:
                raise CacheMissing(f"{path} has no array {name!r}")
            dataset = h5[name]
            array = dataset[()]
            expected = dataset.attrs["sha256"]
    except CacheMissing:
        raise
    except Exception as err:  # damaged HDF5 metadata surfaces as OSError, KeyError, RuntimeError, TypeError...
        raise CacheCorrupt(f"cache file {path}: array {name!r} is unreadable ({err})") from err
    if array_digest(array) != expected:
        raise CacheCorrupt(f"cache file {path}: array {name!r} does not match its checksum (bit rot or "
                           "tampering); it will not be used")
    return array


def verify_file(path: Path) -> list[str]:
    """Every problem found in one cache file (empty when it is sound): header, then each array."""
    try:
        _, digests = read_header(path)
    except CacheCorrupt as err:
        return [str(err)]
    problems = []
    for name in digests:
        try:
            read_verified(path, name)
        except (CacheCorrupt, CacheMissing) as err:
            problems.append(str(err))
    return problems


class CachedSplit:
    """Read-only view of one extracted (backbone, dataset, split) entry; arrays load lazily and verified.

    This is what scoring methods receive: ``logits``, ``features``, ``labels``, ``head`` (W, b)
    and ``activations(layer)``. Nothing here runs a network.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self.name = f"{self.meta['dataset']}/{self.meta['split']}"
        self._arrays: dict[str, np.ndarray] = {}

    def _read(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = read_verified(self.path, name)
        return self._arrays[name]

    @property
    def logits(self) -> np.ndarray:
        return self._read("logits")

    @property
    def features(self) -> np.ndarray:
        return self._read("features")

    @property
    def labels(self) -> np.ndarray:
        return self._read("labels")

    @property
    def head(self) -> tuple[np.ndarray, np.ndarray]:
        folder = self.path.parent.parent if self.meta.get("kind") == "derived" else self.path.parent
        head_path = folder / HEAD_FILE
        return read_verified(head_path, "W"), read_verified(head_path, "b")

    def activations(self, layer: str) -> np.ndarray:
        if layer not in self.meta["layers"]:
            raise CacheMissing(f"{self.path} has no activations for layer {layer!r} (cached layers: "
                               f"{self.meta['layers'] or 'none'}); add it to the benchmark's extraction layers")
        return self._read(f"activations/{layer}")

    def array(self, name: str) -> np.ndarray:
        """Any other array of the entry by name (e.g. a derived entry's ``predictions``)."""
        return self._read(name)

    def derived_key(self, method: str, network_key: dict) -> str:
        """Content key of a network method's outputs on this entry's images (``network_key``: what
        its network pass depends on)."""
        return content_key("derived", self.data_key, method, network_key)

    def derived_path(self, method: str, network_key: dict) -> Path:
        """Where those outputs are cached: in ``derived/`` beside this entry."""
        key = self.derived_key(method, network_key)
        return self.path.parent / DERIVED_DIR / f"{self.meta['dataset']}.{self.meta['split']}.{method}.{key}.h5"

    @property
    def data_key(self) -> str:
        return self.meta["data_key"]

    def __len__(self) -> int:
        return int(self.meta["n"])


class SplitRows:
    """Rows ``rows`` of a cache entry, read like the entry (``logits``, ``features``, ``labels``,
    ``head``, ``activations(layer)``): a method's own fit subset (a benchmark file's ``fit:``).
    ``data_key`` is the entry's keyed with ``spec``, so scores fitted on it are cached apart."""

    def __init__(self, entry: CachedSplit, rows: np.ndarray, spec: dict):
        self.entry, self.rows, self.spec = entry, np.asarray(rows), dict(spec)
        self.meta = {**entry.meta, "n": len(self.rows)}
        self.name = f"{entry.name} ({len(self.rows)} of {len(entry)} rows, {spec})"

    logits = property(lambda self: self.entry.logits[self.rows])
    features = property(lambda self: self.entry.features[self.rows])
    labels = property(lambda self: self.entry.labels[self.rows])
    head = property(lambda self: self.entry.head)

    def activations(self, layer: str) -> np.ndarray:
        return self.entry.activations(layer)[self.rows]

    @property
    def data_key(self) -> str:
        return content_key("rows", self.entry.data_key, self.spec)

    def __len__(self) -> int:
        return len(self.rows)


class FeatureStore:
    """The cache root: paths, heads, entries, scores and maintenance (ls / verify / rm)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def entry_path(self, backbone_key: str, dataset: str, split: str, data_key: str) -> Path:
        return self.root / backbone_key / f"{dataset}.{split}.{data_key}.h5"

    def head_path(self, backbone_key: str) -> Path:
        return self.root / backbone_key / HEAD_FILE

    def scores_path(self, backbone_key: str, method: str, score_key: str) -> Path:
        return self.root / backbone_key / "scores" / f"{method}.{score_key}.h5"

    def ensure_head(self, backbone) -> Path:
        """Write the backbone's head (W, b) and description once per backbone entry."""
        path = self.head_path(backbone.key)
        if path.exists() and not verify_file(path):
            return path
        weight, bias = backbone.head_parameters()
        with file_lock(path):
            return write_h5_atomic(path, {"W": weight, "b": bias},
                                   {"kind": "head", "backbone": backbone.describe()})

    def open_entry(self, path: Path) -> CachedSplit | None:
        """The entry at ``path``, or None when it is absent; a corrupt file is moved aside, never used."""
        if not path.exists():
            return None
        problems = verify_file(path)
        if problems:
            try:
                quarantine = move_aside(path)
            except OSError as err:  # a read-only cache: it stays, and is never used either
                raise CacheCorrupt(f"{path} failed verification and could not be moved aside ({err.strerror}); "
                                   "it will not be used: " + "; ".join(problems)) from err
            if quarantine is None:  # another process moved it aside (or removed it) meanwhile
                return None
            raise CacheCorrupt(f"{path} failed verification and was moved to {quarantine.name}: "
                               + "; ".join(problems))
        return CachedSplit(path)

    def files(self) -> list[Path]:
        """Every complete cache file (heads, entries, scores), trained weights with their snapshots
        and resume states, resolution records (``runs/*.json``, see harness.resolution) and
        quarantined ``*.corrupt`` files, sorted."""
        if not self.root.is_dir():
            return []
        patterns = ("*.h5", "*.corrupt", "weights/*.pt", "weights/*.snapshots/*.pt", "runs/*.json")
        return sorted(p for pattern in patterns for p in self.root.rglob(pattern) if not p.name.startswith("."))

    def listing(self) -> list[dict]:
        """One row per cache file for ``cache ls``: path, size, kind and what it holds."""
        rows = []
        for path in self.files():
            row = {"path": str(path.relative_to(self.root)), "bytes": path.stat().st_size}
            if path.suffix == ".pt":
                what = "a training snapshot" if path.parent.suffix == ".snapshots" else \
                    "a training resume state" if path.name.endswith(".resume.pt") else ""
                rows.append({**row, "kind": "weights", "what": what})
            elif path.suffix == ".json":
                rows.append({**row, "kind": "record", "what": "a benchmark resolved to its entries"})
            elif path.suffix == ".corrupt":
                rows.append({**row, "kind": "CORRUPT", "what": "moved aside, never read"})
            else:
                try:
                    meta = read_meta(path)
                    rows.append({**row, "kind": meta.get("kind", "?"), "what": meta.get("what", "")})
                except CacheCorrupt:
                    rows.append({**row, "kind": "CORRUPT", "what": "fails verification"})
        return rows

    def remove(self, paths: list[Path]) -> None:
        for path in paths:
            try:
                path.unlink(missing_ok=True)
                path.with_name(path.name + ".lock").unlink(missing_ok=True)
                partial = path.with_name(path.name + ".partial")
                if partial.is_dir():
                    shutil.rmtree(partial)
            except OSError as err:
                code = write_failure(err, path.parent)
                if code is None:
                    raise
                raise CacheWriteError.about(path.parent, code) from err

    def temporaries(self) -> list[Temporary]:
        """Every temporary file under the cache (``.<name>.tmp-<pid>-<hex>``, hidden from ``files``):
        writes in progress, and the leftovers of writers that were killed (``Temporary.stale``), each
        with its writer's pid and whether that writer still runs. For ``cache verify``."""
        if not self.root.is_dir():
            return []
        found = (temporary(p) for p in self.root.rglob(".*.tmp-*"))
        return sorted((t for t in found if t is not None), key=lambda t: t.path)

    def remove_stale(self) -> list[Temporary]:
        """Remove the temporaries whose writer is gone (``cache rm --stale``); the removed ones;
        ``CacheWriteError`` when the cache is read-only. A writer still running on this host is never
        touched, nor one on another host (a shared file system: it cannot be told from here), and a
        reused pid is not taken for the writer (the name carries the writer's identity, see
        ``writer_alive``)."""
        return remove_stale_temporaries((t.path for t in self.temporaries() if t.stale), quiet=False)
