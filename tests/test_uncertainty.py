"""Tests of results.uncertainty (bootstrap intervals, DeLong, paired tests, Holm) and of the
intervals and ties every leaderboard carries (leaderboard, benchmark option, CLI)."""
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest

from harness.api import Bench
from harness.config import BenchmarkError, Intervals, parse_benchmark, parse_intervals
from results.leaderboard import build_leaderboard
from results.metrics import accuracy, ood_metrics
from results.uncertainty import (
    METRIC_ORDER,
    MethodSamples,
    bootstrap_accuracy,
    bootstrap_metrics,
    delong_components,
    delong_test,
    holm,
    method_samples,
    paired_bootstrap_test,
    percentile_interval,
    resample_counts,
)
from tests.conftest import oodbench

RULES = [("id_positive", "canonical"), ("ood_positive", "canonical"), ("id_positive", "cal_metric")]


def tied_scores(rng, size, levels):
    """Scores with many ties (a few integer levels), half of the time with a continuous part."""
    return rng.integers(0, levels, size).astype(float) + (rng.random(size) if rng.random() < 0.5 else 0)


# ---------------------------------------------------------------- the bootstrap against results.metrics

@pytest.mark.parametrize("convention,fpr_rule", RULES)
def test_every_resample_equals_the_metrics_of_the_resampled_scores(convention, fpr_rule):
    # The definitions are results.metrics': each resample's values are those of ood_metrics on the
    # scores repeated by their multiplicities, ties (within and across the sets) and tiny sets included.
    rng = np.random.default_rng(0)
    for trial in range(25):
        m, n1, n2 = rng.integers(1, 30, 3)
        levels = int(rng.integers(2, 8))
        x = tied_scores(rng, m, levels)
        ood = {"near": tied_scores(rng, n1, levels) - 1, "far": rng.normal(0, 2, n2).round(int(rng.integers(0, 2)))}
        id_counts = resample_counts(m, 12, f"id-{trial}")
        ood_counts = {s: resample_counts(len(y), 12, f"{s}-{trial}") for s, y in ood.items()}
        replicates = bootstrap_metrics(x, ood, id_counts, ood_counts, convention, fpr_rule)
        for b in range(12):
            for s, y in ood.items():
                expected = ood_metrics(np.repeat(x, id_counts[b]), np.repeat(y, ood_counts[s][b]), convention, fpr_rule)
                got = dict(zip(METRIC_ORDER, replicates[s][b]))
                assert got["fpr95"] == expected["fpr95"] and got["auroc"] == expected["auroc"]
                # AUPR sums the same terms in another order (ID samples, not all thresholds)
                assert got["aupr_in"] == pytest.approx(expected["aupr_in"], rel=1e-12, abs=1e-15)
                assert got["aupr_out"] == pytest.approx(expected["aupr_out"], rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("convention,fpr_rule", RULES)
def test_the_full_sample_gives_the_leaderboard_values(convention, fpr_rule):
    rng = np.random.default_rng(1)
    x, ood = rng.normal(1, 1, 400).round(2), {"a": rng.normal(0, 1, 300).round(2), "b": rng.normal(2, 1, 50)}
    ones = np.ones((1, 400), dtype=np.uint8)
    replicates = bootstrap_metrics(x, ood, ones, {s: np.ones((1, len(y)), np.uint8) for s, y in ood.items()},
                                   convention, fpr_rule)
    for s, y in ood.items():
        expected = ood_metrics(x, y, convention, fpr_rule)
        got = dict(zip(METRIC_ORDER, replicates[s][0]))
        assert got["fpr95"] == expected["fpr95"] and got["auroc"] == expected["auroc"]  # exactly
        assert got["aupr_in"] == pytest.approx(expected["aupr_in"], rel=1e-13)
        assert got["aupr_out"] == pytest.approx(expected["aupr_out"], rel=1e-13)
    labels, predictions = rng.integers(0, 3, 400), rng.integers(0, 3, 400)
    assert bootstrap_accuracy(predictions == labels, ones)[0] == accuracy(predictions, labels)


def test_resample_counts_are_seeded_multinomial_draws():
    counts = resample_counts(50, 2000, "set")
    assert counts.shape == (2000, 50) and counts.dtype == np.uint8 and not counts.flags.writeable
    assert (counts.sum(axis=1) == 50).all()
    assert counts.mean() == pytest.approx(1, abs=0.01)
    assert counts.var() == pytest.approx(1 - 1 / 50, rel=0.05)  # Multinomial(n, 1/n): variance 1 - 1/n
    resample_counts.cache_clear()
    assert np.array_equal(resample_counts(50, 2000, "set"), counts)  # drawn again: the same
    assert not np.array_equal(resample_counts(50, 2000, "other set"), counts)
    with pytest.raises(ValueError, match="n >= 1"):
        resample_counts(0, 10, "empty")


def test_percentile_interval():
    lo, hi = percentile_interval(np.arange(1001.0), 0.9)
    assert (lo, hi) == (pytest.approx(50), pytest.approx(950))
    with pytest.raises(ValueError, match="level"):
        percentile_interval(np.arange(10.0), 1.0)


def test_interval_coverage_by_simulation():
    # Gaussian scores, ID ~ N(d, 1) and OOD ~ N(0, 1): the true AUROC is Phi(d / sqrt 2). 400 seeded
    # repetitions, each bootstrapped at once over its resamples: the 95% intervals cover the truth
    # in 93-97% of them (binomial sd of the rate: 1.1 points).
    rng = np.random.default_rng(20)
    m = n = 150
    truth = NormalDist().cdf(0.5 / np.sqrt(2))
    id_counts, ood_counts = resample_counts(m, 1000, "coverage-id"), resample_counts(n, 1000, "coverage-ood")
    covered = 0
    for _ in range(400):
        replicates = bootstrap_metrics(rng.normal(0.5, 1, m), {"ood": rng.normal(0, 1, n)}, id_counts,
                                       {"ood": ood_counts})
        lo, hi = percentile_interval(replicates["ood"][:, METRIC_ORDER.index("auroc")])
        covered += lo <= truth <= hi
    assert 0.93 <= covered / 400 <= 0.97


# ---------------------------------------------------------------- DeLong against the published algorithm

def structural_components(x, y):
    """DeLong, DeLong & Clarke-Pearson (1988) transcribed: psi over every (ID, OOD) pair, O(m n)."""
    psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
    return psi.mean(axis=1), psi.mean(axis=0)


def delong_by_the_paper(xa, ya, xb, yb):
    """The 2 x 2 covariance S = S10 / m + S01 / n of two AUROCs (DeLong et al. 1988, eq. 2-4) and
    the contrast L = (1, -1): z = L theta / sqrt(L S L')."""
    v10 = np.stack([structural_components(xa, ya)[0], structural_components(xb, yb)[0]])
    v01 = np.stack([structural_components(xa, ya)[1], structural_components(xb, yb)[1]])
    theta = v10.mean(axis=1)
    covariance = np.cov(v10) / v10.shape[1] + np.cov(v01) / v01.shape[1]
    contrast = np.array([1.0, -1.0])
    se = np.sqrt(contrast @ covariance @ contrast)
    z = (contrast @ theta) / se
    return contrast @ theta, se, 2 * NormalDist().cdf(-abs(z))


def test_delong_components_match_the_structural_components():
    rng = np.random.default_rng(2)
    for m, n in ((1, 1), (3, 7), (40, 25)):
        x, y = tied_scores(rng, m, 5), tied_scores(rng, n, 5) - 0.5
        v10, v01 = delong_components(x, y)
        expected10, expected01 = structural_components(x, y)
        np.testing.assert_allclose(v10, expected10, rtol=0, atol=1e-12)
        np.testing.assert_allclose(v01, expected01, rtol=0, atol=1e-12)
        assert v10.mean() == pytest.approx(ood_metrics(x, y)["auroc"], abs=1e-12)


def test_delong_test_matches_the_paper_on_small_cases():
    rng = np.random.default_rng(3)
    for m, n in ((5, 4), (30, 20), (60, 90)):
        x, y = rng.normal(1, 1, m), rng.normal(0, 1, n)
        other_x, other_y = (x + rng.normal(0, 1, m)).round(1), (y + rng.normal(0, 1, n)).round(1)  # correlated, tied
        got = delong_test(delong_components(x, y), delong_components(other_x, other_y))
        np.testing.assert_allclose(got, delong_by_the_paper(x, y, other_x, other_y), rtol=1e-9, atol=1e-15)


def test_delong_variance_agrees_with_the_bootstrap():
    # On a larger case DeLong's variance of one AUROC and of a difference of two correlated ones
    # equals the variance of the bootstrap AUROCs within Monte-Carlo error (the variance of 2000
    # replicates has a relative sd of about 3%).
    rng = np.random.default_rng(4)
    m, n = 1500, 1200
    x, y = rng.normal(1, 1, m), rng.normal(0, 1, n)
    other_x, other_y = x + rng.normal(0, 0.7, m), y + rng.normal(0, 0.7, n)
    id_counts, ood_counts = resample_counts(m, 2000, "delong-id"), {"ood": resample_counts(n, 2000, "delong-ood")}
    auroc = METRIC_ORDER.index("auroc")
    first = bootstrap_metrics(x, {"ood": y}, id_counts, ood_counts)["ood"][:, auroc]
    second = bootstrap_metrics(other_x, {"ood": other_y}, id_counts, ood_counts)["ood"][:, auroc]
    a, b = delong_components(x, y), delong_components(other_x, other_y)
    zero = (np.zeros(m), np.zeros(n))
    assert first.var(ddof=1) == pytest.approx(delong_test(a, zero)[1] ** 2, rel=0.12)
    assert (first - second).var(ddof=1) == pytest.approx(delong_test(a, b)[1] ** 2, rel=0.12)


def test_identical_methods_give_p_one_and_a_large_difference_a_tiny_p():
    rng = np.random.default_rng(5)
    x, y = rng.normal(2, 1, 500), rng.normal(0, 1, 500)
    components = delong_components(x, y)
    assert delong_test(components, components) == (0.0, 0.0, 1.0)
    weak = delong_components(x + rng.normal(0, 3, 500), y)
    assert delong_test(components, weak)[2] < 1e-6
    assert paired_bootstrap_test(0.0, np.zeros(1000))[3] == 1.0
    assert paired_bootstrap_test(0.3, rng.normal(0.3, 0.02, 1000))[3] < 1e-6


def test_holm():
    # Holm (1979): the sorted p-values times k, k-1, ..., made monotone and capped at 1.
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.5]), [0.04, 0.09, 0.09, 0.5])
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])
    assert len(holm([])) == 0


