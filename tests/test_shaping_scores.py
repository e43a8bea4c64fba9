"""Feature-shaping scores (ReAct, DICE, DICE+ReAct, ASH-P/B/S/RAND, SCALE, VRA): hand-worked values,
purity, batch independence, equivalence with the real network's forward pass through a hook, and
(SCALE, VRA) agreement with pytorch-ood 0.4.0."""
import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pytorch_ood.detector import SCALE as TorchSCALE
from pytorch_ood.detector import VRA as TorchVRA
from scipy.special import logsumexp

from extract.backbones import get_backbone_spec, registered_backbone
from extract.datasets import load_dataset
from extract.extraction import extract
from extract.store import FeatureStore
from extract.training import Recipe, train_backbone
from methods import METHODS, make_method
from methods.shaping_scores import (
    ash_b,
    ash_keep_count,
    ash_logits,
    ash_p,
    ash_rand,
    ash_s,
    dice_logits,
    dice_mask,
    dice_react_logits,
    react_logits,
    react_threshold,
    scale_shaping,
    vra_rectify,
    vra_thresholds,
)
from tests.conftest import assert_batch_invariant

SHAPING = ["react", "dice", "dice_react", "ash_p", "ash_b", "ash_s", "ash_rand", "scale", "vra"]
ASH = {"ash_p": "p", "ash_b": "b", "ash_s": "s", "ash_rand": "rand"}


def fake_split(features, W, b, name="fake"):
    features = np.asarray(features, np.float64)
    W, b = np.asarray(W, np.float64), np.asarray(b, np.float64)
    return SimpleNamespace(features=features, head=(W, b), logits=features @ W.T + b,
                           labels=np.zeros(len(features), int), name=name)


def random_split(seed, n=40, d=12, c=4):
    rng = np.random.default_rng(seed)
    return fake_split(rng.gamma(1.0, 1.0, (n, d)), rng.normal(size=(c, d)), rng.normal(size=c))


# ---------------------------------------------------------------- registry

def test_registered_with_defaults_and_grids():
    for name in SHAPING:
        assert name in METHODS
    assert METHODS["react"].defaults() == {"p": 90.0, "source": "train"}
    assert METHODS["dice"].defaults() == {"p": 90.0}
    assert METHODS["dice_react"].defaults() == {"p": 10.0, "react_p": 90.0}
    assert METHODS["ash_p"].defaults() == {"p": 60.0}  # the ASH paper: ASH-P@60, ASH-B@65, ASH-S@90
    assert METHODS["ash_b"].defaults() == {"p": 65.0}
    assert METHODS["ash_s"].defaults() == {"p": 90.0}
    assert METHODS["ash_rand"].defaults() == {"p": 65.0, "seed": 0}
    assert METHODS["react"].grid == {"p": [80.0, 85.0, 90.0, 95.0, 99.0]}
    assert METHODS["dice"].grid == {"p": [10.0, 30.0, 50.0, 70.0, 90.0]}
    for name in ASH:
        assert METHODS[name].grid == {"p": [60.0, 65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0, 99.0]}
    assert METHODS["scale"].defaults() == {"p": 85.0}  # the official SCALE config
    assert METHODS["scale"].grid == {"p": [50.0, 55.0, 60.0, 65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0, 97.0, 99.0]}
    assert METHODS["vra"].defaults() == {"p_low": 60.0, "p_high": 95.0, "gamma": 0.6, "per_unit": True}
    assert METHODS["vra"].grid == {"p_low": [50.0, 60.0, 65.0, 70.0], "p_high": [80.0, 85.0, 90.0, 95.0, 99.0],
                                   "gamma": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7]}


def test_react_source_validated_and_unfitted_errors():
    split = random_split(0)
    with pytest.raises(ValueError, match="source"):
        make_method("react", source="test").fit(split)
    make_method("react", source="val").fit(split)
    for name in ("react", "dice", "dice_react"):
        with pytest.raises(ValueError, match="fit"):
            make_method(name).score_samples(split)
    with pytest.raises(ValueError, match="percentile"):
        make_method("ash_p", p=101.0).score_samples(split)


