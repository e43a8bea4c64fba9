"""GradNorm, RG (multiplicative and additive) and the RG Table 2 U*V variants: autograd agreement,
hand-worked values, alpha_s fitting, the LSE <= 0 diagnostic, batch independence and errors."""
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from methods import METHODS, make_method
from methods.gradient_scores import clipped_feature_sum, nonpositive_lse_fraction
from tests.conftest import assert_batch_invariant

FEATURE_METHODS = ["gradnorm", "rg", "rg_add", "igoe", "gradnorm_u_clipped_v", "clipped_v"]

# Two 2-class samples used in the hand-worked cases.
#   row 0: logits [0, 0]      -> p = [1/2, 1/2], LSE_1 = log 2
#   row 1: logits [log 3, 0]  -> p = [3/4, 1/4], LSE_1 = log(3 + 1) = 2 log 2
#   row 0 features [0.5, 2.0, 0]: ||v||_1 = 2.5; with k=1, sum min(v, 1) = 0.5 + 1 + 0 = 1.5
#   row 1 features [0, 0, 0]:     ||v||_1 = 0,   clipped sum 0
LOG3 = np.log(3.0)
LOGITS = np.array([[0.0, 0.0], [LOG3, 0.0]])
FEATURES = np.array([[0.5, 2.0, 0.0], [0.0, 0.0, 0.0]])


def split(logits, features, name="toy/test"):
    return SimpleNamespace(logits=np.asarray(logits, dtype=np.float64),
                           features=np.asarray(features, dtype=np.float64), name=name)


def random_split(n=60, c=5, d=12, seed=0, name="toy/test"):
    rng = np.random.default_rng(seed)
    return split(rng.normal(0, 3, size=(n, c)), np.maximum(rng.normal(0.5, 1.0, size=(n, d)), 0.0), name)


def fitted(name, fit_split=None, **params):
    method = make_method(name, **params)
    return method.fit(fit_split if fit_split is not None else random_split(seed=99, name="toy/train"))


# ---------------------------------------------------------------- GradNorm

@pytest.mark.parametrize("T", [1.0, 2.0])
def test_gradnorm_closed_form_equals_per_sample_autograd_of_the_official_loss(T):
    torch.manual_seed(0)
    n, c, d = 20, 7, 16
    W = torch.randn(c, d, dtype=torch.float64)
    b = torch.randn(c, dtype=torch.float64)
    v = torch.rand(n, d, dtype=torch.float64) * 3  # non-negative, post-ReLU-like
    logits = v @ W.T + b
    expected = []
    for i in range(n):  # batch size 1, as the official code
        weight = W.clone().requires_grad_(True)
        f = weight @ v[i] + b
        loss = (-torch.log_softmax(f / T, dim=0)).sum()  # all-ones target
        (grad,) = torch.autograd.grad(loss, weight)     # last-layer weight only
        expected.append(grad.abs().sum().item())
    got = make_method("gradnorm", T=T).score_samples(split(logits.numpy(), v.numpy()))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_gradnorm_hand_worked():
    # T=1. Row 0: C p - 1 = [0, 0] -> S = 0.
    #      Row 1: C p - 1 = [2*3/4 - 1, 2*1/4 - 1] = [0.5, -0.5] -> sum |.| = 1; times ||v||_1.
    #      Give row 1 the features [0.5, 2.0, 0] too: S = 1 * 2.5 / 1 = 2.5.
    features = np.array([[0.5, 2.0, 0.0], [0.5, 2.0, 0.0]])
    np.testing.assert_allclose(make_method("gradnorm").score_samples(split(LOGITS, features)), [0.0, 2.5], atol=1e-15)
    # T=2, row 1: p = softmax([log3 / 2, 0]) = [s/(1+s), 1/(1+s)], s = sqrt 3.
    #   |2p - 1| = (s - 1)/(s + 1) for both classes -> sum = 2(s-1)/(s+1) = (s-1)^2 = 4 - 2 sqrt 3.
    #   S = (1/2) * (4 - 2 sqrt 3) * 2.5 = 5 - 2.5 sqrt 3 = 0.669872981...
    np.testing.assert_allclose(make_method("gradnorm", T=2.0).score_samples(split(LOGITS, features))[1],
                               5 - 2.5 * np.sqrt(3), rtol=1e-12)