# ---------------------------------------------------------------- leaderboards with intervals and ties

SETS = {"near-set": "near", "far-set": "far", "other-far": "far"}


def scores_of(rng, quality):
    """ID and OOD test scores of a method whose ID scores sit ``quality`` above the OOD ones."""
    return rng.normal(quality, 1, 300), {s: rng.normal(0, 1, 200 + 50 * i) for i, s in enumerate(SETS)}


def board_inputs(seeds=(0,)):
    """Tidy metrics and resampled results of three methods: 'good', 'twin' (the same scores) and 'weak'."""
    rows, samples = [], {}
    labels = np.random.default_rng(9).integers(0, 4, 300)
    for seed in seeds:
        rng = np.random.default_rng(seed)
        good = scores_of(rng, 2.0)
        for method, (id_scores, ood) in {"good": good, "twin": good, "weak": scores_of(rng, 0.3)}.items():
            predictions = np.where(rng.random(300) < 0.9, labels, (labels + 1) % 4)
            samples[method, seed] = method_samples(id_scores, predictions == labels, ood, "test", 1000)
            for s, y in ood.items():
                rows.append({"benchmark": "toy", "backbone": "net", "seed": seed, "method": method, "ood_set": s,
                             "group": SETS[s], **{k: v for k, v in ood_metrics(id_scores, y).items()
                                                  if k in METRIC_ORDER},
                             "id_acc": accuracy(predictions, labels)})
    frame = pd.DataFrame(rows)
    frame.attrs["convention"] = "id_positive"
    return frame, samples


