"""Cache -> scores (cached) -> metrics -> leaderboards, for a benchmark resolved to its entries.

Nothing here loads images or runs a network, and nothing imports torch: ``oodbench score`` and
``oodbench leaderboard`` run from a ``Resolution`` (see ``harness.resolution``) and the HDF5
cache alone. Scores are cached per (method, parameters, fit entry, scored entry); with
``compute_scores=False`` a missing score is a ``CacheMissing`` naming the command that fills it.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from extract.cachefiles import CacheWriteError, skip_read_only
from extract.store import (
    CacheCorrupt,
    CachedSplit,
    CacheMissing,
    FeatureStore,
    SplitRows,
    content_key,
    read_verified,
    write_h5_atomic,
)
from harness.config import MethodRef
from harness.resolution import Resolution, ResolvedBackbone
from methods import Method, make_method
from methods.base import (
    MethodFailed,
    NonFiniteOutputs,
    SplitView,
    UndeclaredRead,
    blamed_on,
    checked_outputs,
    method_reference,
)
from results.leaderboard import LOWER_IS_BETTER, METRICS, Leaderboard, build_leaderboard
from results.metrics import accuracy, ood_metrics
from results.reproduction import load_published, reproduction_frame, write_reproduction
from results.uncertainty import CODE_DIGEST, DEFAULT_LEVEL, MethodSamples, method_samples

log = logging.getLogger(__name__)


@dataclass
class Scored:
    """One method's per-sample scores and class predictions on one entry."""

    scores: np.ndarray
    predictions: np.ndarray


@dataclass
class RunSummary:
    """What a run did, for the closing summary and the report."""

    lines: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    outputs: list[Path] = field(default_factory=list)

    def add_time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds


@dataclass
class CellResult:
    """What one (backbone, method) cell of the scoring grid gives back to the run."""

    rows: list[dict]  # tidy metric rows, one per OOD set
    histogram: dict[str, np.ndarray]  # scores on the ID test set and every OOD set, for the plot
    left_out: str | None  # why the method was left out of this backbone (non-finite outputs), else None
    timings: dict[str, float]
    samples: MethodSamples | None = None  # its resampled results, when the run asks for intervals


def fit_rows(entry: CachedSplit, subset: dict | None) -> CachedSplit | SplitRows:
    """``entry``, or the seeded random rows of it that ``subset`` ({n or fraction, seed}; a
    benchmark file's ``fit:``) asks for, in their order in the entry."""
    if not subset:
        return entry
    n = subset["n"] if "n" in subset else math.ceil(subset["fraction"] * len(entry))
    if n > len(entry):
        raise ValueError(f"the fit subset {subset} asks for {n} rows; the fit split {entry.name} has {len(entry)}")
    rows = np.sort(np.random.default_rng(subset["seed"]).choice(len(entry), n, replace=False))
    return SplitRows(entry, rows, subset)


def method_label(reference, params: dict) -> str:
    """The leaderboard label of a method with ``params`` (e.g. 'energy(T=2)')."""
    return make_method(reference, **params).label()


def tidy_metric_rows(benchmark: str, backbone: str, seed: int, method: str, convention: str, groups: dict[str, str],
                     id_scored: Scored, id_labels: np.ndarray, ood_scored: dict[str, Scored],
                     fpr_rule: str = "canonical") -> list[dict]:
    """One tidy row per OOD set: FPR@95 (by ``fpr_rule``), AUROC, AUPR-In/Out (ID test vs that
    set, ``convention``) and the method's ID accuracy (its predictions on the ID test set)."""
    id_acc = accuracy(id_scored.predictions, id_labels)
    rows = []
    for ood_label, scored in ood_scored.items():
        values = ood_metrics(id_scored.scores, scored.scores, convention=convention, fpr_rule=fpr_rule)
        rows.append({"benchmark": benchmark, "backbone": backbone, "seed": seed, "method": method,
                     "ood_set": ood_label, "group": groups[ood_label], "convention": convention,
                     **{k: values[k] for k in ("fpr95", "auroc", "aupr_in", "aupr_out")}, "id_acc": id_acc})
    return rows


BACKENDS = ("loky", "threading", "dask", "ray")


