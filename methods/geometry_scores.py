"""Scores from the geometry of the penultimate features, the head and the fit split: Relative
Mahalanobis (rmds), a class-conditional Gaussian mixture (gmm), NNGuide, fDBD, SHE, Relation, NCI,
OpenMax and GROOD.

Each method learns its state from the ID fit split (true labels) in ``fit`` and scores every sample
alone in ``score_samples`` (higher = more in-distribution). The math is float64 and lives in the pure
functions below, each with its formula and paper; the registered classes validate inputs and store
state. The statistics they share with ``methods.distance_scores`` (class means, tied covariance,
pseudo-inverse precision, L2 normalisation, nearest-neighbour search, seeded subsamples) come from
there. Where a method's official code differs from its paper, the class docstring says which one the
default follows and which parameter gives the other (docs/methods.md lists every difference).
"""
from __future__ import annotations

import logging

import numpy as np
from scipy.linalg import solve_triangular
from scipy.optimize import brentq

from methods.base import (
    Method,
    check_fitted,
    finite_features,
    finite_head,
    finite_logits,
    log_sum_exp,
    register,
    rowwise_apply,
    softmax_rows,
    split_name,
)
from methods.distance_scores import (
    KNN_BLOCK_ELEMENTS,
    _check_dim,
    class_means_and_tied_covariance,
    knn_index,
    knn_score,
    kth_similarities,
    l2_normalise,
    mahalanobis_score,
    pinv_precision,
    subsample_indices,
    whitening_factor,
)

log = logging.getLogger(__name__)
NORM_FLOOR = 1e-8  # pytorch-ood's floor on the fDBD normaliser: a feature at the centre scores finitely
RELATION_THRESHOLD = 0.03  # Relation's official code drops graph edges at or below this value
LIBMR_TRANSLATION = 10_000.0  # libMR shifts a tail to start at this value before its Weibull fit
EUCOS_SCALE = 200.0  # OpenMax's "eucos" distance: Euclidean / 200 + cosine (the official code)
GMM_FACTOR_BYTES = 2 ** 31  # per-class Cholesky factors above this (C * D^2 * 8 bytes) ask for "tied"
# banks (nnguide, relation, grood) keep at least this many fit samples: 1% of a small fit split is a
# handful of samples (digits: 7), too few for a neighbour or a kernel sum
MIN_BANK = 1000


# ---------------------------------------------------------------- shared checks

