"""Hyperparameter sweeps from the cache (`oodbench sweep`, Evaluation.sweep): selection on the
validation OOD set only, values rederived with numpy and sklearn, and every swept parameter
refits and changes the scores (OpenOOD and pytorch-ood both shipped sweeps where it did not)."""
from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
from scipy.special import logsumexp
from sklearn.metrics import roc_auc_score

import methods.distance_scores as distance_scores
from harness.config import BENCHMARK_DIR, MethodRef, load_benchmark
from harness.evaluation import Evaluation, sweep_groups
from harness.pipeline import BenchmarkRun
from harness.resolution import RunOptions
from methods import METHODS, make_method, parameter_grid
from tests.conftest import oodbench

TEST_SETS = {"digits-6to9": "digits.ood", "photo-patches": "photo-patches.test", "gaussian": "gaussian.test"}


def cached_logits(cache, stem) -> np.ndarray:
    [path] = cache.glob(f"*/{stem}.*.h5")
    with h5py.File(path, "r") as h5:
        return h5["logits"][()].astype(np.float64)


def id_auroc(id_scores, ood_scores) -> float:
    return roc_auc_score(np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))], np.r_[id_scores, ood_scores])


def test_sweep_selects_on_the_validation_set_and_reports_test_results(warm, cache_copy, tmp_path, capsys, forwards):
    out = tmp_path / "out"
    code, stdout, err = oodbench(capsys, "sweep", "digits", "--method", "energy", "--grid", "T=0.5,1,20",
                                 "--cache-dir", cache_copy, "--out", out, "--quiet")
    assert code == 0, err
    assert forwards == []
    assert stdout.startswith("energy sweep on digits: 3 settings, selected by auroc on the validation OOD set uniform")
    table = pd.read_csv(out / "digits" / "sweeps" / "energy.csv")
    assert list(table["param_T"]) == [0.5, 1.0, 20.0]
    energy = {T: (lambda logits, T=T: T * logsumexp(logits / T, axis=1)) for T in table["param_T"]}
    id_logits = cached_logits(cache_copy, "digits.test")
    id_val_logits = cached_logits(cache_copy, "digits.train-val")  # the ID validation split, never the test split
    for _, row in table.iterrows():
        score = energy[row["param_T"]]
        validation = score(cached_logits(cache_copy, "uniform.test"))
        assert row["val_auroc"] == pytest.approx(id_auroc(score(id_val_logits), validation), abs=1e-9)
        test = [id_auroc(score(id_logits), score(cached_logits(cache_copy, stem))) for stem in TEST_SETS.values()]
        assert row["test_auroc"] == pytest.approx(np.mean(test), abs=1e-9)
        assert row["far_auroc"] == pytest.approx(np.mean(test[1:]), abs=1e-9)
    assert table["selected"].tolist() == [i == table["val_auroc"].idxmax() for i in range(3)]
    board = pd.read_csv(warm.out / "digits/digits-net/leaderboard.csv", index_col="method")
    assert table.loc[1, "test_auroc"] == pytest.approx(board.loc["energy", "avg/auroc"], abs=1e-12)
    chosen = table[table["selected"]].iloc[0]
    assert (f"selected for digits-net seed 0: {chosen['method']} (validation auroc {100 * chosen['val_auroc']:.2f}) "
            f"-> test FPR@95 {100 * chosen['test_fpr95']:.2f}, AUROC {100 * chosen['test_auroc']:.2f}") in stdout


def test_a_sweep_through_worker_processes_gives_the_in_process_table(cache_copy, tmp_path, capsys, forwards):
    """The sweep's (backbone, setting) points run through the scoring grid: two loky workers give
    the in-process table exactly, with the selection made over all of them."""
    tables = {}
    for jobs in ("1", "2"):
        code, stdout, err = oodbench(capsys, "sweep", "digits", "--method", "knn", "--grid", "k=1,5,50",
                                     "--cache-dir", cache_copy, "--out", tmp_path / jobs, "--quiet", "--jobs", jobs)
        assert code == 0, err
        tables[jobs] = pd.read_csv(tmp_path / jobs / "digits" / "sweeps" / "knn.csv")
    assert "sweep grid (loky, 2 jobs)" in stdout and forwards == []
    pd.testing.assert_frame_equal(tables["2"], tables["1"])
    assert list(tables["2"]["param_k"]) == [1, 5, 50] and tables["2"]["selected"].sum() == 1


