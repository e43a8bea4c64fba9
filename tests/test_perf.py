"""The throughput benchmark's machinery (``make perf``), at toy sizes: the synthetic cache is in
the store's format, every method runs on it in a fresh process, and the re-inference comparison
computes the same table from the network as from the cache. No timings are asserted."""

import numpy as np
import pytest

from extract.store import CachedSplit, FeatureStore
from harness.perf import (
    IMAGENET_SHAPE,
    SCALE_KNN_SETTINGS,
    measure_network,
    measure_reinference,
    measure_scale,
    peak_resident_bytes,
    reset_peak_resident,
    scale_methods,
    scaled_shape,
    time_method,
    touch_memory,
    write_synthetic_cache,
)
from harness.resolution import RunOptions
from methods import CACHE_ONLY_METHODS

TINY = {"features": 16, "classes": 4, "fit": 120, "id_test": 60, "ood": (20, 20)}


def test_synthetic_cache_is_a_readable_store_with_every_class_in_the_fit_split(tmp_path):
    fit_path, test_paths = write_synthetic_cache(tmp_path, TINY)
    fit = FeatureStore(tmp_path).open_entry(fit_path)  # verified like any entry
    assert fit.features.shape == (120, 16) and fit.logits.shape == (120, 4)
    assert np.bincount(fit.labels, minlength=4).tolist() == [30, 30, 30, 30]
    assert (fit.features >= 0).all() and (fit.features == 0).any()  # post-ReLU-like
    W, b = fit.head
    np.testing.assert_allclose(fit.logits, fit.features @ W.T + b, rtol=1e-5, atol=1e-5)  # logits = head(features)
    assert [len(CachedSplit(p)) for p in test_paths] == [60, 20, 20]
    ood_mean = np.mean([CachedSplit(p).features.mean() for p in test_paths[1:]])
    assert ood_mean != pytest.approx(CachedSplit(test_paths[0]).features.mean(), rel=1e-3)  # a shifted distribution


def test_scaled_shape_keeps_the_dimensions_and_at_least_one_sample_per_class():
    assert scaled_shape(1.0) == IMAGENET_SHAPE
    tenth = scaled_shape(0.1)
    assert (tenth["features"], tenth["classes"], tenth["fit"], tenth["id_test"], tenth["ood"]) == \
        (2048, 1000, 10_000, 5_000, (1_000,) * 4)
    assert scaled_shape(1e-6)["fit"] == 1000


def test_time_method_fits_scores_and_reports_its_own_peak_memory(tmp_path):
    fit_path, test_paths = write_synthetic_cache(tmp_path, TINY)
    resettable = reset_peak_resident()
    resident = peak_resident_bytes()  # after a reset: the current resident size
    touch_memory(2 ** 28)  # a 256 MiB peak before the method...
    row = time_method("mahalanobis", {}, fit_path, test_paths)
    assert row["method"] == "mahalanobis" and row["fit_s"] > 0 and row["score_s"] > 0
    assert row["peak_rss_bytes"] > 10 * 2 ** 20
    if resettable:  # ...is not the method's (where /proc/self/clear_refs exists)
        assert row["peak_rss_bytes"] < resident + 2 ** 27


def test_scale_runs_every_cache_only_method_with_knn_at_its_imagenet_settings():
    names = [name for name, _ in scale_methods()]
    assert sorted(set(names)) == list(CACHE_ONLY_METHODS)
    assert [params for name, params in scale_methods() if name == "knn"] == list(SCALE_KNN_SETTINGS)


@pytest.mark.slow
def test_measure_scale_runs_each_method_in_its_own_process(tmp_path, monkeypatch):
    monkeypatch.setattr("harness.perf.SCALE_KNN_SETTINGS", ({"k": 5}, {"k": 2, "fit_fraction": 0.5}))
    result = measure_scale(TINY, tmp_path, touch_bytes=2 ** 20)
    labels = [row["method"] for row in result["methods"]]
    assert len(labels) == len(CACHE_ONLY_METHODS) + 1 and "knn(k=2,fit_fraction=0.5)" in labels
    assert result["test_samples"] == 100 and not list(tmp_path.iterdir())  # the synthetic cache is removed
    assert all(row["score_s"] > 0 and row["peak_rss_bytes"] > 0 for row in result["methods"])


@pytest.mark.slow
def test_reinference_computes_the_same_table_as_the_cache(warm, cache_copy, tmp_path):
    options = RunOptions(cache_dir=cache_copy, out_dir=tmp_path, progress=False)
    result = measure_reinference("digits", options)
    assert [row["method"] for row in result["methods"]] == list(CACHE_ONLY_METHODS)
    assert max(row["max_metric_difference"] for row in result["methods"]) < 1e-12
    assert result["reinference_total_s"] > result["cache_total_s"] > 0
    assert result["images"][result["sets"][0]] > 0


def test_network_part_times_each_network_method_against_an_extraction_pass():
    result = measure_network(n=300, batch_size=100, device="cpu", repeats=1)
    assert result["images"] == 300 and result["layer"] == "block3.1"
    assert len(result["methods"]) == 5 and "ash_layer from cached activations" in result["methods"][1]["method"]
    for row in result["methods"]:
        assert row["seconds"] > 0
        assert row["over_extraction"] == pytest.approx(row["seconds"] / result["extraction_s"])
