"""Mahalanobis, KNN, ViM, Residual and KL-matching: independent references (scikit-learn, slow
transcriptions of the spec), hand-worked values, batch independence and refitting."""
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.covariance import EmpiricalCovariance
from sklearn.neighbors import NearestNeighbors

import methods.distance_scores as distance_scores
from methods import METHODS, make_method
from methods.distance_scores import (
    GPU_MAX_K,
    KNN_BATCH_RTOL,
    ivf_lists,
    kl_matching_score,
    kl_templates,
    knn_score,
    l2_normalise,
    search_threads,
    vim_principal_dim,
)
from tests.conftest import assert_batch_invariant

DISTANCE_METHODS = ["mahalanobis", "knn", "vim", "residual", "klm"]


def make_split(features, W, b, labels=None, name="toy/split"):
    features = np.asarray(features, dtype=np.float64)
    logits = features @ W.T + b
    if labels is None:
        labels = logits.argmax(axis=1)
    return SimpleNamespace(features=features, logits=logits, labels=np.asarray(labels), head=(W, b), name=name)


def toy_problem(seed=0, n_fit=300, n_test=60, n_classes=4, dim=12):
    """Class-clustered non-negative-ish features, a random linear head, fit and test splits."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2, size=(n_classes, dim))
    W = rng.normal(0, 1, size=(n_classes, dim))
    b = rng.normal(0, 1, size=n_classes)
    fit_labels = np.arange(n_fit) % n_classes
    fit = make_split(centres[fit_labels] + rng.normal(0, 1, size=(n_fit, dim)), W, b, fit_labels, "toy/train")
    test = make_split(rng.normal(0, 2.5, size=(n_test, dim)), W, b, name="toy/test")
    return fit, test


# ------------------------------------------------------------------ Mahalanobis

def sklearn_mahalanobis(fit, test):
    classes = np.unique(fit.labels)
    means = np.stack([fit.features[fit.labels == c].mean(axis=0) for c in classes])
    estimator = EmpiricalCovariance(assume_centered=True).fit(fit.features - means[fit.labels])
    distances = np.stack([estimator.mahalanobis(test.features - mu) for mu in means], axis=1)
    return -distances.min(axis=1)


def test_mahalanobis_matches_sklearn():
    fit, test = toy_problem()
    scores = make_method("mahalanobis").fit(fit).score_samples(test)
    assert scores.dtype == np.float64 and scores.shape == (60,)
    np.testing.assert_allclose(scores, sklearn_mahalanobis(fit, test), rtol=1e-9)
    # The fit samples of a class are closer to their own mean than random test points on average.
    assert make_method("mahalanobis").fit(fit).score_samples(fit).mean() > scores.mean()


def test_mahalanobis_rank_deficient_uses_pseudo_inverse():
    fit, test = toy_problem(seed=3)
    # Feature 0 is constant on the fit split (zero variance), feature 1 duplicates feature 2:
    # the tied covariance has rank D - 2 and a plain inverse does not exist.
    fit.features[:, 0] = 2.0
    fit.features[:, 1] = fit.features[:, 2]
    test.features[:, 1] = test.features[:, 2]
    # test feature 0 varies freely: the null-space direction is ignored by the pseudo-inverse.
    method = make_method("mahalanobis").fit(fit)
    assert np.linalg.matrix_rank(np.linalg.pinv(method.precision_)) == fit.features.shape[1] - 2
    scores = method.score_samples(test)
    assert np.isfinite(scores).all()
    np.testing.assert_allclose(scores, sklearn_mahalanobis(fit, test), rtol=1e-9)
    shifted = SimpleNamespace(**vars(test))
    shifted.features = test.features.copy()
    shifted.features[:, 0] += 100.0  # moving along the null space changes nothing
    np.testing.assert_allclose(method.score_samples(shifted), scores, rtol=1e-9)


def test_mahalanobis_errors():
    fit, test = toy_problem()
    missing = SimpleNamespace(**vars(fit))
    missing.labels = np.where(fit.labels == 2, 0, fit.labels)  # class 2 never occurs
    with pytest.raises(ValueError, match=r"classes 2\b"):
        make_method("mahalanobis").fit(missing)
    with pytest.raises(ValueError, match="call fit"):
        make_method("mahalanobis").score_samples(test)
    narrow = SimpleNamespace(**vars(test))
    narrow.features = test.features[:, :5]
    with pytest.raises(ValueError, match="5-dim features but the method was fit on 12-dim"):
        make_method("mahalanobis").fit(fit).score_samples(narrow)


# ------------------------------------------------------------------ KNN

def sklearn_knn(fit, test, k):
    """-d_k^2 by scikit-learn's float64 brute-force search over the normalised features."""
    search = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(l2_normalise(fit.features))
    distances, _ = search.kneighbors(l2_normalise(test.features))
    return -distances[:, -1] ** 2


