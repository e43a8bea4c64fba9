"""Training objectives: Unleashing Mask (UM), UMAP's popup masks, outlier exposure, energy-bounded
fine-tuning (METHODS.md section 2). The loss functions are small and pure; the loop that uses
them is ``extract.finetuning``. Imports torch (the scoring methods of this package do not).

Mask convention (METHODS.md 6.1): a keep fraction ``keep`` zeroes the j = floor((1 - keep) * numel)
entries of a layer with the smallest |score| and keeps the rest; UM's delta = 0.975 keeps 97.5%.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def masked_layers(model: nn.Module) -> list[str]:
    """The names of every Conv2d and Linear layer (first conv and classifier included): the layers
    UM's random mask and UMAP's popup scores cover."""
    return [name for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]


def popup_scores(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """One score tensor per masked layer, shaped like its weight, kaiming-uniform(a=sqrt(5)) as the
    official code initialises them (U(-1/sqrt(fan_in), 1/sqrt(fan_in))), from a generator seeded with
    ``seed`` so the mask is reproducible."""
    generator = torch.Generator().manual_seed(int(seed))
    modules = dict(model.named_modules())
    scores = {}
    for name in masked_layers(model):
        weight = modules[name].weight
        bound = 1.0 / math.sqrt(weight[0].numel())  # kaiming_uniform_ with a = sqrt(5): gain * sqrt(3 / fan_in)
        scores[name] = (torch.rand(weight.shape, generator=generator, dtype=torch.float32) * 2 - 1) * bound
    return scores


def keep_mask(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """1 for the entries kept, 0 for the j = floor((1 - keep) * numel) entries with the smallest
    |score| (the edge-popup rule, per layer)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"the kept fraction must lie in (0, 1], got {keep}")
    flat = scores.detach().abs().flatten()
    dropped = int(math.floor((1.0 - keep) * flat.numel() + 1e-9))  # 1e-9: (1 - 0.975) * 400 is 9.999..., not 10
    mask = torch.ones_like(flat)
    mask[flat.argsort()[:dropped]] = 0.0
    return mask.view_as(scores)


class _StraightThrough(torch.autograd.Function):
    """Forward: ``keep_mask(|s|, keep)``; backward: the mask's gradient passed unchanged to |s|."""

    @staticmethod
    def forward(ctx, magnitudes, keep):
        return keep_mask(magnitudes, keep)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def popup_mask(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """UMAP's mask m_p(s) with the straight-through estimator: dL/ds = sign(s) * dL/dm (edge-popup)."""
    return _StraightThrough.apply(scores.abs(), keep)


def masked_weights(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{'<layer>.weight': W * m} for ``torch.func.functional_call``: the model itself is untouched."""
    modules = dict(model.named_modules())
    return {f"{name}.weight": modules[name].weight * mask for name, mask in masks.items()}


def um_loss(cross_entropy: torch.Tensor, zeta: float, beta: float = 1.0) -> torch.Tensor:
    """UM's forgetting loss (Zhu et al. 2023): L = |beta * CE - zeta| + zeta, CE the mini-batch mean.

    Its gradient is sign(beta * CE - zeta) * beta * grad CE: descent above zeta, ascent below it."""
    return (beta * cross_entropy - zeta).abs() + zeta


def id_loss(logits: torch.Tensor, labels: torch.Tensor, zeta: float | None = None) -> torch.Tensor:
    """The in-distribution term: batch-mean cross-entropy, or UM's |CE - zeta| + zeta when ``zeta`` is
    given (METHODS.md 2.6: '+UM' replaces the ID term of every outlier loss)."""
    cross_entropy = F.cross_entropy(logits, labels)
    return cross_entropy if zeta is None else um_loss(cross_entropy, zeta)


def uniform_cross_entropy(outlier_logits: torch.Tensor) -> torch.Tensor:
    """Outlier exposure's outlier term (Hendrycks et al. 2019): the cross-entropy from softmax(f) to
    the uniform distribution, mean over outliers of LSE(f) - mean_c f_c (= KL(u || p) + log C)."""
    return (torch.logsumexp(outlier_logits, dim=1) - outlier_logits.mean(dim=1)).mean()


def oe_loss(id_logits, labels, outlier_logits, weight: float = 0.5, zeta: float | None = None) -> torch.Tensor:
    """OE: L = CE(ID) + lambda * uniform_cross_entropy(outliers), lambda = 0.5 (METHODS.md 2.3)."""
    return id_loss(id_logits, labels, zeta) + weight * uniform_cross_entropy(outlier_logits)


def energy_bounded_loss(id_logits, labels, outlier_logits, weight: float = 0.1, m_in: float = -25.0,
                        m_out: float = -7.0, zeta: float | None = None) -> torch.Tensor:
    """Energy-bounded fine-tuning (Liu et al. 2020): L = CE + beta * (mean_in relu(E - m_in)^2 +
    mean_out relu(m_out - E)^2), E = -LSE(f), beta = 0.1, m_in = -25, m_out = -7 (METHODS.md 2.4)."""
    energy_in = -torch.logsumexp(id_logits, dim=1)
    energy_out = -torch.logsumexp(outlier_logits, dim=1)
    bound = F.relu(energy_in - m_in).pow(2).mean() + F.relu(m_out - energy_out).pow(2).mean()
    return id_loss(id_logits, labels, zeta) + weight * bound


@torch.no_grad()
def estimate_zeta(model: nn.Module, keep: float, seed: int, batches) -> float:
    """UM's loss constraint zeta: the mean cross-entropy (weighted by batch size) of the frozen model
    with a seeded layer-wise random mask keeping ``keep`` of every Conv/Linear layer's weights, in
    eval mode, over ``batches`` of (inputs, labels) - the training data (METHODS.md 2.1 step A)."""
    model.eval()
    weights = masked_weights(model, {name: keep_mask(s, keep) for name, s in popup_scores(model, seed).items()})
    total, count = 0.0, 0
    for inputs, labels in batches:
        logits = torch.func.functional_call(model, weights, (inputs,))
        total += F.cross_entropy(logits, labels, reduction="sum").item()
        count += len(labels)
    if count == 0:
        raise ValueError("estimating zeta needs training data; got no batches")
    return total / count
