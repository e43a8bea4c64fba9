"""Temperature scaling, entropy, GEN, weighted energy (VOS) and pNML: hand-worked values, the
papers' equations, and per-sample agreement with pytorch-ood 0.4.0 on the same arrays (its scores
are outlier scores, so they are negated; other conventions are named where they apply)."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pytorch_ood.detector import GEN as TorchGEN
from pytorch_ood.detector import PNML as TorchPNML
from pytorch_ood.detector import Entropy as TorchEntropy
from pytorch_ood.detector import TemperatureScaling as TorchTemperatureScaling
from pytorch_ood.detector import WeightedEBO as TorchWeightedEBO
from scipy import stats
from scipy.optimize import check_grad

from methods import METHODS, make_method
from methods.confidence_scores import (
    VOS_RIDGE,
    fit_temperature,
    fit_vos_weights,
    generalized_entropy,
    negative_entropy,
    pnml_regret,
    softmax_and_complement,
    temperature_nll,
    vos_virtual_outliers,
    weighted_energy,
)
from tests.conftest import assert_batch_invariant

CONFIDENCE = ["tempscale", "entropy", "gen", "weighted_energy", "pnml"]


def toy_split(seed=0, n=400, d=8, c=5, scale=1.0, name="toy/fit"):
    """Non-negative features, a random head, labels that agree with the argmax 70% of the time.
    ``scale`` 1 keeps every softmax probability inside pytorch-ood's clamps (1e-7, 1 - 1e-7)."""
    rng = np.random.default_rng(seed)
    W, b = rng.normal(size=(c, d)) * scale / 2, rng.normal(size=c)
    features = np.maximum(rng.normal(1, 1, (n, d)), 0)
    logits = features @ W.T + b
    labels = np.where(rng.uniform(size=n) < 0.7, logits.argmax(axis=1), rng.integers(0, c, n))
    return SimpleNamespace(logits=logits, features=features, head=(W, b), labels=labels, name=name)


def torch_head(W, b, dtype=torch.float64):
    head = torch.nn.Linear(W.shape[1], W.shape[0]).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.tensor(W))
        head.bias.copy_(torch.tensor(b))
    return head


# ---------------------------------------------------------------- registry

def test_registered_with_defaults_and_grids():
    assert set(CONFIDENCE) <= set(METHODS)
    assert METHODS["tempscale"].defaults() == {"fit_samples": 25000, "seed": 0}
    assert METHODS["entropy"].defaults() == {}
    assert METHODS["gen"].defaults() == {"gamma": 0.1, "M": 100}  # the GEN paper's defaults
    assert METHODS["gen"].grid == {"gamma": [0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0],
                                   "M": [5, 10, 50, 100, 200, 500, 1000]}
    assert METHODS["weighted_energy"].defaults() == {"sample_from": 10000, "per_class": 10, "fit_samples": 10000,
                                                     "seed": 0}
    assert METHODS["pnml"].defaults() == {} and METHODS["pnml"].grid == {}


# ---------------------------------------------------------------- hand-worked values

def test_temperature_hand_worked():
    # Two classes, logits [2, 0]: three samples labelled 0 (margin +2), one labelled 1 (margin -2).
    # NLL(beta = 1/T) = [3 log(1 + e^{-2 beta}) + log(1 + e^{2 beta})] / 4; setting its derivative to 0,
    # 3 / (1 + e^{2 beta}) = 1 / (1 + e^{-2 beta})  =>  e^{2 beta} = 3  =>  T = 2 / ln 3 = 1.8204784532.
    # The calibrated confidence is then sigmoid(2 / T) = sigmoid(ln 3) = 3/4, the accuracy.
    logits, labels = np.array([[2.0, 0.0]] * 4), np.array([0, 0, 0, 1])
    T = fit_temperature(logits, labels)
    assert T == pytest.approx(2 / np.log(3), rel=1e-5)
    fit = SimpleNamespace(logits=logits, labels=labels, name="toy/fit")
    method = make_method("tempscale").fit(fit)
    assert method.T_ == pytest.approx(T, rel=1e-12)
    np.testing.assert_allclose(method.score_samples(fit), 0.75, rtol=1e-5)
    # NLL at T: [3 ln(4/3) + ln 4] / 4 = 0.5623351446 (= the entropy of (3/4, 1/4), as at calibration)
    assert temperature_nll(logits, labels, 2 / np.log(3)) == pytest.approx(0.5623351446188083, rel=1e-12)


