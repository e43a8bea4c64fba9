"""OOD detection metrics: FPR@95%TPR, AUROC, AUPR-In, AUPR-Out and accuracy.

Conventions (METHODS.md section 3.1)
------------------------------------
Every method returns a score ``S`` per sample with **higher = more
in-distribution (ID)**.  Two conventions decide which class is "positive":

``"id_positive"`` (default; energy_ood / Outlier Exposure / ReAct / GradNorm)
    ID is the positive class and is detected by a high ``S``.  FPR@95 is the
    fraction of OOD samples accepted as ID at the threshold that keeps 95% of
    the ID samples.

``"ood_positive"`` (OpenOOD)
    OOD is the positive class and the anomaly score is ``-S``.  FPR@95 is the
    fraction of ID samples flagged as OOD at the threshold that detects 95% of
    the OOD samples, i.e. the same procedure with the roles swapped:
    positives = OOD scored by ``-S``, negatives = ID scored by ``-S``.

Only the FPR depends on the convention.  AUROC is symmetric in the choice of
positive class, AUPR-In is always the average precision with ID positive
(scored by ``S``) and AUPR-Out always the average precision with OOD positive
(scored by ``-S``).  :func:`ood_metrics` records the convention and the FPR
rule that produced its numbers.

FPR rules
---------
``"canonical"``: :func:`fpr_at_tpr`, the threshold-sweep procedure of the
energy_ood / OE / UM / GradNorm code (``fpr_and_fdr_at_recall``), bit for bit.

``"cal_metric"``: :func:`fpr_cal_metric`, the threshold of the ReAct / DICE /
ASH ``cal_metric`` code, for matching the tables of those papers.  It is
defined on ID scores only, so it exists only under ``"id_positive"``.

All metrics are fractions in [0, 1], computed in float64 with numpy only.
"""
import numpy as np

CONVENTIONS = ("id_positive", "ood_positive")
FPR_RULES = ("canonical", "cal_metric")


def _check_scores(scores, side):
    """Return ``scores`` as a finite, non-empty 1-D float64 array, or raise ValueError naming ``side``."""
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(
            f"the {side} scores must be a 1-D array with one score per sample, "
            f"got an array of shape {array.shape}"
        )
    if array.size == 0:
        raise ValueError(
            f"the {side} set is empty (0 scores): every metric needs at least one score on each side"
        )
    finite = np.isfinite(array)
    if not finite.all():
        n_nan = int(np.isnan(array).sum())
        n_inf = int(array.size - finite.sum()) - n_nan
        raise ValueError(
            f"the {side} scores contain {n_nan} NaN and {n_inf} inf value(s) out of {array.size}: "
            f"the method or backbone produced non-finite scores, fix them before computing metrics"
        )
    return array


def _check_choice(value, valid, what):
    """Raise ValueError unless ``value`` is one of the names in ``valid``."""
    if value not in valid:
        names = ", ".join(repr(name) for name in valid)
        raise ValueError(f"unknown {what} {value!r}: valid {what}s are {names}")


def _sweep(pos, neg):
    """Cumulative counts over distinct thresholds, highest threshold first.

    All scores are sorted in descending order (stable sort) and tied scores are
    collapsed into one threshold ``t_k``.  Returns ``(tps, fps)`` with
    ``tps[k] = #{pos >= t_k}`` and ``fps[k] = #{neg >= t_k}`` (int64).
    """
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(pos.size, dtype=np.int64), np.zeros(neg.size, dtype=np.int64)])
    order = np.argsort(-scores, kind="stable")
    scores, is_pos = scores[order], is_pos[order]
    last_of_each_threshold = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(is_pos)[last_of_each_threshold]
    fps = last_of_each_threshold + 1 - tps
    return tps, fps


def fpr_at_tpr(pos_scores, neg_scores, tpr=0.95):
    """False-positive rate at the threshold whose true-positive rate is closest to ``tpr``.

    Canonical procedure (energy_ood / OE / UM / GradNorm); positives should score high:

    1. sort all scores in descending order (stable) and collapse ties into
       distinct thresholds ``t_1 > t_2 > ... > t_K``;
    2. ``TP_k = #{pos >= t_k}``, ``FP_k = #{neg >= t_k}``, ``R_k = TP_k / N_pos``;
    3. keep ``k = 1 .. k*`` where ``k*`` is the first threshold with ``R_k = 1``,
       and pick ``k = argmin_k |R_k - tpr|`` scanning from ``k*`` down to 1, so
       ties go to the larger ``k``: the higher recall, and among thresholds with
       the same recall the lowest one (the most false positives);
    4. return ``FP_k / N_neg``.

    ``|R_k - tpr|`` is evaluated in float64 exactly as in the reference code, so
    a mathematically half-way case is decided by rounding: with ``N_pos = 10``,
    ``0.95 - 0.9 < 1.0 - 0.95`` in float64 and recall 0.9 is chosen, whereas with
    ``N_pos = 50`` the distances to 0.94 and 0.96 are equal and 0.96 is chosen.
    """
    pos = _check_scores(pos_scores, "positive")
    neg = _check_scores(neg_scores, "negative")
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr!r}")
    tps, fps = _sweep(pos, neg)
    full_recall = int(np.searchsorted(tps, pos.size))
    recall_reversed = tps[full_recall::-1] / pos.size
    chosen = full_recall - int(np.argmin(np.abs(recall_reversed - tpr)))
    return float(fps[chosen] / neg.size)


