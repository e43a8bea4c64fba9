"""How sure a leaderboard is: bootstrap intervals over test samples and paired tests between methods.

What the numbers mean
---------------------
Every OOD metric is computed on finite test sets, so it is an estimate; these functions measure
how much it would move if the same network and the same fitted method met other test samples
drawn like these (*sample noise*). They say nothing about training noise (another seed, another
fit): the leaderboard reports the spread over seeds separately, and with several seeds the
intervals are those of the seed mean with the trained networks held fixed.

- **Intervals** (``bootstrap_metrics``): a stratified percentile bootstrap (Efron & Tibshirani
  1993, ch. 13). A resample draws ``m`` of the ``m`` ID test samples and, independently, ``n`` of
  the ``n`` samples of each OOD set, with replacement; a metric is recomputed on every resample
  and the interval is the central ``level`` of its resampled values (``percentile_interval``).
  The ID resample is shared by all OOD sets of a replicate, so averages over OOD sets are
  bootstrapped jointly, and every method, seed and backbone sees the same resamples (the draws
  depend only on the set and its size, ``resample_counts``), so differences are paired.
- **Paired tests** against the best method of a column: DeLong's test for the AUROC of one OOD
  set (``delong_test``), a paired bootstrap for everything else (``paired_bootstrap_test``), and
  Holm's correction over the methods compared with the best (``holm``).

A resample is represented by its multiplicities (how often each sample was drawn), so the
metrics of all resamples are computed at once from cumulative sums over the samples sorted
once per method and set. The definitions are those of ``results.metrics``, under either
convention and FPR rule: with every multiplicity 1 the functions give exactly its FPR@95,
AUROC and accuracy, and its AUPR up to the order of a floating-point sum.
"""
from __future__ import annotations

import functools
import hashlib
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from results import metrics
from results.metrics import CONVENTIONS, FPR_RULES, _check_choice, _check_scores

DEFAULT_LEVEL = 0.95
DEFAULT_RESAMPLES = 1000
SEED = 20  # of every resample: two runs draw the same resamples, hence give the same intervals
METRIC_ORDER = ("fpr95", "auroc", "aupr_in", "aupr_out")  # the columns of bootstrap_metrics' arrays
TPR = 0.95  # FPR@95: the recall of the positive class at which the negatives are counted
CHUNK_CELLS = 1 << 18  # replicates x samples handled at once: the working arrays stay in the CPU's cache
# The source of this module and of results.metrics, as imported: what resampled results depend on
# besides their inputs, so a cache of them keyed by it never serves stale ones.
CODE_DIGEST = hashlib.sha256(Path(__file__).read_bytes() + Path(metrics.__file__).read_bytes()).hexdigest()


@functools.lru_cache(maxsize=64)  # one per set and size: shared by every method, seed and backbone of a run
def resample_counts(n: int, resamples: int, key: str) -> np.ndarray:
    """Multiplicities of ``resamples`` bootstrap resamples of ``n`` samples: row ``b`` counts how
    often each sample is drawn in ``n`` uniform draws with replacement (a Multinomial(n, 1/n)
    vector). Seeded by ``SEED``, ``key`` (the set's name) and ``n``, so every method, seed and
    backbone scored on that set gets the same resamples, in every run. Returns a
    ``(resamples, n)`` read-only array of the smallest unsigned integer type that holds the counts."""
    if n < 1 or resamples < 1:
        raise ValueError(f"resample_counts needs n >= 1 samples and resamples >= 1, got n={n}, resamples={resamples}")
    rng = np.random.default_rng([SEED, zlib.crc32(key.encode()), n])
    counts = np.empty((resamples, n), dtype=np.int32)
    for row in counts:
        row[:] = np.bincount(rng.integers(0, n, size=n, dtype=np.int32), minlength=n)
    counts = counts.astype(np.min_scalar_type(counts.max()))
    counts.flags.writeable = False  # cached: shared by every caller
    return counts


def percentile_interval(replicates: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """The percentile bootstrap interval of ``level`` along the last axis: the ``(1 - level) / 2``
    and ``(1 + level) / 2`` quantiles of the replicates (linear interpolation between order
    statistics, numpy's default). NaN where a replicate is NaN."""
    _check_level(level)
    lo, hi = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2], axis=-1)
    return lo, hi


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"the interval level must be in (0, 1), e.g. 0.95, got {level!r}")


# ---------------------------------------------------------------- the bootstrap of one method

