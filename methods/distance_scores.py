"""Scores fit on the ID training features: Mahalanobis, KNN, ViM, Residual and KL-matching.

Each method learns its statistics from the fit split (ID train, true labels) in ``fit`` and scores
every sample independently in ``score_samples`` (higher = more in-distribution). The math lives in the
pure functions below, in float64 except KNN's search: faiss's float32 inner products, exact by default
(``KNN`` states its batch-independence tolerance). The registered classes only validate inputs and
store state.
"""
from __future__ import annotations

import contextlib
import math

import faiss
import numpy as np

from methods.base import (
    BLOCK_ROWS,
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
    usable_cpus,
)

NORM_EPS = 1e-10   # KNN normaliser, z = v / (||v|| + 1e-10) (spec 1.11)
KL_EPS = 1e-12     # added to KL-matching templates (spec 1.13)
KNN_BLOCK_ELEMENTS = 1 << 24  # distance-matrix entries per knn_score block (128 MiB of float64)
KNN_INDEXES = ("flat", "ivf")  # KNN's faiss indexes: exact, approximate
KNN_QUERY_ROWS = 1 << 14  # query rows per faiss search: bounds its (rows, k) results (200 MB at k = 1000)
KNN_BATCH_RTOL = 1e-5  # KNN's batch independence (float32 search): see KNN
GPU_MAX_K = 2048  # the most neighbours faiss's GPU indexes select


# ---------------------------------------------------------------- shared helpers

def _check_dim(method: str, split, features: np.ndarray, expected: int) -> None:
    if features.shape[1] != expected:
        raise ValueError(f"{method}: {split_name(split)} has {features.shape[1]}-dim features "
                         f"but the method was fit on {expected}-dim features; "
                         "fit and scored splits must come from the same backbone")


# ---------------------------------------------------------------- Mahalanobis (spec 1.5(b))

