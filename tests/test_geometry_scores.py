"""rmds, gmm, nnguide, fdbd, she, nci, relation, openmax and grood: per-sample agreement with
pytorch-ood 0.4.0 on the same arrays (after its sign and scale conventions: its scores are outlier
scores, higher = more OOD), transcriptions of the official code where pytorch-ood has no detector
(Relation, GROOD) or a different variant (OpenMax's eucos distance), hand-worked cases, and the
errors."""
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.spatial.distance as spd
import torch
from pytorch_ood.detector import GMM, NCI, RMD, SHE, NNGuide, OpenMax, fDBD
from scipy.stats import weibull_min
from sklearn.neighbors import NearestNeighbors

from methods import METHODS, make_method
from methods.distance_scores import KNN_BATCH_RTOL
from methods.geometry_scores import grood_gradients, relation_score, weibull_cdf, weibull_fit_high
from tests.conftest import assert_batch_invariant

GEOMETRY_METHODS = ["rmds", "gmm", "nnguide", "fdbd", "she", "nci", "relation", "openmax", "grood"]


def make_split(features, W, b, labels=None, logits=None, name="toy/split"):
    features = np.asarray(features, dtype=np.float64)
    logits = features @ W.T + b if logits is None else np.asarray(logits, dtype=np.float64)
    head = (np.asarray(W, np.float64), np.asarray(b, np.float64))
    return SimpleNamespace(features=features, logits=logits, head=head,
                           labels=None if labels is None else np.asarray(labels), name=name)


