"""Training from a recipe: validation, schedules, cached weights and resumption after an interruption."""
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import extract.training as training
from extract.backbones import Preprocessing, get_backbone_spec
from extract.datasets import load_dataset
from extract.training import Recipe, augment, learning_rate, padding_fill, train_backbone, weights_path

RECIPE = Recipe(epochs=6, optimizer="adam", lr=0.01, batch_size=32, schedule="onecycle")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def train(tmp_path, digits, recipe=RECIPE, seed=0):
    return train_backbone(get_backbone_spec("digits-net"), recipe, digits[0], num_classes=6, seed=seed,
                          weights_dir=tmp_path, test_set=digits[1], progress=False)


def test_recipe_validation():
    with pytest.raises(ValueError, match="optimizer 'lbfgs' is not one of"):
        Recipe(epochs=1, optimizer="lbfgs")
    with pytest.raises(ValueError, match="needs epochs >= 1"):
        Recipe(epochs=0)
    with pytest.raises(ValueError, match="unknown keys \\['epoch'\\]"):
        Recipe.from_config({"epoch": 3})


def test_learning_rate_schedules():
    assert learning_rate(Recipe(epochs=1, lr=0.1, schedule="constant"), 7, 10) == 0.1
    cosine = Recipe(epochs=1, lr=0.1, schedule="cosine")
    assert learning_rate(cosine, 0, 10) == pytest.approx(0.1)
    assert learning_rate(cosine, 5, 10) == pytest.approx(0.05)
    assert learning_rate(cosine, 10, 10) == pytest.approx(0.0, abs=1e-12)
    linear = Recipe(epochs=1, lr=0.1, schedule="linear")
    assert [learning_rate(linear, step, 10) for step in (0, 5, 10)] == pytest.approx([0.1, 0.05, 0.0])
    multistep = Recipe(epochs=1, lr=0.1, schedule="multistep", milestones=[0.5, 0.75], gamma=0.1)
    assert [learning_rate(multistep, step, 100) for step in (0, 49, 50, 74, 75, 99)] == \
        pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    with pytest.raises(ValueError, match="milestones must be increasing fractions"):
        Recipe(epochs=1, schedule="multistep", milestones=[0.75, 0.5])
    onecycle = Recipe(epochs=1, lr=0.1, schedule="onecycle")
    assert learning_rate(onecycle, 0, 100) == pytest.approx(0.004)
    assert learning_rate(onecycle, 30, 100) == pytest.approx(0.1)
    assert learning_rate(onecycle, 65, 100) == pytest.approx(1e-5 + 0.5 * (0.1 - 1e-5) * (1 + math.cos(math.pi / 2)))


def test_training_learns_and_is_cached(tmp_path, digits):
    state, record = train(tmp_path, digits)
    assert [h["epoch"] for h in record["history"]] == [1, 2, 3, 4, 5, 6]
    assert record["history"][-1]["test_acc"] > 0.9
    assert record["history"][-1]["train_loss"] < record["history"][0]["train_loss"]
    (weights,) = tmp_path.glob("digits-net-seed0-*.pt")
    again, _ = train(tmp_path, digits)  # loaded from the cache, not retrained
    assert all(torch.equal(state[k], again[k]) for k in state)
    other_seed, _ = train(tmp_path, digits, seed=1)
    assert not torch.equal(state["fc.weight"], other_seed["fc.weight"])


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, digits, monkeypatch):
    reference, _ = train(tmp_path / "reference", digits)
    saves = []
    original = training.save_checked

    def crash_after_second_epoch(obj, path):
        original(obj, path)
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(training, "save_checked", crash_after_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "interrupted", digits)
    assert not list((tmp_path / "interrupted").glob("*seed0-????????????????.pt"))  # no final weights yet
    monkeypatch.setattr(training, "save_checked", original)
    resumed, record = train(tmp_path / "interrupted", digits)
    assert [h["epoch"] for h in record["history"]] == [1, 2, 3, 4, 5, 6]
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert not list((tmp_path / "interrupted").glob("*.resume.pt"))