# ---------------------------------------------------------------- hand-worked values

# n = 10 values; p = 70 -> round(7.0) = 7 pruned -> k = 3 kept: 4.0 (index 5), 3.0 (1), 2.0 (3).
# -5.0 has the largest magnitude but is pruned: ASH prunes by value.
# s1 = 0.5 + 3 - 1 + 2 + 0 + 4 + 1 - 5 + 0.2 + 1.5 = 6.2; s2 = 4 + 3 + 2 = 9.
X = np.array([[0.5, 3.0, -1.0, 2.0, 0.0, 4.0, 1.0, -5.0, 0.2, 1.5]])


def test_ash_hand_worked_vector():
    assert ash_keep_count(10, 70.0) == 3
    expected_p = [[0, 3.0, 0, 2.0, 0, 4.0, 0, 0, 0, 0]]
    np.testing.assert_allclose(ash_p(X, 70.0), expected_p)
    b_value = 6.2 / 3  # s1 / k
    np.testing.assert_allclose(ash_b(X, 70.0), [[0, b_value, 0, b_value, 0, b_value, 0, 0, 0, 0]])
    e = np.exp(6.2 / 9.0)  # exp(s1 / s2)
    np.testing.assert_allclose(ash_s(X, 70.0), [[0, 3 * e, 0, 2 * e, 0, 4 * e, 0, 0, 0, 0]])
    rand = ash_rand(X, 70.0, seed=0)
    kept = np.array([1, 3, 5])
    assert np.all(rand[0, np.setdiff1d(np.arange(10), kept)] == 0)
    assert np.all((rand[0, kept] >= 0) & (rand[0, kept] < 10)) and np.all(rand[0, kept] > 0)
    assert not np.array_equal(ash_rand(X, 70.0, seed=1), rand)


def test_ash_keep_count_half_to_even():
    assert ash_keep_count(10, 25.0) == 8   # round(2.5) = 2
    assert ash_keep_count(10, 35.0) == 6   # round(3.5) = 4
    assert ash_keep_count(32, 90.0) == 3   # round(28.8) = 29
    assert ash_keep_count(342, 95.0) == 17
    assert ash_keep_count(2048, 90.0) == 205
    assert ash_keep_count(10, 100.0) == 0
    assert ash_keep_count(10, 0.0) == 10


def test_ash_p_defaults_to_the_papers_p_60():
    """ASH-P@60, as the ASH paper's ImageNet table: on 20 values p = 60 keeps k = 20 - 12 = 8, where
    the former default 65 kept 20 - round(13) = 7; p = 65 is now a non-default setting with its label."""
    x = np.arange(1.0, 21.0)[None, ::-1].copy()
    expected = np.where(x > 12.0, x, 0.0)  # the top 8: 13 ... 20
    np.testing.assert_array_equal(ash_p(x), expected)
    split = fake_split(x, np.eye(20), np.zeros(20))
    method = make_method("ash_p")
    assert method.p == 60.0 and method.label() == "ash_p" and make_method("ash_p", p=65.0).label() == "ash_p(p=65)"
    np.testing.assert_allclose(method.score_samples(split), logsumexp(expected, axis=1))
    assert (ash_keep_count(20, 60.0), ash_keep_count(20, 65.0)) == (8, 7)


def test_ash_p25_keeps_eight():
    # k = 8 keeps 4, 3, 2, 1.5, 1, 0.5, 0.2, 0.0 and prunes the two smallest values -1 and -5
    expected = X.copy()
    expected[0, [2, 7]] = 0.0
    np.testing.assert_array_equal(ash_p(X, 25.0), expected)


