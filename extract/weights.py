"""Weights files the harness writes: trained and fine-tuned weights, per-epoch snapshots and
resume states under ``<cache>/weights/``, checksummed like every other cache file.

Each is a plain ``torch.save`` mapping (``torch.load(path, weights_only=True)`` reads it) with
two extra keys: ``format`` and ``checksum``, the sha256 of every other value (tensors by dtype,
shape and bytes; the rest by ``repr``). ``load_checked`` recomputes it, so a truncated file, a
flipped byte in a tensor or an edited training record raises ``WeightsCorrupt`` instead of
silently giving other weights (and another backbone entry) than the ones trained. Files are
written through ``extract.cachefiles.atomic_target``: under their final name they are complete.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from extract.cachefiles import atomic_target, move_aside
from extract.store import CacheCorrupt

log = logging.getLogger(__name__)

WEIGHTS_FORMAT = 1


class WeightsCorrupt(CacheCorrupt):
    """A weights file of the cache that is unreadable or does not match its checksum."""


def _feed(digest, value) -> None:
    """Hash ``value`` canonically: mappings by sorted key, sequences in order, tensors by bytes."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}|".encode())
        for key in sorted(value, key=repr):
            digest.update(f"{key!r}=".encode())
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}|".encode())
        for item in value:
            _feed(digest, item)
    else:  # numbers, strings, None: repr round-trips them exactly
        digest.update(f"V{value!r}|".encode())


def contents_checksum(contents: dict) -> str:
    digest = hashlib.sha256()
    _feed(digest, contents)
    return digest.hexdigest()


def save_checked(contents: dict, path: Path) -> None:
    """``torch.save`` ``contents`` with its checksum to ``path``, atomically."""
    with atomic_target(Path(path)) as tmp:
        torch.save({**contents, "format": WEIGHTS_FORMAT, "checksum": contents_checksum(contents)}, tmp)


def load_checked(path: Path) -> dict:
    """The contents ``save_checked`` wrote to ``path``; ``WeightsCorrupt`` when the file cannot be
    read, was not written by it, or does not match its checksum."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or overwritten: zip, pickle and storage errors of every kind
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsCorrupt(f"weights file {path} is unreadable ({reason})") from err
    if not isinstance(saved, dict) or saved.get("format") != WEIGHTS_FORMAT or "checksum" not in saved:
        raise WeightsCorrupt(f"weights file {path} has no checksum (not written by this version of oodbench)")
    contents = {k: v for k, v in saved.items() if k not in ("format", "checksum")}
    if contents_checksum(contents) != saved["checksum"]:
        raise WeightsCorrupt(f"weights file {path} does not match its checksum (bit rot or tampering)")
    return contents


def verify_weights(path: Path) -> list[str]:
    """The problems of one weights file (empty when it is sound), for ``oodbench cache verify``."""
    try:
        load_checked(path)
    except WeightsCorrupt as err:
        return [str(err)]
    return []


def load_or_quarantine(path: Path) -> dict | None:
    """``load_checked(path)``, or None when the file is absent or damaged; a damaged file is moved
    aside to ``<name>.corrupt`` (never read again) with a warning, so the caller recomputes it."""
    if not path.exists():
        return None
    try:
        return load_checked(path)
    except WeightsCorrupt as err:
        try:
            quarantine = move_aside(path)
        except OSError as moving:  # a read-only cache: it stays, and is never used either
            raise WeightsCorrupt(f"{err}; it could not be moved aside ({moving.strerror}) and will not be "
                                 "used") from moving
        if quarantine is not None:  # else another process moved it aside meanwhile
            log.warning("%s; moved it to %s and computing it again", err, quarantine.name)
        return None
