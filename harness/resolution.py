"""A benchmark resolved to its cache entries, and the record that lets scoring skip resolving again.

Resolving a benchmark (``harness.pipeline.BenchmarkRun.resolve``) loads every dataset to
fingerprint it and loads or trains the weights to hash them: seconds of work plus torch's
3-second import. What scoring needs from it is small: the entry files, the set labels and
groups, the backbone keys. That is a ``Resolution``; ``save_record`` writes it as JSON under
``<cache>/runs/`` and ``load_record`` gives it back, without importing torch, only while
everything it was derived from is unchanged:

- the benchmark file's bytes, the seeds asked for, the data root and the download folder (the
  record's name);
- the harness's own source (``extract/``, ``harness/``, the fine-tuning of ``methods/``) and the
  versions of the libraries that make images and weights;
- the stat (size, mtime, ctime, inode) of every file read and every folder searched on the way:
  dataset files, trained weights, checkpoints, factory modules. Rewriting, replacing, creating
  or deleting any of them changes its stat or its folder's, and ctime cannot be set back by
  tools like ``touch`` - the test git's index uses to call a file unchanged.

Otherwise ``load_record`` returns None and the caller resolves in full, which rewrites the record.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from extract.cachefiles import CacheWriteError, atomic_target, skip_read_only
from extract.datasets import download_dir
from extract.store import content_key
from harness.config import MethodRef

log = logging.getLogger(__name__)

RECORD_VERSION = 2  # 2: the ID validation split and the FPR rule
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
# The code and libraries that decide datasets, weights and entry keys.
CODE_DIRS = ("extract", "harness")
CODE_FILES = ("methods/training_objectives.py", "methods/finetuning.py")  # what decides fine-tuned weights
LIBRARIES = ("torch", "torchvision", "numpy", "scipy", "pillow", "scikit-learn", "h5py")


@dataclass
class ResolvedBackbone:
    """One (backbone, seed) of a benchmark: its cache key and the entry file of every set."""

    name: str  # the benchmark's name for the backbone
    seed: int
    key: str
    info: dict
    entries: dict[str, str]  # set label -> entry file, relative to the store root

    def line(self) -> str:
        acc = self.info.get("test_acc_after_training")
        trained = f", trained {self.info['trained_epochs']} epochs, ID test acc {acc:.2%}" if acc else ""
        return f"backbone {self.name} seed {self.seed}: entry {self.key}{trained}"


@dataclass
class Resolution:
    """What scoring and the leaderboard need from a benchmark whose entries are known."""

    benchmark: str
    description: str
    convention: str
    seeds: tuple[int, ...]
    methods: tuple[MethodRef, ...]
    id_fit: str
    id_test: str
    ood_groups: dict[str, str]  # test OOD set label -> 'near', 'far' or '' (ungrouped), in benchmark order
    validation: str | None  # the validation OOD set's label (sweeps select on it); None when absent
    skipped: list[str]  # one line per optional OOD set whose files are absent
    backbones: list[ResolvedBackbone]
    id_val: str  # the ID validation split's label (sweeps select on it against ``validation``)
    fpr_rule: str = "canonical"
    fit_subsets: dict = field(default_factory=dict)  # method name -> its own fit rows (harness.config)

    @property
    def ood_labels(self) -> list[str]:
        return list(self.ood_groups)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Resolution:
        return cls(**{**data, "seeds": tuple(data["seeds"]),
                      "methods": tuple(MethodRef(**m) for m in data["methods"]),
                      "backbones": [ResolvedBackbone(**b) for b in data["backbones"]]})


@dataclass
class RunOptions:
    """How a benchmark is resolved and evaluated (the CLI's options)."""

    cache_dir: Path
    out_dir: Path
    data_root: Path | None = None
    device: str = "auto"
    seeds: tuple[int, ...] | None = None  # None: the benchmark's own
    download: bool = False
    progress: bool = True
    workers: int = 0  # DataLoader processes decoding image files (ImageNet-scale sets)
    amp: bool = False  # mixed-precision extraction: entries of their own

    def record_path(self, benchmark_file: Path) -> Path:
        """Where the record of ``benchmark_file`` resolved with these options lives."""
        key = content_key("record", hashlib.sha256(benchmark_file.read_bytes()).hexdigest(), self.seeds,
                          str(self.data_root.absolute()) if self.data_root else None,
                          str(download_dir().absolute()), *(["amp"] if self.amp else []))
        return Path(self.cache_dir) / "runs" / f"{benchmark_file.stem}.{key}.json"


def code_stamp() -> dict:
    """Digest of the harness source that resolution runs, and the versions of the libraries it uses."""
    digest = hashlib.sha256()
    sources = [p for folder in CODE_DIRS for p in (PACKAGE_ROOT / folder).glob("*.py")]
    for path in sorted(sources + [PACKAGE_ROOT / name for name in CODE_FILES]):
        digest.update(f"{path.relative_to(PACKAGE_ROOT)}\0".encode() + path.read_bytes() + b"\0")
    return {"code": digest.hexdigest(), "libraries": {name: importlib.metadata.version(name) for name in LIBRARIES}}


def file_state(path: Path) -> list[int] | None:
    """[size, mtime_ns, ctime_ns, inode] of a file or folder, None when it does not exist."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def save_record(path: Path, resolution: Resolution, watched: Iterable[Path]) -> Path | None:
    """Write ``resolution`` to ``path`` (``<cache>/runs/<name>.json``) with the state of everything it
    came from (see the module docstring). Paths inside the cache are kept relative to it, so a
    moved cache keeps its records.

    On a cache this process may read but not write (read-only file system, no permission) nothing
    is recorded: a warning says so once per process and folder, and None is returned; a full disk
    is the ``CacheWriteError`` it is."""
    cache_root = path.parents[1].absolute()
    names = sorted({_relative_to(Path(p).absolute(), cache_root) for p in watched})
    record = {"version": RECORD_VERSION, **code_stamp(),
              "watched": {name: file_state(cache_root / name) for name in names},
              "resolution": resolution.to_json()}
    try:
        with atomic_target(path) as tmp:
            tmp.write_text(json.dumps(record, indent=1))
    except CacheWriteError as err:
        skip_read_only(err, f"records in {path.parent}",
                       f"the benchmark's resolution is not recorded: {err}. The results are not affected; the next "
                       f"command resolves it again (datasets fingerprinted, weights hashed) instead of reading {path}")
        return None
    return path


def _relative_to(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def load_record(path: Path) -> Resolution | None:
    """The recorded resolution, or None when there is none or anything it came from has changed."""
    try:
        record = json.loads(path.read_text())
        stale = _staleness(record, path.parents[1])
        if not stale:
            return Resolution.from_json(record["resolution"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # hand-edited or damaged JSON
        stale = f"unreadable: {err!r}"
    log.info("resolving again: the record %s is stale (%s)", path.name, stale)
    return None


def _staleness(record: dict, cache_root: Path) -> str | None:
    """Why ``record`` no longer describes the cache and inputs, or None when it does."""
    if record["version"] != RECORD_VERSION:
        return f"record format {record['version']}, this harness writes {RECORD_VERSION}"
    if {"code": record["code"], "libraries": record["libraries"]} != code_stamp():
        return "the harness source or a library version changed"
    return next((f"{name} changed" for name, state in record["watched"].items()
                 if file_state(cache_root / name) != state), None)  # an absolute name stays absolute
