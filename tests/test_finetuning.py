"""Training objectives and fine-tuning (UM, UMAP, OE, energy-bounded, DOE, POEM): losses against
hand-computed values, gradients against their definitions, masks against their exact counts, the
fine-tuned weights against what UMAP must leave untouched, DOE's step against its two updates
computed by hand and POEM's posterior against the closed form."""
import copy
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import extract.training as training
import methods.finetuning as finetuning
from extract.backbones import get_backbone_spec, registered_backbone
from extract.datasets import load_dataset
from extract.finetuning import FineTuneRecipe, mask_count_changed
from extract.training import Recipe, train_backbone
from methods.finetuning import (
    DiversifiedOutlierExposure,
    PopupNetwork,
    PosteriorSampling,
    doe_step,
    finetune_backbone,
    poem_selection,
)
from methods.training_objectives import (
    bayesian_posterior,
    boundary_outliers,
    energy_bounded_loss,
    estimate_zeta,
    keep_mask,
    masked_layers,
    oe_loss,
    popup_mask,
    popup_scores,
    thompson_sample,
    um_loss,
)


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


def crash_after_epochs(monkeypatch, epochs):
    """Make training raise KeyboardInterrupt right after it saves its ``epochs``-th resume state."""
    saves, original = [], training.save_checked

    def save(obj, path):
        original(obj, path)
        saves.append(path)
        if sum(p.name.endswith(".resume.pt") for p in saves) == epochs:
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(training, "save_checked", save)


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
def test_masks_drop_exactly_int_of_one_minus_keep_of_every_layer(keep):
    model = Tiny()
    scores = popup_scores(model, seed=3)
    assert set(scores) == set(masked_layers(model)) == {"conv", "fc"}
    for _name, score in scores.items():
        mask = keep_mask(score, keep)
        numel = score.numel()
        assert int((mask == 0).sum()) == int((1 - keep) * numel)  # GetSubnet's j, in floating point
        dropped, kept = score.abs()[mask == 0].numpy(), score.abs()[mask == 1].numpy()
        assert dropped.max(initial=0) <= kept.min()  # the smallest |s| are dropped
    fan_in = model.fc.weight.shape[1]  # kaiming-uniform(a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert scores["fc"].abs().max() <= 1 / math.sqrt(fan_in)
    assert all(torch.equal(a, b) for a, b in zip(scores.values(), popup_scores(model, seed=3).values()))
    assert not torch.equal(scores["fc"], popup_scores(model, seed=4)["fc"])


def test_masks_truncate_the_float_product_as_the_official_get_subnet():
    """allenai/hidden-networks' GetSubnet zeroes j = int((1 - k) * numel) scores, the float product
    truncated: where it lands just under an integer, one fewer than the exact floor (and than the
    former floor(x + 1e-9)). Worked by hand: (1 - 0.9) * 10 = 0.9999999999999998, so a 10-weight
    layer keeping 90% drops none; (1 - 0.8) * 640 = 127.99999999999997 (cnn28's 64 x 10 head keeping
    80%, UMAP's default) drops 127, the 127 smallest |s|; (1 - 0.975) * 400 = 10.000000000000009
    drops 10."""
    assert (1 - 0.9) * 10 < 1 and (1 - 0.8) * 640 < 128 and (1 - 0.975) * 400 > 10  # the floating point
    assert math.floor((1 - Fraction("0.9")) * 10) == 1 and math.floor((1 - Fraction("0.8")) * 640) == 128
    assert torch.equal(keep_mask(torch.arange(1.0, 11.0), 0.9), torch.ones(10))
    scores = -torch.arange(1.0, 641.0).view(10, 64)  # |s| = 1 ... 640
    mask = keep_mask(scores, 0.8)
    assert mask.shape == (10, 64) and int((mask == 0).sum()) == 127
    assert torch.equal(mask.flatten(), (torch.arange(1.0, 641.0) > 127).float())
    assert int((keep_mask(torch.arange(1.0, 401.0), 0.975) == 0).sum()) == 10
    assert torch.equal(popup_mask(scores, 0.8), mask)  # UMAP's straight-through mask: the same rule


