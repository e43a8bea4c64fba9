"""End-to-end tests of the benchmark pipeline (harness.pipeline through ``oodbench run``).

Everything runs on the ``digits`` benchmark (scikit-learn's bundled 8x8 digits, no files
needed). One warm ``oodbench run digits`` is made per test session (shared with
test_cli.py through the session's base temp folder) and copied where a test mutates it.
Forward passes are counted with a global nn.Module forward hook, so "no network ran" is
asserted rather than inferred from timings.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy.special import logsumexp, softmax
from sklearn.metrics import roc_auc_score

from extract.backbones import DigitsNet
from extract.store import CachedSplit, CacheMissing
from harness.config import BENCHMARK_DIR, MethodRef, load_benchmark
from harness.evaluation import Evaluation
from harness.pipeline import BenchmarkRun
from harness.resolution import RunOptions
from methods import METHODS as REGISTERED_METHODS
from methods import Method, make_method
from tests.conftest import files, only_a_record_was_added, oodbench
from tests.test_backbones import option_a_checkpoint
from tests.test_datasets import write_cifar_jpeg_tree

METHODS = tuple(sorted(REGISTERED_METHODS))  # the digits benchmark runs every registered method
OOD_SETS = {"digits-6to9": "digits.ood", "photo-patches": "photo-patches.test", "gaussian": "gaussian.test"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_board(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, index_col="method")


def only(paths) -> Path:
    paths = list(paths)
    assert len(paths) == 1, paths
    return paths[0]


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def digits_config() -> dict:
    return yaml.safe_load((BENCHMARK_DIR / "digits.yaml").read_text())


# ---------------------------------------------------------------- outputs of a full run

def test_run_writes_leaderboards_plots_metrics_and_report(warm):
    board_dir = warm.out / "digits" / "digits-net"
    for name in ("leaderboard.csv", "leaderboard.tex", "leaderboard.md", "score_histograms.png"):
        assert (board_dir / name).is_file(), name
    assert (board_dir / "score_histograms.png").read_bytes()[:8] == PNG_MAGIC
    assert "\\begin{tabular}" in (board_dir / "leaderboard.tex").read_text()

    metrics = pd.read_csv(warm.out / "digits" / "metrics.csv")
    assert len(metrics) == len(METHODS) * len(OOD_SETS)
    assert set(metrics["method"]) == set(METHODS)
    assert set(metrics["ood_set"]) == set(OOD_SETS)
    assert dict(zip(metrics["ood_set"], metrics["group"])) == {"digits-6to9": "near", "photo-patches": "far",
                                                               "gaussian": "far"}
    assert (metrics["seed"] == 0).all() and (metrics["benchmark"] == "digits").all()
    for column in ("fpr95", "auroc", "aupr_in", "aupr_out", "id_acc"):
        assert metrics[column].between(0, 1).all(), column
    assert metrics["id_acc"].iloc[0] > 0.8  # the 15-epoch digits-net learns the task

    report = (warm.out / "digits" / "report.md").read_text()
    assert report.startswith("# digits\n")
    assert "Seeds: 0. Convention: id_positive." in report
    assert "## digits-net" in report
    assert (board_dir / "leaderboard.md").read_text() in report
    assert "- backbone digits-net seed 0: entry " in report


def test_leaderboard_auroc_rederives_from_cached_logits(warm):
    """The CSV's AUROC and ID accuracy equal sklearn on scores recomputed from the cached logits with numpy."""
    board = read_board(warm.out / "digits" / "digits-net" / "leaderboard.csv")
    assert sorted(board.index) == sorted(METHODS)

    def logits(stem):
        with h5py.File(only(warm.cache.glob(f"*/{stem}.*.h5")), "r") as h5:
            return h5["logits"][()].astype(np.float64), h5["labels"][()]

    score = {"energy": lambda f: logsumexp(f, axis=1), "maxlogit": lambda f: f.max(axis=1),
             "msp": lambda f: softmax(f, axis=1).max(axis=1)}
    id_logits, id_labels = logits("digits.test")
    assert id_logits.shape == (len(id_labels), 6)
    for ood_set, stem in OOD_SETS.items():
        ood_logits, _ = logits(stem)
        for method in score:
            s_id, s_ood = score[method](id_logits), score[method](ood_logits)
            y = np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))]  # ID is the positive class
            expected = roc_auc_score(y, np.r_[s_id, s_ood])
            assert board.loc[method, f"{ood_set}/auroc"] == pytest.approx(expected, abs=1e-9), (method, ood_set)
    # ID accuracy comes from the logits each method uses: the backbone's own for most, the
    # shaped ones for ReAct/DICE/ASH (their predict), fitted on the cached ID train entry.
    accuracy = np.mean(id_logits.argmax(axis=1) == id_labels)
    fit_entry = CachedSplit(only(warm.cache.glob("*/digits.train-fit.*.h5")))
    test_entry = CachedSplit(only(warm.cache.glob("*/digits.test.*.h5")))
    for method in METHODS:
        instance = make_method(method)
        if "network" in instance.reads:  # network methods classify from their derived entry
            described = test_entry.meta["backbone"]  # the layers the backbone declares key its network outputs
            declared = {"shaping_layer": described["shaping_layer"], "layers": described["layers"]}
            derived = CachedSplit(test_entry.derived_path(instance.name, instance.output_key(fit_entry, declared)))
            expected = np.mean(instance.predict(derived) == id_labels)
        elif type(instance).predict is Method.predict:
            expected = accuracy
        else:
            expected = np.mean(instance.fit(fit_entry).predict(test_entry) == id_labels)
        assert board.loc[method, "id_acc"] == pytest.approx(expected, abs=1e-12), method
    assert (board["n_seeds"] == 1).all()
    assert board["avg/auroc_std"].isna().all()  # one seed: no standard deviation


