"""Train a registry backbone from a benchmark file's recipe; weights are cached by content.

The recipe (optimizer, learning rate, schedule, epochs, batch size, augmentation) together with
the architecture, the training set's fingerprint and the seed determine a weights file under
``<cache>/weights/``. Training saves a resumable state after every epoch, so an interrupted run
continues where it stopped; the data order of epoch e comes from a generator seeded with
(seed, e), which makes a resumed run follow the same path as an uninterrupted one.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from extract.backbones import BackboneSpec
from extract.datasets import ImageSet
from extract.store import atomic_target, content_key

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "onecycle")
AUGMENTATIONS = ("none", "flip", "crop")


@dataclass(frozen=True)
class Recipe:
    """How to train a backbone (a benchmark file's ``train:`` mapping)."""

    epochs: int
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 128
    schedule: str = "onecycle"
    augmentation: str = "none"

    def __post_init__(self):
        for name, value, valid in (("optimizer", self.optimizer, OPTIMIZERS), ("schedule", self.schedule, SCHEDULES),
                                   ("augmentation", self.augmentation, AUGMENTATIONS)):
            if value not in valid:
                raise ValueError(f"training recipe: {name} {value!r} is not one of {valid}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"training recipe needs epochs >= 1, batch_size >= 1 and lr > 0, got {self}")

    @classmethod
    def from_config(cls, config: dict) -> "Recipe":
        known = set(cls.__dataclass_fields__)
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"training recipe: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**config)


def _optimizer(recipe: Recipe, params) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                               nesterov=recipe.momentum > 0)
    optimizer = torch.optim.Adam if recipe.optimizer == "adam" else torch.optim.AdamW
    return optimizer(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


def learning_rate(recipe: Recipe, step: int, total_steps: int) -> float:
    """The per-step learning rate: constant; cosine from lr to 0; or one-cycle (linear warm-up over
    the first 30% of steps from lr/25 to lr, then cosine down to lr/1e4)."""
    progress = step / max(1, total_steps)
    if recipe.schedule == "constant":
        return recipe.lr
    if recipe.schedule == "cosine":
        return 0.5 * recipe.lr * (1 + math.cos(math.pi * progress))
    warmup = 0.3
    if progress < warmup:
        return recipe.lr / 25 + (recipe.lr - recipe.lr / 25) * progress / warmup
    down = (progress - warmup) / (1 - warmup)
    return recipe.lr / 1e4 + 0.5 * (recipe.lr - recipe.lr / 1e4) * (1 + math.cos(math.pi * down))


def augment(batch: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips ('flip'), or flips plus 4-pixel padded random crops ('crop')."""
    if kind == "none":
        return batch
    flip = torch.rand(len(batch), generator=generator) < 0.5
    batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
    if kind == "crop":
        size = batch.shape[-1]
        padded = F.pad(batch, (4, 4, 4, 4))
        offsets = torch.randint(0, 9, (len(batch), 2), generator=generator)
        batch = torch.stack([padded[i, :, dy:dy + size, dx:dx + size] for i, (dy, dx) in enumerate(offsets.tolist())])
    return batch


@torch.no_grad()
def evaluate(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> dict:
    """Mean cross-entropy and top-1 accuracy in eval mode."""
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(inputs), batch_size):
        logits = model(inputs[start:start + batch_size])
        target = labels[start:start + batch_size]
        loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    return {"loss": loss / len(inputs), "acc": correct / len(inputs)}


def weights_path(weights_dir: Path, spec: BackboneSpec, recipe: Recipe, train_set: ImageSet,
                 num_classes: int, seed: int) -> Path:
    key = content_key("weights", spec.name, asdict(recipe), train_set.fingerprint(), num_classes, seed,
                      spec.preprocessing.describe())
    return Path(weights_dir) / f"{spec.name}-seed{seed}-{key}.pt"


def _atomic_torch_save(obj, path: Path) -> None:
    with atomic_target(path) as tmp:
        torch.save(obj, tmp)


def train_backbone(spec: BackboneSpec, recipe: Recipe, train_set: ImageSet, *, num_classes: int, seed: int,
                   weights_dir: Path, test_set: ImageSet | None = None, device: str = "cpu",
                   progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Train (or load the cached result of training) ``spec`` on ``train_set``; return (state_dict, record).

    The record holds the recipe, seed and per-epoch history (train loss; test loss and accuracy
    when ``test_set`` is given).
    """
    final = weights_path(weights_dir, spec, recipe, train_set, num_classes, seed)
    if final.exists():
        saved = torch.load(final, map_location="cpu", weights_only=True)
        return saved["state_dict"], saved["record"]
    final.parent.mkdir(parents=True, exist_ok=True)
    resume = final.with_name(final.stem + ".resume.pt")

    torch.manual_seed(seed)
    model = spec.build(num_classes=num_classes).to(device)
    optimizer = _optimizer(recipe, model.parameters())
    history, first_epoch = [], 0
    if resume.exists():
        state = torch.load(resume, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, first_epoch = state["history"], state["epoch"]
        log.info("resuming training of %s seed %d at epoch %d", spec.name, seed, first_epoch + 1)

    inputs = spec.preprocessing(train_set.images)
    labels = torch.as_tensor(train_set.labels, dtype=torch.long)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"training labels of {train_set.name} must lie in [0, {num_classes}); "
                         f"got range [{int(labels.min())}, {int(labels.max())}]")
    test = (spec.preprocessing(test_set.images).to(device),
            torch.as_tensor(test_set.labels, dtype=torch.long).to(device)) if test_set is not None else None
    steps_per_epoch = math.ceil(len(inputs) / recipe.batch_size)
    total_steps = recipe.epochs * steps_per_epoch
    for epoch in range(first_epoch, recipe.epochs):
        generator = torch.Generator().manual_seed(int(np.uint32(seed * 1_000_003 + epoch)))
        order = torch.randperm(len(inputs), generator=generator)
        model.train()
        running, seen = 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"train {spec.name} seed {seed} epoch {epoch + 1}/{recipe.epochs}",
                   disable=None if progress else True, leave=False)
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(recipe, epoch * steps_per_epoch + step, total_steps)
            rows = order[step * recipe.batch_size:(step + 1) * recipe.batch_size]
            batch = augment(inputs[rows], recipe.augmentation, generator).to(device)
            loss = F.cross_entropy(model(batch), labels[rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(rows)
            seen += len(rows)
        entry = {"epoch": epoch + 1, "train_loss": running / seen}
        if test is not None:
            entry.update({f"test_{k}": v for k, v in evaluate(model, *test).items()})
        history.append(entry)
        log.info("train %s seed %d: %s", spec.name, seed, entry)
        _atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "history": history, "epoch": epoch + 1}, resume)
    record = {"recipe": asdict(recipe), "seed": seed, "train_set": train_set.fingerprint(), "history": history}
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _atomic_torch_save({"state_dict": state_dict, "record": record}, final)
    resume.unlink(missing_ok=True)
    return state_dict, record