def test_the_mask_rule_keys_the_weights_whose_mask_count_can_change():
    """The rounding of the mask count changed (issue 17): the weights of a recipe whose mask fraction
    can give another count (UMAP's default keep 0.8) are keyed anew; the others keep their keys
    (UM's delta 0.975, 0.97, 0.965), and for those the two rules agree on every layer size."""
    n = np.arange(1, 200_001, dtype=np.float64)
    for keep in (0.975, 0.97, 0.965, 0.95, 0.5, 0.6, 0.99):
        assert not mask_count_changed(keep)
        assert np.array_equal(np.trunc((1 - keep) * n), np.floor((1 - keep) * n + 1e-9)), keep
    assert mask_count_changed(0.8) and mask_count_changed(0.9)
    for masked in (FineTuneRecipe(epochs=1, forget="umap"), FineTuneRecipe(epochs=1, forget="umap", zeta=0.1),
                   FineTuneRecipe(epochs=1, forget="um", delta=0.9)):
        assert masked.identity()["mask_count"] == "int"
    for kept in (FineTuneRecipe(epochs=1), FineTuneRecipe(epochs=1, forget="um"),
                 FineTuneRecipe(epochs=1, forget="um", zeta=0.1), FineTuneRecipe(epochs=1, forget="umap", keep=0.5),
                 FineTuneRecipe(epochs=1, objective="oe", outliers="digits-ood", forget="um", delta=0.97)):
        assert "mask_count" not in kept.identity()


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
    # the official code's behaviour, on request: train mode moves the batch-norm statistics (only them)
    updated, _ = finetune_backbone("digits-net+umap", base, FineTuneRecipe(
        epochs=1, lr=0.05, batch_size=64, forget="umap", keep=0.8, zeta=0.05, bn_stats="update"), train,
        num_classes=6, seed=0, weights_dir=tmp_path, progress=False)
    statistics = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert statistics and all(not torch.equal(updated[k], before[k]) for k in statistics)
    assert all(torch.equal(updated[k], before[k]) for k in before if k.endswith("bias"))


@pytest.mark.slow
def test_um_fine_tuning_estimates_zeta_and_resumes_to_the_same_weights(digits_backbone, tmp_path, monkeypatch):
    base, train, test = digits_backbone
    recipe = FineTuneRecipe(epochs=3, lr=0.02, batch_size=64, forget="um", delta=0.9, snapshot_every=1)
    reference, record = finetune_backbone("digits-net+um", base, recipe, train, num_classes=6, seed=0,
                                          weights_dir=tmp_path / "reference", test_set=test, progress=False)
    assert record["zeta_estimated"] and record["zeta"] > 0 and record["snapshots"] == [
        "epoch-0001.pt", "epoch-0002.pt", "epoch-0003.pt"]
    assert [h["epoch"] for h in record["history"]] == [1, 2, 3]
    crash_after_epochs(monkeypatch, 2)
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