def test_energy_auroc_on_held_out_digits_matches_sklearn(warm):
    """The brief's headline check, spelled out: energy = logsumexp(logits), AUROC with ID = 1, to 1e-9."""
    with h5py.File(only(warm.cache.glob("*/digits.test.*.h5")), "r") as h5:
        id_logits = h5["logits"][()]
    with h5py.File(only(warm.cache.glob("*/digits.ood.*.h5")), "r") as h5:
        ood_logits = h5["logits"][()]
    s_id = logsumexp(id_logits.astype(np.float64), axis=1)
    s_ood = logsumexp(ood_logits.astype(np.float64), axis=1)
    expected = roc_auc_score(np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))], np.r_[s_id, s_ood])
    board = read_board(warm.out / "digits" / "digits-net" / "leaderboard.csv")
    assert abs(board.loc["energy", "digits-6to9/auroc"] - expected) < 1e-9


def test_second_run_on_warm_cache_computes_nothing(warm, cache_copy, tmp_path, capsys, forwards):
    before = files(cache_copy)
    code, out, err = oodbench(capsys, "run", "digits", "--cache-dir", cache_copy, "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
    assert forwards == []
    assert only_a_record_was_added(cache_copy, before)
    assert ((tmp_path / "out/digits/digits-net/leaderboard.csv").read_text()
            == (warm.out / "digits/digits-net/leaderboard.csv").read_text())


# ---------------------------------------------------------------- BenchmarkRun from the cache alone

def test_cached_scores_are_the_method_math_and_cache_only_mode_never_computes(warm, tmp_path, forwards):
    run = BenchmarkRun(load_benchmark("digits"), RunOptions(cache_dir=warm.cache, out_dir=tmp_path, progress=False))
    resolution = run.resolve(compute=False)
    evaluation = Evaluation(resolution, run.store, tmp_path)
    [backbone] = resolution.backbones
    entries = evaluation.open_entries(backbone)
    assert set(entries) == {"digits-train", "digits-val", "digits-test", *OOD_SETS, "uniform"}
    scored = evaluation.scores(backbone, MethodRef("energy"), entries, compute=False)
    assert set(scored) == {"digits-test", *OOD_SETS, "uniform", "digits-val"}
    for label, result in scored.items():
        logits = entries[label].logits.astype(np.float64)
        np.testing.assert_allclose(result.scores, logsumexp(logits, axis=1), rtol=1e-12)
        np.testing.assert_array_equal(result.predictions, logits.argmax(axis=1))
    with pytest.raises(CacheMissing, match=r"run `oodbench score digits --method energy` first"):
        evaluation.scores(backbone, MethodRef("energy", {"T": "3"}), entries, compute=False)
    assert forwards == []
    assert list(tmp_path.iterdir()) == []  # nothing written


# ---------------------------------------------------------------- user models: NaN logits, checkpoint mismatch

def user_model_benchmark(tmp_path, monkeypatch, module: str, state: dict) -> Path:
    """A benchmark whose backbone is ``<module>:build`` (a DigitsNet) with ``state`` as its checkpoint."""
    (tmp_path / f"{module}.py").write_text(
        "from extract.backbones import DigitsNet\n\n\ndef build(num_classes=6):\n"
        "    return DigitsNet(num_classes=num_classes)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    checkpoint = tmp_path / f"{module}.pt"
    torch.save(state, checkpoint)
    return write_yaml(tmp_path / f"{module}.yaml", {
        "name": "user-model",
        "id": {"dataset": "digits", "fit_split": "train", "test_split": "test", "num_classes": 6},
        "ood": [{"dataset": "gaussian", "params": {"n": 50, "size": 8}}],
        "backbones": [{"name": "user-net", "factory": f"{module}:build", "checkpoint": str(checkpoint),
                       "head": "fc", "preprocessing": {"input_size": 8, "channels": 1, "mean": [0.3],
                                                       "std": [0.4]}}],
    })


def test_nan_logits_fail_with_a_clear_error(tmp_path, monkeypatch, capsys, forwards):
    model = DigitsNet(num_classes=6)
    with torch.no_grad():
        model.fc.bias.fill_(float("nan"))
    bench = user_model_benchmark(tmp_path, monkeypatch, "oodbench_test_nan_model", model.state_dict())
    code, out, err = oodbench(capsys, "run", bench, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out",
                              "--quiet")
    assert code == 2
    assert err.startswith("error: ")
    # the first method in the leaderboard shapes features and reads the head, so the error names the
    # root cause: the NaN bias of the head
    assert "the classifier head (W, b) holds NaN or infinite values" in err
    assert forwards  # the backbone did run: the NaNs come from the network, not from the harness
    assert not (tmp_path / "out" / "user-model" / "report.md").exists()


@pytest.mark.parametrize("damage, missing, unexpected", [
    ("drop", ["fc.bias"], []),
    ("extra", [], ["extra.weight"]),
    ("both", ["block1.0.weight"], ["backbone.fc.weight"]),
])
def test_checkpoint_key_mismatch_lists_the_keys(tmp_path, monkeypatch, capsys, forwards, damage, missing,
                                                unexpected):
    state = DigitsNet(num_classes=6).state_dict()
    if damage in ("drop", "both"):
        del state[missing[0]]
    if damage in ("extra", "both"):
        state[unexpected[0]] = torch.zeros(3)
    bench = user_model_benchmark(tmp_path, monkeypatch, f"oodbench_test_ckpt_{damage}", state)
    code, out, err = oodbench(capsys, "run", bench, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out",
                              "--quiet")
    assert code == 2
    assert err.startswith("error: checkpoint ")
    assert "does not fit DigitsNet" in err
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected)):
        if keys:
            assert f"{title} ({len(keys)}): {', '.join(keys)}" in err
        else:
            assert title not in err
    assert forwards == []


