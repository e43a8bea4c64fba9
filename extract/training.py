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

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from extract.backbones import BackboneSpec
from extract.cachefiles import file_lock
from extract.datasets import ImageSet
from extract.store import content_key
from extract.weights import load_checked, load_or_quarantine, save_checked

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")
# The UM paper's four schedules (constant, cosine, linear, multi-step) and one-cycle.
SCHEDULES = ("constant", "cosine", "linear", "multistep", "onecycle")
AUGMENTATIONS = ("none", "flip", "crop")
# How often the schedule moves: every batch (the harness's default), or once at the start of every
# epoch, lr_e = schedule(e / epochs) (the UM code's cosine_lr, called once per epoch in main.py).
SCHEDULE_STEPS = ("batch", "epoch")
# What a random crop's 4-pixel border holds: 'mean', zeros of the normalised input (the
# normalisation's mean colour; the harness's default), or 'black', pixel value 0 before the
# normalisation (torchvision's RandomCrop(32, padding=4) on the image before ToTensor/Normalize, as
# the UM, OE and energy_ood data pipelines).
CROP_PADDINGS = ("mean", "black")


@dataclass(frozen=True)
class Recipe:
    """How to train a backbone (a benchmark file's ``train:`` mapping). ``milestones`` (fractions of
    the run) and ``gamma`` shape the multi-step schedule; ``snapshot_every`` = N > 0 keeps the
    weights and metrics of every N-th epoch (and the last) for the per-epoch report.

    Named options whose defaults keep the harness's earlier behaviour (and weights keys), and whose
    other value is the UM code's (``benchmarks/cifar*-um.yaml`` set them): ``nesterov`` (SGD with
    Nesterov momentum; the UM code's default is plain momentum), ``schedule_step`` (``batch``: the
    schedule moves every step; ``epoch``: once per epoch) and ``crop_padding`` (``mean`` or ``black``,
    see ``CROP_PADDINGS``)."""

    epochs: int
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 128
    schedule: str = "onecycle"
    augmentation: str = "none"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    snapshot_every: int = 0
    nesterov: bool = True
    schedule_step: str = "batch"
    crop_padding: str = "mean"

    # What each field accepts beyond its annotated type: a range ('>= 1', '> 0', '(0, 1]'; for a
    # list, of every item) or a tuple of choices. harness.config checks a benchmark file's `train:`
    # against both, naming the file and the key, before building the recipe; __post_init__ checks the
    # choices of a recipe built in code from here, its ranges and what spans fields (increasing
    # milestones). Not annotated: no field.
    LIMITS = {"epochs": ">= 1", "lr": "> 0", "momentum": ">= 0", "weight_decay": ">= 0", "batch_size": ">= 1",
              "milestones": "(0, 1)", "gamma": "(0, 1]", "snapshot_every": ">= 0", "optimizer": OPTIMIZERS,
              "schedule": SCHEDULES, "augmentation": AUGMENTATIONS, "schedule_step": SCHEDULE_STEPS,
              "crop_padding": CROP_PADDINGS}

    DESCRIPTION = "training recipe"  # how errors name it

    def __post_init__(self):
        for name, valid in self.LIMITS.items():  # the choices (of a subclass's fields too); ranges below
            if isinstance(valid, tuple) and getattr(self, name) not in valid:
                raise ValueError(f"{self.DESCRIPTION}: {name} {getattr(self, name)!r} is not one of {valid}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"training recipe needs epochs >= 1, batch_size >= 1 and lr > 0, got {self}")
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        if not all(0 < m < 1 for m in self.milestones) or list(self.milestones) != sorted(self.milestones) \
                or not 0 < self.gamma <= 1 or self.snapshot_every < 0:
            raise ValueError("training recipe: milestones must be increasing fractions in (0, 1), gamma in (0, 1] "
                             f"and snapshot_every >= 0; got {self.milestones}, {self.gamma}, {self.snapshot_every}")

    @classmethod
    def from_config(cls, config: dict) -> "Recipe":
        known = set(cls.__dataclass_fields__)
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"training recipe: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**config)

    def identity(self) -> dict:
        """What keys the trained weights: every field that changes them - the multi-step shape only
        for that schedule - and ``snapshot_every`` when snapshots are kept, so asking for snapshots
        trains a run that has them (to the same weights) instead of finding one without. The options
        added by issue 17 (``nesterov``, ``schedule_step``, ``crop_padding``) only where they differ
        from their defaults and change the run, so every earlier recipe keeps its key."""
        fields = asdict(self)
        if not self.snapshot_every:
            del fields["snapshot_every"]
        if self.schedule != "multistep":
            del fields["milestones"], fields["gamma"]
        if self.nesterov or self.optimizer != "sgd" or self.momentum == 0:
            del fields["nesterov"]
        if self.schedule_step == "batch" or self.schedule == "constant":
            del fields["schedule_step"]
        if self.crop_padding == "mean" or self.augmentation != "crop":
            del fields["crop_padding"]
        return fields


def _optimizer(recipe: Recipe, params) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                               nesterov=recipe.nesterov and recipe.momentum > 0)
    optimizer = torch.optim.Adam if recipe.optimizer == "adam" else torch.optim.AdamW
    return optimizer(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


def learning_rate(recipe: Recipe, step: int, total_steps: int) -> float:
    """The per-step learning rate at progress t = step / total_steps: constant; cosine,
    0.5 lr (1 + cos(pi t)); linear, lr (1 - t); multi-step, lr * gamma^(milestones passed); or
    one-cycle (linear warm-up over the first 30% of steps from lr/25 to lr, then cosine down to lr/1e4)."""
    progress = step / max(1, total_steps)
    if recipe.schedule == "constant":
        return recipe.lr
    if recipe.schedule == "cosine":
        return 0.5 * recipe.lr * (1 + math.cos(math.pi * progress))
    if recipe.schedule == "linear":
        return recipe.lr * (1 - progress)
    if recipe.schedule == "multistep":
        return recipe.lr * recipe.gamma ** sum(progress >= m for m in recipe.milestones)
    warmup = 0.3
    if progress < warmup:
        return recipe.lr / 25 + (recipe.lr - recipe.lr / 25) * progress / warmup
    down = (progress - warmup) / (1 - warmup)
    return recipe.lr / 1e4 + 0.5 * (recipe.lr - recipe.lr / 1e4) * (1 + math.cos(math.pi * down))


def step_learning_rate(recipe: Recipe, epoch: int, index: int, steps_per_epoch: int) -> float:
    """The learning rate of step ``index`` of epoch ``epoch`` (both from 0): ``learning_rate`` at
    progress (epoch * steps_per_epoch + index) / (epochs * steps_per_epoch) when the schedule steps
    per batch, at epoch / epochs for every step of the epoch when it steps per epoch (the UM code:
    cosine lr_e = 0.5 (1 + cos(pi e / E)) lr0)."""
    if recipe.schedule_step == "epoch":
        return learning_rate(recipe, epoch, recipe.epochs)
    return learning_rate(recipe, epoch * steps_per_epoch + index, recipe.epochs * steps_per_epoch)


def padding_fill(recipe: Recipe, preprocessing) -> torch.Tensor | None:
    """The per-channel value, in network-input units, of the border a crop of ``recipe`` pads with:
    (0 - mean) / std of ``preprocessing`` (a ``Preprocessing``) for black padding, None (zeros: the
    mean colour) otherwise. Normalisation is per pixel, so padding the normalised image with it is
    exactly padding the [0, 1] image with 0 and normalising afterwards."""
    if recipe.augmentation != "crop" or recipe.crop_padding != "black":
        return None
    return preprocessing.normalise(torch.zeros(preprocessing.channels, 1, 1)).flatten()


def augment(batch: torch.Tensor, kind: str, generator: torch.Generator,
            fill: torch.Tensor | None = None) -> torch.Tensor:
    """Random horizontal flips ('flip'), or flips plus 4-pixel padded random crops ('crop'); the
    padding is ``fill`` per channel (``padding_fill``), or zeros without one."""
    if kind == "none":
        return batch
    flip = torch.rand(len(batch), generator=generator) < 0.5
    batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
    if kind == "crop":
        size = batch.shape[-1]
        if fill is None:
            padded = F.pad(batch, (4, 4, 4, 4))
        else:
            n, channels, height, width = batch.shape
            padded = fill.to(batch.dtype).view(1, channels, 1, 1).expand(n, channels, height + 8, width + 8).clone()
            padded[..., 4:-4, 4:-4] = batch
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
    key = content_key("weights", spec.name, recipe.identity(), train_set.fingerprint(), num_classes, seed,
                      spec.preprocessing.describe())
    return Path(weights_dir) / f"{spec.name}-seed{seed}-{key}.pt"


def gradient_step(loss_function):
    """A training step from a loss: ``loss_function(model, inputs, labels, outliers)`` -> (loss, ID
    logits); zero the gradients, back-propagate, step."""
    def step(model, optimizer, inputs, labels, outliers):
        loss, logits = loss_function(model, inputs, labels, outliers)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item(), logits
    return step


def cross_entropy_loss(model, inputs, labels, outliers):
    logits = model(inputs)
    return F.cross_entropy(logits, labels), logits


def snapshot_folder(final: Path) -> Path:
    """Where a run's per-epoch snapshots live: beside its final weights file."""
    return final.with_name(final.stem + ".snapshots")


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, record) of a final weights file or a snapshot written by ``train_epochs``,
    verified (``extract.weights.WeightsCorrupt`` when damaged)."""
    saved = load_checked(path)
    return saved["state_dict"], saved["record"]


def cached_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(state_dict, record) of the final weights at ``path``; None when they are absent or were
    damaged (then moved aside, so they are trained again)."""
    saved = load_or_quarantine(path)
    return None if saved is None else (saved["state_dict"], saved["record"])