def test_snapshots_keep_every_nth_epoch_and_the_last_and_end_on_the_same_weights(tmp_path, digits):
    recipe = Recipe(epochs=5, optimizer="adam", lr=0.01, batch_size=32, schedule="cosine", snapshot_every=2)
    state, record = train(tmp_path, digits, recipe)
    assert record["snapshots"] == ["epoch-0002.pt", "epoch-0004.pt", "epoch-0005.pt"]
    (folder,) = tmp_path.glob("*.snapshots")
    last, last_record = training.load_weights(folder / "epoch-0005.pt")
    assert all(torch.equal(state[k], last[k]) for k in state)
    assert last_record["history"] == record["history"]
    assert [h["epoch"] for h in training.load_weights(folder / "epoch-0002.pt")[1]["history"]] == [1, 2]
    assert {"train_loss", "train_acc", "test_loss", "test_acc"} <= set(record["history"][0])
    plain, _ = train(tmp_path / "plain", digits, Recipe(epochs=5, optimizer="adam", lr=0.01, batch_size=32,
                                                       schedule="cosine"))
    assert all(torch.equal(state[k], plain[k]) for k in state)  # keeping snapshots changes nothing


def test_labels_outside_the_class_range_are_rejected(tmp_path):
    ood = load_dataset("digits", "ood")
    with pytest.raises(ValueError, match="training labels of digits must lie in \\[0, 6\\)"):
        train_backbone(get_backbone_spec("digits-net"), RECIPE, ood, num_classes=6, seed=0, weights_dir=tmp_path,
                       progress=False)


# Issue 17, item 8: the UM code's recipe (plain momentum, cosine stepped per epoch, crops padded with
# black) as named options whose defaults keep the earlier behaviour and weights keys.