def fpr_cal_metric(id_scores, ood_scores):
    """FPR@95 as computed by the ReAct / DICE / ASH ``cal_metric`` code.

    ``t = sort_ascending(S_ID)[round(0.05 * N_ID)]`` (Python round: half to even)
    and ``FPR = mean(S_OOD > t)`` with a strict inequality.
    """
    id_ = _check_scores(id_scores, "ID")
    ood = _check_scores(ood_scores, "OOD")
    threshold = np.sort(id_)[round(0.05 * id_.size)]
    return float(np.mean(ood > threshold))


def auroc(id_scores, ood_scores):
    """Area under the ROC curve, exact with ties (Mann-Whitney U statistic).

    ``AUROC = (#{(i, j): S_ID_i > S_OOD_j} + 0.5 * #{(i, j): S_ID_i = S_OOD_j}) / (N_ID * N_OOD)``,
    which equals sklearn ``roc_auc_score`` with ID labelled 1.  It is symmetric
    in the positive class: ``auroc(a, b) == auroc(-b, -a)``.
    """
    id_ = _check_scores(id_scores, "ID")
    ood = _check_scores(ood_scores, "OOD")
    ood_sorted = np.sort(ood)
    below = np.searchsorted(ood_sorted, id_, side="left")
    below_or_equal = np.searchsorted(ood_sorted, id_, side="right")
    twice_wins = int(below.sum()) + int(below_or_equal.sum())
    return float(twice_wins / (2 * id_.size * ood.size))


def average_precision(pos_scores, neg_scores):
    """Average precision with ``pos_scores`` as the positive class (higher = positive).

    Step-wise definition of sklearn ``average_precision_score``: over distinct
    thresholds ``t_1 > ... > t_K``, with ``TP_n = #{pos >= t_n}``,
    ``FP_n = #{neg >= t_n}``, ``P_n = TP_n / (TP_n + FP_n)``, ``R_n = TP_n / N_pos``
    and ``R_0 = 0``: ``AP = sum_n (R_n - R_{n-1}) * P_n``.
    """
    pos = _check_scores(pos_scores, "positive")
    neg = _check_scores(neg_scores, "negative")
    tps, fps = _sweep(pos, neg)
    precision = tps / (tps + fps)
    recall = tps / pos.size
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def ood_metrics(id_scores, ood_scores, convention="id_positive", fpr_rule="canonical"):
    """All OOD metrics for one (method, ID set, OOD set) pair.

    Scores are higher = more ID.  Returns a dict of floats in [0, 1]:

    - ``"fpr95"``: ``fpr_at_tpr(S_ID, S_OOD)`` under ``"id_positive"``,
      ``fpr_at_tpr(-S_OOD, -S_ID)`` under ``"ood_positive"``, or
      ``fpr_cal_metric(S_ID, S_OOD)`` when ``fpr_rule="cal_metric"``
      (``"id_positive"`` only);
    - ``"auroc"``: ``auroc(S_ID, S_OOD)``;
    - ``"aupr_in"``: ``average_precision(S_ID, S_OOD)`` (ID positive);
    - ``"aupr_out"``: ``average_precision(-S_OOD, -S_ID)`` (OOD positive);

    plus the strings ``"convention"`` and ``"fpr_rule"`` that produced them.
    """
    _check_choice(convention, CONVENTIONS, "convention")
    _check_choice(fpr_rule, FPR_RULES, "fpr_rule")
    if fpr_rule == "cal_metric" and convention != "id_positive":
        raise ValueError(
            f"fpr_rule 'cal_metric' thresholds the ID scores and is defined only for "
            f"convention 'id_positive', got convention {convention!r}"
        )
    id_ = _check_scores(id_scores, "ID")
    ood = _check_scores(ood_scores, "OOD")
    if fpr_rule == "cal_metric":
        fpr95 = fpr_cal_metric(id_, ood)
    elif convention == "id_positive":
        fpr95 = fpr_at_tpr(id_, ood)
    else:
        fpr95 = fpr_at_tpr(-ood, -id_)
    return {
        "fpr95": fpr95,
        "auroc": auroc(id_, ood),
        "aupr_in": average_precision(id_, ood),
        "aupr_out": average_precision(-ood, -id_),
        "convention": convention,
        "fpr_rule": fpr_rule,
    }


def accuracy(predictions, labels):
    """Classification accuracy ``mean(predictions == labels)`` over 1-D arrays of class indices."""
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if predictions.ndim != 1 or labels.ndim != 1:
        raise ValueError(
            f"predictions and labels must be 1-D arrays of class indices, "
            f"got shapes {predictions.shape} and {labels.shape}"
        )
    if predictions.size != labels.size:
        raise ValueError(f"got {predictions.size} predictions for {labels.size} labels")
    if labels.size == 0:
        raise ValueError("the label set is empty (0 labels): accuracy is undefined")
    return float(np.mean(predictions == labels))