def clustered(seed=0, n_fit=400, n_test=60, n_classes=4, dim=6, scale=1.0):
    """Class clusters and a head that classifies most fit samples correctly (every class has some)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(n_classes, dim))
    labels = np.arange(n_fit) % n_classes
    W = centres / 3 + rng.normal(0, 0.1, size=(n_classes, dim))
    b = rng.normal(0, 0.1, size=n_classes)
    fit = make_split(scale * (centres[labels] + rng.normal(size=(n_fit, dim))), W / scale, b, labels, name="toy/train")
    test = make_split(scale * rng.normal(0, 3, size=(n_test, dim)), W / scale, b, name="toy/test")
    return fit, test


def linear_head(split, dtype):
    weight, bias = split.head
    head = torch.nn.Linear(weight.shape[1], weight.shape[0]).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.tensor(weight))
        head.bias.copy_(torch.tensor(bias))
    return head


def tensor(array, dtype=torch.float64):
    return torch.tensor(np.asarray(array), dtype=dtype)


# ------------------------------------------------------------------ pytorch-ood, per sample

def test_rmds_matches_pytorch_ood_rmd():
    """pytorch-ood's covariances are the unnormalised scatter sums plus 1e-6 I, so its distances are
    ours / N up to that ridge; features at scale 100 make the ridge negligible (relative 1e-13)."""
    fit, test = clustered(scale=100.0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # its class statistics are allocated in the default dtype
    try:
        theirs = RMD(None).fit_features(tensor(fit.features), tensor(fit.labels, torch.long))
        outlier = theirs.predict_features(tensor(test.features)).numpy()
    finally:
        torch.set_default_dtype(previous)
    ours = make_method("rmds").fit(fit).score_samples(test)
    np.testing.assert_allclose(ours, -outlier * len(fit.features), rtol=1e-9)


def test_gmm_matches_pytorch_ood_gmm():
    fit, test = clustered()
    theirs = GMM(None, reg=1e-6).fit_features(tensor(fit.features), tensor(fit.labels, torch.long))
    ours = make_method("gmm").fit(fit).score_samples(test)
    np.testing.assert_allclose(ours, -theirs.predict_features(tensor(test.features)).numpy(), rtol=1e-12)


def test_nnguide_matches_pytorch_ood_nnguide():
    """pytorch-ood's NNGuide and ours (faiss) search in float32: agreement to float32 rounding. Its
    bank is the whole split it is given, so ours takes the whole fit split too (fit_fraction=1)."""
    fit, test = clustered()
    head = linear_head(fit, torch.float32)
    theirs = NNGuide(None, head, k=10).fit_features(tensor(fit.features, torch.float32), tensor(fit.labels))
    outlier = theirs.predict_features(tensor(test.features, torch.float32)).numpy()
    ours = make_method("nnguide", fit_fraction=1.0).fit(fit).score_samples(test)
    np.testing.assert_allclose(ours, -outlier, rtol=1e-5, atol=1e-6 * np.abs(ours).max())


def test_fdbd_matches_pytorch_ood_fdbd():
    fit, test = clustered()
    theirs = fDBD(None, linear_head(fit, torch.float32)).fit_features(tensor(fit.features, torch.float32))
    outlier = theirs.predict_features(tensor(test.features, torch.float32)).numpy()
    ours = make_method("fdbd").fit(fit).score_samples(test)
    np.testing.assert_allclose(ours, -outlier, rtol=1e-5)


def test_she_matches_pytorch_ood_she():
    fit, test = clustered()
    theirs = SHE(None, linear_head(fit, torch.float64)).fit_features(tensor(fit.features),
                                                                     tensor(fit.labels, torch.long))
    outlier = theirs.predict_features(tensor(test.features)).detach().numpy()
    ours = make_method("she").fit(fit).score_samples(test)
    np.testing.assert_allclose(ours, -outlier, rtol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 1e-3, 0.1])
def test_nci_matches_pytorch_ood_nci(alpha):
    fit, test = clustered()
    theirs = NCI(None, linear_head(fit, torch.float32), alpha=alpha).fit_features(tensor(fit.features, torch.float32))
    outlier = theirs.predict_features(tensor(test.features, torch.float32)).numpy()
    ours = make_method("nci", alpha=alpha).fit(fit).score_samples(test)
    np.testing.assert_allclose(ours, -outlier, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", [1, 3, 4])
def test_openmax_matches_pytorch_ood_openmax(alpha):
    """pytorch-ood's OpenMax fits its MAVs and tails on every sample of a class; the paper and
    ours on the correctly classified ones, so it is given those. Its Weibull fit is a Nelder-Mead
    search (scipy exponweib.fit), ours the exact maximum likelihood: the parameters agree to the
    search's tolerance, and with ours put into its models, the scores agree to rounding."""
    fit, test = clustered()
    correct = fit.logits.argmax(axis=1) == fit.labels
    theirs = OpenMax(None, tailsize=20, alpha=alpha, euclid_weight=1.0).fit_logits(
        tensor(fit.logits[correct]), tensor(fit.labels[correct], torch.long))
    ours = make_method("openmax", tail_size=20, alpha=alpha, distance="euclidean").fit(fit)
    scores = ours.score_samples(test)
    np.testing.assert_allclose(scores, -theirs.predict_logits(tensor(test.logits)).numpy(), atol=1e-5)
    for c, model in theirs._openmax.distributions.items():
        np.testing.assert_allclose([model.c, model.scale], [ours.shapes_[c], ours.scales_[c]], rtol=1e-4)
        model.c, model.scale, model.min_val = ours.shapes_[c], ours.scales_[c], 10_000 - ours.shifts_[c]
    np.testing.assert_allclose(scores, -theirs.predict_logits(tensor(test.logits)).numpy(), rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------ transcriptions of official code

def official_relation(feat, feat_t, prob, prob_t, pow=1, thres=0.03):
    """snu-mllab/Neural-Relation-Graph, relation.py (kernel "cos_p", no top-k), on whole tensors."""
    feat = feat / torch.sqrt((feat ** 2).sum(-1)).reshape(-1, 1)
    feat_t = feat_t / torch.sqrt((feat_t ** 2).sum(-1)).reshape(-1, 1)
    rel = torch.clamp(feat @ feat_t.T, min=0.0) * (prob @ prob_t.T)
    rel_mask = (rel.abs() > thres) * rel
    return (rel_mask.sign() * rel_mask.abs() ** pow).sum(-1)


@pytest.mark.parametrize("power", [1.0, 4.0])
def test_relation_matches_the_official_code(power):
    fit, test = clustered(n_fit=300)
    ours = make_method("relation", power=power, fit_fraction=1.0).fit(fit).score_samples(test)
    reference = official_relation(tensor(test.features), tensor(fit.features),
                                  torch.softmax(tensor(test.logits), 1), torch.softmax(tensor(fit.logits), 1), power)
    np.testing.assert_allclose(ours, reference.numpy(), rtol=1e-9)


def test_relation_hand_worked():
    """Bank z_1 = (1, 0), p_1 = (.99, .01); z_2 = (0, 1), p_2 = (.5, .5).
    Query z = (.6, .8), p = (.8, .2): r_1 = .6 (.792 + .002) = .4764, r_2 = .8 (.4 + .1) = .4.
    Query (-1, 0): no positive cosine, S = 0. Query (1, 0), p = (.01, .99): r_1 = .0198 <= .03 is
    dropped, r_2 = 0, S = 0."""
    probs = np.array([[0.99, 0.01], [0.5, 0.5]])
    W, b = np.eye(2), np.zeros(2)
    fit = make_split([[1.0, 0.0], [0.0, 1.0]], W, b, labels=[0, 1], logits=np.log(probs))
    test = make_split([[3.0, 4.0], [-1.0, 0.0], [1.0, 0.0]], W, b,
                      logits=np.log([[0.8, 0.2], [0.5, 0.5], [0.01, 0.99]]))
    method = make_method("relation", fit_fraction=1.0).fit(fit)  # rtol: z = v / (||v|| + 1e-10)
    np.testing.assert_allclose(method.score_samples(test), [0.4764 + 0.4, 0.0, 0.0], rtol=1e-9)
    squared = make_method("relation", power=2.0, fit_fraction=1.0).fit(fit)
    np.testing.assert_allclose(squared.score_samples(test)[0], 0.4764 ** 2 + 0.4 ** 2, rtol=1e-9)
    # the threshold is what removed the third query's edge
    unthresholded = relation_score(np.array([[1.0, 0.0]]), np.array([[0.01, 0.99]]), np.eye(2), probs, 1.0, 0.0)
    np.testing.assert_allclose(unthresholded, [0.0198], rtol=1e-12)


def test_grood_gradients_match_autograd_of_the_nearest_prototype_loss():
    """OpenOOD's ``_compute_grad``: the gradient of CE(-||h - p_j||, y) with respect to the OOD
    prototype, by autograd, one sample at a time."""
    rng = np.random.default_rng(3)
    prototypes, features = rng.normal(size=(5, 7)), rng.normal(0, 2, size=(20, 7))
    ood = prototypes.mean(axis=0)
    predicted = rng.integers(0, 5, size=20)  # any class label: the gradient does not depend on it
    expected = []
    for h, y in zip(tensor(features), predicted):
        noise = tensor(ood).requires_grad_(True)
        scores = -torch.norm(h[None] - torch.cat([tensor(prototypes), noise[None]]), dim=1)
        loss = torch.nn.functional.cross_entropy(scores[None], torch.tensor([int(y)]))
        expected.append(torch.autograd.grad(loss, noise)[0].numpy())
    np.testing.assert_allclose(grood_gradients(features, prototypes, ood), expected, rtol=1e-10, atol=1e-14)


def test_grood_searches_the_correctly_classified_fit_gradients():
    fit, test = clustered(seed=2)
    method = make_method("grood", k=3, fit_fraction=1.0).fit(fit)
    correct = fit.logits.argmax(axis=1) == fit.labels
    prototypes = np.stack([fit.features[fit.labels == c].mean(axis=0) for c in range(4)])
    bank = grood_gradients(fit.features[correct], prototypes, prototypes.mean(axis=0))
    np.testing.assert_allclose(method.bank_, bank, rtol=1e-12)
    queries = grood_gradients(test.features, prototypes, prototypes.mean(axis=0))
    distances, _ = NearestNeighbors(n_neighbors=3, algorithm="brute").fit(bank).kneighbors(queries)
    np.testing.assert_allclose(method.score_samples(test), -distances[:, -1] ** 2, rtol=1e-9)


def test_grood_hand_worked():
    """1-D: prototypes -1 and 1 (class means), OOD prototype 0. g(v) = sign(v) q_0(v) with
    q_0(v) = e^-|v| / (e^-|v+1| + e^-|v-1| + e^-|v|) (constant for |v| >= 1); the bank holds g of
    the four fit samples."""
    features = np.array([[-1.5], [-0.5], [0.5], [1.5]])
    W, b = np.array([[-1.0], [1.0]]), np.zeros(2)
    fit = make_split(features, W, b, labels=[0, 0, 1, 1])

    def q0(v):
        return np.exp(-abs(v)) / (np.exp(-abs(v + 1)) + np.exp(-abs(v - 1)) + np.exp(-abs(v)))

    bank = np.array([-q0(1.5), -q0(0.5), q0(0.5), q0(1.5)])
    method = make_method("grood", fit_fraction=1.0).fit(fit)
    np.testing.assert_allclose(method.ood_prototype_, [0.0], atol=1e-15)
    np.testing.assert_allclose(method.bank_[:, 0], bank, rtol=1e-12)
    expected = [-np.min((q0(0.8) - bank) ** 2), -np.min((-q0(0.2) - bank) ** 2)]
    np.testing.assert_allclose(method.score_samples(make_split([[0.8], [-0.2]], W, b)), expected, rtol=1e-12)


def official_openmax_unknown(logits, mavs, models, alpha, distance):
    """abhijitbendale/OSDN, compute_openmax.py (recalibrate_scores, computeOpenMaxProbability) for
    one channel, with ``models[c](d)`` in place of libMR's w_score and scipy's distances."""
    out = []
    for v in logits:
        ranked = v.argsort().ravel()[::-1]
        ranked_alpha = np.zeros(len(v))
        for i in range(alpha):
            ranked_alpha[ranked[i]] = ((alpha + 1) - (i + 1)) / float(alpha)
        fc8, unknown = [], []
        for c in range(len(v)):
            if distance == "eucos":
                d = spd.euclidean(mavs[c], v) / 200.0 + spd.cosine(mavs[c], v)
            else:
                d = spd.euclidean(mavs[c], v)
            modified = v[c] * (1 - models[c](d) * ranked_alpha[c])
            fc8.append(modified)
            unknown.append(v[c] - modified)
        denominator = np.sum(np.exp(fc8)) + np.exp(np.sum(unknown))
        out.append(np.exp(np.sum(unknown)) / denominator)
    return np.array(out)


@pytest.mark.parametrize("distance", ["eucos", "euclidean"])
def test_openmax_matches_the_official_recalibration(distance):
    fit, test = clustered(seed=4)
    method = make_method("openmax", alpha=3, distance=distance).fit(fit)
    models = [lambda d, c=c: weibull_cdf(d + method.shifts_[c], method.shapes_[c], method.scales_[c])
              for c in range(4)]
    expected = official_openmax_unknown(test.logits, method.mavs_, models, 3, distance)
    np.testing.assert_allclose(method.score_samples(test), -expected, rtol=1e-12, atol=1e-15)


def test_weibull_fit_is_the_maximum_likelihood_of_the_shifted_tail():
    """libMR's FitHigh: the tail shifted to start at 10,000, a two-parameter Weibull by maximum
    likelihood. scipy's generic search reaches the same parameters (to its tolerance) and no
    higher likelihood."""
    tail = np.sort(np.random.default_rng(5).gamma(4.0, 1.5, size=200))[-20:]
    shape, scale, shift = weibull_fit_high(tail)
    assert shift == pytest.approx(10_000 - tail.min(), abs=0) and (tail + shift).min() == 10_000
    c, _, s = weibull_min.fit(tail + shift, shape, floc=0, scale=scale)
    np.testing.assert_allclose([shape, scale], [c, s], rtol=1e-4)
    ours = weibull_min.logpdf(tail + shift, shape, scale=scale).sum()
    assert ours >= weibull_min.logpdf(tail + shift, c, scale=s).sum() - 1e-9
    for factor in (0.999, 1.001):  # a maximum in each direction
        assert weibull_min.logpdf(tail + shift, shape * factor, scale=scale).sum() < ours
        assert weibull_min.logpdf(tail + shift, shape, scale=scale * factor).sum() < ours
    np.testing.assert_allclose(weibull_cdf(np.array([-5.0, scale, 1e9]), shape, scale),
                               [0.0, 1 - np.exp(-1), 1.0], rtol=1e-12)
    with pytest.raises(ValueError, match="at least two distinct distances"):
        weibull_fit_high(np.array([3.0, 3.0]))


def test_openmax_hand_worked_far_query_moves_its_top_logit_to_unknown():
    """Far from every MAV the Weibull CDF is 1: with alpha = 1 the top logit v_2 = 3 moves entirely
    to the unknown class, P(unknown) = e^3 / (e^3 + e^0 + 2 e^-40)."""
    fit, _ = clustered(seed=6, n_classes=3, dim=3)
    method = make_method("openmax", alpha=1).fit(fit)
    query = make_split(np.zeros((1, 3)), *fit.head, logits=[[-40.0, -40.0, 3.0]])
    expected = np.exp(3) / (np.exp(3) + 1 + 2 * np.exp(-40))
    np.testing.assert_allclose(method.score_samples(query), [-expected], rtol=1e-14)


# ------------------------------------------------------------------ hand-worked cases

def test_rmds_hand_worked():
    """1-D: class 0 at {0, 2}, class 1 at {4, 6}: tied variance 1, background mean 3 and variance 5.
    v = 1: min_k MD_k = 0, MD_0 = 4/5, S = 0.8. v = 3: min_k MD_k = 4, MD_0 = 0, S = -4."""
    W, b = np.array([[-1.0], [1.0]]), np.array([3.0, -3.0])
    fit = make_split([[0.0], [2.0], [4.0], [6.0]], W, b, labels=[0, 0, 1, 1])
    scores = make_method("rmds").fit(fit).score_samples(make_split([[1.0], [3.0]], W, b))
    np.testing.assert_allclose(scores, [0.8, -4.0], rtol=1e-12)


def test_gmm_hand_worked():
    """Same data, per-class variances 1, weights 1/2, reg 0: at v = 1,
    S = log(1/2 N(1|1,1) + 1/2 N(1|5,1)) = -log 2 - log(2 pi)/2 + log(1 + e^-8). Tied: the same here."""
    W, b = np.array([[-1.0], [1.0]]), np.array([3.0, -3.0])
    fit = make_split([[0.0], [2.0], [4.0], [6.0]], W, b, labels=[0, 0, 1, 1])
    expected = -np.log(2) - np.log(2 * np.pi) / 2 + np.log1p(np.exp(-8.0))
    for covariance in ("class", "tied"):
        method = make_method("gmm", covariance=covariance, reg=0.0).fit(fit)
        np.testing.assert_allclose(method.score_samples(make_split([[1.0]], W, b)), [expected], rtol=1e-12)


def test_nnguide_hand_worked():
    """Bank: v_1 = (2, 0) with LSE ln 4, v_2 = (0, 1) with LSE ln 2. Query (1, 1), LSE ln 2:
    similarities ln4/sqrt2 and ln2/sqrt2; k = 1: S = ln2 * sqrt2 ln2; k = 2: S = ln2 * 3 ln2 / (2 sqrt2)."""
    W, b = np.eye(2), np.zeros(2)
    fit = make_split([[2.0, 0.0], [0.0, 1.0]], W, b, labels=[0, 1], logits=[[np.log(3), 0.0], [0.0, 0.0]])
    test = make_split([[1.0, 1.0]], W, b, logits=[[0.0, 0.0]])
    ln2 = np.log(2)
    for k, guidance in ((1, np.sqrt(2) * ln2), (2, 3 * ln2 / (2 * np.sqrt(2)))):
        method = make_method("nnguide", k=k, fit_fraction=1.0).fit(fit)  # rtol: faiss searches in float32
        np.testing.assert_allclose(method.score_samples(test), [ln2 * guidance], rtol=1e-6)


def test_fdbd_hand_worked():
    """Head rows (1, 0), (0, 1), (-1, 0), b = 0; v = (3, 1): f = (3, 1, -3), y = 0; the distances to
    the two boundaries are 2 / sqrt2 and 6 / 2, their mean (sqrt2 + 3) / 2. Fit mean (1, 1):
    ||v - mu|| = 2; "norm": ||v|| = sqrt10."""
    W, b = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), np.zeros(3)
    fit = make_split([[0.0, 0.0], [2.0, 2.0]], W, b, labels=[0, 1])
    test = make_split([[3.0, 1.0]], W, b)
    mean_boundary = (np.sqrt(2) + 3) / 2
    np.testing.assert_allclose(make_method("fdbd").fit(fit).score_samples(test), [mean_boundary / 2], rtol=1e-12)
    np.testing.assert_allclose(make_method("fdbd", normalizer="norm").fit(fit).score_samples(test),
                               [mean_boundary / np.sqrt(10)], rtol=1e-12)
    # an all-zero feature with the "norm" normaliser: finite (floored denominator), not inf
    assert np.isfinite(make_method("fdbd", normalizer="norm").fit(fit).score_samples(make_split([[0.0, 0.0]], W,
                                                                                                   b + [1, 0, 0])))