def assert_knn_close(scores, reference):
    """KNN's float32 search against a float64 reference: KNN_BATCH_RTOL relative, with a floor of
    KNN_BATCH_RTOL times the largest |score| (a distance near 0 keeps the rounding of 2 - 2 z.b)."""
    np.testing.assert_allclose(scores, reference, rtol=KNN_BATCH_RTOL,
                               atol=KNN_BATCH_RTOL * np.abs(reference).max())


@pytest.mark.parametrize("k", [1, 7, 50])
def test_knn_matches_sklearn_brute(k):
    fit, test = toy_problem(seed=1)
    scores = make_method("knn", k=k).fit(fit).score_samples(test)
    assert scores.dtype == np.float64
    assert_knn_close(scores, sklearn_knn(fit, test, k))


def test_knn_scores_every_k_of_a_sweep_from_one_search_as_each_k_alone():
    fit, test = toy_problem(seed=11)
    ks = [1, 7, 50, 300]
    swept = make_method("knn", k=300).fit(fit).score_samples_sweep(test, ks)
    for k, scores in zip(ks, swept):
        np.testing.assert_array_equal(scores, make_method("knn", k=k).fit(fit).score_samples(test))
        assert_knn_close(scores, sklearn_knn(fit, test, k))
    with pytest.raises(ValueError, match=r"every k must be in \[1, 50\] \(the k it was fit with\)"):
        make_method("knn", k=50).fit(fit).score_samples_sweep(test, [10, 100])


def test_knn_ivf_is_exact_with_every_list_searched_and_never_closer_with_fewer():
    fit, test = toy_problem(seed=12, n_fit=2000, n_test=200, dim=16)
    lists = ivf_lists(2000)
    assert lists == 45 and ivf_lists(100_000) == 316 and ivf_lists(10) == 1
    exact = make_method("knn", k=20).fit(fit).score_samples(test)
    every = make_method("knn", k=20, index="ivf", nprobe=lists).fit(fit).score_samples(test)
    assert_knn_close(every, exact)
    few = make_method("knn", k=20, index="ivf", nprobe=2).fit(fit)
    approximate = few.score_samples(test)
    assert (approximate <= exact + KNN_BATCH_RTOL).all()  # the k-th of a subset of the bank is never closer
    assert (approximate < exact - 1e-3).any()  # and here, for some queries, farther
    swept = few.score_samples_sweep(test, [1, 20])  # the same lists, whatever k: a sweep shares the search
    np.testing.assert_array_equal(swept[1], approximate)
    np.testing.assert_array_equal(swept[0], make_method("knn", k=1, index="ivf", nprobe=2).fit(fit).score_samples(test))


def test_knn_hand_worked_duplicates_and_zero_vectors():
    bank = np.array([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]])  # unit: (0.6, 0.8), (0, 1), (1, 0)
    fit = SimpleNamespace(features=bank, logits=bank, name="toy/bank")
    query = SimpleNamespace(features=np.array([[6.0, 8.0], [0.0, 0.0]]), logits=np.zeros((2, 2)), name="toy/q")
    # (0.6, 0.8): distances^2 2 - 2 z.b = 0, 2 - 1.6 = 0.4, 2 - 1.2 = 0.8; a zero row is at 2 from everything
    for k, expected in ((1, [0.0, -2.0]), (2, [-0.4, -2.0]), (3, [-0.8, -2.0])):
        np.testing.assert_allclose(make_method("knn", k=k).fit(fit).score_samples(query), expected, atol=1e-7)
    assert make_method("knn", k=1).fit(fit).score_samples(query)[0] <= 0.0  # clipped: never above 0