def train_epochs(model: torch.nn.Module, trainable, recipe: Recipe, inputs: torch.Tensor, labels: torch.Tensor, *,
                 seed: int, final: Path, describe: str, step=None, test=None, outliers: torch.Tensor | None = None,
                 outlier_batch_size: int = 0, before_epoch=None, record: dict | None = None, export=None,
                 fill: torch.Tensor | None = None, device: str = "cpu",
                 progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Train ``model``'s ``trainable`` parameters by ``recipe`` and save the result to ``final``.

    Each step draws the next ``recipe.batch_size`` rows of a permutation seeded with (seed, epoch),
    augments them with the same generator and, when ``outliers`` are given, the next
    ``outlier_batch_size`` rows of a seeded permutation of them; ``step(model, optimizer, inputs,
    labels, outliers)`` (default: cross-entropy) returns (loss, ID logits). ``before_epoch(model,
    epoch, generator)``, when given, runs at the start of every epoch (before train mode) with that
    epoch's generator and returns the rows of ``outliers`` the epoch draws from (None: all of them).
    A resume state is saved after every epoch, so an interrupted run continues where it stopped and
    follows the same path; every ``recipe.snapshot_every``-th epoch (and the last) is kept in
    ``snapshot_folder(final)``.
    The record (``record`` plus recipe, seed, history of train loss/accuracy and test loss/accuracy,
    snapshot files) is saved with the weights, which are ``export(model)`` (default: its state dict).
    ``fill`` is the crops' padding of the ``inputs`` (and ``outliers``), ``padding_fill(recipe,
    preprocessing)``; a recipe that pads with black needs it.
    """
    if recipe.augmentation == "crop" and recipe.crop_padding == "black" and fill is None:
        raise ValueError(f"{describe}: the recipe pads its crops with black; pass fill = padding_fill(recipe, "
                         "preprocessing), the normalised value of black")
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final):  # two processes (e.g. extraction shards) train one set of weights once
        saved = cached_weights(final)  # trained by another process while this one waited
        if saved is not None:
            return saved
        return _train_epochs(model, trainable, recipe, inputs, labels, seed=seed, final=final, describe=describe,
                             step=step or gradient_step(cross_entropy_loss), test=test, outliers=outliers,
                             outlier_batch_size=outlier_batch_size, before_epoch=before_epoch, record=record,
                             export=export or cpu_state, fill=fill, device=device, progress=progress)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's data order and augmentation, seeded with (seed * 1000003 + epoch)
    mod 2^32: the same seed as always for seeds below 4295, and no overflow for larger ones."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**32)


def _train_epochs(model, trainable, recipe, inputs, labels, *, seed, final, describe, step, test, outliers,
                  outlier_batch_size, before_epoch, record, export, fill, device, progress):
    resume = final.with_name(final.stem + ".resume.pt")
    model = model.to(device)
    optimizer = _optimizer(recipe, trainable)
    history, first_epoch = [], 0
    state = load_or_quarantine(resume)  # a damaged resume state is moved aside: training starts over
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, first_epoch = state["history"], state["epoch"]
        log.info("resuming %s at epoch %d", describe, first_epoch + 1)
    steps_per_epoch = math.ceil(len(inputs) / recipe.batch_size)
    snapshots = snapshot_folder(final)
    for epoch in range(first_epoch, recipe.epochs):
        generator = epoch_generator(seed, epoch)
        order = torch.randperm(len(inputs), generator=generator)
        outlier_order = None
        if outliers is not None:
            rows = before_epoch(model, epoch, generator) if before_epoch is not None else None
            rows = torch.arange(len(outliers)) if rows is None else rows
            outlier_order = rows[torch.randperm(len(rows), generator=generator)]
        model.train()
        running, correct, seen = 0.0, 0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"{describe} epoch {epoch + 1}/{recipe.epochs}",
                   disable=None if progress else True, leave=False)
        for index in bar:
            for group in optimizer.param_groups:
                group["lr"] = step_learning_rate(recipe, epoch, index, steps_per_epoch)
            rows = order[index * recipe.batch_size:(index + 1) * recipe.batch_size]
            batch = augment(inputs[rows], recipe.augmentation, generator, fill).to(device)
            target = labels[rows].to(device)
            extra = None
            if outlier_order is not None:  # cycle through the outliers' permutation
                picks = outlier_order[torch.arange(index * outlier_batch_size, (index + 1) * outlier_batch_size)
                                      % len(outlier_order)]
                extra = augment(outliers[picks], recipe.augmentation, generator, fill).to(device)
            loss, logits = step(model, optimizer, batch, target, extra)
            running += loss * len(rows)
            correct += (logits.argmax(1) == target).sum().item()
            seen += len(rows)
        entry = {"epoch": epoch + 1, "train_loss": running / seen, "train_acc": correct / seen}
        if test is not None:
            entry.update({f"test_{k}": v for k, v in evaluate(model, *test).items()})
        history.append(entry)
        log.info("%s: %s", describe, entry)
        if recipe.snapshot_every and ((epoch + 1) % recipe.snapshot_every == 0 or epoch + 1 == recipe.epochs):
            snapshots.mkdir(exist_ok=True)
            save_checked({"state_dict": export(model), "record": {**(record or {}), "seed": seed,
                                                                  "history": list(history)}},
                         snapshots / f"epoch-{epoch + 1:04d}.pt")
        save_checked({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "history": history,
                      "epoch": epoch + 1}, resume)
    full_record = {**(record or {}), "recipe": asdict(recipe), "seed": seed, "history": history,
                   "snapshots": sorted(p.name for p in snapshots.glob("epoch-*.pt")) if snapshots.is_dir() else []}
    state_dict = export(model)
    save_checked({"state_dict": state_dict, "record": full_record}, final)
    resume.unlink(missing_ok=True)
    return state_dict, full_record


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model``'s state dict: the weights a run saves."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def test_tensors(preprocessing, test_set: ImageSet | None, device: str):
    """(inputs, labels) of the set a run evaluates after every epoch, on ``device``; None without one."""
    if test_set is None:
        return None
    return preprocessing(test_set.images).to(device), torch.as_tensor(test_set.labels, dtype=torch.long).to(device)


def class_labels(images: ImageSet, num_classes: int) -> torch.Tensor:
    labels = torch.as_tensor(images.labels, dtype=torch.long)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"training labels of {images.name} must lie in [0, {num_classes}); "
                         f"got range [{int(labels.min())}, {int(labels.max())}]")
    return labels


def train_backbone(spec: BackboneSpec, recipe: Recipe, train_set: ImageSet, *, num_classes: int, seed: int,
                   weights_dir: Path, test_set: ImageSet | None = None, device: str = "cpu",
                   progress: bool = True, compute: bool = True) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Train (or load the cached result of training) ``spec`` on ``train_set``; return (state_dict, record),
    or None when it is not cached and ``compute`` is false.

    The record holds the recipe, seed and per-epoch history (train loss and accuracy; test loss
    and accuracy when ``test_set`` is given) and the snapshot files (``recipe.snapshot_every``).
    """
    final = weights_path(weights_dir, spec, recipe, train_set, num_classes, seed)
    saved = cached_weights(final)
    if saved is not None or not compute:
        return saved
    labels = class_labels(train_set, num_classes)
    torch.manual_seed(seed)
    model = spec.build(num_classes=num_classes)
    test = test_tensors(spec.preprocessing, test_set, device)
    return train_epochs(model, model.parameters(), recipe, spec.preprocessing(train_set.images), labels, seed=seed,
                        final=final, describe=f"train {spec.name} seed {seed}", test=test,
                        record={"train_set": train_set.fingerprint()}, fill=padding_fill(recipe, spec.preprocessing),
                        device=device, progress=progress)
