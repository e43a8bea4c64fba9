"""Scores computed from the logits alone: MSP, MaxLogit, Energy."""
from __future__ import annotations

import numpy as np

from methods.base import Method, finite_logits, log_sum_exp, register, rowwise_apply, softmax_rows


def msp(logits: np.ndarray) -> np.ndarray:
    """Maximum softmax probability (Hendrycks & Gimpel 2017): S = max_c softmax(f)_c."""
    return softmax_rows(logits).max(axis=1)


def max_logit(logits: np.ndarray) -> np.ndarray:
    """MaxLogit (Hendrycks et al. 2022, the form of ViM's benchmark): S = max_c f_c."""
    return logits.max(axis=1)


def energy(logits: np.ndarray, T: float = 1.0) -> np.ndarray:
    """Negative energy (Liu et al. 2020): S = -E(x) = T * log sum_c exp(f_c / T), computed stably."""
    return T * log_sum_exp(np.asarray(logits, np.float64) / T)


@register
class MSP(Method):
    """Maximum softmax probability baseline."""

    name = "msp"

    def score_samples(self, split) -> np.ndarray:
        return rowwise_apply(msp, finite_logits(split, dtype=None))


@register
class MaxLogit(Method):
    """Largest logit."""

    name = "maxlogit"

    def score_samples(self, split) -> np.ndarray:
        return rowwise_apply(max_logit, finite_logits(split, dtype=None))


@register
class Energy(Method):
    """Energy score at temperature T (the ReAct/DICE/ASH/UM default T = 1)."""

    name = "energy"
    grid = {"T": [0.5, 1.0, 2.0, 5.0, 10.0, 100.0, 1000.0]}

    def __init__(self, T: float = 1.0):
        self.T = T

    def score_samples(self, split) -> np.ndarray:
        if not self.T > 0:
            raise ValueError(f"energy: temperature T must be > 0, got {self.T}")
        return rowwise_apply(lambda logits: energy(logits, self.T), finite_logits(split, dtype=None))
