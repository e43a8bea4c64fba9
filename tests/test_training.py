"""Training from a recipe: validation, schedules, cached weights and resumption after an interruption."""
import math

import pytest
import torch

import extract.training as training
from extract.backbones import get_backbone_spec
from extract.datasets import load_dataset
from extract.training import Recipe, learning_rate, train_backbone

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
