"""Running a backbone for the methods that need more than a cache entry's arrays, and the cache
entries that hold what they compute (the math of each method lives with it, in ``methods/``).

- ``Network``: a backbone on a device, run in batches: full forward passes with one layer's
  output replaced (``shaping_hook``), or only the network after a layer (``network_tail``), run
  from that layer's cached activations; the head's input and f = W v + b collected in float64.
- ``input_gradient_only``: gradients with respect to the input, with the weights frozen.
- ``derive``: a network method's outputs over one entry's images, computed in resumable chunks
  under the entry's lock and written atomically beside it (``CachedSplit.derived_path``), so
  re-scoring, sweeping and tabulating read them like any other entry; ``derive_state`` caches
  what a method learns through the network on the fit entry the same way.

``derive`` and ``derive_state`` take the method as an argument and only call what
``methods.network_scores.NetworkMethod`` documents (``network_outputs``, ``network_fit``,
``check_network_outputs``, ...): this module never imports ``methods``.
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
from extract.cachefiles import file_lock
from extract.datasets import ImageSet
from extract.extraction import (
    capture_outputs,
    compute_in_chunks,
    forward_rows,
    partial_folder,
    precision,
    resolve_device,
)
from extract.store import CacheCorrupt, CachedSplit, FeatureStore, write_h5_atomic

log = logging.getLogger(__name__)

PENULTIMATE = "penultimate"  # the head's input: the pooled feature v, which entries cache as ``features``


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


class Network:
    """A backbone on a device, ready for network methods: forward passes with a layer's output
    shaped, tails run from cached activations, and the pieces that methods' own passes are built
    from (``batches``, ``collect``, ``channel_stats``). Every pass works in batches of
    ``batch_size`` in eval mode.

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

    def tail(self, layer: str) -> nn.Module | None:
        """The network after ``layer`` (the head alone after ``PENULTIMATE``), or None (see ``network_tail``)."""
        if layer not in self._tails:
            head = dict(self.model.named_modules())[self.backbone.head]
            self._tails[layer] = head if layer == PENULTIMATE else network_tail(self.model, layer)
        return self._tails[layer]

    def batches(self, n: int):
        """Row slices of ``batch_size`` covering [0, n)."""
        return (slice(start, start + self.batch_size) for start in range(0, n, self.batch_size))

    def collect(self, features: torch.Tensor, outputs: dict[str, list[np.ndarray]], shape=None) -> None:
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
            for rows in self.batches(len(images)):
                self.model(self.backbone.preprocessing(images[rows]).to(self.device))
                self.collect(captured["features"], outputs, shape if layer == PENULTIMATE else None)
        return {name: np.concatenate(parts) for name, parts in outputs.items()}

    @torch.no_grad()
    def tail_outputs(self, activations: np.ndarray, layer: str, shape) -> dict[str, np.ndarray]:
        """Logits and penultimate features of the network after ``layer``, run on its shaped cached
        activations (the layers before it do not run; after ``PENULTIMATE`` only the head)."""
        tail = self.tail(layer)
        outputs: dict[str, list[np.ndarray]] = {}
        with capture_outputs(self.model, self.backbone.head, ()) as captured:
            for rows in self.batches(len(activations)):
                batch = torch.from_numpy(np.ascontiguousarray(activations[rows], np.float32)).to(self.device)
                if layer == PENULTIMATE:
                    self.collect(batch, outputs, shape)
                else:
                    tail(shape(batch))
                    self.collect(captured["features"], outputs)
        return {name: np.concatenate(parts) for name, parts in outputs.items()}

    def channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The preprocessing's per-channel normalisation (mean, std), shaped (1, C, 1, 1) on the device."""
        view = (1, -1, 1, 1)
        mean = torch.tensor(self.backbone.preprocessing.mean, dtype=torch.float32).view(view).to(self.device)
        std = torch.tensor(self.backbone.preprocessing.std, dtype=torch.float32).view(view).to(self.device)
        return mean, std

    def layer_outputs(self, images: np.ndarray, layer: str) -> np.ndarray:
        """The plain outputs of ``layer`` (float32, as extraction caches them)."""
        return forward_rows(self.backbone, images, (layer,), self.batch_size, self.device)[layer]


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
        chunks = compute_in_chunks(path, n, names, batch_size * chunk_batches,
                                   f"{step}-bs{batch_size}" if step else f"bs{batch_size}",
                                   compute,
                                   f"{description}: {step}" if step else description, progress)
        return {name: np.concatenate([chunk[name] for chunk in chunks]) for name in names}
    return passes


def derive_state(method, backbone: Backbone, images: ImageSet, entry: CachedSplit, store: FeatureStore, *,
                 key: dict | None = None, validation: tuple[ImageSet, CachedSplit] | None = None,
                 batch_size: int = 256, chunk_batches: int = 16, device: str = "cpu",
                 progress: bool = True) -> CachedSplit:
    """What ``method`` learns through the network on the fit entry (``method.network_fit``), cached
    beside that entry as ``<method>-fit`` under ``key`` (default ``method.network_key``); its row-wise
    passes are chunked and resumable. ``validation``: the images and entry of another set the
    method tunes on, handed to ``network_fit`` as ``validation=`` rows."""
    _check_images(images, entry)
    if validation is not None:
        _check_images(*validation)

    def compute(path):
        network = Network(backbone, resolve_device(device), batch_size)
        passes = _rows_in_chunks(path, f"{method.label()} fit {backbone.name} {images.name}/{images.split}",
                                 batch_size, chunk_batches, progress)
        extra = {} if validation is None else {"validation": EntryRows(*validation, 0, len(validation[0]))}
        with precision(network.device, amp=False):
            state = method.network_fit(network, EntryRows(images, entry, 0, len(images)), passes, **extra)
        return state, method.network_meta()

    return _derived_entry(store, entry, f"{method.name}-fit", key or method.network_key(backbone.declared()),
                          backbone, f"{method.label()} fitted", compute)


def derive(method, backbone: Backbone, images: ImageSet, entry: CachedSplit, store: FeatureStore, *,
           key: dict | None = None, batch_size: int = 256, chunk_batches: int = 16, device: str = "cpu",
           progress: bool = True) -> CachedSplit:
    """The outputs of network method ``method`` over ``entry``'s images, cached beside the entry
    under ``key`` (default ``method.network_key()``; methods fitted through the network add their
    fit entry), computed by ``method.network_outputs(network, rows)`` in resumable chunks and
    checked by ``method.check_network_outputs`` before they are written."""
    _check_images(images, entry)
    key = method.network_key(backbone.declared()) if key is None else key

    def compute(path):
        network = Network(backbone, resolve_device(device), batch_size)
        passes = _rows_in_chunks(path, f"{method.label()} {backbone.name} {images.name}/{images.split}",
                                 batch_size, chunk_batches, progress)
        with precision(network.device, amp=False):
            arrays = passes("", len(images), tuple(method.outputs),
                            lambda start, stop: method.network_outputs(network, EntryRows(images, entry, start, stop)))
        # before anything is written: outputs the method rejects never reach a derived entry
        method.check_network_outputs(arrays, f"{images.name}/{images.split}", backbone.name)
        arrays["labels"] = np.asarray(images.labels, dtype=np.int64)
        return arrays, {"num_classes": int(arrays["logits"].shape[1]), "feature_dim": int(arrays["features"].shape[1]),
                        **method.network_meta()}

    return _derived_entry(store, entry, method.name, key, backbone, method.label(), compute)