def test_entropy_hand_worked():
    # [0, 0]: p = (1/2, 1/2), -H = -ln 2. [ln 3, 0]: p = (3/4, 1/4), -H = 3/4 ln 3/4 + 1/4 ln 1/4 = -0.5623351446.
    # [800, 0]: p = (1, e^-800) underflows, -H -> 0 (log p = -800 stays finite).
    scores = make_method("entropy").score_samples(SimpleNamespace(
        logits=np.array([[0.0, 0.0], [np.log(3), 0.0], [800.0, 0.0]]), name="toy"))
    np.testing.assert_allclose(scores, [-np.log(2), -0.5623351446188083, 0.0], rtol=1e-12, atol=1e-300)


def test_gen_hand_worked():
    # [ln 3, 0]: p (1 - p) = 3/16 for both classes; gamma = 0.5: 2 sqrt(3/16) = sqrt(3)/2; M = 1 keeps the top
    # class only: sqrt(3)/4. M = 100 is capped at C = 2.
    logits = np.array([[np.log(3), 0.0]])
    np.testing.assert_allclose(generalized_entropy(logits, 0.5, 100), [-np.sqrt(3) / 2], rtol=1e-12)
    np.testing.assert_allclose(generalized_entropy(logits, 0.5, 1), [-np.sqrt(3) / 4], rtol=1e-12)
    # [50, 0, 0]: 1 - p_top = 2 e^-50 / (1 + 2 e^-50) = 3.9e-22 rounds to 0 as 1 - p; GEN sums
    # (p q)^0.1 = (2 e^-50)^0.1 for the top class and (e^-50)^0.1 twice: -e^-5 (2^0.1 + 2) (to 1e-21).
    expected = -np.exp(-5.0) * (2 ** 0.1 + 2)
    np.testing.assert_allclose(generalized_entropy(np.array([[50.0, 0.0, 0.0]]), 0.1, 100), [expected], rtol=1e-12)
    p, q = softmax_and_complement(np.array([[50.0, 0.0, 0.0]]))
    assert 1.0 - p[0, 0] == 0.0 and q[0, 0] == pytest.approx(2 * np.exp(-50.0), rel=1e-12)


def test_weighted_energy_hand_worked():
    # w = (1, 2, 0), f = (0, ln 2, 5): sum w_c e^{f_c} = 1 + 2 * 2 + 0 * e^5 = 5. A negative weight acts as 0 (ReLU).
    logits = np.array([[0.0, np.log(2), 5.0]])
    np.testing.assert_allclose(weighted_energy(logits, np.array([1.0, 2.0, 0.0])), [np.log(5)], rtol=1e-12)
    np.testing.assert_allclose(weighted_energy(logits, np.array([1.0, 2.0, -3.0])), [np.log(5)], rtol=1e-12)
    # uniform weights: the plain energy
    np.testing.assert_allclose(weighted_energy(logits, np.ones(3)), [np.log(1 + 2 + np.exp(5))], rtol=1e-12)


def test_pnml_hand_worked():
    # Fit features e1, e2 (unit): X^T X = I. Test feature (1, 0): x^T I x = 1, kappa = 1/2. Head W = I, b = 0:
    # f = (1, 0), p = (e / (1 + e), 1 / (1 + e)) = (0.7310585786, 0.2689414214). Each term is
    # p / (p + p^(1/2) (1 - p)) = 1 / (1 + (1 - p) / sqrt(p)): 1 / 1.3145441460 = 0.7607199827 and
    # 1 / 2.4096890614 = 0.4149913016; regret = ln(1.1757112843) / ln 2 = 0.2335338256.
    W, b = np.eye(2), np.zeros(2)
    fit = SimpleNamespace(features=np.eye(2), head=(W, b), logits=np.eye(2), name="toy/fit")
    method = make_method("pnml").fit(fit)
    np.testing.assert_allclose(method.gram_pinv_, np.eye(2), atol=1e-15)
    test = SimpleNamespace(features=np.array([[1.0, 0.0], [3.0, 0.0]]), head=(W, b), logits=np.eye(2), name="toy")
    # the feature is normalised: (3, 0) has the regret of (1, 0)
    np.testing.assert_allclose(method.score_samples(test), [-0.23353382556496038] * 2, rtol=1e-10)