def test_ash_p100_zeros_and_all_zero_sample():
    for fn in (ash_p, ash_b, ash_s, ash_rand):
        np.testing.assert_array_equal(fn(X, 100.0), np.zeros_like(X))
        zero = fn(np.zeros((2, 10)), 90.0)
        assert np.all(np.isfinite(zero))
    np.testing.assert_array_equal(ash_s(np.zeros((2, 10)), 90.0), 0.0)  # s2 = 0 -> scale 1
    np.testing.assert_array_equal(ash_b(np.zeros((2, 10)), 90.0), 0.0)
    split = fake_split(np.zeros((3, 10)), np.ones((2, 10)), [0.0, 1.0])
    for name in ASH:
        assert np.all(np.isfinite(make_method(name).score_samples(split)))


def test_dice_hand_worked_global_threshold():
    W = np.array([[1.0, 2.0, 3.0], [4.0, -1.0, 0.5]])
    v_bar = np.array([1.0, 1.0, 2.0])
    # V = W * v_bar = [[1, 2, 6], [4, -1, 1]]; sorted -1, 1, 1, 2, 4, 6; 50th percentile at
    # position 2.5 -> (1 + 2) / 2 = 1.5; V > 1.5 keeps 2 weights of class 0 and 1 of class 1.
    mask = dice_mask(W, v_bar, 50.0)
    np.testing.assert_array_equal(mask, [[False, True, True], [True, False, False]])
    b = np.array([0.1, -0.2])
    v = np.array([[1.0, 2.0, 3.0]])
    # class 0: 2*2 + 3*3 + 0.1 = 13.1; class 1: 4*1 - 0.2 = 3.8
    np.testing.assert_allclose(dice_logits(v, W, b, mask), [[13.1, 3.8]])
    fit = fake_split(np.array([[0.0, 0.0, 1.0], [2.0, 2.0, 3.0]]), W, b)  # mean [1, 1, 2]
    method = make_method("dice", p=50.0).fit(fit)
    np.testing.assert_array_equal(method.mask_, mask)
    test = fake_split(v, W, b)
    np.testing.assert_allclose(method.score_samples(test), logsumexp([13.1, 3.8]))
    assert method.predict(test).tolist() == [0]


def test_react_hand_worked():
    W = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = np.array([0.0, 0.0, 1.0])
    fit = fake_split(np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]), W, b)
    # flattened 0..5; 90th percentile at position 0.9 * 5 = 4.5 -> 4.5
    assert react_threshold(fit.features, 90.0) == pytest.approx(4.5)
    method = make_method("react").fit(fit)
    assert method.c_ == pytest.approx(4.5)
    test = fake_split(np.array([[5.0, 1.0], [0.0, 6.0]]), W, b)
    # [5, 1] -> [4.5, 1] -> [4.5, 1, 6.5]; [0, 6] -> [0, 4.5] -> [0, 4.5, 5.5]
    expected = np.array([[4.5, 1.0, 6.5], [0.0, 4.5, 5.5]])
    np.testing.assert_allclose(react_logits(test.features, W, b, method.c_), expected)
    np.testing.assert_allclose(method.score_samples(test), logsumexp(expected, axis=1))
    assert method.predict(test).tolist() == [2, 2]
    assert method.score_samples(test).dtype == np.float64


def test_scale_hand_worked_vector():
    # X as above, p = 70: k = 3, s1 = 6.2, s2 = 9; SCALE multiplies EVERY entry (none pruned) by exp(6.2 / 9).
    np.testing.assert_allclose(scale_shaping(X, 70.0), X * np.exp(6.2 / 9.0), rtol=1e-15)
    # the kept entries equal ASH-S's, the others are not zeroed
    kept = ash_s(X, 70.0) != 0
    np.testing.assert_allclose(scale_shaping(X, 70.0)[kept], ash_s(X, 70.0)[kept], rtol=1e-15)
    # all-zero sample and p = 100 (s2 = 0): scale 1
    np.testing.assert_array_equal(scale_shaping(np.zeros((2, 10)), 90.0), 0.0)
    np.testing.assert_array_equal(scale_shaping(X, 100.0), X)
    split = fake_split(X, np.eye(10)[:3], np.zeros(3))
    np.testing.assert_allclose(make_method("scale", p=70.0).score_samples(split),
                               logsumexp(X[:, :3] * np.exp(6.2 / 9.0), axis=1), rtol=1e-14)