def test_leaderboard_intervals_ties_and_comparisons(tmp_path):
    metrics, samples = board_inputs()
    board = build_leaderboard(metrics, samples)
    assert (board.lo <= board.mean).all().all() and (board.mean <= board.hi).all().all()
    # the average over OOD sets: the joint bootstrap, the sets' replicates averaged resample by resample
    average = np.mean([board.replicates[s, "auroc"] for s in SETS], axis=0)
    np.testing.assert_array_equal(board.replicates["avg", "auroc"], average)
    assert board.lo.at["good", ("avg", "auroc")] == percentile_interval(average[0])[0]
    comparisons = board.comparisons.set_index(["column", "metric", "method"])
    for key in board.mean.columns:
        assert board.tied.at["twin", key] and board.tied.at["good", key]  # identical scores: tied
        if key[1] != "acc":
            assert not board.tied.at["weak", key]
            assert comparisons.at[(*key, "weak"), "p"] < 1e-6
    assert comparisons.at[("far-set", "auroc", "twin"), "p"] == 1.0
    assert comparisons.at[("far-set", "auroc", "twin"), "test"] == "DeLong"
    assert comparisons.at[("avg", "auroc", "weak"), "test"] == "paired bootstrap"
    pairs = board.compare("weak", "good").set_index(["column", "metric"])
    assert pairs.at[("far-set", "auroc"), "difference"] == pytest.approx(
        board.mean.at["weak", ("far-set", "auroc")] - board.mean.at["good", ("far-set", "auroc")])
    assert pairs.at[("far-set", "auroc"), "lo"] < pairs.at[("far-set", "auroc"), "difference"] < 0

    frame = pd.read_csv(board.to_csv(tmp_path / "board.csv"), index_col="method")
    assert frame.columns[:4].tolist() == ["near-set/fpr95", "near-set/fpr95_lo", "near-set/fpr95_hi",
                                          "near-set/fpr95_std"]
    assert frame.at["weak", "avg/auroc_lo"] == board.lo.at["weak", ("avg", "auroc")]
    markdown = board.to_markdown(tmp_path / "board.md").read_text()
    half = 100 * (board.hi.at["weak", ("far-set", "auroc")] - board.lo.at["weak", ("far-set", "auroc")]) / 2
    weak = next(line for line in markdown.splitlines() if line.startswith("| weak")).split(" | ")
    assert weak[4] == f"{100 * board.mean.at['weak', ('far-set', 'auroc')]:.2f} ± {half:.2f}"
    twin = next(line for line in markdown.splitlines() if line.startswith("| twin")).split(" | ")
    assert twin[4].startswith("**") and "percentile bootstrap interval" in markdown
    assert "statistically tied" in markdown.splitlines()[-1] and "Holm" in markdown.splitlines()[-1]
    latex = board.to_latex(tmp_path / "board.tex").read_text()
    assert r"\textbf{\boldmath$" in latex and "statistically tied" in latex