def test_pnml_regret_follows_the_papers_limits():
    """Bibas et al. 2021, the regret: Gamma = log sum_c p_c / (p_c + p_c^kappa (1 - p_c)) / log C. A test
    feature orthogonal to every fit feature has x^T (X^T X)^+ x = 0, kappa = 0: every term is p_c, the
    sum is 1 and the regret 0. As x^T (X^T X)^+ x grows, kappa -> 1 and each term -> 1 / (2 - p_c)."""
    W, b = np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.2]]), np.array([0.1, -0.3])
    fit_gram_pinv = np.diag([1.0, 1.0, 0.0])  # fit features spanned only e1, e2
    orthogonal = np.array([[0.0, 0.0, 1.0]])
    np.testing.assert_allclose(pnml_regret(orthogonal, W, b, fit_gram_pinv), [0.0], atol=1e-15)
    huge = np.diag([1e12, 1e12, 1e12])
    x = np.array([[1.0, 1.0, 0.0]])
    p = np.exp(x / np.sqrt(2) @ W.T + b)
    p /= p.sum()
    expected = np.log((1 / (2 - p)).sum()) / np.log(2)
    np.testing.assert_allclose(pnml_regret(x, W, b, huge), [expected], rtol=1e-9)


# ---------------------------------------------------------------- fits

def test_fitted_temperature_is_the_nll_minimum():
    split = toy_split(1)
    T = make_method("tempscale").fit(split).T_
    # first-order condition in beta = 1/T: dNLL/dbeta = mean(E_p[f] - f_y) = 0
    p = np.exp(split.logits / T - np.log(np.exp(split.logits / T).sum(axis=1, keepdims=True)))
    gradient = np.mean((p * split.logits).sum(axis=1) - split.logits[np.arange(len(p)), split.labels])
    assert abs(gradient) < 1e-5
    grid = np.linspace(0.5 * T, 2 * T, 301)
    assert temperature_nll(split.logits, split.labels, T) <= min(temperature_nll(split.logits, split.labels, t)
                                                                  for t in grid) + 1e-12


def test_tempscale_fit_samples_and_label_errors():
    split = toy_split(2)
    full = make_method("tempscale", fit_samples=0).fit(split).T_
    assert make_method("tempscale", fit_samples=10**6).fit(split).T_ == full
    assert make_method("tempscale", fit_samples=100).fit(split).T_ != full
    with pytest.raises(ValueError, match="labels in \\[3, 7\\], outside the 5 classes"):
        make_method("tempscale").fit(SimpleNamespace(logits=split.logits, labels=split.labels + 3, name="toy/fit"))
    with pytest.raises(ValueError, match="fit_samples must be an integer >= 0"):
        make_method("tempscale", fit_samples=-1).fit(split)
    with pytest.raises(ValueError, match="call fit"):
        make_method("tempscale").score_samples(split)


def test_vos_outliers_match_brute_force_sampling():
    """VOS draws ``sample_from`` points from N(mu_c, Sigma + 1e-4 I) and keeps the least likely; the
    closed-form draw must give the same distribution of whitened squared radii (Kolmogorov-Smirnov)
    and of the outliers' coordinates."""
    rng = np.random.default_rng(3)
    dim, n = 4, 50
    mean = np.array([[1.0, -2.0, 0.5, 0.0]])
    root = rng.normal(size=(dim, dim))
    covariance = root @ root.T
    gaussian = stats.multivariate_normal(mean[0], covariance + VOS_RIDGE * np.eye(dim))
    brute = []
    for _ in range(2000):
        draws = gaussian.rvs(size=n, random_state=rng)
        brute.append(draws[gaussian.logpdf(draws).argmin()])
    brute = np.array(brute)
    ours = vos_virtual_outliers(mean, covariance, 2000, n, np.random.default_rng(4))
    precision = np.linalg.inv(covariance + VOS_RIDGE * np.eye(dim))

    def radii(x):
        return np.einsum("nd,de,ne->n", x - mean, precision, x - mean)

    assert stats.ks_2samp(radii(brute), radii(ours)).pvalue > 0.01
    for j in range(dim):
        assert stats.ks_2samp(brute[:, j], ours[:, j]).pvalue > 0.01