def test_knn_normalisation_and_blocks():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(5, 3))
    np.testing.assert_allclose(l2_normalise(features),
                               features / (np.sqrt((features ** 2).sum(axis=1, keepdims=True)) + 1e-10), rtol=1e-15)
    np.testing.assert_array_equal(l2_normalise(np.zeros((1, 3))), np.zeros((1, 3)))  # no division by zero
    bank = l2_normalise(rng.normal(size=(300, 16)))
    query = l2_normalise(rng.normal(size=(101, 16)))
    whole = knn_score(query, bank, 10, block=10_000)
    assert_batch_invariant(whole, knn_score(query, bank, 10, block=7))
    assert_batch_invariant(whole, knn_score(query, bank, 10, block=1))
    # Hand check: a query equal to a bank vector has k=1 distance 0.
    np.testing.assert_allclose(knn_score(bank[:3], bank, 1), 0.0, atol=1e-12)


def test_knn_fit_fraction_is_seeded_and_sized():
    fit, test = toy_problem(seed=4, n_fit=200)
    a = make_method("knn", k=5, fit_fraction=0.25, seed=7).fit(fit)
    b = make_method("knn", k=5, fit_fraction=0.25, seed=7).fit(fit)
    c = make_method("knn", k=5, fit_fraction=0.25, seed=8).fit(fit)

    def bank(method):
        return method.index_.reconstruct_n(0, method.index_.ntotal)
    assert bank(a).shape == (50, 12)
    np.testing.assert_array_equal(bank(a), bank(b))
    assert not np.array_equal(bank(a), bank(c))
    chosen = np.sort(np.random.default_rng(7).choice(200, size=50, replace=False))
    np.testing.assert_array_equal(bank(a), l2_normalise(fit.features[chosen].astype(np.float32)))
    assert len(np.unique(bank(a), axis=0)) == 50  # without replacement
    assert bank(make_method("knn", k=5).fit(fit)).shape == (200, 12)


def test_knn_errors():
    fit, test = toy_problem(n_fit=40)
    with pytest.raises(ValueError, match="k=41 but the bank"):
        make_method("knn", k=41).fit(fit)
    with pytest.raises(ValueError, match="k=5 but the bank .* has 4 samples"):
        make_method("knn", k=5, fit_fraction=0.1).fit(fit)
    with pytest.raises(ValueError, match="fit_fraction"):
        make_method("knn", fit_fraction=0.0).fit(fit)
    narrow = SimpleNamespace(**vars(test))
    narrow.features = test.features[:, :3]
    with pytest.raises(ValueError, match="3-dim features"):
        make_method("knn", k=5).fit(fit).score_samples(narrow)
    with pytest.raises(ValueError, match="index must be one of flat, ivf, got 'hnsw'"):
        make_method("knn", k=5, index="hnsw").fit(fit)
    with pytest.raises(ValueError, match="nprobe must be >= 1"):
        make_method("knn", k=5, index="ivf", nprobe=0).fit(fit)
    with pytest.raises(ValueError, match="call fit"):
        make_method("knn").score_samples(test)
    # 400 fit samples: ivf_lists gives 10 lists of about 40, so one list searched holds fewer than k = 300
    big, test = toy_problem(n_fit=400)
    short = make_method("knn", k=300, index="ivf", nprobe=1).fit(big)
    with pytest.raises(ValueError, match=r"for \d+ queries the 1 IVF lists searched hold fewer than k=300 bank "
                                         "samples; raise nprobe or lower k"):
        short.score_samples(test)