def test_um_fine_tuning_follows_the_um_codes_momentum_schedule_and_crop_padding(digits_backbone, tmp_path,
                                                                                monkeypatch):
    """Issue 17, item 8: a fine-tuning recipe with the UM code's choices - plain momentum, the cosine
    set once per epoch, crops padded with black - gets them in training and in zeta's estimate (the
    UM code's estimate_loss runs over the augmented train loader)."""
    base, train, test = digits_backbone
    calls = {"zeta": [], "train": [], "lr": [], "nesterov": []}

    def recording(where, original):
        def augment(batch, kind, generator, fill=None):
            calls[where].append(fill)
            return original(batch, kind, generator, fill)
        return augment

    def recorded_lr(recipe, epoch, index, steps_per_epoch, original=training.step_learning_rate):
        calls["lr"].append((epoch, original(recipe, epoch, index, steps_per_epoch)))
        return calls["lr"][-1][1]

    def recorded_optimizer(recipe, params, original=training._optimizer):
        optimizer = original(recipe, params)
        calls["nesterov"].append(optimizer.defaults["nesterov"])
        return optimizer

    monkeypatch.setattr(finetuning, "augment", recording("zeta", finetuning.augment))
    monkeypatch.setattr(training, "augment", recording("train", training.augment))
    monkeypatch.setattr(training, "step_learning_rate", recorded_lr)
    monkeypatch.setattr(training, "_optimizer", recorded_optimizer)
    recipe = FineTuneRecipe(epochs=2, lr=0.1, batch_size=256, forget="um", delta=0.9, augmentation="crop",
                            nesterov=False, schedule_step="epoch", crop_padding="black")
    _, record = finetune_backbone("digits-net+um", base, recipe, train, num_classes=6, seed=0,
                                  weights_dir=tmp_path, progress=False)
    black = torch.tensor([(0 - 0.3) / 0.4])  # digits-net's normalisation of a black pixel
    assert calls["zeta"] and all(torch.allclose(fill, black) for fill in calls["zeta"])
    assert calls["train"] and all(torch.allclose(fill, black) for fill in calls["train"])
    assert calls["nesterov"] == [False]
    steps = len(calls["lr"]) // 2  # 0.5 (1 + cos(pi e / 2)) 0.1 for every step of epoch e
    assert [epoch for epoch, _ in calls["lr"]] == [0] * steps + [1] * steps and steps > 1
    assert [lr for _, lr in calls["lr"]] == pytest.approx([0.1] * steps + [0.05] * steps)
    assert record["recipe"]["crop_padding"] == "black"
    # the defaults are the earlier fine-tuning: Nesterov, per batch, padded with the mean colour, and the
    # same weights key (the identity of a recipe from before the options)
    assert FineTuneRecipe(epochs=2, forget="um", augmentation="crop").identity() == {
        "epochs": 2, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0001, "batch_size": 128,
        "schedule": "cosine", "augmentation": "crop", "objective": "ce", "forget": "um", "delta": 0.975,
        "zeta": None, "outliers": ""}
    assert {"nesterov", "schedule_step", "crop_padding"} <= set(recipe.identity())

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
    for objective in ("doe", "poem"):
        with pytest.raises(ValueError, match=f"objective '{objective}' needs 'outliers'"):
            FineTuneRecipe(epochs=1, objective=objective)
    with pytest.raises(ValueError, match="doe_warmup >= 0 and poem_keep, poem_buffer >= 1"):
        FineTuneRecipe(epochs=1, objective="poem", outliers="digits-ood", poem_keep=0)
    with pytest.raises(ValueError, match="doe_warmup >= 0 and poem_keep, poem_buffer >= 1"):
        FineTuneRecipe(epochs=1, objective="poem", outliers="digits-ood", poem_buffer=0)
    doe, poem = (FineTuneRecipe(epochs=1, objective=o, outliers="digits-ood", forget="um", zeta=0.1)
                 for o in ("doe", "poem"))
    assert "doe_warmup" in doe.identity() and not {"poem_keep", "poem_conf", "m_in", "oe_weight"} & set(doe.identity())
    assert {"poem_keep", "poem_conf", "m_in", "m_out", "energy_weight"} <= set(poem.identity())
    assert "doe_warmup" not in poem.identity() and "doe_warmup" not in FineTuneRecipe(epochs=1).identity()
    assert (doe.label, poem.label) == ("DOE + UM", "POEM + UM")


def extrapolated(net, batch, num_id):
    """DOE's diff by its official recipe: one SGD step (lr 1) of a copy on g^2, g = d(-L_OE(scale * f))/d scale;
    the copy's weights minus the network's."""
    proxy = copy.deepcopy(net)
    scale = torch.tensor(1.0, requires_grad=True)
    out = scale * proxy(batch)[num_id:]
    (slope,) = torch.autograd.grad((out.mean(1) - torch.logsumexp(out, 1)).mean(), scale, create_graph=True)
    sgd = torch.optim.SGD(proxy.parameters(), lr=1.0)
    sgd.zero_grad()
    (slope ** 2).backward()
    sgd.step()
    return [q.detach() - p.detach() for q, p in zip(proxy.parameters(), net.parameters())]