@dataclass(frozen=True)
class ScoringGrid:
    """Where the cache-only scoring grid runs: joblib's ``backend`` with ``jobs`` workers (-1: one per
    core). ``loky`` (the default) and ``threading`` are local; ``dask`` connects to the Dask
    scheduler at ``address`` (e.g. tcp://host:8786), or starts a local cluster of ``jobs`` worker
    processes without one; ``ray`` joins the Ray cluster at ``address`` (or starts a local one).
    Workers need this package installed and read the cache at the same path (a shared file system)."""

    backend: str = "loky"
    jobs: int = 1
    address: str = ""

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"scoring backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.jobs == 0 or self.jobs < -1:
            raise ValueError(f"jobs must be a positive number of workers or -1 (one per core), got {self.jobs}")

    def run(self, function, arguments: list[tuple]) -> list:
        """``[function(*a) for a in arguments]`` through joblib on this grid, in order."""
        import joblib

        with contextlib.ExitStack() as stack:
            if self.backend == "dask":
                stack.enter_context(self._dask_client())
            elif self.backend == "ray":
                self._join_ray()
            with joblib.parallel_config(backend=self.backend, n_jobs=self.jobs):
                return joblib.Parallel()(joblib.delayed(function)(*a) for a in arguments)

    def _dask_client(self):
        try:
            from dask.distributed import Client
        except ImportError as err:
            raise ValueError("scoring backend dask needs `pip install 'dask[distributed]'`") from err
        if self.address:
            return Client(self.address)
        workers = self.jobs if self.jobs > 0 else None
        return Client(n_workers=workers, threads_per_worker=1, dashboard_address=None)

    def _join_ray(self):
        try:
            import ray
            from ray.util.joblib import register_ray
        except ImportError as err:
            raise ValueError("scoring backend ray needs `pip install ray`") from err
        register_ray()
        if not ray.is_initialized():
            ray.init(address=self.address or None)


_WORKER_EVALUATION: dict[str, Evaluation] = {}  # per worker process: the evaluation of the grid run it serves


def worker_evaluation(run: str, resolution: Resolution, store_root: Path) -> Evaluation:
    """A grid worker's evaluation (no network). Within one grid run (``run``, a fresh token per
    ``evaluate`` or ``sweep``) a worker reuses it, so it opens each backbone's entries once; a later
    run opens them again and sees the cache as it is then."""
    if run not in _WORKER_EVALUATION:
        _WORKER_EVALUATION.clear()
        _WORKER_EVALUATION[run] = Evaluation(resolution, FeatureStore(store_root), Path("."))
    return _WORKER_EVALUATION[run]


def score_cell_in_worker(run: str, resolution: Resolution, store_root: Path, backbone: ResolvedBackbone,
                         method_ref: MethodRef, compute_scores: bool, resamples: int = 0) -> CellResult:
    """``Evaluation.score_cell`` in a grid worker (cache-only methods)."""
    return worker_evaluation(run, resolution, store_root).score_cell(backbone, method_ref, compute_scores, resamples)


def sweep_row_in_worker(run: str, resolution: Resolution, store_root: Path, backbone: ResolvedBackbone,
                        method_ref: MethodRef, criterion: str) -> dict:
    """``Evaluation.sweep_row`` in a grid worker (every sweep point reads the cache only)."""
    return worker_evaluation(run, resolution, store_root).sweep_row(backbone, method_ref, criterion)


def cache_sweep_scores_in_worker(run: str, resolution: Resolution, store_root: Path, backbone: ResolvedBackbone,
                                 method: str, points: list[dict]) -> None:
    """``Evaluation.cache_sweep_scores`` in a grid worker."""
    worker_evaluation(run, resolution, store_root).cache_sweep_scores(backbone, method, points)


def sweep_groups(method: str, points: list[dict]) -> list[list[dict]]:
    """The settings of a sweep that one computation scores together: two or more that differ only in
    the method's ``sweep_axis`` (KNN's k: one search for the largest k serves every k). Cache-only
    methods only (a network method's scores are keyed by its derived entries)."""
    first = make_method(method, **points[0]) if points else None
    if first is None or first.sweep_axis is None or "network" in first.reads:
        return []
    axis = first.sweep_axis
    groups: dict[str, list[dict]] = {}
    for params in points:
        others = {k: v for k, v in make_method(method, **params).get_params().items() if k != axis}
        groups.setdefault(repr(sorted(others.items())), []).append(params)
    return [group for group in groups.values() if len(group) > 1]


