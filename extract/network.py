"""Network passes for methods that cannot run from the cached penultimate features, and the cache
entries that hold their outputs (METHODS.md sections 1.4 and 1.8).

- Activation shaping at a named layer: a forward hook replaces the layer's output by its shaped
  version and the rest of the network runs as usual; or, when the entry cached that layer's
  activations and the network after it depends on nothing else (``network_tail``), only that
  tail runs, from the cached activations.
- ODIN's input perturbation: forward, input gradient, perturbed forward.
- GradNorm by per-sample autograd, for any parameter (heads that are not one linear layer).
- The Mahalanobis ensemble's per-layer confidences with input pre-processing, and FGSM copies.
- ``derive``: a network method's outputs over one entry's images, computed in resumable chunks
  under the entry's lock and written atomically beside it (``CachedSplit.derived_path``), so
  re-scoring, sweeping and tabulating read them like any other entry.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from extract.backbones import Backbone
from extract.datasets import ImageSet
from extract.extraction import capture_outputs, compute_in_chunks, forward_rows, partial_folder, precision, \
    resolve_device
from extract.cachefiles import file_lock
from extract.store import CachedSplit, CacheCorrupt, FeatureStore, write_h5_atomic
from methods.base import NonFiniteOutputs
from methods.network_scores import LAST_BLOCK

log = logging.getLogger(__name__)

PENULTIMATE = "penultimate"  # the head's input: the pooled feature v (shaping there = the cache-only methods)


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


@contextlib.contextmanager
def shaping_hook(model: nn.Module, head: str, layer: str, shape: Callable[[torch.Tensor], torch.Tensor]):
    """During the block, ``layer``'s output is replaced by ``shape(output)`` (a new tensor; the
    module's own output is never modified in place). ``PENULTIMATE`` shapes the head's input."""
    modules = dict(model.named_modules())
    if layer == PENULTIMATE:
        handle = modules[head].register_forward_pre_hook(lambda module, inputs: (shape(inputs[0]), *inputs[1:]))
    else:
        handle = modules[layer].register_forward_hook(lambda module, inputs, output: shape(output))
    try:
        yield
    finally:
        handle.remove()


class _LayerAsLeaf(fx.Tracer):
    """Traces a model keeping one named module as a single call (even a Sequential)."""

    def __init__(self, layer: str):
        super().__init__()
        self.layer = layer

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name == self.layer or super().is_leaf_module(module, qualified_name)


def network_tail(model: nn.Module, layer: str) -> fx.GraphModule | None:
    """The part of ``model`` after ``layer`` as a module taking that layer's output, or None when it
    cannot be cut there: the model does not trace (data-dependent control flow), the layer is
    called more than once, or something after it also reads an earlier tensor (a skip connection
    across the cut). The tail shares the model's modules, so hooks on them fire in it."""
    try:
        graph = _LayerAsLeaf(layer).trace(model)
    except Exception as err:  # torch.fx raises many types for untraceable code
        log.info("no network tail after %s: the model does not trace (%s)", layer, err)
        return None
    calls = [node for node in graph.nodes if node.op == "call_module" and node.target == layer]
    if len(calls) != 1:
        return None
    tail = fx.Graph()
    mapped = {calls[0]: tail.placeholder("activation")}
    before_cut = set()  # nodes computed from the input without passing through the layer
    for node in graph.nodes:
        if node is calls[0]:
            continue
        if node.op == "placeholder" or any(arg in before_cut for arg in node.all_input_nodes):
            before_cut.add(node)
            continue
        if node.op == "output":
            break
        mapped[node] = tail.node_copy(node, lambda arg: mapped[arg])
    output = next(node for node in graph.nodes if node.op == "output")
    if any(arg in before_cut or arg not in mapped for arg in output.all_input_nodes):
        return None
    tail.node_copy(output, lambda arg: mapped[arg])
    module = fx.GraphModule(model, tail)
    module.graph.eliminate_dead_code()
    module.recompile()
    return module