def test_one_doe_step_is_exactly_the_two_clipped_updates_and_removes_the_perturbation():
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        model.fc.weight.mul_(4)  # gradients large enough to be clipped
    x, y = tiny_data(16)
    outliers = tiny_data(8, seed=1)[0]
    batch, start = torch.cat([x, outliers]), copy.deepcopy(model)
    doe = DiversifiedOutlierExposure(model, list(model.parameters()), zeta=None, warmup_steps=0, seed=0, gammas=(0.1,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # no momentum, no weight decay
    loss, logits = doe_step(doe, optimizer, x, y, outliers)

    def at(weights):  # a copy of the starting network (its batch-norm statistics) with these weights
        net = copy.deepcopy(start)
        with torch.no_grad():
            for parameter, weight in zip(net.parameters(), weights):
                parameter.copy_(weight)
        return net

    def clipped_gradient(net, objective):  # clip_grad_norm_(1): scale by min(1, 1 / (norm + 1e-6))
        grads = torch.autograd.grad(objective, list(net.parameters()))
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads)).item()
        return [g * min(1.0, 1.0 / (norm + 1e-6)) for g in grads], norm

    w = [p.detach().clone() for p in start.parameters()]
    diff = extrapolated(start, batch, 16)  # the first post-warm-up step uses it as is
    perturbed = at([p + 0.1 * d for p, d in zip(w, diff)])
    out = perturbed(batch)[16:]
    outlier_loss = (torch.logsumexp(out, 1) - out.mean(1)).mean()
    g1, norm1 = clipped_gradient(perturbed, outlier_loss)
    w1 = [p - 0.5 * g for p, g in zip(w, g1)]  # the perturbation removed: the second pass is at w1
    restored = at(w1)
    restored_logits = restored(batch)[:16]
    id_term = F.cross_entropy(restored_logits, y)
    g2, norm2 = clipped_gradient(restored, id_term)
    w2 = [p - 0.5 * g for p, g in zip(w1, g2)]
    assert max(norm1, norm2) > 1  # the clipping took effect
    for parameter, expected in zip(model.parameters(), w2):
        torch.testing.assert_close(parameter.detach(), expected, atol=1e-6, rtol=0)
    assert loss == pytest.approx(outlier_loss.item() + id_term.item(), rel=1e-6)
    torch.testing.assert_close(logits, restored_logits)
    for kept, expected in zip(doe.diffs, diff):  # the running diff is the model's state, not its weights
        torch.testing.assert_close(kept, expected, atol=1e-6, rtol=1e-5)
    # batch norm moved once, by the unperturbed pass: neither the proxy nor the perturbed pass touched it
    assert int(model.bn.num_batches_tracked) == 1
    torch.testing.assert_close(model.bn.running_mean, restored.bn.running_mean)
    torch.testing.assert_close(model.bn.running_var, restored.bn.running_var)
    new = extrapolated(copy.deepcopy(model), batch, 16)
    doe_step(doe, optimizer, x, y, outliers)
    assert int(doe.updates) == 2
    for kept, old, fresh in zip(doe.diffs, diff, new):  # afterwards an exponential average
        torch.testing.assert_close(kept, 0.6 * old + 0.4 * fresh, atol=1e-6, rtol=1e-5)


def test_doe_warm_up_is_one_clipped_step_on_ce_plus_the_full_oe_term():
    torch.manual_seed(0)
    model = Tiny()
    x, y = tiny_data(16)
    outliers = 3 * tiny_data(8, seed=1)[0]
    reference = copy.deepcopy(model)
    doe = DiversifiedOutlierExposure(model, list(model.parameters()), zeta=0.5, warmup_steps=1, seed=0)
    loss, _ = doe_step(doe, torch.optim.SGD(model.parameters(), lr=0.5), x, y, outliers)
    logits = reference(torch.cat([x, outliers]))
    expected = oe_loss(logits[:16], y, logits[16:], weight=1.0, zeta=0.5)
    expected.backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    torch.optim.SGD(reference.parameters(), lr=0.5).step()
    assert loss == pytest.approx(expected.item(), rel=1e-6) and int(doe.updates) == 1
    assert not any(d.any() for d in doe.diffs)  # no direction during warm-up
    for parameter, expected_parameter in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(parameter, expected_parameter)


def test_poem_posterior_is_the_closed_form():
    rng = np.random.default_rng(0)
    z, y = rng.normal(size=(30, 4)), rng.normal(size=30)
    for sigma, sigma_n in ((20.0, 0.5), (2.0, 3.0)):
        mu, covariance = bayesian_posterior(torch.from_numpy(z), torch.from_numpy(y), sigma, sigma_n)
        a = z.T @ z / sigma_n + np.eye(4) / sigma
        np.testing.assert_allclose(mu.numpy(), np.linalg.inv(a) @ z.T @ y / sigma_n, rtol=1e-10)
        np.testing.assert_allclose(covariance.numpy(), sigma * np.linalg.inv(a), rtol=1e-10)
    mu, _ = bayesian_posterior(torch.from_numpy(z).float(), torch.from_numpy(y))  # defaults 20, 0.5; in float64
    np.testing.assert_allclose(mu.numpy(), np.linalg.solve(z.T @ z / 0.5 + np.eye(4) / 20, z.T @ y / 0.5), rtol=1e-6)


