"""Training objectives and fine-tuning (UM, UMAP, OE, energy-bounded): losses against hand-computed
values, gradients against their definitions, masks against their exact counts, and the fine-tuned
weights against what UMAP must leave untouched."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import extract.training as training
from extract.backbones import get_backbone_spec, registered_backbone
from extract.datasets import load_dataset
from extract.finetuning import FineTuneRecipe, PopupNetwork, finetune_backbone
from extract.training import Recipe, train_backbone
from methods.training_objectives import (energy_bounded_loss, estimate_zeta, keep_mask, masked_layers, oe_loss,
                                         popup_mask, popup_scores, um_loss)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 16, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def tiny_data(n=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 4, 4, generator=generator), torch.randint(0, 4, (n,), generator=generator)


@pytest.fixture(scope="module")
def digits_backbone(tmp_path_factory):
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    spec = get_backbone_spec("digits-net")
    state, _ = train_backbone(spec, Recipe(epochs=10, lr=0.01, batch_size=32), train, num_classes=6, seed=0,
                              weights_dir=tmp_path_factory.mktemp("weights"), progress=False)
    return registered_backbone(spec, state, "digits-net", 6), train, test


def test_um_loss_descends_above_zeta_and_ascends_below_it():
    torch.manual_seed(0)
    model = Tiny()
    x, y = tiny_data()
    ce_value = F.cross_entropy(model(x), y).item()
    ce_grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    for zeta, sign in ((ce_value - 0.5, 1.0), (ce_value + 0.5, -1.0)):
        loss = um_loss(F.cross_entropy(model(x), y), zeta)
        assert loss.item() == pytest.approx(abs(ce_value - zeta) + zeta, rel=1e-6)
        for um, ce in zip(torch.autograd.grad(loss, list(model.parameters())), ce_grads):
            torch.testing.assert_close(um, sign * ce)


def test_outlier_losses_match_hand_computed_values():
    id_logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    outlier_logits = torch.tensor([[1.0, 1.0, 1.0], [3.0, 0.0, 0.0]])
    ce = (-(2 - math.log(math.exp(2) + 2)) - (0 - math.log(2 + math.e))) / 2
    uniform = ((math.log(3 * math.e) - 1) + (math.log(math.exp(3) + 2) - 1)) / 2  # LSE - mean logit
    assert oe_loss(id_logits, labels, outlier_logits).item() == pytest.approx(ce + 0.5 * uniform, rel=1e-6)
    assert oe_loss(id_logits, labels, outlier_logits, zeta=2.0).item() == \
        pytest.approx(abs(ce - 2.0) + 2.0 + 0.5 * uniform, rel=1e-6)
    # energies E = -LSE: with margins (-1.5, -2.5) the first ID and the first outlier sample violate them
    e_in = [-math.log(math.exp(2) + 2), -math.log(2 + math.e)]
    e_out = [-math.log(3 * math.e), -math.log(math.exp(3) + 2)]
    bound = sum(max(e - (-1.5), 0) ** 2 for e in e_in) / 2 + sum(max(-2.5 - e, 0) ** 2 for e in e_out) / 2
    assert bound > 0
    assert energy_bounded_loss(id_logits, labels, outlier_logits, weight=0.1, m_in=-1.5, m_out=-2.5).item() == \
        pytest.approx(ce + 0.1 * bound, rel=1e-6)


@pytest.mark.parametrize("keep", [0.975, 0.97, 0.8, 0.5, 1.0])
def test_masks_drop_exactly_floor_of_one_minus_keep_of_every_layer(keep):
    model = Tiny()
    scores = popup_scores(model, seed=3)
    assert set(scores) == set(masked_layers(model)) == {"conv", "fc"}
    for name, score in scores.items():
        mask = keep_mask(score, keep)
        numel = score.numel()
        assert int((mask == 0).sum()) == math.floor((1 - Fraction(str(keep))) * numel)  # exact arithmetic
        dropped, kept = score.abs()[mask == 0].numpy(), score.abs()[mask == 1].numpy()
        assert dropped.max(initial=0) <= kept.min()  # the smallest |s| are dropped
    fan_in = model.fc.weight.shape[1]  # kaiming-uniform(a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert scores["fc"].abs().max() <= 1 / math.sqrt(fan_in)
    assert all(torch.equal(a, b) for a, b in zip(scores.values(), popup_scores(model, seed=3).values()))
    assert not torch.equal(scores["fc"], popup_scores(model, seed=4)["fc"])


def test_zeta_is_the_mean_cross_entropy_of_the_seeded_masked_model_and_reproducible():
    torch.manual_seed(0)
    model = Tiny().eval()
    x, y = tiny_data(40)
    batches = lambda: [(x[:16], y[:16]), (x[16:], y[16:])]  # noqa: E731  (weighted by batch size)
    zeta = estimate_zeta(model, 0.9, seed=7, batches=batches())
    assert zeta == estimate_zeta(model, 0.9, seed=7, batches=batches())
    masked = Tiny().eval()
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():  # the same mask applied by hand
        for name, score in popup_scores(model, seed=7).items():
            getattr(masked, name).weight.mul_(keep_mask(score, 0.9))
        assert zeta == pytest.approx(F.cross_entropy(masked(x), y).item(), rel=1e-6)
    assert zeta != estimate_zeta(model, 0.9, seed=8, batches=batches())
    assert zeta != pytest.approx(F.cross_entropy(model(x), y).item())


def test_popup_scores_get_the_straight_through_gradient():
    torch.manual_seed(0)
    model = Tiny()
    network = PopupNetwork(model, keep=0.6, seed=0)
    x, y = tiny_data()
    F.cross_entropy(network(x), y).backward()
    # the same loss with W_eff as a leaf: dL/ds must be sign(s) * (dL/dW_eff * W)
    weights = {f"{n}.weight": (getattr(model, n).weight * keep_mask(network.scores[n], 0.6)).detach().requires_grad_()
               for n in ("conv", "fc")}
    F.cross_entropy(torch.func.functional_call(model, weights, (x,)), y).backward()
    for name in ("conv", "fc"):
        expected = network.scores[name].sign() * weights[f"{name}.weight"].grad * getattr(model, name).weight
        torch.testing.assert_close(network.scores[name].grad, expected)
        assert getattr(model, name).weight.grad is None  # frozen
    assert popup_mask(network.scores["fc"], 0.6).sum() == network.scores["fc"].numel() - math.floor(0.4 * 4 * 48)


@pytest.mark.slow
def test_umap_leaves_every_weight_bit_identical_and_keeps_the_requested_fraction(digits_backbone, tmp_path):
    base, train, test = digits_backbone
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    recipe = FineTuneRecipe(epochs=2, lr=0.05, batch_size=64, forget="umap", keep=0.8, zeta=0.05)
    state, record = finetune_backbone("digits-net+umap", base, recipe, train, num_classes=6, seed=0,
                                      weights_dir=tmp_path, test_set=test, progress=False)
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())  # base untouched
    assert record["zeta"] == 0.05 and not record["zeta_estimated"] and record["label"] == "UMAP"
    for name in masked_layers(base.model):
        weight, effective = before[f"{name}.weight"], state[f"{name}.weight"]
        kept = effective != 0
        assert int(kept.sum()) == weight.numel() - math.floor(0.2 * weight.numel())  # no weight is exactly 0
        assert torch.equal(effective[kept], weight[kept])  # bit-identical where kept
    for key in before:  # biases and batch-norm statistics (frozen by default) unchanged
        if not any(key == f"{name}.weight" for name in masked_layers(base.model)):
            assert torch.equal(state[key], before[key]), key


@pytest.mark.slow
def test_um_fine_tuning_estimates_zeta_and_resumes_to_the_same_weights(digits_backbone, tmp_path, monkeypatch):
    base, train, test = digits_backbone
    recipe = FineTuneRecipe(epochs=3, lr=0.02, batch_size=64, forget="um", delta=0.9, snapshot_every=1)
    reference, record = finetune_backbone("digits-net+um", base, recipe, train, num_classes=6, seed=0,
                                          weights_dir=tmp_path / "reference", test_set=test, progress=False)
    assert record["zeta_estimated"] and record["zeta"] > 0 and record["snapshots"] == [
        "epoch-0001.pt", "epoch-0002.pt", "epoch-0003.pt"]
    assert [h["epoch"] for h in record["history"]] == [1, 2, 3]
    saves, original = [], training._atomic_torch_save

    def crash_after_the_second_epoch(obj, path):
        original(obj, path)
        saves.append(path)
        if sum(p.name.endswith(".resume.pt") for p in saves) == 2:
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(training, "_atomic_torch_save", crash_after_the_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        finetune_backbone("digits-net+um", base, recipe, train, num_classes=6, seed=0,
                          weights_dir=tmp_path / "interrupted", test_set=test, progress=False)
    monkeypatch.undo()
    resumed, again = finetune_backbone("digits-net+um", base, recipe, train, num_classes=6, seed=0,
                                       weights_dir=tmp_path / "interrupted", test_set=test, progress=False)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert again["zeta"] == record["zeta"] and again["history"] == record["history"]


@pytest.mark.slow
def test_outlier_exposure_with_um_trains_on_the_outliers_and_lowers_their_confidence(digits_backbone, tmp_path):
    base, train, test = digits_backbone
    outliers = load_dataset("digits", "ood")  # digits 6-9 stand in for auxiliary outliers here
    probe = torch.as_tensor(outliers.images[:200])

    def outlier_msp(model):
        with torch.no_grad():
            return F.softmax(model.eval()(base.preprocessing(probe.numpy())), dim=1).max(1).values.mean().item()

    recipe = FineTuneRecipe(epochs=3, lr=0.02, batch_size=64, objective="oe", outliers="digits-ood",
                            outlier_batch_size=64, forget="um", zeta=0.02)
    state, record = finetune_backbone("digits-net+oe+um", base, recipe, train, num_classes=6, seed=0,
                                      weights_dir=tmp_path, test_set=test, outlier_set=outliers, progress=False)
    tuned = registered_backbone(get_backbone_spec("digits-net"), state, "digits-net+oe+um", 6)
    assert record["label"] == "OE + UM" and tuned.key != base.key
    assert outlier_msp(tuned.model) < outlier_msp(base.model) - 0.1
    assert record["history"][-1]["test_acc"] > 0.8


def test_fine_tuning_recipes_are_validated():
    with pytest.raises(ValueError, match="objective 'oe' needs 'outliers'"):
        FineTuneRecipe(epochs=1, objective="oe")
    with pytest.raises(ValueError, match="forget 'mask' is not one of"):
        FineTuneRecipe(epochs=1, forget="mask")
    with pytest.raises(ValueError, match="delta and keep must lie in"):
        FineTuneRecipe(epochs=1, forget="umap", keep=0.0)
    assert FineTuneRecipe(epochs=1, forget="um", zeta=0.1).identity() != \
        FineTuneRecipe(epochs=1, forget="um", zeta=0.2).identity()
    assert FineTuneRecipe(epochs=1, gamma=0.5).identity() == FineTuneRecipe(epochs=1).identity()  # cosine: unused
    assert np.isclose(FineTuneRecipe(epochs=1).lr, 0.01)
