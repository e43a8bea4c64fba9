"""The Python API (``import oodbench``): benchmarks by name, path or mapping, in-memory models, the
cached splits as arrays, and scoring method objects - checked against the CLI's files and against
plain numpy / a forward pass written out here."""
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import oodbench as ob
from extract.backbones import digits_net
from extract.datasets import load_dataset
from results.metrics import ood_metrics

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DIGITS_FILE = Path(ob.__file__).parent / "benchmarks/digits.yaml"


@pytest.fixture
def example(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import cosine_scores

    return cosine_scores.CosineToClassMeans


def test_run_returns_the_tidy_metrics_it_writes(cache_copy, tmp_path, example, forwards):
    metrics = ob.run("digits", methods=["energy", example(top=2)], cache_dir=cache_copy, out_dir=tmp_path,
                     progress=False)
    assert forwards == []  # everything but the new score was cached
    written = pd.read_csv(tmp_path / "digits/metrics.csv")
    pd.testing.assert_frame_equal(metrics.reset_index(drop=True), written, check_dtype=False)
    assert set(metrics["method"]) == {"energy", "cosine_means(top=2)"}
    assert (tmp_path / "digits/digits-net/leaderboard.md").is_file()


def test_a_benchmark_mapping_runs_like_its_file(cache_copy, tmp_path, warm):
    config = yaml.safe_load(DIGITS_FILE.read_text())
    config["methods"] = ["msp", {"name": "energy", "params": {"T": 2}}]
    metrics = ob.Bench(config, cache_dir=cache_copy, out_dir=tmp_path, progress=False).run(write=False)
    assert not (tmp_path / "digits").exists()
    assert list(metrics["method"].unique()) == ["msp", "energy(T=2)"]
    board = pd.read_csv(warm.out / "digits/metrics.csv").set_index(["method", "ood_set"])
    for _, row in metrics[metrics["method"] == "msp"].iterrows():
        assert row["auroc"] == pytest.approx(board.loc[("msp", row["ood_set"]), "auroc"], abs=1e-12)


def test_open_splits_gives_the_cached_arrays(cache_copy):
    import h5py

    splits = ob.open_splits("digits", cache_dir=cache_copy)
    assert (splits.benchmark, splits.backbone, splits.seed) == ("digits", "digits-net", 0)
    assert list(splits.ood) == ["digits-6to9", "photo-patches", "gaussian"]
    assert splits.groups["digits-6to9"] == "near" and splits.validation is not None
    [test_file] = cache_copy.glob("*/digits.test.*.h5")
    with h5py.File(test_file, "r") as h5:
        np.testing.assert_array_equal(splits.test.features, h5["features"][()])
        np.testing.assert_array_equal(splits.test.labels, h5["labels"][()])
        np.testing.assert_array_equal(splits.test.activations("block1"), h5["activations/block1"][()])
    W, b = splits.test.head
    np.testing.assert_allclose(splits.test.features @ W.T + b, splits.test.logits, rtol=1e-4, atol=1e-4)


def test_score_a_method_object_in_memory_equals_the_harness(cache_copy, tmp_path, example):
    splits = ob.open_splits("digits", cache_dir=cache_copy)
    in_memory = ob.score(example(top=2), splits)
    bench = ob.Bench("digits", cache_dir=cache_copy, out_dir=tmp_path, progress=False)
    harness = bench.score(example, top=2)
    columns = ["ood_set", "fpr95", "auroc", "aupr_in", "aupr_out", "id_acc"]
    pd.testing.assert_frame_equal(in_memory[columns], harness[columns])
    # and by hand: the score's formula, numpy, results.metrics
    fit = np.asarray(splits.fit.features, np.float64)
    means = np.stack([fit[splits.fit.labels == c].mean(axis=0) for c in range(6)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)

    def by_hand(split):
        features = np.asarray(split.features, np.float64)
        cosines = features @ means.T / np.linalg.norm(features, axis=1, keepdims=True)
        return np.sort(cosines, axis=1)[:, -2:].mean(axis=1)
    expected = ood_metrics(by_hand(splits.test), by_hand(splits.ood["gaussian"]))
    row = in_memory.set_index("ood_set").loc["gaussian"]
    assert row["auroc"] == pytest.approx(expected["auroc"], abs=1e-12)


def test_a_class_defined_in_a_notebook_cell_scores_in_process(cache_copy, tmp_path):
    class NegatedLogitGap(ob.Method):  # not importable by 'module:Class': carried as the class
        name = "logit_gap"

        def score_samples(self, split):
            top2 = np.sort(np.asarray(split.logits, np.float64), axis=1)[:, -2:]
            return top2[:, 1] - top2[:, 0]

    metrics = ob.Bench("digits", cache_dir=cache_copy, out_dir=tmp_path, progress=False).score(NegatedLogitGap())
    assert list(metrics["method"].unique()) == ["logit_gap"] and len(metrics) == 3
    splits = ob.open_splits("digits", cache_dir=cache_copy)
    pd.testing.assert_frame_equal(metrics.drop(columns="benchmark"),
                                  ob.score(NegatedLogitGap, splits).drop(columns="benchmark"))


def test_network_methods_are_scored_through_the_bench():
    splits = ob.Splits("toy", "net", 0, "id_positive", None, None, {}, {})
    with pytest.raises(ValueError, match="computes its outputs through the network; score it with Bench"):
        ob.score("odin", splits)


@pytest.mark.slow
def test_evaluate_an_in_memory_model_without_yaml(tmp_path, forwards):
    torch.manual_seed(0)
    model = digits_net()
    cache = tmp_path / "cache"
    metrics = ob.evaluate_model(model, "digits", head="fc", methods=["msp", "energy"], cache_dir=cache,
                                out_dir=tmp_path / "out", progress=False)
    assert set(metrics["backbone"]) == {"model"} and set(metrics["seed"]) == {0}
    # the cached logits and the ID accuracy, recomputed by a forward pass written out here (images in
    # [0, 1], digits-net's normalisation, which the benchmark's backbone lends the model)
    test = load_dataset("digits", "test")
    x = (torch.from_numpy(test.images).unsqueeze(1) - 0.3) / 0.4
    with torch.no_grad():
        logits = model.eval()(x).double().numpy()
    splits = ob.Bench("digits", model=model, head="fc", cache_dir=cache, progress=False).splits()
    np.testing.assert_allclose(splits.test.logits, logits, rtol=1e-4, atol=1e-5)
    assert metrics["id_acc"].iloc[0] == pytest.approx((logits.argmax(axis=1) == test.labels).mean(), abs=1e-12)

    # the entries are keyed by the weights: the same model again reads the cache...
    forwards.clear()
    again = ob.evaluate_model(model, "digits", head="fc", methods=["msp", "energy"], cache_dir=cache,
                              out_dir=tmp_path / "out", progress=False)
    assert forwards == []
    pd.testing.assert_frame_equal(metrics, again)
    # ...and changed weights are a new entry
    with torch.no_grad():
        model.fc.bias += 1.0
    entries = sorted(p.name for p in cache.iterdir() if p.is_dir() and p.name not in ("runs", "weights"))
    ob.evaluate_model(model, "digits", head="fc", methods=["msp"], cache_dir=cache, out_dir=tmp_path / "out",
                      progress=False)
    after = sorted(p.name for p in cache.iterdir() if p.is_dir() and p.name not in ("runs", "weights"))
    assert len(after) == len(entries) + 1


def test_model_errors_say_what_to_give(tmp_path):
    with pytest.raises(ValueError, match="needs head=: the name of its final linear layer.*block1"):
        ob.evaluate_model(digits_net(), "digits", head="", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="a benchmark is a packaged name, a YAML path or a mapping"):
        ob.Bench(42)


def test_the_api_module_is_importable_without_torch():
    code = ("import sys, oodbench; import harness.cli; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    import subprocess

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