def test_a_knn_sweep_searches_once_per_bank_and_caches_each_k_under_its_own_key(cache_copy, tmp_path, capsys,
                                                                             monkeypatch):
    """Settings that differ only in k share one search for the largest k; each k's scores are
    cached under that k's own key and equal a fresh search for that k alone (never another k's,
    another bank's or another index's); a second sweep searches nothing."""
    searches = []
    search = distance_scores.kth_similarities
    monkeypatch.setattr(distance_scores, "kth_similarities",
                        lambda index, query, ks: searches.append(list(ks)) or search(index, query, ks))
    argv = ["sweep", "digits", "--method", "knn", "--grid", "k=1,5,50", "--grid", "fit_fraction=0.5,0.75",
            "--cache-dir", cache_copy, "--out", tmp_path, "--quiet"]
    code, _, err = oodbench(capsys, *argv)
    assert code == 0, err
    run = BenchmarkRun(load_benchmark("digits"), RunOptions(cache_dir=cache_copy, out_dir=tmp_path, progress=False))
    evaluation = Evaluation(run.resolve(compute=False), run.store, tmp_path)
    [backbone] = evaluation.resolution.backbones
    entries = evaluation.open_entries(backbone)
    assert searches == [[1, 5, 50]] * (2 * len(evaluation.score_labels()))  # per bank and entry, one search
    searches.clear()
    code, _, err = oodbench(capsys, *argv)
    assert code == 0 and searches == []  # every k of every bank from the score cache
    by_setting = {}
    for fraction in (0.5, 0.75):
        for k in (1, 5, 50):
            cached = evaluation.scores(backbone, MethodRef("knn", {"k": k, "fit_fraction": fraction}), entries,
                                       compute=False)
            alone = make_method("knn", k=k, fit_fraction=fraction).fit(entries["digits-train"])
            for label, scored in cached.items():
                np.testing.assert_array_equal(scored.scores, alone.score_samples(entries[label]))
            by_setting[fraction, k] = cached["digits-test"].scores
    assert len({scores.tobytes() for scores in by_setting.values()}) == 6  # six settings, six score arrays
    assert sweep_groups("knn", [{"k": 1}, {"k": 5, "index": "ivf"}, {"k": 9, "index": "ivf"}, {"k": 2}]) == \
        [[{"k": 1}, {"k": 2}], [{"k": 5, "index": "ivf"}, {"k": 9, "index": "ivf"}]]
    assert sweep_groups("knn", [{"k": 1}, {"k": 5, "seed": 1}]) == []  # another bank: nothing to share
    assert sweep_groups("energy", [{"T": 1}, {"T": 2}]) == []  # no sweep_axis


def test_fpr_criterion_is_minimised(cache_copy, tmp_path, capsys):
    code, _, err = oodbench(capsys, "sweep", "digits", "--method", "react", "--criterion", "fpr95",
                            "--cache-dir", cache_copy, "--out", tmp_path, "--quiet")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "digits" / "sweeps" / "react.csv")
    assert list(table["param_p"]) == make_method("react").grid["p"]  # the registry's grid by default
    assert set(table["param_source"]) == {"train"}  # parameters not swept show their value
    assert table["selected"].tolist() == [i == table["val_fpr95"].idxmin() for i in range(len(table))]


