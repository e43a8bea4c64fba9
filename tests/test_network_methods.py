"""Network methods (ASH at any layer, ODIN): checked against hand-written forwards, finite
differences, the cache-only methods, and forward-call counts for their derived cache entries."""
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from scipy.special import softmax
from sklearn.covariance import EmpiricalCovariance
from sklearn.linear_model import LogisticRegressionCV
from torch import nn

from extract.backbones import Backbone, Preprocessing
from extract.extraction import partial_folder
from extract.network import PENULTIMATE, EntryRows, Network, derive, derive_state, network_tail
from extract.store import read_meta
from harness.config import MethodRef, load_benchmark
from harness.evaluation import Evaluation
from harness.pipeline import BenchmarkRun
from harness.resolution import RunOptions
from methods import CACHE_ONLY_METHODS, METHODS, make_method, network_scores
from methods.base import BLOCK_ROWS
from methods.gradient_scores import gradnorm
from methods.network_passes import (
    fgsm_inputs,
    gradnorm_loss,
    layer_means,
    mahalanobis_perturbed_confidences,
    numpy_rows,
    odin_outputs,
    odin_perturbed_inputs,
    per_sample_gradnorm,
)
from methods.network_scores import ensemble_score, fit_ensemble, tempered_msp
from methods.shaping_scores import ash_b, react_clip
from tests.conftest import assert_batch_invariant

CPU = torch.device("cpu")


class TinyNet(nn.Module):
    """conv -> bn -> relu -> pool -> fc, with a residual variant whose skip crosses ``body.0``."""

    def __init__(self, channels=1, residual=False):
        super().__init__()
        self.residual = residual
        self.stem = nn.Conv2d(channels, 4, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.stem(x)
        out = self.body(h)
        return self.fc(self.pool(out + h if self.residual else out))


def tiny_backbone(channels=1, residual=False, std=(0.25,)) -> Backbone:
    torch.manual_seed(0)
    model = TinyNet(channels, residual)
    with torch.no_grad():  # non-trivial batch-norm statistics
        model.body[1].running_mean.uniform_(-0.5, 0.5)
        model.body[1].running_var.uniform_(0.5, 2.0)
    mean = (0.5,) * channels
    return Backbone("tiny", model, Preprocessing(8, channels, mean, std), "fc", (), {"test": "tiny"},
                    shaping_layer="body.1")


def images(n=10, channels=1, seed=0) -> np.ndarray:
    shape = (n, 8, 8) if channels == 1 else (n, 8, 8, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def ash_b_by_hand(a: torch.Tensor, p: float) -> torch.Tensor:
    """ASH-B as the official code writes it: per sample, flatten channels and space, s1 = sum of
    everything, keep the torch.topk values set to s1 / k."""
    flat = a.reshape(len(a), -1)
    n = flat.shape[1]
    k = n - int(round(n * p / 100))
    s1 = flat.sum(dim=1, keepdim=True)
    out = torch.zeros_like(flat)
    out.scatter_(1, flat.topk(k, dim=1).indices, (s1 / k).expand(-1, k))
    return out.reshape(a.shape)


SHAPINGS = {  # (the method's numpy function of rows, the official code's torch version)
    "ash_b": (lambda rows: ash_b(rows, 65.0), lambda a: ash_b_by_hand(a, 65.0)),
    "react": (lambda rows: react_clip(rows, 0.3), lambda a: torch.clamp(a, max=0.3)),
}


@pytest.mark.parametrize("shaping", sorted(SHAPINGS))
def test_shaping_at_an_inner_layer_equals_a_hand_written_forward_with_the_shaping_inserted(shaping):
    rows_function, by_hand = SHAPINGS[shaping]
    backbone = tiny_backbone()
    model = backbone.model
    raw = images()
    with torch.no_grad():
        x = backbone.preprocessing(raw)
        pre_relu = model.body[1](model.body[0](model.stem(x)))  # BN output: negatives included in s1
        expected = model.fc(model.pool(torch.relu(by_hand(pre_relu))))
    network = Network(backbone, CPU, batch_size=4)  # batches of 4 over 10 images: per-sample shaping
    shape = numpy_rows(rows_function)
    hooked = network.shaped_outputs(raw, "body.1", shape)
    np.testing.assert_allclose(hooked["logits"], expected.numpy(), atol=1e-5)
    assert (pre_relu < 0).any()
    # the tail run from the layer's (unshaped) activations gives the same logits and features
    tail = network.tail_outputs(pre_relu.numpy(), "body.1", shape)
    np.testing.assert_allclose(tail["logits"], hooked["logits"], atol=1e-6)
    np.testing.assert_allclose(tail["features"], hooked["features"], atol=1e-6)
    # the hook leaves the model as it was
    with torch.no_grad():
        np.testing.assert_array_equal(model(x).numpy(), model.fc(model.pool(model.body(model.stem(x)))).numpy())


def test_network_tail_runs_the_rest_of_the_network_and_refuses_to_cut_across_a_skip_connection():
    plain, residual = tiny_backbone().model, tiny_backbone(residual=True).model
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        for layer, before in (("stem", plain.stem), ("body.1", lambda t: plain.body[1](plain.body[0](plain.stem(t))))):
            tail = network_tail(plain, layer)
            np.testing.assert_allclose(tail(before(x)).numpy(), plain(x).numpy(), atol=1e-6)
        assert network_tail(residual, "body.1") is None  # out + h reads h, computed before the cut
        assert network_tail(residual, "body") is None
        tail = network_tail(residual, "stem")  # everything after the stem depends on it alone
        np.testing.assert_allclose(tail(residual.stem(x)).numpy(), residual(x).numpy(), atol=1e-6)


def test_odin_perturbation_follows_the_sign_of_the_finite_difference_gradient():
    torch.manual_seed(1)
    model = TinyNet().double().eval()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    T, epsilon = 10.0, 0.01
    perturbed, predictions = odin_perturbed_inputs(model, x, T, epsilon, torch.ones(1, 1, 1, 1, dtype=torch.float64))
    with torch.no_grad():
        np.testing.assert_array_equal(predictions.numpy(), model(x).argmax(dim=1).numpy())
    step = ((x - perturbed) / epsilon).numpy()
    np.testing.assert_allclose(np.abs(step), 1.0, rtol=1e-12)
    sign = np.sign(step)

    def loss(inputs, i):  # sample i's CE(f(x)/T, y_hat) alone
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(inputs[i:i + 1]) / T, predictions[i:i + 1]))

    h, checked = 1e-6, 0
    for i in range(len(x)):
        for index in np.ndindex(x.shape[1:]):
            up, down = x.clone(), x.clone()
            up[(i, *index)] += h
            down[(i, *index)] -= h
            difference = (loss(up, i) - loss(down, i)) / (2 * h)
            if abs(difference) > 1e-7:
                assert np.sign(difference) == sign[(i, *index)], (i, index, difference)
                checked += 1
    assert checked > 0.9 * x.numel()
    with torch.no_grad():  # the step lowers each sample's loss, i.e. raises the tempered max-softmax
        for i in range(len(x)):
            assert loss(perturbed, i) < loss(x, i)