def recorded_steps(tmp_path, recipe, rows=40, fill=None):
    """Train a linear model on ``rows`` random 3x4x4 inputs by ``recipe`` with ``train_epochs``; per
    step, the optimizer's learning rate and Nesterov flag as the step sees them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    inputs, labels = torch.randn(rows, 3, 4, 4), torch.arange(rows) % 3
    seen, step = [], training.gradient_step(training.cross_entropy_loss)

    def recording(model, optimizer, x, y, outliers):
        seen.append({"lr": optimizer.param_groups[0]["lr"], "nesterov": optimizer.param_groups[0].get("nesterov")})
        return step(model, optimizer, x, y, outliers)

    training.train_epochs(model, model.parameters(), recipe, inputs, labels, seed=0, final=tmp_path / "w.pt",
                          describe="recorded", step=recording, fill=fill, progress=False)
    return seen


def test_sgd_uses_nesterov_momentum_by_default_and_plain_momentum_as_the_um_code(tmp_path):
    sgd = Recipe(epochs=1, optimizer="sgd", lr=0.1, batch_size=16)
    assert {s["nesterov"] for s in recorded_steps(tmp_path / "default", sgd)} == {True}
    # the UM code: args.py --nesterov default False, passed to torch.optim.SGD by utils/net_utils.get_optimizer
    assert {s["nesterov"] for s in recorded_steps(tmp_path / "um", replace(sgd, nesterov=False))} == {False}
    # torch has no Nesterov without momentum: plain SGD then, whatever the option says
    assert {s["nesterov"] for s in recorded_steps(tmp_path / "none", replace(sgd, momentum=0.0))} == {False}


def test_the_schedule_steps_per_batch_by_default_and_per_epoch_as_the_um_code(tmp_path):
    recipe = Recipe(epochs=4, optimizer="sgd", lr=0.1, batch_size=10, schedule="cosine")  # 40 rows: 4 steps/epoch
    per_batch = [s["lr"] for s in recorded_steps(tmp_path / "batch", recipe)]
    assert per_batch == pytest.approx([0.05 * (1 + math.cos(math.pi * k / 16)) for k in range(16)])
    # the UM code: main.py calls utils/schedulers.cosine_lr once before every epoch e (from 0), which sets
    # lr_e = 0.5 (1 + cos(pi e / E)) lr0 for the whole epoch
    per_epoch = [s["lr"] for s in recorded_steps(tmp_path / "epoch", replace(recipe, schedule_step="epoch"))]
    assert per_epoch == pytest.approx([0.05 * (1 + math.cos(math.pi * e / 4)) for e in range(4) for _ in range(4)])
    with pytest.raises(ValueError, match="schedule_step 'step' is not one of \\('batch', 'epoch'\\)"):
        Recipe(epochs=1, schedule_step="step")


def test_black_crop_padding_pads_the_image_with_zeros_before_the_normalisation():
    prep = Preprocessing(8, 3, mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010))
    images = np.random.default_rng(0).integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    fill = padding_fill(Recipe(epochs=1, augmentation="crop", crop_padding="black"), prep)
    torch.testing.assert_close(fill, -torch.tensor(prep.mean) / torch.tensor(prep.std))
    black = augment(prep(images), "crop", torch.Generator().manual_seed(3), fill)
    # torchvision's order in the UM code (data/cifar.py): RandomCrop(32, padding=4) pads the image with
    # black, then ToTensor and the normalisation; here the same flips and offsets by the same generator
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(black, prep.normalise(augment(pixels, "crop", torch.Generator().manual_seed(3))))
    # the default pads the normalised input with zeros, the normalisation's mean colour; only the border differs
    inside = augment(torch.ones(6, 1, 8, 8), "crop", torch.Generator().manual_seed(3)).bool().expand(-1, 3, -1, -1)
    mean = augment(prep(images), "crop", torch.Generator().manual_seed(3))
    assert (~inside).any()
    assert torch.equal(mean[inside], black[inside]) and (mean[~inside] == 0).all()
    assert torch.equal(black[~inside], fill.view(1, 3, 1, 1).expand_as(black)[~inside])
    assert padding_fill(Recipe(epochs=1, augmentation="crop"), prep) is None
    assert padding_fill(Recipe(epochs=1, augmentation="flip", crop_padding="black"), prep) is None


def test_training_pads_its_crops_with_black_when_the_recipe_says_so(tmp_path, digits, monkeypatch):
    fills, original = [], training.augment

    def recording(batch, kind, generator, fill=None):
        fills.append(fill)
        return original(batch, kind, generator, fill)

    monkeypatch.setattr(training, "augment", recording)
    recipe = Recipe(epochs=1, optimizer="sgd", lr=0.1, batch_size=64, augmentation="crop", crop_padding="black")
    train(tmp_path, digits, recipe)
    assert fills and all(torch.allclose(f, torch.tensor([-0.75])) for f in fills)  # digits-net: (0 - 0.3) / 0.4
    with pytest.raises(ValueError, match="pads its crops with black; pass fill"):
        recorded_steps(tmp_path / "unfilled", recipe)


def test_the_options_at_their_defaults_keep_every_earlier_weights_key(digits):
    spec, train_set = get_backbone_spec("digits-net"), digits[0]
    recipe = Recipe(epochs=3, optimizer="sgd", lr=0.1, batch_size=32, schedule="cosine", augmentation="crop")
    # the identity and the file name this recipe had before the options existed
    assert recipe.identity() == {"epochs": 3, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0,
                                 "batch_size": 32, "schedule": "cosine", "augmentation": "crop"}
    assert weights_path(Path("w"), spec, recipe, train_set, 6, 0).name == "digits-net-seed0-212902c5da025cc5.pt"
    um = replace(recipe, nesterov=False, schedule_step="epoch", crop_padding="black")
    assert um.identity() == {**recipe.identity(), "nesterov": False, "schedule_step": "epoch", "crop_padding": "black"}
    assert weights_path(Path("w"), spec, um, train_set, 6, 0) != weights_path(Path("w"), spec, recipe, train_set, 6, 0)
    # an option that cannot change the run stays out of the key: Nesterov for Adam or without momentum, the
    # step of a constant schedule, the padding without crops
    adam = Recipe(epochs=1, optimizer="adam", schedule="constant", augmentation="flip")
    assert replace(adam, nesterov=False, schedule_step="epoch", crop_padding="black").identity() == adam.identity()
    assert replace(recipe, momentum=0.0, nesterov=False).identity() == replace(recipe, momentum=0.0).identity()
