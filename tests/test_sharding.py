"""Sharded extraction: shards by chunk-index range, written resumably, merged into one entry equal
to a single-process extraction - in one process, and with two processes at once (``--shard`` and
torchrun's RANK/WORLD_SIZE)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from extract.datasets import load_dataset
from extract.extraction import extract, shard_chunks
from extract.store import FeatureStore
from tests.conftest import oodbench
from tests.test_backbones import digits_backbone
from tests.test_pipeline import digits_config, write_yaml

REPO = Path(__file__).resolve().parents[1]


def read_entry(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as handle:
        arrays = {}
        handle.visititems(lambda name, item: arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset)
                          else None)
        return arrays


def test_shard_ranges_partition_the_chunks_contiguously():
    for count in range(0, 23):
        for n in range(1, 6):
            ranges = [shard_chunks(count, (i, n)) for i in range(n)]
            assert [i for r in ranges for i in r] == list(range(count))  # disjoint, in order, complete
            assert max(len(r) for r in ranges) - min(len(r) for r in ranges) <= 1  # balanced


def test_two_shards_in_turn_merge_into_the_single_process_entry(tmp_path, forwards):
    backbone = digits_backbone()
    images = load_dataset("digits", "test")
    single = extract(backbone, images, FeatureStore(tmp_path / "single"), batch_size=16, chunk_batches=2,
                     progress=False, layers=("block1",))
    store = FeatureStore(tmp_path / "sharded")
    batches_before = forwards.count("DigitsNet")
    assert extract(backbone, images, store, batch_size=16, chunk_batches=2, progress=False, layers=("block1",),
                   shard=(0, 2)) is None  # the other half is missing: no entry yet
    [partial] = list((tmp_path / "sharded").rglob("*.partial"))
    chunk_count = -(-len(images) // 32)
    assert len(list(partial.glob("chunk-*.npz"))) == len(shard_chunks(chunk_count, (0, 2)))
    assert not list((tmp_path / "sharded").rglob("digits.test.*.h5"))  # nothing looks complete
    merged = extract(backbone, images, store, batch_size=16, chunk_batches=2, progress=False, layers=("block1",),
                     shard=(1, 2))
    assert merged is not None and not partial.exists()
    # shard 0 ran its chunks' batches, shard 1 the rest: each batch once, as in one process
    assert forwards.count("DigitsNet") - batches_before == -(-len(images) // 16)
    assert merged.path.name == single.path.name
    sharded_arrays, single_arrays = read_entry(merged.path), read_entry(single.path)
    assert sorted(sharded_arrays) == sorted(single_arrays)
    for name in single_arrays:
        np.testing.assert_array_equal(sharded_arrays[name], single_arrays[name])
    assert merged.meta == single.meta
    with pytest.raises(ValueError, match="a shard is i/n with 0 <= i < n, got 2/2"):
        extract(backbone, images, FeatureStore(tmp_path / "bad"), shard=(2, 2))


def shard_process(bench: Path, cache: Path, shard: str | None, env: dict | None = None) -> subprocess.Popen:
    argv = [sys.executable, "-m", "harness", "extract", str(bench), "--cache-dir", str(cache), "--quiet"]
    argv += ["--shard", shard] if shard else []
    return subprocess.Popen(argv, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_processes_at_once_give_the_entries_of_one_process(tmp_path, capsys):
    """Two concurrent processes - one with ``--shard 0/2``, one with torchrun's RANK=1 WORLD_SIZE=2 -
    train the backbone once (the other waits on its lock), extract disjoint chunks and merge every
    entry; the cache equals a single-process ``oodbench extract`` byte for byte in its arrays."""
    config = digits_config()
    config["extraction"] = {"batch_size": 16}  # 256-row chunks: several per set
    bench = write_yaml(tmp_path / "digits-small-batches.yaml", config)
    # a fresh interpreter like the shards: training runs with the same thread settings, so the same weights
    single_process = shard_process(bench, tmp_path / "single", None)
    assert single_process.wait(timeout=600) == 0, single_process.stderr.read()
    processes = [shard_process(bench, tmp_path / "sharded", "0/2"),
                 shard_process(bench, tmp_path / "sharded", None, {"RANK": "1", "WORLD_SIZE": "2"})]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_out, err) in zip(processes, outputs):
        assert process.returncode == 0, err
    assert "shard 0/2: digits-net seed 0:" in outputs[0][0] and "shard 1/2: digits-net seed 0:" in outputs[1][0]
    single = sorted(p.relative_to(tmp_path / "single") for p in (tmp_path / "single").rglob("*.h5"))
    sharded = sorted(p.relative_to(tmp_path / "sharded") for p in (tmp_path / "sharded").rglob("*.h5"))
    assert single == sharded and len(single) >= 6  # the same entry files: 5 sets + the head
    assert not list((tmp_path / "sharded").rglob("*.partial"))
    for relative in single:
        a, b = read_entry(tmp_path / "single" / relative), read_entry(tmp_path / "sharded" / relative)
        assert sorted(a) == sorted(b)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    assert len(list((tmp_path / "sharded" / "weights").glob("digits-net-seed0-*.pt"))) == 1
    # the shard that completed the last entry wrote the record: scoring needs no re-resolution
    code, out, err = oodbench(capsys, "score", bench, "--method", "energy", "--cache-dir", tmp_path / "sharded",
                              "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