def test_odin_epsilon_is_in_pixel_units_unless_asked_for_normalised_units():
    std = (0.2, 0.5, 0.8)
    backbone = tiny_backbone(channels=3, std=std)
    network = Network(backbone, CPU, batch_size=4)
    raw = images(channels=3)
    x = backbone.preprocessing(raw)
    scale = torch.tensor(std).view(1, 3, 1, 1)
    for space, step in (("pixel", 1 / scale), ("normalized", torch.ones_like(scale))):
        perturbed, _ = odin_perturbed_inputs(backbone.model, x, 1000.0, 0.002, step)
        moved = (x - perturbed) / 0.002  # in normalised units
        np.testing.assert_allclose(torch.abs(moved * (scale if space == "pixel" else 1)).numpy(), 1.0, rtol=1e-4)
        outputs = odin_outputs(network, raw, 1000.0, 0.002, space)
        with torch.no_grad():
            np.testing.assert_allclose(outputs["logits"], backbone.model(perturbed).numpy(), atol=1e-6)


def test_odin_with_zero_epsilon_is_msp_at_temperature_T():
    backbone = tiny_backbone()
    raw = images(n=13)
    network = Network(backbone, CPU, batch_size=5)
    with torch.no_grad():
        plain = backbone.model(backbone.preprocessing(raw)).numpy().astype(np.float64)
    for T in (1.0, 1000.0):
        outputs = odin_outputs(network, raw, T, 0.0, "pixel")  # through the network: x - 0 * sign = x
        expected = softmax(plain / T, axis=1).max(axis=1)
        np.testing.assert_allclose(tempered_msp(outputs["logits"], T), expected, rtol=1e-6)
        np.testing.assert_array_equal(outputs["predictions"], plain.argmax(axis=1))
    assert make_method("odin", epsilon=0.0).network_key() == make_method("odin", epsilon=0.0, T=5.0).network_key()