class Evaluation:
    """Scores, metrics and leaderboards of one resolved benchmark, from the cache."""

    def __init__(self, resolution: Resolution, store: FeatureStore, out_dir: Path, summary: RunSummary | None = None,
                 network=None):
        """``network``: a callable returning what computes a network method's derived entries
        (``harness.pipeline.BenchmarkRun``), called only when one is missing; None: never run a network."""
        self.resolution = resolution
        self.store = store
        self.out_root = Path(out_dir)
        self.summary = summary or RunSummary()
        self.network = network
        self._entries: dict[str, dict[str, CachedSplit]] = {}  # the last backbone's open entries
        self.samples: dict[tuple[str, int, str], MethodSamples] = {}  # (backbone, seed, method): resampled results

    def current_entries(self, backbone: ResolvedBackbone) -> dict[str, CachedSplit]:
        """``open_entries`` of ``backbone``, kept open while the cells of one backbone follow each
        other (one backbone's entries at a time)."""
        if backbone.key not in self._entries:
            self._entries = {backbone.key: self.open_entries(backbone)}
        return self._entries[backbone.key]

    def open_entries(self, backbone: ResolvedBackbone) -> dict[str, CachedSplit]:
        """Every entry of ``backbone``, verified; a missing or corrupt one is an error naming the fix."""
        started = time.perf_counter()
        entries = {}
        for label, relative in backbone.entries.items():
            entry = self.store.open_entry(self.store.root / relative)
            if entry is None:
                raise CacheMissing(f"no cached features for {backbone.name} on {label} "
                                   f"({self.store.root / relative}); run `oodbench extract "
                                   f"{self.resolution.benchmark}` first")
            entries[label] = entry
        self.summary.add_time("open cache", time.perf_counter() - started)
        return entries

    def scores(self, backbone: ResolvedBackbone, method_ref: MethodRef, entries: dict[str, CachedSplit],
               compute: bool = True) -> dict[str, Scored]:
        """Per-sample scores of one method on the ID test, test OOD and validation OOD entries, from the
        score cache or computed.

        The method is fit on the ID fit entry only when some score is not cached yet, and a fresh
        instance is fit for every parameter setting: fitted state never outlives its parameters.
        """
        res = self.resolution
        method = make_method(method_ref.name, **method_ref.params)
        fit_entry = self.fit_entry(method, entries)
        started = time.perf_counter()
        fitted: Method | None = None
        result = {}
        through_network = "network" in method.reads
        for label in self.score_labels():
            entry = entries[label]
            data_key = entry.derived_key(method.name, self.output_key(backbone, method, fit_entry, entries)) \
                if through_network else entry.data_key
            path = self.score_path(backbone, method, fit_entry, data_key)
            try:
                if path.exists():
                    result[label] = Scored(read_verified(path, "scores"), read_verified(path, "predictions"))
                    continue
            except CacheCorrupt as err:
                log.warning("recomputing scores: %s", err)
            if not compute:
                raise CacheMissing(f"no cached {method.label()} scores for {backbone.name} on {label}; "
                                   f"run `oodbench score {res.benchmark} --method {method_ref.name}` first")
            if through_network:
                with blamed_on(method, f"its network pass on {label}"):
                    if method.fits_through_network and not method.is_fitted():
                        method.load_state(self.network_state(backbone, method, fit_entry, entries))
                    entry = self.derived_entry(backbone, method, label, entry, fit_entry, entries)
            if fitted is None:
                with blamed_on(method, f"fit on {res.id_fit}"):
                    fitted = method.fit(SplitView(fit_entry, method, fitting=True))
            with blamed_on(method, f"score_samples/predict on {label}"):
                scored = Scored(*checked_outputs(method, entry, *fitted.score_and_predict(SplitView(entry, method))))
            self._keep_scores(path, method, backbone, label, fit_entry, entry, scored)
            result[label] = scored
        self.summary.add_time("score", time.perf_counter() - started)
        return result

    def score_labels(self) -> tuple[str, ...]:
        """The entries a method scores: the ID test set, the test OOD sets, and the validation OOD
        set with the ID validation split where the benchmark names one."""
        res = self.resolution
        return (res.id_test, *res.ood_labels, *([res.validation, res.id_val] if res.validation else []))

    def fit_entry(self, method: Method, entries: dict[str, CachedSplit]) -> CachedSplit | SplitRows:
        """What ``method`` is fit on: the ID fit (or validation) entry, or the rows of it the benchmark's
        ``fit:`` subset names."""
        res = self.resolution
        return fit_rows(entries[res.id_val if method.fits_on == "val" else res.id_fit],
                        res.fit_subsets.get(method.name))

    def score_path(self, backbone: ResolvedBackbone, method: Method, fit_entry: CachedSplit | SplitRows,
                   data_key: str) -> Path:
        """Where the scores of ``method`` on the entry with ``data_key`` are cached: keyed by the method,
        all its parameters and its version (a plugin's source too), the fit entry and the scored
        entry. The one key of a score, however it was computed (``scores``, ``cache_sweep_scores``)."""
        code = {"code": method.code_key()} if method.code_key() else {}  # plugins: keyed by their source
        key = content_key("scores", method.name, {**method.get_params(), **code}, method.version,
                          fit_entry.data_key, data_key)
        return self.store.scores_path(backbone.key, method.name, key)

    def _keep_scores(self, path: Path, method: Method, backbone: ResolvedBackbone, label: str,
                     fit_entry: CachedSplit | SplitRows, entry: CachedSplit, scored: Scored) -> None:
        """Cache ``scored`` at ``path``; NaN or infinite scores are an error instead, never cached (a
        NaN score has no rank)."""
        bad = ~np.isfinite(scored.scores)
        if bad.any():
            raise NonFiniteOutputs(f"{method.label()} gave {bad.sum()} NaN or infinite scores of {len(bad)} on "
                                   f"{label} through {backbone.name} (first row {np.flatnonzero(bad)[0]})")
        self._cache_scores(path, {"scores": scored.scores, "predictions": scored.predictions},
                           {"kind": "scores", "method": method.name, "params": method.get_params(),
                            "backbone_name": backbone.name, "fit": fit_entry.data_key, "entry": entry.data_key,
                            "what": f"{method.label()} on {label}", "n": len(scored.scores)})

    def _cache_scores(self, path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Write a scores file. On a cache this process may read but not write (read-only file system,
        no permission) the scores are used all the same, uncached, and a warning says so once per
        process and cache; a full disk (or a file in the way) is the ``CacheWriteError`` it is."""
        try:
            write_h5_atomic(path, arrays, meta)
        except CacheWriteError as err:
            skip_read_only(err, f"scores in {self.store.root}",
                           f"scores are not cached: {err}. They are computed and used as usual, but not saved (to "
                           f"{path.parent} and the like), so the next run computes them again")

    def _derived(self, path: Path, backbone: ResolvedBackbone, method: Method, what: str, compute) -> CachedSplit:
        """The derived entry at ``path``: from the cache, else ``compute(network)`` through the network
        (``self.network``), else a ``CacheMissing`` naming the command that computes it."""
        try:
            found = self.store.open_entry(path)
            if found is not None:
                return found
        except CacheCorrupt as err:  # moved aside: computed again below
            log.warning("recomputing: %s", err)
        if self.network is None:
            raise CacheMissing(f"no cached {method.label()} {what} for {backbone.name}; run `oodbench run "
                               f"{self.resolution.benchmark} --methods {method_reference(type(method))}` "
                               "(it runs the network)")
        started = time.perf_counter()
        derived = compute(self.network())
        self.summary.add_time("network passes", time.perf_counter() - started)
        return derived

    def validation_entry(self, method: Method, entries: dict[str, CachedSplit] | None) -> CachedSplit | None:
        """The validation OOD entry (of ``entries``, the backbone's entries) for a network method tuned on
        it (``needs_validation_set``), else None."""
        if not getattr(method, "needs_validation_set", False):
            return None
        if self.resolution.validation is None:
            raise ValueError(f"{method.label()} is tuned on the benchmark's validation OOD set, and "
                             f"{self.resolution.benchmark} has none; name one under `validation:` in its file")
        return entries[self.resolution.validation]

    def output_key(self, backbone: ResolvedBackbone, method: Method, fit_entry: CachedSplit | None,
                   entries: dict[str, CachedSplit] | None = None) -> dict:
        """The key of a network method's outputs on any entry of ``backbone``."""
        return method.output_key(fit_entry, backbone.info.get("declared"), self.validation_entry(method, entries))

    def derived_entry(self, backbone: ResolvedBackbone, method: Method, label: str, entry: CachedSplit,
                      fit_entry: CachedSplit | None = None,
                      entries: dict[str, CachedSplit] | None = None) -> CachedSplit:
        """A network method's outputs on ``entry``'s images (``fit_entry``: where a method fitted through
        the network learned its state; it keys the outputs, with the validation entry it was tuned on)."""
        key = self.output_key(backbone, method, fit_entry, entries)
        return self._derived(entry.derived_path(method.name, key), backbone, method, f"network outputs on {label}",
                             lambda network: network.derive(backbone, method, label, key))

    def network_state(self, backbone: ResolvedBackbone, method: Method, fit_entry: CachedSplit,
                      entries: dict[str, CachedSplit] | None = None) -> CachedSplit:
        """What a network method learned through the network on the fit entry (and the validation OOD
        set, for one tuned on it)."""
        validation = self.validation_entry(method, entries)
        key = method.fit_key(backbone.info.get("declared"), validation)
        return self._derived(fit_entry.derived_path(f"{method.name}-fit", key), backbone, method,
                             f"fitted state on {self.resolution.id_fit}",
                             lambda network: network.derive_state(backbone, method, self.resolution.id_fit, key,
                                                                  self.resolution.validation if validation else None))

    def metric_rows(self, backbone: ResolvedBackbone, method_ref: MethodRef, scored: dict[str, Scored],
                    entries: dict[str, CachedSplit]) -> list[dict]:
        """One tidy row per OOD set (``tidy_metric_rows``)."""
        res = self.resolution
        return tidy_metric_rows(res.benchmark, backbone.name, backbone.seed,
                                method_label(method_ref.name, method_ref.params), res.convention,
                                res.ood_groups, scored[res.id_test], entries[res.id_test].labels,
                                {label: scored[label] for label in res.ood_groups}, res.fpr_rule)

    def evaluate(self, methods: tuple[MethodRef, ...] | None = None, compute_scores: bool = True,
                 plot: bool = True, grid: ScoringGrid | None = None, resamples: int = 0) -> pd.DataFrame:
        """Tidy metrics for every (seed, backbone, method, OOD set); with ``plot``, score histograms of
        the first seed per backbone; with ``resamples``, every cell's results on that many bootstrap
        resamples of the test sets in ``self.samples`` (``results.uncertainty.method_samples``).

        The (backbone, method) cells of cache-only methods run through joblib (``grid``: its backend
        and worker count; default one in-process worker); network methods run here, in this
        process, which owns the network (and the GPU). A method with NaN or infinite outputs is left
        out of its backbone with one line in the summary."""
        res, grid = self.resolution, grid or ScoringGrid()
        methods = methods or res.methods
        cells = [(b, m) for b in range(len(res.backbones)) for m in range(len(methods))]  # indices: refs hold dicts
        through_network = ["network" in make_method(m.name, **m.params).reads for m in methods]
        rest = [(b, m) for b, m in cells if not through_network[m]]
        started, run = time.perf_counter(), uuid.uuid4().hex
        results = dict(zip(rest, grid.run(score_cell_in_worker, [
            (run, res, self.store.root, res.backbones[b], methods[m], compute_scores, resamples) for b, m in rest])))
        if rest and grid.jobs != 1:
            self.summary.add_time(f"score grid ({grid.backend}, {grid.jobs} jobs)", time.perf_counter() - started)
        # then the network methods, in this process: the costly passes come after every cheap check
        results.update({(b, m): self.score_cell(res.backbones[b], methods[m], compute_scores, resamples)
                        for b, m in cells if through_network[m]})
        rows = []
        for b, backbone in enumerate(res.backbones):
            histograms = {}
            for m in range(len(methods)):
                result = results[b, m]
                for stage, seconds in result.timings.items():
                    self.summary.add_time(stage, seconds)
                if result.left_out:
                    self.summary.lines.append(result.left_out)
                    log.warning(result.left_out)
                    continue
                rows += result.rows
                if result.samples is not None:
                    self.samples[backbone.name, backbone.seed, result.rows[-1]["method"]] = result.samples
                if backbone.seed == res.seeds[0]:
                    histograms[result.rows[-1]["method"]] = result.histogram
            if plot and histograms:
                from results.plots import plot_score_histograms  # matplotlib is slow to import; only runs plot

                path = self.out_dir(backbone.name) / "score_histograms.png"
                self.summary.outputs.append(plot_score_histograms(
                    histograms, path, title=f"{res.benchmark} / {backbone.name} (seed {backbone.seed})"))
            self.summary.lines.append(backbone.line())
        frame = pd.DataFrame(rows)
        frame.attrs["convention"] = res.convention
        return frame

    def score_cell(self, backbone: ResolvedBackbone, method_ref: MethodRef, compute_scores: bool,
                   resamples: int = 0) -> CellResult:
        """One (backbone, method) cell of the grid: its metric rows, score histogram and (with
        ``resamples``) resampled results, or the line saying why it was left out; with the time it
        took per stage."""
        summary, self.summary = self.summary, RunSummary()
        try:
            entries = self.current_entries(backbone)
            try:
                scored = self.scores(backbone, method_ref, entries, compute=compute_scores)
            except (NonFiniteOutputs, MethodFailed, UndeclaredRead) as err:  # one method failing leaves the rest
                label = method_label(method_ref.name, method_ref.params)
                return CellResult([], {}, f"left out {label} on {backbone.name} seed {backbone.seed}: {err}",
                                  self.summary.timings)
            res = self.resolution
            histogram = {"ID": scored[res.id_test].scores, **{k: scored[k].scores for k in res.ood_labels}}
            samples = self.resampled(backbone, method_ref, scored, entries, resamples) if resamples else None
            return CellResult(self.metric_rows(backbone, method_ref, scored, entries), histogram, None,
                              self.summary.timings, samples)
        finally:
            self.summary = summary

    def resampled(self, backbone: ResolvedBackbone, method_ref: MethodRef, scored: dict[str, Scored],
                  entries: dict[str, CachedSplit], resamples: int) -> MethodSamples:
        """One cell's results on ``resamples`` bootstrap resamples of the test sets
        (``results.uncertainty.method_samples``), cached beside its scores: keyed by the content of
        the ID test and OOD scores and of the ID predictions' correctness, the set names, the
        resample count, the convention and FPR rule, and the code that computes them."""
        started = time.perf_counter()
        res = self.resolution
        method = make_method(method_ref.name, **method_ref.params)
        id_scores = scored[res.id_test].scores
        correct = scored[res.id_test].predictions == entries[res.id_test].labels
        ood = {label: scored[label].scores for label in res.ood_labels}
        contents = [(str(a.dtype), hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest())
                    for a in (id_scores, correct, *ood.values())]
        key = content_key("intervals", contents, res.id_test, list(ood), resamples, res.convention, res.fpr_rule,
                          CODE_DIGEST)
        path = self.store.scores_path(backbone.key, f"{method.name}-intervals", key)
        try:
            if path.exists():
                arrays = {name: read_verified(path, name) for name in ("replicates", "accuracy", "v10", "v01")}
                samples = MethodSamples.from_arrays(arrays, {label: len(s) for label, s in ood.items()})
                self.summary.add_time("intervals", time.perf_counter() - started)
                return samples
        except CacheCorrupt as err:
            log.warning("recomputing intervals: %s", err)
        samples = method_samples(id_scores, correct, ood, res.id_test, resamples, res.convention, res.fpr_rule)
        self._cache_scores(path, samples.arrays(), {"kind": "intervals", "method": method.name,
                                                    "backbone_name": backbone.name, "resamples": resamples,
                                                    "what": f"{method.label()} on {resamples} resamples"})
        self.summary.add_time("intervals", time.perf_counter() - started)
        return samples

    def sweep(self, method: str, points: list[dict], criterion: str = "auroc",
              grid: ScoringGrid | None = None) -> pd.DataFrame:
        """Every parameter setting of ``method`` scored from the cache, selected on the validation OOD set.

        One row per (backbone, seed, setting): the parameters (``param_<name>``, apart from the
        backbone's ``seed``), the validation ``criterion`` (ID test
        vs the validation OOD set) and the test results (mean over the test OOD sets, and per group
        where the benchmark groups them). Per (backbone, seed), ``selected`` marks the setting with
        the best validation value, the first in grid order on ties. The test sets play no part in
        the choice. The (backbone, setting) points run through joblib (``grid``, as ``evaluate``'s
        cache-only cells): a sweep reads the cache only, network methods' derived entries included.
        Settings one computation serves (``sweep_groups``: KNN's k) are scored together first, one
        (backbone, group) per grid task, into the score cache where the rows then find them.
        """
        res, grid = self.resolution, grid or ScoringGrid()
        if criterion not in METRICS:
            raise ValueError(f"unknown selection criterion {criterion!r}; choose one of {', '.join(METRICS)}")
        if res.validation is None:
            reason = next((line for line in res.skipped if line.startswith("skipped validation")), None)
            raise ValueError(f"benchmark {res.benchmark} has no validation OOD set to select on"
                             + (f" ({reason})" if reason else "; name one under `validation:` in its file"))
        started, run = time.perf_counter(), uuid.uuid4().hex
        shared = [(run, res, self.store.root, backbone, method, group)
                  for backbone in res.backbones for group in sweep_groups(method, points)]
        if shared:
            grid.run(cache_sweep_scores_in_worker, shared)
        rows = grid.run(sweep_row_in_worker, [
            (run, res, self.store.root, backbone, MethodRef(method, params), criterion)
            for backbone in res.backbones for params in points])
        if grid.jobs != 1:
            self.summary.add_time(f"sweep grid ({grid.backend}, {grid.jobs} jobs)", time.perf_counter() - started)
        for first in range(0, len(rows), len(points)):  # per backbone and seed: its settings in grid order
            values = [row[f"val_{criterion}"] for row in rows[first:first + len(points)]]
            best = first + int(np.argmin(values) if criterion in LOWER_IS_BETTER else np.argmax(values))
            for i in range(first, first + len(points)):
                rows[i]["selected"] = i == best
        frame = pd.DataFrame(rows)
        frame.attrs.update(convention=res.convention, validation=res.validation, criterion=criterion)
        return frame

    def cache_sweep_scores(self, backbone: ResolvedBackbone, name: str, points: list[dict]) -> None:
        """Cache the scores of sweep settings of method ``name`` that differ only in its ``sweep_axis``
        from one computation: one fresh instance, fit with the largest value of the axis, scores every
        setting on each entry (its ``score_samples_sweep``). Each setting's scores go where ``scores``
        looks for them (``score_path``: that setting's own parameters, the method's version, the fit
        entry and the scored entry), so no setting's scores are ever found under another's key.
        Settings already cached are not scored again."""
        methods = [make_method(name, **params) for params in points]
        axis = methods[0].sweep_axis
        widest = max(methods, key=lambda method: getattr(method, axis))
        entries = self.current_entries(backbone)
        fit_entry = self.fit_entry(widest, entries)
        started = time.perf_counter()
        fitted: Method | None = None
        for label in self.score_labels():
            entry = entries[label]
            paths = [self.score_path(backbone, method, fit_entry, entry.data_key) for method in methods]
            missing = [(method, path) for method, path in zip(methods, paths) if not path.exists()]
            if not missing:
                continue
            if fitted is None:
                with blamed_on(widest, f"fit on {self.resolution.id_fit}"):
                    fitted = widest.fit(SplitView(fit_entry, widest, fitting=True))
            view = SplitView(entry, fitted)
            with blamed_on(fitted, f"score_samples_sweep/predict on {label}"):
                swept = fitted.score_samples_sweep(view, [getattr(method, axis) for method, _ in missing])
                predictions = fitted.predict(view)
            for (method, path), scores in zip(missing, swept):
                scored = Scored(*checked_outputs(method, entry, scores, predictions))
                self._keep_scores(path, method, backbone, label, fit_entry, entry, scored)
        self.summary.add_time("score", time.perf_counter() - started)

    def sweep_row(self, backbone: ResolvedBackbone, method_ref: MethodRef, criterion: str) -> dict:
        """One setting of a sweep on one backbone: its parameters, the validation ``criterion`` and
        the test results (mean over the test OOD sets, and per group)."""
        res = self.resolution
        entries = self.current_entries(backbone)
        scored = self.scores(backbone, method_ref, entries)
        validation = ood_metrics(scored[res.id_val].scores, scored[res.validation].scores, convention=res.convention,
                                 fpr_rule=res.fpr_rule)
        test = pd.DataFrame(self.metric_rows(backbone, method_ref, scored, entries))
        row = {"backbone": backbone.name, "seed": backbone.seed, "method": test["method"].iloc[0],
               **{f"param_{k}": v for k, v in make_method(method_ref.name, **method_ref.params).get_params().items()},
               f"val_{criterion}": validation[criterion]}
        for metric in ("fpr95", "auroc"):
            row[f"test_{metric}"] = test[metric].mean()
            for group, values in test[test["group"] != ""].groupby("group", sort=False):
                row[f"{group}_{metric}"] = values[metric].mean()
        return row

    def out_dir(self, backbone_name: str | None = None) -> Path:
        path = self.out_root / self.resolution.benchmark
        return path / backbone_name if backbone_name else path

    def write_leaderboards(self, metrics: pd.DataFrame, level: float = DEFAULT_LEVEL) -> dict[str, Leaderboard]:
        """One leaderboard per backbone (CSV, LaTeX, Markdown), the tidy metrics CSV and a report;
        with the ``level`` intervals and the tests against the best where ``evaluate`` resampled."""
        boards, sections = {}, []
        out = self.out_dir()
        out.mkdir(parents=True, exist_ok=True)
        tidy = out / "metrics.csv"
        metrics.to_csv(tidy, index=False)
        self.summary.outputs.append(tidy)
        for name, frame in metrics.groupby("backbone", sort=False):
            frame = frame.copy()
            frame.attrs["convention"] = self.resolution.convention
            board = self.leaderboard(frame, frame, level)
            folder = self.out_dir(name)
            boards[name] = board
            sections.append((name, self._export(board, folder)))
        comparison = self.finetuning_comparison(metrics)
        if comparison is not None:
            board = self.leaderboard(comparison, metrics, level)
            sections.append(("Fine-tuned backbones beside their base", self._export(board, out / "finetuning")))
            boards["finetuning"] = board
        sections += self._write_reproductions(boards)
        self.summary.outputs.append(self._write_report(sections))
        return boards

    def leaderboard(self, frame: pd.DataFrame, original: pd.DataFrame, level: float) -> Leaderboard:
        """``build_leaderboard(frame)``, with the resampled results of its rows where ``evaluate``
        made them: the row of ``original`` with the same index names the (backbone, seed, method)
        a row of ``frame`` comes from (the fine-tuning comparison renames its methods)."""
        if not self.samples:
            return build_leaderboard(frame)
        started = time.perf_counter()
        samples = {(row.method, row.seed): self.samples[source.backbone, source.seed, source.method]
                   for row, source in zip(frame.itertuples(), original.loc[frame.index].itertuples())}
        board = build_leaderboard(frame, samples, level)
        self.summary.add_time("intervals", time.perf_counter() - started)
        return board

    def _write_reproductions(self, boards: dict[str, Leaderboard]) -> list[tuple[str, Path]]:
        """Every published table of this benchmark (``results.reproduction``) that one of the
        run's backbones answers, beside the paper, in ``<out>/reproduction/``."""
        sections = []
        for table in load_published(method_label):
            if table.benchmark != self.resolution.benchmark or not {r.backbone for r in table.rows} & set(boards):
                continue
            paths = write_reproduction(table, reproduction_frame(table, boards), self.out_dir() / "reproduction")
            self.summary.outputs += paths
            sections.append((f"Beside the paper: {table.source}", paths[-1]))
        return sections

    def _export(self, board: Leaderboard, folder: Path) -> Path:
        """CSV, LaTeX and Markdown of ``board`` in ``folder``, and its tests against the best of each
        column (``comparisons.csv``) where it has them; returns the Markdown file."""
        markdown = board.to_markdown(folder / "leaderboard.md")
        self.summary.outputs += [board.to_csv(folder / "leaderboard.csv"), board.to_latex(folder / "leaderboard.tex"),
                                 markdown]
        if board.level is not None:
            board.comparisons.to_csv(folder / "comparisons.csv", index=False)
            self.summary.outputs.append(folder / "comparisons.csv")
        return markdown

    def finetuning_comparison(self, metrics: pd.DataFrame) -> pd.DataFrame | None:
        """The metrics of every base backbone and the backbones fine-tuned from it in one table, each
        method of a fine-tuned backbone named '<method> [<fine-tuning>]' (e.g. 'energy [UM]'), so
        'energy', 'energy [UM]' and 'energy [UMAP]' sit side by side with their ID accuracy. None
        when the benchmark fine-tunes nothing."""
        derived = {b.name: b.info for b in self.resolution.backbones if b.info.get("finetune")}
        if not derived:
            return None
        bases = {info["base"] for info in derived.values()}
        frame = metrics[metrics["backbone"].isin(bases | set(derived))].copy()
        several = len(bases) > 1

        def label(row):
            info = derived.get(row["backbone"])
            base = info["base"] if info else row["backbone"]
            name = f"{row['method']} [{info['finetune']}]" if info else row["method"]
            return f"{base}: {name}" if several else name
        frame["method"] = frame.apply(label, axis=1)
        frame["backbone"] = ", ".join(sorted(bases))
        frame.attrs["convention"] = self.resolution.convention
        return frame

    def _write_report(self, sections: list[tuple[str, Path]]) -> Path:
        res = self.resolution
        lines = [f"# {res.benchmark}", "", res.description, "",
                 f"Seeds: {', '.join(map(str, res.seeds))}. Convention: {res.convention}"
                 + (f", FPR@95 by the {res.fpr_rule} rule" if res.fpr_rule != "canonical" else "") + ".", ""]
        lines += [f"- {line}" for line in self.summary.lines + res.skipped]
        for title, markdown in sections:
            lines += ["", f"## {title}", "", markdown.read_text()]
        path = self.out_dir() / "report.md"
        path.write_text("\n".join(lines) + "\n")
        return path