def test_vra_hand_worked():
    # alpha = 1, beta = 3, gamma = 0.5: below 1 -> 0; 1..3 -> z + 0.5 (both ends included); above 3 -> 3.
    z = np.array([[0.5, 1.0, 2.0, 3.0, 4.0]])
    np.testing.assert_allclose(vra_rectify(z, 1.0, 3.0, 0.5), [[0.0, 1.5, 2.5, 3.5, 3.0]])
    # per-unit thresholds: unit 0 over (0, 1, 2, 3, 4) -> 20th percentile 0.8, 90th 3.6; unit 1 is 10x that
    fit = fake_split(np.array([[0.0, 0.0], [1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]]), np.eye(2), [0.0, 1.0])
    alpha, beta = vra_thresholds(fit.features, 20.0, 90.0)
    np.testing.assert_allclose(alpha, [0.8, 8.0])
    np.testing.assert_allclose(beta, [3.6, 36.0])
    # jointly (OpenOOD): the 10 entries 0, 0, 1, 2, 3, 4, 10, 20, 30, 40 -> 20th percentile at position 1.8: 0.8
    alpha, beta = vra_thresholds(fit.features, 20.0, 90.0, per_unit=False)
    np.testing.assert_allclose(alpha, [0.8])
    np.testing.assert_allclose(beta, [31.0])  # position 8.1: 30 + 0.1 * 10
    method = make_method("vra", p_low=20.0, p_high=90.0, gamma=0.5).fit(fit)
    test = fake_split(np.array([[0.5, 20.0], [4.0, 5.0]]), np.eye(2), [0.0, 1.0])
    # [0.5, 20] -> [0, 20.5]; [4, 5] -> [3.6, 0] (5 < 8: suppressed); logits add b = (0, 1)
    expected = np.array([[0.0, 21.5], [3.6, 1.0]])
    np.testing.assert_allclose(method._logits(test), expected)
    np.testing.assert_allclose(method.score_samples(test), logsumexp(expected, axis=1))
    assert method.predict(test).tolist() == [1, 0]


def test_vra_errors():
    split = random_split(0)
    with pytest.raises(ValueError, match="p_low \\(90.0\\) must not exceed p_high \\(80.0\\)"):
        make_method("vra", p_low=90.0, p_high=80.0).fit(split)
    with pytest.raises(ValueError, match="percentile"):
        make_method("vra", p_high=101.0).fit(split)
    with pytest.raises(ValueError, match="fit"):
        make_method("vra").score_samples(split)
    fitted = make_method("vra").fit(split)
    with pytest.raises(ValueError, match="fit on 12-dim features, asked to score 5-dim ones"):
        fitted.score_samples(random_split(1, d=5))


def linear_head(W, b):
    """pytorch-ood's feature-map detectors take [N, D, 1, 1] maps and a head: the cached linear head."""
    weight, bias = torch.tensor(W), torch.tensor(b)
    return lambda maps: maps.flatten(1) @ weight.T + bias


def test_scale_agrees_with_pytorch_ood():
    """pytorch-ood's SCALE (float64 maps, energy of the head) is -ours to rounding. Its percentile is a
    fraction: k = n - round(n * 0.7) can differ from the official n * 70 / 100 at exact halves
    (n = 45: 45 * 0.7 = 31.499999999999996 rounds to 31, 45 * 70 / 100 = 31.5 to 32), so the check uses
    n = 12, where every grid percentile rounds alike. When nothing is kept (k = 0: here p = 97 and 99)
    pytorch-ood divides by s2 = 0 and scores NaN; ours uses the factor 1 (the plain energy)."""
    split = random_split(20, n=300, d=12)
    maps = torch.tensor(split.features)[:, :, None, None]
    for p in METHODS["scale"].grid["p"]:
        assert ash_keep_count(12, p) == 12 - int(np.round(12 * (p / 100)))
        reference = -TorchSCALE(None, linear_head(*split.head), percentile=p / 100).predict_feature_maps(maps).numpy()
        ours = make_method("scale", p=p).score_samples(split)
        if ash_keep_count(12, p) == 0:
            assert np.isnan(reference).all() and np.allclose(ours, logsumexp(split.logits, axis=1), rtol=1e-14)
        else:
            assert np.abs(ours - reference).max() <= 1e-12 * np.abs(reference).max(), p
    assert (ash_keep_count(45, 70.0), 45 - int(np.round(45 * 0.7))) == (13, 14)


