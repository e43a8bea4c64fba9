"""Paper protocols (issue 17): the ID validation split that sweeps select on, held out of fitting;
ReAct's threshold on the ID validation split (``source=val``); the FPR rule of a benchmark file."""
import numpy as np
import pandas as pd
import pytest
import yaml

import oodbench as ob
from extract.datasets import ImageSet, held_out, load_dataset
from harness.config import BENCHMARK_DIR, BenchmarkError, parse_benchmark
from methods.shaping_scores import react_threshold
from results.metrics import fpr_cal_metric


def digits_config() -> dict:
    return yaml.safe_load((BENCHMARK_DIR / "digits.yaml").read_text())


# ---------------------------------------------------------------- the ID validation split

def test_a_held_out_validation_slice_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(4), [40, 30, 20, 10])
    images = ImageSet("toy", "train", np.arange(100, dtype=np.uint8)[:, None, None].repeat(2, 1).repeat(2, 2),
                      labels, source="toy")
    fit, val = held_out(images, 0.1, seed=3)
    assert (fit.split, val.split) == ("train-fit", "train-val")
    assert len(val) == 10 and len(fit) == 90
    np.testing.assert_array_equal(np.bincount(val.labels), [4, 3, 2, 1])  # stratified
    pixels = lambda s: set(s.images[:, 0, 0].tolist())  # noqa: E731 (each image is its own index)
    assert pixels(fit) | pixels(val) == set(range(100)) and not pixels(fit) & pixels(val)
    assert pixels(held_out(images, 0.1, seed=3)[1]) == pixels(val) != pixels(held_out(images, 0.1, seed=4)[1])
    fit, val = held_out(images, 0.01, seed=0)  # ceil(1) images, raised to the number of classes
    assert len(val) == 4 and len(fit) == 96


def test_a_hold_out_without_a_stratified_cut_is_seeded_and_random_and_one_image_is_refused(caplog):
    """The tests' tiny fixtures (a class with one image) get a seeded random cut, with a warning."""
    images = ImageSet("toy", "train", np.zeros((5, 2, 2), np.uint8), np.array([0, 0, 1, 2, 2]), source="toy")
    fit, val = held_out(images, 0.1, seed=0)
    assert len(val) == 3 and len(fit) == 2 and "not stratified" in caplog.text
    one = ImageSet("toy", "train", np.zeros((1, 2, 2), np.uint8), np.array([0]), source="toy")
    with pytest.raises(ValueError, match="1 image\\(s\\); an ID validation split needs a fit split of at least 2"):
        held_out(one, 0.1, seed=0)


@pytest.mark.parametrize("val, message", [
    ({"split": "test"}, "the ID validation split ('test') is the test split; it must be disjoint"),
    ({"split": "train"}, "the ID validation split ('train') is the fit split"),
    ({"split": "ood", "fraction": 0.2}, "give either 'split'"),
    ({"fraction": 1.5}, "fraction"),
    ({"params": {"n": 3}}, "'params' belongs to a 'split'"),
    ({"split": "nope"}, "nope"),
])
def test_an_id_validation_split_overlapping_fit_or_test_is_refused(val, message):
    config = digits_config()
    config["id"]["val"] = val
    with pytest.raises(BenchmarkError, match="id val") as error:
        parse_benchmark(config, "bench.yaml")
    assert message in str(error.value)


def test_the_methods_fit_on_the_fit_split_less_the_validation_slice_and_training_sees_it_all(cache_copy):
    splits = ob.open_splits("digits", cache_dir=cache_copy)
    train = load_dataset("digits", "train")
    fit, val = held_out(train, 0.1, seed=0)  # digits.yaml's default: 10%, seed 0
    assert len(splits.fit) == len(fit) and len(splits.val) == len(val) and len(fit) + len(val) == len(train)
    np.testing.assert_array_equal(splits.fit.labels, fit.labels)
    np.testing.assert_array_equal(splits.val.labels, val.labels)
    bench = ob.Bench("digits", cache_dir=cache_copy, progress=False)
    assert len(bench.pipeline().training_set()) == len(train)  # the backbone trains on the whole split


def test_sweeps_select_on_the_id_validation_split_and_never_read_the_id_test_split(cache_copy, tmp_path):
    bench = ob.Bench("digits", cache_dir=cache_copy, out_dir=tmp_path, progress=False)
    table = bench.sweep("energy", {"T": [1.0, 1000.0]})
    splits = bench.splits()

    def energy(split, T):
        logits = np.asarray(split.logits, np.float64) / T
        peak = logits.max(axis=1)
        return T * (peak + np.log(np.exp(logits - peak[:, None]).sum(axis=1)))
    for _, row in table.iterrows():
        expected = ob.ood_metrics(energy(splits.val, row["param_T"]), energy(splits.validation, row["param_T"]))
        assert row["val_auroc"] == pytest.approx(expected["auroc"], abs=1e-12)
        on_test = ob.ood_metrics(energy(splits.test, row["param_T"]), energy(splits.validation, row["param_T"]))
        assert row["val_auroc"] != pytest.approx(on_test["auroc"], abs=1e-6)  # the old, leaky protocol


# ---------------------------------------------------------------- ReAct's threshold source