def class_means_and_tied_covariance(features: np.ndarray, labels: np.ndarray,
                                    n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Class means mu_c and the tied MLE covariance of the class-centred features (Lee et al. 2018).

    mu_c = mean{v_i : y_i = c};  Sigma = (1/n) sum_i (v_i - mu_{y_i})(v_i - mu_{y_i})^T.
    Every class 0..n_classes-1 must occur in ``labels``.
    """
    labels = np.asarray(labels)
    if labels.shape != (len(features),):
        raise ValueError(f"labels must have shape ({len(features)},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), got range [{labels.min()}, {labels.max()}]")
    counts = np.bincount(labels, minlength=n_classes)
    absent = np.flatnonzero(counts == 0)
    if absent.size:
        shown = ", ".join(map(str, absent[:20])) + (", ..." if absent.size > 20 else "")
        raise ValueError(f"{absent.size} of {n_classes} classes have no fit samples (classes {shown}); "
                         "class means need every class in the ID fit split")
    sums = np.zeros((n_classes, features.shape[1]))
    np.add.at(sums, labels, features)
    means = sums / counts[:, None]
    centred = features - means[labels]
    covariance = centred.T @ centred / len(features)
    return means, covariance


def pinv_precision(covariance: np.ndarray) -> np.ndarray:
    """Precision P = Sigma^+ (symmetric pseudo-inverse; same cutoff as scipy.linalg.pinvh: D * eps * max eig)."""
    covariance = np.asarray(covariance, dtype=np.float64)
    return np.linalg.pinv(covariance, rtol=covariance.shape[0] * np.finfo(np.float64).eps, hermitian=True)


def whitening_factor(precision: np.ndarray) -> np.ndarray:
    """L with P = L L^T, from the eigendecomposition of the (symmetrised) precision P; its null space
    (eigenvalues at rounding level) is dropped, so L is (D, rank)."""
    eigenvalues, eigenvectors = np.linalg.eigh((precision + precision.T) / 2)
    keep = eigenvalues > np.finfo(np.float64).eps * max(eigenvalues.max(initial=0.0), 0.0)
    return eigenvectors[:, keep] * np.sqrt(eigenvalues[keep])


def mahalanobis_score(features: np.ndarray, means: np.ndarray, factor: np.ndarray,
                      block: int = BLOCK_ROWS) -> np.ndarray:
    """Simple penultimate Mahalanobis (Lee et al. 2018; ViM benchmark, UM paper):

    S = -min_c (v - mu_c)^T P (v - mu_c),  P = L L^T (``whitening_factor``).

    As squared Euclidean distances after whitening: y = (v - o) L and m_c = (mu_c - o) L, with o the
    mean of the class means (distances do not change under the shift; it keeps the norms small).
    The nearest class comes from ||m_c||^2 - 2 y.m_c (one product); its distance ||y - m_c||^2 is
    then computed directly, without the cancellation of the expanded form. ``block`` rows at a
    time (converted to float64 a block at a time) bound the memory.
    """
    origin = means.mean(axis=0)
    centres = (means - origin) @ factor
    centre_sq = np.einsum("cr,cr->c", centres, centres)
    centres_t = np.ascontiguousarray(centres.T)
    scores = np.empty(len(features))
    for start in range(0, len(features), block):
        whitened = (features[start:start + block] - origin) @ factor
        nearest = (centre_sq[None, :] - 2.0 * (whitened @ centres_t)).argmin(axis=1)
        diff = whitened - centres[nearest]
        scores[start:start + block] = -np.einsum("nr,nr->n", diff, diff)
    return scores


@register
class Mahalanobis(Method):
    """Class-conditional Gaussian with tied covariance on the penultimate feature (spec 1.5(b),
    "mahalanobis_penult"): no input noise, no logistic-regression ensemble."""

    name = "mahalanobis"
    reads = ("features", "labels", "logits")

    def fit(self, split) -> "Mahalanobis":
        features = finite_features(split)
        n_classes = finite_logits(split).shape[1]
        try:
            means, covariance = class_means_and_tied_covariance(features, split.labels, n_classes)
        except ValueError as err:
            raise ValueError(f"mahalanobis: fit split {split_name(split)}: {err}") from err
        self.means_ = means
        self.precision_ = pinv_precision(covariance)
        self.whitening_ = whitening_factor(self.precision_)
        return self

    def score_samples(self, split) -> np.ndarray:
        check_fitted(self, "means_", "whitening_")
        features = finite_features(split, dtype=None)  # float64 a block at a time
        _check_dim(self.name, split, features, self.means_.shape[1])
        return mahalanobis_score(features, self.means_, self.whitening_)


# ---------------------------------------------------------------- KNN (spec 1.11)

def l2_normalise(features: np.ndarray) -> np.ndarray:
    """z = v / (||v||_2 + 1e-10), row-wise (Sun et al. 2022)."""
    return features / (np.linalg.norm(features, axis=1, keepdims=True) + NORM_EPS)


def knn_score(query: np.ndarray, bank: np.ndarray, k: int, block: int | None = None) -> np.ndarray:
    """-||a - b_(k)||^2, the negative squared L2 distance of each query row a to its k-th nearest bank
    row, exact in float64, for rows of any norm (GROOD's gradients). KNN's own search is faiss's on
    unit vectors (``kth_similarities``).

    Exact brute force: the k-th smallest of ||b||^2 - 2 a.b over the bank (an in-place partition),
    plus ||a||^2, clipped at 0 (adding a row constant and clipping are monotone, so they are applied
    to the k-th value only, not to the whole distance row). ``block`` query rows at a time so memory
    stays O(block * len(bank)); by default about 2^24 distance entries (128 MiB of float64).
    """
    if not 1 <= k <= len(bank):
        raise ValueError(f"k must be in [1, {len(bank)}] (the number of bank samples), got {k}")
    if block is None:
        block = max(1, KNN_BLOCK_ELEMENTS // len(bank))
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    bank_sq = np.einsum("nd,nd->n", bank, bank)
    bank_t = np.ascontiguousarray(bank.T)  # BLAS runs twice as fast on a contiguous (D, N) operand
    scores = np.empty(len(query))
    for start in range(0, len(query), block):
        rows = query[start:start + block]
        partial = rows @ bank_t  # in place: ||b||^2 - 2 a.b
        partial *= -2.0
        partial += bank_sq[None, :]
        partial.partition(k - 1, axis=1)
        kth = partial[:, k - 1] + np.einsum("nd,nd->n", rows, rows)
        scores[start:start + block] = -np.maximum(kth, 0.0)
    return scores


def deep_knn_score(kth_similarity: np.ndarray) -> np.ndarray:
    """Deep nearest neighbours (Sun et al. 2022): S = -||z - z_(k)||^2 = -(2 - 2 z.z_(k)), clipped at 0.

    z_(k) is the k-th nearest normalised ID-train feature. The paper's code scores with the squared
    L2 distance of faiss's IndexFlatL2 (spec 1.11: rank-equal to -d_k); on unit vectors it is
    2 - 2 z.z_(k), so an inner-product search (the k-th largest z.b) gives the same neighbour and
    the same score. A feature vector of zeros stays 0 after normalising, the one row that is not a
    unit vector: it scores -2 here (inner product 0 with everything), -1 with IndexFlatL2. The clip
    removes the float32 rounding that can put z.z_(k) a hair above 1 for a duplicate of a bank row.
    """
    return -np.maximum(2.0 - 2.0 * np.asarray(kth_similarity, dtype=np.float64), 0.0)


@contextlib.contextmanager
def search_threads():
    """faiss runs on at most as many OpenMP threads as the CPUs this process may run on (its
    affinity mask: a container's, taskset's or Slurm job's share of a shared machine) and never
    more than OMP_NUM_THREADS (joblib's, Dask's and Ray's scoring workers set it to their share
    of the cores); the previous setting is restored afterwards."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, min(before, usable_cpus())))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def ivf_lists(n: int) -> int:
    """The k-means lists of an IVF index over n vectors: round(sqrt(n)) (faiss's rule of thumb),
    at most n // 39 (faiss wants 39 training vectors per list), at least 1."""
    return max(1, min(round(math.sqrt(n)), n // 39))


def knn_index(bank: np.ndarray, index: str, nprobe: int, k: int):
    """A faiss inner-product index over ``bank`` (unit float32 rows).

    ``flat``: exact (IndexFlatIP), every query against every bank row. ``ivf``: approximate
    (IndexIVFFlat), the bank split into ``ivf_lists`` k-means lists (seeded: faiss's fixed seed),
    each query compared with the rows of its ``nprobe`` nearest lists only. On a GPU when faiss
    has GPU support and sees a CUDA device (faiss-gpu), and k is within its selection limit.
    """
    dim = bank.shape[1]
    if index == "flat":
        built = faiss.IndexFlatIP(dim)
    else:
        built = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, ivf_lists(len(bank)), faiss.METRIC_INNER_PRODUCT)
        with search_threads():
            built.train(bank)
        built.nprobe = nprobe
    built.add(bank)
    if faiss.get_num_gpus() > 0 and k <= GPU_MAX_K:
        return faiss.index_cpu_to_all_gpus(built)
    return built


def kth_similarities(index, query: np.ndarray, ks: list[int]) -> np.ndarray:
    """(n, len(ks)) float32: the ks[j]-th largest inner product of each query row with the bank.

    One faiss search for the max(ks) largest serves every k: its ks[j]-th is that of a search for
    ks[j] alone (the same products, and for IVF the same probed lists, whatever the number of
    neighbours asked for). Queries go KNN_QUERY_ROWS at a time, which bounds the (rows, max(ks))
    results. An IVF search whose probed lists hold fewer than k rows for a query is an error.
    """
    ks = np.asarray(ks)
    columns = np.empty((len(query), len(ks)), dtype=np.float32)
    with search_threads():
        for start in range(0, len(query), KNN_QUERY_ROWS):
            similarities, neighbours = index.search(query[start:start + KNN_QUERY_ROWS], int(ks.max()))
            missing = neighbours[:, ks - 1] < 0
            if missing.any():
                short = int(missing.any(axis=1).sum())
                raise ValueError(f"knn: for {short} queries the {index.nprobe} IVF lists searched hold fewer than "
                                 f"k={int(ks[missing.any(axis=0)].max())} bank samples; raise nprobe or lower k")
            columns[start:start + KNN_QUERY_ROWS] = similarities[:, ks - 1]
    return columns


def subsample_indices(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subsample without replacement of round(fraction * n) rows (all if 1)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fit_fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return np.arange(n)
    size = max(1, int(round(fraction * n)))
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


@register
class KNN(Method):
    """k-th nearest-neighbour distance to normalised ID-train features (CIFAR default k=50;
    ImageNet k=1000, or fit_fraction=0.01 with k=10), searched by faiss in float32.

    ``index``: ``flat`` (default) is exact, the paper's search; ``ivf`` is approximate for banks
    too large for an exact search, ``nprobe`` of its ``ivf_lists(n)`` lists searched per query
    (docs/performance.md measures it against exact). ``nprobe`` plays no part in a flat search.

    Batch independence holds to KNN_BATCH_RTOL (1e-5), not the 1e-12 of ``methods.base``: float32
    inner products round differently with a row's place in faiss's blocked products (and below 20
    queries faiss does not use BLAS at all), by a few units in their last place. A sample's score
    in any batching equals its score in the whole split to 1e-5 relative, with a floor of 1e-5
    times the split's largest |score| (the rounding measured: up to 1.1e-6 of the largest score,
    at 256 dimensions), so ranks and metrics are unchanged but for near-ties within that.
    """

    name = "knn"
    reads = ("features", "logits")  # logits: its predictions (ID accuracy)
    # 2: the row norm added after the partition; 3: 1024-row products; 4: plain products;
    # 5: float32 faiss inner-product search
    version = 5
    grid = {"k": [1, 10, 20, 50, 100, 200, 500, 1000]}
    sweep_axis = "k"  # settings differing only in k are scored from one search (score_samples_sweep)

    def __init__(self, k: int = 50, fit_fraction: float = 1.0, seed: int = 0, index: str = "flat",
                 nprobe: int = 16):
        self.k = k
        self.fit_fraction = fit_fraction
        self.seed = seed
        self.index = index
        self.nprobe = nprobe

    def fit(self, split) -> "KNN":
        if self.index not in KNN_INDEXES:
            raise ValueError(f"knn: index must be one of {', '.join(KNN_INDEXES)}, got {self.index!r}")
        if self.index == "ivf" and not self.nprobe >= 1:
            raise ValueError(f"knn: nprobe must be >= 1, got {self.nprobe}")
        features = finite_features(split, dtype=np.float32)
        keep = subsample_indices(len(features), self.fit_fraction, self.seed)
        if not 1 <= self.k <= len(keep):
            raise ValueError(f"knn: k={self.k} but the bank from {split_name(split)} has {len(keep)} samples "
                             f"(fit_fraction={self.fit_fraction}); need 1 <= k <= bank size")
        self.index_ = knn_index(l2_normalise(features[keep]), self.index, self.nprobe, self.k)
        return self

    def score_samples(self, split) -> np.ndarray:
        return self.score_samples_sweep(split, [self.k])[0]

    def score_samples_sweep(self, split, ks: list[int]) -> list[np.ndarray]:
        """``score_samples`` for every k of ``ks`` (each at most the fitted k: fit with the largest)
        from one search; ``Evaluation.sweep`` scores a sweep over k this way."""
        check_fitted(self, "index_")
        if not 1 <= min(ks) <= max(ks) <= self.k:
            raise ValueError(f"knn: every k must be in [1, {self.k}] (the k it was fit with), got {ks}")
        query = l2_normalise(finite_features(split, dtype=np.float32))
        _check_dim(self.name, split, query, self.index_.d)
        columns = kth_similarities(self.index_, query, ks)
        return [deep_knn_score(columns[:, j]) for j in range(len(ks))]


# ---------------------------------------------------------------- ViM and Residual (spec 1.12)

def vim_origin(weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """u = -W^+ b: the least-norm point with zero logits (Wang et al. 2022)."""
    return -np.linalg.pinv(weight) @ bias


def vim_principal_dim(n_features: int) -> int:
    """ViM's principal dimension: D = 1000 if N >= 2048, 512 if N >= 768, else N // 2."""
    if n_features >= 2048:
        return 1000
    if n_features >= 768:
        return 512
    return n_features // 2


def vim_residual_basis(centred: np.ndarray, dim: int) -> np.ndarray:
    """R (N, N - dim): eigenvectors of the uncentred covariance (1/n) sum z' z'^T beyond the top ``dim``."""
    covariance = centred.T @ centred / len(centred)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]
    return np.ascontiguousarray(eigenvectors[:, order[dim:]])


def vim_residual(features: np.ndarray, origin: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """r(x) = ||R^T (v - u)||_2, the norm of the feature outside the principal subspace."""
    return np.linalg.norm((features - origin) @ basis, axis=1)


def vim_score(logits: np.ndarray, residual: np.ndarray, alpha: float) -> np.ndarray:
    """Virtual-logit matching (Wang et al. 2022): S = LSE_1(f) - alpha * r(x)."""
    return log_sum_exp(logits) - alpha * residual


@register
class ViM(Method):
    """Virtual-logit Matching. ``dim`` = principal dimension D (None: 1000/512/N//2 by feature size)."""

    name = "vim"
    reads = ("logits", "features", "head")
    grid = {"dim": [None]}

    def __init__(self, dim: int | None = None):
        self.dim = dim

    def _principal_dim(self, n_features: int) -> int:
        dim = vim_principal_dim(n_features) if self.dim is None else int(self.dim)
        if not 1 <= dim < n_features:
            raise ValueError(f"{self.name}: principal dim must be in [1, {n_features}) for {n_features}-dim "
                             f"features, got {dim}")
        return dim

    def _fit_subspace(self, split) -> np.ndarray:
        """Learn u_ and R_; return the fit residuals r."""
        features = finite_features(split)
        dim = self._principal_dim(features.shape[1])
        weight, bias = finite_head(split, features.shape[1])
        self.u_ = vim_origin(weight, bias)
        self.R_ = vim_residual_basis(features - self.u_, dim)
        return vim_residual(features, self.u_, self.R_)

    def _residual(self, split) -> np.ndarray:
        check_fitted(self, "u_", "R_")
        features = finite_features(split, dtype=None)
        _check_dim(self.name, split, features, len(self.u_))
        return rowwise_apply(lambda v: vim_residual(v, self.u_, self.R_), features)

    def fit(self, split) -> "ViM":
        residual = self._fit_subspace(split)
        mean_residual = residual.mean()
        if not mean_residual > 0:
            raise ValueError(f"{self.name}: the fit features of {split_name(split)} have no residual outside the "
                             "principal subspace, so alpha is undefined; use a smaller dim")
        self.alpha_ = float(finite_logits(split).max(axis=1).mean() / mean_residual)
        return self

    def score_samples(self, split) -> np.ndarray:
        check_fitted(self, "alpha_")
        residual = self._residual(split)
        return rowwise_apply(lambda f, r: vim_score(f, r, self.alpha_), finite_logits(split, dtype=None), residual)


@register
class Residual(ViM):
    """ViM's residual alone: S = -r(x) = -||R^T (v - u)||."""

    name = "residual"
    reads = ("features", "head", "logits")  # logits: its predictions (ID accuracy)

    def fit(self, split) -> "Residual":
        self._fit_subspace(split)
        return self

    def score_samples(self, split) -> np.ndarray:
        return -self._residual(split)


# ---------------------------------------------------------------- KL-matching (spec 1.13)

def kl_templates(probs: np.ndarray, predicted: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """d_k = mean softmax over fit samples predicted as class k (Hendrycks et al. 2019).

    Returns (templates (K', C), classes (K',)); classes never predicted have no template.
    """
    counts = np.bincount(predicted, minlength=n_classes)
    sums = np.zeros((n_classes, probs.shape[1]))
    np.add.at(sums, predicted, probs)
    classes = np.flatnonzero(counts)
    return sums[classes] / counts[classes, None], classes


def kl_matching_score(probs: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """S = -min_k KL(p || d_k), KL(p || q) = sum_{p_i > 0} p_i log(p_i / (q_i + 1e-12)).

    Written as sum_{p_i>0} p_i log p_i - sum_i p_i log(q_i + 1e-12) (terms with p_i = 0 vanish).
    """
    log_p = np.log(probs, out=np.zeros_like(probs), where=probs > 0)
    neg_entropy = np.einsum("nc,nc->n", probs, log_p)
    cross = probs @ np.log(templates + KL_EPS).T
    return -(neg_entropy[:, None] - cross).min(axis=1)


@register
class KLMatching(Method):
    """KL divergence to the nearest class-conditional mean softmax (predicted-class templates)."""

    name = "klm"
    reads = ("logits",)

    def fit(self, split) -> "KLMatching":
        logits = finite_logits(split)
        self.templates_, self.template_classes_ = kl_templates(softmax_rows(logits), logits.argmax(axis=1),
                                                               logits.shape[1])
        return self

    def score_samples(self, split) -> np.ndarray:
        check_fitted(self, "templates_")
        logits = finite_logits(split, dtype=None)
        if logits.shape[1] != self.templates_.shape[1]:
            raise ValueError(f"klm: {split_name(split)} has {logits.shape[1]} classes but the templates were fit on "
                             f"{self.templates_.shape[1]}")
        return rowwise_apply(lambda f: kl_matching_score(softmax_rows(f), self.templates_), logits)