def test_checkpoint_shape_mismatch_is_reported(tmp_path, monkeypatch, capsys):
    state = DigitsNet(num_classes=6).state_dict()
    state["fc.bias"] = torch.zeros(7)
    bench = user_model_benchmark(tmp_path, monkeypatch, "oodbench_test_ckpt_shape", state)
    code, _, err = oodbench(capsys, "run", bench, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out",
                            "--quiet")
    assert code == 2
    assert "shape mismatches (1): fc.bias: checkpoint (7,) vs model (6,)" in err


# ---------------------------------------------------------------- missing, skipped and empty data

def test_missing_id_data_names_searched_paths_and_files(tmp_path, capsys, forwards):
    data_root = tmp_path / "data"
    data_root.mkdir()
    bench = write_yaml(tmp_path / "mnist-bench.yaml", {
        "name": "mnist-bench",
        "id": {"dataset": "mnist", "fit_split": "train", "test_split": "test", "num_classes": 10},
        "ood": [{"dataset": "gaussian", "params": {"n": 10}}],
        "backbones": [{"name": "cnn", "arch": "cnn28", "train": {"epochs": 1}}],
    })
    code, out, err = oodbench(capsys, "run", bench, "--data-root", data_root, "--cache-dir", tmp_path / "cache",
                              "--out", tmp_path / "out", "--quiet")
    assert code == 2
    assert err.startswith("error: dataset 'mnist' (split 'train') not found.")
    assert f"  {data_root / 'mnist'}\n" in err
    assert f"  {data_root / 'MNIST' / 'raw'}\n" in err
    assert "train-images-idx3-ubyte.gz" in err and "train-labels-idx1-ubyte.gz" in err
    assert "oodbench fetch mnist" in err
    assert forwards == []
    assert list(data_root.iterdir()) == []  # nothing was downloaded