def test_poem_defaults_keep_one_eighth_of_the_pool_and_buffer_four_epochs():
    """POEM (METHODS.md 2.5): 50,000 of a pool of 200 x 2,000 outliers per epoch, a regression
    buffer of the last 4 epochs (the official BUF_SIZE); both key the POEM weights and no others."""
    poem = FineTuneRecipe(epochs=1, objective="poem", outliers="digits-ood")
    assert poem.poem_keep is None and poem.poem_buffer == 4
    assert poem.poem_kept(200 * 2000) == 50_000 and poem.poem_kept(1000) == 125 and poem.poem_kept(7) == 1
    assert FineTuneRecipe(epochs=1, objective="poem", outliers="digits-ood", poem_keep=300).poem_kept(400_000) == 300
    assert poem.identity()["poem_buffer"] == 4
    assert poem.identity() != FineTuneRecipe(epochs=1, objective="poem", outliers="digits-ood",
                                             poem_buffer=1).identity()
    for other in (FineTuneRecipe(epochs=1), FineTuneRecipe(epochs=1, objective="energy", outliers="digits-ood"),
                  FineTuneRecipe(epochs=1, objective="doe", outliers="digits-ood")):
        assert "poem_buffer" not in other.identity()


def test_poem_regression_uses_the_outliers_chosen_in_the_last_four_epochs(monkeypatch):
    """Observed at the regression: at the start of epoch e it gets the outliers chosen in epochs
    max(0, e - 4) ... e - 1 (their features by the current network) and the epoch's ID sample once
    per buffered epoch, with targets -conf / +conf; epoch 0 samples from the prior."""
    torch.manual_seed(0)
    network = Tiny().eval()
    inputs, _ = tiny_data(30, seed=1)
    pool, _ = tiny_data(40, seed=2)
    model = PosteriorSampling(network, "fc", inputs, pool, keep=5, conf=3.0, device="cpu")
    assert model.selected.shape == (4, 5)  # the default buffer: four epochs of choices
    seen, original = [], finetuning.bayesian_posterior

    def posterior(features, targets):
        seen.append((features.clone(), targets.clone()))
        return original(features, targets)

    monkeypatch.setattr(finetuning, "bayesian_posterior", posterior)
    pool_features = model.features(pool)  # the network does not train here: the same every epoch
    chosen = []
    for epoch in range(7):
        chosen.append(poem_selection(model, epoch, training.epoch_generator(0, epoch)))
        assert len(seen) == epoch and len(set(chosen[-1].tolist())) == 5
        if epoch == 0:
            continue
        features, targets = seen[-1]
        buffered = [e for e in range(max(0, epoch - 4), epoch)]
        assert len(features) == 2 * 5 * len(buffered) == len(targets)
        id_part, outlier_part = features[:5 * len(buffered)], features[5 * len(buffered):]
        by_slot = torch.cat([chosen[e] for e in sorted(buffered, key=lambda e: e % 4)])
        torch.testing.assert_close(outlier_part, pool_features[by_slot])
        assert all(torch.equal(block, id_part[:5]) for block in id_part.split(5))  # one ID sample, repeated
        assert not any(torch.equal(id_part[:1], row[None]) for row in outlier_part)
        assert (targets[:len(id_part)] < 0).float().mean() > 0.9 and (targets[len(id_part):] > 0).float().mean() > 0.9
    assert [len(f) for f, _ in seen] == [10, 20, 30, 40, 40, 40]  # 1, 2, 3, 4, 4, 4 epochs of 5 outliers
    one = PosteriorSampling(network, "fc", inputs, pool, keep=5, conf=3.0, device="cpu", buffer=1)
    for epoch in range(3):
        poem_selection(one, epoch, training.epoch_generator(0, epoch))
    assert [len(f) for f, _ in seen[6:]] == [10, 10]  # a buffer of one epoch: the previous epoch alone