# ---------------------------------------------------------------- RG multiplicative

def test_rg_hand_worked():
    # k=1, T=1. Row 0: LSE = log 2, clipped sum = 1.5 -> S = 1.5 log 2. Row 1: clipped sum 0 -> S = 0.
    np.testing.assert_allclose(make_method("rg").score_samples(split(LOGITS, FEATURES)), [1.5 * np.log(2), 0.0],
                               rtol=1e-12)
    # k=0.4: clipped sum = 0.4 + 0.4 + 0 = 0.8.  T=2: LSE_2 = 2 log(e^0 + e^0) = 2 log 2.
    np.testing.assert_allclose(make_method("rg", k=0.4, T=2.0).score_samples(split(LOGITS[:1], FEATURES[:1])),
                               [0.8 * 2 * np.log(2)], rtol=1e-12)
    # Unclipped logits: row 1 with features [0.5, 2, 0] -> LSE = log 4 = 2 log 2, S = 1.5 * 2 log 2 = 3 log 2.
    np.testing.assert_allclose(make_method("rg").score_samples(split(LOGITS[1:], FEATURES[:1])), [3 * np.log(2)],
                               rtol=1e-12)


def test_clipped_feature_sum_keeps_negative_values():
    np.testing.assert_array_equal(clipped_feature_sum(np.array([[-1.0, 0.5, 3.0]]), 1.0), [0.5])


def test_rg_with_large_k_equals_igoe():
    data = random_split(seed=3)
    np.testing.assert_allclose(make_method("rg", k=1e12).score_samples(data), make_method("igoe").score_samples(data),
                               rtol=1e-12)


def test_rg_reports_the_fraction_of_nonpositive_lse(caplog):
    rng = np.random.default_rng(4)
    logits = rng.normal(5, 1, size=(10, 3))
    logits[[1, 4, 7]] = -50.0  # LSE = -50 + log 3 < 0 for 3 of 10 samples
    data = split(logits, rng.random((10, 4)), name="toy/lse")
    method = make_method("rg")
    with caplog.at_level(logging.INFO, logger="methods.gradient_scores"):
        method.score_samples(data)
    assert method.last_nonpositive_lse_fraction_ == pytest.approx(0.3)
    assert nonpositive_lse_fraction(logits) == pytest.approx(0.3)
    assert "rg on toy/lse: 0.3 of samples have LSE <= 0" in caplog.text
    # Recomputed on each scored split.
    method.score_samples(split(logits[[0, 2]], rng.random((2, 4))))
    assert method.last_nonpositive_lse_fraction_ == 0.0
    igoe = make_method("igoe")
    igoe.score_samples(data)
    assert igoe.last_nonpositive_lse_fraction_ == pytest.approx(0.3)


# ---------------------------------------------------------------- RG additive

def test_rg_add_hand_worked():
    # Fit on the two rows: LSE = [log 2, 2 log 2] -> population std = log 2 / 2;
    # clipped sums = [1.5, 0] -> std = 0.75. alpha_s = (log 2 / 2) / 0.75 = (2/3) log 2.
    # gamma = 0.5 -> alpha = log 2 / 3. n_fit=1000 > 2 rows, so all rows are used.
    method = make_method("rg_add").fit(split(LOGITS, FEATURES, name="toy/train"))
    assert method.alpha_s_ == pytest.approx(2 / 3 * np.log(2), rel=1e-12)
    assert method.alpha_ == pytest.approx(np.log(2) / 3, rel=1e-12)
    # Scores: row 0 = log 2 + (log 2 / 3) * 1.5 = 1.5 log 2; row 1 = 2 log 2 + 0.
    np.testing.assert_allclose(method.score_samples(split(LOGITS, FEATURES)), [1.5 * np.log(2), 2 * np.log(2)],
                               rtol=1e-12)