@dataclass(frozen=True)
class _Sorted:
    """One side of a cell, sorted once: the descending scores, the order that sorts them, and the
    index of the last sample of each one's tie group."""

    order: np.ndarray
    values: np.ndarray
    group_end: np.ndarray

    @classmethod
    def of(cls, scores: np.ndarray) -> _Sorted:
        order = np.argsort(-scores, kind="stable")
        values = scores[order]
        return cls(order, values, np.searchsorted(-values, -values, side="right") - 1)

    def above(self, thresholds: np.ndarray, inclusive: bool) -> np.ndarray:
        """How many of these samples score above each threshold (``>=`` when ``inclusive``, else ``>``)."""
        return np.searchsorted(-self.values, -thresholds, side="right" if inclusive else "left")

    @property
    def group_ends(self) -> np.ndarray:
        """The index of the last sample of every tie group, in descending order of the scores."""
        return np.unique(self.group_end)


@dataclass(frozen=True)
class _Ranks:
    """Where the samples of an ID and an OOD side fall among each other's (and their own) sorted
    scores: the columns of the cumulative weights each metric reads, found once per cell."""

    ood_at_or_above_id: np.ndarray | slice  # per ID sample, descending: #OOD scoring >= it
    ood_above_id: np.ndarray | slice | None  # #OOD scoring > it; None when no OOD score equals an ID score
    id_above_ood: np.ndarray | slice  # per OOD sample, descending: #ID scoring > it
    ood_above_ood: np.ndarray | slice  # #OOD scoring > it
    ood_groups_up: np.ndarray  # the OOD tie groups from the lowest score up (their last sample)
    ood_above_ood_groups: np.ndarray  # #OOD scoring > each of those groups

    @classmethod
    def of(cls, id_: _Sorted, ood: _Sorted) -> _Ranks:
        at_or_above, above = ood.above(id_.values, True), ood.above(id_.values, False)
        groups_up = ood.group_ends[::-1]
        return cls(_columns(at_or_above), None if np.array_equal(at_or_above, above) else _columns(above),
                   _columns(id_.above(ood.values, False)), _columns(ood.above(ood.values, False)), groups_up,
                   ood.above(ood.values[groups_up], False))


def _columns(index: np.ndarray) -> np.ndarray | slice:
    """``index`` as the slice it equals when it is a run of consecutive columns (no ties: a view
    instead of a copy), else as it is."""
    if len(index) and np.array_equal(index, np.arange(index[0], index[0] + len(index))):
        return slice(int(index[0]), int(index[0]) + len(index))
    return index


def _cumulative(weights: np.ndarray) -> np.ndarray:
    """``out[:, k]`` = the weight of the first ``k`` columns of ``weights`` (``out[:, 0] = 0``), per
    row, in float64: sums of integers below 2**53, exact, for float arithmetic without casts."""
    out = np.zeros((weights.shape[0], weights.shape[1] + 1))
    out[:, 1:] = np.cumsum(weights, axis=1, dtype=np.int32)  # an integer cumsum is 4x faster than float
    return out


def _average_precision(weights: np.ndarray, tp: np.ndarray, fp: np.ndarray, total: int) -> np.ndarray:
    """``sum_k weights_k tp_k / (tp_k + fp_k) / total`` per row: the precision at each positive
    sample's threshold averaged over the positives. ``tp + fp = 0`` only where ``weights = 0``."""
    precision = tp + fp
    np.maximum(precision, 1, out=precision)
    np.divide(tp, precision, out=precision)
    return np.einsum("bk,bk->b", weights, precision) / total


def _fpr_groups(cum_pos: np.ndarray, total: int, tpr: float = TPR) -> tuple[np.ndarray, np.ndarray]:
    """Where ``results.metrics.fpr_at_tpr`` counts the negatives, per replicate, from the positives'
    weight ``cum_pos[:, g]`` at or above their ``g``-th tie group (descending score).

    The rule picks the recall ``R = cum_pos / total`` closest to ``tpr`` (ties to the higher
    recall) and, among the thresholds with that recall, the lowest: the negatives counted are then
    those above the next positive group actually drawn (``inclusive`` False), or, at full recall,
    those at or above the last positive group drawn (``inclusive`` True). A group never drawn
    repeats its predecessor's recall, so the last minimiser leads to the next group drawn.
    Returns (group index, inclusive) per row."""
    distance = np.abs(cum_pos / total - tpr)  # float64 arithmetic as in fpr_at_tpr
    last = cum_pos.shape[1] - 1 - np.argmin(distance[:, ::-1], axis=1)
    reached = np.take_along_axis(cum_pos, last[:, None], axis=1)
    inclusive = reached[:, 0] == total
    group = np.where(inclusive, (cum_pos < total).sum(axis=1), (cum_pos <= reached).sum(axis=1))
    return group, inclusive