def test_she_hand_worked():
    """Head = identity. Class 0 fit samples (1, 0), (3, 0) are classified correctly, (0, 5) is not
    (it is predicted 1) and is left out: s_0 = (2, 0); s_1 = (0, 2). v = (3, 1) -> y = 0, S = 6;
    v = (1, 4) -> y = 1, S = 8."""
    W, b = np.eye(2), np.zeros(2)
    fit = make_split([[1.0, 0.0], [3.0, 0.0], [0.0, 5.0], [0.0, 2.0]], W, b, labels=[0, 0, 0, 1])
    method = make_method("she").fit(fit)
    np.testing.assert_allclose(method.patterns_, [[2.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(method.score_samples(make_split([[3.0, 1.0], [1.0, 4.0]], W, b)), [6.0, 8.0])


def test_nci_hand_worked():
    """Head rows (1, 0), (0, 2); fit mean (1, 1); v = (4, 5): f = (4, 10), y = 1, w_y = (0, 2);
    v - mu = (3, 4), so w_y.(v - mu) / ||v - mu|| = 8 / 5; alpha ||v||_1 = 0.1 * 9: S = 2.5."""
    W, b = np.array([[1.0, 0.0], [0.0, 2.0]]), np.zeros(2)
    fit = make_split([[0.0, 0.0], [2.0, 2.0]], W, b, labels=[0, 1])
    scores = make_method("nci", alpha=0.1).fit(fit).score_samples(make_split([[4.0, 5.0]], W, b))
    np.testing.assert_allclose(scores, [2.5], rtol=1e-12)


# ------------------------------------------------------------------ shared properties and errors

@pytest.mark.parametrize("name", GEOMETRY_METHODS)
def test_refit_replaces_state_and_higher_is_more_in_distribution(name):
    fit_a, test = clustered(seed=9)
    fit_b, _ = clustered(seed=10)
    params = {"fit_fraction": 1.0} if "fit_fraction" in METHODS[name].defaults() else {}
    reused = make_method(name, **params).fit(fit_a)
    from_a = reused.score_samples(test)
    reused.fit(fit_b)
    fresh = make_method(name, **params).fit(fit_b)
    np.testing.assert_array_equal(reused.score_samples(test), fresh.score_samples(test))
    assert not np.allclose(reused.score_samples(test), from_a)
    # fit samples (ID) score higher on average than broad noise around the origin
    method = make_method(name, **params).fit(fit_a)
    assert method.score_samples(fit_a).mean() > method.score_samples(test).mean(), name


def test_nnguide_batch_independence_is_knns_float32_tolerance(monkeypatch):
    """NNGuide searches with KNN's faiss index in float32, whose products round differently with a
    row's place in the batch (and below 20 queries faiss does not use BLAS): scores agree to
    KNN_BATCH_RTOL, not to the 1e-12 of float64 methods (measured here: 6e-8 of the largest)."""
    rng = np.random.default_rng(0)
    W, b = rng.normal(size=(10, 256)) / 16, rng.normal(size=10)
    fit = make_split(np.maximum(rng.normal(1, 1, size=(3000, 256)), 0), W, b, labels=np.arange(3000) % 10)
    query = np.maximum(rng.normal(1, 1.5, size=(2100, 256)), 0)
    method = make_method("nnguide").fit(fit)
    whole = method.score_samples(make_split(query, W, b))
    pieces = [method.score_samples(make_split(query[rows], W, b)) for rows in (slice(0, 7), slice(7, 1500),
                                                                                slice(1500, None))]
    monkeypatch.setattr("tests.conftest.BATCH_RTOL", KNN_BATCH_RTOL)
    assert_batch_invariant(whole, pieces)


def test_registry_entries():
    assert set(GEOMETRY_METHODS) <= set(METHODS)
    assert METHODS["rmds"].defaults() == {} and METHODS["she"].defaults() == {}
    assert METHODS["gmm"].defaults() == {"covariance": "class", "reg": 1e-6}
    assert METHODS["nnguide"].defaults() == {"k": 10, "fit_fraction": 0.01, "seed": 0}
    assert METHODS["fdbd"].defaults() == {"normalizer": "mean"}
    assert METHODS["nci"].defaults() == {"alpha": 1e-4}
    assert METHODS["relation"].defaults() == {"power": 1.0, "fit_fraction": 0.01, "seed": 0}
    assert METHODS["openmax"].defaults() == {"tail_size": 20, "alpha": 10, "distance": "eucos"}
    assert METHODS["grood"].defaults() == {"k": 1, "fit_fraction": 0.01, "seed": 0}
    assert METHODS["nci"].grid == {"alpha": [1e-4, 1e-3, 1e-2, 1e-1]}
    assert METHODS["relation"].grid == {"power": [1.0, 2.0, 4.0, 6.0, 8.0]}
    assert METHODS["grood"].grid == {"k": [1, 10, 20, 50, 100]}


def test_banks_are_seeded_fractions_of_at_least_1000_samples():
    fit, _ = clustered(n_fit=3000)
    assert make_method("nnguide").fit(fit).index_.ntotal == 1000  # 1% of 3,000 is 30
    assert make_method("nnguide", k=2, fit_fraction=0.5).fit(fit).index_.ntotal == 1500
    assert len(make_method("grood").fit(fit).bank_) == 1000
    a, b = make_method("relation", seed=1).fit(fit), make_method("relation", seed=2).fit(fit)
    assert len(a.bank_) == 1000 and not np.array_equal(a.bank_, b.bank_)
    np.testing.assert_array_equal(a.bank_, make_method("relation", seed=1).fit(fit).bank_)
    small, _ = clustered(n_fit=400)
    assert len(make_method("relation").fit(small).bank_) == 400  # a small fit split is kept whole


def test_errors():
    fit, test = clustered()
    narrow = make_split(test.features[:, :5], fit.head[0][:, :5], fit.head[1])
    three_classes = make_split(test.features, fit.head[0][:3], fit.head[1][:3])
    for name in GEOMETRY_METHODS:
        with pytest.raises(ValueError, match="call fit"):
            make_method(name).score_samples(test)
        method = make_method(name).fit(fit)
        if name != "openmax":  # it reads the logits alone
            with pytest.raises(ValueError, match="toy/split has 5-dim features but the method was fit on 6-dim"):
                method.score_samples(narrow)
        if name in ("fdbd", "she", "nci", "relation", "openmax"):  # they index or compare per class
            with pytest.raises(ValueError, match="toy/split has 3 classes but the method was fit on 4"):
                method.score_samples(three_classes)
    with pytest.raises(ValueError, match="covariance must be 'class' or 'tied'"):
        make_method("gmm", covariance="full").fit(fit)
    with pytest.raises(ValueError, match="normalizer must be 'mean' or 'norm'"):
        make_method("fdbd", normalizer="origin").fit(fit)
    with pytest.raises(ValueError, match="distance must be 'eucos' or 'euclidean'"):
        make_method("openmax", distance="cosine").fit(fit)
    with pytest.raises(ValueError, match="tail_size must be an integer >= 2"):
        make_method("openmax", tail_size=1).fit(fit)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 400\]"):
        make_method("nnguide", k=401).fit(fit)
    with pytest.raises(ValueError, match=r"fit_fraction must be in \(0, 1\]"):
        make_method("relation", fit_fraction=0.0).fit(fit)
    missing = make_split(fit.features, *fit.head, labels=np.where(fit.labels == 2, 0, fit.labels))
    for name in ("rmds", "gmm", "she", "openmax", "grood"):
        with pytest.raises(ValueError, match=rf"{name}: fit split toy/split.*classes 2\b"):
            make_method(name).fit(missing)
    flat = make_split(np.c_[fit.features, np.full(len(fit.features), 2.0)], np.c_[fit.head[0], np.zeros(4)],
                      fit.head[1], fit.labels)  # a constant feature: singular covariances
    with pytest.raises(ValueError, match="covariance of class 0 on toy/split is not positive definite even with "
                                         "reg=0.0; increase reg"):
        make_method("gmm", reg=0.0).fit(flat)
    twins = make_split(fit.features, np.r_[fit.head[0][:3], fit.head[0][:1]], fit.head[1], fit.labels)
    with pytest.raises(ValueError, match="classes 0 and 3 of toy/split's head have the same weight vector"):
        make_method("fdbd").fit(twins)
    big = SimpleNamespace(features=np.zeros((2, 2048)), logits=np.zeros((2, 1000)), labels=np.array([0, 1]),
                          name="big")
    with pytest.raises(ValueError, match=r"1000 x 2048 x 2048 float64 factors \(31.2 GiB\); use covariance='tied'"):
        make_method("gmm").fit(big)
