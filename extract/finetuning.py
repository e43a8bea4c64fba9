"""Fine-tune a backbone: Unleashing Mask (UM), UMAP, outlier exposure and energy-bounded training,
alone or combined (METHODS.md section 2; the losses are in ``methods.training_objectives``).

A fine-tuned model is a backbone like any other: its weights are cached under ``<cache>/weights/``
keyed by the base backbone's content key, the recipe, the training and outlier sets and the
seed, trained resumably by ``extract.training.train_epochs``, and extracted, scored and tabulated
through the normal cache.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from extract.backbones import Backbone
from extract.datasets import ImageSet
from extract.store import content_key
from extract.training import Recipe, augment, class_labels, gradient_step, load_weights, train_epochs
from methods.training_objectives import (energy_bounded_loss, estimate_zeta, id_loss, keep_mask, masked_layers,
                                         masked_weights, oe_loss, popup_mask, popup_scores)

log = logging.getLogger(__name__)

OBJECTIVES = ("ce", "oe", "energy")  # the loss; "+UM"/"+UMAP" replace its ID term (METHODS.md 2.6)
FORGETTING = ("none", "um", "umap")
BN_STATISTICS = ("frozen", "update")
ZETA_BATCH = 512  # the UM code's estimate_loss batch size


@dataclass(frozen=True)
class FineTuneRecipe(Recipe):
    """A benchmark file's ``finetune:`` mapping (besides ``from``): the optimisation of ``Recipe``
    (defaults: SGD, lr 0.01, cosine, weight decay 1e-4, as the UM/OE fine-tuning configs) and

    - ``objective``: ce (plain cross-entropy), oe (lambda = ``oe_weight``), energy (``energy_weight``,
      ``m_in``, ``m_out``); oe and energy need ``outliers``, a set of auxiliary outliers (a dataset
      name, or {dataset, split, params} as a benchmark's OOD sets) disjoint from every test set, drawn
      ``outlier_batch_size`` per step and forwarded with the ID batch in one train-mode pass;
    - ``forget``: none, um (fine-tune every weight with the ID term |CE - zeta| + zeta) or umap
      (learn only popup scores keeping ``keep`` of every Conv/Linear layer; weights frozen; batch-norm
      statistics ``bn_stats`` = frozen (default) or update, the official code's train-mode behaviour);
    - ``zeta``: given, or estimated (when absent) as the mean training cross-entropy of the frozen
      model under a seeded random mask keeping ``delta`` of every layer (UM: 0.975 on CIFAR-10).
    """

    optimizer: str = "sgd"
    lr: float = 0.01
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    objective: str = "ce"
    forget: str = "none"
    delta: float = 0.975
    zeta: float | None = None
    keep: float = 0.8
    bn_stats: str = "frozen"
    outliers: str | dict = ""
    outlier_batch_size: int = 128
    oe_weight: float = 0.5
    energy_weight: float = 0.1
    m_in: float = -25.0
    m_out: float = -7.0

    def __post_init__(self):
        super().__post_init__()
        for name, value, valid in (("objective", self.objective, OBJECTIVES), ("forget", self.forget, FORGETTING),
                                   ("bn_stats", self.bn_stats, BN_STATISTICS)):
            if value not in valid:
                raise ValueError(f"fine-tuning recipe: {name} {value!r} is not one of {valid}")
        if (self.objective != "ce") != bool(self.outliers):
            raise ValueError(f"fine-tuning recipe: objective {self.objective!r} "
                             + ("needs 'outliers' (a dataset of auxiliary outliers)" if self.objective != "ce"
                                else "uses no outliers; remove 'outliers' or choose objective oe or energy"))
        if not 0 < self.delta <= 1 or not 0 < self.keep <= 1 or (self.zeta is not None and self.zeta < 0) \
                or self.outlier_batch_size < 1:
            raise ValueError("fine-tuning recipe: delta and keep must lie in (0, 1], zeta >= 0 and "
                             f"outlier_batch_size >= 1; got {self.delta}, {self.keep}, {self.zeta}, "
                             f"{self.outlier_batch_size}")

    def identity(self) -> dict:
        """What determines the fine-tuned weights (``Recipe.identity`` plus the objective's own fields)."""
        fields = super().identity()
        if self.forget == "none":
            for name in ("delta", "zeta", "keep", "bn_stats"):
                del fields[name]
        elif self.forget == "um":
            del fields["keep"], fields["bn_stats"]
        if self.zeta is not None:
            del fields["delta"]
        if self.objective != "oe":
            del fields["oe_weight"]
        if self.objective != "energy":
            del fields["energy_weight"], fields["m_in"], fields["m_out"]
        if self.objective == "ce":
            del fields["outlier_batch_size"]
        return fields

    @property
    def label(self) -> str:
        """How tables name it: e.g. 'OE + UM', 'UMAP'."""
        names = {"ce": "", "oe": "OE", "energy": "Energy-bounded"}
        return " + ".join(part for part in (names[self.objective], self.forget.upper() if self.forget != "none"
                                            else "") if part) or "fine-tuned (CE)"


class PopupNetwork(nn.Module):
    """UMAP (METHODS.md 2.2): a frozen network whose every Conv/Linear weight is used as W * m_p(s),
    m_p keeping the top ``keep`` fraction of |s| per layer; only the scores s train (straight-through
    estimator). With ``bn_stats='frozen'`` batch norm keeps its running statistics in training."""

    def __init__(self, model: nn.Module, keep: float, seed: int, bn_stats: str = "frozen"):
        super().__init__()
        self.model, self.keep, self.bn_stats = model, keep, bn_stats
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.layers = masked_layers(model)
        initial = popup_scores(model, seed)
        # ParameterDict keys cannot hold dots
        self.scores = nn.ParameterDict({name.replace(".", "/"): nn.Parameter(initial[name]) for name in self.layers})

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.bn_stats == "frozen":
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def masks(self, hard: bool = False) -> dict[str, torch.Tensor]:
        make = keep_mask if hard else popup_mask
        return {name: make(self.scores[name.replace(".", "/")], self.keep) for name in self.layers}

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.model, masked_weights(self.model, self.masks()), (inputs,))

    def effective_state(self) -> dict[str, torch.Tensor]:
        """The network's state with every masked weight replaced by W * m: a plain backbone's weights."""
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        with torch.no_grad():
            state.update({k: v.detach().cpu().clone()
                          for k, v in masked_weights(self.model, self.masks(hard=True)).items()})
        return state


def finetune_path(weights_dir: Path, name: str, base: Backbone, recipe: FineTuneRecipe, train_set: ImageSet,
                  outlier_set: ImageSet | None, num_classes: int, seed: int) -> Path:
    key = content_key("finetune", base.key, recipe.identity(), train_set.fingerprint(),
                      outlier_set.fingerprint() if outlier_set is not None else None, num_classes, seed)
    return Path(weights_dir) / f"{name}-seed{seed}-{key}.pt"


def _zeta_batches(inputs: torch.Tensor, labels: torch.Tensor, augmentation: str, seed: int, device: str):
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, len(inputs), ZETA_BATCH):
        rows = slice(start, start + ZETA_BATCH)
        yield augment(inputs[rows], augmentation, generator).to(device), labels[rows].to(device)


def finetune_backbone(name: str, base: Backbone, recipe: FineTuneRecipe, train_set: ImageSet, *, num_classes: int,
                      seed: int, weights_dir: Path, test_set: ImageSet | None = None,
                      outlier_set: ImageSet | None = None, device: str = "cpu",
                      progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Fine-tune ``base`` by ``recipe`` (or load the cached result); return (state_dict, record).

    The record adds to ``train_epochs``'s the base backbone's key and zeta (given or estimated,
    with the mask fraction). ``base`` itself is left untouched (its model is copied).
    """
    final = finetune_path(weights_dir, name, base, recipe, train_set, outlier_set, num_classes, seed)
    if final.exists():
        return load_weights(final)
    if (outlier_set is None) != (recipe.objective == "ce"):
        raise ValueError(f"fine-tuning {name}: objective {recipe.objective!r} and outlier set "
                         f"{outlier_set.name if outlier_set is not None else None} do not go together")
    preprocess = base.preprocessing
    inputs, labels = preprocess(train_set.images), class_labels(train_set, num_classes)
    model = copy.deepcopy(base.model).to(device)
    record = {"base": base.key, "base_name": base.name, "train_set": train_set.fingerprint(),
              "outlier_set": outlier_set.fingerprint() if outlier_set is not None else None, "label": recipe.label}
    zeta = None
    if recipe.forget != "none":
        zeta = recipe.zeta
        if zeta is None:
            zeta = estimate_zeta(model, recipe.delta, seed, _zeta_batches(inputs, labels, recipe.augmentation, seed,
                                                                          device))
            log.info("%s: zeta = %.4f (mean CE of the frozen model with %.1f%% of every layer kept, seed %d)",
                     name, zeta, 100 * recipe.delta, seed)
        record.update({"zeta": zeta, "zeta_estimated": recipe.zeta is None, "delta": recipe.delta})
    torch.manual_seed(seed)
    if recipe.forget == "umap":
        network = PopupNetwork(model, recipe.keep, seed, recipe.bn_stats)
        trainable, export = list(network.scores.parameters()), PopupNetwork.effective_state
    else:
        network, trainable, export = model, list(model.parameters()), None

    def loss(model, x, y, outliers):
        if outliers is None:
            logits = model(x)
            return id_loss(logits, y, zeta), logits
        logits = model(torch.cat([x, outliers]))  # one train-mode pass: batch norm sees both
        id_logits, outlier_logits = logits[:len(x)], logits[len(x):]
        if recipe.objective == "oe":
            return oe_loss(id_logits, y, outlier_logits, recipe.oe_weight, zeta), id_logits
        return energy_bounded_loss(id_logits, y, outlier_logits, recipe.energy_weight, recipe.m_in, recipe.m_out,
                                   zeta), id_logits

    test = (preprocess(test_set.images).to(device), torch.as_tensor(test_set.labels, dtype=torch.long).to(device)) \
        if test_set is not None else None
    state, full = train_epochs(network, trainable, recipe, inputs, labels, seed=seed, final=final,
                               describe=f"fine-tune {name} ({recipe.label}) seed {seed}", step=gradient_step(loss),
                               test=test, outliers=preprocess(outlier_set.images) if outlier_set is not None else None,
                               outlier_batch_size=recipe.outlier_batch_size, record=record, export=export,
                               device=device, progress=progress)
    return state, full
