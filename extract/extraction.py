"""Run a backbone once over a dataset and cache logits, penultimate features and layer activations.

The forward pass is the model's own; hooks capture the head's input (penultimate features) and
output (logits) and the outputs of named inner layers. Work is done in fixed row chunks, each
saved atomically under ``<entry>.partial/`` as it completes, so an interrupted extraction
(SIGKILL included) resumes from the chunks already on disk. When every chunk is present they
are assembled into the final HDF5 file (atomic rename) and the partial folder is removed. A
per-entry lock makes a second process wait for the first instead of writing the same entry.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import shutil
import signal
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from extract.backbones import Backbone
from extract.cachefiles import atomic_target, ensure_writable, file_lock
from extract.datasets import ImageFiles, ImageSet
from extract.store import CacheCorrupt, CachedSplit, FeatureStore, content_key, write_h5_atomic

log = logging.getLogger(__name__)

ACTIVATION_DTYPES = ("float32", "float16")


@contextlib.contextmanager
def capture_outputs(model: torch.nn.Module, head: str, layers: tuple[str, ...]):
    """Forward hooks filling a dict: 'features' (head input), 'logits' (head output), each layer's output."""
    captured: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def head_hook(module, inputs, output):
        captured["features"] = inputs[0].flatten(1)
        captured["logits"] = output.flatten(1)

    def layer_hook(name):
        def hook(module, inputs, output):
            captured[name] = output
        return hook

    handles = [modules[head].register_forward_hook(head_hook)]
    handles += [modules[layer].register_forward_hook(layer_hook(layer)) for layer in layers]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def entry_data_key(backbone: Backbone, images: ImageSet, layers: tuple[str, ...], activations_dtype: str,
                   amp: bool = False) -> str:
    """Content key of one entry: the dataset's identity, the preprocessing and what is cached; mixed
    precision (``amp``) too, as it changes the numbers (the device does not, within float tolerance)."""
    parts = [backbone.key, images.fingerprint(), backbone.preprocessing.describe(), list(layers), activations_dtype]
    return content_key("entry", *parts, *(["amp"] if amp else []))


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present; 'cuda' without a GPU is a clear error. Under ``torchrun``
    (``$LOCAL_RANK`` set) 'auto' and 'cuda' mean this process's GPU, cuda:LOCAL_RANK."""
    local_rank = os.environ.get("LOCAL_RANK")
    if device in ("auto", "cuda") and local_rank is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(local_rank)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} was asked for but torch sees no CUDA GPU; use --device cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device} was asked for but torch sees no Apple GPU (MPS); use --device cpu")
    return chosen


class _DecodedFiles(torch.utils.data.Dataset):
    """``ImageFiles`` decoded by a preprocessing, one file per item (for DataLoader worker processes)."""

    def __init__(self, files: ImageFiles, preprocessing):
        self.files, self.preprocessing = files, preprocessing

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.preprocessing.decode(self.files.open(i))


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int, worker_id: int) -> None:
    """A DataLoader worker's init (``parent``: the pid that starts the workers): the kernel kills
    this worker when its parent dies (Linux ``PR_SET_PDEATHSIG``), so a killed run leaves no orphan
    decoding images - nor one holding the entry lock it inherited. Elsewhere torch's own watchdog,
    which notices the parent's death within seconds, is what there is."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the prctl: nobody would kill this worker
        os._exit(0)


def input_batches(preprocessing, images, batch_size: int, device: torch.device, workers: int = 0):
    """Preprocessed batches of ``images`` on ``device``, in order: files decoded by ``workers``
    DataLoader processes (0: in this one), arrays converted in this process; on CUDA the batches go
    through pinned memory and are copied asynchronously."""
    pin = device.type == "cuda"
    if isinstance(images, ImageFiles) and workers > 0:
        loader = torch.utils.data.DataLoader(_DecodedFiles(images, preprocessing), batch_size=batch_size,
                                             num_workers=workers, pin_memory=pin,
                                             worker_init_fn=functools.partial(die_with_parent, os.getpid()))
        for batch in loader:
            yield batch.to(device, non_blocking=pin)
        return
    for start in range(0, len(images), batch_size):
        batch = preprocessing(images[start:start + batch_size])
        yield (batch.pin_memory() if pin else batch).to(device, non_blocking=pin)


@contextlib.contextmanager
def precision(device: torch.device, amp: bool):
    """The arithmetic of a forward pass. ``amp``: mixed precision (float16 on CUDA, bfloat16 on the
    CPU), a different cache entry. Otherwise IEEE float32: on CUDA, torch's default lets cuDNN run
    float32 convolutions in TF32 (10-bit mantissa), so that is switched off here, with float32 matrix
    products at 'highest', and a GPU entry holds the CPU's numbers within float32 rounding (the device
    is not part of an entry's key). The global flags are restored afterwards."""
    if amp:
        with torch.autocast(device_type=device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16):
            yield
        return
    if device.type != "cuda":
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                         allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(matmul)


