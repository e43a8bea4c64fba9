"""The job grid: benchmark definition -> backbones -> extraction (cached) -> scores (cached) -> leaderboard.

Each stage can run alone. ``BenchmarkRun`` resolves every cache key from content (weights,
datasets, preprocessing, method and parameters); with ``compute=False`` a stage only reads the
cache and raises ``CacheMissing`` naming the command that fills it, so ``score`` and
``leaderboard`` never run a network.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from extract.backbones import (Backbone, checkpoint_backbone, get_backbone_spec, preprocessing_from_config,
                               registered_backbone)
from extract.datasets import DatasetUnavailable, ImageSet, load_dataset
from extract.extraction import entry_data_key, extract, resolve_device
from extract.store import CachedSplit, CacheCorrupt, CacheMissing, FeatureStore, content_key, read_verified, \
    write_h5_atomic
from extract.training import train_backbone, weights_path
from harness.config import BackboneConfig, Benchmark, DatasetRef, MethodRef
from methods import Method, make_method
from results.leaderboard import Leaderboard, build_leaderboard
from results.metrics import accuracy, ood_metrics

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    cache_dir: Path
    out_dir: Path
    data_root: Path | None = None
    device: str = "auto"
    seeds: tuple[int, ...] | None = None
    download: bool = False
    progress: bool = True


@dataclass
class Scored:
    """One method's per-sample scores and class predictions on one entry."""

    scores: np.ndarray
    predictions: np.ndarray


@dataclass
class RunSummary:
    """What a run did, for the closing summary and the report."""

    lines: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    outputs: list[Path] = field(default_factory=list)

    def add_time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds


class BenchmarkRun:
    """One benchmark with its options: loads data, backbones, entries and scores on demand."""

    def __init__(self, benchmark: Benchmark, options: RunOptions):
        self.benchmark = benchmark
        self.options = options
        self.store = FeatureStore(options.cache_dir)
        self.summary = RunSummary()
        self._sets: dict[str, tuple[DatasetRef, ImageSet]] | None = None

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
        for ref in (bench.id_fit, bench.id_test):
            sets[ref.label] = (ref, self._load(ref))  # the ID data is required: errors propagate
        for ref in bench.ood:
            try:
                images = self._load(ref)
            except DatasetUnavailable as err:
                lines = str(err).splitlines()  # first line and the "How to get it" line, not the search list
                reason = " ".join([lines[0], *(line for line in lines[1:] if line.startswith("How to get it"))])
                self.summary.skipped.append(f"skipped OOD set {ref.label}: {reason}")
                log.warning("skipped OOD set %s: %s", ref.label, reason)
                continue
            if len(images) == 0:
                raise ValueError(f"OOD set {ref.label!r} ({ref.dataset}/{ref.split}) has no samples; "
                                 "check its files or remove it from the benchmark")
            sets[ref.label] = (ref, images)
        if len(sets) == 2:
            raise DatasetUnavailable(f"benchmark {bench.name}: none of its OOD sets is available "
                                     f"({'; '.join(self.summary.skipped)})")
        self.summary.add_time("load datasets", time.perf_counter() - started)
        self._sets = sets
        return sets

    def _load(self, ref: DatasetRef) -> ImageSet:
        try:
            return load_dataset(ref.dataset, ref.split, data_root=self.options.data_root,
                                download=self.options.download, **ref.params)
        except ValueError as err:  # e.g. params {n: 0}: say which of the benchmark's sets is wrong
            raise ValueError(f"dataset {ref.label!r} ({ref.dataset}/{ref.split}): {err}") from err

    def ood_labels(self) -> list[str]:
        ids = {self.benchmark.id_fit.label, self.benchmark.id_test.label}
        return [label for label in self.datasets() if label not in ids]

    # ------------------------------------------------------------------ backbones
    def backbone(self, config: BackboneConfig, seed: int, compute: bool = True) -> Backbone:
        """The backbone entry for ``seed``: trained from its recipe (weights cached) or loaded from a checkpoint."""
        if config.factory:
            return checkpoint_backbone(config.name, config.factory, config.checkpoint,
                                       preprocessing_from_config(config.preprocessing), config.head,
                                       config.layers, config.kwargs)
        spec = get_backbone_spec(config.arch)
        sets = self.datasets()
        fit_set = sets[self.benchmark.id_fit.label][1]
        test_set = sets[self.benchmark.id_test.label][1]
        weights_dir = self.store.root / "weights"
        path = weights_path(weights_dir, spec, config.recipe, fit_set, self.benchmark.num_classes, seed)
        if not compute and not path.exists():
            raise CacheMissing(f"backbone {config.name} seed {seed} has not been trained (no {path}); "
                               f"run `oodbench extract {self.benchmark.name}` first")
        started = time.perf_counter()
        state, record = train_backbone(spec, config.recipe, fit_set, num_classes=self.benchmark.num_classes,
                                       seed=seed, weights_dir=weights_dir, test_set=test_set,
                                       device=str(resolve_device(self.options.device)),
                                       progress=self.options.progress)
        self.summary.add_time("train", time.perf_counter() - started)
        last = record["history"][-1]
        info = {"seed": seed, "trained_epochs": last["epoch"], "test_acc_after_training": last.get("test_acc")}
        return registered_backbone(spec, state, config.name, self.benchmark.num_classes, info)

    # ------------------------------------------------------------------ extraction
    def entries(self, backbone: Backbone, compute: bool = True) -> dict[str, CachedSplit]:
        """The cache entry of every dataset for ``backbone``, extracting what is missing when ``compute``."""
        bench, entries = self.benchmark, {}
        started = time.perf_counter()
        for label, (ref, images) in self.datasets().items():
            if compute:
                entries[label] = extract(backbone, images, self.store, layers=bench.layers,
                                         batch_size=bench.batch_size, device=self.options.device,
                                         activations_dtype=bench.activations_dtype, progress=self.options.progress)
                continue
            data_key = entry_data_key(backbone, images, bench.layers, bench.activations_dtype)
            path = self.store.entry_path(backbone.key, images.name, images.split, data_key)
            entry = self.store.open_entry(path)
            if entry is None:
                raise CacheMissing(f"no cached features for {backbone.name} on {label} ({path}); "
                                   f"run `oodbench extract {bench.name}` first")
            entries[label] = entry
        self.summary.add_time("extract" if compute else "open cache", time.perf_counter() - started)
        return entries

    # ------------------------------------------------------------------ scoring
    def scores(self, backbone: Backbone, method_ref: MethodRef, entries: dict[str, CachedSplit],
               compute: bool = True) -> dict[str, Scored]:
        """Per-sample scores of one method on every evaluated entry, from the score cache or computed.

        The method is fit on the ID fit entry only when some score is not cached yet.
        """
        method = make_method(method_ref.name, **method_ref.params)
        fit_entry = entries[self.benchmark.id_fit.label]
        evaluated = [self.benchmark.id_test.label, *self.ood_labels()]
        started = time.perf_counter()
        fitted: Method | None = None
        result = {}
        for label in evaluated:
            entry = entries[label]
            key = content_key("scores", method.name, method.get_params(), method.version, fit_entry.data_key,
                              entry.data_key)
            path = self.store.scores_path(backbone.key, method.name, key)
            try:
                if path.exists():
                    result[label] = Scored(read_verified(path, "scores"), read_verified(path, "predictions"))
                    continue
            except CacheCorrupt as err:
                log.warning("recomputing scores: %s", err)
            if not compute:
                raise CacheMissing(f"no cached {method.label()} scores for {backbone.name} on {label}; "
                                   f"run `oodbench score {self.benchmark.name} --method {method.name}` first")
            if fitted is None:
                fitted = method.fit(fit_entry)
            scores, predictions = fitted.score_and_predict(entry)
            scored = Scored(np.asarray(scores, dtype=np.float64), predictions)
            write_h5_atomic(path, {"scores": scored.scores, "predictions": scored.predictions},
                            {"kind": "scores", "method": method.name, "params": method.get_params(),
                             "backbone_name": backbone.name, "fit": fit_entry.data_key, "entry": entry.data_key,
                             "what": f"{method.label()} on {label}", "n": len(scored.scores)})
            result[label] = scored
        self.summary.add_time("score", time.perf_counter() - started)
        return result

    def metric_rows(self, backbone: Backbone, seed: int, method_ref: MethodRef,
                    scored: dict[str, Scored], entries: dict[str, CachedSplit]) -> list[dict]:
        """One tidy row per OOD set: FPR@95, AUROC, AUPR-In/Out and the method's ID accuracy."""
        bench = self.benchmark
        id_label = bench.id_test.label
        id_acc = accuracy(scored[id_label].predictions, entries[id_label].labels)
        label = make_method(method_ref.name, **method_ref.params).label()
        rows = []
        for ood_label in self.ood_labels():
            ref = self.datasets()[ood_label][0]
            values = ood_metrics(scored[id_label].scores, scored[ood_label].scores, convention=bench.convention)
            rows.append({"benchmark": bench.name, "backbone": backbone.name, "seed": seed, "method": label,
                         "ood_set": ood_label, "group": ref.group, "convention": bench.convention,
                         **{k: values[k] for k in ("fpr95", "auroc", "aupr_in", "aupr_out")}, "id_acc": id_acc})
        return rows

    # ------------------------------------------------------------------ whole benchmark
    def evaluate(self, methods: tuple[MethodRef, ...] | None = None, compute_backbones: bool = True,
                 compute_entries: bool = True, compute_scores: bool = True, plot: bool = True) -> pd.DataFrame:
        """Tidy metrics for every (seed, backbone, method, OOD set); with ``plot``, score histograms of
        the first seed per backbone."""
        methods = methods or self.benchmark.methods
        rows = []
        for config in self.benchmark.backbones:
            for seed in self.seeds:
                backbone = self.backbone(config, seed, compute=compute_backbones)
                entries = self.entries(backbone, compute=compute_entries)
                histograms = {}
                for method_ref in methods:
                    scored = self.scores(backbone, method_ref, entries, compute=compute_scores)
                    rows += self.metric_rows(backbone, seed, method_ref, scored, entries)
                    if seed == self.seeds[0]:
                        histograms[rows[-1]["method"]] = {"ID": scored[self.benchmark.id_test.label].scores,
                                                          **{k: scored[k].scores for k in self.ood_labels()}}
                if plot and histograms:
                    from results.plots import plot_score_histograms  # matplotlib is slow to import; only runs plot

                    path = self.out_dir(config.name) / "score_histograms.png"
                    self.summary.outputs.append(plot_score_histograms(
                        histograms, path, title=f"{self.benchmark.name} / {config.name} (seed {seed})"))
                self.summary.lines.append(self.backbone_line(backbone, seed))
        frame = pd.DataFrame(rows)
        frame.attrs["convention"] = self.benchmark.convention
        return frame

    def backbone_line(self, backbone: Backbone, seed: int) -> str:
        acc = backbone.info.get("test_acc_after_training")
        trained = f", trained {backbone.info['trained_epochs']} epochs, ID test acc {acc:.2%}" if acc else ""
        return f"backbone {backbone.name} seed {seed}: entry {backbone.key}{trained}"

    def out_dir(self, backbone_name: str | None = None) -> Path:
        path = self.options.out_dir / self.benchmark.name
        return path / backbone_name if backbone_name else path

    def write_leaderboards(self, metrics: pd.DataFrame) -> dict[str, Leaderboard]:
        """One leaderboard per backbone (CSV, LaTeX, Markdown), the tidy metrics CSV and a report."""
        boards = {}
        out = self.out_dir()
        out.mkdir(parents=True, exist_ok=True)
        tidy = out / "metrics.csv"
        metrics.to_csv(tidy, index=False)
        self.summary.outputs.append(tidy)
        for name, frame in metrics.groupby("backbone", sort=False):
            frame = frame.copy()
            frame.attrs["convention"] = self.benchmark.convention
            board = build_leaderboard(frame)
            folder = self.out_dir(name)
            self.summary.outputs += [board.to_csv(folder / "leaderboard.csv"),
                                     board.to_latex(folder / "leaderboard.tex"),
                                     board.to_markdown(folder / "leaderboard.md")]
            boards[name] = board
        self.summary.outputs.append(self._write_report(boards))
        return boards

    def _write_report(self, boards: dict[str, Leaderboard]) -> Path:
        bench = self.benchmark
        lines = [f"# {bench.name}", "", bench.description, "",
                 f"Seeds: {', '.join(map(str, self.seeds))}. Convention: {bench.convention}.", ""]
        lines += [f"- {line}" for line in self.summary.lines + self.summary.skipped]
        for name, board in boards.items():
            lines += ["", f"## {name}", "", (self.out_dir(name) / "leaderboard.md").read_text()]
        path = self.out_dir() / "report.md"
        path.write_text("\n".join(lines) + "\n")
        return path