def test_seed_spread_stays_apart_from_the_sample_noise(tmp_path):
    metrics, samples = board_inputs(seeds=(0, 1))
    board = build_leaderboard(metrics, samples)
    plain = build_leaderboard(metrics)
    pd.testing.assert_frame_equal(board.std, plain.std)  # the seeds' spread, unchanged
    seed_mean = (samples["weak", 0].replicates["near-set"][:, 1] + samples["weak", 1].replicates["near-set"][:, 1]) / 2
    assert board.lo.at["weak", ("near-set", "auroc")] == percentile_interval(seed_mean)[0]
    markdown = board.to_markdown(tmp_path / "board.md").read_text()
    assert "(sd " in markdown and "training noise" in markdown and "sample noise" in markdown


def test_samples_must_cover_every_row():
    metrics, samples = board_inputs()
    del samples["weak", 0]
    with pytest.raises(ValueError, match="weak"):
        build_leaderboard(metrics, samples)


def test_two_runs_give_identical_files(tmp_path):
    written = []
    for run in range(2):
        resample_counts.cache_clear()
        metrics, samples = board_inputs()
        board = build_leaderboard(metrics, samples)
        written.append((board.to_csv(tmp_path / f"{run}.csv").read_bytes(),
                        board.comparisons.to_csv(index=False).encode()))
    assert written[0] == written[1]