def test_gradnorm_by_autograd_equals_the_official_batch_size_one_loop_for_a_non_linear_head():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    x = torch.randn(6, 1, 4, 4)
    for parameter in ("1.weight", "3.weight", "5.weight"):
        batched = per_sample_gradnorm(model, x, 2.0, parameter)
        for i in range(len(x)):  # the official code: one sample per backward, |dL/dP| summed
            model.zero_grad()
            gradnorm_loss(model(x[i:i + 1])[0], 2.0).backward()
            expected = dict(model.named_parameters())[parameter].grad.abs().sum()
            assert float(batched[i]) == pytest.approx(float(expected), rel=1e-5), (parameter, i)


def test_gradnorm_through_the_head_alone_equals_the_official_backward_through_the_whole_network():
    """gradnorm_outputs differentiates a head parameter through the head from its input: the same
    gradient as the official loop's backward through every layer, one sample at a time."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x = torch.randn(6, 1, 4, 4)
    with torch.no_grad():
        head_inputs = model[:3](x)
    through_head = per_sample_gradnorm(model[3], head_inputs, 2.0, "weight")
    for i in range(len(x)):
        model.zero_grad()
        gradnorm_loss(model(x[i:i + 1])[0], 2.0).backward()
        assert float(through_head[i]) == pytest.approx(float(model[3].weight.grad.abs().sum()), rel=1e-5)


def test_mahalanobis_layer_confidence_matches_sklearn_and_its_noise_moves_toward_the_closest_class():
    torch.manual_seed(3)
    model = TinyNet().double().eval()
    x_fit, labels = torch.randn(60, 1, 8, 8, dtype=torch.float64), torch.arange(60) % 3
    with torch.no_grad():
        fit = layer_means(model, x_fit, ("body",))["body"].numpy()
    means = np.stack([fit[labels.numpy() == c].mean(axis=0) for c in range(3)])
    reference = EmpiricalCovariance(assume_centered=True).fit(fit - means[labels.numpy()])
    precision = torch.from_numpy(reference.precision_)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    step = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    both = mahalanobis_perturbed_confidences(model, x, "body", torch.from_numpy(means), precision, (0.0, 1e-3), step)
    plain, noisy = both[:, 0], both[:, 1]
    with torch.no_grad():
        f = layer_means(model, x, ("body",))["body"].numpy()
    distances = np.stack([reference.mahalanobis(f - mean) for mean in means], axis=1)  # squared, (N, C)
    np.testing.assert_allclose(plain.numpy(), -0.5 * distances.min(axis=1), rtol=1e-10)
    # with noise, each sample moves toward its closest class: the confidence rises
    assert (noisy.numpy() > plain.numpy()).all()


def test_fgsm_copies_stay_in_pixel_range_within_the_step():
    backbone = tiny_backbone(channels=3, std=(0.2, 0.5, 0.8))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in ((0.5,) * 3, (0.2, 0.5, 0.8)))
    x = backbone.preprocessing(images(channels=3))
    adversarial = fgsm_inputs(backbone.model, x, torch.zeros(len(x), dtype=torch.long), 0.05, mean, std)
    pixels, moved = x * std + mean, adversarial * std + mean
    assert float(moved.min()) >= 0.0 and float(moved.max()) <= 1.0
    assert float((moved - pixels).abs().max()) <= 0.05 + 1e-6
    assert float((moved - pixels).abs().max()) > 0.04


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the reference regression's sklearn notices
def test_the_ensemble_picks_the_epsilon_whose_regression_separates_best_and_scores_minus_p_ood():
    rng = np.random.default_rng(0)
    n, layers = 200, 2
    id_conf = rng.normal(size=(n, layers, 3))
    ood_conf = rng.normal(size=(n, layers, 3))
    ood_conf[:, :, 1] -= 3.0  # the second epsilon separates ID from pseudo-OOD
    chosen = fit_ensemble(id_conf, ood_conf)
    assert chosen["epsilon_index"] == 1 and chosen["selection_fpr95"][1] < chosen["selection_fpr95"][[0, 2]].min()
    reference = LogisticRegressionCV(scoring="accuracy").fit(np.r_[id_conf[:100, :, 1], ood_conf[:100, :, 1]],
                                                             np.r_[np.zeros(100), np.ones(100)])
    np.testing.assert_allclose(ensemble_score(id_conf[100:, :, 1], chosen["coef"], chosen["intercept"]),
                               -reference.predict_proba(id_conf[100:, :, 1])[:, 1], rtol=1e-10)


def correlated_confidences(rng, n, centre, scale=(5.0, 7.0)) -> np.ndarray:
    """Two layers' confidences (n, 2, 1 epsilon) correlated as cnn28's block1 and block2 are (r = 0.6)."""
    z = rng.normal(size=n)
    m1 = centre[0] + scale[0] * (0.6 * z + 0.8 * rng.normal(size=n))
    return np.stack([m1, centre[1] + scale[1] * z], axis=1)[:, :, None]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_an_ensemble_tuned_on_fgsm_copies_can_weight_a_layer_with_the_wrong_sign_and_rank_noise_as_id():
    """Issue 17, item 11, built by hand: cnn28's FGSM copies lower block2's confidence much more than
    block1's (held-out medians -12.5 -> -23.2 and -4.9 -> -8.6), and the two are correlated. Each
    layer alone gets a negative weight on P(OOD), but jointly block1's turns positive (a suppressor:
    given block2, a relatively high block1 confidence marks an FGSM copy). The regression then
    extrapolates to noise, whose block1 confidence is two orders of magnitude lower (bernoulli -740,
    gaussian -260 against about -5 for ID), and ranks it above every ID sample: AUROC 0. The original
    code's regression (LogisticRegressionCV, the same split) is what ``fit_ensemble`` fits (the test
    above). Tuned on a validation OOD set of noise instead, the noise ranks below every ID sample."""
    rng = np.random.default_rng(0)
    id_conf = correlated_confidences(rng, 1000, (-6.0, -14.0))
    fgsm_conf = correlated_confidences(rng, 1000, (-9.0, -24.0))
    for layer in range(2):  # alone, a lower confidence means more OOD
        assert fit_ensemble(id_conf[:, [layer]], fgsm_conf[:, [layer]])["coef"][0] < 0
    fgsm = fit_ensemble(id_conf, fgsm_conf)
    assert fgsm["coef"][0] > 0 > fgsm["coef"][1]
    noise = np.array([[-740.0, -90.0], [-260.0, -69.0]])  # cnn28's median bernoulli and gaussian confidences
    id_scores = ensemble_score(id_conf[:, :, 0], fgsm["coef"], fgsm["intercept"])
    assert (ensemble_score(noise, fgsm["coef"], fgsm["intercept"]) > id_scores.max()).all()

    validation = correlated_confidences(rng, 1000, (-160.0, -66.0), (40.0, 10.0))  # cnn28's uniform noise
    tuned = fit_ensemble(id_conf, validation)
    id_scores = ensemble_score(id_conf[:, :, 0], tuned["coef"], tuned["intercept"])
    assert (ensemble_score(noise, tuned["coef"], tuned["intercept"]) < id_scores.min()).all()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_the_ensemble_splits_id_and_ood_confidences_of_different_sizes_each_in_halves():
    rng = np.random.default_rng(1)
    id_conf, ood_conf = rng.normal(size=(40, 2, 1)), rng.normal(-2.0, 1.0, size=(30, 2, 1))
    chosen = fit_ensemble(id_conf, ood_conf)
    reference = LogisticRegressionCV(scoring="accuracy").fit(np.r_[id_conf[:20, :, 0], ood_conf[:15, :, 0]],
                                                             np.r_[np.zeros(20), np.ones(15)])
    np.testing.assert_allclose(chosen["coef"], reference.coef_[0], rtol=1e-10)


def test_mahalanobis_ensemble_tuning_is_a_parameter_keyed_only_where_it_matters():
    default = make_method("mahalanobis_ens")
    assert default.tune_on == "fgsm" and not default.needs_validation_set
    # the default FGSM tuning keeps the key it had before the parameter: its cached fits stay valid
    assert default.network_key() == {"layers": "backbone", "holdout": 1000, "fgsm": 0.05, "seed": 0,
                                     "version": default.version}
    validation = make_method("mahalanobis_ens", tune_on="validation")
    assert validation.needs_validation_set
    key = validation.network_key()
    assert key["tune_on"] == "validation" and "fgsm" not in key  # the FGSM step size plays no part
    assert validation.network_key() == make_method("mahalanobis_ens", tune_on="validation", fgsm=0.1).network_key()
    with pytest.raises(ValueError, match="tune_on must be one of"):
        make_method("mahalanobis_ens", tune_on="test").network_key()
    # the fitted state and the outputs are keyed by the validation entry too; the FGSM fit's are not
    fit, val, other = (SimpleNamespace(data_key=k) for k in ("fit0", "val0", "val1"))
    assert default.fit_key(None, val) == default.network_key() and default.output_key(fit, None, val) == \
        default.output_key(fit)
    assert validation.fit_key(None, val)["validation"] == "val0"
    assert validation.output_key(fit, None, val) != validation.output_key(fit, None, other)
    with pytest.raises(ValueError, match="its fit needs that set's entry"):
        validation.output_key(fit)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_mahalanobis_ensemble_tuned_on_a_validation_set_fits_held_out_id_against_its_images(monkeypatch):
    """tune_on='validation': the regression and epsilon are fitted on held-out ID images against
    seeded images of the validation OOD set (no FGSM copies are made); the state records which."""
    import methods.network_passes as passes_module

    backbone = tiny_backbone()
    network = Network(backbone, CPU, 16)
    fit_images, labels = images(60, seed=1), np.arange(60) % 3
    rows = SimpleNamespace(images=fit_images, cached={"labels": labels, "logits": np.zeros((60, 3))}.get)
    noise = images(30, seed=7) // 2  # a validation OOD set of 30 darker images (not separable at once: a quick fit)
    validation = SimpleNamespace(images=noise)
    in_one_piece = lambda step, n, names, compute: compute(0, n)  # noqa: E731
    method = make_method("mahalanobis_ens", layers="stem,body", holdout=20, tune_on="validation")
    with pytest.raises(ValueError, match="tunes the regression on the benchmark's validation OOD set"):
        method.network_fit(network, rows, in_one_piece)

    def no_fgsm(*args, **kwargs):
        raise AssertionError("an ensemble tuned on the validation set makes no FGSM copies")
    monkeypatch.setattr(passes_module, "fgsm_inputs", no_fgsm)
    state = method.network_fit(network, rows, in_one_piece, validation=validation)
    held, tuned = state["holdout_rows"], state["validation_rows"]
    assert len(held) == 20 and len(tuned) == 20 and len(set(tuned)) == 20 and tuned.max() < 30
    stats = {layer: (state[f"means/{layer}"], state[f"precision/{layer}"]) for layer in ("stem", "body")}
    epsilons = tuple(state["epsilons"])
    expected = fit_ensemble(passes_module.mahalanobis_confidences(network, fit_images[held], ("stem", "body"), stats,
                                                                  epsilons),
                            passes_module.mahalanobis_confidences(network, noise[tuned], ("stem", "body"), stats,
                                                                  epsilons))
    np.testing.assert_allclose(state["coef"], expected["coef"], rtol=1e-10)
    np.testing.assert_array_equal(state["selection_fpr95"], expected["selection_fpr95"])
    assert state["epsilon"][0] == epsilons[expected["epsilon_index"]]


# ---------------------------------------------------------------- through the harness, on the trained digits-net

@pytest.fixture
def digits(cache_copy, tmp_path):
    run = BenchmarkRun(load_benchmark("digits"), RunOptions(cache_dir=cache_copy, out_dir=tmp_path, progress=False))
    evaluation = Evaluation(run.resolve(compute=False), run.store, tmp_path, network=lambda: run)
    [backbone] = evaluation.resolution.backbones
    return run, evaluation, backbone, evaluation.open_entries(backbone)


@pytest.mark.parametrize("variant", ["p", "b", "s", "rand"])
def test_ash_at_the_penultimate_layer_through_the_network_equals_the_cache_only_method(digits, variant):
    run, evaluation, backbone, entries = digits
    p = {"p": 60.0, "b": 65.0, "s": 90.0, "rand": 65.0}[variant]
    network_method = make_method("ash_layer", variant=variant, p=p, layer=PENULTIMATE)
    cache_only = make_method(f"ash_{variant}", p=p)
    for label in ("digits-test", "digits-6to9"):
        derived = evaluation.derived_entry(backbone, network_method, label, entries[label])
        shaped = cache_only._logits(entries[label])  # W ash(v) + b from the cached features and head
        assert np.abs(derived.logits - shaped).max() <= 1e-4
        np.testing.assert_allclose(network_method.score_samples(derived), cache_only.score_samples(entries[label]),
                                   atol=1e-4)
        np.testing.assert_array_equal(network_method.predict(derived), cache_only.predict(entries[label]))


def test_react_at_the_penultimate_layer_through_the_network_equals_the_cache_only_react(digits):
    run, evaluation, backbone, entries = digits
    fit, test = entries["digits-train"], entries["digits-test"]
    method = make_method("react_layer", layer=PENULTIMATE, fit_samples=0)
    method.load_state(evaluation.network_state(backbone, method, fit))
    cache_only = make_method("react").fit(fit)
    assert method.c_ == cache_only.c_  # the same percentile of the same fit features
    derived = evaluation.derived_entry(backbone, method, "digits-test", test, fit)
    assert np.abs(derived.logits - cache_only._logits(test)).max() <= 1e-4
    np.testing.assert_array_equal(method.predict(derived), cache_only.predict(test))
    inner = make_method("react_layer", fit_samples=100)  # block2.1 activations of 100 seeded fit rows
    state = evaluation.network_state(backbone, inner, fit)
    assert len(state.array("fit_rows")) == 100 and state.array("c")[0] > 0


def test_gradnorm_by_autograd_on_the_head_equals_the_closed_form_from_the_cache(digits):
    run, evaluation, backbone, entries = digits
    method = make_method("gradnorm_autograd", T=2.0)
    for label in ("digits-test", "photo-patches"):
        derived = evaluation.derived_entry(backbone, method, label, entries[label])
        closed = gradnorm(entries[label].logits.astype(np.float64), entries[label].features.astype(np.float64), 2.0)
        np.testing.assert_allclose(method.score_samples(derived), closed, rtol=1e-5)


def test_symbolic_layers_are_keyed_by_the_modules_the_backbone_declares():
    """'last_block' and 'backbone' stand for what the backbone declares: outputs computed at one
    declared layer are never reused for a backbone that declares another, and naming the declared
    layer explicitly shares its outputs."""
    ash = make_method("ash_layer")
    assert ash.network_key({"shaping_layer": "block2.1"}) == make_method("ash_layer", layer="block2.1").network_key()
    assert ash.network_key({"shaping_layer": "block2.1"}) != ash.network_key({"shaping_layer": "block1.1"})
    react = make_method("react_layer")
    assert react.network_key({"shaping_layer": "act2"})["layer"] == "act2"
    ens = make_method("mahalanobis_ens")
    assert ens.network_key({"layers": ["a", "b"]})["layers"] == ["a", "b"]
    assert ens.network_key({"layers": ["a", "b"]}) != ens.network_key({"layers": ["a"]})


def test_network_methods_run_the_network_once_and_sweeps_rerun_only_the_tail(digits, forwards):
    run, evaluation, backbone, entries = digits
    full_passes = lambda: forwards.count("DigitsNet")  # noqa: E731
    tail_passes = lambda: forwards.count("GraphModule")  # noqa: E731
    scored = ("digits-test", "digits-6to9", "photo-patches", "gaussian", "uniform", "digits-val")  # + selection sets
    batches = sum(-(-len(entries[label]) // run.benchmark.batch_size) for label in scored)

    def scores(name, **params):
        scored = evaluation.scores(backbone, MethodRef(name, params), entries)
        return {label: s.scores for label, s in scored.items()}

    first = scores("ash_layer", layer="block2.0")  # not cached by the digits extraction: full passes
    assert full_passes() > 0 and tail_passes() == 0
    forwards.clear()
    again = scores("ash_layer", layer="block2.0")  # scores cached: nothing runs
    assert forwards == []
    for label in first:
        np.testing.assert_array_equal(first[label], again[label])
    scores("ash_layer", layer="block2", p=80.0)  # block2 is cached: only the tail (pooling, head) runs
    assert full_passes() == 0 and tail_passes() == batches
    forwards.clear()
    scores("ash_layer", layer="block2", p=95.0)  # a new sweep point: the tail again, no full pass
    assert full_passes() == 0 and tail_passes() == batches
    forwards.clear()
    scores("odin", T=1000.0, epsilon=0.0)  # no perturbation: the cached logits, no network at all
    assert forwards == []
    scores("odin", T=10.0)  # forward, backward, forward per batch
    assert full_passes() == 2 * batches
    forwards.clear()
    scores("odin", T=10.0)
    assert forwards == []


def test_derived_entries_are_plain_hdf5_with_their_convention_and_a_corrupt_one_is_recomputed(digits, caplog):
    run, evaluation, backbone, entries = digits
    odin = make_method("odin", T=1000.0, epsilon=0.0014)
    derived = evaluation.derived_entry(backbone, odin, "digits-test", entries["digits-test"])
    with h5py.File(derived.path, "r") as h5:
        assert set(h5) == {"logits", "features", "labels", "predictions"}
        assert len(h5["logits"]) == len(entries["digits-test"])
    assert derived.meta["kind"] == "derived" and derived.meta["base"] == entries["digits-test"].data_key
    assert derived.meta["odin"]["epsilon_units"] == "[0,1] pixel units (sign map / channel std)"
    np.testing.assert_array_equal(derived.array("predictions"), entries["digits-test"].logits.argmax(axis=1))
    np.testing.assert_array_equal(derived.head[0], entries["digits-test"].head[0])
    original = derived.logits.copy()
    with open(derived.path, "r+b") as handle:  # flip bytes inside the logits
        handle.seek(derived.path.stat().st_size // 2)
        handle.write(b"\xff" * 64)
    again = derive(odin, run.resolved_backbone(backbone), run.datasets()["digits-test"][1], entries["digits-test"],
                   run.store, batch_size=run.benchmark.batch_size, progress=False)
    assert "recomputing a corrupt derived entry" in caplog.text
    np.testing.assert_array_equal(again.logits, original)
    assert derived.path.with_name(derived.path.name + ".corrupt").exists()


def test_a_network_method_without_a_network_or_with_a_bad_layer_gets_one_clear_error(digits, tmp_path):
    run, evaluation, backbone, entries = digits
    offline = Evaluation(evaluation.resolution, run.store, tmp_path)
    with pytest.raises(LookupError, match="no cached ash_layer\\(p=70\\) network outputs on digits-test for "
                                          "digits-net; run `oodbench run digits --methods ash_layer`"):
        offline.scores(backbone, MethodRef("ash_layer", {"p": 70.0}), entries)
    with pytest.raises(ValueError, match="has no layer 'nope'; use 'penultimate', 'last_block' or one of its "
                                         "modules: block1, block1.0"):
        evaluation.scores(backbone, MethodRef("ash_layer", {"layer": "nope"}), entries)
    with pytest.raises(ValueError, match="odin: epsilon must be >= 0"):
        evaluation.scores(backbone, MethodRef("odin", {"epsilon": -1.0}), entries)
    with pytest.raises(ValueError, match="ash_layer scores the outputs of its own network pass .*not digits/test"):
        make_method("ash_layer").score_samples(entries["digits-test"])  # the plain entry would give energy's numbers
    with pytest.raises(ValueError, match="odin scores the outputs of its own network pass"):
        make_method("odin").predict(entries["digits-test"])
    with pytest.raises(ValueError, match="unknown variant 'q'"):
        evaluation.scores(backbone, MethodRef("ash_layer", {"variant": "q"}), entries)


def test_mahalanobis_ensemble_is_tuned_on_held_out_fit_images_and_scored_from_its_derived_entries(digits, forwards):
    run, evaluation, backbone, entries = digits
    fit = entries["digits-train"]
    scored = evaluation.scores(backbone, MethodRef("mahalanobis_ens", {"holdout": 200}), entries)
    method = make_method("mahalanobis_ens", holdout=200)
    state = evaluation.network_state(backbone, method, fit)
    held = state.array("holdout_rows")
    assert len(held) == 200 and held.max() < len(fit)  # rows of the fit split: no test image is used
    assert state.array("epsilon")[0] == state.array("epsilons")[np.argmin(state.array("selection_fpr95"))]
    with h5py.File(state.path, "r") as h5:  # plain HDF5: per-layer class means and precision
        assert set(h5["means"]) == set(h5["precision"]) == {"block1", "block2"}
    method.load_state(state)
    derived = evaluation.derived_entry(backbone, method, "digits-test", entries["digits-test"], fit)
    assert derived.array("confidences").shape == (len(entries["digits-test"]), 2)
    np.testing.assert_array_equal(scored["digits-test"].scores, method.score_samples(derived))
    forwards.clear()
    evaluation.scores(backbone, MethodRef("mahalanobis_ens", {"holdout": 200}), entries)
    assert forwards == []  # state, outputs and scores all cached


def test_an_interrupted_network_fit_resumes_from_the_chunks_of_its_completed_passes(digits, forwards, monkeypatch):
    run, evaluation, backbone, entries = digits
    fit, images = entries["digits-train"], run.datasets()["digits-train"][1]
    arguments = (run.resolved_backbone(backbone), images, fit, run.store)
    options = {"batch_size": 64, "chunk_batches": 2, "progress": False}  # several chunks per pass
    method = make_method("mahalanobis_ens", holdout=200)
    path = fit.derived_path("mahalanobis_ens-fit", method.network_key(backbone.info["declared"]))

    def killed(*args):  # the run dies after its three network passes, before the regression
        raise KeyboardInterrupt
    monkeypatch.setattr(network_scores, "fit_ensemble", killed)
    with pytest.raises(KeyboardInterrupt):
        derive_state(method, *arguments, **options)
    assert not path.exists() and len(list(partial_folder(path).iterdir())) > 3
    monkeypatch.undo()
    forwards.clear()
    resumed = derive_state(method, *arguments, **options)
    assert forwards == [] and resumed.path == path and not partial_folder(path).exists()

    network = Network(arguments[0], CPU, 64)  # the same fit in one piece, nothing cached
    reference = method.network_fit(network, EntryRows(images, fit, 0, len(images)),
                                   lambda step, n, names, compute: compute(0, n))
    for name, array in reference.items():
        np.testing.assert_allclose(resumed.array(name), array, rtol=1e-12, err_msg=name)


def test_a_network_method_with_non_finite_outputs_is_left_out_of_the_run_with_its_reason(digits, monkeypatch):
    """ASH-S's exp(sum / kept sum) overflows on signed activations (measured on the OE ConvNet):
    such a method is left out of that backbone's leaderboard with one line saying why, nothing
    half-made is cached, and every other method still scores."""
    import methods.shaping_scores as shaping

    run, evaluation, backbone, entries = digits
    overflow = lambda rows, p: np.where(np.arange(len(rows))[:, None] % 7 == 0, np.inf, rows)  # noqa: E731
    monkeypatch.setitem(shaping.ASH_VARIANTS, "s", overflow)
    cached_before = sorted(run.store.root.rglob("*.ash_layer.*.h5"))
    metrics = evaluation.evaluate((MethodRef("energy"), MethodRef("ash_layer", {"layer": "block2.0"})), plot=False)
    assert set(metrics["method"]) == {"energy"}
    [line] = [line for line in evaluation.summary.lines if line.startswith("left out")]
    assert line.startswith("left out ash_layer(layer=block2.0) on digits-net seed 0: ash_layer(layer=block2.0) "
                           "produced NaN or infinite outputs on ")
    assert "choose another layer or parameters" in line
    assert sorted(run.store.root.rglob("*.ash_layer.*.h5")) == cached_before  # no derived entry holds them


@pytest.mark.parametrize("name", sorted(set(METHODS) - set(CACHE_ONLY_METHODS)))
def test_a_network_method_scores_its_derived_entry_the_same_shuffled_or_cut(name):
    """The scoring step of every network method (from the arrays of its derived entry, several
    BLOCK_ROWS blocks long) meets the batch-independence contract (``assert_batch_invariant``) when
    the entry is shuffled or cut at block-misaligned rows. The float32 network passes that write the
    entry are checked against unbatched forwards by the tests above."""
    rng = np.random.default_rng(3)
    n = 2 * BLOCK_ROWS + 77
    arrays = {"logits": rng.normal(0, 3, (n, 5)), "features": np.maximum(rng.normal(0.5, 1, (n, 8)), 0),
              "gradnorm": rng.gamma(2.0, 1.0, n), "confidences": rng.normal(0, 1, (n, 3))}
    method = make_method(name)
    method.coef_, method.intercept_ = rng.normal(size=3), 0.5  # a fitted ensemble's state (others ignore it)

    def score(rows):
        entry = {key: array[rows] for key, array in arrays.items()}
        return method.score_samples(SimpleNamespace(meta={"kind": "derived", "method": name}, name="toy/derived",
                                            logits=entry["logits"], features=entry["features"], array=entry.get))

    whole = score(slice(None))
    order = rng.permutation(n)
    assert_batch_invariant(whole[order], score(order))
    assert_batch_invariant(whole, [score(slice(0, 5)), score(slice(5, 1500)), score(slice(1500, None))])


def test_the_mahalanobis_ensemble_tuned_on_the_validation_set_runs_through_the_harness(cache_copy, tmp_path):
    """tune_on=validation through a benchmark run: the fit learns on the ID fit split and the
    validation OOD set's images, is keyed by that set's entry, and scores every set."""
    import oodbench as ob

    bench = ob.Bench("digits", cache_dir=cache_copy, out_dir=tmp_path, progress=False)
    metrics = bench.score("mahalanobis_ens", tune_on="validation")
    assert len(metrics) == 3 and metrics["auroc"].between(0, 1).all()
    [fit_state] = [p for p in cache_copy.glob("*/derived/digits.train-fit.mahalanobis_ens-fit.*.h5")
                   if "validation" in read_meta(p)["network_key"]]
    assert read_meta(fit_state)["network_key"]["validation"] == bench.splits().validation.data_key
    assert "fgsm" not in read_meta(fit_state)["network_key"]
