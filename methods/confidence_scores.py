"""Confidence scores from the logits, some with state fit on the ID fit split: temperature scaling,
entropy, GEN, weighted energy (VOS) and pNML.

Each score is a pure function of a sample's own logits (pNML: its own feature and the head) and of
state learned in ``fit``, so batch composition does not matter; everything is float64. Where a
probability close to 1 enters through 1 - p (GEN, pNML), 1 - p of the top class is computed as the
sum of the other probabilities (``softmax_and_complement``): 1 - p itself rounds to 0 once the top
logit leads by more than about 37, and the confident ID samples would tie.

pytorch-ood 0.4.0 implements every one of them (TemperatureScaling, Entropy, GEN, WeightedEBO,
PNML) as outlier scores; tests/test_confidence_scores.py computes both on the same arrays, and
docs/methods.md records where the two differ and which follows the paper.
"""
from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import expit, log_expit
from scipy.stats import chi2

from methods.base import (
    Method,
    check_fitted,
    finite_features,
    finite_head,
    finite_logits,
    log_sum_exp,
    register,
    rowwise_apply,
    split_name,
)
from methods.distance_scores import class_means_and_tied_covariance, l2_normalise
from methods.logit_scores import msp
from methods.shaping_scores import linear_logits

log = logging.getLogger(__name__)
TEMPERATURE_BOUNDS = (1e-2, 1e2)  # the search interval of the fitted temperature
VOS_RIDGE = 1e-4  # VOS adds 1e-4 I to the class-conditional covariance before sampling
VOS_BATCH = 128  # VOS's CIFAR batch: each step's loss averages 128 ID samples and one outlier per class
# L-BFGS iterations of the post-hoc VOS fit: when the virtual outliers are separable the loss has
# no minimum (the weights grow without bound) and L-BFGS would run for thousands of iterations
VOS_ITERATIONS = 100


# ---------------------------------------------------------------- pure functions

