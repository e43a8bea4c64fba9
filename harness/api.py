"""The Python API (``import oodbench``): everything the CLI does, for notebooks and scripts.

    import oodbench as ob

    metrics = ob.run("fashion-mnist")                       # the tidy table of metrics.csv
    tests = ob.Bench("fashion-mnist").compare(["energy", "msp"])   # paired tests, every OOD set
    metrics = ob.run("fashion-mnist", methods=["energy", "mypkg.scores:MyScore"])
    metrics = ob.evaluate_model(model, "fashion-mnist", head="fc")   # an nn.Module, no YAML
    splits = ob.open_splits("fashion-mnist")                # cached arrays: splits.test.features ...
    ob.score(MyScore(alpha=2), splits)                      # fit, score and metrics, in memory

``Bench`` holds one benchmark with its options; the CLI (``harness.cli``) is a thin layer over it.
A benchmark is a packaged name, a YAML path or a mapping of the same content. A method is a
reference (``energy``, ``module:Class``, an installed plugin's name), a ``Method`` subclass or an
instance (its parameters are used). Nothing here imports torch until a network must run.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from extract.datasets import default_data_root
from extract.store import CachedSplit, CacheMissing, FeatureStore
from harness.config import (
    BackboneConfig,
    Benchmark,
    Intervals,
    MethodRef,
    benchmark_intervals,
    benchmark_path,
    load_benchmark,
    parse_benchmark,
    parse_intervals,
)
from harness.evaluation import Evaluation, RunSummary, Scored, ScoringGrid, fit_rows, method_label, tidy_metric_rows
from harness.resolution import Resolution, RunOptions, load_record
from methods.base import (
    Method,
    SplitView,
    blamed_on,
    checked_outputs,
    make_method,
    method_class,
    method_reference,
    parameter_grid,
)
from results.leaderboard import Leaderboard

CACHE_ENV = "OODBENCH_CACHE_DIR"
MODEL_NAME = "model"  # the backbone name of an in-memory model, unless given


def default_cache_dir() -> Path:
    """The cache root: ``$OODBENCH_CACHE_DIR``, else ~/.cache/oodbench/store."""
    return Path(os.environ.get(CACHE_ENV, "~/.cache/oodbench/store")).expanduser()


def method_ref(method) -> MethodRef:
    """A ``MethodRef`` for a reference string, a ``Method`` subclass or an instance (with its
    parameters), checked now. A class that cannot be named again by 'module:Class' (defined inside
    a function) is carried as the class itself: it then runs in this process only (``jobs=1``)."""
    if isinstance(method, MethodRef):
        make_method(method.name, **method.params)
        return method
    if isinstance(method, Method):
        cls, params = type(method), method.get_params()
    else:
        cls, params = method_class(method), {}
        if isinstance(method, str):
            make_method(method)
            return MethodRef(method)
    reference = method_reference(cls)
    try:
        named = method_class(reference)
    except ValueError:
        named = None
    return MethodRef(reference if named is cls else cls, params)


@dataclass
class Splits:
    """The cached splits of one (backbone, seed) of a benchmark, as read-only arrays on demand:
    ``fit`` (the ID fit split), ``test`` (the ID test split), ``ood`` (label -> split) and
    ``validation`` (or None). Each split has ``features``, ``logits``, ``labels``, ``head`` and
    ``activations(layer)`` (``extract.store.CachedSplit``)."""

    benchmark: str
    backbone: str
    seed: int
    convention: str
    fit: CachedSplit
    test: CachedSplit
    ood: dict[str, CachedSplit]
    groups: dict[str, str]  # OOD label -> 'near', 'far' or ''
    validation: CachedSplit | None = None
    val: CachedSplit | None = None  # the ID validation split
    fpr_rule: str = "canonical"
    fit_subsets: dict = dataclasses.field(default_factory=dict)  # method name -> its own fit rows


class Bench:
    """One benchmark with its run options: run, extract, score, sweep, re-render, open the cache.

    ``benchmark``: a packaged name ('fashion-mnist'), a YAML path or a mapping. ``model``: an
    ``nn.Module`` evaluated instead of the benchmark's backbones, with ``head`` (the name of its
    final linear layer), ``preprocessing`` (a mapping: input_size, channels, mean, std, optional
    resize_to; default: the benchmark's first registry backbone's) and optional ``layers`` to
    cache activations of; its entries are keyed by a hash of its weights, so the cache works as
    for any backbone. ``level`` and ``resamples`` override the benchmark's ``intervals:`` (the
    leaderboard's bootstrap intervals). The other options are the CLI's.
    """

    def __init__(self, benchmark, *, model=None, head: str = "", preprocessing: dict | None = None,
                 layers: tuple[str, ...] = (), model_name: str = MODEL_NAME, cache_dir=None, out_dir="out",
                 data_root=None, device: str = "auto", seeds=None, download: bool = False, progress: bool = True,
                 workers: int = 0, amp: bool = False, summary: RunSummary | None = None, level: float | None = None,
                 resamples: int | None = None):
        if not isinstance(benchmark, (str, Path, dict)):
            raise ValueError("a benchmark is a packaged name, a YAML path or a mapping, "
                             f"got {type(benchmark).__name__}")
        self.source = benchmark
        self.options = RunOptions(cache_dir=Path(cache_dir or default_cache_dir()).expanduser(), out_dir=Path(out_dir),
                                  data_root=Path(data_root) if data_root else default_data_root(), device=device,
                                  seeds=tuple(seeds) if seeds else None, download=download, progress=progress,
                                  workers=workers, amp=amp)
        self.summary = summary or RunSummary()
        self._intervals = {k: v for k, v in (("level", level), ("resamples", resamples)) if v is not None}
        parse_intervals(self._intervals, "Bench options")  # a bad level or count fails before any work
        self.leaderboards: dict[str, Leaderboard] = {}
        self._model = (model, head, preprocessing, tuple(layers), model_name) if model is not None else None
        self._benchmark: Benchmark | None = None
        self._run = None
        self.resolution: Resolution | None = None  # the last one scored

    @property
    def original(self) -> Benchmark:
        """The benchmark as its file (or mapping) says; loaded on first use (it imports torch)."""
        if isinstance(self.source, dict):
            return parse_benchmark(self.source, source="<mapping>")
        return load_benchmark(self.source)

    @property
    def benchmark(self) -> Benchmark:
        """What runs: ``original``, or its data with the in-memory model as the only backbone."""
        if self._benchmark is None:
            self._benchmark = self.original
            if self._model is not None:
                name = self._model[-1]
                self._benchmark = dataclasses.replace(self._benchmark, backbones=(BackboneConfig(name=name),),
                                                      seeds=(0,), source=f"<in-memory model {name}>")
        return self._benchmark

    # ------------------------------------------------------------------ resolving
    def pipeline(self):
        """The benchmark's ``harness.pipeline.BenchmarkRun`` (imports torch), made once."""
        if self._run is None:
            from harness.pipeline import BenchmarkRun

            self._run = BenchmarkRun(self.benchmark, self.options, self.summary, backbones=self._backbones())
        return self._run

    def _backbones(self) -> dict:
        if self._model is None:
            return {}
        from extract.backbones import Backbone, get_backbone_spec, preprocessing_from_config

        model, head, preprocessing, layers, name = self._model
        if not head:
            raise ValueError("evaluating a model needs head=: the name of its final linear layer (the classifier), "
                             f"one of its modules: {', '.join(n for n, _ in model.named_modules() if n)}")
        if preprocessing is None:
            config = next((c for c in self.original.backbones if c.arch), None)
            if config is None:
                raise ValueError("evaluating a model needs preprocessing= (input_size, channels, mean, std): this "
                                 "benchmark has no registry backbone to take it from")
            prepared = get_backbone_spec(config.arch).preprocessing
        else:
            prepared = preprocessing_from_config(preprocessing)
        architecture = {"module": f"{type(model).__module__}.{type(model).__qualname__}"}
        return {name: Backbone(name, model, prepared, head, layers, architecture, {"in_memory": True})}

    @property
    def intervals(self) -> Intervals:
        """The leaderboard's bootstrap intervals: the benchmark's ``intervals:`` with this Bench's
        ``level`` and ``resamples`` over it (read from the file alone: no torch)."""
        return dataclasses.replace(benchmark_intervals(self.source), **self._intervals)

    def benchmark_file(self) -> Path | None:
        """The benchmark's file, whose record lets scoring skip resolving; None for a mapping or a model."""
        return benchmark_path(self.source) if isinstance(self.source, (str, Path)) and self._model is None else None

    def resolve(self, compute: bool = True) -> Resolution:
        """The benchmark resolved to its cache entries: from its record when nothing it came from
        has changed (no torch, no images), else in full - training and extracting what is missing
        when ``compute``, else raising ``CacheMissing`` for anything not cached."""
        if not compute and self.benchmark_file() is not None:
            started = time.perf_counter()
            resolution = load_record(self.options.record_path(self.benchmark_file()))
            if resolution is not None:
                self.summary.add_time("read record", time.perf_counter() - started)
                return resolution
        return self.pipeline().resolve(compute=compute)

    def evaluation(self, compute: bool) -> Evaluation:
        """An ``Evaluation`` of the resolved benchmark; a network method's missing outputs are
        computed through the network."""
        self.resolution = self.resolve(compute=compute)
        return Evaluation(self.resolution, FeatureStore(self.options.cache_dir), self.options.out_dir, self.summary,
                          network=self.pipeline)

    # ------------------------------------------------------------------ what users run
    def run(self, methods=None, *, jobs: int = 1, backend: str = "loky", scheduler: str = "",
            write: bool = True) -> pd.DataFrame:
        """Train/extract what is missing, score every method (default: the benchmark's) and, with
        ``write``, write the leaderboards (``self.leaderboards``); returns the tidy metrics, one row
        per (seed, backbone, method, OOD set): the table of ``metrics.csv``."""
        return self._evaluate(methods, compute=True, grid=ScoringGrid(backend, jobs, scheduler), write=write)

    def leaderboard(self, methods=None, *, jobs: int = 1, backend: str = "loky", scheduler: str = "",
                    write: bool = True) -> pd.DataFrame:
        """``run`` from cached scores alone: a missing score is a ``CacheMissing`` naming the command."""
        return self._evaluate(methods, compute=False, grid=ScoringGrid(backend, jobs, scheduler), write=write)

    def _evaluate(self, methods, compute: bool, grid: ScoringGrid, write: bool) -> pd.DataFrame:
        refs = tuple(method_ref(m) for m in methods) if methods else None
        intervals = self.intervals
        evaluation = self.evaluation(compute=compute)
        metrics = evaluation.evaluate(refs, compute_scores=compute, grid=grid, plot=write,
                                      resamples=intervals.resamples if write else 0)
        if write:
            self.leaderboards = evaluation.write_leaderboards(metrics, intervals.level)
        return metrics

    def compare(self, methods, *, jobs: int = 1, backend: str = "loky", scheduler: str = "") -> pd.DataFrame:
        """Two methods tested against each other on the same test samples, per backbone
        (``results.leaderboard.Leaderboard.compare``): one row per (backbone, column, metric) - every
        OOD set, the averages over sets and the ID accuracy - with both values, the difference
        (first - second) with its interval at the benchmark's level, the two-sided p-value and the
        test (DeLong's for a set's AUROC, a paired bootstrap otherwise). Scores come from the cache,
        computed from the cached features where missing, as ``score`` does."""
        refs = tuple(method_ref(m) for m in methods)
        labels = [method_label(ref.name, ref.params) for ref in refs]
        if len(labels) != 2 or labels[0] == labels[1]:
            raise ValueError(f"compare takes two different methods, got {', '.join(labels) or 'none'}")
        intervals = self.intervals
        evaluation = self.evaluation(compute=False)
        metrics = evaluation.evaluate(refs, compute_scores=True, plot=False, grid=ScoringGrid(backend, jobs, scheduler),
                                      resamples=intervals.resamples)
        tables = []
        for backbone, frame in metrics.groupby("backbone", sort=False):
            table = evaluation.leaderboard(frame, frame, intervals.level).compare(*labels)
            tables.append(table.assign(backbone=backbone)[["backbone", *table.columns]])
        return pd.concat(tables, ignore_index=True)

    def extract(self, shard: tuple[int, int] | None = None) -> Resolution | list[str]:
        """Train and extract what is missing. With ``shard`` (i, n): only that shard of every entry;
        returns one line per (backbone, seed) saying how many entries are complete."""
        if shard is not None:
            run = self.pipeline()
            return run.extract_shard(shard) + run.skipped
        return self.resolve(compute=True)

    def score(self, method, **params) -> pd.DataFrame:
        """One method's tidy metrics from the cache (no training or extraction; a network method's
        own passes run when missing). ``params`` override the method's."""
        ref = method_ref(method)
        ref = MethodRef(ref.name, {**ref.params, **params})
        make_method(ref.name, **ref.params)
        return self.evaluation(compute=False).evaluate((ref,), compute_scores=True, plot=False)

    def sweep(self, method, grid: dict[str, list] | None = None, criterion: str = "auroc", *, jobs: int = 1,
              backend: str = "loky", scheduler: str = "", write: bool = True) -> pd.DataFrame:
        """Every setting of ``method``'s grid (the registry's, with ``grid`` replacing or adding
        axes) scored from the cache and selected on the validation OOD set
        (``harness.evaluation.Evaluation.sweep``); with ``write``, also as
        ``<out>/<benchmark>/sweeps/<method name>.csv``."""
        reference = method_ref(method).name
        points = parameter_grid(reference, grid)
        scoring = ScoringGrid(backend, jobs, scheduler)
        evaluation = self.evaluation(compute=False)
        table = evaluation.sweep(reference, points, criterion, scoring)
        if write:
            path = evaluation.out_dir() / "sweeps" / f"{make_method(reference).name}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            table.to_csv(path, index=False)
            self.summary.outputs.append(path)
        return table

    def epochs(self, backbone: str, methods=("energy", "msp")) -> tuple[pd.DataFrame, list[Path]]:
        """OOD metrics of every training snapshot of ``backbone`` (``harness.epochs``)."""
        from harness.epochs import write_epoch_report

        return write_epoch_report(self.pipeline(), backbone, tuple(method_ref(m) for m in methods))

    def splits(self, backbone: str | None = None, seed: int | None = None) -> Splits:
        """The cached splits of one (backbone, seed) (default: the first), extracted already."""
        resolution = self.resolve(compute=False)
        chosen = [b for b in resolution.backbones
                  if (backbone is None or b.name == backbone) and (seed is None or b.seed == seed)]
        if not chosen:
            names = ", ".join(f"{b.name} seed {b.seed}" for b in resolution.backbones)
            raise ValueError(f"benchmark {resolution.benchmark} has no backbone {backbone!r} seed {seed}; it has "
                             f"{names}")
        resolved, store = chosen[0], FeatureStore(self.options.cache_dir)
        entries = Evaluation(resolution, store, self.options.out_dir, self.summary).open_entries(resolved)
        return Splits(resolution.benchmark, resolved.name, resolved.seed, resolution.convention,
                      entries[resolution.id_fit], entries[resolution.id_test],
                      {label: entries[label] for label in resolution.ood_labels}, dict(resolution.ood_groups),
                      entries[resolution.validation] if resolution.validation else None,
                      entries[resolution.id_val], resolution.fpr_rule, dict(resolution.fit_subsets))