def test_vra_agrees_with_pytorch_ood():
    """pytorch-ood's VRA clips each unit to [alpha, beta] (np.quantile per unit, stored as float32) with
    no gamma; VRA (the paper, the official code) sets entries below alpha to 0, not to alpha. With
    gamma = 0: the same thresholds (to float32), and the same scores (to float32 thresholds) on every
    sample with no entry below alpha; p_low = 0 puts none of the fit split's entries below it."""
    split = random_split(21, n=300, d=12)
    maps = torch.tensor(split.features)[:, :, None, None]
    labels = torch.zeros(300, dtype=torch.long)
    for p_low, p_high in ((0.0, 95.0), (5.0, 99.0), (10.0, 90.0)):
        ours = make_method("vra", p_low=p_low, p_high=p_high, gamma=0.0).fit(split)
        detector = TorchVRA(None, linear_head(*split.head), lower_percentile=p_low / 100,
                            upper_percentile=p_high / 100).fit_feature_maps(maps, labels)
        np.testing.assert_allclose(detector._lower_threshold.numpy().ravel(), ours.alpha_, rtol=1e-7)
        np.testing.assert_allclose(detector._upper_threshold.numpy().ravel(), ours.beta_, rtol=1e-7)
        reference = -detector.predict_feature_maps(maps).numpy()
        clean = ~(split.features < ours.alpha_).any(axis=1)
        assert clean.sum() >= 20 and (p_low > 0 or clean.all())
        assert np.abs(ours.score_samples(split) - reference)[clean].max() <= 1e-5
        if not clean.all():  # below alpha: 0 here, alpha there
            assert np.abs(ours.score_samples(split) - reference)[~clean].max() > 1e-3


# ---------------------------------------------------------------- purity and batch independence

@pytest.mark.parametrize("name", SHAPING)
def test_no_mutation_and_batch_independence(name):
    fit, test = random_split(1), random_split(2)
    copies = [fit.features.copy(), test.features.copy(), fit.head[0].copy(), test.head[0].copy()]
    method = make_method(name).fit(fit)
    full_scores, full_pred = method.score_samples(test), method.predict(test)
    np.testing.assert_array_equal(fit.features, copies[0])
    np.testing.assert_array_equal(test.features, copies[1])
    np.testing.assert_array_equal(fit.head[0], copies[2])
    np.testing.assert_array_equal(test.head[0], copies[3])
    assert full_scores.dtype == np.float64 and np.all(np.isfinite(full_scores))
    order = np.random.default_rng(0).permutation(len(test.features))
    shuffled = fake_split(test.features[order], *test.head)
    assert_batch_invariant(full_scores[order], method.score_samples(shuffled))
    # the argmax of logits that agree to rounding: equal unless two logits of a sample are that close
    np.testing.assert_array_equal(method.predict(shuffled), full_pred[order])
    halves = [fake_split(part, *test.head) for part in np.array_split(test.features, [7])]
    assert_batch_invariant(full_scores, [method.score_samples(h) for h in halves])