def softmax_and_complement(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """p = softmax(f) and q = 1 - p per row, in float64. q of the top class is the sum of the other
    classes' shifted exponentials over their total, not 1 - p: no cancellation when p is near 1."""
    x = np.asarray(logits, np.float64)
    rows, top = np.arange(len(x)), x.argmax(axis=1)
    shifted = np.exp(x - x[rows, top][:, None])
    total = shifted.sum(axis=1)
    p = shifted / total[:, None]
    q = 1.0 - p
    shifted[rows, top] = 0.0
    q[rows, top] = shifted.sum(axis=1) / total
    return p, q


def temperature_nll(logits: np.ndarray, labels: np.ndarray, T: float) -> float:
    """Mean negative log-likelihood of softmax(f / T) at the true labels y:
    NLL(T) = mean_i [LSE(f_i / T) - f_{i,y_i} / T]."""
    def per_sample(f, y):
        return log_sum_exp(f / T) - np.take_along_axis(f, y.astype(np.intp), axis=1)[:, 0] / T
    return float(rowwise_apply(per_sample, logits, np.asarray(labels)[:, None]).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds=TEMPERATURE_BOUNDS) -> float:
    """Temperature scaling's T (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017):
    T = argmin_T NLL(T) (``temperature_nll``). NLL is convex in 1/T, so it has one minimum; it is
    found by bounded Brent search over log T in ``bounds``, to 1e-6 in log T."""
    result = minimize_scalar(lambda log_t: temperature_nll(logits, labels, np.exp(log_t)),
                             bounds=np.log(bounds), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(result.x))


def temperature_scaled_msp(logits: np.ndarray, T: float) -> np.ndarray:
    """Temperature-scaled MSP (Guo et al. 2017): S = max_c softmax(f / T)_c."""
    return msp(np.asarray(logits, np.float64) / T)


def negative_entropy(logits: np.ndarray) -> np.ndarray:
    """Negative predictive entropy: S = -H(p) = sum_c p_c log p_c, p = softmax(f), with
    log p = f - LSE(f) (exact where p underflows: p log p -> 0)."""
    log_p = np.asarray(logits, np.float64) - log_sum_exp(logits)[:, None]
    return (np.exp(log_p) * log_p).sum(axis=1)


def generalized_entropy(logits: np.ndarray, gamma: float = 0.1, M: int = 100) -> np.ndarray:
    """GEN (Liu, Lochman & Zach, "GEN: Pushing the Limits of Softmax-Based Out-of-Distribution
    Detection", CVPR 2023), negated so that higher = more ID:

        S = -sum_{j in top-M} p_j^gamma (1 - p_j)^gamma,  p = softmax(f),

    over the M largest probabilities (all C when M >= C), a sum as in the official code (the paper's
    G_gamma; pytorch-ood averages, a constant factor). Defaults gamma = 0.1, M = 100 (the paper's)."""
    p, q = softmax_and_complement(logits)
    n_classes = p.shape[1]
    m = min(M, n_classes)
    top = np.argpartition(p, n_classes - m, axis=1)[:, n_classes - m:]
    terms = np.take_along_axis(p, top, axis=1) * np.take_along_axis(q, top, axis=1)
    return -(terms ** gamma).sum(axis=1)


def weighted_energy(logits: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted energy (Du et al., "VOS: Learning What You Don't Know by Virtual Outlier Synthesis",
    ICLR 2022), negated: S = -E_w(x) = log sum_c w_c exp(f_c), w_c = max(weights_c, 0) (VOS
    applies a ReLU to its learned weights), computed as LSE(f + log w) with log 0 = -inf."""
    with np.errstate(divide="ignore"):
        log_w = np.log(np.maximum(np.asarray(weights, np.float64), 0.0))
    return log_sum_exp(np.asarray(logits, np.float64) + log_w)


def vos_virtual_outliers(means: np.ndarray, covariance: np.ndarray, per_class: int, sample_from: int,
                         rng: np.random.Generator) -> np.ndarray:
    """VOS's virtual outliers (Du et al. 2022, and its train_virtual.py): per class c, ``per_class`` times, the
    lowest-likelihood of ``sample_from`` draws from N(mu_c, Sigma + 1e-4 I); rows class by class.

    The density of x = mu + L z (L L^T = Sigma + 1e-4 I, z ~ N(0, I_D)) depends on ||z|| alone, so the
    least likely of n draws has a uniform direction and a squared radius distributed as the largest
    of n chi^2_D draws, which is drawn exactly by inverting the CDF of that maximum:
    r^2 = chi2.isf(1 - U^(1/n), D). The same distribution as VOS's n draws and top-1, without them."""
    n_classes, dim = means.shape
    factor = np.linalg.cholesky(covariance + VOS_RIDGE * np.eye(dim))
    directions = rng.standard_normal((n_classes * per_class, dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    tail = -np.expm1(np.log(rng.uniform(size=n_classes * per_class)) / sample_from)  # 1 - U^(1/n)
    radii = np.sqrt(chi2.isf(tail, dim))
    return np.repeat(means, per_class, axis=0) + (radii[:, None] * directions) @ factor.T


def fit_vos_weights(id_logits: np.ndarray, outlier_logits: np.ndarray) -> tuple[np.ndarray, float, float]:
    """VOS's uncertainty loss with the network frozen: the class weights w = exp(theta) and the
    logistic regression phi(s) = a s + c on s = -E_w = LSE(f + theta), fit by L-BFGS to

        L = [B mean_ID softplus(-phi(s)) + C mean_outliers softplus(phi(s))] / (B + C),

    VOS's cross-entropy (ID label 1, outliers 0) with its per-step proportion of B = 128 ID samples
    to one outlier per class. w = exp(theta) keeps the weights positive (VOS: ReLU); the start is
    w = 1 (the plain energy), a = 1, c = 0; at most 100 L-BFGS iterations (``VOS_ITERATIONS``).
    Returns (w, a, c)."""
    n_classes = id_logits.shape[1]
    logits = np.concatenate([id_logits, outlier_logits]).astype(np.float64)
    is_id = np.r_[np.ones(len(id_logits)), np.zeros(len(outlier_logits))]
    weight = np.where(is_id == 1, VOS_BATCH / len(id_logits), n_classes / len(outlier_logits)) / (VOS_BATCH + n_classes)

    def loss_and_gradient(params):
        theta, a, c = params[:n_classes], params[-2], params[-1]
        shifted = logits + theta
        peak = shifted.max(axis=1)
        exps = np.exp(shifted - peak[:, None], out=shifted)  # one pass for s and ds/dtheta = softmax
        total = exps.sum(axis=1)
        s = peak + np.log(total)
        z = a * s + c
        loss = -(weight * np.where(is_id == 1, log_expit(z), log_expit(-z))).sum()
        dz = weight * (expit(z) - is_id)
        gradient = np.r_[a * ((dz / total) @ exps), dz @ s, dz.sum()]
        return loss, gradient

    start = np.r_[np.zeros(n_classes), 1.0, 0.0]
    result = minimize(loss_and_gradient, start, jac=True, method="L-BFGS-B", options={"maxiter": VOS_ITERATIONS})
    return np.exp(result.x[:n_classes]), float(result.x[-2]), float(result.x[-1])


def pnml_gram_pinv(features: np.ndarray) -> np.ndarray:
    """pNML's (X^T X)^+ (Bibas, Feder & Hassner, "Single Layer Predictive Normalized Maximum
    Likelihood for Out-of-Distribution Detection", NeurIPS 2021): X holds the L2-normalised fit
    features as rows; the official code inverts X^T X, or pseudo-inverts it when it is singular."""
    x = l2_normalise(np.asarray(features, np.float64))
    return np.linalg.pinv(x.T @ x, hermitian=True)


def pnml_regret(features: np.ndarray, W: np.ndarray, b: np.ndarray, gram_pinv: np.ndarray) -> np.ndarray:
    """pNML regret (Bibas et al. 2021; the official code's calc_regrets) of each sample, in [0, 1]:

        x = v / ||v||,  kappa = x^T (X^T X)^+ x / (1 + x^T (X^T X)^+ x),  p = softmax(W x + b),
        Gamma = log sum_c p_c / (p_c + p_c^kappa (1 - p_c)) / log C,

    the head applied to the normalised feature, as in the official code. Each term is computed as
    1 / (1 + (1 - p_c) exp((kappa - 1) log p_c)), finite where p_c underflows (the term -> 0)."""
    x = l2_normalise(np.asarray(features, np.float64))
    projection = np.einsum("nd,nd->n", x @ gram_pinv, x)
    kappa = projection / (1.0 + projection)
    logits = linear_logits(x, W, b)
    log_p = logits - log_sum_exp(logits)[:, None]
    _, q = softmax_and_complement(logits)
    with np.errstate(over="ignore"):
        terms = 1.0 / (1.0 + q * np.exp((kappa[:, None] - 1.0) * log_p))
    return np.log(terms.sum(axis=1)) / np.log(logits.shape[1])


# ---------------------------------------------------------------- split helpers

def _fit_labels(method: str, split, n_rows: int, n_classes: int) -> np.ndarray:
    """The fit split's labels, checked: integers in [0, C), one per row."""
    labels = np.asarray(split.labels)
    if labels.shape != (n_rows,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{method}: fit split {split_name(split)} needs one integer label per row, got "
                         f"{labels.dtype} of shape {labels.shape} for {n_rows} rows")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"{method}: fit split {split_name(split)} has labels in [{labels.min()}, {labels.max()}], "
                         f"outside the {n_classes} classes of its logits")
    return labels


def _fit_rows(n: int, fit_samples: int, seed: int) -> np.ndarray:
    """Sorted indices of ``fit_samples`` rows drawn without replacement with default_rng(seed) (all
    rows when fit_samples is 0 or at least n)."""
    if int(fit_samples) != fit_samples or fit_samples < 0:
        raise ValueError(f"fit_samples must be an integer >= 0 (0: all rows), got {fit_samples}")
    if not 0 < fit_samples < n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:int(fit_samples)])


# ---------------------------------------------------------------- methods

@register
class TemperatureScaling(Method):
    """Temperature scaling (Guo et al. 2017): S = max_c softmax(f / T)_c, with T fit on the ID fit
    split by minimising the NLL of the true labels (``fit_temperature``), on ``fit_samples`` seeded
    rows (0: all; Guo et al. fit on held-out sets of 5,000 to 25,000 images), searched in [0.01, 100].

    On a split the network has memorised, the NLL keeps falling as T falls and T ends at or near
    0.01 (logged); the paper fits on held-out data, and the benchmark's ID fit split is training data.
    """

    name = "tempscale"
    reads = ("logits", "labels")

    def __init__(self, fit_samples: int = 25000, seed: int = 0):
        self.fit_samples = fit_samples
        self.seed = seed

    def fit(self, split) -> "TemperatureScaling":
        logits = finite_logits(split, dtype=None)
        labels = _fit_labels(self.name, split, len(logits), logits.shape[1])
        rows = _fit_rows(len(logits), self.fit_samples, self.seed)
        self.T_ = fit_temperature(logits[rows], labels[rows])
        if not TEMPERATURE_BOUNDS[0] * 1.001 < self.T_ < TEMPERATURE_BOUNDS[1] / 1.001:
            log.warning("tempscale on %s: T = %.4g is at the search bound %s: the NLL falls all the way "
                        "(T -> 0: the network separates its fit split; T -> inf: its logits do not predict "
                        "the labels)", split_name(split), self.T_, TEMPERATURE_BOUNDS)
        return self

    def score_samples(self, split) -> np.ndarray:
        check_fitted(self, "T_")
        return rowwise_apply(lambda f: temperature_scaled_msp(f, self.T_), finite_logits(split, dtype=None))


@register
class Entropy(Method):
    """Negative predictive entropy: S = sum_c p_c log p_c, p = softmax(f) (the entropy score of
    pytorch-ood's Entropy, after Chan et al., ICCV 2021)."""

    name = "entropy"

    def score_samples(self, split) -> np.ndarray:
        return rowwise_apply(negative_entropy, finite_logits(split, dtype=None))


@register
class GEN(Method):
    """GEN (Liu et al., CVPR 2023): S = -sum over the M largest p_j of p_j^gamma (1 - p_j)^gamma,
    p = softmax(f); gamma = 0.1 and M = 100 (capped at the number of classes), the paper's defaults."""

    name = "gen"
    # OpenOOD's GEN sweep (the paper's ablation), with M = 5 first so that small label spaces
    # (M >= C gives the same score for every M) see two different settings
    grid = {"gamma": [0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0], "M": [5, 10, 50, 100, 200, 500, 1000]}

    def __init__(self, gamma: float = 0.1, M: int = 100):
        self.gamma = gamma
        self.M = M

    def score_samples(self, split) -> np.ndarray:
        if not self.gamma > 0:
            raise ValueError(f"gen: gamma must be > 0, got {self.gamma}")
        if int(self.M) != self.M or self.M < 1:
            raise ValueError(f"gen: M must be an integer >= 1, got {self.M}")
        return rowwise_apply(lambda f: generalized_entropy(f, self.gamma, int(self.M)),
                             finite_logits(split, dtype=None))


@register
class WeightedEnergy(Method):
    """Weighted energy (VOS, Du et al., ICLR 2022): S = phi(log sum_c w_c exp(f_c)), phi(s) = a s + c,
    the logit of VOS's test-time uncertainty branch sigmoid(phi(-E_w)).

    VOS learns w and phi while it trains the network. From the cache they are fit post hoc with the
    network frozen (``fit_vos_weights``): VOS's loss on the logits of ``fit_samples`` seeded fit rows
    (0: all) against ``per_class`` virtual outliers per class, each the least likely of
    ``sample_from`` draws from the class-conditional Gaussian of the fit features (class means,
    tied covariance + 1e-4 I; ``vos_virtual_outliers``), put through the head. When a > 0 the
    ranking is that of -E_w, pytorch-ood's WeightedEBO with the fitted weights.
    """

    name = "weighted_energy"
    reads = ("logits", "features", "head", "labels")
    grid = {"sample_from": [1000, 10000, 100000], "per_class": [10, 50, 100]}

    def __init__(self, sample_from: int = 10000, per_class: int = 10, fit_samples: int = 10000, seed: int = 0):
        self.sample_from = sample_from
        self.per_class = per_class
        self.fit_samples = fit_samples
        self.seed = seed

    def fit(self, split) -> "WeightedEnergy":
        for name in ("sample_from", "per_class"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ValueError(f"{self.name}: {name} must be an integer >= 1, got {value}")
        logits = finite_logits(split, dtype=None)
        features = finite_features(split, len(logits))
        W, b = finite_head(split, features.shape[1])
        labels = _fit_labels(self.name, split, len(logits), logits.shape[1])
        try:
            means, covariance = class_means_and_tied_covariance(features, labels, logits.shape[1])
        except ValueError as err:
            raise ValueError(f"{self.name}: fit split {split_name(split)}: {err}") from err
        outliers = vos_virtual_outliers(means, covariance, int(self.per_class), int(self.sample_from),
                                        np.random.default_rng(self.seed))
        rows = _fit_rows(len(logits), self.fit_samples, self.seed)
        self.weights_, self.a_, self.c_ = fit_vos_weights(logits[rows], linear_logits(outliers, W, b))
        if not self.a_ > 0:
            log.warning("weighted_energy on %s: the fitted slope a = %.4g <= 0: the virtual outliers have "
                        "the larger -E_w, so the score ranks against the weighted energy",
                        split_name(split), self.a_)
        return self

    def score_samples(self, split) -> np.ndarray:
        check_fitted(self, "weights_", "a_", "c_")
        return rowwise_apply(lambda f: self.a_ * weighted_energy(f, self.weights_) + self.c_,
                             finite_logits(split, dtype=None))


@register
class PNML(Method):
    """pNML (Bibas et al., NeurIPS 2021): S = -Gamma, the negated regret of the single-layer pNML
    learner (``pnml_regret``), from the head applied to the L2-normalised feature and (X^T X)^+ of
    the normalised fit features. Parameter-free."""

    name = "pnml"
    reads = ("features", "head", "logits")  # logits: predictions (the unnormalised head, the network's)

    def fit(self, split) -> "PNML":
        self.gram_pinv_ = pnml_gram_pinv(finite_features(split))
        return self

    def score_samples(self, split) -> np.ndarray:
        check_fitted(self, "gram_pinv_")
        features = finite_features(split, dtype=None)
        if features.shape[1] != self.gram_pinv_.shape[0]:
            raise ValueError(f"pnml: {split_name(split)} has {features.shape[1]}-dim features but the method was "
                             f"fit on {self.gram_pinv_.shape[0]}-dim features")
        W, b = finite_head(split, features.shape[1])
        return -rowwise_apply(lambda v: pnml_regret(v, W, b, self.gram_pinv_), features)