def _cal_metric_group(cum_pos: np.ndarray, total: int) -> np.ndarray:
    """The ID tie group of ``results.metrics.fpr_cal_metric``'s threshold ``sort(S_ID)[round(0.05 m)]``,
    per replicate: the lowest group with more than ``round(0.05 m)`` ID weight at or below it,
    i.e. the last group whose weight strictly above it is under ``m - round(0.05 m)``."""
    above = np.concatenate([np.zeros((len(cum_pos), 1), cum_pos.dtype), cum_pos[:, :-1]], axis=1)
    return (above < total - round(0.05 * total)).sum(axis=1) - 1


def bootstrap_metrics(id_scores, ood_scores: dict[str, np.ndarray], id_counts: np.ndarray,
                      ood_counts: dict[str, np.ndarray], convention: str = "id_positive",
                      fpr_rule: str = "canonical") -> dict[str, np.ndarray]:
    """FPR@95, AUROC, AUPR-In and AUPR-Out of one method on every resample: ``{OOD set: (B, 4)}``
    with the columns in ``METRIC_ORDER``.

    Resample ``b`` takes ID sample ``i`` ``w_i = id_counts[b, i]`` times and OOD sample ``j`` of a
    set ``u_j = ood_counts[set][b, j]`` times (``resample_counts``). Each side is sorted once, and
    where each sample falls among the other side's scores is found once per cell; a resample's
    metrics then follow from cumulative weights along the sorted order. With ``T_i`` (``F_i``) the
    ID (OOD) weight scoring >= ``x_i``, for the ID sample ``i``, and ``A_j`` (``O_j``) the ID (OOD)
    weight scoring <= ``y_j``, for the OOD sample ``j``:

    - AUROC = sum_i w_i (#OOD below x_i + 0.5 #OOD tied with x_i) / (m n) (Mann-Whitney);
    - AUPR-In = sum_i (w_i / m) T_i / (T_i + F_i): the precision at each ID sample's threshold,
      averaged over the ID samples (tied ones share the precision at the end of their tie
      group); AUPR-Out = sum_j (u_j / n) O_j / (O_j + A_j), the same with OOD positive, scores negated;
    - FPR@95 by the convention's positive class and the FPR rule (``_fpr_groups``, ``_cal_metric_group``).
    """
    _check_choice(convention, CONVENTIONS, "convention")
    _check_choice(fpr_rule, FPR_RULES, "fpr_rule")
    id_ = _Sorted.of(_check_scores(id_scores, "ID"))
    sets = {s: _Sorted.of(_check_scores(scores, f"OOD ({s})")) for s, scores in ood_scores.items()}
    m, resamples = len(id_.values), len(id_counts)
    if id_counts.shape[1] != m or any(ood_counts[s].shape != (resamples, len(sets[s].values)) for s in sets):
        raise ValueError("the resample counts must have one row per resample and one column per score of their set")
    id_ends = id_.group_ends
    id_at = _columns(id_.group_end + 1)  # the column of id_cum holding T_i
    ranks = {s: _Ranks.of(id_, o) for s, o in sets.items()}
    out = {s: np.empty((resamples, len(METRIC_ORDER))) for s in sets}
    rows = max(1, CHUNK_CELLS // max(m, *(len(o.values) for o in sets.values())))
    for start in range(0, resamples, rows):
        chunk = slice(start, start + rows)
        w = np.take(id_counts[chunk], id_.order, axis=1)
        id_cum = _cumulative(w)  # [:, k]: the ID weight of the k highest ID scores
        w = w.astype(np.float64)
        t = id_cum[:, id_at]
        if fpr_rule == "cal_metric":
            id_group, id_inclusive = _cal_metric_group(id_cum[:, id_ends + 1], m), False
        elif convention == "id_positive":
            id_group, id_inclusive = _fpr_groups(id_cum[:, id_ends + 1], m)
        for s, o in sets.items():
            n, rank = len(o.values), ranks[s]
            u = np.take(ood_counts[s][chunk], o.order, axis=1)
            ood_cum = _cumulative(u)  # [:, k]: the OOD weight of the k highest OOD scores
            u = u.astype(np.float64)
            f = ood_cum[:, rank.ood_at_or_above_id]
            not_below = np.einsum("bi,bi->b", w, f)  # sum_i w_i (#OOD above x_i + #OOD tied with x_i)
            above = not_below if rank.ood_above_id is None else \
                np.einsum("bi,bi->b", w, ood_cum[:, rank.ood_above_id])
            auroc = (2 * m * n - not_below - above) / (2 * m * n)
            aupr_in = _average_precision(w, t, f, m)
            ood_at_or_below = n - ood_cum[:, rank.ood_above_ood]
            aupr_out = _average_precision(u, ood_at_or_below, m - id_cum[:, rank.id_above_ood], n)
            if convention == "id_positive":  # the negatives: OOD scoring above the ID threshold
                threshold = id_.values[id_ends[id_group]]
                counted = np.where(id_inclusive, o.above(threshold, True), o.above(threshold, False))
                fpr = np.take_along_axis(ood_cum, counted[:, None], axis=1)[:, 0] / n
            else:  # OOD positive, scored by -S: the negatives are the ID samples below the OOD threshold
                group, inclusive = _fpr_groups(n - ood_cum[:, rank.ood_above_ood_groups], n)
                threshold = o.values[rank.ood_groups_up[group]]
                counted = np.where(inclusive, id_.above(threshold, False), id_.above(threshold, True))
                fpr = (m - np.take_along_axis(id_cum, counted[:, None], axis=1)[:, 0]) / m
            out[s][chunk] = np.stack([fpr, auroc, aupr_in, aupr_out], axis=1)
    return out


def bootstrap_accuracy(correct, id_counts: np.ndarray) -> np.ndarray:
    """The ID accuracy on every resample: ``sum_i w_i c_i / m`` with ``c_i`` = 1 where the
    method's prediction of ID sample ``i`` is right."""
    correct = np.asarray(correct, dtype=bool)
    if id_counts.shape[1] != correct.size:
        raise ValueError(f"got {correct.size} ID predictions for resamples of {id_counts.shape[1]} ID samples")
    return np.einsum("bi,i->b", id_counts, correct.astype(id_counts.dtype), dtype=np.int64) / correct.size


# ---------------------------------------------------------------- DeLong's test for two AUROCs

def _midranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..N of ``values`` in ascending order, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    sorted_ = values[order]
    first = np.searchsorted(sorted_, sorted_, side="left")
    last = np.searchsorted(sorted_, sorted_, side="right")
    ranks = np.empty(len(values))
    ranks[order] = (first + last + 1) / 2
    return ranks


def delong_components(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components of the AUROC (ID positive), by Sun & Xu's midrank algorithm.

    ``V10_i = (1/n) sum_j psi(x_i, y_j)`` for ID sample ``i`` and ``V01_j = (1/m) sum_i psi(x_i, y_j)``
    for OOD sample ``j``, with ``psi(x, y) = 1`` if x > y, 1/2 if x = y, else 0 (DeLong, DeLong &
    Clarke-Pearson 1988). Sun & Xu (2014) compute them from midranks in O(N log N):
    ``V10_i = (Z_i - X_i) / n`` and ``V01_j = 1 - (Z_{m+j} - Y_j) / m``, where Z are the midranks in
    the pooled sample and X, Y those within the ID and the OOD sample. ``mean(V10) = mean(V01) = AUROC``.
    """
    x = _check_scores(id_scores, "ID")
    y = _check_scores(ood_scores, "OOD")
    m, n = len(x), len(y)
    pooled = _midranks(np.concatenate([x, y]))
    return (pooled[:m] - _midranks(x)) / n, 1 - (pooled[m:] - _midranks(y)) / m


def delong_test(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[float, float, float]:
    """DeLong's test of AUROC_a = AUROC_b for two scores of the same samples, from their structural
    components ``(V10, V01)`` (``delong_components``; averaged over seeds for seed means).

    ``d = AUROC_a - AUROC_b``; ``Var(d) = S10 / m + S01 / n`` with ``S10`` and ``S01`` the sample
    variances (ddof 1) of ``V10_a - V10_b`` and ``V01_a - V01_b`` (DeLong et al. 1988, eq. 5 for the
    contrast (1, -1)); ``z = d / sqrt(Var(d))`` and the two-sided ``p = erfc(|z| / sqrt 2)``.
    Returns ``(d, standard error, p)``; ``p = 1`` when both are identical on every sample."""
    v10, v01 = a[0] - b[0], a[1] - b[1]
    if len(v10) < 2 or len(v01) < 2:
        raise ValueError("DeLong's test needs at least 2 ID and 2 OOD samples")
    difference = float(v10.mean())
    se = math.sqrt(v10.var(ddof=1) / len(v10) + v01.var(ddof=1) / len(v01))
    return difference, se, _two_sided_p(difference, se)


def _two_sided_p(difference: float, se: float) -> float:
    """``erfc(|d / se| / sqrt 2)``: the normal two-sided p-value; 1 for no difference at all, 0 for
    a difference with no spread."""
    if se == 0:
        return 1.0 if difference == 0 else 0.0
    return math.erfc(abs(difference / se) / math.sqrt(2))


# ---------------------------------------------------------------- one method's resampled results

@dataclass(frozen=True)
class MethodSamples:
    """What the uncertainty of one method on one (backbone, seed) rests on, per OOD set: its
    metrics on every resample (``(B, 4)``, columns ``METRIC_ORDER``) and DeLong's components
    ``(V10, V01)``; and its ID accuracy on every resample (``(B,)``)."""

    replicates: dict[str, np.ndarray]
    accuracy: np.ndarray
    components: dict[str, tuple[np.ndarray, np.ndarray]]

    def arrays(self) -> dict[str, np.ndarray]:
        """These results as arrays, for a cache file: ``replicates`` (sets, B, 4), ``accuracy`` (B,),
        ``v10`` (sets, m) and ``v01`` (every set's, one after the other)."""
        sets = list(self.replicates)
        return {"replicates": np.stack([self.replicates[s] for s in sets]), "accuracy": self.accuracy,
                "v10": np.stack([self.components[s][0] for s in sets]),
                "v01": np.concatenate([self.components[s][1] for s in sets])}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], sizes: dict[str, int]) -> MethodSamples:
        """The results ``arrays`` gave, for the OOD sets of ``sizes`` (name -> samples, in their order)."""
        v01 = np.split(arrays["v01"], np.cumsum(list(sizes.values()))[:-1])
        return cls(dict(zip(sizes, arrays["replicates"])), arrays["accuracy"],
                   {s: (v10, v) for s, v10, v in zip(sizes, arrays["v10"], v01)})


def method_samples(id_scores, id_correct, ood_scores: dict[str, np.ndarray], id_label: str,
                   resamples: int = DEFAULT_RESAMPLES, convention: str = "id_positive",
                   fpr_rule: str = "canonical") -> MethodSamples:
    """``MethodSamples`` of one method from its per-sample scores (higher = more ID) on the ID
    test set (named ``id_label``) and the OOD sets (named by their keys), and whether it
    classifies each ID test sample right, on the ``resamples`` seeded resamples of each set."""
    id_counts = resample_counts(len(id_scores), resamples, id_label)
    ood_counts = {s: resample_counts(len(scores), resamples, s) for s, scores in ood_scores.items()}
    return MethodSamples(bootstrap_metrics(id_scores, ood_scores, id_counts, ood_counts, convention, fpr_rule),
                         bootstrap_accuracy(id_correct, id_counts),
                         {s: delong_components(id_scores, scores) for s, scores in ood_scores.items()})


# ---------------------------------------------------------------- paired bootstrap and Holm

def paired_bootstrap_test(difference: float, replicates: np.ndarray,
                          level: float = DEFAULT_LEVEL) -> tuple[float, float, float, float]:
    """Paired bootstrap test of a difference ``d`` between two methods (or seed means) from its
    ``replicates`` on the same resamples: the percentile interval of the replicates (``level``),
    their standard deviation ``se`` (ddof 1) and the normal two-sided ``p = erfc(|d / se| / sqrt 2)``
    (the bootstrap test of Robin et al. 2011, pROC's ``roc.test(method="bootstrap")``).
    Returns ``(lo, hi, se, p)``; ``p = 1`` when every replicate difference is 0."""
    lo, hi = percentile_interval(replicates, level)
    se = float(np.std(replicates, ddof=1))
    return float(lo), float(hi), se, _two_sided_p(difference, se)


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (Holm 1979): with ``p_(1) <= ... <= p_(k)``,
    ``adj_(i) = max_{j <= i} min(1, (k - j + 1) p_(j))``; rejecting where ``adj < alpha`` keeps the
    family-wise error rate at ``alpha``."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (len(p) - np.arange(len(p))) * p[order])
    adjusted = np.empty_like(p)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted
