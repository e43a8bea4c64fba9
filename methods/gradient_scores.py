"""Gradient-based scores: GradNorm, RG ("ReActivate GradNorm", multiplicative and additive) and the
U*V ablation variants of RG Table 2 (METHODS.md sections 1.9 and 1.10).

Every score is a closed form of the logits f and the penultimate features v (no backward pass), so
it is computed per sample and batch composition does not matter (to the tolerance that
``methods.base`` states). RG has no public code; it follows the paper text.
"""
from __future__ import annotations

import logging

import numpy as np

from methods.base import (
    Method,
    check_fitted,
    finite_features,
    finite_logits,
    register,
    rowwise_apply,
    softmax_rows,
    split_name,
)
from methods.logit_scores import energy

log = logging.getLogger(__name__)
CLIP_GRID = [0.1, 0.3, 0.5, 0.7, 1.0, 2.0, 3.0, 5.0]  # clip values k of the RG paper's Table 3


# ---------------------------------------------------------------- pure functions

def feature_l1(features: np.ndarray) -> np.ndarray:
    """GradNorm's V term (Huang et al. 2021; RG paper's "GN-V"): V = ||v||_1 = sum_j |v_j|."""
    return np.abs(features).sum(axis=1)


def clipped_feature_sum(features: np.ndarray, k: float) -> np.ndarray:
    """RG's clipped V term (RG, Eq. 8): V_k = sum_j min(v_j, k). Negative v_j are kept as they are
    (RG assumes non-negative post-ReLU features)."""
    return np.minimum(features, k).sum(axis=1)


def gradnorm_u(logits: np.ndarray, T: float = 1.0) -> np.ndarray:
    """GradNorm's U term (Huang et al. 2021; RG paper's "GN-U"): U = sum_c |1/C - p_c|,
    p = softmax(f / T)."""
    n_classes = logits.shape[1]
    return np.abs(1.0 / n_classes - softmax_rows(logits / T)).sum(axis=1)


def gradnorm(logits: np.ndarray, features: np.ndarray, T: float = 1.0) -> np.ndarray:
    """GradNorm (Huang et al. 2021) in closed form: the entrywise L1 norm of dL/dW for the official
    loss L = sum_c -log softmax(f/T)_c, with f = W v + b:
    S = (1/T) * [sum_c |C p_c - 1|] * [sum_j |v_j|] = (C/T) * U * V, p = softmax(f/T).
    The constant C/T is kept so the values equal the official (batch size 1) code."""
    n_classes = logits.shape[1]
    p = softmax_rows(logits / T)
    return np.abs(n_classes * p - 1.0).sum(axis=1) * feature_l1(features) / T


def rg_multiplicative(logits: np.ndarray, features: np.ndarray, k: float = 1.0, T: float = 1.0) -> np.ndarray:
    """RG, multiplicative (ReActivate GradNorm, Eq. 8): S = [T log sum_c exp(f_c/T)] * [sum_j min(v_j, k)],
    with the unclipped logits f. Misranks samples whose LSE <= 0 (larger V lowers their score)."""
    return energy(logits, T) * clipped_feature_sum(features, k)


def rg_additive(logits: np.ndarray, features: np.ndarray, k: float, alpha: float) -> np.ndarray:
    """RG, additive (ReActivate GradNorm, Eq. 12): S = LSE_1(f) + alpha * sum_j min(v_j, k)."""
    return energy(logits, 1.0) + alpha * clipped_feature_sum(features, k)


def rg_alpha_s(logits: np.ndarray, features: np.ndarray, k: float) -> float:
    """RG's additive scale (ReActivate GradNorm, Eq. 12): alpha_s = std(LSE_1(f)) / std(sum_j min(v_j, k)),
    population standard deviations over the given (ID fit) samples, so both terms get equal spread."""
    clipped_std = float(np.std(clipped_feature_sum(features, k)))
    if not clipped_std > 0:
        raise ValueError(f"std of sum_j min(v_j, k={k}) is {clipped_std} on {len(features)} fit samples, "
                         "so alpha_s = std(LSE) / std(clipped sum) is undefined; the features are constant "
                         "(or all >= k) on the fit sample - check the features or choose another k")
    return float(np.std(energy(logits, 1.0))) / clipped_std


def igoe(logits: np.ndarray, features: np.ndarray) -> np.ndarray:
    """"Conor Igoe" score (RG Table 2, "LSE * GN-V"; RG with k -> infinity): S = LSE_1(f) * ||v||_1."""
    return energy(logits, 1.0) * feature_l1(features)


def gradnorm_u_clipped_v(logits: np.ndarray, features: np.ndarray, k: float = 1.0) -> np.ndarray:
    """RG Table 2 ablation "GN-U * clipped V": S = [sum_c |1/C - p_c|] * [sum_j min(v_j, k)], p = softmax(f)."""
    return gradnorm_u(logits, 1.0) * clipped_feature_sum(features, k)


def nonpositive_lse_fraction(logits: np.ndarray, T: float = 1.0) -> float:
    """Fraction of samples with LSE_T(f) <= 0, where a multiplicative LSE * V score misranks (RG 1.10)."""
    return float(np.mean(rowwise_apply(lambda f: energy(f, T), logits) <= 0)) if len(logits) else 0.0


# ---------------------------------------------------------------- validation helpers

def _logits_and_features(split) -> tuple[np.ndarray, np.ndarray]:
    """Logits and features as stored (checked), for ``rowwise_apply``."""
    logits = finite_logits(split, dtype=None)
    return logits, finite_features(split, len(logits), dtype=None)


def _check_positive(method: str, name: str, value: float) -> None:
    if not value > 0:  # also rejects NaN
        raise ValueError(f"{method}: {name} must be > 0, got {value}")


def _log_nonpositive_lse(method: str, split, fraction: float) -> None:
    name = split_name(split)
    if fraction > 0:
        log.warning("%s on %s: %.4g of samples have LSE <= 0, where the multiplicative score misranks "
                    "(larger features lower their score)", method, name, fraction)
    else:
        log.info("%s on %s: no sample has LSE <= 0", method, name)


# ---------------------------------------------------------------- registered methods

@register
class GradNorm(Method):
    """GradNorm in closed form (L1 norm of the last-layer weight gradient of the all-ones-target loss)."""

    name = "gradnorm"
    reads = ("logits", "features")
    grid = {"T": [1.0]}

    def __init__(self, T: float = 1.0):
        self.T = T

    def score_samples(self, split) -> np.ndarray:
        _check_positive(self.name, "temperature T", self.T)
        return rowwise_apply(lambda f, v: gradnorm(f, v, self.T), *_logits_and_features(split))


@register
class RG(Method):
    """RG, multiplicative: LSE_T(f) * sum_j min(v_j, k), unclipped logits.

    ``score_samples`` sets ``last_nonpositive_lse_fraction_`` (and logs it): the fraction of the scored
    split's samples with LSE_T <= 0, where this form misranks.
    """

    name = "rg"
    reads = ("logits", "features")
    grid = {"k": CLIP_GRID, "T": [0.5, 1.0, 2.0, 4.0, 8.0]}

    def __init__(self, k: float = 1.0, T: float = 1.0):
        self.k = k
        self.T = T

    def score_samples(self, split) -> np.ndarray:
        _check_positive(self.name, "clip value k", self.k)
        _check_positive(self.name, "temperature T", self.T)
        logits, features = _logits_and_features(split)
        self.last_nonpositive_lse_fraction_ = nonpositive_lse_fraction(logits, self.T)
        _log_nonpositive_lse(self.name, split, self.last_nonpositive_lse_fraction_)
        return rowwise_apply(lambda f, v: rg_multiplicative(f, v, self.k, self.T), logits, features)


@register
class RGAdditive(Method):
    """RG, additive: LSE_1(f) + gamma * alpha_s * sum_j min(v_j, k).

    ``fit`` computes ``alpha_s_`` (std ratio) on ``n_fit`` fit samples drawn without replacement with
    ``numpy.random.default_rng(seed)`` (all samples if fewer), and ``alpha_ = gamma * alpha_s_``.
    """

    name = "rg_add"
    reads = ("logits", "features")
    grid = {"gamma": [0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.2]}

    def __init__(self, k: float = 1.0, gamma: float = 0.5, n_fit: int = 1000, seed: int = 0):
        self.k = k
        self.gamma = gamma
        self.n_fit = n_fit
        self.seed = seed

    def fit(self, split) -> "RGAdditive":
        _check_positive(self.name, "clip value k", self.k)
        if not (np.isfinite(self.gamma) and self.gamma >= 0):
            raise ValueError(f"{self.name}: gamma must be finite and >= 0, got {self.gamma}")
        if int(self.n_fit) != self.n_fit or self.n_fit < 2:
            raise ValueError(f"{self.name}: n_fit must be an integer >= 2, got {self.n_fit}")
        logits, features = _logits_and_features(split)
        n = len(logits)
        if n < 2:
            raise ValueError(f"{split_name(split)}: rg_add needs at least 2 fit samples, got {n}")
        if n > self.n_fit:
            rows = np.random.default_rng(self.seed).choice(n, size=int(self.n_fit), replace=False)
            logits, features = logits[rows], features[rows]
        self.alpha_s_ = rg_alpha_s(np.asarray(logits, np.float64), np.asarray(features, np.float64), self.k)
        self.alpha_ = self.gamma * self.alpha_s_
        return self

    def score_samples(self, split) -> np.ndarray:
        check_fitted(self, "alpha_")
        return rowwise_apply(lambda f, v: rg_additive(f, v, self.k, self.alpha_), *_logits_and_features(split))


@register
class Igoe(Method):
    """"Conor Igoe" score, LSE_1(f) * ||v||_1 (RG Table 2; rg with k -> infinity).

    ``score_samples`` sets and logs ``last_nonpositive_lse_fraction_`` as ``rg`` does.
    """

    name = "igoe"
    reads = ("logits", "features")

    def score_samples(self, split) -> np.ndarray:
        logits, features = _logits_and_features(split)
        self.last_nonpositive_lse_fraction_ = nonpositive_lse_fraction(logits, 1.0)
        _log_nonpositive_lse(self.name, split, self.last_nonpositive_lse_fraction_)
        return rowwise_apply(igoe, logits, features)


@register
class GradNormUClippedV(Method):
    """RG Table 2 ablation: GradNorm's U times RG's clipped V."""

    name = "gradnorm_u_clipped_v"
    reads = ("logits", "features")
    grid = {"k": CLIP_GRID}

    def __init__(self, k: float = 1.0):
        self.k = k

    def score_samples(self, split) -> np.ndarray:
        _check_positive(self.name, "clip value k", self.k)
        return rowwise_apply(lambda f, v: gradnorm_u_clipped_v(f, v, self.k), *_logits_and_features(split))


@register
class ClippedV(Method):
    """RG Table 2 ablation "1 * clipped V": sum_j min(v_j, k) alone (predictions from the logits)."""

    name = "clipped_v"
    reads = ("logits", "features")
    grid = {"k": CLIP_GRID}

    def __init__(self, k: float = 1.0):
        self.k = k

    def score_samples(self, split) -> np.ndarray:
        _check_positive(self.name, "clip value k", self.k)
        _, features = _logits_and_features(split)
        return rowwise_apply(lambda v: clipped_feature_sum(v, self.k), features)
