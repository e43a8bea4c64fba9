"""Tests for results.metrics against sklearn, hand-worked cases and a brute-force FPR@95."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from results.metrics import (
    CONVENTIONS,
    FPR_RULES,
    accuracy,
    auroc,
    average_precision,
    fpr_at_tpr,
    fpr_cal_metric,
    ood_metrics,
)

IDS_1_TO_20 = np.arange(1.0, 21.0)


def brute_force_fpr(pos, neg, tpr=0.95):
    """Canonical FPR@TPR written plainly: loop over distinct thresholds, highest first.

    Stop at the first threshold that reaches full recall, then scan the candidates
    from the last one back to the first and keep the first strictly closest recall.
    """
    candidates = []
    for t in sorted(set(pos) | set(neg), reverse=True):
        tp = sum(1 for s in pos if s >= t)
        fp = sum(1 for s in neg if s >= t)
        candidates.append((tp / len(pos), fp / len(neg)))
        if tp == len(pos):
            break
    best_distance, best_fpr = None, None
    for recall, fpr in reversed(candidates):
        if best_distance is None or abs(recall - tpr) < best_distance:
            best_distance, best_fpr = abs(recall - tpr), fpr
    return best_fpr


def sklearn_reference(id_scores, ood_scores):
    """AUROC, AUPR-In and AUPR-Out from sklearn, ID labelled 1."""
    scores = np.concatenate([id_scores, ood_scores])
    labels = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    return (
        roc_auc_score(labels, scores),
        average_precision_score(labels, scores),
        average_precision_score(1 - labels, -scores),
    )


def _score_sets():
    rng = np.random.default_rng(0)
    return {
        "random": (rng.normal(1.0, 1.0, 700), rng.normal(0.0, 1.0, 500)),
        "integers_0_to_3": (rng.integers(0, 4, 400).astype(float), rng.integers(0, 4, 300).astype(float)),
        "all_equal": (np.full(50, 0.7), np.full(30, 0.7)),
        "unbalanced_few_id": (rng.normal(0.5, 1.0, 7), rng.normal(0.0, 1.0, 3000)),
        "unbalanced_few_ood": (rng.normal(0.5, 1.0, 3000), rng.integers(-1, 2, 4).astype(float)),
        "separated": (rng.uniform(2.0, 3.0, 100), rng.uniform(0.0, 1.0, 80)),
        "separated_wrong_way": (rng.uniform(0.0, 1.0, 60), rng.uniform(2.0, 3.0, 90)),
        "float32_rounded": (rng.normal(0, 1, 500).astype(np.float32).round(2), rng.normal(-0.3, 1, 400).round(2)),
    }


@pytest.mark.parametrize("name", list(_score_sets()))
def test_auroc_and_average_precision_match_sklearn(name):
    id_scores, ood_scores = _score_sets()[name]
    ref_auroc, ref_aupr_in, ref_aupr_out = sklearn_reference(id_scores, ood_scores)
    assert auroc(id_scores, ood_scores) == pytest.approx(ref_auroc, abs=1e-9)
    assert average_precision(id_scores, ood_scores) == pytest.approx(ref_aupr_in, abs=1e-9)
    assert average_precision(-ood_scores, -id_scores) == pytest.approx(ref_aupr_out, abs=1e-9)
    for convention in CONVENTIONS:
        result = ood_metrics(id_scores, ood_scores, convention=convention)
        assert result["auroc"] == pytest.approx(ref_auroc, abs=1e-9)
        assert result["aupr_in"] == pytest.approx(ref_aupr_in, abs=1e-9)
        assert result["aupr_out"] == pytest.approx(ref_aupr_out, abs=1e-9)


def test_known_values_at_the_extremes():
    # All scores equal: AUROC is 1/2 and AP is the positive fraction.
    assert auroc(np.zeros(3), np.zeros(5)) == 0.5
    assert average_precision(np.zeros(3), np.zeros(5)) == 3 / 8
    # Perfect separation either way.
    assert auroc([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert auroc([0.0, 1.0], [2.0, 3.0]) == 0.0
    assert average_precision([2.0, 3.0], [0.0, 1.0]) == 1.0
    # AUROC is symmetric in the positive class.
    assert auroc([0.0, 1.0, 1.0, 3.0], [1.0, 2.0]) == auroc([-1.0, -2.0], [0.0, -1.0, -1.0, -3.0]) == 0.375


def test_fpr_exactly_95_percent_recall():
    # ID = 1..20, OOD = 0.5, 2.5, 5.5, 10.5, 25.
    # Threshold 2: TP = #{2..20} = 19, recall 19/20 = 0.95 exactly (no other
    # threshold has TP = 19). FP = #{2.5, 5.5, 10.5, 25} = 4 -> FPR = 4/5.
    ood = [0.5, 2.5, 5.5, 10.5, 25.0]
    assert fpr_at_tpr(IDS_1_TO_20, ood) == 0.8
    # cal_metric: t = sorted(ID)[round(0.05 * 20) = 1] = 2; OOD > 2 are the same 4.
    assert fpr_cal_metric(IDS_1_TO_20, ood) == 0.8


def test_fpr_counts_ood_tied_with_threshold_but_cal_metric_does_not():
    # ID = 1..20, OOD = 0, 2, 3.5, 30. Recall 0.95 at threshold 2 (TP = 19).
    # Canonical: S >= 2 counts the OOD score 2 -> FP = {2, 3.5, 30} = 3/4.
    # cal_metric: t = 2 and the inequality is strict -> FP = {3.5, 30} = 2/4.
    ood = [0.0, 2.0, 3.5, 30.0]
    assert fpr_at_tpr(IDS_1_TO_20, ood) == 0.75
    assert fpr_cal_metric(IDS_1_TO_20, ood) == 0.5


def test_fpr_equal_recall_takes_the_lowest_threshold():
    # ID = 1..20, OOD = 1.5, 7.5. Two thresholds give TP = 19 (recall 0.95):
    # t = 2 (FP = {7.5} = 1) and t = 1.5 (FP = {1.5, 7.5} = 2). The scan runs
    # from low thresholds to high and keeps the first minimum: t = 1.5 -> 2/2.
    assert fpr_at_tpr(IDS_1_TO_20, [1.5, 7.5]) == 1.0
    assert brute_force_fpr(list(IDS_1_TO_20), [1.5, 7.5]) == 1.0


def test_fpr_equal_distance_takes_the_higher_recall():
    # ID = 1..50. Recall 47/50 = 0.94 (t = 4) and 48/50 = 0.96 (t in (2, 3])
    # are both 0.01 from 0.95, also in float64. OOD = 0, 2.5, 100.
    # Higher recall 0.96: lowest threshold with TP = 48 is 2.5 -> FP = {2.5, 100} = 2/3.
    # (Recall 0.94 would give t = 4 -> FP = {100} = 1/3.)
    ids = np.arange(1.0, 51.0)
    assert abs(47 / 50 - 0.95) == abs(48 / 50 - 0.95)
    assert fpr_at_tpr(ids, [0.0, 2.5, 100.0]) == pytest.approx(2 / 3, abs=0)
    # Exact tie with tpr = 0.5, ID = 1..4: recall 0.25 (t = 4) and 0.75 (t in (1, 3]).
    # OOD = 2.5, 5: recall 0.75 at its lowest threshold 2.5 -> FP = 2/2.
    assert fpr_at_tpr([1.0, 2.0, 3.0, 4.0], [2.5, 5.0], tpr=0.5) == 1.0


def test_fpr_no_threshold_gives_exactly_95_percent():
    # ID = 1..12: recall 11/12 = 0.9167 (distance 0.033) beats 1.0 (distance 0.05).
    # OOD = 0, 1, 6.5, 13. t = 2 -> FP = {6.5, 13} = 2/4 (t = 1 would give 3/4).
    assert fpr_at_tpr(np.arange(1.0, 13.0), [0.0, 1.0, 6.5, 13.0]) == 0.5
    # ID = 1..10: recall 0.9 and 1.0 are both 0.05 away mathematically, but in
    # float64 0.95 - 0.9 < 1.0 - 0.95, so (as in the reference code) 0.9 wins.
    # OOD = 1, 5.5, 20: t = 2 -> FP = {5.5, 20} = 2/3 (t = 1 would give 3/3).
    assert fpr_at_tpr(np.arange(1.0, 11.0), [1.0, 5.5, 20.0]) == pytest.approx(2 / 3, abs=0)
    # ID = 5, 6: recall 1.0 is closest; stop at the first threshold reaching it,
    # t = 5 -> FP = {5.5} = 1/3 (OOD 1 and 2 lie below every ID score).
    assert fpr_at_tpr([5.0, 6.0], [1.0, 2.0, 5.5]) == pytest.approx(1 / 3, abs=0)


def test_fpr_matches_brute_force():
    rng = np.random.default_rng(1)
    for trial in range(60):
        n_pos, n_neg = rng.integers(1, 60, size=2)
        high = 3 if trial % 2 else 1000  # heavy ties on every other trial
        pos = rng.integers(0, high, n_pos).astype(float) + 1.0
        neg = rng.integers(0, high, n_neg).astype(float)
        for tpr in (0.95, 0.9, 0.5):
            assert fpr_at_tpr(pos, neg, tpr) == brute_force_fpr(list(pos), list(neg), tpr)


def test_cal_metric_rounds_half_to_even():
    # ID = 1..50: round(0.05 * 50) = round(2.5) = 2, so t = sorted(ID)[2] = 3.
    # OOD = 2.5, 3, 3.5: strictly above 3 is only 3.5 -> 1/3.
    assert fpr_cal_metric(np.arange(1.0, 51.0), [2.5, 3.0, 3.5]) == pytest.approx(1 / 3, abs=0)
    # ID = 1..10: round(0.5) = 0, t = min(ID) = 1; OOD = 0, 1, 1.5 -> {1.5} = 1/3.
    result = ood_metrics(np.arange(1.0, 11.0), [0.0, 1.0, 1.5], fpr_rule="cal_metric")
    assert result["fpr95"] == pytest.approx(1 / 3, abs=0)
    assert result["fpr_rule"] == "cal_metric"


def test_openood_convention_swaps_the_roles_for_the_fpr_only():
    # ID = 1..20; OOD = -1, -2, ..., -19 and one ID-like OOD at 3.5.
    ood = np.r_[-np.arange(1.0, 20.0), 3.5]
    # id_positive: t = 2 keeps 19/20 ID; OOD >= 2 is {3.5} -> 1/20.
    # ood_positive: anomaly -S, positives = 20 OOD. -S >= 1 detects the 19
    # negative OODs (recall 0.95); this recall holds down to -S = -3 (the ID
    # scores 1, 2, 3 come in before the OOD at -3.5), and the lowest such
    # threshold is taken: ID with -S >= -3 are 1, 2, 3 -> FPR = 3/20.
    id_pos = ood_metrics(IDS_1_TO_20, ood, convention="id_positive")
    ood_pos = ood_metrics(IDS_1_TO_20, ood, convention="ood_positive")
    assert id_pos["fpr95"] == 0.05
    assert ood_pos["fpr95"] == 0.15
    assert ood_pos["fpr95"] == fpr_at_tpr(-ood, -IDS_1_TO_20)
    assert (id_pos["convention"], ood_pos["convention"]) == ("id_positive", "ood_positive")
    assert id_pos["fpr_rule"] == ood_pos["fpr_rule"] == "canonical"
    for key in ("auroc", "aupr_in", "aupr_out"):
        assert id_pos[key] == ood_pos[key]
    # AUROC: 20*19 pairs won outright, 3 of the 20 ID beat the OOD 3.5 -> (380 + 17)/400.
    assert id_pos["auroc"] == (380 + 17) / 400


def test_large_input_is_float64_and_exact():
    rng = np.random.default_rng(2)
    id_scores = rng.normal(1.0, 1.0, 60_000).astype(np.float32)
    ood_scores = rng.normal(0.0, 1.0, 40_000).astype(np.float32)
    result = ood_metrics(id_scores, ood_scores)
    ref_auroc, ref_aupr_in, ref_aupr_out = sklearn_reference(id_scores, ood_scores)
    assert result["auroc"] == pytest.approx(ref_auroc, abs=1e-9)
    assert result["aupr_in"] == pytest.approx(ref_aupr_in, abs=1e-9)
    assert result["aupr_out"] == pytest.approx(ref_aupr_out, abs=1e-9)
    assert all(type(result[key]) is float for key in ("fpr95", "auroc", "aupr_in", "aupr_out"))


def test_accuracy():
    assert accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
    with pytest.raises(ValueError, match="got 3 predictions for 2 labels"):
        accuracy([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="label set is empty"):
        accuracy([], [])
    with pytest.raises(ValueError, match="must be 1-D"):
        accuracy([[0, 1]], [[0, 1]])


def test_empty_sets_are_named():
    with pytest.raises(ValueError, match=r"the OOD set is empty \(0 scores\)"):
        ood_metrics([1.0, 2.0], [])
    with pytest.raises(ValueError, match=r"the ID set is empty \(0 scores\)"):
        ood_metrics([], [1.0, 2.0], convention="ood_positive")
    with pytest.raises(ValueError, match=r"the ID set is empty \(0 scores\)"):
        fpr_cal_metric([], [1.0])
    with pytest.raises(ValueError, match=r"the negative set is empty \(0 scores\)"):
        fpr_at_tpr([1.0], [])


def test_non_finite_scores_are_counted_and_named():
    with pytest.raises(ValueError, match=r"the ID scores contain 2 NaN and 0 inf value\(s\) out of 4: "
                                         r"the method or backbone produced non-finite scores"):
        ood_metrics([1.0, np.nan, np.nan, 2.0], [0.0])
    with pytest.raises(ValueError, match=r"the OOD scores contain 1 NaN and 2 inf value\(s\) out of 3"):
        ood_metrics([1.0], [np.nan, np.inf, -np.inf])
    with pytest.raises(ValueError, match=r"the ID scores contain 0 NaN and 1 inf"):
        auroc([np.inf], [0.0])


def test_wrong_dimensionality_and_unknown_names():
    with pytest.raises(ValueError, match=r"the ID scores must be a 1-D array .* shape \(2, 2\)"):
        ood_metrics(np.ones((2, 2)), [0.0])
    with pytest.raises(ValueError, match=r"the OOD scores must be a 1-D array .* shape \(\)"):
        auroc([1.0], 0.0)
    with pytest.raises(ValueError, match=r"unknown convention 'openood': valid conventions are "
                                         r"'id_positive', 'ood_positive'"):
        ood_metrics([1.0], [0.0], convention="openood")
    with pytest.raises(ValueError, match=r"unknown fpr_rule 'react': valid fpr_rules are "
                                         r"'canonical', 'cal_metric'"):
        ood_metrics([1.0], [0.0], fpr_rule="react")
    with pytest.raises(ValueError, match="defined only for convention 'id_positive'"):
        ood_metrics([1.0], [0.0], convention="ood_positive", fpr_rule="cal_metric")
    with pytest.raises(ValueError, match=r"tpr must be in \(0, 1\]"):
        fpr_at_tpr([1.0], [0.0], tpr=95)
    assert FPR_RULES == ("canonical", "cal_metric")