def test_unavailable_optional_ood_set_is_skipped_visibly(warm, cache_copy, tmp_path, capsys, forwards):
    config = digits_config()
    config["ood"]["far"].append({"dataset": "notmnist"})
    bench = write_yaml(tmp_path / "digits-plus-notmnist.yaml", config)
    out_dir = tmp_path / "out"
    code, out, err = oodbench(capsys, "run", bench, "--cache-dir", cache_copy, "--out", out_dir, "--quiet")
    assert code == 0, err
    skipped = ("skipped OOD set notmnist: dataset 'notmnist' (split 'test') not found. How to get it: no automatic "
               "download; put the idx conversion of notMNIST from https://github.com/davidflanagan/notMNIST-to-MNIST "
               "(MIT) in <data_root>/notmnist/")
    assert skipped in out.splitlines()
    assert f"- {skipped}" in (out_dir / "digits" / "report.md").read_text().splitlines()
    board = read_board(out_dir / "digits" / "digits-net" / "leaderboard.csv")
    assert not any(column.startswith("notmnist") for column in board.columns)
    # the skipped set leaves the benchmark exactly as without it, and nothing was recomputed
    assert ((out_dir / "digits/digits-net/leaderboard.csv").read_text()
            == (warm.out / "digits/digits-net/leaderboard.csv").read_text())
    assert forwards == []


def test_no_available_ood_set_is_an_error(tmp_path, capsys, forwards):
    config = digits_config()
    config["ood"] = [{"dataset": "notmnist"}]
    bench = write_yaml(tmp_path / "only-notmnist.yaml", config)
    code, _, err = oodbench(capsys, "run", bench, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out",
                            "--quiet")
    assert code == 2
    assert err.startswith("error: benchmark digits: none of its OOD sets is available")
    assert "skipped OOD set notmnist" in err
    assert forwards == []


def test_empty_ood_set_is_rejected_with_one_error_line(tmp_path, capsys, forwards):
    config = digits_config()
    config["ood"]["far"] = [{"dataset": "gaussian", "params": {"n": 0, "size": 8}}]
    bench = write_yaml(tmp_path / "empty-ood.yaml", config)
    code, out, err = oodbench(capsys, "run", bench, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out",
                              "--quiet")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "'gaussian'" in lines[0]  # names the benchmark's set ...
    assert "n must be a positive integer, got 0" in lines[0]  # ... and the offending parameter
    assert forwards == []
    assert not (tmp_path / "cache").exists()  # rejected before any training


# ---------------------------------------------------------------- several seeds

