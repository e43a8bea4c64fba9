"""The fine-tuning recipe (a benchmark file's ``finetune:`` mapping) and where the weights it
produces are cached. The loop that fine-tunes by it, with its objectives (UM, UMAP, outlier
exposure, energy-bounded training, DOE, POEM; METHODS.md section 2), is ``methods.finetuning``.

A fine-tuned model is a backbone like any other: its weights are cached under ``<cache>/weights/``
keyed by the base backbone's content key, the recipe, the training and outlier sets and the
seed, trained resumably by ``extract.training.train_epochs``, and extracted, scored and tabulated
through the normal cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from extract.backbones import Backbone
from extract.datasets import ImageSet
from extract.store import content_key
from extract.training import Recipe

OBJECTIVES = ("ce", "oe", "energy", "doe", "poem")  # the loss; "+UM"/"+UMAP" replace its ID term (METHODS.md 2.6)
FORGETTING = ("none", "um", "umap")
BN_STATISTICS = ("frozen", "update")


def mask_count_changed(keep: float) -> bool:
    """Whether a layer's mask keeping ``keep`` can drop a different number of weights under
    int((1 - keep) * numel), edge-popup's GetSubnet rule used since issue 17, than under the rule
    before, floor((1 - keep) * numel + 1e-9). They differ only where the float product lands just
    under an integer, which needs the float 1 - keep below the exact 1 - keep of its decimal: this
    condition (sufficient, so on the safe side) is the test. True for 0.8, 0.9, 0.3; false for 0.975,
    0.97, 0.965, 0.5, whose fine-tuned weights keep their keys."""
    return Fraction(1.0 - keep) < 1 - Fraction(repr(float(keep)))


@dataclass(frozen=True)
class FineTuneRecipe(Recipe):
    """A benchmark file's ``finetune:`` mapping (besides ``from``): the optimisation of ``Recipe``
    (defaults: SGD, lr 0.01, cosine, weight decay 1e-4, as the UM/OE fine-tuning configs; ``nesterov``,
    ``schedule_step`` and ``crop_padding`` as there, the UM code's choices set by the UM benchmark files) and

    - ``objective``: ce (plain cross-entropy), oe (lambda = ``oe_weight``), energy (``energy_weight``,
      ``m_in``, ``m_out``), doe (``methods.finetuning.DiversifiedOutlierExposure``; ``doe_warmup``
      epochs of OE with lambda = 1 first) or poem (the energy-bounded loss on outliers chosen per
      epoch by ``methods.finetuning.PosteriorSampling``: the ``poem_keep`` (default: 1/8 of the pool,
      POEM's 50,000 of 200 x 2,000) nearest a Thompson-sampled boundary of a regression on the outliers
      chosen in the last ``poem_buffer`` (4, POEM's BUF_SIZE) epochs, targets -/+``poem_conf``); every
      objective but ce needs ``outliers``, a set of auxiliary outliers (a dataset name, or {dataset,
      split, params} as a benchmark's OOD sets) disjoint from every test set, drawn
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
    doe_warmup: int = 5
    poem_conf: float = 3.0
    poem_keep: int | None = None
    poem_buffer: int = 4

    # ``Recipe.LIMITS`` for the fine-tuning fields (harness.config checks a `finetune:` mapping with them).
    LIMITS = {**Recipe.LIMITS, "objective": OBJECTIVES, "forget": FORGETTING, "bn_stats": BN_STATISTICS,
              "delta": "(0, 1]", "keep": "(0, 1]", "zeta": ">= 0", "outlier_batch_size": ">= 1", "oe_weight": ">= 0",
              "energy_weight": ">= 0", "doe_warmup": ">= 0", "poem_keep": ">= 1", "poem_buffer": ">= 1"}
    DESCRIPTION = "fine-tuning recipe"

    def __post_init__(self):
        super().__post_init__()  # the choices of LIMITS included
        if (self.objective != "ce") != bool(self.outliers):
            raise ValueError(f"fine-tuning recipe: objective {self.objective!r} "
                             + ("needs 'outliers' (a dataset of auxiliary outliers)" if self.objective != "ce"
                                else "uses no outliers; remove 'outliers' or choose an objective of "
                                f"{OBJECTIVES[1:]}"))
        if not 0 < self.delta <= 1 or not 0 < self.keep <= 1 or (self.zeta is not None and self.zeta < 0) \
                or self.outlier_batch_size < 1 or self.doe_warmup < 0 \
                or (self.poem_keep is not None and self.poem_keep < 1) or self.poem_buffer < 1:
            raise ValueError("fine-tuning recipe: delta and keep must lie in (0, 1], zeta >= 0, "
                             "outlier_batch_size >= 1, doe_warmup >= 0 and poem_keep, poem_buffer >= 1; got "
                             f"{self.delta}, {self.keep}, {self.zeta}, {self.outlier_batch_size}, {self.doe_warmup}, "
                             f"{self.poem_keep}, {self.poem_buffer}")

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
        if self.objective not in ("energy", "poem"):
            del fields["energy_weight"], fields["m_in"], fields["m_out"]
        if self.objective != "doe":
            del fields["doe_warmup"]
        if self.objective != "poem":
            del fields["poem_conf"], fields["poem_keep"], fields["poem_buffer"]
        masks = ([self.keep] if self.forget == "umap" else []) + \
            ([self.delta] if self.forget != "none" and self.zeta is None else [])
        if any(mask_count_changed(fraction) for fraction in masks):
            fields["mask_count"] = "int"  # weights of the old count are never reused for these fractions
        if self.objective == "ce":
            del fields["outlier_batch_size"]
        return fields

    def poem_kept(self, pool: int) -> int:
        """How many of a pool of ``pool`` auxiliary outliers POEM keeps per epoch: ``poem_keep``, or by
        default 1/8 of the pool (POEM's 50,000 of 200 batches x 2,000; at least 1)."""
        return self.poem_keep if self.poem_keep is not None else max(1, pool // 8)

    @property
    def label(self) -> str:
        """How tables name it: e.g. 'OE + UM', 'UMAP', 'POEM + UM'."""
        names = {"ce": "", "oe": "OE", "energy": "Energy-bounded", "doe": "DOE", "poem": "POEM"}
        return " + ".join(part for part in (names[self.objective], self.forget.upper() if self.forget != "none"
                                            else "") if part) or "fine-tuned (CE)"


def finetune_path(weights_dir: Path, name: str, base: Backbone, recipe: FineTuneRecipe, train_set: ImageSet,
                  outlier_set: ImageSet | None, num_classes: int, seed: int) -> Path:
    """The weights file of ``base`` fine-tuned by ``recipe`` on these sets with this seed."""
    key = content_key("finetune", base.key, recipe.identity(), train_set.fingerprint(),
                      outlier_set.fingerprint() if outlier_set is not None else None, num_classes, seed)
    return Path(weights_dir) / f"{name}-seed{seed}-{key}.pt"
