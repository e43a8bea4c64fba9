"""Resolving a benchmark: definition -> datasets -> backbones (trained or loaded) -> cache entries.

``BenchmarkRun.resolve`` computes every cache key from content (weights, datasets,
preprocessing, layers) and, with ``compute=True``, trains and extracts what is missing; with
``compute=False`` it only reads the cache and raises ``CacheMissing`` naming the command that
fills it. The result is a ``Resolution`` (recorded under ``<cache>/runs/`` for the next run),
which ``harness.evaluation`` scores and tabulates without a network.
"""
from __future__ import annotations

import glob
import logging
import sys
import time
from pathlib import Path

from extract.backbones import (
    Backbone,
    checkpoint_backbone,
    get_backbone_spec,
    preprocessing_from_config,
    read_state_dict,
    registered_backbone,
)
from extract.datasets import DatasetUnavailable, ImageSet, held_out, load_dataset
from extract.extraction import entry_data_key, extract, resolve_device
from extract.finetuning import finetune_path
from extract.store import CachedSplit, CacheMissing, FeatureStore
from extract.training import train_backbone, weights_path
from harness.config import BackboneConfig, Benchmark, DatasetRef, outlier_ref
from harness.evaluation import RunSummary
from harness.resolution import Resolution, ResolvedBackbone, RunOptions, save_record
from methods.finetuning import finetune_backbone

log = logging.getLogger(__name__)