def test_thompson_selection_keeps_the_outliers_nearest_the_sampled_boundary():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [-1.0, 0.5], [0.1, -0.1]])
    beta = torch.tensor([1.0, -1.0], dtype=torch.float64)  # |beta^T z| = 1, 1, 0, 1.5, 0.2
    assert boundary_outliers(features, beta, 2).tolist() == [2, 4]
    assert boundary_outliers(features, beta, 3).tolist() == [2, 4, 0]  # a tie goes to the first row
    rng = np.random.default_rng(1)
    z, b = rng.normal(size=(200, 6)), rng.normal(size=6)
    chosen = boundary_outliers(torch.from_numpy(z), torch.from_numpy(b), 50).numpy()
    assert set(chosen) == set(np.argsort(np.abs(z @ b))[:50])
    # beta ~ N(mu, Sigma); a negative eigenvalue (numerical trouble) is taken by its magnitude
    vectors = torch.linalg.qr(torch.from_numpy(rng.normal(size=(3, 3))))[0]
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    for values in ((2.0, 1.0, 0.5), (2.0, -1.0, 0.5)):
        covariance = vectors @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ vectors.T
        samples = torch.stack([thompson_sample(mu, covariance, generator) for _ in range(4000)]).numpy()
        np.testing.assert_allclose(samples.mean(0), mu.numpy(), atol=0.1)
        expected = (vectors @ torch.diag(torch.tensor(values, dtype=torch.float64).abs()) @ vectors.T).numpy()
        np.testing.assert_allclose(np.cov(samples.T), expected, atol=0.15)


@pytest.mark.slow
def test_poem_fine_tuning_runs_on_an_eighth_of_the_pool_and_widens_the_energy_gap(digits_backbone, tmp_path):
    base, train, test = digits_backbone
    outliers = load_dataset("digits", "ood")

    def energy_gap(model):  # mean energy of the outliers minus that of the ID test set
        with torch.no_grad():
            energy = [-torch.logsumexp(model.eval()(base.preprocessing(images)), 1).mean().item()
                      for images in (outliers.images, test.images)]
        return energy[0] - energy[1]

    recipe = FineTuneRecipe(epochs=2, lr=0.02, batch_size=64, objective="poem", outliers="digits-ood",
                            outlier_batch_size=64, m_in=-6.0, m_out=-2.0)  # margins on this tiny network's scale
    state, record = finetune_backbone("digits-net+poem", base, recipe, train, num_classes=6, seed=0,
                                      weights_dir=tmp_path, test_set=test, outlier_set=outliers, progress=False)
    assert record["label"] == "POEM" and record["poem_keep"] == len(outliers.images) // 8
    assert record["recipe"]["poem_buffer"] == 4
    tuned = registered_backbone(get_backbone_spec("digits-net"), state, "digits-net+poem", 6)  # no POEM state left
    assert energy_gap(tuned.model) > energy_gap(base.model) + 0.2
    assert [h["epoch"] for h in record["history"]] == [1, 2] and record["history"][-1]["test_acc"] > 0.9


@pytest.mark.slow
@pytest.mark.parametrize("objective, forget, label", [("doe", "um", "DOE + UM"), ("doe", "umap", "DOE + UMAP"),
                                                      ("poem", "um", "POEM + UM")])
def test_doe_and_poem_resume_to_the_same_weights(digits_backbone, tmp_path, monkeypatch, objective, forget, label):
    base, train, test = digits_backbone
    outliers = load_dataset("digits", "ood")
    recipe = FineTuneRecipe(epochs=2, lr=0.02, batch_size=128, objective=objective, outliers="digits-ood",
                            outlier_batch_size=64, forget=forget, zeta=0.05, doe_warmup=0, poem_keep=200)

    def run(folder):
        return finetune_backbone(f"digits-net+{objective}", base, recipe, train, num_classes=6, seed=0,
                                 weights_dir=tmp_path / folder, test_set=test, outlier_set=outliers, progress=False)

    reference, record = run("reference")
    assert record["label"] == label and set(reference) == set(base.model.state_dict())
    crash_after_epochs(monkeypatch, 1)  # DOE's running diff / POEM's last choice must survive the interruption
    with pytest.raises(KeyboardInterrupt):
        run("interrupted")
    monkeypatch.undo()
    resumed, again = run("interrupted")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert again["history"] == record["history"]