def _class_statistics(method: str, split, features: np.ndarray, labels: np.ndarray,
                      n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``class_means_and_tied_covariance`` (every class must occur), with the method and the split
    in its error."""
    try:
        return class_means_and_tied_covariance(features, labels, n_classes)
    except ValueError as err:
        raise ValueError(f"{method}: fit split {split_name(split)}: {err}") from err


def _check_classes(method: str, split, logits: np.ndarray, expected: int) -> None:
    if logits.shape[1] != expected:
        raise ValueError(f"{method}: {split_name(split)} has {logits.shape[1]} classes but the method was fit "
                         f"on {expected}; fit and scored splits must come from the same backbone")


def _correctly_classified(split, logits: np.ndarray) -> np.ndarray:
    """Mask of the fit samples whose predicted class (argmax of the logits) is their label."""
    return logits.argmax(axis=1) == np.asarray(split.labels)


def _class_statistics_rows(method: str, split, logits: np.ndarray) -> np.ndarray:
    """Mask of the fit samples that class statistics (SHE's patterns, OpenMax's MAVs) come from:
    the correctly classified ones, as the papers, and all samples of a class the network never
    classifies correctly on the fit split (logged; the papers leave its statistics undefined)."""
    labels = np.asarray(split.labels)
    correct = _correctly_classified(split, logits)
    missing = np.bincount(labels[correct], minlength=logits.shape[1]) == 0
    if missing.any():
        log.warning("%s: classes %s have no correctly classified sample in %s; their statistics use all "
                    "their samples", method, ", ".join(map(str, np.flatnonzero(missing)[:20])), split_name(split))
    return correct | missing[labels]


def _bank_indices(method: str, n: int, fit_fraction: float, seed: int, k: int = 1) -> np.ndarray:
    """Sorted indices of a seeded subsample (``subsample_indices``) of the n rows a bank is drawn
    from: round(fit_fraction * n) of them, but at least min(n, 1,000) and at least k."""
    if not 0 < fit_fraction <= 1:
        raise ValueError(f"{method}: fit_fraction must be in (0, 1], got {fit_fraction}")
    if int(k) != k or not 1 <= k <= n:
        raise ValueError(f"{method}: k must be an integer in [1, {n}] (the samples its bank is drawn from), "
                         f"got {k}")
    return subsample_indices(n, max(round(fit_fraction * n), min(n, MIN_BANK), k) / n, seed)


# ---------------------------------------------------------------- Relative Mahalanobis

def relative_mahalanobis_score(features: np.ndarray, means: np.ndarray, factor: np.ndarray,
                               background_mean: np.ndarray, background_factor: np.ndarray) -> np.ndarray:
    """Relative Mahalanobis distance (Ren et al. 2021, "A simple fix to Mahalanobis distance for
    improving near-OOD detection", Eq. 3), as a confidence:

        S = -min_k RMD_k(v),  RMD_k(v) = MD_k(v) - MD_0(v),
        MD_k(v) = (v - mu_k)^T Sigma^+ (v - mu_k),  MD_0(v) = (v - mu_0)^T Sigma_0^+ (v - mu_0).

    mu_k and Sigma are the class means and the tied covariance (``mahalanobis_score``); mu_0 and
    Sigma_0 the mean and covariance of all fit features, the background Gaussian. MD_0 does not
    depend on k, so S = -min_k MD_k(v) + MD_0(v). ``factor``, ``background_factor``: L with P = L L^T.
    """
    background = (features - background_mean) @ background_factor
    return mahalanobis_score(features, means, factor) + np.einsum("nr,nr->n", background, background)


@register
class RelativeMahalanobis(Method):
    """Relative Mahalanobis distance (Ren et al. 2021): S = -min_k [MD_k(v) - MD_0(v)], the
    Mahalanobis distance to the nearest class (class means, tied covariance) relative to that of a
    background Gaussian fit to all fit features; MLE covariances with pseudo-inverse precisions in
    float64. The paper's formula; OpenOOD's rmds is the same (sklearn EmpiricalCovariance, float32)."""

    name = "rmds"
    reads = ("features", "labels", "logits")

    def fit(self, split) -> "RelativeMahalanobis":
        features = finite_features(split)
        n_classes = finite_logits(split).shape[1]
        means, covariance = _class_statistics(self.name, split, features, split.labels, n_classes)
        self.means_ = means
        self.factor_ = whitening_factor(pinv_precision(covariance))
        self.background_mean_ = features.mean(axis=0)
        centred = features - self.background_mean_
        self.background_factor_ = whitening_factor(pinv_precision(centred.T @ centred / len(features)))
        return self

    def score_samples(self, split) -> np.ndarray:
        check_fitted(self, "means_", "factor_", "background_factor_")
        features = finite_features(split, dtype=None)  # float64 a block at a time
        _check_dim(self.name, split, features, self.means_.shape[1])
        return rowwise_apply(lambda v: relative_mahalanobis_score(
            v, self.means_, self.factor_, self.background_mean_, self.background_factor_), features)


# ---------------------------------------------------------------- class-conditional Gaussian mixture

def inverse_cholesky(covariance: np.ndarray) -> tuple[np.ndarray, float]:
    """(U, log det Sigma) with Sigma^-1 = U U^T: U = L^-T for the Cholesky factor Sigma = L L^T.
    Raises numpy.linalg.LinAlgError if Sigma is not positive definite."""
    lower = np.linalg.cholesky(covariance)
    inverse = solve_triangular(lower, np.eye(len(covariance)), lower=True)
    return np.ascontiguousarray(inverse.T), 2.0 * float(np.log(np.diag(lower)).sum())


def gaussian_mixture_score(features: np.ndarray, means: np.ndarray, factors: np.ndarray,
                           log_norms: np.ndarray) -> np.ndarray:
    """Log-likelihood under a class-conditional Gaussian mixture (pytorch-ood's GMM, negated):

        S = log sum_k pi_k N(v | mu_k, Sigma_k) = LSE_k [ log pi_k - (MD_k(v) + log det Sigma_k + D log 2 pi) / 2 ],
        MD_k(v) = ||(v - mu_k) U_k||^2,  Sigma_k^-1 = U_k U_k^T.

    ``log_norms``: log pi_k - (log det Sigma_k + D log 2 pi) / 2 per component. ``factors`` holds one
    U_k per component (K, D, D), or one shared U (1, D, D): the tied covariance, where MD_k comes from
    the whitened features and means (one product instead of K).
    """
    if len(factors) == 1:
        origin = means.mean(axis=0)  # distances do not change under the shift; it keeps the norms small
        whitened, centres = (features - origin) @ factors[0], (means - origin) @ factors[0]
        distances = (np.einsum("nr,nr->n", whitened, whitened)[:, None] - 2.0 * whitened @ centres.T
                     + np.einsum("kr,kr->k", centres, centres)[None, :])
        np.maximum(distances, 0.0, out=distances)
    else:
        distances = np.empty((len(features), len(means)))
        for k, (mean, factor) in enumerate(zip(means, factors)):
            whitened = (features - mean) @ factor
            distances[:, k] = np.einsum("nr,nr->n", whitened, whitened)
    return log_sum_exp(log_norms[None, :] - distances / 2.0)


@register
class GaussianMixture(Method):
    """Class-conditional Gaussian mixture (as pytorch-ood's GMM; no single paper):
    S = log sum_k pi_k N(v | mu_k, Sigma_k), one Gaussian per class with its MLE mean and covariance
    plus ``reg`` on the diagonal, mixing weights pi_k the class frequencies of the fit split.

    ``covariance``: "class" (one covariance per class, pytorch-ood) or "tied" (one shared, pooled
    within-class covariance, the covariance type of OpenOOD's gmm, whose components are unsupervised
    clusters instead of classes). "class" holds C factors of D x D (C D^2 float64: 33.5 GB for
    ImageNet's 1,000 classes and 2,048 dims) and costs N C D^2 to score; above 2 GiB of factors
    ``fit`` asks for "tied".
    """

    name = "gmm"
    reads = ("features", "labels", "logits")
    grid = {"covariance": ["class", "tied"]}

    def __init__(self, covariance: str = "class", reg: float = 1e-6):
        self.covariance = covariance
        self.reg = reg

    def fit(self, split) -> "GaussianMixture":
        if self.covariance not in ("class", "tied"):
            raise ValueError(f"{self.name}: covariance must be 'class' or 'tied', got {self.covariance!r}")
        if not self.reg >= 0:
            raise ValueError(f"{self.name}: reg must be >= 0, got {self.reg}")
        features = finite_features(split)
        labels = np.asarray(split.labels)
        n_classes, dim = finite_logits(split).shape[1], features.shape[1]
        if self.covariance == "class" and n_classes * dim * dim * 8 > GMM_FACTOR_BYTES:
            raise ValueError(f"{self.name}: covariance='class' needs {n_classes} x {dim} x {dim} float64 factors "
                             f"({n_classes * dim * dim * 8 / 2 ** 30:.1f} GiB); use covariance='tied'")
        means, tied = _class_statistics(self.name, split, features, labels, n_classes)
        counts = np.bincount(labels, minlength=n_classes)
        ridge = self.reg * np.eye(dim)
        if self.covariance == "tied":
            covariances = [tied]
        else:
            centred = features - means[labels]
            covariances = [centred[labels == k].T @ centred[labels == k] / counts[k] for k in range(n_classes)]
        factors, log_dets = [], []
        for k, covariance in enumerate(covariances):
            try:
                factor, log_det = inverse_cholesky(covariance + ridge)
            except np.linalg.LinAlgError as err:
                which = "the tied covariance" if self.covariance == "tied" else f"the covariance of class {k}"
                raise ValueError(f"{self.name}: {which} on {split_name(split)} is not positive definite even "
                                 f"with reg={self.reg}; increase reg") from err
            factors.append(factor)
            log_dets.append(log_det)
        self.means_ = means
        self.factors_ = np.stack(factors)
        self.log_norms_ = (np.log(counts / counts.sum())
                           - (np.asarray(log_dets) + dim * np.log(2.0 * np.pi)) / 2.0)
        return self

    def score_samples(self, split) -> np.ndarray:
        check_fitted(self, "means_", "factors_", "log_norms_")
        features = finite_features(split, dtype=None)
        _check_dim(self.name, split, features, self.means_.shape[1])
        return rowwise_apply(lambda v: gaussian_mixture_score(v, self.means_, self.factors_, self.log_norms_),
                             features)


# ---------------------------------------------------------------- NNGuide

def nnguide_bank(features: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """NNGuide's bank: E(x_i) z(x_i), the normalised fit feature z = v / ||v|| scaled by the sample's
    energy score E = LSE(f)."""
    return l2_normalise(features) * log_sum_exp(logits)[:, None]


def nnguide_score(logits: np.ndarray, top_similarities: np.ndarray) -> np.ndarray:
    """Nearest-neighbour guidance (Park et al., ICCV 2023, "Nearest neighbor guidance for
    out-of-distribution detection"): the energy score guided by the confidence of the nearest fit
    samples,

        S = LSE(f(x)) * G(x),  G(x) = (1/k) sum of the k largest <z(x), E(x_i) z(x_i)> over the bank,

    z = v / ||v|| and E(x_i) = LSE(f(x_i)) (``nnguide_bank``); ``top_similarities`` (N, k) holds the
    k largest inner products of each sample, as the official code's faiss IndexFlatIP finds them."""
    return log_sum_exp(logits) * np.asarray(top_similarities, dtype=np.float64).mean(axis=1)


@register
class NNGuide(Method):
    """NNGuide (Park et al., ICCV 2023): S = LSE(f) * (1/k) sum of the k largest <z, LSE(f_i) z_i>
    over a bank of fit samples i, z = v / ||v||: the energy times the mean similarity to the k
    nearest confidence-scaled fit features. Defaults as the official code (its detector config and
    its ImageNet bank): k = 10 over a bank of 1% of the fit split (a seeded subsample here, of at
    least 1,000 samples, or all of a smaller fit split; the official code draws its 1% with its own
    sampler). OpenOOD uses k = 100 on the same 1%. The grid spans k from 1 to 1,000.

    The search is KNN's: an exact faiss inner-product index in float32 (``knn_index``,
    ``kth_similarities``), as the official code's IndexFlatIP, so batch independence holds to KNN's
    tolerance (``KNN_BATCH_RTOL``, 1e-5) rather than 1e-12.
    """

    name = "nnguide"
    reads = ("features", "logits")
    grid = {"k": [1, 10, 100, 1000]}

    def __init__(self, k: int = 10, fit_fraction: float = 0.01, seed: int = 0):
        self.k = k
        self.fit_fraction = fit_fraction
        self.seed = seed

    def fit(self, split) -> "NNGuide":
        logits = finite_logits(split)
        features = finite_features(split, len(logits))
        keep = _bank_indices(self.name, len(features), self.fit_fraction, self.seed, self.k)
        bank = np.ascontiguousarray(nnguide_bank(features[keep], logits[keep]), dtype=np.float32)
        self.index_ = knn_index(bank, "flat", 1, int(self.k))
        return self

    def score_samples(self, split) -> np.ndarray:
        check_fitted(self, "index_")
        logits = finite_logits(split, dtype=None)
        query = l2_normalise(finite_features(split, len(logits), dtype=np.float32))
        _check_dim(self.name, split, query, self.index_.d)
        top = kth_similarities(self.index_, query, list(range(1, int(self.k) + 1)))
        return rowwise_apply(nnguide_score, logits, top)


# ---------------------------------------------------------------- fDBD

def inverse_boundary_margins(weight: np.ndarray) -> np.ndarray:
    """M (C, C) with M[p, c] = 1 / ||w_p - w_c||_2 off the diagonal and 0 on it (fDBD's denominators)."""
    squared = np.einsum("cd,cd->c", weight, weight)
    gaps = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2.0 * weight @ weight.T, 0.0))
    np.fill_diagonal(gaps, np.inf)
    with np.errstate(divide="ignore"):  # identical weight rows give inf, which FDBD.fit reports
        return 1.0 / gaps


def fdbd_score(logits: np.ndarray, features: np.ndarray, inverse_margins: np.ndarray,
               centre: np.ndarray) -> np.ndarray:
    """fDBD (Liu & Qin, ICML 2024, "Fast decision boundary based out-of-distribution detector"):
    the mean distance from v to the decision boundaries between the predicted class y and every
    other class c, over the distance from v to a centre mu:

        S = [1 / (C - 1)] sum_{c != y} |f_y - f_c| / ||w_y - w_c||  /  ||v - mu||,

    f = W v + b, y = argmax_c f_c (|f_y - f_c| / ||w_y - w_c|| is the Euclidean distance to the
    hyperplane f_y = f_c). The denominator is floored at 1e-8 (pytorch-ood's guard), so a feature
    at the centre, or an all-zero one with mu = 0, scores finitely.
    """
    predicted = logits.argmax(axis=1)
    gaps = logits.max(axis=1)[:, None] - logits
    boundary = np.einsum("nc,nc->n", gaps, inverse_margins[predicted]) / (logits.shape[1] - 1)
    return boundary / np.maximum(np.linalg.norm(features - centre, axis=1), NORM_FLOOR)


@register
class FDBD(Method):
    """fDBD (Liu & Qin, ICML 2024): S = [1/(C-1)] sum_{c != y} |f_y - f_c| / ||w_y - w_c|| / ||v - mu||,
    the mean distance to the decision boundaries of the predicted class y, regularised by the
    distance to a centre mu.

    ``normalizer``: "mean" (||v - mu||, mu the mean fit feature: the paper and the official code) or
    "norm" (||v||, OpenOOD's alternative, chosen there on validation data). The official code sums
    over classes without the 1/(C-1) (a constant; the paper and pytorch-ood average).
    """

    name = "fdbd"
    reads = ("features", "head", "logits")
    grid = {"normalizer": ["mean", "norm"]}

    def __init__(self, normalizer: str = "mean"):
        self.normalizer = normalizer

    def fit(self, split) -> "FDBD":
        if self.normalizer not in ("mean", "norm"):
            raise ValueError(f"{self.name}: normalizer must be 'mean' or 'norm', got {self.normalizer!r}")
        features = finite_features(split)
        weight, _ = finite_head(split, features.shape[1])
        if len(weight) < 2:
            raise ValueError(f"{self.name}: needs at least 2 classes, the head has {len(weight)}")
        margins = inverse_boundary_margins(weight)
        if not np.isfinite(margins).all():
            p, c = np.argwhere(~np.isfinite(margins))[0]
            raise ValueError(f"{self.name}: classes {p} and {c} of {split_name(split)}'s head have the same weight "
                             "vector, so their decision boundary is undefined")
        self.inverse_margins_ = margins
        self.centre_ = features.mean(axis=0) if self.normalizer == "mean" else np.zeros(features.shape[1])
        return self

    def score_samples(self, split) -> np.ndarray:
        check_fitted(self, "inverse_margins_", "centre_")
        logits = finite_logits(split, dtype=None)
        features = finite_features(split, len(logits), dtype=None)
        _check_dim(self.name, split, features, len(self.centre_))
        _check_classes(self.name, split, logits, len(self.inverse_margins_))
        return rowwise_apply(lambda f, v: fdbd_score(f, v, self.inverse_margins_, self.centre_), logits, features)


# ---------------------------------------------------------------- SHE

def she_score(features: np.ndarray, logits: np.ndarray, patterns: np.ndarray) -> np.ndarray:
    """Simplified Hopfield energy (Zhang et al., ICLR 2023, "Out-of-distribution detection based on
    in-distribution data patterns memorization with modern Hopfield energy"):

        S = v^T s_y,  y = argmax_c f_c,

    s_c the stored pattern of class c: the mean feature of the fit samples of class c that the
    network classifies correctly."""
    return np.einsum("nd,nd->n", features, patterns[logits.argmax(axis=1)])


@register
class SHE(Method):
    """SHE (Zhang et al., ICLR 2023): S = v^T s_y, the inner product with the stored pattern s_y (the
    mean correctly classified fit feature) of the predicted class y. The paper's formula; OpenOOD's
    default metric (inner product) and pytorch-ood are the same. A class without a correctly
    classified fit sample (left undefined by the paper: OpenOOD's pattern is NaN, pytorch-ood raises)
    gets the mean of all its fit samples, logged."""

    name = "she"
    reads = ("features", "labels", "logits")

    def fit(self, split) -> "SHE":
        logits = finite_logits(split)
        features = finite_features(split, len(logits))
        rows = _class_statistics_rows(self.name, split, logits)
        self.patterns_ = _class_statistics(self.name, split, features[rows], np.asarray(split.labels)[rows],
                                           logits.shape[1])[0]
        return self

    def score_samples(self, split) -> np.ndarray:
        check_fitted(self, "patterns_")
        logits = finite_logits(split, dtype=None)
        features = finite_features(split, len(logits), dtype=None)
        _check_dim(self.name, split, features, self.patterns_.shape[1])
        _check_classes(self.name, split, logits, len(self.patterns_))
        return rowwise_apply(lambda v, f: she_score(v, f, self.patterns_), features, logits)


# ---------------------------------------------------------------- NCI

def nci_score(features: np.ndarray, logits: np.ndarray, weight: np.ndarray, centre: np.ndarray,
              alpha: float) -> np.ndarray:
    """Neural-collapse inspired score (Liu & Qin, CVPR 2025, "Detecting out-of-distribution through
    the lens of neural collapse"): the proximity of the centred feature to the predicted class's
    weight vector, plus an L1 feature-norm filter:

        S = w_y^T (v - mu_G) / ||v - mu_G||_2 + alpha ||v||_1,  y = argmax_c f_c,

    mu_G the mean fit feature (the global mean). As in the official code, w_y is not normalised.
    ||v - mu_G|| is floored at 1e-8 (a feature at the global mean has no direction)."""
    centred = features - centre
    proximity = np.einsum("nd,nd->n", centred, weight[logits.argmax(axis=1)])
    return proximity / np.maximum(np.linalg.norm(centred, axis=1), NORM_FLOOR) + alpha * np.abs(features).sum(axis=1)


@register
class NCI(Method):
    """NCI (Liu & Qin, CVPR 2025): S = w_y^T (v - mu_G) / ||v - mu_G|| + alpha ||v||_1, the proximity of
    the centred feature to the predicted class's weight vector plus a feature-norm filter, as the
    official code computes it. ``alpha`` defaults to the official configuration's 1e-4; its grid is
    the official sweep."""

    name = "nci"
    reads = ("features", "head", "logits")
    grid = {"alpha": [1e-4, 1e-3, 1e-2, 1e-1]}

    def __init__(self, alpha: float = 1e-4):
        self.alpha = alpha

    def fit(self, split) -> "NCI":
        if not (np.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"{self.name}: alpha must be finite and >= 0, got {self.alpha}")
        features = finite_features(split)
        self.weight_ = finite_head(split, features.shape[1])[0]
        self.centre_ = features.mean(axis=0)
        return self

    def score_samples(self, split) -> np.ndarray:
        check_fitted(self, "weight_", "centre_")
        logits = finite_logits(split, dtype=None)
        features = finite_features(split, len(logits), dtype=None)
        _check_dim(self.name, split, features, len(self.centre_))
        _check_classes(self.name, split, logits, len(self.weight_))
        return rowwise_apply(lambda v, f: nci_score(v, f, self.weight_, self.centre_, self.alpha), features, logits)


# ---------------------------------------------------------------- Relation

def relation_score(features: np.ndarray, probs: np.ndarray, bank: np.ndarray, bank_probs: np.ndarray,
                   power: float, threshold: float = RELATION_THRESHOLD) -> np.ndarray:
    """Relation (Kim et al., NeurIPS 2023, "Neural relation graph: a unified framework for
    identifying label noise and outlier data"): the summed edge weights between a sample and the
    fit samples in the relation graph,

        S = sum_i [r_i > 0.03] r_i^t,  r_i = max(0, <z, z_i>) <p, p_i>,

    z = v / ||v||, p = softmax(f) and z_i, p_i those of the fit samples (the bank), t = ``power``.
    Edges at or below the threshold are dropped before the power (the official code's order).
    """
    edges = features @ bank.T
    np.maximum(edges, 0.0, out=edges)
    edges *= probs @ bank_probs.T
    edges[edges <= threshold] = 0.0
    if power != 1:
        np.power(edges, power, out=edges)
    return edges.sum(axis=1)


@register
class Relation(Method):
    """Relation (Kim et al., NeurIPS 2023): S = sum_i [r_i > 0.03] r_i^t, r_i = max(0, cos(v, v_i)) <p, p_i>,
    the relation-graph edge sum to the fit samples i (kernel "cos_p").
    ``power``: the kernel temperature t, 1 for OOD detection (the official code's README); its grid is
    OpenOOD's sweep. ``fit_fraction``: the seeded share of the fit split in the bank. The paper sums
    over the whole training set (``fit_fraction=1``; the official code can thin it with a stride,
    ``--hop``); scoring costs N x bank x (D + C) multiply-adds plus a pass over every edge, minutes
    for 100,000 samples against a 60,000-sample bank, so the default bank is a seeded 1%, as
    NNGuide's, of at least 1,000 samples (or the whole of a smaller fit split)."""

    name = "relation"
    reads = ("features", "logits")
    grid = {"power": [1.0, 2.0, 4.0, 6.0, 8.0]}

    def __init__(self, power: float = 1.0, fit_fraction: float = 0.01, seed: int = 0):
        self.power = power
        self.fit_fraction = fit_fraction
        self.seed = seed

    def fit(self, split) -> "Relation":
        if not self.power > 0:
            raise ValueError(f"{self.name}: power must be > 0, got {self.power}")
        logits = finite_logits(split)
        features = finite_features(split, len(logits))
        keep = _bank_indices(self.name, len(features), self.fit_fraction, self.seed)
        self.bank_ = l2_normalise(features[keep])
        self.bank_probs_ = softmax_rows(logits[keep])
        return self

    def score_samples(self, split) -> np.ndarray:
        check_fitted(self, "bank_", "bank_probs_")
        logits = finite_logits(split, dtype=None)
        features = finite_features(split, len(logits), dtype=None)
        _check_dim(self.name, split, features, self.bank_.shape[1])
        _check_classes(self.name, split, logits, self.bank_probs_.shape[1])
        rows = max(1, KNN_BLOCK_ELEMENTS // len(self.bank_))  # bounds the (rows, bank) edge matrix
        return rowwise_apply(lambda v, f: relation_score(l2_normalise(v), softmax_rows(f), self.bank_,
                                                         self.bank_probs_, self.power),
                             features, logits, rows=rows)


# ---------------------------------------------------------------- OpenMax

def weibull_fit_high(tail: np.ndarray) -> tuple[float, float, float]:
    """libMR's FitHigh, with scipy in place of libMR: the tail (the largest distances) is shifted to
    start at 10,000 (libMR's translate_amount), t_i = d_i + 10,000 - min(d), and a two-parameter
    Weibull (scipy's ``weibull_min`` with location 0) is fit by exact maximum likelihood. Returns
    (shape k, scale lambda, shift = 10,000 - min(d)).

    The MLE shape solves sum t^k ln t / sum t^k - 1/k - mean(ln t) = 0 (increasing in k; solved with
    ln t taken relative to max t, so t^k cannot overflow), and lambda = (mean t^k)^(1/k).
    """
    tail = np.asarray(tail, dtype=np.float64)
    shift = LIBMR_TRANSLATION - tail.min()
    shifted = tail + shift
    logs = np.log(shifted / shifted.max())
    if not logs.min() < 0:
        raise ValueError("the Weibull tail needs at least two distinct distances")

    def shape_equation(k):
        weights = np.exp(k * logs)
        return (weights @ logs) / weights.sum() - 1.0 / k - logs.mean()

    high = 1.0
    while shape_equation(high) < 0:
        high *= 2.0
    shape = brentq(shape_equation, high / 2.0 if high > 1.0 else 1e-6, high, xtol=1e-12)
    scale = shifted.max() * np.mean(np.exp(shape * logs)) ** (1.0 / shape)
    return float(shape), float(scale), float(shift)


def weibull_cdf(x: np.ndarray, shape: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """F(x) = 1 - exp(-(x / lambda)^k) for x > 0, else 0 (libMR's w_score of a FitHigh model)."""
    with np.errstate(over="ignore"):
        return -np.expm1(-np.power(np.maximum(x, 0.0) / scale, shape))


def activation_distances(logits: np.ndarray, centres: np.ndarray, distance: str) -> np.ndarray:
    """Distances from activation vectors v (N, C) to one mean activation vector each (N, C):
    "euclidean" ||v - mu||, or "eucos" ||v - mu|| / 200 + (1 - cos(v, mu)) (OpenMax's official code)."""
    euclidean = np.linalg.norm(logits - centres, axis=-1)
    if distance == "euclidean":
        return euclidean
    norms = np.maximum(np.linalg.norm(logits, axis=-1) * np.linalg.norm(centres, axis=-1), NORM_FLOOR)
    return euclidean / EUCOS_SCALE + 1.0 - (logits * centres).sum(axis=-1) / norms


def openmax_score(logits: np.ndarray, mavs: np.ndarray, shapes: np.ndarray, scales: np.ndarray,
                  shifts: np.ndarray, alpha: int, distance: str) -> np.ndarray:
    """OpenMax (Bendale & Boult, CVPR 2016, "Towards open set deep networks", Alg. 2), as the
    official code computes it, with S = -P(unknown):

        for the alpha largest activations v_s(1) >= ... >= v_s(alpha):
            w_s(i) = F_s(i)(d(v, mu_s(i))) (the class's Weibull CDF: its probability of being an outlier),
            omega_s(i) = 1 - w_s(i) (alpha + 1 - i) / alpha;  omega_c = 1 for the other classes;
        v'_c = v_c omega_c,  v'_0 = sum_c v_c (1 - omega_c),
        S = -P(unknown) = -exp(v'_0) / (exp(v'_0) + sum_c exp(v'_c)),

    v the logits (the activation vector), mu_c the mean activation vector of class c and d the
    ``distance`` (``activation_distances``); F_c is evaluated at d + shift_c (``weibull_fit_high``).
    """
    top = np.argpartition(-logits, alpha - 1, axis=1)[:, :alpha]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(logits, top, axis=1), axis=1), axis=1)
    distances = activation_distances(logits[:, None, :], mavs[top], distance)
    outlier = weibull_cdf(distances + shifts[top], shapes[top], scales[top])
    rank_weights = (alpha - np.arange(alpha)) / alpha  # (alpha + 1 - i) / alpha for i = 1..alpha
    top_logits = np.take_along_axis(logits, top, axis=1)
    moved = top_logits * outlier * rank_weights  # v_c (1 - omega_c), nonzero for the top classes only
    revised = logits.copy()
    np.put_along_axis(revised, top, top_logits - moved, axis=1)
    unknown = moved.sum(axis=1)
    return -np.exp(unknown - log_sum_exp(np.column_stack([unknown, revised])))


@register
class OpenMax(Method):
    """OpenMax (Bendale & Boult, CVPR 2016): Weibull models of the largest distances between correctly
    classified fit samples' logits and their class's mean activation vector (MAV) recalibrate the
    top-``alpha`` logits into an "unknown" class; S = -P(unknown). Defaults: the official code's tail
    size 20 and alpha 10; distance "eucos" (the official code's, which its comments call the
    paper's) or "euclidean" (OpenOOD, pytorch-ood). scipy's ``weibull_min`` replaces libMR
    (``weibull_fit_high``). A class without a correctly classified fit sample gets the statistics
    of all its fit samples, logged.
    The rank weights (alpha + 1 - i) / alpha and the CDF are the official code's; Alg. 2 as printed
    has (alpha - i) / alpha and exp(-(d / lambda)^k), the probability of being an inlier (see
    docs/methods.md). Grids: pytorch-ood's (no paper grid)."""

    name = "openmax"
    reads = ("logits", "labels")
    grid = {"tail_size": [10, 20, 30, 40, 50], "alpha": [1, 3, 5, 10, 15, 20]}

    def __init__(self, tail_size: int = 20, alpha: int = 10, distance: str = "eucos"):
        self.tail_size = tail_size
        self.alpha = alpha
        self.distance = distance

    def fit(self, split) -> "OpenMax":
        if self.distance not in ("eucos", "euclidean"):
            raise ValueError(f"{self.name}: distance must be 'eucos' or 'euclidean', got {self.distance!r}")
        if int(self.tail_size) != self.tail_size or self.tail_size < 2:
            raise ValueError(f"{self.name}: tail_size must be an integer >= 2, got {self.tail_size}")
        if int(self.alpha) != self.alpha or self.alpha < 1:
            raise ValueError(f"{self.name}: alpha must be an integer >= 1, got {self.alpha}")
        logits = finite_logits(split)
        rows = _class_statistics_rows(self.name, split, logits)
        labels = np.asarray(split.labels)[rows]
        logits = logits[rows]
        self.mavs_ = _class_statistics(self.name, split, logits, labels, logits.shape[1])[0]
        distances = activation_distances(logits, self.mavs_[labels], self.distance)
        fits = []
        for c in range(len(self.mavs_)):
            tail = np.sort(distances[labels == c])[-int(self.tail_size):]
            try:
                fits.append(weibull_fit_high(tail))
            except ValueError as err:
                raise ValueError(f"{self.name}: class {c} of {split_name(split)}: {err}; its statistics come "
                                 f"from {np.sum(labels == c)} fit samples") from err
        self.shapes_, self.scales_, self.shifts_ = (np.array(values) for values in zip(*fits))
        return self

    def score_samples(self, split) -> np.ndarray:
        check_fitted(self, "mavs_", "shapes_")
        logits = finite_logits(split, dtype=None)
        _check_classes(self.name, split, logits, len(self.mavs_))
        alpha = min(int(self.alpha), logits.shape[1])
        return rowwise_apply(lambda f: openmax_score(f, self.mavs_, self.shapes_, self.scales_, self.shifts_,
                                                     alpha, self.distance), logits)


# ---------------------------------------------------------------- GROOD

def grood_gradients(features: np.ndarray, prototypes: np.ndarray, ood_prototype: np.ndarray) -> np.ndarray:
    """GROOD's gradients (ElAraby et al., TMLR 2025, "GROOD: gradient-aware out-of-distribution
    detection"): the gradient, with respect to the OOD prototype p_0, of the nearest-prototype
    cross-entropy of v with its predicted class y,

        L = -log softmax_j(-||v - p_j||)_y over j in {classes, 0},
        g(v) = dL/dp_0 = q_0 (v - p_0) / ||v - p_0||,  q = softmax_j(-||v - p_j||),

    in closed form (OpenOOD's ``use_direct_grad``; y never is the OOD prototype, so g does not
    depend on it). The distances are taken from p_0, where the class distances come from one product.
    """
    centred, centres = features - ood_prototype, prototypes - ood_prototype
    squared = (np.einsum("nd,nd->n", centred, centred)[:, None] - 2.0 * centred @ centres.T
               + np.einsum("cd,cd->c", centres, centres)[None, :])
    ood_distance = np.linalg.norm(centred, axis=1)
    ood_probability = softmax_rows(-np.column_stack([np.sqrt(np.maximum(squared, 0.0)), ood_distance]))[:, -1]
    return centred * (ood_probability / np.maximum(ood_distance, NORM_FLOOR))[:, None]


@register
class GROOD(Method):
    """GROOD (ElAraby et al., TMLR 2025): class prototypes p_c (mean fit feature of each class) and an
    OOD prototype p_0 define a nearest-prototype softmax q = softmax_j(-||v - p_j||); its gradient
    with respect to p_0, g(v) = q_0 (v - p_0) / ||v - p_0||, embeds every sample, and
    S = -||g(v) - g_(k)||^2, the squared distance to the k-th nearest g of the correctly classified
    fit samples.

    From the cache the OOD prototype is the mean of the class prototypes (OpenOOD's ``use_proto_mean``):
    the paper's comes from synthetic OOD inputs through the network (OpenOOD's default: validation
    OOD images), which a cache-only method cannot see. ``k`` is the neighbour rank (OpenOOD's search
    always takes the first, whatever its k; its sweep is the grid). ``fit_fraction``: the seeded
    share of the correctly classified fit samples in the bank (at least 1,000 of them, or all, and at
    least k). OpenOOD indexes
    all of them (``sampling_ratio`` 1) in an approximate IVF index that compares each query with a
    few percent of the bank (nprobe 4 of up to 98 lists); the default here is an exact search over
    a seeded 1%, which costs about as much."""

    name = "grood"
    reads = ("features", "labels", "logits")
    grid = {"k": [1, 10, 20, 50, 100]}

    def __init__(self, k: int = 1, fit_fraction: float = 0.01, seed: int = 0):
        self.k = k
        self.fit_fraction = fit_fraction
        self.seed = seed

    def fit(self, split) -> "GROOD":
        logits = finite_logits(split)
        features = finite_features(split, len(logits))
        self.prototypes_ = _class_statistics(self.name, split, features, split.labels, logits.shape[1])[0]
        self.ood_prototype_ = self.prototypes_.mean(axis=0)
        correct = np.flatnonzero(_correctly_classified(split, logits))
        keep = correct[_bank_indices(self.name, len(correct), self.fit_fraction, self.seed, self.k)]
        self.bank_ = grood_gradients(features[keep], self.prototypes_, self.ood_prototype_)
        return self

    def score_samples(self, split) -> np.ndarray:
        check_fitted(self, "prototypes_", "bank_")
        features = finite_features(split, dtype=None)
        _check_dim(self.name, split, features, self.bank_.shape[1])
        gradients = rowwise_apply(lambda v: grood_gradients(v, self.prototypes_, self.ood_prototype_), features)
        return knn_score(gradients, self.bank_, int(self.k))
