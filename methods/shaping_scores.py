"""Feature-shaping scores computed from the cache: ReAct, DICE (and DICE+ReAct), ASH-P/B/S/RAND
(METHODS.md sections 1.6, 1.7, 1.8), SCALE (ASH-S's scaling without pruning) and VRA (a piecewise
rectification with thresholds at two ID percentiles).

Each method changes the penultimate features v (or the head weights) before the linear head,
recomputes the logits from the cached head, f' = W' v' + b, and scores S = LSE_1(f'). ``predict``
returns the argmax of these shaped logits (ID accuracy is measured on the modified network, §0).
All arithmetic is float64 and per sample, and no function modifies its inputs.
"""
from __future__ import annotations

import numpy as np

from methods.base import BLOCK_ROWS, Method, check_fitted, finite_features, finite_head, register
from methods.logit_scores import energy

REACT_GRID = [80.0, 85.0, 90.0, 95.0, 99.0]
DICE_GRID = [10.0, 30.0, 50.0, 70.0, 90.0]
ASH_GRID = [60.0, 65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0, 99.0]
SCALE_GRID = [50.0, 55.0, 60.0, 65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0, 97.0, 99.0]  # the official sweep


# ---------------------------------------------------------------- pure functions

def check_percentile(method: str, name: str, p: float) -> None:
    if not (np.isfinite(p) and 0.0 <= p <= 100.0):
        raise ValueError(f"{method}: {name} must be a percentile in [0, 100], got {p}")