class BenchmarkRun:
    """One benchmark with its options: loads data, backbones and entries on demand."""

    def __init__(self, benchmark: Benchmark, options: RunOptions, summary: RunSummary | None = None,
                 backbones: dict[str, Backbone] | None = None):
        """``backbones``: ready backbones by the name of the benchmark's backbone they stand for (an
        in-memory model from the Python API), used as they are for every seed."""
        self.benchmark = benchmark
        self.options = options
        self.store = FeatureStore(options.cache_dir)
        self.summary = summary or RunSummary()
        self.skipped: list[str] = []
        self.watched: set[Path] = set()  # every file read and folder searched: what the record depends on
        self._sets: dict[str, tuple[DatasetRef, ImageSet]] | None = None
        self._backbones: dict[tuple[str, int], Backbone] = {}
        self._training_set: ImageSet | None = None
        self.given = dict(backbones or {})

    @property
    def seeds(self) -> tuple[int, ...]:
        return self.options.seeds or self.benchmark.seeds

    # ------------------------------------------------------------------ data
    def datasets(self) -> dict[str, tuple[DatasetRef, ImageSet]]:
        """ID fit, ID test and every available OOD set by label; absent optional sets are skipped visibly."""
        if self._sets is not None:
            return self._sets
        bench, sets = self.benchmark, {}
        started = time.perf_counter()
        # the ID data is required: errors propagate
        if bench.val.split:
            fit = self.training_set()
            val = self._load(bench.id_val)
        else:
            fit, val = held_out(self.training_set(), bench.val.fraction, bench.val.seed)
        sets[bench.id_fit.label] = (bench.id_fit, fit)
        sets[bench.id_val.label] = (bench.id_val, val)
        sets[bench.id_test.label] = (bench.id_test, self._load(bench.id_test))
        validation = [bench.validation] if bench.validation else []
        for ref in (*bench.ood, *validation):
            try:
                images = self._load(ref)
            except DatasetUnavailable as err:
                self.watched.update(err.searched)
                lines = str(err).splitlines()  # first line and the "How to get it" line, not the search list
                reason = " ".join([lines[0], *(line for line in lines[1:] if line.startswith("How to get it"))])
                what = "validation OOD set" if ref in validation else "OOD set"
                self.skipped.append(f"skipped {what} {ref.label}: {reason}")
                log.warning("skipped %s %s: %s", what, ref.label, reason)
                continue
            if len(images) == 0:
                raise ValueError(f"OOD set {ref.label!r} ({ref.dataset}/{ref.split}) has no samples; "
                                 "check its files or remove it from the benchmark")
            sets[ref.label] = (ref, images)
        if not any(ref in bench.ood for ref, _ in sets.values()):
            raise DatasetUnavailable(f"benchmark {bench.name}: none of its OOD sets is available "
                                     f"({'; '.join(self.skipped)})")
        for _, images in sets.values():
            self.watched.update(images.inputs)
        self.summary.add_time("load datasets", time.perf_counter() - started)
        self._sets = sets
        return sets

    def training_set(self) -> ImageSet:
        """The whole ID fit split, as its dataset gives it: what backbones are trained and fine-tuned
        on (the methods fit on it less the ID validation slice held out of it, ``datasets``)."""
        if self._training_set is None:
            self._training_set = self._load(self.benchmark.id_fit)
        return self._training_set

    def _load(self, ref: DatasetRef) -> ImageSet:
        try:
            return load_dataset(ref.dataset, ref.split, data_root=self.options.data_root,
                                download=self.options.download, **ref.params)
        except ValueError as err:  # e.g. params {n: 0}: say which of the benchmark's sets is wrong
            raise ValueError(f"dataset {ref.label!r} ({ref.dataset}/{ref.split}): {err}") from err

    # ------------------------------------------------------------------ backbones
    def checkpoint_path(self, config: BackboneConfig) -> Path:
        """The checkpoint file of ``config``: ``{data_root}`` in it is the data root, ``{torch_hub}``
        the torch hub's checkpoint folder (where torchvision keeps downloaded weights), and a glob
        pattern (e.g. a name with a hash, ``resnet20-*.th``) must match exactly one file."""
        pattern = config.checkpoint
        if "{torch_hub}" in pattern:
            import torch.hub

            pattern = pattern.replace("{torch_hub}", str(Path(torch.hub.get_dir()) / "checkpoints"))
        if "{data_root}" in pattern:
            if self.options.data_root is None:
                raise FileNotFoundError(f"backbone {config.name}: checkpoint {pattern} is under the data root; pass "
                                        "--data-root or set $OODBENCH_DATA_ROOT")
            pattern = pattern.replace("{data_root}", str(self.options.data_root))
        path = Path(pattern)
        matches = sorted(path.parent.glob(path.name)) if glob.has_magic(path.name) else [path]
        self.watched.add(path.parent)
        where = f"backbone {config.name}: checkpoint {pattern}"
        if not matches or not matches[0].exists():
            raise FileNotFoundError(f"{where} does not exist" if len(matches) == 1 else f"{where}: no file matches "
                                    f"the pattern in {path.parent}")
        if len(matches) > 1:
            raise FileNotFoundError(f"{where} matches {len(matches)} files ({', '.join(map(str, matches))}); make "
                                    "the pattern name exactly one")
        if not matches[0].is_file():
            raise FileNotFoundError(f"{where} is a folder, not a file")
        return matches[0]

    def backbone(self, config: BackboneConfig, seed: int, compute: bool = True) -> Backbone:
        """The backbone entry for ``seed``: trained from its recipe (weights cached), loaded from a
        checkpoint, or fine-tuned from another backbone of the benchmark; built once per run (a base
        backbone serves itself and every backbone fine-tuned from it)."""
        if (config.name, seed) not in self._backbones:
            self._backbones[config.name, seed] = self._build(config, seed, compute)
        return self._backbones[config.name, seed]

    def _build(self, config: BackboneConfig, seed: int, compute: bool) -> Backbone:
        if config.name in self.given:
            return self.given[config.name]
        if config.finetune is not None:
            return self._finetuned(config, seed, compute)
        if config.factory:
            path = self.checkpoint_path(config)
            backbone = checkpoint_backbone(config.name, config.factory, path,
                                           preprocessing_from_config(config.preprocessing), config.head,
                                           config.layers, config.kwargs, config.shaping_layer)
            module = sys.modules[config.factory.partition(":")[0]]
            self.watched.update(Path(p) for p in (path, getattr(module, "__file__", None)) if p)
            return backbone
        spec = get_backbone_spec(config.arch)
        if config.checkpoint:  # a registry architecture with given weights
            path = self.checkpoint_path(config)
            self.watched.add(path)
            return registered_backbone(spec, read_state_dict(path), config.name, self.benchmark.num_classes,
                                       {"seed": seed, "checkpoint": str(path)})
        sets = self.datasets()
        fit_set = self.training_set()
        test_set = sets[self.benchmark.id_test.label][1]
        weights_dir = self.store.root / "weights"
        path = weights_path(weights_dir, spec, config.recipe, fit_set, self.benchmark.num_classes, seed)
        started = time.perf_counter()
        trained = train_backbone(spec, config.recipe, fit_set, num_classes=self.benchmark.num_classes, seed=seed,
                                 weights_dir=weights_dir, test_set=test_set,
                                 device=str(resolve_device(self.options.device)), progress=self.options.progress,
                                 compute=compute)
        if trained is None:
            raise CacheMissing(f"backbone {config.name} seed {seed} has not been trained (no sound {path}); "
                               f"run `oodbench extract {self.benchmark.name}` first")
        state, record = trained
        self.summary.add_time("train", time.perf_counter() - started)
        self.watched.add(path)
        last = record["history"][-1]
        info = {"seed": seed, "trained_epochs": last["epoch"], "test_acc_after_training": last.get("test_acc"),
                "weights": str(path)}
        return registered_backbone(spec, state, config.name, self.benchmark.num_classes, info)

    def _finetuned(self, config: BackboneConfig, seed: int, compute: bool) -> Backbone:
        """``config.base`` (same seed) fine-tuned by ``config.finetune`` (``methods.finetuning``)."""
        base_config = next(c for c in self.benchmark.backbones if c.name == config.base)
        base = self.backbone(base_config, seed, compute)
        sets, recipe = self.datasets(), config.finetune
        fit_set = self.training_set()
        outliers = self._load(outlier_ref(recipe)) if recipe.outliers else None
        weights_dir = self.store.root / "weights"
        path = finetune_path(weights_dir, config.name, base, recipe, fit_set, outliers, self.benchmark.num_classes,
                             seed)
        started = time.perf_counter()
        tuned = finetune_backbone(config.name, base, recipe, fit_set, num_classes=self.benchmark.num_classes,
                                  seed=seed, weights_dir=weights_dir, test_set=sets[self.benchmark.id_test.label][1],
                                  outlier_set=outliers, device=str(resolve_device(self.options.device)),
                                  progress=self.options.progress, compute=compute)
        if tuned is None:
            raise CacheMissing(f"backbone {config.name} seed {seed} has not been fine-tuned (no sound {path}); "
                               f"run `oodbench extract {self.benchmark.name}` first")
        state, record = tuned
        self.summary.add_time("fine-tune", time.perf_counter() - started)
        self.watched.add(path)
        if outliers is not None:
            self.watched.update(outliers.inputs)
        last = record["history"][-1]
        info = {"seed": seed, "base": base.name, "finetune": recipe.label, "zeta": record.get("zeta"),
                "trained_epochs": last["epoch"], "test_acc_after_training": last.get("test_acc"), "weights": str(path)}
        spec = get_backbone_spec(base.architecture["registry"])
        return registered_backbone(spec, state, config.name, self.benchmark.num_classes, info)

    def resolved_backbone(self, resolved: ResolvedBackbone) -> Backbone:
        """The backbone of a resolved (name, seed) (``backbone``); it must still be the entry the
        resolution recorded."""
        config = next((c for c in self.benchmark.backbones if c.name == resolved.name), None)
        if config is None:
            raise CacheMissing(f"benchmark {self.benchmark.name} has no backbone {resolved.name!r} any more; "
                               f"run `oodbench run {self.benchmark.name}`")
        backbone = self.backbone(config, resolved.seed)
        if backbone.key != resolved.key:
            raise CacheMissing(f"backbone {resolved.name} seed {resolved.seed} is now entry {backbone.key}, not "
                               f"{resolved.key}; run `oodbench run {self.benchmark.name}` to extract it")
        return backbone

    def _entry(self, resolved: ResolvedBackbone, label: str) -> CachedSplit:
        entry = self.store.open_entry(self.store.root / resolved.entries[label])
        if entry is None:
            raise CacheMissing(f"no cached features for {resolved.name} on {label}; run "
                               f"`oodbench extract {self.benchmark.name}` first")
        return entry

    def derive(self, resolved: ResolvedBackbone, method, label: str, key: dict) -> CachedSplit:
        """A network method's outputs on one set of a resolved backbone (``extract.network.derive``)."""
        from extract.network import derive

        return derive(method, self.resolved_backbone(resolved), self.datasets()[label][1], self._entry(resolved, label),
                      self.store, key=key, batch_size=self.benchmark.batch_size, device=self.options.device,
                      progress=self.options.progress)

    def derive_state(self, resolved: ResolvedBackbone, method, label: str, key: dict,
                     validation: str | None = None) -> CachedSplit:
        """What a network method learns on the fit set through the network, keyed by ``key``, with the
        set labelled ``validation`` for one tuned on it (``extract.network.derive_state``)."""
        from extract.network import derive_state

        tuning = (self.datasets()[validation][1], self._entry(resolved, validation)) if validation else None
        return derive_state(method, self.resolved_backbone(resolved), self.datasets()[label][1],
                            self._entry(resolved, label), self.store, key=key, validation=tuning,
                            batch_size=self.benchmark.batch_size, device=self.options.device,
                            progress=self.options.progress)

    # ------------------------------------------------------------------ extraction
    def _extract(self, backbone: Backbone, images: ImageSet,
                 shard: tuple[int, int] | None = None) -> CachedSplit | None:
        """``extract.extraction.extract`` with the benchmark's and the run's settings."""
        bench, options = self.benchmark, self.options
        return extract(backbone, images, self.store, layers=bench.layers, batch_size=bench.batch_size,
                       device=options.device, activations_dtype=bench.activations_dtype, progress=options.progress,
                       shard=shard, workers=options.workers, amp=options.amp)

    def entries(self, backbone: Backbone, compute: bool = True) -> dict[str, CachedSplit]:
        """The cache entry of every dataset for ``backbone``, extracting what is missing when ``compute``."""
        bench, entries = self.benchmark, {}
        started = time.perf_counter()
        for label, (_ref, images) in self.datasets().items():
            if compute:
                entries[label] = self._extract(backbone, images)
                continue
            data_key = entry_data_key(backbone, images, bench.layers, bench.activations_dtype, self.options.amp)
            path = self.store.entry_path(backbone.key, images.name, images.split, data_key)
            entry = self.store.open_entry(path)
            if entry is None:
                raise CacheMissing(f"no cached features for {backbone.name} on {label} ({path}); "
                                   f"run `oodbench extract {bench.name}` first")
            entries[label] = entry
        self.summary.add_time("extract" if compute else "open cache", time.perf_counter() - started)
        return entries

    def extract_shard(self, shard: tuple[int, int]) -> list[str]:
        """Shard ``shard`` (i, n) of every entry's extraction (``extract.extraction.extract``): one
        line per (backbone, seed) saying how many of its entries are complete. The shard that
        completes the last entry also writes the benchmark's record, as ``resolve`` does."""
        bench, lines, complete = self.benchmark, [], True
        started = time.perf_counter()
        for config in bench.backbones:
            for seed in self.seeds:
                backbone = self.backbone(config, seed)
                done = [self._extract(backbone, images, shard) is not None for _, images in self.datasets().values()]
                complete &= all(done)
                lines.append(f"shard {shard[0]}/{shard[1]}: {config.name} seed {seed}: {sum(done)} of {len(done)} "
                             "entries complete" + ("" if all(done) else " (the others wait for the other shards)"))
        self.summary.add_time("extract shard", time.perf_counter() - started)
        if complete:
            self.resolve()
        return lines

    # ------------------------------------------------------------------ the whole benchmark
    def resolve(self, compute: bool = True) -> Resolution:
        """Every (backbone, seed) with its cache entries - trained and extracted where missing when
        ``compute`` - recorded so that later scoring can skip this (``harness.resolution``)."""
        backbones = [self.resolved(self.backbone(config, seed, compute=compute), seed, compute)
                     for config in self.benchmark.backbones for seed in self.seeds]
        resolution = self.resolution(backbones)
        source = Path(self.benchmark.source)
        if source.is_file():  # a benchmark parsed from a mapping has no file to key a record by
            save_record(self.options.record_path(source), resolution, self.watched)
        return resolution

    def resolved(self, backbone: Backbone, seed: int, compute: bool = True) -> ResolvedBackbone:
        """``backbone`` (of ``seed``) with the cache entry of every dataset (extracted where missing
        when ``compute``)."""
        entries = self.entries(backbone, compute=compute)
        return ResolvedBackbone(backbone.name, seed, backbone.key, {**backbone.info, "declared": backbone.declared()},
                                {label: str(entry.path.relative_to(self.store.root))
                                 for label, entry in entries.items()})

    def resolution(self, backbones: list[ResolvedBackbone]) -> Resolution:
        """The benchmark's sets, methods and conventions with these resolved backbones."""
        bench, sets = self.benchmark, self.datasets()
        validation = bench.validation.label if bench.validation and bench.validation.label in sets else None
        return Resolution(bench.name, bench.description, bench.convention, self.seeds, bench.methods,
                          bench.id_fit.label, bench.id_test.label,
                          {ref.label: ref.group for ref in bench.ood if ref.label in sets}, validation,
                          self.skipped, backbones, bench.id_val.label, bench.fpr_rule, bench.fit_subsets)
