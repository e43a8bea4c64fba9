"""What the network methods compute through the network (METHODS.md sections 1.4, 1.5a, 1.8, 1.9):
the shapings of ASH and ReAct as tensor functions, ODIN's input perturbation, GradNorm by
per-sample autograd, and the Mahalanobis ensemble's per-layer confidences with input
pre-processing and its FGSM copies.

Each runs the backbone through an ``extract.network.Network``, which knows how to run it (hooks,
the network after a layer, input gradients with frozen weights) and nothing about these scores.
This module imports torch; ``methods.network_scores`` imports it only when a network pass runs,
so scoring a cached derived entry never needs torch.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from extract.extraction import capture_outputs
from extract.network import Network, input_gradient_only


def numpy_rows(function: Callable[[np.ndarray], np.ndarray]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A tensor shaping from a numpy function of (N, n) float64 rows: each sample's activation is
    flattened (channels and space jointly, as ASH's per-sample top-k is), shaped in float64, and
    put back in the tensor's shape, dtype and device. The same numpy function is the cache-only
    method's math, so both paths compute one definition."""
    def shape(tensor: torch.Tensor) -> torch.Tensor:
        rows = tensor.detach().to("cpu", torch.float64).reshape(len(tensor), -1).numpy()
        shaped = torch.from_numpy(np.ascontiguousarray(function(rows)))
        return shaped.reshape(tensor.shape).to(tensor.device, tensor.dtype)
    return shape


def gradient_sign(gradient: torch.Tensor) -> torch.Tensor:
    """sign(g) with 0 mapped to +1, as the ODIN, Mahalanobis and FGSM code computes it: (g >= 0)*2 - 1."""
    return (gradient >= 0).to(gradient.dtype) * 2 - 1


