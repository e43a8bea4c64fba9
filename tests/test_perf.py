"""The throughput benchmark's machinery (``make perf``), at toy sizes: the synthetic cache is in
the store's format, every method runs on it in a fresh process, and the re-inference comparison
computes the same table from the network as from the cache. No timings are asserted."""

import numpy as np
import pytest

from extract.datasets import ImageSet, load_dataset
from extract.store import CachedSplit, FeatureStore
from harness.perf import (
    IMAGENET_SHAPE,
    SCALE_KNN_SETTINGS,
    gemm_floor_seconds,
    interleaved_best,
    measure_knn_benchmark,
    measure_knn_scale,
    measure_network,
    measure_reinference,
    measure_scale,
    peak_resident_bytes,
    perf_backbone_and_images,
    reset_peak_resident,
    scale_methods,
    scaled_shape,
    time_method,
    touch_memory,
    write_synthetic_cache,
)
from harness.perf_pytorch_ood import METHODS, RESCORE_METHOD, compare, network_parts, pytorch_ood_detector
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


def test_pytorch_ood_detectors_get_the_harness_settings():
    backbone, _ = perf_backbone_and_images(10)
    model, encoder, head = network_parts(backbone)
    detectors = {name: pytorch_ood_detector(name, model, encoder, head) for name in METHODS}
    assert detectors["react"].percentile == 0.9 and detectors["ash_s"].percentile == 0.9
    assert detectors["knn"].k == 50 and detectors["vim"].d == 32 and detectors["dice"].p == 0.9  # 64-d features
    assert detectors["energy"].t == 1.0 and type(detectors["mahalanobis"]).__name__ == "Mahalanobis"


def test_pytorch_ood_comparison_scores_the_same_sets_on_both_sides_with_the_same_aurocs():
    backbone, images = perf_backbone_and_images(150)  # a random cnn28 and 150 images: seconds

    def rows(start, stop):
        return ImageSet(images.name, images.split, images.images[start:stop], images.labels[start:stop],
                        images.source)

    sets = {"fit": rows(0, 100), "test": rows(100, 150), "gaussian": load_dataset("gaussian", n=50)}
    result = compare(backbone, sets, best_of=interleaved_best, methods=("msp", RESCORE_METHOD), batch_size=40)
    assert result["sets"] == {"fit": 100, "test": 50, "gaussian": 50}
    assert [row["method"] for row in result["methods"]] == ["msp", RESCORE_METHOD]
    for row in result["methods"]:
        assert row["pytorch_ood_s"] > 0 and row["harness_s"] > 0
        # pytorch-ood scores in float32, the harness in float64: at most a few of the 2,500 pairs swap
        assert row["max_auroc_difference"] < 2e-3 and 0 <= row["auroc"]["gaussian"]["harness"] <= 1
    assert result["harness_cold_s"] == pytest.approx(result["extraction_s"] + result["harness_scoring_s"])
    assert result["rescore"]["speedup"] == pytest.approx(result["rescore"]["pytorch_ood_s"]
                                                         / result["rescore"]["harness_s"])


def test_knn_part_times_exact_and_approximate_search_against_the_gemm_floor(tmp_path):
    result = measure_knn_scale(TINY, tmp_path, k=5)
    assert result["k"] == 5 and not list(tmp_path.iterdir())
    assert len(result["gemm_floors_s"]) == 2 and result["gemm_floor_s"] == min(result["gemm_floors_s"]) > 0
    for index in ("flat", "ivf"):
        row = result[index]
        assert row["fit_s"] > 0 and row["score_s"] > 0
        assert row["over_gemm_floor"] == pytest.approx(row["total_s"] / result["gemm_floor_s"])
    # 120 fit rows make 3 IVF lists, all of them searched (nprobe 16): here the approximate search is exact
    assert result["ivf_lists"] == 3 and result["nprobe"] == 16
    assert result["ivf"]["auroc"] == result["flat"]["auroc"] and result["ivf_minus_flat_auroc_points"] == 0


def test_gemm_floor_computes_every_product_in_tiles(monkeypatch):
    shapes = []

    class Rows(np.ndarray):
        def __matmul__(self, other):
            shapes.append((len(self), other.shape[1]))
            return np.asarray(self) @ other
    query = np.zeros((5000, 3), np.float32).view(Rows)
    gemm_floor_seconds(np.zeros((1500, 3), np.float32), [query])
    assert shapes == [(4096, 1024), (4096, 476), (904, 1024), (904, 476)]


@pytest.mark.slow
def test_knn_part_on_a_warm_benchmark(cache_copy, tmp_path, monkeypatch):
    monkeypatch.setattr("methods.distance_scores.KNN.grid", {"k": [1, 5, 50]})  # digits' bank is under 1000
    result = measure_knn_benchmark("digits", RunOptions(cache_dir=cache_copy, out_dir=tmp_path, progress=False))
    [row] = result["backbones"]
    assert row["backbone"] == "digits-net" and row["bank"] > 50 and row["queries"] > row["bank"]
    assert all(row[key] > 0 for key in ("gemm_floor_s", "k50_s", "sweep_s")) and result["grid"] == [1, 5, 50]