@pytest.mark.parametrize("name", SHAPING)
def test_score_and_predict_shapes_once_and_equals_the_separate_calls(name, monkeypatch):
    fit, test = random_split(3), random_split(4)
    method = make_method(name).fit(fit)
    expected = method.score_samples(test), method.predict(test)
    calls = []
    original = type(method)._blocks
    monkeypatch.setattr(type(method), "_blocks", lambda self, split: calls.append(1) or original(self, split))
    scores, predictions = method.score_and_predict(test)
    assert len(calls) == 1  # one shaping pass over the split
    np.testing.assert_array_equal(scores, expected[0])
    np.testing.assert_array_equal(predictions, expected[1])


def test_ash_rand_same_sample_same_draws_in_any_batch():
    x = random_split(3).features
    single = np.concatenate([ash_rand(x[i:i + 1], 65.0, seed=4) for i in range(len(x))])
    np.testing.assert_array_equal(ash_rand(x, 65.0, seed=4), single)
    np.testing.assert_array_equal(ash_rand(x[::-1], 65.0, seed=4), single[::-1])


def test_refit_changes_state():
    first, second = random_split(5), random_split(6)
    second.features[:] *= 3.0
    react = make_method("react").fit(first)
    c1 = react.c_
    assert react.fit(second).c_ != c1
    dice = make_method("dice", p=50.0).fit(first)
    m1 = dice.mask_.copy()
    assert not np.array_equal(dice.fit(fake_split(second.features, -second.head[0], second.head[1])).mask_, m1)
    dr = make_method("dice_react").fit(first)
    c1, m1 = dr.c_, dr.mask_.copy()
    dr.fit(fake_split(second.features, -second.head[0], second.head[1]))
    assert dr.c_ != c1 and not np.array_equal(dr.mask_, m1)


# ---------------------------------------------------------------- equivalence with the network

@pytest.fixture(scope="module")
def network(tmp_path_factory):
    """A quickly trained digits-net, its cached train (fit) and test splits, and the test images."""
    root = tmp_path_factory.mktemp("shaping")
    spec = get_backbone_spec("digits-net")
    train_set = load_dataset("digits", "train")
    state, _ = train_backbone(spec, Recipe(epochs=6, lr=0.01, batch_size=32), train_set, num_classes=6, seed=0,
                              weights_dir=root / "weights", progress=False)
    backbone = registered_backbone(spec, state, "digits-net", 6)
    store = FeatureStore(root / "cache")
    fit = extract(backbone, train_set, store, progress=False)
    test_set = load_dataset("digits", "test")
    test = extract(backbone, test_set, store, progress=False)
    return SimpleNamespace(backbone=backbone, fit=fit, test=test, images=test_set.images)


def hooked_logits(model, images, preprocessing, shape=None):
    """Run the model with a forward pre-hook on fc replacing its input by shape(input).

    The network runs as trained (float32) up to fc; fc itself runs in float64 in a copy of the model,
    because ASH-S's exp(s1/s2) scales logits to ~1e3, where float32 rounding alone exceeds 1e-4.
    """
    model = copy.deepcopy(model).eval()
    model.fc.double()
    shape = shape or (lambda v: v)
    model.fc.register_forward_pre_hook(lambda module, inputs: (shape(inputs[0].double()).double(),))
    with torch.no_grad():
        return model(preprocessing(images)).numpy()


def torch_ash(x, variant, p):
    """ASH at the pooled layer written as the official code does it (topk + scatter), out of place."""
    n = x.shape[1]
    k = n - round(n * p / 100)
    values, indices = torch.topk(x, k, dim=1)
    s1 = x.sum(dim=1, keepdim=True)
    if variant == "p":
        kept = values
    elif variant == "b":
        kept = (s1 / k).expand_as(values)
    else:
        kept = values * torch.exp(s1 / values.sum(dim=1, keepdim=True))
    return torch.zeros_like(x).scatter(1, indices, kept)


def assert_equivalent(method, split, hooked, atol=1e-4):
    W, b = split.head
    cache_logits = method._logits(split)
    assert np.max(np.abs(cache_logits - hooked)) <= atol
    np.testing.assert_array_equal(method.predict(split), hooked.argmax(axis=1))
    np.testing.assert_allclose(method.score_samples(split), logsumexp(hooked, axis=1), rtol=0, atol=atol)
    return cache_logits