def odin_perturbed_inputs(model: nn.Module, x: torch.Tensor, temperature: float, epsilon: float,
                          step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ODIN's input pre-processing (Liang et al. 2018): y_hat = argmax f(x) from the unscaled logits,
    L = CE(f(x) / T, y_hat), g = ``gradient_sign``(grad_x L), x_tilde = x - epsilon * step * g, no
    clamping. ``step`` is 1/std per channel for a pixel-space epsilon on normalised inputs, 1 for
    the normalised-space convention. The loss is summed over the batch, so each sample's gradient
    is its own. Returns (x_tilde, y_hat)."""
    x = x.detach().requires_grad_(True)
    with input_gradient_only(model):
        logits = model(x)
        predictions = logits.argmax(dim=1)
        loss = F.cross_entropy(logits / temperature, predictions, reduction="sum")
        (gradient,) = torch.autograd.grad(loss, x)
    return (x - epsilon * step * gradient_sign(gradient)).detach(), predictions


def odin_outputs(network: Network, images: np.ndarray, temperature: float, epsilon: float,
                 space: str) -> dict[str, np.ndarray]:
    """Logits and features at ODIN's perturbed inputs, and the class predicted from the
    unperturbed logits. ``space``: 'pixel' (epsilon in [0,1] pixel units: the sign map divided
    by each channel's normalisation std) or 'normalized' (the ReAct/DICE/GradNorm code)."""
    _, std = network.channel_stats()
    step = 1.0 / std if space == "pixel" else torch.ones_like(std)
    outputs: dict[str, list[np.ndarray]] = {}
    with capture_outputs(network.model, network.backbone.head, ()) as captured:
        for rows in network.batches(len(images)):
            x = network.backbone.preprocessing(images[rows]).to(network.device)
            perturbed, predictions = odin_perturbed_inputs(network.model, x, temperature, epsilon, step)
            with torch.no_grad():
                network.model(perturbed)
            network.collect(captured["features"], outputs)
            outputs.setdefault("predictions", []).append(predictions.cpu().numpy().astype(np.int64))
    return {name: np.concatenate(parts) for name, parts in outputs.items()}


def gradnorm_loss(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """GradNorm's official loss for one sample (Huang et al. 2021): L = sum_c -log softmax(f/T)_c
    (a target of all ones; ``methods.gradient_scores.gradnorm`` is its closed form)."""
    return -F.log_softmax(logits / temperature, dim=-1).sum()


def per_sample_gradnorm(model: nn.Module, x: torch.Tensor, temperature: float, parameter: str) -> torch.Tensor:
    """S = sum |dL/dP| for each sample alone (L = ``gradnorm_loss``, P = the named parameter), by
    per-sample autograd (torch.func: grad of a one-sample call, vmapped over the batch): the
    official code's batch size 1, without its loop, for any head."""
    from torch.func import functional_call, grad, vmap

    weight = dict(model.named_parameters())[parameter].detach()

    def loss(value, sample):
        return gradnorm_loss(functional_call(model, {parameter: value}, (sample.unsqueeze(0),))[0], temperature)

    gradients = vmap(grad(loss), in_dims=(None, 0))(weight, x)
    return gradients.abs().flatten(1).sum(dim=1).detach()


def gradnorm_outputs(network: Network, images: np.ndarray, temperature: float, parameter: str) -> dict[str, np.ndarray]:
    """Logits and features of the plain pass and GradNorm by per-sample autograd with respect to
    ``parameter`` (a parameter name; 'head' is the head's weight). The head's own parameters get
    their gradient through the head alone, from its input in the plain pass: dL/dW depends on
    nothing before the head, so the backward through the whole network (the official code's)
    gives the same gradient at the cost of a second full pass per sample."""
    backbone = network.backbone
    names = dict(network.model.named_parameters())
    parameter = f"{backbone.head}.weight" if parameter == "head" else parameter
    if parameter not in names:
        raise ValueError(f"backbone {backbone.name!r} has no parameter {parameter!r}; use 'head' or one of: "
                         f"{', '.join(names)}")
    head = dict(network.model.named_modules())[backbone.head]
    in_head = parameter.startswith(f"{backbone.head}.") and parameter.count(".") == backbone.head.count(".") + 1
    head_inputs: list[torch.Tensor] = []
    keep_input = head.register_forward_hook(lambda module, inputs, output: head_inputs.append(inputs[0]))
    outputs: dict[str, list[np.ndarray]] = {}
    try:
        with capture_outputs(network.model, backbone.head, ()) as captured:
            for rows in network.batches(len(images)):
                x = backbone.preprocessing(images[rows]).to(network.device)
                head_inputs.clear()
                with torch.no_grad():
                    network.model(x)
                network.collect(captured["features"], outputs)
                scores = per_sample_gradnorm(head, head_inputs[0], temperature, parameter.rsplit(".", 1)[1]) \
                    if in_head else per_sample_gradnorm(network.model, x, temperature, parameter)
                outputs.setdefault("gradnorm", []).append(scores.double().cpu().numpy())
    finally:
        keep_input.remove()
    return {name: np.concatenate(parts) for name, parts in outputs.items()}


class _Reached(Exception):
    """Raised by a hook to end a forward pass once the layer it needs has run."""


def spatial_mean(tensor: torch.Tensor) -> torch.Tensor:
    """A layer's output as one vector per sample: the mean over spatial positions (N, C, ...) -> (N, C)."""
    return tensor.flatten(2).mean(dim=2) if tensor.ndim > 2 else tensor.flatten(1)


def layer_means(model: nn.Module, x: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The spatially averaged outputs of ``layers`` for input x (the Mahalanobis ensemble's f_l(x));
    the forward stops at the deepest one."""
    modules = dict(model.named_modules())
    found: dict[str, torch.Tensor] = {}

    def hook(name):
        def capture(module, inputs, output):
            found[name] = spatial_mean(output)
            if len(found) == len(layers):
                raise _Reached
        return capture

    handles = [modules[layer].register_forward_hook(hook(layer)) for layer in layers]
    try:
        model(x)
    except _Reached:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return found


@torch.no_grad()
def layer_features(network: Network, images: np.ndarray, layers: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Spatially averaged outputs of ``layers`` (float64, (N, C_l) each)."""
    parts: dict[str, list[np.ndarray]] = {}
    for rows in network.batches(len(images)):
        found = layer_means(network.model, network.backbone.preprocessing(images[rows]).to(network.device), layers)
        for layer in layers:
            parts.setdefault(layer, []).append(found[layer].double().cpu().numpy())
    return {layer: np.concatenate(chunks) for layer, chunks in parts.items()}


def gaussian_confidence(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Mahalanobis class scores (Lee et al. 2018): g_c(f) = -1/2 (f - mu_c)^T P (f - mu_c), (N, C), float64."""
    centred = features.double()[:, None, :] - means[None, :, :]
    return -0.5 * torch.einsum("ncd,de,nce->nc", centred, precision, centred)


def mahalanobis_perturbed_confidences(model: nn.Module, x: torch.Tensor, layer: str, means: torch.Tensor,
                                      precision: torch.Tensor, epsilons: tuple[float, ...],
                                      step: torch.Tensor) -> torch.Tensor:
    """M_l(x) of the Mahalanobis ensemble (Lee et al. 2018) for one layer and each epsilon, (N, E):
    c_hat = argmax_c g_c(f_l(x)), loss = 1/2 (f_l - mu_c_hat)^T P (f_l - mu_c_hat) summed over the
    batch (each sample's gradient is its own), x_tilde = x - epsilon * step * ``gradient_sign``(grad_x
    loss) (``step`` as in ODIN: 1/std for pixel units), M_l = max_c g_c(f_l(x_tilde)). The gradient
    does not depend on epsilon, so it is taken once; epsilon = 0 is the unperturbed confidence.
    Float64 Gaussian terms."""
    x = x.detach().requires_grad_(any(epsilons))
    with input_gradient_only(model):
        scores = gaussian_confidence(layer_means(model, x, (layer,))[layer], means, precision)
        if any(epsilons):
            loss = -scores.gather(1, scores.argmax(dim=1, keepdim=True)).sum()
            (gradient,) = torch.autograd.grad(loss, x)
    columns = []
    with torch.no_grad():
        for epsilon in epsilons:
            if epsilon == 0:
                columns.append(scores.detach().max(dim=1).values)
                continue
            perturbed = x.detach() - epsilon * step * gradient_sign(gradient)
            columns.append(gaussian_confidence(layer_means(model, perturbed, (layer,))[layer], means,
                                               precision).max(dim=1).values)
    return torch.stack(columns, dim=1)


def fgsm_inputs(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, size: float, mean: torch.Tensor,
                std: torch.Tensor) -> torch.Tensor:
    """FGSM copies (the Mahalanobis tuning protocol's pseudo-OOD): x_adv = clip(x + size * sign(grad_x
    CE(f(x), y)), 0, 1) in [0,1] pixel space, returned normalised like x."""
    x = x.detach().requires_grad_(True)
    with input_gradient_only(model):
        (gradient,) = torch.autograd.grad(F.cross_entropy(model(x), labels, reduction="sum"), x)
    pixels = x.detach() * std + mean
    adversarial = torch.clamp(pixels + size * gradient_sign(gradient), 0.0, 1.0)
    return (adversarial - mean) / std


def mahalanobis_confidences(network: Network, images: np.ndarray, layers: tuple[str, ...], stats: dict,
                            epsilons: tuple[float, ...], fgsm: tuple[np.ndarray, float] | None = None) -> np.ndarray:
    """M_l(x) (``mahalanobis_perturbed_confidences``, pixel-space epsilon) for every layer and epsilon:
    (N, L, E). ``stats[layer]`` = (class means (C, d), precision (d, d)). With ``fgsm`` = (labels,
    size), the images are first replaced by their FGSM copies."""
    mean, std = network.channel_stats()
    tensors = {layer: [torch.from_numpy(np.asarray(a, np.float64)).to(network.device) for a in stats[layer]]
               for layer in layers}
    out = np.empty((len(images), len(layers), len(epsilons)))
    for rows in network.batches(len(images)):
        x = network.backbone.preprocessing(images[rows]).to(network.device)
        if fgsm is not None:
            labels = torch.from_numpy(np.asarray(fgsm[0][rows], np.int64)).to(network.device)
            x = fgsm_inputs(network.model, x, labels, fgsm[1], mean, std)
        for i, layer in enumerate(layers):
            out[rows, i, :] = mahalanobis_perturbed_confidences(
                network.model, x, layer, *tensors[layer], epsilons, 1.0 / std).cpu().numpy()
    return out
