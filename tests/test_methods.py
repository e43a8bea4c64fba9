"""MSP, MaxLogit and Energy: hand-worked values, numerics, batch independence and the registry."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from methods import CACHE_ONLY_METHODS, METHODS, make_method
from methods.base import BLOCK_ROWS
from methods.distance_scores import KNN_BATCH_RTOL
from methods.logit_scores import energy, msp
from tests.conftest import assert_batch_invariant

LOGITS = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])


def split(logits, name="toy/test"):
    return SimpleNamespace(logits=np.asarray(logits), name=name)


def test_msp_hand_worked():
    # Row 0: e^3 / (e + e^2 + e^3) = 1 / (e^-2 + e^-1 + 1) = 1 / 1.503214724 = 0.6652409558
    # Row 1: three equal logits -> 1/3.
    np.testing.assert_allclose(make_method("msp").score_samples(split(LOGITS)), [0.6652409558, 1 / 3], rtol=1e-10)


def test_maxlogit_hand_worked():
    np.testing.assert_array_equal(make_method("maxlogit").score_samples(split(LOGITS)), [3.0, 0.0])


def test_energy_hand_worked():
    # T=1: log(e + e^2 + e^3) = 3 + log(1.503214724) = 3.407605964; log(3) = 1.098612289.
    np.testing.assert_allclose(make_method("energy").score_samples(split(LOGITS)), [3.407605964, np.log(3)], rtol=1e-9)
    # T=2: 2 log(e^0.5 + e + e^1.5) = 3 + 2 log(1 + e^-0.5 + e^-1) = 3 + 2 * 0.680272...
    expected = 3 + 2 * np.log(1 + np.exp(-0.5) + np.exp(-1.0))
    np.testing.assert_allclose(make_method("energy", T=2.0).score_samples(split(LOGITS)), [expected, 2 * np.log(3)],
                               rtol=1e-12)


def test_energy_matches_torch_logsumexp_and_is_stable():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 5, size=(100, 10))
    for T in (0.5, 1.0, 1000.0):
        reference = T * torch.logsumexp(torch.tensor(logits, dtype=torch.float64) / T, dim=1).numpy()
        np.testing.assert_allclose(energy(logits, T), reference, rtol=1e-12)
    # Huge logits: no overflow, the max dominates.
    np.testing.assert_allclose(energy(np.array([[1000.0, 0.0]]), 1.0), [1000.0], rtol=1e-12)
    np.testing.assert_allclose(msp(np.array([[1000.0, 0.0, -1000.0]])), [1.0])
    assert np.isfinite(msp(np.array([[-1e4, -1e4 - 1]]))).all()


@pytest.mark.parametrize("name", ["msp", "maxlogit", "energy"])
def test_scores_do_not_depend_on_batch_composition(name):
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, size=(50, 7))
    method = make_method(name)
    whole = method.score_samples(split(logits))
    order = rng.permutation(50)
    assert_batch_invariant(whole[order], method.score_samples(split(logits[order])))
    assert_batch_invariant(whole, [method.score_samples(split(logits[:13])), method.score_samples(split(logits[13:]))])


def test_the_batch_invariance_check_allows_rounding_and_nothing_more():
    """``assert_batch_invariant`` accepts what rounding does (a tie split by an ulp, every score an
    ulp off, a score near 0 off by rounding of the split's scale) and rejects what it cannot do (an
    error of 1e-9, two distinct scores swapped)."""
    whole = np.array([-3.0, 0.5, 0.5, 2.0, 1e-17])
    tie_split = whole.copy()
    tie_split[2] = np.nextafter(0.5, 1.0)
    assert_batch_invariant(whole, tie_split)
    assert_batch_invariant(tie_split, whole)
    assert_batch_invariant(whole, np.nextafter(whole, np.inf))
    assert_batch_invariant(whole, whole + [0.0, 0.0, 0.0, 0.0, 1e-16])
    for wrong in (whole + [0.0, 0.0, 0.0, 1e-9, 0.0], whole[[0, 3, 2, 1, 4]]):
        with pytest.raises(AssertionError):
            assert_batch_invariant(whole, wrong)


def test_higher_means_more_in_distribution():
    confident, flat = [[10.0, 0.0, 0.0]], [[1.0, 1.0, 1.0]]
    for name in ("msp", "maxlogit", "energy"):
        method = make_method(name)
        assert method.score_samples(split(confident))[0] > method.score_samples(split(flat))[0]


def test_predict_is_argmax_of_the_logits():
    np.testing.assert_array_equal(make_method("energy").predict(split([[0.1, 2.0], [3.0, -1.0]])), [1, 0])
    scores, predictions = make_method("energy").score_and_predict(split(LOGITS))
    np.testing.assert_array_equal(scores, make_method("energy").score_samples(split(LOGITS)))
    np.testing.assert_array_equal(predictions, [2, 0])


def test_registry_defaults_labels_and_coercion():
    assert {"msp", "maxlogit", "energy"} <= set(METHODS)
    assert METHODS["energy"].defaults() == {"T": 1.0}
    assert METHODS["msp"].defaults() == {}
    method = make_method("energy", T="2")
    assert method.T == 2.0 and isinstance(method.T, float)
    assert method.label() == "energy(T=2)" and make_method("energy", T=0.5).label() == "energy(T=0.5)"
    assert make_method("energy").label() == "energy"
    assert method.get_params() == {"T": 2.0}


def test_unknown_method_and_parameter_errors():
    with pytest.raises(ValueError, match="unknown method 'nope'.*registered methods:.*energy.*msp"):
        make_method("nope")
    with pytest.raises(ValueError, match="method 'energy' has no parameter Q; its parameters: T \\(default 1.0\\)"):
        make_method("energy", Q=1)
    with pytest.raises(ValueError, match="method 'msp' has no parameter T; its parameters: none"):
        make_method("msp", T=1)
    with pytest.raises(ValueError, match="bad parameter value"):
        make_method("energy", T="hot")
    with pytest.raises(ValueError, match="T must be > 0"):
        make_method("energy", T=0.0).score_samples(split(LOGITS))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_get_one_clear_error(bad):
    logits = LOGITS.copy()
    logits[1, 2] = bad
    for name in ("msp", "maxlogit", "energy"):
        with pytest.raises(ValueError, match="toy/test: 1 of 2 samples have NaN or infinite logits \\(first row 1\\)"):
            make_method(name).score_samples(split(logits))


def head_split(features, logits, W, b, labels=None):
    return SimpleNamespace(features=features, logits=logits, head=(W, b), name="toy/split",
                           labels=logits.argmax(axis=1) if labels is None else labels)


@pytest.mark.parametrize("name", CACHE_ONLY_METHODS)  # network methods: tests/test_network_methods.py
def test_every_method_is_the_same_on_a_split_of_many_row_blocks_and_on_its_pieces(name, monkeypatch):
    """Scores of a split spanning several BLOCK_ROWS blocks (the unit of rowwise_apply and the
    shaping passes) agree (``assert_batch_invariant``) with those of the split reversed, cut at
    block-misaligned rows, and scored on one BLAS thread. The last 40 rows repeat the 40 around the
    first block boundary: identical rows at other positions, which a BLAS kernel may round an ulp
    apart in one batching and not in another (the contract's near-ties). KNN's float32 search is
    held to its own stated tolerance (methods.distance_scores.KNN)."""
    if name in ("knn", "nnguide"):
        monkeypatch.setattr("tests.conftest.BATCH_RTOL", KNN_BATCH_RTOL)
    rng = np.random.default_rng(5)
    W, b = rng.normal(size=(4, 12)), rng.normal(size=4)
    fit_features = np.maximum(rng.normal(1, 1, size=(300, 12)), 0)
    fit = head_split(fit_features, fit_features @ W.T + b, W, b, labels=np.arange(300) % 4)
    features = np.maximum(rng.normal(1, 1.5, size=(2 * BLOCK_ROWS + 77, 12)), 0)
    features[-40:] = features[BLOCK_ROWS - 20:BLOCK_ROWS + 20]
    logits = features @ W.T + b  # once: the pieces below are rows of the same arrays
    method = make_method(name).fit(fit)
    whole = method.score_samples(head_split(features, logits, W, b))
    reversed_ = method.score_samples(head_split(features[::-1].copy(), logits[::-1].copy(), W, b))
    pieces = [method.score_samples(head_split(f, lg, W, b))
              for f, lg in zip(np.split(features, [5, 1500]), np.split(logits, [5, 1500]))]
    with threadpool_limits(limits=1, user_api="blas"):
        one_thread = method.score_samples(head_split(features, logits, W, b))
    assert_batch_invariant(whole, reversed_[::-1])
    assert_batch_invariant(whole, pieces)
    assert_batch_invariant(whole, one_thread)