def test_resampled_results_round_trip_through_their_cache_arrays():
    _, samples = board_inputs()
    original = samples["weak", 0]
    back = MethodSamples.from_arrays(original.arrays(), {s: len(v01) for s, (_, v01) in original.components.items()})
    assert list(back.replicates) == list(SETS)
    for s in SETS:
        np.testing.assert_array_equal(back.replicates[s], original.replicates[s])
        for mine, theirs in zip(back.components[s], original.components[s]):
            np.testing.assert_array_equal(mine, theirs)
    np.testing.assert_array_equal(back.accuracy, original.accuracy)


# ---------------------------------------------------------------- the option: benchmark file, API, CLI

def test_intervals_option_is_checked():
    assert parse_intervals({}, "f") == Intervals(0.95, 1000)
    assert parse_intervals({"level": 0.9, "resamples": 500}, "f") == Intervals(0.9, 500)
    for bad, match in (({"level": 1.5}, "level must be a number in \\(0, 1\\)"),
                       ({"resamples": 10}, "resamples must be an integer >= 100"),
                       ({"resamples": 1000.0}, "resamples must be an integer"),
                       ({"sample": 3}, "unknown keys \\['sample'\\]")):
        with pytest.raises(BenchmarkError, match=f"f: .*{match}" if "unknown" not in match else match):
            parse_intervals(bad, "f")
    with pytest.raises(ValueError, match="level must be"):
        Bench("digits", level=0)
    assert Bench("digits", resamples=200).intervals == Intervals(0.95, 200)


def test_benchmark_file_intervals(tmp_path):
    import yaml

    from harness.config import BENCHMARK_DIR

    data = yaml.safe_load((BENCHMARK_DIR / "digits.yaml").read_text())
    assert parse_benchmark({**data, "intervals": {"level": 0.9}}).intervals == Intervals(0.9, 1000)
    with pytest.raises(BenchmarkError, match="intervals: resamples must be"):
        parse_benchmark({**data, "intervals": {"resamples": 5}})
    path = tmp_path / "digits-90.yaml"
    path.write_text(yaml.safe_dump({**data, "intervals": {"level": 0.9, "resamples": 300}}))
    assert Bench(str(path)).intervals == Intervals(0.9, 300)
    assert Bench(str(path), level=0.99).intervals == Intervals(0.99, 300)


def test_cli_rejects_a_bad_level_before_any_work(capsys):
    with pytest.raises(SystemExit) as exit_:
        oodbench(capsys, "leaderboard", "digits", "--level", "95")
    assert exit_.value.code == 2
    assert "--level: level must be a number in (0, 1), got 95.0" in capsys.readouterr().err


@pytest.mark.slow
def test_run_writes_intervals_and_compare_prints_the_tests(warm, cache_copy, tmp_path, capsys):
    board = pd.read_csv(warm.out / "digits/digits-net/leaderboard.csv", index_col="method")
    for column in ("digits-6to9/auroc", "avg/fpr95", "far avg/aupr_out", "id_acc"):
        assert (board[f"{column}_lo"] <= board[column]).all() and (board[column] <= board[f"{column}_hi"]).all()
    comparisons = pd.read_csv(warm.out / "digits/digits-net/comparisons.csv")
    assert set(comparisons["test"].dropna()) == {"DeLong", "paired bootstrap"}
    # every cell's resampled results are cached beside its scores: compare reads them back
    assert len(list(warm.cache.glob("*/scores/*-intervals.*.h5"))) == len(board)
    assert "statistically tied" in (warm.out / "digits/digits-net/leaderboard.md").read_text()
    code, out, err = oodbench(capsys, "compare", "digits", "--methods", "energy,msp", "--cache-dir", cache_copy,
                              "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
    assert "energy vs msp on digits (digits-net" in out and "DeLong" in out and "paired bootstrap" in out
    code, _, err = oodbench(capsys, "compare", "digits", "--methods", "energy", "--cache-dir", cache_copy, "--quiet")
    assert code == 2 and "two different methods" in err