# ---------------------------------------------------------------------- one-line entry points
def run(benchmark, methods=None, **options) -> pd.DataFrame:
    """Run a benchmark end to end and write its leaderboards; returns the tidy metrics
    (``Bench(benchmark, **options).run(methods)``)."""
    return Bench(benchmark, **options).run(methods)


def evaluate_model(model, benchmark, *, head: str, preprocessing: dict | None = None, methods=None,
                   **options) -> pd.DataFrame:
    """Evaluate an in-memory ``nn.Module`` on a benchmark's data, without YAML: extracted once
    (keyed by a hash of its weights), scored by every method; returns the tidy metrics."""
    return Bench(benchmark, model=model, head=head, preprocessing=preprocessing, **options).run(methods)


def open_splits(benchmark, backbone: str | None = None, seed: int | None = None, **options) -> Splits:
    """The cached arrays of one (backbone, seed) of an extracted benchmark (``Bench.splits``)."""
    return Bench(benchmark, **options).splits(backbone, seed)


def score(method, splits: Splits) -> pd.DataFrame:
    """Fit ``method`` (a reference, class or instance) on ``splits.fit``, score the ID test and
    every OOD split and compute the metrics, in memory (nothing is cached): the rows
    ``Bench.score`` gives, for prototyping a score in a notebook."""
    instance = method.clone() if isinstance(method, Method) else make_method(method)
    if "network" in instance.reads:
        raise ValueError(f"{instance.name} computes its outputs through the network; score it with "
                         "Bench(...).score(method), which runs its network pass and caches it")
    fit = fit_rows(splits.val if instance.fits_on == "val" else splits.fit, splits.fit_subsets.get(instance.name))
    with blamed_on(instance, f"fit on {fit.name}"):
        fitted = instance.fit(SplitView(fit, instance, fitting=True))
    scored = {}
    for label, split in {"ID": splits.test, **splits.ood}.items():
        with blamed_on(instance, f"score_samples/predict on {split.name}"):
            scored[label] = Scored(*checked_outputs(instance, split, *fitted.score_and_predict(
                SplitView(split, instance))))
        if not np.isfinite(scored[label].scores).all():
            raise ValueError(f"{instance.label()} gave NaN or infinite scores on {split.name}")
    return pd.DataFrame(tidy_metric_rows(splits.benchmark, splits.backbone, splits.seed, instance.label(),
                                         splits.convention, splits.groups, scored["ID"], splits.test.labels,
                                         {label: scored[label] for label in splits.ood}, splits.fpr_rule))


__all__ = ["Bench", "CacheMissing", "Splits", "evaluate_model", "method_ref", "open_splits", "run", "score"]