def test_cache_equals_network_forward(network):
    model, pre, test = network.backbone.model, network.backbone.preprocessing, network.test
    W, b = test.head
    plain = hooked_logits(model, network.images, pre)
    assert np.max(np.abs(plain - test.logits)) <= 1e-4  # the cache is the network's own forward pass
    assert (plain.argmax(axis=1) == test.labels).mean() > 0.8  # trained, not random

    react = make_method("react").fit(network.fit)
    hooked = hooked_logits(model, network.images, pre, lambda v: torch.clamp(v, max=react.c_))
    np.testing.assert_allclose(react_logits(test.features, W, b, react.c_), react._logits(test))
    assert_equivalent(react, test, hooked)

    for name, p in (("dice", 90.0), ("dice", 50.0)):
        dice = make_method(name, p=p).fit(network.fit)
        masked = copy.deepcopy(model)
        with torch.no_grad():
            masked.fc.weight.mul_(torch.from_numpy(dice.mask_).float())
        assert_equivalent(dice, test, hooked_logits(masked, network.images, pre))
        np.testing.assert_allclose(dice_logits(test.features, W, b, dice.mask_), dice._logits(test))

    dr = make_method("dice_react").fit(network.fit)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked.fc.weight.mul_(torch.from_numpy(dr.mask_).float())
    hooked = hooked_logits(masked, network.images, pre, lambda v: torch.clamp(v, max=dr.c_))
    assert_equivalent(dr, test, hooked)
    np.testing.assert_allclose(dice_react_logits(test.features, W, b, dr.mask_, dr.c_), dr._logits(test))


def test_scale_and_vra_equal_network_forward(network):
    """SCALE and VRA written as the official code does them (SCALE: topk + scatter on a clone, the
    exp(s1/s2) factor applied to the unpruned input; VRA: ``clip2``'s two torch.where) in a hook on fc."""
    model, pre, test = network.backbone.model, network.backbone.preprocessing, network.test

    def torch_scale(x, p):
        n = x.shape[1]
        values, indices = torch.topk(x, n - round(n * p / 100), dim=1)
        pruned = torch.zeros_like(x).scatter(1, indices, values)
        return x * torch.exp(x.sum(dim=1, keepdim=True) / pruned.sum(dim=1, keepdim=True))

    for p in (65.0, 85.0):
        scale = make_method("scale", p=p)
        assert_equivalent(scale, test, hooked_logits(model, network.images, pre, lambda v, p=p: torch_scale(v, p)))
    vra = make_method("vra").fit(network.fit)
    alpha, beta = torch.from_numpy(vra.alpha_), torch.from_numpy(vra.beta_)

    def clip2(v):
        shifted = v + vra.gamma
        shifted = torch.where(shifted < alpha + vra.gamma, torch.zeros_like(v), shifted)
        return torch.where(shifted > beta + vra.gamma, beta.expand_as(v), shifted)

    assert_equivalent(vra, test, hooked_logits(model, network.images, pre, clip2))


@pytest.mark.parametrize("name", list(ASH))
@pytest.mark.parametrize("p", [65.0, 90.0])
def test_ash_equals_network_forward(network, name, p):
    model, pre, test = network.backbone.model, network.backbone.preprocessing, network.test
    W, b = test.head
    variant = ASH[name]
    method = make_method(name, p=p)
    if variant == "rand":  # random values: the hook applies the method's own per-sample function
        def shape(v):
            return torch.from_numpy(ash_rand(v.numpy(), p, method.seed))
    else:
        def shape(v):
            return torch_ash(v, variant, p)
    hooked = hooked_logits(model, network.images, pre, shape)
    cache_logits = method._logits(test)
    np.testing.assert_array_equal(cache_logits, ash_logits(test.features, W, b, variant, p, getattr(method, "seed", 0)))
    assert_equivalent(method, test, hooked)