@torch.no_grad()
def forward_rows(backbone: Backbone, images, layers: tuple[str, ...], batch_size: int,
                 device: torch.device, workers: int = 0, amp: bool = False) -> dict[str, np.ndarray]:
    """Run the backbone over ``images`` (an array or ``ImageFiles``) in batches; return float32 numpy
    arrays of the captured outputs."""
    model = backbone.model.to(device).eval()
    parts: dict[str, list[np.ndarray]] = {}
    with capture_outputs(model, backbone.head, layers) as captured:
        for batch in input_batches(backbone.preprocessing, images, batch_size, device, workers):
            captured.clear()
            with precision(device, amp):
                model(batch)
            for name, tensor in captured.items():
                parts.setdefault(name, []).append(tensor.detach().float().cpu().numpy())
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def _save_chunk(path: Path, arrays: dict[str, np.ndarray], names: tuple[str, ...]) -> None:
    """Save ``arrays`` atomically as an npz whose keys are positions in ``names`` (any layer name is safe).
    A disk too full for it (its bytes plus 64 kB of zip headers) is a ``CacheWriteError`` before writing."""
    needed = sum(int(np.asarray(arrays[name]).nbytes) for name in names) + (64 << 10)
    with atomic_target(path, needed=needed) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **{f"a{i}": arrays[name] for i, name in enumerate(names)})


def _load_chunk(path: Path, names: tuple[str, ...], rows: int) -> dict[str, np.ndarray] | None:
    """A saved chunk holding exactly ``names`` with ``rows`` rows each, or None (it is then recomputed):
    unreadable, incomplete, or left by a run with another chunk size under the same file name."""
    try:
        with np.load(path) as data:
            if sorted(data.files) != sorted(f"a{i}" for i in range(len(names))):
                return None
            chunk = {name: data[f"a{i}"] for i, name in enumerate(names)}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    return chunk if all(len(array) == rows for array in chunk.values()) else None


def partial_folder(path: Path) -> Path:
    """Where the completed chunks of the entry at ``path`` wait until it is assembled."""
    return path.with_name(path.name + ".partial")