def test_vos_loss_gradient_and_fit():
    rng = np.random.default_rng(5)
    id_logits, outlier_logits = rng.normal(2, 1, (60, 3)), rng.normal(0, 1, (30, 3))
    w, a, c = fit_vos_weights(id_logits, outlier_logits)
    assert np.all(w > 0) and a > 0  # the ID logits are the larger here: -E_w ranks them first

    def loss(params):  # VOS's cross-entropy, written out: ID label 1, outliers 0, weights 128 : C per step
        s_in = np.log((np.exp(params[:3]) * np.exp(id_logits)).sum(axis=1))
        s_out = np.log((np.exp(params[:3]) * np.exp(outlier_logits)).sum(axis=1))
        z_in, z_out = params[3] * s_in + params[4], params[3] * s_out + params[4]
        return (128 * np.mean(np.log1p(np.exp(-z_in))) + 3 * np.mean(np.log1p(np.exp(z_out)))) / 131

    fitted = np.r_[np.log(w), a, c]
    start = np.r_[np.zeros(3), 1.0, 0.0]
    assert loss(fitted) < loss(start)
    # at the optimum the loss's finite-difference gradient vanishes
    assert check_grad(loss, lambda x: np.zeros(5), fitted, epsilon=1e-6) < 1e-4


def test_weighted_energy_fit_and_errors():
    split = toy_split(6)
    method = make_method("weighted_energy").fit(split)
    assert method.weights_.shape == (5,) and np.all(method.weights_ > 0)
    again = make_method("weighted_energy").fit(split)
    np.testing.assert_array_equal(again.weights_, method.weights_)  # seeded
    assert not np.array_equal(make_method("weighted_energy", seed=1).fit(split).weights_, method.weights_)
    with pytest.raises(ValueError, match="per_class must be an integer >= 1"):
        make_method("weighted_energy", per_class=0).fit(split)
    missing = SimpleNamespace(**{**vars(split), "labels": np.zeros(len(split.labels), int)})
    with pytest.raises(ValueError, match="weighted_energy: fit split toy/fit: 4 of 5 classes have no fit samples"):
        make_method("weighted_energy").fit(missing)


# ---------------------------------------------------------------- agreement with pytorch-ood

def test_tempscale_agrees_with_pytorch_ood():
    """Given the same T, pytorch-ood's TemperatureScaling scores -max softmax(f / T): the negation of
    ours to rounding. Its fit (L-BFGS, lr 0.01, 50 iterations from T = 1) stops short of the NLL
    minimum; fit again and again it creeps toward our T, never past it, and its NLL stays above ours."""
    split = toy_split(7)
    ours = make_method("tempscale").fit(split)
    detector = TorchTemperatureScaling(None)
    logits, labels = torch.tensor(split.logits), torch.tensor(split.labels)
    gaps = [abs(1.0 - ours.T_)]
    for _ in range(3):
        detector.fit_logits(logits, labels)
        gaps.append(abs(detector.t.item() - ours.T_))
        assert temperature_nll(split.logits, split.labels, ours.T_) < temperature_nll(split.logits, split.labels,
                                                                                      detector.t.item())
    assert all(later < earlier for earlier, later in zip(gaps, gaps[1:])) and gaps[-1] > 1e-3
    detector.t.data = torch.tensor(ours.T_, dtype=torch.float64)
    with torch.no_grad():
        reference = -detector.predict_logits(logits).numpy()
    assert np.abs(ours.score_samples(split) - reference).max() <= 1e-14


def test_entropy_and_gen_agree_with_pytorch_ood():
    """Entropy: pytorch-ood's score is H, ours -H. GEN: pytorch-ood averages over the top M, the
    official code (and ours) sums, so ours = -min(M, C) * theirs. Equal to rounding on logits whose
    probabilities stay inside pytorch-ood's clamps (1e-7 for Entropy, [1e-7, 1 - 1e-7] for GEN)."""
    logits = np.random.default_rng(8).normal(0, 2, (500, 7))
    assert 1e-7 < np.exp(logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))).min()
    split = SimpleNamespace(logits=logits, name="toy")
    tensor = torch.tensor(logits)
    entropy = make_method("entropy").score_samples(split)
    assert np.abs(entropy + TorchEntropy.score(tensor).numpy()).max() <= 1e-14
    for gamma, M in ((0.1, 100), (0.1, 3), (2.0, 7), (0.5, 1)):
        ours = make_method("gen", gamma=gamma, M=M).score_samples(split)
        reference = -min(M, 7) * TorchGEN.score(tensor, gamma=gamma, M=M).numpy()
        assert np.abs(ours - reference).max() <= 1e-14, (gamma, M)