@contextlib.contextmanager
def input_gradient_only(model: nn.Module):
    """Gradients enabled for the block, with the weights frozen: an input gradient then needs no
    weight-gradient work or memory. The weights' ``requires_grad`` is restored afterwards."""
    frozen = [parameter for parameter in model.parameters() if parameter.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)


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


class _Reached(Exception):
    """Raised by a hook to end a forward pass once the layer it needs has run."""


def spatial_mean(tensor: torch.Tensor) -> torch.Tensor:
    """A layer's output as one vector per sample: the mean over spatial positions (N, C, ...) -> (N, C)."""
    return tensor.flatten(2).mean(dim=2) if tensor.ndim > 2 else tensor.flatten(1)


def layer_means(model: nn.Module, x: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The spatially averaged outputs of ``layers`` for input x; the forward stops at the deepest one."""
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


class Network:
    """A backbone on a device, ready for network methods: shaped forward passes, tails run from
    cached activations, ODIN. Every pass works in batches of ``batch_size`` in eval mode.

    The network runs in its own precision; the logits are then recomputed from the head's input v
    in float64, f = W v + b, as the cache-only methods compute them, and kept in float64 (ASH-S
    scales logits to ~1e3-1e4, where float32 rounding alone is ~1e-4; ODIN at T = 1000 ranks by
    tiny logit differences). Features are float32, as in extraction.
    """

    def __init__(self, backbone: Backbone, device: torch.device, batch_size: int):
        self.backbone = backbone
        self.device = device
        self.batch_size = batch_size
        self.model = backbone.model.to(device).eval()
        self.head = [torch.from_numpy(a).to(device, torch.float64) for a in backbone.head_parameters()]
        self._tails: dict[str, fx.GraphModule | None] = {}

    def resolve_layer(self, layer: str) -> str:
        """A module name of the backbone, ``PENULTIMATE``, or ``LAST_BLOCK`` (the backbone's declared
        shaping layer); anything else is an error listing the names."""
        if layer == LAST_BLOCK:
            if not self.backbone.shaping_layer:
                raise ValueError(f"backbone {self.backbone.name!r} declares no shaping layer for "
                                 f"layer={LAST_BLOCK!r}; give a module name (or 'shaping_layer' in its config)")
            layer = self.backbone.shaping_layer
        modules = [name for name, _ in self.model.named_modules() if name]
        if layer != PENULTIMATE and layer not in modules:
            raise ValueError(f"backbone {self.backbone.name!r} has no layer {layer!r}; use {PENULTIMATE!r}, "
                             f"{LAST_BLOCK!r} or one of its modules: {', '.join(modules)}")
        return layer

    def tail(self, layer: str) -> nn.Module | None:
        """The network after ``layer`` (the head alone after ``PENULTIMATE``), or None (see ``network_tail``)."""
        if layer not in self._tails:
            head = dict(self.model.named_modules())[self.backbone.head]
            self._tails[layer] = head if layer == PENULTIMATE else network_tail(self.model, layer)
        return self._tails[layer]

    def _batches(self, n: int):
        return (slice(start, start + self.batch_size) for start in range(0, n, self.batch_size))

    def _collect(self, features: torch.Tensor, outputs: dict[str, list[np.ndarray]], shape=None) -> None:
        """Append the head's input v (shaped in float64 first when ``shape`` is given: shaping at
        ``PENULTIMATE``) and f = W v + b in float64."""
        features = features.detach().double()
        if shape is not None:
            features = shape(features)
        outputs.setdefault("features", []).append(features.float().cpu().numpy())
        outputs.setdefault("logits", []).append(F.linear(features, *self.head).cpu().numpy())

    @torch.no_grad()
    def shaped_outputs(self, images: np.ndarray, layer: str, shape) -> dict[str, np.ndarray]:
        """Logits and penultimate features of a full forward pass with ``layer``'s output shaped
        (at ``PENULTIMATE``, the captured head input is shaped in float64 before the head)."""
        outputs: dict[str, list[np.ndarray]] = {}
        hook = contextlib.nullcontext() if layer == PENULTIMATE else \
            shaping_hook(self.model, self.backbone.head, layer, shape)
        with capture_outputs(self.model, self.backbone.head, ()) as captured, hook:
            for rows in self._batches(len(images)):
                self.model(self.backbone.preprocessing(images[rows]).to(self.device))
                self._collect(captured["features"], outputs, shape if layer == PENULTIMATE else None)
        return {name: np.concatenate(parts) for name, parts in outputs.items()}

    @torch.no_grad()
    def tail_outputs(self, activations: np.ndarray, layer: str, shape) -> dict[str, np.ndarray]:
        """Logits and penultimate features of the network after ``layer``, run on its shaped cached
        activations (the layers before it do not run; after ``PENULTIMATE`` only the head)."""
        tail = self.tail(layer)
        outputs: dict[str, list[np.ndarray]] = {}
        with capture_outputs(self.model, self.backbone.head, ()) as captured:
            for rows in self._batches(len(activations)):
                batch = torch.from_numpy(np.ascontiguousarray(activations[rows], np.float32)).to(self.device)
                if layer == PENULTIMATE:
                    self._collect(batch, outputs, shape)
                else:
                    tail(shape(batch))
                    self._collect(captured["features"], outputs)
        return {name: np.concatenate(parts) for name, parts in outputs.items()}

    def odin_outputs(self, images: np.ndarray, temperature: float, epsilon: float,
                     space: str) -> dict[str, np.ndarray]:
        """Logits and features at ODIN's perturbed inputs, and the class predicted from the
        unperturbed logits. ``space``: 'pixel' (epsilon in [0,1] pixel units: the sign map divided
        by each channel's normalisation std) or 'normalized' (the ReAct/DICE/GradNorm code)."""
        _, std = self._channel_stats()
        step = 1.0 / std if space == "pixel" else torch.ones_like(std)
        outputs: dict[str, list[np.ndarray]] = {}
        with capture_outputs(self.model, self.backbone.head, ()) as captured:
            for rows in self._batches(len(images)):
                x = self.backbone.preprocessing(images[rows]).to(self.device)
                perturbed, predictions = odin_perturbed_inputs(self.model, x, temperature, epsilon, step)
                with torch.no_grad():
                    self.model(perturbed)
                self._collect(captured["features"], outputs)
                outputs.setdefault("predictions", []).append(predictions.cpu().numpy().astype(np.int64))
        return {name: np.concatenate(parts) for name, parts in outputs.items()}

    def gradnorm_outputs(self, images: np.ndarray, temperature: float, parameter: str) -> dict[str, np.ndarray]:
        """Logits and features of the plain pass and GradNorm by per-sample autograd with respect to
        ``parameter`` (a parameter name; 'head' is the head's weight)."""
        names = dict(self.model.named_parameters())
        parameter = f"{self.backbone.head}.weight" if parameter == "head" else parameter
        if parameter not in names:
            raise ValueError(f"backbone {self.backbone.name!r} has no parameter {parameter!r}; use 'head' or one of: "
                             f"{', '.join(names)}")
        outputs: dict[str, list[np.ndarray]] = {}
        with capture_outputs(self.model, self.backbone.head, ()) as captured:
            for rows in self._batches(len(images)):
                x = self.backbone.preprocessing(images[rows]).to(self.device)
                with torch.no_grad():
                    self.model(x)
                self._collect(captured["features"], outputs)
                scores = per_sample_gradnorm(self.model, x, temperature, parameter)
                outputs.setdefault("gradnorm", []).append(scores.double().cpu().numpy())
        return {name: np.concatenate(parts) for name, parts in outputs.items()}

    def _channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        view = (1, -1, 1, 1)
        mean = torch.tensor(self.backbone.preprocessing.mean, dtype=torch.float32).view(view).to(self.device)
        std = torch.tensor(self.backbone.preprocessing.std, dtype=torch.float32).view(view).to(self.device)
        return mean, std

    def layer_outputs(self, images: np.ndarray, layer: str) -> np.ndarray:
        """The plain outputs of ``layer`` (float32, as extraction caches them)."""
        return forward_rows(self.backbone, images, (layer,), self.batch_size, self.device)[layer]

    @torch.no_grad()
    def layer_features(self, images: np.ndarray, layers: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Spatially averaged outputs of ``layers`` (float64, (N, C_l) each)."""
        parts: dict[str, list[np.ndarray]] = {}
        for rows in self._batches(len(images)):
            found = layer_means(self.model, self.backbone.preprocessing(images[rows]).to(self.device), layers)
            for layer in layers:
                parts.setdefault(layer, []).append(found[layer].double().cpu().numpy())
        return {layer: np.concatenate(chunks) for layer, chunks in parts.items()}

    def mahalanobis_confidences(self, images: np.ndarray, layers: tuple[str, ...], stats: dict,
                                epsilons: tuple[float, ...], fgsm: tuple[np.ndarray, float] | None = None) -> np.ndarray:
        """M_l(x) (``mahalanobis_perturbed_confidences``, pixel-space epsilon) for every layer and epsilon:
        (N, L, E). ``stats[layer]`` = (class means (C, d), precision (d, d)). With ``fgsm`` = (labels,
        size), the images are first replaced by their FGSM copies."""
        mean, std = self._channel_stats()
        tensors = {layer: [torch.from_numpy(np.asarray(a, np.float64)).to(self.device) for a in stats[layer]]
                   for layer in layers}
        out = np.empty((len(images), len(layers), len(epsilons)))
        for rows in self._batches(len(images)):
            x = self.backbone.preprocessing(images[rows]).to(self.device)
            if fgsm is not None:
                labels = torch.from_numpy(np.asarray(fgsm[0][rows], np.int64)).to(self.device)
                x = fgsm_inputs(self.model, x, labels, fgsm[1], mean, std)
            for i, layer in enumerate(layers):
                out[rows, i, :] = mahalanobis_perturbed_confidences(
                    self.model, x, layer, *tensors[layer], epsilons, 1.0 / std).cpu().numpy()
        return out


class EntryRows:
    """Rows [start, stop) of one entry, as a network method sees them: the images, and what the
    entry cached for them (an inner layer's activations, the plain logits and features)."""

    def __init__(self, images: ImageSet, entry: CachedSplit, start: int, stop: int):
        self.entry, self.rows = entry, slice(start, stop)
        self.images = images.images[self.rows]

    def activations(self, layer: str) -> np.ndarray | None:
        """The cached activations of ``layer`` for these rows, or None when the entry has none."""
        return self.entry.activations(layer)[self.rows] if layer in self.entry.meta["layers"] else None

    def cached(self, name: str) -> np.ndarray:
        return getattr(self.entry, name)[self.rows]


def _check_images(images: ImageSet, entry: CachedSplit) -> None:
    if len(images) != len(entry) or images.fingerprint() != entry.meta.get("fingerprint", images.fingerprint()):
        raise ValueError(f"{images.name}/{images.split} is not the data of cache entry {entry.path.name}; "
                         "re-extract the entry first")


def _derived_entry(store: FeatureStore, entry: CachedSplit, name: str, key: dict, backbone: Backbone, what: str,
                   compute) -> CachedSplit:
    """The derived entry ``name`` of ``entry`` under ``key``: from the cache when present and sound
    (a corrupt one is moved aside and recomputed), else ``compute(path)`` -> (arrays, extra meta)
    under the entry's lock (a second process waits, then reads it), written atomically."""
    path = entry.derived_path(name, key)
    try:
        cached = store.open_entry(path)
        if cached is not None:
            return cached
    except CacheCorrupt as err:
        log.warning("recomputing a corrupt derived entry: %s", err)
    with file_lock(path):
        cached = store.open_entry(path)
        if cached is not None:
            return cached
        arrays, extra = compute(path)
        meta = {"kind": "derived", "method": name, "network_key": key, "base": entry.data_key,
                "backbone": backbone.describe(), "dataset": entry.meta["dataset"], "split": entry.meta["split"],
                "fingerprint": entry.meta.get("fingerprint"), "data_key": entry.derived_key(name, key), "layers": [],
                "n": len(entry), "what": f"{what} on {entry.meta['dataset']}/{entry.meta['split']}", **extra}
        write_h5_atomic(path, arrays, meta)
        shutil.rmtree(partial_folder(path), ignore_errors=True)
    return CachedSplit(path)


def _rows_in_chunks(path, description: str, batch_size: int, chunk_batches: int, progress: bool):
    """``passes(step, n, names, compute)``: rows [0, n) of one row-wise network pass, computed by
    ``compute(start, stop)`` in resumable chunks under the derived entry's partial folder (``step``
    keeps the chunks of different passes apart), concatenated per name."""
    def passes(step: str, n: int, names: tuple[str, ...], compute) -> dict[str, np.ndarray]:
        chunks = compute_in_chunks(path, n, names, batch_size * chunk_batches, f"{step}-bs{batch_size}" if step else f"bs{batch_size}",
                                   compute,
                                   f"{description}: {step}" if step else description, progress)
        return {name: np.concatenate([chunk[name] for chunk in chunks]) for name in names}
    return passes


def derive_state(method, backbone: Backbone, images: ImageSet, entry: CachedSplit, store: FeatureStore, *,
                 batch_size: int = 256, chunk_batches: int = 16, device: str = "cpu",
                 progress: bool = True) -> CachedSplit:
    """What ``method`` learns through the network on the fit entry (``method.network_fit``), cached
    beside that entry as ``<method>-fit``; its row-wise passes are chunked and resumable."""
    _check_images(images, entry)

    def compute(path):
        network = Network(backbone, resolve_device(device), batch_size)
        passes = _rows_in_chunks(path, f"{method.label()} fit {backbone.name} {images.name}/{images.split}",
                                 batch_size, chunk_batches, progress)
        with precision(network.device, amp=False):
            state = method.network_fit(network, EntryRows(images, entry, 0, len(images)), passes)
        return state, method.network_meta()

    return _derived_entry(store, entry, f"{method.name}-fit", method.network_key(backbone.declared()), backbone,
                          f"{method.label()} fitted", compute)


def derive(method, backbone: Backbone, images: ImageSet, entry: CachedSplit, store: FeatureStore, *,
           key: dict | None = None, batch_size: int = 256, chunk_batches: int = 16, device: str = "cpu",
           progress: bool = True) -> CachedSplit:
    """The outputs of network method ``method`` over ``entry``'s images, cached beside the entry
    under ``key`` (default ``method.network_key()``; methods fitted through the network add their
    fit entry), computed by ``method.network_outputs(network, rows)`` in resumable chunks."""
    _check_images(images, entry)
    key = method.network_key(backbone.declared()) if key is None else key

    def compute(path):
        network = Network(backbone, resolve_device(device), batch_size)
        passes = _rows_in_chunks(path, f"{method.label()} {backbone.name} {images.name}/{images.split}",
                                 batch_size, chunk_batches, progress)
        with precision(network.device, amp=False):
            arrays = passes("", len(images), tuple(method.outputs),
                            lambda start, stop: method.network_outputs(network, EntryRows(images, entry, start, stop)))
        bad = ~(np.isfinite(arrays["logits"]).all(axis=1) & np.isfinite(arrays["features"]).all(axis=1))
        if bad.any():  # nothing is written: no derived entry ever holds them
            raise NonFiniteOutputs(
                f"{method.label()} produced NaN or infinite outputs on {bad.sum()} of {len(bad)} {images.name}/"
                f"{images.split} samples (first row {np.flatnonzero(bad)[0]}) through {backbone.name}; its "
                f"operation overflows on this backbone's activations (ASH and ReAct assume non-negative, ReLU-like "
                f"ones) - choose another layer or parameters")
        arrays["labels"] = np.asarray(images.labels, dtype=np.int64)
        return arrays, {"num_classes": int(arrays["logits"].shape[1]), "feature_dim": int(arrays["features"].shape[1]),
                        **method.network_meta()}

    return _derived_entry(store, entry, method.name, key, backbone, method.label(), compute)