def shard_chunks(count: int, shard: tuple[int, int]) -> range:
    """The chunk indices shard i of n computes: the contiguous index range [i*count//n, (i+1)*count//n)."""
    index, total = shard
    return range(index * count // total, (index + 1) * count // total)


def compute_in_chunks(path: Path, n: int, names: tuple[str, ...], rows_per_chunk: int, tag: str, compute,
                      description: str, progress: bool, shard: tuple[int, int] | None = None,
                      compute_missing: bool = True) -> list[dict[str, np.ndarray] | None]:
    """Rows [0, n) in chunks of ``rows_per_chunk``: ``compute(start, stop)`` returns the arrays
    ``names`` for those rows, saved atomically under the entry's partial folder, so a run that is
    interrupted (SIGKILL included) resumes from the chunks already on disk. ``tag`` names whatever
    else fixes a chunk's contents (the batch size), so a run with other settings never reuses them.

    ``shard`` (i, n): only the chunks of ``shard_chunks`` are read or computed, the others are
    None. ``compute_missing`` false computes nothing and reads every chunk saved so far (None
    where none is). Without a shard the caller holds the entry's lock; it assembles the chunks and
    removes the folder."""
    partial = partial_folder(path)
    if compute_missing:  # a cache that cannot be written: one clear error now, not after the first chunk
        ensure_writable(path.parent)
        partial.mkdir(parents=True, exist_ok=True)
    starts = range(0, n, rows_per_chunk)
    mine = range(0) if not compute_missing else range(len(starts)) if shard is None else \
        shard_chunks(len(starts), shard)
    chunks = []
    bar = tqdm(total=sum(min(rows_per_chunk, n - starts[i]) for i in mine), desc=description, unit="img",
               disable=None if progress else True, leave=False)
    for index, start in enumerate(starts):
        chunk_path = partial / f"chunk-{index:06d}-of-{len(starts):06d}-rows{rows_per_chunk}-{tag}.npz"
        rows = min(rows_per_chunk, n - start)
        if compute_missing and index not in mine:  # another shard's chunk: never read twice
            chunks.append(None)
            continue
        chunk = _load_chunk(chunk_path, names, rows) if chunk_path.exists() else None
        if chunk is None and index in mine:
            chunk = compute(start, start + rows)
            _save_chunk(chunk_path, chunk, names)
        chunks.append(chunk)
        if index in mine:
            bar.update(rows)
    bar.close()
    return chunks


def extract(backbone: Backbone, images: ImageSet, store: FeatureStore, *, layers: tuple[str, ...] = (),
            batch_size: int = 256, chunk_batches: int = 16, device: str = "cpu",
            activations_dtype: str = "float32", progress: bool = True,
            shard: tuple[int, int] | None = None, workers: int = 0, amp: bool = False) -> CachedSplit | None:
    """Extract one (backbone, dataset, split) entry into the store, or return it if cached.

    Chunks hold ``chunk_batches`` batches, so batch boundaries are the same in a resumed run as
    in an uninterrupted one and the arrays come out identical.

    ``shard`` (i, n): this process computes only the chunks of ``shard_chunks`` (one shard per GPU
    or cluster job), without holding the entry's lock; the shard that finds every chunk saved
    merges them into the entry, identical to a single-process extraction. Returns None while
    other shards' chunks are missing.

    ``workers``: DataLoader processes decoding image files (``ImageFiles``); ``amp``: mixed
    precision (``precision``), a different entry.
    """
    if len(images) == 0:
        raise ValueError(f"dataset {images.name}/{images.split} is empty; nothing to extract")
    modules = dict(backbone.model.named_modules())
    unknown = [layer for layer in layers if layer not in modules or not layer]
    if unknown:
        raise ValueError(f"backbone {backbone.name!r} has no module {unknown}; its named layers: "
                         f"{list(backbone.layers)}, shaping layer: {backbone.shaping_layer or 'none'} (any module "
                         "name of the model works)")
    if activations_dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"activations_dtype must be one of {ACTIVATION_DTYPES}, got {activations_dtype!r}")
    check_shard(shard)
    layers = tuple(layers)
    torch_device = resolve_device(device)
    data_key = entry_data_key(backbone, images, layers, activations_dtype, amp)
    path = store.entry_path(backbone.key, images.name, images.split, data_key)
    store.ensure_head(backbone)
    try:
        cached = store.open_entry(path)
        if cached is not None:
            return cached
    except CacheCorrupt as err:  # open_entry moved the file aside; recompute it
        log.warning("recomputing a corrupt cache entry: %s", err)
    names = ("logits", "features", *layers)

    def chunks(compute_missing):
        return compute_in_chunks(
            path, len(images), names, batch_size * chunk_batches, f"bs{batch_size}",
            lambda start, stop: forward_rows(backbone, images.images[start:stop], layers, batch_size, torch_device,
                                             workers, amp),
            f"extract {backbone.name} {images.name}/{images.split}"
            + (f" shard {shard[0]}/{shard[1]}" if shard else ""),
            progress, shard=shard, compute_missing=compute_missing)

    if shard is not None:
        chunks(True)  # outside the lock: shards write disjoint chunk files, each atomically
    with file_lock(path):
        cached = store.open_entry(path)  # another process may have finished it while we waited
        if cached is not None:
            return cached
        done = chunks(shard is None)  # a shard only reads here: are the other shards' chunks saved?
        if any(chunk is None for chunk in done):
            return None
        arrays = {"logits": np.concatenate([c["logits"] for c in done]).astype(np.float32),
                  "features": np.concatenate([c["features"] for c in done]).astype(np.float32),
                  "labels": np.asarray(images.labels, dtype=np.int64)}
        for layer in layers:
            arrays[f"activations/{layer}"] = np.concatenate([c[layer] for c in done]).astype(activations_dtype)
        meta = {"kind": "features", "backbone": backbone.describe(), "dataset": images.name,
                "split": images.split, "source": images.source, "fingerprint": images.fingerprint(),
                "data_key": data_key, "layers": list(layers), "activations_dtype": activations_dtype, "amp": amp,
                "n": len(images), "num_classes": int(arrays["logits"].shape[1]),
                "feature_dim": int(arrays["features"].shape[1]),
                "what": f"{images.name}/{images.split}"}
        write_h5_atomic(path, arrays, meta)
        shutil.rmtree(partial_folder(path), ignore_errors=True)
    return CachedSplit(path)


def check_shard(shard: tuple[int, int] | None) -> None:
    """A shard is (index, count) with 0 <= index < count."""
    if shard is not None and not (len(shard) == 2 and 0 <= shard[0] < shard[1]):
        raise ValueError(f"a shard is i/n with 0 <= i < n, got {shard[0]}/{shard[1]}")
