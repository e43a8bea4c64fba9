"""The resolution record (harness.resolution): `score` and `leaderboard` skip resolving - and torch -
while nothing the record came from has changed, and resolve in full the moment anything has."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

import harness.resolution as resolution_module
from harness.config import BENCHMARK_DIR, load_benchmark
from harness.pipeline import BenchmarkRun
from harness.resolution import RunOptions, load_record
from tests.conftest import oodbench

OOD_SETS = ("digits-6to9", "photo-patches", "gaussian")


def record_for(cache: Path, benchmark: Path, data_root: Path | None = None):
    """Resolve ``benchmark`` from ``cache`` (cache only), writing its record; return (record path, resolution)."""
    options = RunOptions(cache_dir=cache, out_dir=cache.parent / "out", data_root=data_root, progress=False)
    resolution = BenchmarkRun(load_benchmark(benchmark), options).resolve(compute=False)
    return options.record_path(benchmark), resolution


def test_score_from_a_record_never_imports_torch(warm, tmp_path):
    """A fresh interpreter scoring the warm cache reads the record `run` wrote: torch is never imported,
    and the numbers are the leaderboard's."""
    program = ("import sys; from harness.cli import main; code = main(sys.argv[1:]); "
               "print('torch imported:', 'torch' in sys.modules); sys.exit(code)")
    env = {**os.environ, "OODBENCH_DOWNLOAD_DIR": str(warm.root / "downloads")}  # as the warm run had it
    done = subprocess.run([sys.executable, "-c", program, "score", "digits", "--method", "energy",
                           "--cache-dir", str(warm.cache), "--out", str(tmp_path / "out"), "--quiet"],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "torch imported: False", done.stdout + done.stderr
    assert any(line.startswith("time: ") and "read record" in line for line in lines)
    board = pd.read_csv(warm.out / "digits/digits-net/leaderboard.csv", index_col="method")
    for ood_set in OOD_SETS:
        row = next(line.split() for line in lines if f" {ood_set} " in line)
        assert float(row[4]) == pytest.approx(100 * board.loc["energy", f"{ood_set}/auroc"], abs=0.006)


def test_record_round_trips_the_resolution(cache_copy):
    path, resolution = record_for(cache_copy, BENCHMARK_DIR / "digits.yaml")
    assert load_record(path) == resolution
    [backbone] = resolution.backbones
    assert resolution.id_fit == "digits-train" and resolution.ood_labels == list(OOD_SETS)
    assert all((cache_copy / entry).is_file() for entry in backbone.entries.values())


def rewrite_same_bytes(path: Path) -> None:
    path.write_bytes(path.read_bytes())  # same content, new ctime: a rewrite is a change


@pytest.mark.parametrize("change", ["weights rewritten", "weights deleted", "bundled data file rewritten",
                                    "harness code differs", "library version differs"])
def test_record_is_stale_when_an_input_changes(cache_copy, monkeypatch, change):
    path, _ = record_for(cache_copy, BENCHMARK_DIR / "digits.yaml")
    watched = json.loads(path.read_text())["watched"]
    weights = cache_copy / next(name for name in watched if name.startswith("weights/"))
    if change == "weights rewritten":
        rewrite_same_bytes(weights)
    elif change == "weights deleted":
        weights.unlink()
    elif change == "bundled data file rewritten":  # scikit-learn's digits.csv.gz, read by `digits`
        digits_csv = Path(next(name for name in watched if name.endswith("digits.csv.gz")))
        watched[str(digits_csv)][1] -= 1  # as if the file had another mtime (the real one is not ours to touch)
        record = json.loads(path.read_text())
        record["watched"] = watched
        path.write_text(json.dumps(record))
    elif change == "harness code differs":
        monkeypatch.setattr(resolution_module, "CODE_DIRS", ("extract", "harness", "methods"))
    else:
        monkeypatch.setattr(resolution_module, "LIBRARIES", (*resolution_module.LIBRARIES, "pyyaml"))
    assert load_record(path) is None


def test_record_of_a_skipped_set_goes_stale_when_its_folder_appears(warm, cache_copy, tmp_path):
    config = yaml.safe_load((BENCHMARK_DIR / "digits.yaml").read_text())
    config["ood"]["far"].append({"dataset": "notmnist"})
    bench = tmp_path / "digits-plus-notmnist.yaml"
    bench.write_text(yaml.safe_dump(config))
    data_root = tmp_path / "data"
    data_root.mkdir()
    path, resolution = record_for(cache_copy, bench, data_root)
    assert [line.split(":")[0] for line in resolution.skipped] == ["skipped OOD set notmnist"]
    assert load_record(path) == resolution
    (data_root / "notmnist").mkdir()
    assert load_record(path) is None


@pytest.mark.parametrize("damage", ["truncated", "not a mapping", "missing key", "other format version"])
def test_damaged_record_is_ignored(cache_copy, damage):
    path, _ = record_for(cache_copy, BENCHMARK_DIR / "digits.yaml")
    record = json.loads(path.read_text())
    if damage == "truncated":
        text = path.read_text()[:100]
    elif damage == "not a mapping":
        text = "[1, 2]"
    elif damage == "missing key":
        del record["resolution"]["backbones"][0]["entries"]
        text = json.dumps(record)
    else:
        record["version"] += 1
        text = json.dumps(record)
    path.write_text(text)
    assert load_record(path) is None


def test_an_edited_benchmark_file_is_another_record(cache_copy, tmp_path):
    bench = tmp_path / "digits.yaml"
    bench.write_text((BENCHMARK_DIR / "digits.yaml").read_text())
    options = RunOptions(cache_dir=cache_copy, out_dir=tmp_path)
    before = options.record_path(bench)
    bench.write_text(bench.read_text() + "\n# a comment is an edit too\n")
    assert options.record_path(bench) != before
    other_seeds = RunOptions(cache_dir=cache_copy, out_dir=tmp_path, seeds=(1,))
    assert options.record_path(bench) != other_seeds.record_path(bench)


def test_score_from_a_record_whose_entry_was_removed_asks_for_extract(cache_copy, tmp_path, capsys, forwards):
    argv = ("score", "digits", "--method", "energy", "--cache-dir", cache_copy, "--out", tmp_path / "out", "--quiet")
    assert oodbench(capsys, *argv)[0] == 0  # writes this test's record
    [entry] = cache_copy.glob("*/digits.ood.*.h5")
    entry.unlink()
    code, _, err = oodbench(capsys, *argv)
    assert code == 2
    assert err.startswith("error: no cached features for digits-net on digits-6to9")
    assert "run `oodbench extract digits` first" in err
    assert forwards == []