def test_rg_add_alpha_s_is_the_std_ratio_on_the_seeded_subsample():
    data = random_split(n=3000, seed=5, name="toy/train")
    method = make_method("rg_add", k=0.7, gamma=0.6, n_fit=1000, seed=3).fit(data)
    rows = np.random.default_rng(3).choice(3000, size=1000, replace=False)
    lse = np.log(np.exp(data.logits[rows]).sum(axis=1))
    clipped = np.minimum(data.features[rows], 0.7).sum(axis=1)
    assert method.alpha_s_ == pytest.approx(np.std(lse) / np.std(clipped), rel=1e-10)
    assert method.alpha_ == pytest.approx(0.6 * method.alpha_s_, rel=1e-12)
    # The seed matters (a different subsample), and refitting with the same seed is deterministic.
    assert make_method("rg_add", k=0.7, seed=4).fit(data).alpha_s_ != method.alpha_s_
    assert make_method("rg_add", k=0.7, gamma=0.6, seed=3).fit(data).alpha_s_ == method.alpha_s_


def test_rg_add_uses_all_rows_when_n_fit_exceeds_the_split():
    data = random_split(n=50, seed=6, name="toy/train")
    lse = np.log(np.exp(data.logits).sum(axis=1))
    clipped = np.minimum(data.features, 1.0).sum(axis=1)
    for n_fit in (50, 1000):
        method = make_method("rg_add", n_fit=n_fit).fit(data)
        assert method.alpha_s_ == pytest.approx(np.std(lse) / np.std(clipped), rel=1e-10)


def test_rg_add_refit_recomputes_alpha():
    first, second = random_split(seed=7, name="toy/a"), random_split(seed=8, name="toy/b")
    second.features = second.features * 0.3  # a clearly different clipped-sum spread
    method = make_method("rg_add").fit(first)
    alpha_first = method.alpha_
    method.fit(second)
    fresh = make_method("rg_add").fit(second)
    assert method.alpha_s_ == fresh.alpha_s_ and method.alpha_ == fresh.alpha_
    assert method.alpha_ != alpha_first
    np.testing.assert_array_equal(method.score_samples(first), fresh.score_samples(first))


def test_rg_add_errors():
    with pytest.raises(ValueError, match="call fit"):
        make_method("rg_add").score_samples(random_split())
    constant = split(np.random.default_rng(0).normal(size=(5, 3)), np.full((5, 4), 2.0), name="toy/train")
    with pytest.raises(ValueError, match="std of sum_j min\\(v_j, k=1.0\\) is 0.0 on 5 fit samples"):
        make_method("rg_add").fit(constant)
    with pytest.raises(ValueError, match="gamma must be finite and >= 0"):
        make_method("rg_add", gamma=-0.5).fit(random_split())
    with pytest.raises(ValueError, match="n_fit must be an integer >= 2"):
        make_method("rg_add", n_fit=0).fit(random_split())


# ---------------------------------------------------------------- Table 2 variants

def test_igoe_hand_worked():
    # Row 0: log 2 * ||[0.5, 2, 0]||_1 = 2.5 log 2. Row 1: 2 log 2 * 0 = 0.
    np.testing.assert_allclose(make_method("igoe").score_samples(split(LOGITS, FEATURES)), [2.5 * np.log(2), 0.0],
                               rtol=1e-12)


def test_gradnorm_u_clipped_v_hand_worked():
    # Row 1 logits [log 3, 0]: U = |1/2 - 3/4| + |1/2 - 1/4| = 0.5; with features [0.5, 2, 0], k=1: V = 1.5.
    # S = 0.75. Row 0 logits [0, 0]: U = 0 -> S = 0.
    features = np.array([[0.5, 2.0, 0.0], [0.5, 2.0, 0.0]])
    np.testing.assert_allclose(make_method("gradnorm_u_clipped_v").score_samples(split(LOGITS, features)), [0.0, 0.75],
                               atol=1e-15)
    # k=0.4: V = 0.8 -> S = 0.4.
    np.testing.assert_allclose(make_method("gradnorm_u_clipped_v", k=0.4).score_samples(split(LOGITS, features))[1],
                               0.4, rtol=1e-12)


def test_clipped_v_hand_worked():
    np.testing.assert_allclose(make_method("clipped_v").score_samples(split(LOGITS, FEATURES)), [1.5, 0.0])
    np.testing.assert_allclose(make_method("clipped_v", k=0.4).score_samples(split(LOGITS, FEATURES)), [0.8, 0.0])