@pytest.mark.slow
def test_two_seeds_give_means_and_standard_deviations(warm, cache_copy, tmp_path, capsys):
    code, out, err = oodbench(capsys, "run", "digits", "--seeds", "0,1", "--cache-dir", cache_copy,
                              "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
    board = read_board(tmp_path / "out/digits/digits-net/leaderboard.csv")
    assert (board["n_seeds"] == 2).all()
    std_columns = [c for c in board.columns if c.endswith("_std")]
    assert len(std_columns) == 25  # 3 sets + near/far/overall averages, 4 metrics each, + id_acc
    assert not board[std_columns].isna().any().any()
    assert (board[std_columns] >= 0).all().all()
    metrics = pd.read_csv(tmp_path / "out/digits/metrics.csv")
    assert sorted(metrics["seed"].unique()) == [0, 1]
    # seed 0 reuses the warm cache: its rows equal the single-seed run's
    warm_metrics = pd.read_csv(warm.out / "digits/metrics.csv")
    seed0 = metrics[metrics["seed"] == 0].reset_index(drop=True)
    pd.testing.assert_frame_equal(seed0, warm_metrics)
    assert "Seeds: 0, 1." in (tmp_path / "out/digits/report.md").read_text()
    assert len(list((cache_copy / "weights").glob("digits-net-seed1-*.pt"))) == 1


@pytest.mark.slow
def test_a_registry_architecture_with_a_checkpoint_under_the_data_root_runs_end_to_end(tmp_path, capsys):
    """The cifar10-jpeg benchmark's shape on tiny fixtures in the real formats: a JPEG ImageFolder
    tree, an option-A ResNet checkpoint found by a glob under {data_root}, network methods included."""
    write_cifar_jpeg_tree(tmp_path / "data", per_class=8)
    (tmp_path / "data" / "ckpt").mkdir()
    option_a_checkpoint(tmp_path / "data" / "ckpt" / "resnet20-0a1b2c.th", 20)
    config = yaml.safe_load((BENCHMARK_DIR / "cifar10-jpeg.yaml").read_text())
    config.update(ood=[{"dataset": "gaussian", "params": {"n": 30, "size": 32}}],
                  validation={"dataset": "uniform", "params": {"n": 30, "size": 32}},
                  methods=["energy", "ash_layer", "odin", {"name": "mahalanobis_ens", "params": {"holdout": 10}}],
                  backbones=[{"name": "resnet20", "arch": "cifar-resnet20",
                              "checkpoint": "{data_root}/ckpt/resnet20-*.th"}])
    bench = write_yaml(tmp_path / "tiny-cifar.yaml", config)
    argv = ("run", bench, "--data-root", tmp_path / "data", "--cache-dir", tmp_path / "cache",
            "--out", tmp_path / "out", "--quiet")
    code, out, err = oodbench(capsys, *argv)
    assert code == 0, err
    board = read_board(tmp_path / "out" / "cifar10-jpeg" / "resnet20" / "leaderboard.csv")
    assert sorted(board.index) == ["ash_layer", "energy", "mahalanobis_ens(holdout=10)", "odin"]
    (tmp_path / "data" / "ckpt" / "resnet20-0a1b2c.th").rename(tmp_path / "data" / "ckpt" / "other.th")
    code, _, err = oodbench(capsys, *argv)
    assert code == 2 and "checkpoint " in err and "resnet20-*.th: no file matches" in err


def finetuned_digits_config() -> dict:
    config = digits_config()
    config["methods"] = ["energy", "msp"]
    config["backbones"] += [
        {"name": "digits-net+um", "finetune": {"from": "digits-net", "forget": "um", "epochs": 2, "lr": 0.01,
                                               "batch_size": 64}},
        {"name": "digits-net+oe+umap", "finetune": {
            "from": "digits-net", "objective": "oe", "forget": "umap", "zeta": 0.05, "epochs": 2, "lr": 0.1,
            "batch_size": 64, "outliers": {"dataset": "hopper-patches", "params": {"n": 500, "size": 8}}}}]
    return config


def test_fine_tuned_backbones_are_validated(tmp_path, capsys):
    for change, message in (
            ({"from": "nope"}, "fine-tunes 'nope', which is not a backbone listed before it"),
            ({"objective": "oe", "outliers": "gaussian"}, "auxiliary outliers 'gaussian' must be disjoint"),
            ({"objective": "oe", "outliers": "nothing"}, "unknown dataset 'nothing'"),
            ({"forget": "forever"}, "forget 'forever' is not one of"),
            ({"from": None}, "'finetune' needs 'from'")):
        config = finetuned_digits_config()
        config["backbones"][1]["finetune"].update(change)
        code, _, err = oodbench(capsys, "run", write_yaml(tmp_path / "bad.yaml", config), "--cache-dir", tmp_path)
        assert code == 2 and message in err, err
        assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_fine_tuned_backbones_get_their_own_entries_and_leaderboards(warm, cache_copy, tmp_path, capsys):
    bench = write_yaml(tmp_path / "digits-finetuned.yaml", finetuned_digits_config())
    code, out, err = oodbench(capsys, "run", bench, "--cache-dir", cache_copy, "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
    boards = {name: read_board(tmp_path / "out/digits" / name / "leaderboard.csv")
              for name in ("digits-net", "digits-net+um", "digits-net+oe+umap")}
    metrics = pd.read_csv(tmp_path / "out/digits/metrics.csv")
    base_energy = metrics[(metrics.backbone == "digits-net") & (metrics.method == "energy")]
    warm_energy = pd.read_csv(warm.out / "digits/metrics.csv").query("method == 'energy'")
    np.testing.assert_array_equal(base_energy["auroc"].to_numpy(), warm_energy["auroc"].to_numpy())  # base reused
    accuracies = {name: board.loc["energy", "id_acc"] for name, board in boards.items()}
    assert len(set(accuracies.values())) == 3 and min(accuracies.values()) > 0.8, accuracies
    weights = sorted(p.name.split("-seed")[0] for p in (cache_copy / "weights").glob("*.pt"))
    assert weights == ["digits-net", "digits-net+oe+umap", "digits-net+um"]
    side_by_side = read_board(tmp_path / "out/digits/finetuning/leaderboard.csv")  # every method of each, renamed
    assert sorted(side_by_side.index) == ["energy", "energy [OE + UMAP]", "energy [UM]",
                                          "msp", "msp [OE + UMAP]", "msp [UM]"]
    assert side_by_side.loc["energy [UM]", "id_acc"] == boards["digits-net+um"].loc["energy", "id_acc"]
    assert side_by_side.loc["msp [OE + UMAP]", "avg/auroc"] == boards["digits-net+oe+umap"].loc["msp", "avg/auroc"]
    assert "## Fine-tuned backbones beside their base" in (tmp_path / "out/digits/report.md").read_text()


@pytest.mark.slow
def test_epoch_report_scores_every_snapshot_and_its_last_equals_the_trained_backbone(warm, cache_copy, tmp_path,
                                                                                     capsys):
    config = digits_config()
    config["backbones"][0]["train"]["snapshot_every"] = 5
    bench = write_yaml(tmp_path / "digits-snapshots.yaml", config)
    argv = ("epochs", bench, "--backbone", "digits-net", "--methods", "energy,msp", "--cache-dir", cache_copy,
            "--out", tmp_path / "out", "--quiet")
    code, out, err = oodbench(capsys, *argv)
    assert code == 0, err
    table = pd.read_csv(tmp_path / "out/digits/epochs/digits-net/epochs.csv")
    assert sorted(table["epoch"].unique()) == [5, 10, 15]
    assert set(table["ood_set"]) == set(OOD_SETS) and set(table["method"]) == {"energy", "msp"}
    assert table["test_acc"].notna().all() and table["train_loss"].notna().all()
    assert (tmp_path / "out/digits/epochs/digits-net/epochs.png").read_bytes().startswith(PNG_MAGIC)
    # the last snapshot is the trained network (same weights, same entry): the run's own metrics
    last = table[table["epoch"] == 15].sort_values(["method", "ood_set"]).reset_index(drop=True)
    trained = pd.read_csv(warm.out / "digits/metrics.csv").query("method in ['energy', 'msp']")
    trained = trained.sort_values(["method", "ood_set"]).reset_index(drop=True)
    np.testing.assert_allclose(last["auroc"], trained["auroc"])
    np.testing.assert_allclose(last["id_acc"], trained["id_acc"])
    assert "average over the OOD sets by epoch" in out
    code, _, err = oodbench(capsys, "epochs", "digits", "--backbone", "digits-net", "--cache-dir", cache_copy,
                            "--out", tmp_path / "out", "--quiet")
    assert code == 2 and "keeps no per-epoch snapshots; set 'snapshot_every: N'" in err
    code, _, err = oodbench(capsys, *argv[:5], "odin", *argv[6:])
    assert code == 2 and "odin need network passes per snapshot" in err


# ---------------------------------------------------------------- the scoring grid through joblib

@pytest.mark.slow
@pytest.mark.parametrize("backend", ["loky", "dask"])
def test_the_scoring_grid_gives_the_same_leaderboard_through_any_backend(warm, cache_copy, tmp_path, capsys, backend):
    """Cache-only cells scored by two loky worker processes (or a local two-worker Dask cluster) give
    the warm run's leaderboard exactly; the scores they cache are the ones a re-render reads."""
    if backend == "dask":
        pytest.importorskip("dask.distributed", reason="Dask is not installed (pip install 'dask[distributed]')")
    for path in cache_copy.rglob("scores/*.h5"):
        path.unlink()  # every score is computed again, in the workers
    code, out, err = oodbench(capsys, "run", "digits", "--cache-dir", cache_copy, "--out", tmp_path / "out", "--quiet",
                              "--jobs", "2", "--backend", backend)
    assert code == 0, err
    assert f"score grid ({backend}, 2 jobs)" in out
    pd.testing.assert_frame_equal(read_board(tmp_path / "out/digits/digits-net/leaderboard.csv"),
                                  read_board(warm.out / "digits/digits-net/leaderboard.csv"))
    code, out, err = oodbench(capsys, "leaderboard", "digits", "--cache-dir", cache_copy, "--out", tmp_path / "again",
                              "--quiet")
    assert code == 0, err


def test_a_bad_scoring_grid_is_refused_before_any_work(tmp_path, capsys, forwards):
    code, _, err = oodbench(capsys, "run", "digits", "--cache-dir", tmp_path / "cache", "--jobs", "0", "--quiet")
    assert code == 2 and "jobs must be a positive number of workers or -1" in err
    assert forwards == [] and not (tmp_path / "cache").exists()