def test_weighted_energy_agrees_with_pytorch_ood():
    """pytorch-ood's WeightedEBO scores E_w = -log sum relu(w_c) e^{f_c}; ours is phi(-E_w) = a (-E_w) + c
    with the fitted weights, so (S - c) / a = -E_w."""
    split = toy_split(9)
    logits = torch.tensor(split.logits)
    weights = np.array([0.5, 2.0, -1.0, 0.0, 3.0])
    assert np.abs(weighted_energy(split.logits, weights)
                  + TorchWeightedEBO.score(logits, torch.tensor(weights)).numpy()).max() <= 1e-13
    method = make_method("weighted_energy").fit(split)
    reference = -TorchWeightedEBO.score(logits, torch.tensor(method.weights_)).numpy()
    assert np.abs((method.score_samples(split) - method.c_) / method.a_ - reference).max() <= 1e-12


def test_pnml_agrees_with_pytorch_ood():
    """pytorch-ood's PNML runs in float32 (it casts the features) and clamps p to [1e-12, 1 - 1e-12]:
    equal to float32 rounding (the regrets are about 1e-2)."""
    fit, test = toy_split(10, n=300), toy_split(11, n=200, name="toy/test")
    test.head = fit.head
    W, b = fit.head
    detector = TorchPNML(None, torch_head(W, b, torch.float32))
    detector.fit_features(torch.tensor(fit.features), torch.tensor(fit.labels))
    reference = -detector.predict_features(torch.tensor(test.features)).numpy()
    ours = make_method("pnml").fit(fit).score_samples(test)
    assert np.abs(ours - reference).max() <= 1e-6
    np.testing.assert_allclose(ours, reference, rtol=1e-4)


# ---------------------------------------------------------------- generic properties

@pytest.mark.parametrize("name", CONFIDENCE)
def test_batch_independence_purity_and_predictions(name):
    fit, test = toy_split(12), toy_split(13, n=100, name="toy/test")
    test.head = fit.head
    copies = {k: np.copy(v) for k, v in vars(test).items() if isinstance(v, np.ndarray)}
    method = make_method(name).fit(fit)
    whole = method.score_samples(test)
    assert whole.dtype == np.float64 and np.all(np.isfinite(whole))
    for key, value in copies.items():
        np.testing.assert_array_equal(getattr(test, key), value)
    order = np.random.default_rng(0).permutation(100)
    shuffled = SimpleNamespace(**{**vars(test), "logits": test.logits[order], "features": test.features[order]})
    assert_batch_invariant(whole[order], method.score_samples(shuffled))
    np.testing.assert_array_equal(method.predict(test), test.logits.argmax(axis=1))


def test_higher_means_more_in_distribution():
    confident, flat = np.array([[8.0, 0.0, 0.0]]), np.array([[1.0, 1.0, 1.0]])
    for name in ("entropy", "gen"):
        method = make_method(name)
        assert (method.score_samples(SimpleNamespace(logits=confident, name="a"))[0]
                > method.score_samples(SimpleNamespace(logits=flat, name="b"))[0])
    assert negative_entropy(confident)[0] > negative_entropy(flat)[0]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_inputs_get_one_clear_error(bad):
    split = toy_split(14)
    split.logits[3, 1] = bad
    for name in ("tempscale", "entropy", "gen"):
        with pytest.raises(ValueError, match="toy/fit: 1 of 400 samples have NaN or infinite logits"):
            make_method(name).fit(split).score_samples(split)
    split = toy_split(14)
    split.features[3, 1] = bad
    with pytest.raises(ValueError, match="toy/fit: 1 of 400 samples have NaN or infinite features"):
        make_method("pnml").fit(split)
