"""End-to-end tests of the ``oodbench`` command line (harness.cli), run in-process on ``digits``.

One warm ``oodbench run digits`` is made per test session (shared with test_pipeline.py
through the session's base temp folder) and copied where a test mutates it. Forward passes
are counted with a global nn.Module forward hook: ``score_samples`` and ``leaderboard`` must never
run a network.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.special import logsumexp

from harness.cli import main
from harness.config import BENCHMARK_DIR
from methods import METHODS as REGISTERED_METHODS
from tests.conftest import files, only_a_record_was_added, oodbench

METHODS = tuple(sorted(REGISTERED_METHODS))  # the digits benchmark runs every registered method
NETWORK_METHODS = tuple(m for m in METHODS if "network" in REGISTERED_METHODS[m].reads)
NETWORK_FITTED = tuple(m for m in NETWORK_METHODS if REGISTERED_METHODS[m].fits_through_network)
# head, 7 entries (ID fit, validation and test, 3 test OOD sets, the validation OOD set), every
# method's scores on the 6 scored sets (all but the fit split), each network method's derived entry
# of each scored set, the state of those fitted through the network, and each method's bootstrap
# resamples (results.uncertainty)
SCORED = 6
H5_FILES = 1 + 7 + SCORED * len(METHODS) + SCORED * len(NETWORK_METHODS) + len(NETWORK_FITTED) + len(METHODS)
OTHER_FILES = 2  # the trained weights and the warm run's resolution record
OOD_SETS = ("digits-6to9", "photo-patches", "gaussian")
EXTRACT_FIRST = "run `oodbench extract digits` first"


def only(paths) -> Path:
    paths = list(paths)
    assert len(paths) == 1, paths
    return paths[0]


def score_files(cache: Path, method: str) -> set[Path]:
    return set(cache.glob(f"*/scores/{method}.*.h5"))


def h5_meta(path: Path) -> dict:
    with h5py.File(path, "r") as h5:
        return json.loads(h5.attrs["meta"])


def flip_byte_in_logits(path: Path) -> None:
    """Invert one byte inside the stored logits array (chunked, so located through its first chunk)."""
    with h5py.File(path, "r") as h5:
        dataset = h5["logits"]
        if dataset.chunks is None:  # contiguous layout
            offset, size = dataset.id.get_offset(), dataset.id.get_storage_size()
        else:  # chunked (the store's layout, for fletcher32): get_offset() is None, use the first chunk
            chunk = dataset.id.get_chunk_info(0)
            offset, size = chunk.byte_offset, chunk.size
        offset += size // 2
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


# ---------------------------------------------------------------- run

def test_run_digits_prints_a_table_with_every_method(warm):
    assert warm.code == 0
    lines = warm.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method "))
    assert "avg AUROC" in lines[header] and "ID Acc" in lines[header]
    rows = {line.split()[0]: line.split() for line in lines[header + 2:header + 2 + len(METHODS)]}
    assert sorted(rows) == sorted(METHODS)
    assert all(row[-1] == "1" for row in rows.values())  # seeds column
    board = pd.read_csv(warm.out / "digits/digits-net/leaderboard.csv", index_col="method")
    for method, row in rows.items():  # second column: avg AUROC in %, two decimals, ± half its interval
        value, half_width = row[2].split("±")
        assert float(value) == pytest.approx(100 * board.loc[method, "avg/auroc"], abs=0.006)
        interval = board.loc[method, "avg/auroc_hi"] - board.loc[method, "avg/auroc_lo"]
        assert float(half_width) == pytest.approx(50 * interval, abs=0.006)
    for name in ("digits/digits-net/leaderboard.csv", "digits/digits-net/leaderboard.tex",
                 "digits/digits-net/leaderboard.md", "digits/digits-net/score_histograms.png",
                 "digits/metrics.csv", "digits/report.md"):
        assert f"wrote {warm.out / name}" in lines
    assert any(line.startswith("backbone digits-net seed 0: entry ") and "trained 15 epochs" in line
               for line in lines)


# ---------------------------------------------------------------- score

def test_score_on_warm_cache_runs_no_network(warm, cache_copy, tmp_path, capsys, forwards):
    before = files(cache_copy)
    code, out, err = oodbench(capsys, "score", "digits", "--method", "energy", "--cache-dir", cache_copy,
                              "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
    assert forwards == []
    assert only_a_record_was_added(cache_copy, before)  # every energy score was cached already
    assert out.lstrip().startswith("energy on digits (id_positive, values in %)")
    board = pd.read_csv(warm.out / "digits/digits-net/leaderboard.csv", index_col="method")
    for ood_set in OOD_SETS:
        row = next(line.split() for line in out.splitlines() if f" {ood_set} " in line)
        assert float(row[4]) == pytest.approx(100 * board.loc["energy", f"{ood_set}/auroc"], abs=0.006)


def test_score_with_a_parameter_computes_new_cached_scores(cache_copy, tmp_path, capsys, forwards):
    default_files = score_files(cache_copy, "energy")
    argv = ("score", "digits", "--method", "energy", "--param", "T=2", "--cache-dir", cache_copy,
            "--out", tmp_path / "out", "--quiet")
    code, out, err = oodbench(capsys, *argv)
    assert code == 0, err
    assert forwards == []
    assert out.lstrip().startswith("energy(T=2) on digits ")
    new_files = score_files(cache_copy, "energy") - default_files
    assert len(new_files) == SCORED  # ID test, each test OOD set, the validation OOD set, the ID validation split
    default_by_entry = {h5_meta(p)["entry"]: p for p in default_files}
    for path in new_files:
        meta = h5_meta(path)
        assert meta["params"] == {"T": 2.0}
        entry = only(cache_copy.glob(f"*/*.{meta['entry']}.h5"))
        with h5py.File(entry, "r") as h5:
            logits = h5["logits"][()].astype(np.float64)
        with h5py.File(path, "r") as h5:
            scores = h5["scores"][()]
        np.testing.assert_allclose(scores, 2 * logsumexp(logits / 2, axis=1), rtol=1e-12)
        with h5py.File(default_by_entry[meta["entry"]], "r") as h5:
            default_scores = h5["scores"][()]
        assert not np.allclose(scores, default_scores)
    # a second call reads them back
    code, again, err = oodbench(capsys, *argv)
    assert code == 0, err
    assert score_files(cache_copy, "energy") - default_files == new_files
    assert again.split("time:")[0] == out.split("time:")[0]


@pytest.mark.parametrize("command", [["score", "digits", "--method", "energy"], ["leaderboard", "digits"]])
def test_score_and_leaderboard_on_empty_cache_ask_for_extract(tmp_path, capsys, forwards, command):
    cache = tmp_path / "cache"
    code, out, err = oodbench(capsys, *command, "--cache-dir", cache, "--out", tmp_path / "out", "--quiet")
    assert code == 2
    assert err.startswith("error: backbone digits-net seed 0 has not been trained")
    assert EXTRACT_FIRST in err
    assert forwards == []
    assert not (cache / "weights").exists()  # nothing was trained


def test_score_without_extracted_features_asks_for_extract(cache_copy, tmp_path, capsys, forwards):
    """Weights cached but the feature entries removed: still no forward pass, same advice."""
    code, _, err = oodbench(capsys, "cache", "rm", "*/digits.*.h5", "--cache-dir", cache_copy)
    assert code == 0, err
    code, out, err = oodbench(capsys, "score", "digits", "--method", "msp", "--cache-dir", cache_copy,
                              "--out", tmp_path / "out", "--quiet")
    assert code == 2
    assert err.startswith("error: no cached features for digits-net on digits-")
    assert EXTRACT_FIRST in err
    assert forwards == []


def test_unknown_method_lists_registered_methods(tmp_path, capsys):
    code, _, err = oodbench(capsys, "score", "digits", "--method", "nope", "--cache-dir", tmp_path / "cache",
                            "--quiet")
    assert code == 2
    assert err == (f"error: unknown method 'nope'; registered methods: {', '.join(METHODS)}; a method of your own "
                   "is named 'module:Class'\n")


def test_unknown_method_parameter_names_valid_parameters(tmp_path, capsys):
    code, _, err = oodbench(capsys, "score", "digits", "--method", "energy", "--param", "Q=1",
                            "--cache-dir", tmp_path / "cache", "--quiet")
    assert code == 2
    assert err.startswith("error: method 'energy' has no parameter Q;")
    assert "T (default 1.0)" in err


def test_bad_parameter_value_is_a_user_error(tmp_path, capsys):
    code, _, err = oodbench(capsys, "score", "digits", "--method", "energy", "--param", "T=hot",
                            "--cache-dir", tmp_path / "cache", "--quiet")
    assert code == 2
    assert err.startswith("error: method 'energy': bad parameter value")


def test_unknown_run_method_is_rejected_before_any_work(tmp_path, capsys, forwards):
    code, _, err = oodbench(capsys, "run", "digits", "--methods", "msp,nope", "--cache-dir", tmp_path / "cache",
                            "--out", tmp_path / "out", "--quiet")
    assert code == 2
    assert f"unknown method 'nope'; registered methods: {', '.join(METHODS)}" in err
    assert forwards == []
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("argv, message", [
    (["run", "digits", "--seeds", "x"], "--seeds takes comma-separated integers, got 'x'"),
    (["run", "digits", "--seeds", "0,,1"], "--seeds takes comma-separated integers"),
    (["score", "digits", "--method", "energy", "--param", "T"], "--param takes key=value, got 'T'"),
    (["score", "digits"], "the following arguments are required: --method"),
    (["cache", "clean"], "invalid choice: 'clean'"),
])
def test_argparse_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- leaderboard

def test_leaderboard_rerenders_from_cached_scores(warm, cache_copy, tmp_path, capsys, forwards):
    before = files(cache_copy)
    out_dir = tmp_path / "out"
    code, out, err = oodbench(capsys, "leaderboard", "digits", "--cache-dir", cache_copy, "--out", out_dir,
                              "--quiet")
    assert code == 0, err
    assert forwards == []
    assert only_a_record_was_added(cache_copy, before)
    for name in ("leaderboard.csv", "leaderboard.md", "leaderboard.tex"):
        assert (out_dir / "digits/digits-net" / name).read_text() == (warm.out / "digits/digits-net" / name).read_text()
    assert (out_dir / "digits/metrics.csv").read_text() == (warm.out / "digits/metrics.csv").read_text()
    table = warm.stdout.split("\n\nbackbone ")[0]
    assert out.split("\n\nbackbone ")[0] == table  # the same printed table


def test_leaderboard_with_missing_scores_names_the_score_command(cache_copy, tmp_path, capsys, forwards):
    code, out, err = oodbench(capsys, "cache", "rm", "*/scores/msp.*", "--cache-dir", cache_copy)
    assert code == 0 and out.startswith(f"removed {SCORED} files")
    code, _, err = oodbench(capsys, "leaderboard", "digits", "--cache-dir", cache_copy, "--out", tmp_path / "out",
                            "--quiet")
    assert code == 2
    assert "no cached msp scores for digits-net" in err
    assert "run `oodbench score digits --method msp` first" in err
    assert forwards == []


# ---------------------------------------------------------------- cache ls / verify / rm

def test_cache_ls_lists_every_file(cache_copy, capsys):
    h5_files = sorted(str(p.relative_to(cache_copy)) for p in cache_copy.rglob("*.h5"))
    assert len(h5_files) == H5_FILES
    weights = sorted(str(p.relative_to(cache_copy)) for p in cache_copy.glob("weights/*.pt"))
    assert len(weights) == 1  # the trained digits-net
    records = sorted(str(p.relative_to(cache_copy)) for p in cache_copy.glob("runs/*.json"))
    assert len(records) == 1  # the warm run's resolution
    code, out, _ = oodbench(capsys, "cache", "ls", "--cache-dir", cache_copy)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"cache {cache_copy}: {H5_FILES + OTHER_FILES} files"
    assert sorted(line.split()[-1] for line in lines[1:]) == sorted(h5_files + weights + records)
    kinds = [line.split()[0] for line in lines[1:]]
    assert kinds.count("features") == 7 and kinds.count("head") == 1 and kinds.count("scores") == SCORED * len(METHODS)
    assert kinds.count("derived") == SCORED * len(NETWORK_METHODS) + len(NETWORK_FITTED)
    assert kinds.count("weights") == 1 and kinds.count("record") == 1
    code, out, _ = oodbench(capsys, "cache", "ls", "*/scores/energy.*", "--cache-dir", cache_copy)
    assert code == 0
    assert out.splitlines()[0] == f"cache {cache_copy}: {SCORED} files"


def test_cache_verify_detects_a_flipped_byte(cache_copy, capsys):
    code, out, _ = oodbench(capsys, "cache", "verify", "--cache-dir", cache_copy)
    assert code == 0
    assert out.strip().endswith(f"{H5_FILES + 1} ok, 0 corrupt")  # and the trained weights
    assert "CORRUPT" not in out
    entry = only(cache_copy.glob("*/digits.test.*.h5"))
    flip_byte_in_logits(entry)
    code, out, _ = oodbench(capsys, "cache", "verify", "--cache-dir", cache_copy)
    assert code == 1
    corrupt = [line for line in out.splitlines() if line.startswith("CORRUPT")]
    assert len(corrupt) == 1
    assert corrupt[0].startswith(f"CORRUPT {entry}: ")
    assert "'logits'" in corrupt[0]
    assert out.strip().endswith(f"{H5_FILES} ok, 1 corrupt")


def test_run_moves_a_corrupt_entry_aside_and_recomputes_it(warm, cache_copy, tmp_path, capsys, forwards):
    entry = only(cache_copy.glob("*/digits.test.*.h5"))
    original = only(warm.cache.glob("*/digits.test.*.h5"))
    flip_byte_in_logits(entry)
    code, out, err = oodbench(capsys, "run", "digits", "--cache-dir", cache_copy, "--out", tmp_path / "out",
                              "--quiet")
    assert code == 0, err
    assert forwards  # the entry was extracted again
    quarantined = entry.with_name(entry.name + ".corrupt")
    assert quarantined.is_file() and entry.is_file()
    with h5py.File(entry, "r") as fresh, h5py.File(original, "r") as before:
        np.testing.assert_allclose(fresh["logits"][()], before["logits"][()], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(fresh["labels"][()], before["labels"][()])
    assert ((tmp_path / "out/digits/digits-net/leaderboard.csv").read_text()
            == (warm.out / "digits/digits-net/leaderboard.csv").read_text())
    code, out, _ = oodbench(capsys, "cache", "verify", "--cache-dir", cache_copy)
    assert code == 0, out  # the replacement is sound; the quarantined copy is reported, never read
    assert f"quarantined {quarantined} (moved aside when found corrupt, never read;" in out


def test_leaderboard_refuses_a_corrupt_entry(cache_copy, tmp_path, capsys, forwards):
    entry = only(cache_copy.glob("*/digits.ood.*.h5"))
    flip_byte_in_logits(entry)
    code, _, err = oodbench(capsys, "leaderboard", "digits", "--cache-dir", cache_copy, "--out", tmp_path / "out",
                            "--quiet")
    assert code == 2
    assert err.startswith(f"error: {entry} failed verification and was moved to {entry.name}.corrupt")
    assert forwards == []


def test_cache_rm(cache_copy, capsys):
    code, _, err = oodbench(capsys, "cache", "rm", "--cache-dir", cache_copy)
    assert code == 2
    assert "cache rm needs at least one pattern" in err
    code, out, _ = oodbench(capsys, "cache", "rm", "*", "--cache-dir", cache_copy)
    assert code == 0
    assert out.strip() == f"removed {H5_FILES + OTHER_FILES} files from {cache_copy}"
    code, out, _ = oodbench(capsys, "cache", "ls", "--cache-dir", cache_copy)
    assert code == 0
    assert out.strip() == f"cache {cache_copy}: 0 files"
    assert list(cache_copy.rglob("*.h5")) == [] and list(cache_copy.rglob("*.lock")) == []
    assert list(cache_copy.rglob("*.pt")) == [] and list(cache_copy.rglob("*.json")) == []


def test_cache_dir_from_environment(cache_copy, monkeypatch, capsys):
    monkeypatch.setenv("OODBENCH_CACHE_DIR", str(cache_copy))
    code, out, _ = oodbench(capsys, "cache", "ls")
    assert code == 0
    assert out.splitlines()[0] == f"cache {cache_copy}: {H5_FILES + OTHER_FILES} files"


# ---------------------------------------------------------------- list

def test_python_m_harness_list():
    result = subprocess.run([sys.executable, "-m", "harness", "list"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.splitlines()[0].startswith("benchmarks: ") and "digits" in out.splitlines()[0]
    sections = {title: body for title, body in re.findall(r"\n(\w+):\n((?:  .*\n?)+)", out)}
    assert set(sections) == {"datasets", "backbones", "methods"}
    methods = [line.split()[0] for line in sections["methods"].splitlines()]
    assert methods == sorted(METHODS)
    assert "T=1.0" in next(line for line in sections["methods"].splitlines() if line.split()[0] == "energy")
    datasets = [line.split()[0] for line in sections["datasets"].splitlines()]
    assert {"digits", "gaussian", "photo-patches", "mnist", "notmnist"} <= set(datasets)
    assert {"digits-net", "cnn28"} <= {line.split()[0] for line in sections["backbones"].splitlines()}


# ---------------------------------------------------------------- benchmark file errors

def digits_config() -> dict:
    return yaml.safe_load((BENCHMARK_DIR / "digits.yaml").read_text())


def _unknown_key(config):
    config["bogus"] = 1


def _unknown_dataset(config):
    config["ood"]["far"][1]["dataset"] = "gaussiann"


def _unknown_method(config):
    config["methods"] = ["msp", "nope"]


def _unknown_method_param(config):
    config["methods"] = [{"name": "energy", "params": {"Q": 1}}]


def _unknown_dataset_param(config):
    config["ood"]["far"][1]["params"]["sigma"] = 2


def _unknown_backbone_arch(config):
    config["backbones"][0]["arch"] = "resnet-nope"


def _validation_is_a_test_set(config):
    config["validation"] = {"dataset": "gaussian", "params": {"seed": 5}}


@pytest.mark.parametrize("mutate, messages", [
    (_unknown_key, ["missing keys [], unknown keys ['bogus']; allowed: ['backbones', 'convention', 'description', "
                    "'extraction', 'fit', 'fpr_rule', 'id', 'intervals', 'methods', 'name', 'ood', 'seeds', "
                    "'validation']"]),
    (_unknown_dataset, ["ood far #2: unknown dataset 'gaussiann'; registered: ", "digits",
                        "gaussian, hopper-patches, imagenet"]),
    (_unknown_method, [f"methods #2: unknown method 'nope'; registered methods: {', '.join(METHODS)}"]),
    (_unknown_method_param, ["methods #1: method 'energy' has no parameter Q; its parameters: T (default 1.0)"]),
    (_unknown_dataset_param, ["dataset 'gaussian' has no parameters ['sigma']", "'n': 10000"]),
    (_unknown_backbone_arch, ["backbones #1 (digits-net): unknown backbone architecture 'resnet-nope'; registered: "
                              "bit-s-r101x1, cifar-resnet18, cifar-resnet20, cifar-resnet32, cifar-resnet44, "
                              "cifar-resnet56, cnn28, densenet-bc-100, densenet-bc-100-um, densenet121, digits-net, "
                              "mnist-convnet-oe, mobilenet-v2, resnet50, wrn-40-2, wrn-40-4"]),
    (_validation_is_a_test_set, ["the validation OOD set 'gaussian' must be disjoint from the ID set and every "
                                 "test OOD set (digits, gaussian, photo-patches)"]),
])
def test_benchmark_file_errors_name_the_valid_choices(tmp_path, capsys, forwards, mutate, messages):
    config = digits_config()
    mutate(config)
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    code, out, err = oodbench(capsys, "run", path, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out",
                              "--quiet")
    assert code == 2
    assert err.startswith(f"error: {path}: ")
    for message in messages:
        assert message in err
    assert out == ""
    assert forwards == []
    assert not (tmp_path / "cache").exists()


def test_unknown_benchmark_name_lists_packaged_benchmarks(tmp_path, capsys):
    code, _, err = oodbench(capsys, "run", "nope", "--cache-dir", tmp_path / "cache", "--quiet")
    assert code == 2
    assert err.startswith("error: no benchmark 'nope'")
    assert "digits" in err and "fashion-mnist" in err


def test_invalid_yaml_is_a_user_error(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    code, _, err = oodbench(capsys, "run", path, "--cache-dir", tmp_path / "cache", "--quiet")
    assert code == 2
    assert err.startswith(f"error: {path}: not valid YAML")