# ---------------------------------------------------------------- shared properties

@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_scores_do_not_depend_on_batch_composition(name):
    method = fitted(name)
    data = random_split(n=50, seed=9)
    whole = method.score_samples(data)
    assert whole.dtype == np.float64 and whole.shape == (50,)
    order = np.random.default_rng(10).permutation(50)
    assert_batch_invariant(whole[order], method.score_samples(split(data.logits[order], data.features[order])))
    parts = [method.score_samples(split(data.logits[s], data.features[s])) for s in (slice(0, 13), slice(13, None))]
    assert_batch_invariant(whole, parts)


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_predict_is_argmax_of_the_unclipped_logits(name):
    data = split([[0.1, 2.0], [3.0, -1.0]], FEATURES)
    np.testing.assert_array_equal(fitted(name).predict(data), [1, 0])


def test_registry_defaults_and_grids():
    assert set(FEATURE_METHODS) <= set(METHODS)
    assert METHODS["gradnorm"].defaults() == {"T": 1.0}
    assert METHODS["rg"].defaults() == {"k": 1.0, "T": 1.0}
    assert METHODS["rg_add"].defaults() == {"k": 1.0, "gamma": 0.5, "n_fit": 1000, "seed": 0}
    assert METHODS["igoe"].defaults() == {}
    assert METHODS["gradnorm_u_clipped_v"].defaults() == {"k": 1.0}
    assert METHODS["clipped_v"].defaults() == {"k": 1.0}
    assert METHODS["rg"].grid == {"k": [0.1, 0.3, 0.5, 0.7, 1.0, 2.0, 3.0, 5.0], "T": [0.5, 1.0, 2.0, 4.0, 8.0]}
    assert METHODS["rg_add"].grid == {"gamma": [0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.2]}
    assert METHODS["gradnorm"].grid == {"T": [1.0]}
    method = make_method("rg_add", gamma="0.6", n_fit="500")
    assert method.gamma == 0.6 and method.n_fit == 500 and isinstance(method.n_fit, int)
    assert method.label() == "rg_add(gamma=0.6,n_fit=500)"
    for name in FEATURE_METHODS:
        assert METHODS[name].reads == ("logits", "features")


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("name", ["rg", "rg_add", "gradnorm_u_clipped_v", "clipped_v"])
@pytest.mark.parametrize("k", [-1.0, 0.0, np.nan])
def test_non_positive_k_is_rejected(name, k):
    method = make_method(name, k=k)
    with pytest.raises(ValueError, match=f"{name}: clip value k must be > 0"):
        method.fit(random_split()).score_samples(random_split())


@pytest.mark.parametrize("name", ["gradnorm", "rg"])
@pytest.mark.parametrize("T", [0.0, -1.0])
def test_non_positive_temperature_is_rejected(name, T):
    with pytest.raises(ValueError, match=f"{name}: temperature T must be > 0"):
        make_method(name, T=T).score_samples(random_split())


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_nan_logits_get_the_finite_logits_error(name):
    method = fitted(name)
    data = random_split(n=4)
    data.logits[2, 1] = np.nan
    with pytest.raises(ValueError, match="toy/test: 1 of 4 samples have NaN or infinite logits \\(first row 2\\)"):
        method.score_samples(data)
    with pytest.raises(ValueError, match="toy/test: 1 of 4 samples have NaN or infinite logits"):
        make_method(name).fit(data).score_samples(data)


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_bad_features_name_the_split(name):
    method = fitted(name)
    data = random_split(n=6)
    with pytest.raises(ValueError, match="toy/test: 5 feature rows but 6 logit rows"):
        method.score_samples(split(data.logits, data.features[:5]))
    with pytest.raises(ValueError, match="toy/test: features must be 2-D"):
        method.score_samples(split(data.logits, data.features[:, 0]))
    features = data.features.copy()
    features[3, 0] = np.inf
    with pytest.raises(ValueError, match="toy/test: 1 of 6 samples have NaN or infinite features \\(first row 3\\)"):
        method.score_samples(split(data.logits, features))