def test_react_source_val_estimates_the_threshold_on_the_id_validation_split(cache_copy, tmp_path):
    splits = ob.open_splits("digits", cache_dir=cache_copy)
    on_val = ob.make_method("react", source="val")
    assert on_val.fits_on == "val" and ob.make_method("react").fits_on == "fit"
    c_val = react_threshold(np.asarray(splits.val.features, np.float64), 90.0)
    c_train = react_threshold(np.asarray(splits.fit.features, np.float64), 90.0)
    assert c_val != pytest.approx(c_train, rel=1e-6)
    harness = ob.Bench("digits", cache_dir=cache_copy, out_dir=tmp_path, progress=False)
    by_source = {source: harness.score("react", source=source) for source in ("train", "val")}
    assert not np.allclose(by_source["train"]["auroc"], by_source["val"]["auroc"])
    in_memory = ob.score(on_val, splits)
    pd.testing.assert_frame_equal(in_memory[["ood_set", "auroc", "fpr95"]], by_source["val"][["ood_set", "auroc",
                                                                                                 "fpr95"]])

    def shaped_energy(split, c):
        W, b = split.head
        logits = np.minimum(np.asarray(split.features, np.float64), c) @ W.T.astype(np.float64) + b
        peak = logits.max(axis=1)
        return peak + np.log(np.exp(logits - peak[:, None]).sum(axis=1))
    expected = ob.ood_metrics(shaped_energy(splits.test, c_val), shaped_energy(splits.ood["gaussian"], c_val))
    row = by_source["val"].set_index("ood_set").loc["gaussian"]
    assert row["auroc"] == pytest.approx(expected["auroc"], abs=1e-9)


# ---------------------------------------------------------------- the FPR rule

def test_a_benchmark_file_can_select_the_cal_metric_fpr_rule(cache_copy, tmp_path):
    config = digits_config()
    config["fpr_rule"] = "cal_metric"
    config["methods"] = ["energy"]
    metrics = ob.Bench(config, cache_dir=cache_copy, out_dir=tmp_path, progress=False).run(write=False)
    splits = ob.open_splits("digits", cache_dir=cache_copy)
    id_scores = ob.score("energy", splits)  # canonical rule
    energy = ob.make_method("energy")
    for label, split in splits.ood.items():  # the file's rule in the run, the canonical one by default
        id_test, ood = energy.score_samples(splits.test), energy.score_samples(split)
        expected = fpr_cal_metric(id_test, ood)
        assert metrics.set_index("ood_set").loc[label, "fpr95"] == pytest.approx(expected, abs=1e-12)
        canonical = ob.ood_metrics(id_test, ood)["fpr95"]
        assert id_scores.set_index("ood_set").loc[label, "fpr95"] == pytest.approx(canonical, abs=1e-12)
    config["convention"] = "ood_positive"
    with pytest.raises(BenchmarkError, match="fpr_rule cal_metric is defined with ID as the positive class"):
        parse_benchmark(config, "bench.yaml")
    config["fpr_rule"] = "nearest"
    with pytest.raises(BenchmarkError, match="fpr_rule"):
        parse_benchmark(config, "bench.yaml")


# ---------------------------------------------------------------- a method's own fit subset

def test_a_method_fits_on_its_own_seeded_subset_of_the_fit_split(cache_copy, tmp_path):
    config = digits_config()
    config["fit"] = {"knn": {"fraction": 0.5, "seed": 1}, "vim": {"n": 200}}
    config["methods"] = ["knn", "vim", "energy"]
    bench = ob.Bench(config, cache_dir=cache_copy, out_dir=tmp_path, progress=False)
    metrics = bench.run(write=False).set_index(["method", "ood_set"])
    splits = bench.splits()
    assert splits.fit_subsets == {"knn": {"seed": 1, "fraction": 0.5}, "vim": {"seed": 0, "n": 200}}
    rows = np.sort(np.random.default_rng(1).choice(len(splits.fit), int(np.ceil(0.5 * len(splits.fit))),
                                                   replace=False))
    by_hand = ob.make_method("knn").fit(type("Fit", (), {"features": splits.fit.features[rows]})())
    expected = ob.ood_metrics(by_hand.score_samples(splits.test), by_hand.score_samples(splits.ood["gaussian"]))
    assert metrics.loc[("knn", "gaussian"), "auroc"] == pytest.approx(expected["auroc"], abs=1e-12)
    whole = ob.score("knn", ob.open_splits("digits", cache_dir=cache_copy)).set_index("ood_set")
    assert metrics.loc[("knn", "gaussian"), "auroc"] != pytest.approx(whole.loc["gaussian", "auroc"], abs=1e-9)
    in_memory = ob.score("knn", splits).set_index("ood_set")  # the same subset through the API
    assert in_memory.loc["gaussian", "auroc"] == pytest.approx(expected["auroc"], abs=1e-12)
    energy = ob.score("energy", splits).set_index("ood_set")  # methods without a subset fit as before
    assert metrics.loc[("energy", "gaussian"), "auroc"] == pytest.approx(energy.loc["gaussian", "auroc"], abs=1e-12)


@pytest.mark.parametrize("fit, message", [
    ({"nope": {"n": 3}}, "'nope' is not a method name"),
    ({"knn": {"n": 3, "fraction": 0.5}}, "give either 'n' (rows) or 'fraction'"),
    ({"knn": {}}, "give either 'n' (rows) or 'fraction'"),
    ({"knn": {"fraction": 0}}, "fraction"),
    ({"odin": {"n": 10}}, "a fit subset applies to the methods that fit on cached arrays"),
])
def test_fit_subsets_are_checked_when_the_file_is_read(fit, message):
    config = digits_config()
    config["fit"] = fit
    with pytest.raises(BenchmarkError, match="fit") as error:
        parse_benchmark(config, "bench.yaml")
    assert message in str(error.value)


def test_a_fit_subset_larger_than_the_fit_split_is_one_error(cache_copy, tmp_path):
    config = digits_config()
    config["fit"] = {"knn": {"n": 10**6}}
    with pytest.raises(ValueError, match="asks for 1000000 rows; the fit split digits/train-fit has"):
        ob.Bench(config, cache_dir=cache_copy, out_dir=tmp_path, progress=False).score("knn")
