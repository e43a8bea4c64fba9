"""Training objectives: Unleashing Mask (UM), UMAP's popup masks, outlier exposure, energy-bounded
fine-tuning, DOE's extrapolation direction and POEM's posterior sampling (METHODS.md section 2).
The loss functions are small and pure; the loop that uses them is ``methods.finetuning``.
Imports torch (the scoring methods of this package do not).

Mask convention (METHODS.md 6.1): a keep fraction ``keep`` zeroes the j = int((1 - keep) * numel)
entries of a layer with the smallest |score| (the float product truncated, as edge-popup's GetSubnet)
and keeps the rest; UM's delta = 0.975 keeps 97.5%.
"""
from __future__ import annotations

import copy
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
    """1 for the entries kept, 0 for the j = int((1 - keep) * numel) entries with the smallest
    |score| (the edge-popup rule, per layer: allenai/hidden-networks' GetSubnet truncates the float
    product, so j is one less than the exact floor when the product lands just under an integer)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"the kept fraction must lie in (0, 1], got {keep}")
    flat = scores.detach().abs().flatten()
    dropped = int((1.0 - keep) * flat.numel())  # as GetSubnet: (1 - 0.8) * 640 = 127.99999999999997 drops 127
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


DOE_GAMMAS = (1e-1, 1e-2, 1e-3, 1e-4)  # DOE's perturbation strengths, one drawn uniformly per step


def extrapolation_direction(network: nn.Module, names: list[str], batch: torch.Tensor,
                            num_id: int) -> list[torch.Tensor]:
    """DOE's informative extrapolation (Zhu et al. 2023, "Diversified Outlier Exposure for OOD
    detection via informative extrapolation"; METHODS.md 2.5b step 2): the step that one SGD update
    (lr 1) of a dropout-free copy of ``network`` takes on g^2, where g = d l_sur / d scale at
    scale = 1 and l_sur = -uniform_cross_entropy(scale * f(x_out)) over the outlier rows (from
    ``num_id`` on) of ``batch``. That step is diff = -d(g^2)/dw for every parameter named in
    ``names`` (zero for one g^2 does not depend on). The copy runs in ``network``'s mode (train:
    batch statistics, as the official proxy) and is discarded, so ``network`` is left untouched.
    Dropout: ``nn.Dropout`` modules' ``p`` and the registry's ``drop_rate`` attributes are set to 0."""
    proxy = copy.deepcopy(network)
    for module in proxy.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        if hasattr(module, "drop_rate"):
            module.drop_rate = 0.0
    parameters = dict(proxy.named_parameters())
    scale = torch.ones((), device=batch.device, requires_grad=True)
    surrogate = -uniform_cross_entropy(scale * proxy(batch)[num_id:])
    (slope,) = torch.autograd.grad(surrogate, scale, create_graph=True)
    grads = torch.autograd.grad(slope ** 2, [parameters[name] for name in names], allow_unused=True)
    return [torch.zeros_like(parameters[name]) if grad is None else -grad.detach() for name, grad in zip(names, grads)]


POEM_SIGMA, POEM_SIGMA_N = 20.0, 0.5  # POEM's prior scale and noise variance


def bayesian_posterior(features: torch.Tensor, targets: torch.Tensor, sigma: float = POEM_SIGMA,
                       sigma_n: float = POEM_SIGMA_N) -> tuple[torch.Tensor, torch.Tensor]:
    """POEM's Bayesian linear regression y = beta^T z + n (Ming et al. 2022, "POEM: Out-of-distribution
    detection with posterior sampling"; METHODS.md 2.5 step 6), prior beta ~ N(0, sigma I), noise
    variance sigma_n: A = Z^T Z / sigma_n + I / sigma, mu = A^-1 Z^T y / sigma_n and, as the code
    scales it, Sigma = sigma * A^-1. In float64."""
    z, y = features.double(), targets.double()
    precision = z.T @ z / sigma_n + torch.eye(z.shape[1], dtype=torch.float64, device=z.device) / sigma
    inverse = torch.linalg.inv(precision)
    return inverse @ z.T @ y / sigma_n, sigma * inverse


def thompson_sample(mu: torch.Tensor, covariance: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """POEM's Thompson sample beta ~ N(mu, Sigma) = mu + V sqrt(|Lambda|) e, e ~ N(0, I), from the
    eigendecomposition of the symmetrised Sigma; |Lambda| is POEM's repair of negative eigenvalues."""
    values, vectors = torch.linalg.eigh((covariance + covariance.T) / 2)
    noise = torch.randn(len(mu), generator=generator, dtype=torch.float64).to(mu.device)
    return mu + vectors @ (values.abs().sqrt() * noise)


def boundary_outliers(features: torch.Tensor, beta: torch.Tensor, keep: int) -> torch.Tensor:
    """POEM's selection: the rows of the ``keep`` outliers with the smallest |beta^T z|, those nearest
    the sampled boundary, nearest first (ties by row)."""
    return torch.argsort((features.double() @ beta).abs(), stable=True)[:keep]


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