def test_every_swept_parameter_refits_and_changes_the_scores(warm, tmp_path):
    """For every method and grid axis, the first two grid values: the cached sweep scores equal a
    freshly fitted instance's, and differ between the two values."""
    run = BenchmarkRun(load_benchmark("digits"), RunOptions(cache_dir=warm.cache, out_dir=tmp_path, progress=False))
    evaluation = Evaluation(run.resolve(compute=False), run.store, tmp_path, network=lambda: run)
    [backbone] = evaluation.resolution.backbones
    entries = evaluation.open_entries(backbone)
    fit, test = entries["digits-train"], entries["digits-test"]
    checked = []
    for name, cls in sorted(METHODS.items()):
        for axis, values in cls.grid.items():
            if len(values) < 2:
                continue
            scores = []
            for value in values[:2]:
                cached = evaluation.scores(backbone, MethodRef(name, {axis: value}), entries)["digits-test"].scores
                method = make_method(name, **{axis: value})
                if "network" in cls.reads:
                    if method.fits_through_network:
                        method.load_state(evaluation.network_state(backbone, method, fit))
                    scored = evaluation.derived_entry(backbone, method, "digits-test", test, fit)
                else:
                    scored = test
                fresh = method.fit(fit).score_samples(scored)
                np.testing.assert_allclose(cached, fresh, rtol=1e-12, atol=1e-12, err_msg=f"{name} {axis}={value}")
                scores.append(cached)
            assert not np.allclose(*scores), f"{name}: {axis} = {values[0]} and {values[1]} score alike"
            checked.append(f"{name}.{axis}")
    assert checked == ["ash_b.p", "ash_layer.p", "ash_p.p", "ash_rand.p", "ash_s.p", "clipped_v.k", "dice.p",
                       "dice_react.p", "dice_react.react_p", "energy.T", "fdbd.normalizer", "gen.gamma", "gen.M",
                       "gmm.covariance", "gradnorm_autograd.T", "gradnorm_u_clipped_v.k", "grood.k", "knn.k",
                       "nci.alpha", "nnguide.k", "odin.T", "odin.epsilon", "openmax.tail_size", "openmax.alpha",
                       "react.p", "react_layer.p", "relation.power", "rg.k", "rg.T", "rg_add.gamma", "scale.p",
                       "vra.p_low", "vra.p_high", "vra.gamma", "weighted_energy.sample_from",
                       "weighted_energy.per_class"]


def test_parameter_grid_expands_the_registry_grid_with_overrides():
    assert parameter_grid("msp") == [{}]
    assert parameter_grid("energy") == [{"T": T} for T in METHODS["energy"].grid["T"]]
    rg = parameter_grid("rg", {"T": ["1", "2"]})
    assert rg == [{"k": k, "T": T} for k in METHODS["rg"].grid["k"] for T in ("1", "2")]
    with pytest.raises(ValueError, match="method 'energy' has no parameter Q"):
        parameter_grid("energy", {"Q": ["1"]})


def test_a_method_parameter_named_seed_does_not_hide_the_backbone_seed(cache_copy, tmp_path, capsys):
    code, _, err = oodbench(capsys, "sweep", "digits", "--method", "knn", "--grid", "k=1,5", "--grid", "seed=3",
                            "--cache-dir", cache_copy, "--out", tmp_path, "--quiet")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "digits" / "sweeps" / "knn.csv")
    assert list(table["seed"]) == [0, 0] and list(table["param_seed"]) == [3, 3]


def test_sweep_errors(cache_copy, tmp_path, capsys):
    config = (BENCHMARK_DIR / "digits.yaml").read_text()
    no_validation = tmp_path / "digits.yaml"
    no_validation.write_text("\n".join(line for line in config.splitlines() if not line.startswith("validation:")))
    code, _, err = oodbench(capsys, "sweep", no_validation, "--method", "energy", "--cache-dir", cache_copy,
                            "--out", tmp_path, "--quiet")
    assert code == 2
    assert err.startswith("error: benchmark digits has no validation OOD set to select on; name one under "
                          "`validation:` in its file")
    code, _, err = oodbench(capsys, "sweep", "digits", "--method", "energy", "--grid", "T=1,x",
                            "--cache-dir", cache_copy, "--quiet")
    assert code == 2 and "method 'energy': bad parameter value" in err