def test_knn_search_threads_stay_within_the_cpus_the_process_may_use(monkeypatch):
    before = distance_scores.faiss.omp_get_max_threads()
    monkeypatch.setattr(distance_scores, "usable_cpus", lambda: 1)
    with search_threads():
        assert distance_scores.faiss.omp_get_max_threads() == 1
    assert distance_scores.faiss.omp_get_max_threads() == before
    monkeypatch.setattr(distance_scores, "usable_cpus", lambda: before + 8)
    with search_threads():  # never more than OpenMP's own setting (OMP_NUM_THREADS, a worker's share)
        assert distance_scores.faiss.omp_get_max_threads() == before


def test_knn_searches_on_a_gpu_when_faiss_sees_one(monkeypatch):
    """faiss-gpu with a CUDA device: the index moves to the GPUs, unless k is beyond their
    selection limit. (A fake GPU here: only the choice is tested; faiss-gpu's search is faiss's.)"""
    moved = []
    monkeypatch.setattr(distance_scores.faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(distance_scores.faiss, "index_cpu_to_all_gpus", lambda index: moved.append(index) or index)
    fit, _ = toy_problem(n_fit=GPU_MAX_K + 10)
    make_method("knn", k=GPU_MAX_K).fit(fit)
    assert len(moved) == 1
    make_method("knn", k=GPU_MAX_K + 1).fit(fit)
    assert len(moved) == 1


# ------------------------------------------------------------------ ViM and Residual

def vim_reference(fit, test, principal_dim):
    """Slow transcription of spec 1.12, independent of the implementation's linear algebra:
    u from a least-norm solve of W u = -b, principal subspace from the SVD of the data matrix,
    residual as the norm of z' minus its projection onto the principal subspace."""
    W, b = fit.head
    u = np.linalg.lstsq(W, -b, rcond=None)[0]  # least-norm point with zero logits
    Z = fit.features - u
    _, _, vt = np.linalg.svd(Z / np.sqrt(len(Z)))  # rows: eigenvectors of (1/n) sum z z^T, descending
    principal = vt[:principal_dim]

    def residual(v):
        z = v - u
        projection = np.zeros_like(z)
        for direction in principal:
            projection += (direction @ z) * direction
        return np.sqrt(sum((zi - pi) ** 2 for zi, pi in zip(z, projection)))

    fit_r = [residual(v) for v in fit.features]
    alpha = np.mean([max(f) for f in fit.logits]) / np.mean(fit_r)
    r = np.array([residual(v) for v in test.features])
    lse = np.array([np.log(sum(np.exp(fc) for fc in f)) for f in test.logits])
    return lse - alpha * r, r, alpha, u


def test_vim_and_residual_match_spec_transcription():
    fit, test = toy_problem(seed=5, n_fit=200, n_test=30, n_classes=4, dim=8)
    expected, r, alpha, u = vim_reference(fit, test, principal_dim=3)
    vim = make_method("vim", dim=3).fit(fit)
    assert vim.R_.shape == (8, 5)
    np.testing.assert_allclose(vim.u_, u, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(vim.alpha_, alpha, rtol=1e-9)
    np.testing.assert_allclose(vim.score_samples(test), expected, rtol=1e-9)
    np.testing.assert_allclose(make_method("residual", dim=3).fit(fit).score_samples(test), -r, rtol=1e-9)
    np.testing.assert_array_equal(vim.predict(test), test.logits.argmax(axis=1))


def test_vim_principal_dim_rule():
    assert vim_principal_dim(342) == 171
    assert vim_principal_dim(768) == 512
    assert vim_principal_dim(2048) == 1000
    assert vim_principal_dim(767) == 383 and vim_principal_dim(2047) == 512 and vim_principal_dim(4096) == 1000
    fit, test = toy_problem(seed=6, dim=10)
    assert make_method("vim").fit(fit).R_.shape == (10, 5)  # dim=None: N // 2 principal, 5 residual
    assert make_method("residual").fit(fit).R_.shape == (10, 5)
    expected, *_ = vim_reference(fit, test, principal_dim=5)
    np.testing.assert_allclose(make_method("vim").fit(fit).score_samples(test), expected, rtol=1e-9)


def test_vim_errors():
    fit, test = toy_problem(dim=8)
    with pytest.raises(ValueError, match=r"principal dim must be in \[1, 8\)"):
        make_method("vim", dim=8).fit(fit)
    with pytest.raises(ValueError, match="call fit"):
        make_method("residual").score_samples(test)
    bad_head = SimpleNamespace(**vars(fit))
    bad_head.head = (fit.head[0][:, :5], fit.head[1])
    with pytest.raises(ValueError, match="head W has 5 input dims"):
        make_method("vim").fit(bad_head)
    narrow = SimpleNamespace(**vars(test))
    narrow.features = test.features[:, :6]
    with pytest.raises(ValueError, match="6-dim features"):
        make_method("vim").fit(fit).score_samples(narrow)


# ------------------------------------------------------------------ KL-matching

def logit_split(logits, name="toy/logits"):
    return SimpleNamespace(logits=np.asarray(logits, dtype=np.float64), name=name)


def test_klm_hand_worked_two_classes():
    # Fit softmaxes: [log 3, 0] -> (0.75, 0.25); [log 9, 0] -> (0.9, 0.1); [0, log 3] -> (0.25, 0.75).
    # Predicted classes 0, 0, 1, so d_0 = mean{(0.75, 0.25), (0.9, 0.1)} = (0.825, 0.175), d_1 = (0.25, 0.75).
    fit = logit_split([[np.log(3), 0.0], [np.log(9), 0.0], [0.0, np.log(3)]])
    method = make_method("klm").fit(fit)
    np.testing.assert_allclose(method.templates_, [[0.825, 0.175], [0.25, 0.75]], rtol=1e-12)
    np.testing.assert_array_equal(method.template_classes_, [0, 1])
    # p = (0.5, 0.5):  KL(p||d_0) = 0.5 ln(0.5/0.825) + 0.5 ln(0.5/0.175) = 0.5 ln(0.25/0.144375) = 0.2745234183
    #                  KL(p||d_1) = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75)   = 0.5 ln(4/3)          = 0.1438410362
    #                  S = -min = -0.1438410362
    # p = (0.9, 0.1):  KL(p||d_0) = 0.9 ln(0.9/0.825) + 0.1 ln(0.1/0.175) = 0.0783102 - 0.0559616 = 0.0223486605
    #                  KL(p||d_1) = 0.9 ln(3.6) + 0.1 ln(0.1/0.75)        = 1.1528348 - 0.2014903 = 0.9513501589
    #                  S = -0.0223486605
    scores = method.score_samples(logit_split([[0.0, 0.0], [np.log(9), 0.0]]))
    np.testing.assert_allclose(scores, [-0.14384103622589042, -0.022348660497124653], rtol=1e-9)
    np.testing.assert_array_equal(method.predict(logit_split([[0.0, 1.0], [2.0, 1.0]])), [1, 0])


def test_klm_drops_never_predicted_class_and_handles_zero_probabilities():
    # Class 2 is never the argmax on the fit split, so it has no template.
    fit = logit_split([[3.0, 0.0, 1.0], [0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    method = make_method("klm").fit(fit)
    np.testing.assert_array_equal(method.template_classes_, [0, 1])
    assert method.templates_.shape == (2, 3)
    probs = np.exp(fit.logits) / np.exp(fit.logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(method.templates_[0], probs[[0, 2]].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(method.templates_[1], probs[1], rtol=1e-12)
    # A sample most like class 2 is matched against the two remaining templates only.
    query = np.array([[0.0, 0.0, 4.0]])
    p = np.exp(query[0]) / np.exp(query[0]).sum()
    kl = [np.sum(p * np.log(p / (d + 1e-12))) for d in method.templates_]
    np.testing.assert_allclose(method.score_samples(logit_split(query)), [-min(kl)], rtol=1e-10)
    # p_i = 0 (underflow) contributes nothing; q + 1e-12 keeps the log finite.
    templates, _ = kl_templates(np.array([[1.0, 0.0]]), np.array([0]), 2)
    np.testing.assert_allclose(kl_matching_score(np.array([[1.0, 0.0]]), templates), [-np.log(1 / (1 + 1e-12))],
                               atol=1e-15)
    assert np.isfinite(kl_matching_score(np.array([[0.0, 1.0]]), templates)).all()
    with pytest.raises(ValueError, match="3 classes but the templates were fit on 2"):
        make_method("klm").fit(logit_split([[1.0, 0.0], [0.0, 1.0]])).score_samples(logit_split(query))


# ------------------------------------------------------------------ shared properties

def test_knn_batch_independence_holds_to_its_stated_tolerance(monkeypatch):
    """At 256 dimensions float32 rounding does move KNN scores with the batching (up to about 1e-6
    of the largest score where measured: faiss's BLAS and non-BLAS paths, rows at other places in
    its blocks): within KNN_BATCH_RTOL of the whole split's, so ranks and metrics are unchanged."""
    monkeypatch.setattr("tests.conftest.BATCH_RTOL", KNN_BATCH_RTOL)  # KNN's tolerance, not the 1e-12 of the rest
    rng = np.random.default_rng(1)
    fit = SimpleNamespace(features=np.maximum(rng.normal(1, 1, (3000, 256)), 0), name="toy/train")
    query = np.maximum(rng.normal(1, 1.5, (700, 256)), 0)
    method = make_method("knn", k=50).fit(fit)

    def score(rows):
        return method.score_samples(SimpleNamespace(features=rows, name="toy/test"))
    whole = score(query)
    assert_batch_invariant(whole, [score(query[i:i + 7]) for i in range(0, 700, 7)])  # below BLAS's 20 rows
    assert_batch_invariant(whole, [score(query[:333]), score(query[333:])])
    assert_batch_invariant(whole, score(query[::-1].copy())[::-1])


@pytest.mark.parametrize("name", DISTANCE_METHODS)
def test_scores_do_not_depend_on_batch_composition(name, monkeypatch):
    if name == "knn":  # float32 search: its stated tolerance (methods.distance_scores.KNN)
        monkeypatch.setattr("tests.conftest.BATCH_RTOL", KNN_BATCH_RTOL)
    fit, test = toy_problem(seed=8, n_test=97)
    method = make_method(name, k=5) if name == "knn" else make_method(name)
    method.fit(fit)
    whole = method.score_samples(test)
    assert whole.dtype == np.float64 and whole.shape == (97,)
    order = np.random.default_rng(0).permutation(97)
    shuffled = SimpleNamespace(**{**vars(test), "features": test.features[order], "logits": test.logits[order]})
    assert_batch_invariant(whole[order], method.score_samples(shuffled))
    parts = []
    for rows in (slice(0, 13), slice(13, 14), slice(14, 97)):
        parts.append(method.score_samples(SimpleNamespace(**{**vars(test), "features": test.features[rows],
                                                     "logits": test.logits[rows]})))
    assert_batch_invariant(whole, parts)


@pytest.mark.parametrize("name", DISTANCE_METHODS)
def test_refit_replaces_state(name):
    fit_a, test = toy_problem(seed=9)
    fit_b, _ = toy_problem(seed=10)
    fit_b = make_split(fit_b.features + 1.0, *fit_a.head, fit_b.labels)  # same head, different features
    params = {"k": 5} if name == "knn" else {}
    reused = make_method(name, **params).fit(fit_a)
    from_a = reused.score_samples(test)
    reused.fit(fit_b)
    fresh = make_method(name, **params).fit(fit_b)
    np.testing.assert_array_equal(reused.score_samples(test), fresh.score_samples(test))
    assert not np.allclose(reused.score_samples(test), from_a)


def test_registry_entries():
    assert set(DISTANCE_METHODS) <= set(METHODS)
    assert METHODS["mahalanobis"].defaults() == {}
    assert METHODS["knn"].defaults() == {"k": 50, "fit_fraction": 1.0, "seed": 0, "index": "flat", "nprobe": 16}
    assert METHODS["vim"].defaults() == {"dim": None} and METHODS["residual"].defaults() == {"dim": None}
    assert METHODS["klm"].defaults() == {}
    assert METHODS["knn"].grid == {"k": [1, 10, 20, 50, 100, 200, 500, 1000]}
    assert make_method("knn", k="10").k == 10 and make_method("knn", k=10).label() == "knn(k=10)"
    assert make_method("vim").label() == "vim"