def linear_logits(features: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The linear head in float64: f = v W^T + b, rows are samples."""
    return np.asarray(features, np.float64) @ np.asarray(W, np.float64).T + np.asarray(b, np.float64)


def react_threshold(features: np.ndarray, p: float = 90.0) -> float:
    """ReAct clip value (Sun et al. 2021): c = p-th percentile (numpy linear interpolation) of the
    flattened ID feature matrix (all samples x all units)."""
    return float(np.percentile(np.asarray(features, np.float64).ravel(), p))


def react_clip(features: np.ndarray, c: float) -> np.ndarray:
    """ReAct rectification (Sun et al. 2021): v_bar = min(v, c) elementwise (clip above only)."""
    return np.minimum(np.asarray(features, np.float64), c)


def react_logits(features: np.ndarray, W: np.ndarray, b: np.ndarray, c: float) -> np.ndarray:
    """ReAct logits: f_bar = W min(v, c) + b."""
    return linear_logits(react_clip(features, c), W, b)


def dice_mask(W: np.ndarray, mean_feature: np.ndarray, p: float = 90.0) -> np.ndarray:
    """DICE mask (Sun & Li 2022): contributions V = W * v_bar[None, :] (C x D); one global threshold
    tau = p-th percentile of all C*D entries of V (numpy linear interpolation); M = 1[V > tau]
    (strict). Different classes may keep different numbers of weights."""
    V = np.asarray(W, np.float64) * np.asarray(mean_feature, np.float64)[None, :]
    tau = np.percentile(V.ravel(), p)
    return V > tau


def dice_head(W: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The DICE-masked weights M * W (float64)."""
    return np.where(mask, np.asarray(W, np.float64), 0.0)


def dice_logits(features: np.ndarray, W: np.ndarray, b: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """DICE logits: f = (M * W) v + b (the bias is untouched)."""
    return linear_logits(features, dice_head(W, mask), b)


def dice_react_logits(features: np.ndarray, W: np.ndarray, b: np.ndarray, mask: np.ndarray, c: float) -> np.ndarray:
    """DICE+ReAct logits (DICE's ResNet order: pool -> clip -> masked FC): f = (M * W) min(v, c) + b."""
    return dice_logits(react_clip(features, c), W, b, mask)


def ash_keep_count(n: int, p: float) -> int:
    """Number of entries ASH keeps per sample: k = n - round(n * p / 100), Python round (half to even)."""
    return int(n - round(n * p / 100.0))


def _ash_top(features: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray, int]:
    """(float64 copy of the features, boolean mask of the top-k values per row, k). Ties are broken
    arbitrarily by np.argpartition; pruning is by value (not magnitude), so negatives go first."""
    x = np.array(features, dtype=np.float64, copy=True)
    if x.ndim != 2:
        raise ValueError(f"ASH expects 2-D (N, n) features, got shape {x.shape}")
    n = x.shape[1]
    k = ash_keep_count(n, p)
    keep = np.zeros(x.shape, dtype=bool)
    if k > 0 and len(x):
        top = np.argpartition(x, n - k, axis=1)[:, n - k:]
        np.put_along_axis(keep, top, True, axis=1)
    return x, keep, k


def ash_p(features: np.ndarray, p: float = 60.0) -> np.ndarray:
    """ASH-P (Djurisic et al. 2023, "Extremely simple activation shaping"): per sample keep the top-k
    values, k = n - round(n p / 100), and set the rest to 0. k = 0 gives all zeros. Default p = 60,
    the paper's ASH-P@60 (ImageNet)."""
    x, keep, _ = _ash_top(features, p)
    return np.where(keep, x, 0.0)


def ash_b(features: np.ndarray, p: float = 65.0) -> np.ndarray:
    """ASH-B (Djurisic et al. 2023): s1 = sum of all n entries before pruning; kept entries become
    s1 / k, the rest 0. k = 0 gives all zeros."""
    x, keep, k = _ash_top(features, p)
    if k == 0:
        return np.zeros_like(x)
    s1 = x.sum(axis=1, keepdims=True)
    return np.where(keep, s1 / k, 0.0)


def _ash_scale(x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """ASH-S's and SCALE's factor per row, exp(s1 / s2) (N, 1): s1 = the sum of all n entries, s2 =
    the sum of the kept top-k entries; s2 == 0 (e.g. an all-zero sample, or k = 0) gives 1."""
    s1 = x.sum(axis=1, keepdims=True)
    s2 = np.where(keep, x, 0.0).sum(axis=1, keepdims=True)
    safe = s2 != 0
    with np.errstate(over="ignore"):
        return np.where(safe, np.exp(np.divide(s1, s2, out=np.zeros_like(s1), where=safe)), 1.0)


def ash_s(features: np.ndarray, p: float = 90.0) -> np.ndarray:
    """ASH-S (Djurisic et al. 2023): s1 = sum of all n entries before pruning, s2 = sum of the kept
    top-k entries; kept a_i <- a_i * exp(s1 / s2), the rest 0 (the algorithm and code use exp, not the
    plain ratio). Guards: k = 0 gives zeros; s2 == 0 (e.g. an all-zero sample) uses scale 1."""
    x, keep, k = _ash_top(features, p)
    if k == 0:
        return np.zeros_like(x)
    return np.where(keep, x * _ash_scale(x, keep), 0.0)


def scale_shaping(features: np.ndarray, p: float = 85.0) -> np.ndarray:
    """SCALE (Xu, Chen, Franchi & Yao, "Scaling for Training Time and Post-hoc Out-of-distribution
    Detection Enhancement", ICLR 2024): ASH-S's factor without its pruning, v <- v * exp(s1 / s2),
    s1 = sum of all n entries, s2 = sum of the top k = n - round(n p / 100) entries (as in ASH). Every
    entry is kept. Default p = 85, the official config's. s2 == 0 (an all-zero sample, or p = 100)
    uses scale 1."""
    x, keep, _ = _ash_top(features, p)
    return x * _ash_scale(x, keep)


def vra_thresholds(features: np.ndarray, p_low: float, p_high: float,
                   per_unit: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """VRA's thresholds (alpha, beta): the p_low-th and p_high-th percentiles (numpy linear
    interpolation) of the ID features, per unit over the samples (the official code's
    torch.quantile(..., dim=0)), or of all entries jointly with ``per_unit=False`` (OpenOOD's)."""
    x = np.asarray(features, np.float64)
    low, high = np.percentile(x if per_unit else x.reshape(-1, 1), [p_low, p_high], axis=0)
    return low, high


def vra_rectify(features: np.ndarray, alpha: np.ndarray, beta: np.ndarray, gamma: float = 0.6) -> np.ndarray:
    """VRA's piecewise rectification (Xu, Lian, Liu & Tao, "VRA: Variational Rectified Activation for
    Out-of-distribution Detection", NeurIPS 2023; the official code's ``clip2``), elementwise:

        g(z) = 0 if z < alpha;  z + gamma if alpha <= z <= beta;  beta if z > beta.

    It suppresses abnormally low and high activations and raises the middle ones by gamma (gamma = 0:
    the plain "VRA" of the official README)."""
    z = np.asarray(features, np.float64)
    return np.where(z < alpha, 0.0, np.where(z > beta, beta, z + gamma))


_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment, 2^64 / golden ratio


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele, Lea & Flood 2014) on a uint64 array, wrapping arithmetic:
    a bijective mix whose outputs for consecutive multiples of the golden increment are uniform."""
    x = x ^ (x >> 30)
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> 27)
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> 31)


def _row_keys(x: np.ndarray, seed: int) -> np.ndarray:
    """One 64-bit key per row, a function of (seed, the row's float64 bytes) only: the row's bits
    folded as sum_j bits_j * a_j mod 2^64 with odd per-column constants a_j (a multiplicative hash),
    then mixed with the seed."""
    bits = np.ascontiguousarray(x, np.float64).view(np.uint64)
    columns = np.arange(1, bits.shape[1] + 1, dtype=np.uint64)
    coefficients = _splitmix64(columns * np.uint64(_GOLDEN)) | np.uint64(1)
    folded = (bits * coefficients).sum(axis=1, dtype=np.uint64)
    seed_key = _splitmix64(np.array([int(seed) % 2**64], dtype=np.uint64))
    return _splitmix64(folded ^ seed_key)


def ash_rand(features: np.ndarray, p: float = 65.0, seed: int = 0) -> np.ndarray:
    """ASH-RAND (Djurisic et al. 2023): kept top-k entries are replaced by U(0, 10) draws, the rest 0.
    For batch independence the draws are a counter-based stream per sample: entry j of a row draws
    splitmix64(key + (j + 1) * golden), with the key a hash of (``seed``, the row's float64 bytes)
    (``_row_keys``), so the same sample gets the same values in any batch, order or split; the top
    53 bits give the uniform. k = 0 gives all zeros."""
    x, keep, k = _ash_top(features, p)
    out = np.zeros_like(x)
    if k == 0 or not len(x):
        return out
    rows, columns = np.nonzero(keep)
    draws = _splitmix64(_row_keys(x, seed)[rows] + (columns + 1).astype(np.uint64) * np.uint64(_GOLDEN))
    out[rows, columns] = (draws >> 11) * (10.0 / 2**53)
    return out


def ash_logits(features: np.ndarray, W: np.ndarray, b: np.ndarray, variant: str, p: float,
               seed: int = 0) -> np.ndarray:
    """Logits after ASH at the penultimate layer: f = W ash(v) + b, variant in {p, b, s, rand}."""
    if variant == "rand":
        shaped = ash_rand(features, p, seed)
    elif variant in ASH_VARIANTS:
        shaped = ASH_VARIANTS[variant](features, p)
    else:
        raise ValueError(f"unknown ASH variant {variant!r}; expected one of p, b, s, rand")
    return linear_logits(shaped, W, b)


ASH_VARIANTS = {"p": ash_p, "b": ash_b, "s": ash_s}


# ---------------------------------------------------------------- split helpers

class _Shaping(Method):
    """Shared score_samples/predict: subclasses implement ``_block_logits(features, W, b)``, the shaped
    logits of a float64 block of rows; splits are shaped ``BLOCK_ROWS`` rows at a time, so the
    temporaries stay block-sized however large the split. The cached logits are never read: every
    logit comes from the (shaped) features and the head."""

    reads = ("features", "head")

    def _block_logits(self, features: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _head(self, W: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The head the blocks see, prepared once per split (DICE masks it here)."""
        return W, b

    def _blocks(self, split):
        """(rows, shaped logits of those rows) for every block of the split."""
        features = finite_features(split, dtype=None)
        W, b = self._head(*finite_head(split, features.shape[1]))
        for start in range(0, len(features), BLOCK_ROWS):
            rows = slice(start, start + BLOCK_ROWS)
            yield rows, self._block_logits(np.asarray(features[rows], np.float64), W, b)

    def _logits(self, split) -> np.ndarray:
        """The shaped logits of the whole split (N, C)."""
        blocks = [logits for _, logits in self._blocks(split)]
        return np.concatenate(blocks) if blocks else np.empty((0, len(split.head[1])))

    def score_samples(self, split) -> np.ndarray:
        return self.score_and_predict(split)[0]

    def predict(self, split) -> np.ndarray:
        return self.score_and_predict(split)[1]

    def score_and_predict(self, split) -> tuple[np.ndarray, np.ndarray]:
        n = len(split.features)
        scores, predictions = np.empty(n), np.empty(n, dtype=np.int64)
        for rows, logits in self._blocks(split):  # shaped once for both
            scores[rows], predictions[rows] = energy(logits, 1.0), logits.argmax(axis=1)
        return scores, predictions


# ---------------------------------------------------------------- methods

@register
class ReAct(_Shaping):
    """ReAct: clip features at c (p-th percentile of the fit split's features), S = LSE_1(W min(v,c) + b).

    ``source``: the ID split c is estimated on: "train" (the ID fit split, the harness default) or
    "val" (the benchmark's ID validation split, as the official code estimates it on ImageNet val).
    """

    name = "react"
    grid = {"p": REACT_GRID}

    def __init__(self, p: float = 90.0, source: str = "train"):
        self.p = p
        self.source = source

    @property
    def fits_on(self) -> str:
        return "val" if self.source == "val" else "fit"

    def fit(self, split) -> "ReAct":
        check_percentile(self.name, "p", self.p)
        if self.source not in ("train", "val"):
            raise ValueError(f"{self.name}: source must be 'train' or 'val', got {self.source!r}")
        self.c_ = react_threshold(finite_features(split), self.p)
        return self

    def _block_logits(self, features: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
        check_fitted(self, "c_")
        return react_logits(features, W, b, self.c_)


@register
class DICE(_Shaping):
    """DICE: mask the head with M = 1[W * v_bar > tau] (tau the global p-th percentile of the
    contributions, v_bar the fit split's mean feature); S = LSE_1((M * W) v + b)."""

    name = "dice"
    grid = {"p": DICE_GRID}

    def __init__(self, p: float = 90.0):
        self.p = p

    def fit(self, split) -> "DICE":
        check_percentile(self.name, "p", self.p)
        features = finite_features(split)
        W, _ = finite_head(split, features.shape[1])
        self.v_bar_ = features.mean(axis=0)
        self.mask_ = dice_mask(W, self.v_bar_, self.p)
        return self

    def _head(self, W: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        check_fitted(self, "mask_")
        return dice_head(W, self.mask_), b

    def _block_logits(self, features: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
        return linear_logits(features, W, b)  # W is already masked (``_head``)


@register
class DICEReAct(DICE):
    """DICE+ReAct: clip at c (``react_p``-th percentile of the fit features), then the DICE-masked head
    (sparsity ``p``); S = LSE_1((M * W) min(v, c) + b). As in the DICE code, the mean feature v_bar
    behind the mask is computed from the UNCLIPPED fit features."""

    name = "dice_react"
    grid = {"p": DICE_GRID, "react_p": REACT_GRID}

    def __init__(self, p: float = 10.0, react_p: float = 90.0):
        super().__init__(p)
        self.react_p = react_p

    def fit(self, split) -> "DICEReAct":
        check_percentile(self.name, "react_p", self.react_p)
        super().fit(split)
        self.c_ = react_threshold(finite_features(split), self.react_p)
        return self

    def _block_logits(self, features: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
        check_fitted(self, "c_")
        return linear_logits(react_clip(features, self.c_), W, b)  # W is already masked (``_head``)


class _ASH(_Shaping):
    """ASH at the penultimate layer (n = D): shape each feature vector, S = LSE_1(W ash(v) + b)."""

    variant = ""
    grid = {"p": ASH_GRID}

    def __init__(self, p: float = 65.0):
        self.p = p

    def _block_logits(self, features: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
        check_percentile(self.name, "p", self.p)
        return ash_logits(features, W, b, self.variant, self.p, getattr(self, "seed", 0))


@register
class ASHP(_ASH):
    """ASH-P: keep the top-k feature values, zero the rest."""

    name = "ash_p"
    variant = "p"

    def __init__(self, p: float = 60.0):  # the paper's ASH-P@60 (ASH-B@65, ASH-S@90)
        self.p = p


@register
class ASHB(_ASH):
    """ASH-B: kept entries set to s1 / k (s1 = sum before pruning), the rest 0."""

    name = "ash_b"
    variant = "b"


@register
class ASHS(_ASH):
    """ASH-S: kept entries scaled by exp(s1 / s2), the rest 0."""

    name = "ash_s"
    variant = "s"

    def __init__(self, p: float = 90.0):
        self.p = p


@register
class ASHRand(_ASH):
    """ASH-RAND: kept entries replaced by U(0, 10) draws seeded per sample from (seed, its content)."""

    name = "ash_rand"
    variant = "rand"

    def __init__(self, p: float = 65.0, seed: int = 0):
        self.p = p
        self.seed = seed


@register
class SCALE(_Shaping):
    """SCALE: every feature scaled by ASH-S's exp(s1 / s2) at percentile p, nothing pruned;
    S = LSE_1(W scale(v) + b)."""

    name = "scale"
    grid = {"p": SCALE_GRID}

    def __init__(self, p: float = 85.0):
        self.p = p

    def _block_logits(self, features: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
        check_percentile(self.name, "p", self.p)
        return linear_logits(scale_shaping(features, self.p), W, b)


@register
class VRA(_Shaping):
    """VRA: the piecewise rectification g (0 below alpha, z + gamma between, beta above) of the
    penultimate feature, S = LSE_1(W g(v) + b); alpha and beta are the ``p_low``-th and ``p_high``-th
    percentiles of the fit split's features, per unit (the official code) or over all entries
    (``per_unit=False``, OpenOOD). Defaults: the official CIFAR setting (60, 95, gamma = 0.6)."""

    name = "vra"
    grid = {"p_low": [50.0, 60.0, 65.0, 70.0], "p_high": [80.0, 85.0, 90.0, 95.0, 99.0],
            "gamma": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7]}  # the paper's search ranges

    def __init__(self, p_low: float = 60.0, p_high: float = 95.0, gamma: float = 0.6, per_unit: bool = True):
        self.p_low = p_low
        self.p_high = p_high
        self.gamma = gamma
        self.per_unit = per_unit

    def fit(self, split) -> "VRA":
        check_percentile(self.name, "p_low", self.p_low)
        check_percentile(self.name, "p_high", self.p_high)
        if self.p_low > self.p_high:
            raise ValueError(f"{self.name}: p_low ({self.p_low}) must not exceed p_high ({self.p_high})")
        if not np.isfinite(self.gamma):
            raise ValueError(f"{self.name}: gamma must be finite, got {self.gamma}")
        self.alpha_, self.beta_ = vra_thresholds(finite_features(split), self.p_low, self.p_high, self.per_unit)
        return self

    def _block_logits(self, features: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
        check_fitted(self, "alpha_", "beta_")
        if self.alpha_.shape not in ((1,), (features.shape[1],)):
            raise ValueError(f"{self.name}: fit on {self.alpha_.shape[0]}-dim features, asked to score "
                             f"{features.shape[1]}-dim ones")
        return linear_logits(vra_rectify(features, self.alpha_, self.beta_, self.gamma), W, b)
