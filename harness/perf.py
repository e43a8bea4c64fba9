"""Throughput benchmark (``make perf`` / ``python -m harness.perf``): measured figures, not timed tests.

The parts (``--parts``, all by default), printed and written as JSON:

1. ``extraction``: extraction vs a bare forward pass - the same backbone over the same images,
   once as the minimal loop a user would write (preprocess + forward, outputs discarded) and once
   as ``extract()`` into an empty store (hooks, chunk files, HDF5 assembly with checksums); and
   energy from the cached entry vs running the network again for the logits. The backbone is the
   default benchmark's architecture with seeded random weights (throughput does not depend on
   the weights); the images are the Fashion-MNIST test set, else seeded noise of that shape.
2. ``network``: each network method (ASH at the backbone's inner shaping layer, hooked and from
   cached activations; ODIN; GradNorm by autograd; the Mahalanobis ensemble) computing its derived
   entry, against one plain extraction pass.
3. ``scale``: every registered method on an ImageNet-shaped synthetic cache (2048-d features,
   1000 classes; fit split 100,000; ID test 50,000; four OOD sets of 10,000): fit time, time to
   score the 90,000 test samples, and peak resident memory, each method in a fresh process
   reading the cache files as ``oodbench score`` does.
4. ``reinference``: the default benchmark (fashion-mnist), every registered method evaluated
   (fit, score, metrics) from the warm cache vs the same evaluation where each method re-runs
   the network over the data it needs, as OpenOOD does.
5. ``pytorch-ood``: pytorch-ood 0.4.0 against the harness on the same network, data and ten methods,
   cold (its fit + predict per detector vs extraction into an empty cache plus scoring) and
   re-scoring one method (``harness.perf_pytorch_ood``).
6. ``intervals``: the bootstrap intervals and tests of the leaderboards (``results.uncertainty``)
   from the warm cache: ``oodbench leaderboard`` without them, computing them, and reading them
   back from the cache, for the default leaderboard (the first backbone) and for all of them.
7. ``knn``: KNN's faiss search against the float32 GEMM floor of the same products: on the
   benchmark's warm cache (k = 50, and the registry's sweep over k from one search), and at
   ImageNet shape (the ``scale`` part's synthetic cache, ``--scale-fraction``; k = 1000) exact and
   approximate (IVF), with the approximate search's AUROC and FPR@95 against exact.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from extract.store import CachedSplit, FeatureStore, content_key, write_h5_atomic
from methods import CACHE_ONLY_METHODS, Method, make_method
from results.metrics import accuracy, ood_metrics

PARTS = ("extraction", "network", "scale", "reinference", "pytorch-ood", "intervals", "knn")


def interleaved_best(repeats: int, **functions) -> dict[str, float]:
    """Smallest wall time of each function over ``repeats`` rounds, after one warm-up call each.

    Calls alternate between the functions within a round, so slow phases of a noisy machine
    hit all of them alike; the minimum is the run least disturbed by other work.
    """
    for function in functions.values():
        function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - started)
    return {name: min(values) for name, values in times.items()}


# ---------------------------------------------------------------- 1. extraction vs a bare forward pass

def perf_backbone_and_images(n: int):
    """The default benchmark's architecture with seeded random weights (throughput does not depend
    on the weights) and ``n`` Fashion-MNIST test images, else seeded noise of that shape with seeded
    class labels (the Mahalanobis ensemble's fit needs classes; an OOD set's labels are -1)."""
    import torch

    from extract.backbones import get_backbone_spec, registered_backbone
    from extract.datasets import DatasetUnavailable, ImageSet, load_dataset

    torch.manual_seed(0)
    spec = get_backbone_spec("cnn28")
    backbone = registered_backbone(spec, spec.build(num_classes=10).state_dict(), "cnn28-random", 10)
    try:
        images = load_dataset("fashion-mnist", "test")
    except DatasetUnavailable:
        noise = load_dataset("gaussian", n=n)
        images = ImageSet(noise.name, noise.split, noise.images, np.random.default_rng(0).integers(0, 10, n),
                          noise.source)
    return backbone, ImageSet(images.name, images.split, images.images[:n], images.labels[:n], images.source)


def measure_extraction(n: int, batch_size: int, device: str, repeats: int) -> dict:
    import torch

    from extract.extraction import extract, precision, resolve_device

    backbone, images = perf_backbone_and_images(n)
    torch_device = resolve_device(device)
    model = backbone.model.to(torch_device).eval()

    @torch.no_grad()
    def bare_forward():  # in the arithmetic extraction uses (IEEE float32, no TF32 on CUDA)
        with precision(torch_device, amp=False):
            for start in range(0, len(images), batch_size):
                model(backbone.preprocessing(images.images[start:start + batch_size]).to(torch_device))

    def extraction():
        with tempfile.TemporaryDirectory() as root:
            extract(backbone, images, FeatureStore(root), batch_size=batch_size, device=device, progress=False)

    energy = make_method("energy")

    @torch.no_grad()
    def reinference():
        with precision(torch_device, amp=False):
            logits = [model(backbone.preprocessing(images.images[s:s + batch_size]).to(torch_device)).cpu().numpy()
                      for s in range(0, len(images), batch_size)]
        energy.score_samples(SimpleNamespace(logits=np.concatenate(logits)))

    with tempfile.TemporaryDirectory() as root:
        path = extract(backbone, images, FeatureStore(root), batch_size=batch_size, device=device,
                       progress=False).path
        best = interleaved_best(repeats, bare=bare_forward, extraction=extraction, rerun=reinference,
                                cache=lambda: energy.score_samples(CachedSplit(path)))
    bare, extracted, rerun, from_cache = best["bare"], best["extraction"], best["rerun"], best["cache"]
    result = {
        "images": len(images), "dataset": images.name, "batch_size": batch_size, "device": str(torch_device),
        "threads": torch.get_num_threads(), "repeats": repeats,
        "bare_forward_img_per_s": len(images) / bare, "extraction_img_per_s": len(images) / extracted,
        "extraction_over_bare_forward": extracted / bare,
        "score_from_cache_s": from_cache, "score_by_reinference_s": rerun,
        "reinference_over_cache_scoring": rerun / from_cache,
    }
    print(f"{result['images']} {result['dataset']} images, batch {batch_size}, {result['device']} "
          f"({result['threads']} threads), best of {repeats}")
    print(f"  bare forward pass     : {result['bare_forward_img_per_s']:9.0f} img/s")
    print(f"  extraction            : {result['extraction_img_per_s']:9.0f} img/s "
          f"({result['extraction_over_bare_forward']:.2f}x the bare forward time)")
    print(f"  energy from the cache : {from_cache * 1e3:9.1f} ms")
    print(f"  energy by re-inference: {rerun * 1e3:9.1f} ms ({result['reinference_over_cache_scoring']:.0f}x)")
    return result


# ---------------------------------------------------------------- network methods vs a plain extraction pass

def measure_network(n: int, batch_size: int, device: str, repeats: int) -> dict:
    """Each network method's pass (computing and writing its derived entry) against one plain
    extraction pass over the same images: ASH at the backbone's inner shaping layer by a full
    hooked forward pass and by the tail from cached activations, ODIN, GradNorm by autograd, and
    the Mahalanobis ensemble's scoring pass (its fit, once per fit split, is not timed)."""
    from extract.extraction import extract
    from extract.network import derive, derive_state

    backbone, images = perf_backbone_and_images(n)
    options = {"batch_size": batch_size, "device": device, "progress": False}
    with tempfile.TemporaryDirectory() as root:
        store = FeatureStore(root)
        plain = extract(backbone, images, store, **options)
        layered = extract(backbone, images, store, layers=(backbone.shaping_layer,), **options)

        def extraction():
            with tempfile.TemporaryDirectory() as fresh:
                extract(backbone, images, FeatureStore(fresh), **options)

        def derived(method, entry):
            key = method.output_key(plain)

            def run():
                entry.derived_path(method.name, key).unlink(missing_ok=True)
                derive(method, backbone, images, entry, store, key=key, **options)
            return run

        ash = make_method("ash_layer")
        ensemble = make_method("mahalanobis_ens")  # fitted (untimed) on the same images, scored per entry
        ensemble.load_state(derive_state(ensemble, backbone, images, plain, store, batch_size=batch_size,
                                         device=device))
        runs = {f"{ash.label()} at {backbone.shaping_layer}, hooked pass": derived(ash, plain),
                f"{ash.label()} from cached activations": derived(ash, layered),
                "odin (forward, input gradient, forward)": derived(make_method("odin"), plain),
                "gradnorm_autograd (per-sample autograd)": derived(make_method("gradnorm_autograd"), plain),
                f"mahalanobis_ens ({len(backbone.layers)} layers, input noise each)": derived(ensemble, plain)}
        best = interleaved_best(repeats, extraction=extraction, **runs)
    result = {"images": len(images), "dataset": images.name, "batch_size": batch_size, "repeats": repeats,
              "layer": backbone.shaping_layer, "extraction_s": best["extraction"],
              "methods": [{"method": name, "seconds": best[name], "over_extraction": best[name] / best["extraction"]}
                          for name in runs]}
    print(f"{len(images)} {images.name} images, batch {batch_size}, best of {repeats}; ratios to one extraction pass")
    print(f"  {'extraction (plain pass)':42s}: {best['extraction']:7.2f} s")
    for row in result["methods"]:
        print(f"  {row['method']:42s}: {row['seconds']:7.2f} s ({row['over_extraction']:.2f}x)")
    return result


# ---------------------------------------------------------------- 2. every method at ImageNet scale

IMAGENET_SHAPE = {"features": 2048, "classes": 1000, "fit": 100_000, "id_test": 50_000, "ood": (10_000,) * 4}
# knn at ImageNet scale runs with the KNN paper's ImageNet settings instead of the registry
# default (k = 50, CIFAR): k = 1000 on the whole bank, and k = 10 on a 1% bank
SCALE_KNN_SETTINGS = ({"k": 1000}, {"k": 10, "fit_fraction": 0.01})


def scaled_shape(fraction: float) -> dict:
    """IMAGENET_SHAPE with every sample count multiplied by ``fraction`` (1 = the full size)."""
    def count(n):
        return max(IMAGENET_SHAPE["classes"], int(round(n * fraction)))
    return {**IMAGENET_SHAPE, "fit": count(IMAGENET_SHAPE["fit"]), "id_test": count(IMAGENET_SHAPE["id_test"]),
            "ood": tuple(count(n) for n in IMAGENET_SHAPE["ood"])}


def write_synthetic_cache(root: Path, shape: dict, seed: int = 0) -> tuple[Path, list[Path]]:
    """An ImageNet-shaped cache in the store's format: a head, a fit entry and the test entries.

    Features are post-ReLU-like, relu(centre_y - 0.5 + noise) with one random non-negative centre
    per class (every class in the fit split); OOD rows mix two class centres with more noise.
    Logits are W v + b with a random head, as an extraction would store them. Returns the fit
    entry and the test entries (ID test first).
    """
    rng = np.random.default_rng(seed)
    n_features, n_classes = shape["features"], shape["classes"]
    weight = rng.standard_normal((n_classes, n_features), dtype=np.float32) / np.float32(np.sqrt(n_features))
    bias = rng.standard_normal(n_classes, dtype=np.float32) * np.float32(0.1)
    centres = np.abs(rng.standard_normal((n_classes, n_features), dtype=np.float32))
    store = FeatureStore(root)
    key = "synthetic-imagenet"
    write_h5_atomic(store.head_path(key), {"W": weight, "b": bias}, {"kind": "head", "backbone": {"name": key}})

    def entry(name: str, n: int, ood: bool) -> Path:
        labels = rng.permutation(np.arange(n) % n_classes)
        features = np.empty((n, n_features), dtype=np.float32)
        for start in range(0, n, 10_000):
            rows = labels[start:start + 10_000]
            mean = (centres[rows] + centres[rng.permutation(rows)]) / 2 if ood else centres[rows]
            noise = rng.standard_normal(mean.shape, dtype=np.float32) * np.float32(1.5 if ood else 1.0)
            features[start:start + 10_000] = np.maximum(mean - 0.5 + noise, 0.0)
        data_key = content_key("synthetic", name, n, seed)
        meta = {"kind": "features", "dataset": name, "split": "test", "data_key": data_key, "layers": [],
                "n": n, "num_classes": n_classes, "feature_dim": n_features, "what": f"synthetic {name}"}
        return write_h5_atomic(store.entry_path(key, name, "test", data_key),
                               {"logits": features @ weight.T + bias, "features": features,
                                "labels": labels.astype(np.int64)}, meta)

    fit = entry("id-fit", shape["fit"], ood=False)
    tests = [entry("id-test", shape["id_test"], ood=False)]
    tests += [entry(f"ood-{i}", n, ood=True) for i, n in enumerate(shape["ood"])]
    return fit, tests


PROC_STATUS, PROC_CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")
MEMORY_BUDGET = 8 * 2 ** 30  # the peak-memory target, touched once before timing


def peak_resident_bytes() -> int:
    """This process's peak resident memory since the last ``reset_peak_resident``: VmHWM from
    /proc/self/status (Linux), else ru_maxrss (the peak of the process's whole life)."""
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux and the BSDs


def reset_peak_resident() -> bool:
    """Reset VmHWM to the current resident size (Linux >= 4.0: '5' to /proc/self/clear_refs)."""
    try:
        PROC_CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def touch_memory(n_bytes: int) -> float:
    """Allocate, write and free ``n_bytes``; returns the seconds it took.

    A virtual machine may back its memory lazily (this project's development VM does: the first
    write to a page it has not used costs about 4 s per GiB, later writes about 0.15 s per GiB).
    Touching the budget once before timing keeps that one-off cost out of the method figures,
    which otherwise depend on which method happens to run first.
    """
    started = time.perf_counter()
    block = np.ones(n_bytes // 8)
    del block
    return time.perf_counter() - started


def time_method(name: str, params: dict, fit_path: Path, test_paths: list[Path]) -> dict:
    """Fit one method on the fit entry, then score (and predict) every test entry, both read from
    the cache files as ``oodbench score`` does; with the peak resident memory in between."""
    method = make_method(name, **params)
    reset_peak_resident()
    started = time.perf_counter()
    method.fit(CachedSplit(fit_path))
    fitted = time.perf_counter()
    for path in test_paths:
        method.score_and_predict(CachedSplit(path))
    scored = time.perf_counter()
    return {"method": method.label(), "fit_s": fitted - started, "score_s": scored - fitted,
            "peak_rss_bytes": peak_resident_bytes()}


def scale_methods() -> list[tuple[str, dict]]:
    """Every cache-only method with its defaults, knn with its ImageNet settings (the network
    methods' cost is the ``network`` part)."""
    return [(name, params) for name in CACHE_ONLY_METHODS
            for params in (SCALE_KNN_SETTINGS if name == "knn" else ({},))]


def scale_worker(methods: list[tuple[str, dict]], fit_path: Path, test_paths: list[Path],
                 touch_bytes: int) -> dict:
    """The methods one after another in this (fresh, torch-free) process, after touching memory."""
    touched = touch_memory(touch_bytes)
    print(f"  (touched {touch_bytes / 2 ** 30:.0f} GiB of memory first: {touched:.1f} s)", flush=True)
    resettable = reset_peak_resident()  # else each peak is the process's whole-life peak
    rows = []
    for name, params in methods:
        row = time_method(name, params, fit_path, test_paths)
        print(f"  {row['method']:30s} fit {row['fit_s']:7.2f} s   score {row['score_s']:7.2f} s   "
              f"peak {row['peak_rss_bytes'] / 2 ** 30:5.2f} GiB", flush=True)
        rows.append(row)
    return {"methods": rows, "touch_s": touched, "peak_reset": resettable}


def measure_scale(shape: dict, workdir: Path | None, touch_bytes: int = MEMORY_BUDGET) -> dict:
    with tempfile.TemporaryDirectory(dir=workdir) as root:
        started = time.perf_counter()
        fit_path, test_paths = write_synthetic_cache(Path(root), shape)
        built = time.perf_counter() - started
        n_test = shape["id_test"] + sum(shape["ood"])
        print(f"synthetic cache: {shape['features']}-d features, {shape['classes']} classes, fit {shape['fit']}, "
              f"{n_test} test samples (built in {built:.0f} s)", flush=True)
        # a fresh interpreter that never imports torch, as `oodbench score` runs
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            worker = pool.apply(scale_worker, (scale_methods(), fit_path, test_paths, touch_bytes))
    return {"shape": {**shape, "ood": list(shape["ood"])}, "test_samples": n_test, "cache_build_s": built,
            **worker}


# ---------------------------------------------------------------- 3. warm cache vs re-inference per method

def evaluate_method(name: str, split, fit_label: str, test_label: str, ood_labels: list[str]) -> dict[str, float]:
    """What a leaderboard row costs: fit (methods with state only), score and predict the ID test
    split, score every OOD split, compute the metrics. ``split(label)`` supplies the arrays.
    Returns the ID accuracy and every OOD set's AUROC and FPR@95."""
    method = make_method(name)
    if type(method).fit is not Method.fit:
        method.fit(split(fit_label))
    test = split(test_label)
    id_scores, predictions = method.score_and_predict(test)
    values = {"id_acc": accuracy(predictions, test.labels)}
    for label in ood_labels:
        metrics = ood_metrics(id_scores, method.score_samples(split(label)))
        values.update({f"{label}/auroc": metrics["auroc"], f"{label}/fpr95": metrics["fpr95"]})
    return values


def measure_reinference(benchmark_name: str, options) -> dict:
    from extract.extraction import forward_rows, resolve_device
    from harness.config import load_benchmark
    from harness.pipeline import BenchmarkRun

    benchmark = load_benchmark(benchmark_name)
    run = BenchmarkRun(benchmark, options)
    resolution = run.resolve(compute=True)  # trains and extracts first when the cache is cold
    resolved = resolution.backbones[0]
    config = next(c for c in benchmark.backbones if c.name == resolved.name)
    backbone = run.backbone(config, resolved.seed)
    head = backbone.head_parameters()
    sets = run.datasets()
    device = resolve_device(options.device)
    labels = (resolution.id_fit, resolution.id_test, *resolution.ood_labels)

    def cached(label):
        return CachedSplit(run.store.root / resolved.entries[label])

    def rerun(label):  # the network again, as OpenOOD runs it for every method
        images = sets[label][1]
        outputs = forward_rows(backbone, images.images, (), benchmark.batch_size, device)
        return SimpleNamespace(logits=outputs["logits"], features=outputs["features"], labels=images.labels,
                               head=head, name=f"{images.name}/{images.split}")

    rows = []
    for name in CACHE_ONLY_METHODS:  # network methods re-run the network either way (``network`` part)
        times, values = {}, {}
        for source, split in (("cache", cached), ("rerun", rerun)):
            started = time.perf_counter()
            values[source] = evaluate_method(name, split, resolution.id_fit, resolution.id_test,
                                             list(resolution.ood_labels))
            times[source] = time.perf_counter() - started
        # the two paths must compute the same table, or the comparison would be meaningless
        difference = max(abs(values["cache"][k] - values["rerun"][k]) for k in values["cache"])
        rows.append({"method": name, "cache_s": times["cache"], "reinference_s": times["rerun"],
                     "max_metric_difference": difference})
        print(f"  {name:22s} cache {times['cache']:7.2f} s   re-inference {times['rerun']:7.2f} s", flush=True)
    cache_total = sum(r["cache_s"] for r in rows)
    rerun_total = sum(r["reinference_s"] for r in rows)
    print(f"  every method: cache {cache_total:.1f} s, re-inference {rerun_total:.1f} s "
          f"({rerun_total / cache_total:.0f}x)")
    return {"benchmark": benchmark_name, "backbone": resolved.name, "sets": list(labels),
            "images": {label: len(sets[label][1]) for label in labels}, "methods": rows,
            "cache_total_s": cache_total, "reinference_total_s": rerun_total,
            "reinference_over_cache": rerun_total / cache_total}


# ---------------------------------------------------------------- 6. intervals and tests of the leaderboards

def measure_intervals(benchmark_name: str, options) -> dict:
    """What the intervals and tests add to re-rendering a benchmark's leaderboards from the warm
    cache (``oodbench leaderboard``: cached scores read, leaderboards written), for its first
    backbone's leaderboard (the default one) and for all of them: that stage without them, with
    them computed (a first run: the cached resampled results of those backbones are removed
    first) and with them read back from the cache (every later run), in wall and CPU seconds (the
    wall time of a shared machine follows its load), with the run's own 'intervals' stage."""
    import dataclasses

    from harness.api import Bench
    from harness.evaluation import Evaluation

    bench = Bench(benchmark_name, cache_dir=options.cache_dir, out_dir=options.out_dir, data_root=options.data_root,
                  progress=False)
    intervals, resolution = bench.intervals, bench.resolve(compute=False)
    bench.evaluation(compute=False).evaluate(plot=False)  # scores what the cache lacks, untimed
    store = FeatureStore(options.cache_dir)
    result = {"benchmark": benchmark_name, "level": intervals.level, "resamples": intervals.resamples}
    for scope, backbones in (("default", resolution.backbones[:1]), ("every", resolution.backbones)):
        for backbone in backbones:
            for path in (store.root / backbone.key / "scores").glob("*-intervals.*.h5"):
                path.unlink()
        figures = {}
        for run, resamples in (("without", 0), ("computed", intervals.resamples), ("cached", intervals.resamples)):
            with tempfile.TemporaryDirectory() as out:
                evaluation = Evaluation(dataclasses.replace(resolution, backbones=backbones), store, Path(out))
                wall, cpu = time.perf_counter(), time.process_time()
                metrics = evaluation.evaluate(compute_scores=False, plot=False, resamples=resamples)
                evaluation.write_leaderboards(metrics, intervals.level)
                figures[run] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                                "intervals_stage_s": evaluation.summary.timings.get("intervals", 0.0)}
        names = [b.name for b in backbones]
        cells = len(backbones) * len(resolution.methods) * len(resolution.ood_labels)
        result[scope] = {"backbones": names, "cells": cells, **figures}
        for run in ("computed", "cached"):
            added = {unit: figures[run][unit] - figures["without"][unit] for unit in ("wall_s", "cpu_s")}
            result[scope][f"added_{run}"] = added
            print(f"  {scope} leaderboard ({', '.join(names)}; {cells} cells x {intervals.resamples} resamples), "
                  f"intervals and tests {run}: their stage {figures[run]['intervals_stage_s']:.1f} s; the leaderboard "
                  f"stage {added['wall_s']:+.1f} s wall, {added['cpu_s']:+.1f} s CPU", flush=True)
    return result


# ---------------------------------------------------------------- 7. KNN's search against the float32 GEMM floor

def gemm_floor_seconds(bank: np.ndarray, queries: list[np.ndarray]) -> float:
    """Seconds numpy's BLAS takes for the float32 products of every query row with every bank row, in
    faiss's tiles (4,096 queries by 1,024 bank rows), results discarded: what an exact search
    computes before it finds a single neighbour."""
    started = time.perf_counter()
    for query in queries:
        for start in range(0, len(query), 4096):
            for first in range(0, len(bank), 1024):
                query[start:start + 4096] @ bank[first:first + 1024].T
    return time.perf_counter() - started


def normalised_features(split) -> np.ndarray:
    """A split's features as KNN searches them (float32, L2-normalised); reading them here also
    loads them, so the timings that follow are the search, not the disk."""
    from methods.distance_scores import l2_normalise

    return l2_normalise(np.asarray(split.features, dtype=np.float32))


def measure_knn_benchmark(benchmark_name: str, options) -> dict:
    """KNN on the warm cache of ``benchmark_name``, every backbone and every entry ``oodbench score``
    scores: k = 50 (fit, then score), the registry's sweep over k (one fit with the largest k, one
    search per entry for every k), and the float32 GEMM floor of those searches; each timed once,
    with the machine's load average beside them (a shared machine's wall times follow its load)."""
    from harness.api import Bench

    evaluation = Bench(benchmark_name, cache_dir=options.cache_dir, out_dir=options.out_dir,
                       data_root=options.data_root, progress=False).evaluation(compute=False)
    ks = make_method("knn").grid["k"]
    rows, load = [], os.getloadavg()[0]
    for backbone in evaluation.resolution.backbones:
        entries = evaluation.open_entries(backbone)
        fit = evaluation.fit_entry(make_method("knn"), entries)
        tests = [entries[label] for label in evaluation.score_labels()]
        floor = gemm_floor_seconds(normalised_features(fit), [normalised_features(t) for t in tests])
        started = time.perf_counter()
        single = make_method("knn", k=50).fit(fit)
        for test in tests:
            single.score_samples(test)
        scored = time.perf_counter()
        widest = make_method("knn", k=max(ks)).fit(fit)
        for test in tests:
            widest.score_samples_sweep(test, ks)
        swept = time.perf_counter()
        rows.append({"backbone": backbone.name, "bank": len(fit), "queries": sum(len(t) for t in tests),
                     "gemm_floor_s": floor, "k50_s": scored - started, "sweep_s": swept - scored})
        print(f"  {backbone.name}: bank {len(fit)}, {rows[-1]['queries']} queries: GEMM floor {floor:.1f} s, "
              f"knn k=50 {rows[-1]['k50_s']:.1f} s, sweep over k={ks} {rows[-1]['sweep_s']:.1f} s", flush=True)
    totals = {key: sum(row[key] for row in rows) for key in ("gemm_floor_s", "k50_s", "sweep_s")}
    print(f"  every backbone: GEMM floor {totals['gemm_floor_s']:.1f} s, knn k=50 {totals['k50_s']:.1f} s, "
          f"sweep {totals['sweep_s']:.1f} s (load average {load:.1f} -> {os.getloadavg()[0]:.1f})", flush=True)
    return {"benchmark": benchmark_name, "grid": ks, "backbones": rows, **totals,
            "load_average": [load, os.getloadavg()[0]]}


def measure_knn_scale(shape: dict, workdir: Path | None, k: int = 1000) -> dict:
    """KNN at ImageNet shape (the ``scale`` part's synthetic cache) with the paper's ImageNet k: exact
    (``index="flat"``) and approximate (``index="ivf"``, KNN's default nprobe) fit and scored on
    every test entry, against the float32 GEMM floor of the same products, timed just before and
    just after the exact search (the smaller, less disturbed of the two is the floor); with each
    one's AUROC and FPR@95 (ID test against each OOD set, averaged) and the approximate one's
    difference."""
    from methods.distance_scores import ivf_lists

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=workdir) as root:
        fit_path, test_paths = write_synthetic_cache(Path(root), shape)
        fit, tests = CachedSplit(fit_path), [CachedSplit(p) for p in test_paths]
        bank, queries = normalised_features(fit), [normalised_features(t) for t in tests]
        floors = [gemm_floor_seconds(bank, queries)]
        result = {"shape": {**shape, "ood": list(shape["ood"])}, "k": k}
        for index in ("flat", "ivf"):
            started = time.perf_counter()
            method = make_method("knn", k=k, index=index).fit(fit)
            fitted = time.perf_counter()
            scores = [method.score_samples(test) for test in tests]
            done = time.perf_counter()
            if index == "flat":
                floors.append(gemm_floor_seconds(bank, queries))
            metrics = [ood_metrics(scores[0], ood) for ood in scores[1:]]
            result[index] = {"label": method.label(), "fit_s": fitted - started, "score_s": done - fitted,
                             "total_s": done - started, "auroc": float(np.mean([m["auroc"] for m in metrics])),
                             "fpr95": float(np.mean([m["fpr95"] for m in metrics]))}
    floor = min(floors)
    print(f"  {shape['fit']} bank, {sum(len(t) for t in tests)} queries, {shape['features']}-d: GEMM floor "
          f"{floor:.1f} s (timed {', '.join(f'{f:.1f}' for f in floors)} s)", flush=True)
    for index in ("flat", "ivf"):
        row = result[index]
        row["over_gemm_floor"] = row["total_s"] / floor
        print(f"  {row['label']:32s} fit {row['fit_s']:6.1f} s, score {row['score_s']:6.1f} s "
              f"({row['over_gemm_floor']:.2f}x the GEMM floor), AUROC {100 * row['auroc']:.2f}, "
              f"FPR@95 {100 * row['fpr95']:.2f}", flush=True)
    result.update(gemm_floor_s=floor, gemm_floors_s=floors, ivf_lists=ivf_lists(shape["fit"]),
                  nprobe=make_method("knn").nprobe,
                  ivf_minus_flat_auroc_points=100 * (result["ivf"]["auroc"] - result["flat"]["auroc"]),
                  ivf_minus_flat_fpr95_points=100 * (result["ivf"]["fpr95"] - result["flat"]["fpr95"]),
                  load_average=[load, os.getloadavg()[0]])
    return result


def main(argv: list[str] | None = None) -> int:
    from extract.datasets import default_data_root
    from harness.cli import default_cache_dir
    from harness.resolution import RunOptions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--n", type=int, default=10000, help="extraction: number of images (default 10000)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=5, help="extraction: interleaved rounds (best of)")
    parser.add_argument("--scale-fraction", type=float, default=1.0,
                        help="scale: multiply the synthetic sample counts (default 1: ImageNet-sized)")
    parser.add_argument("--workdir", type=Path, default=None, help="scale: where the synthetic cache goes")
    parser.add_argument("--benchmark", default="fashion-mnist",
                        help="reinference: the benchmark (default fashion-mnist)")
    parser.add_argument("--pytorch-ood-repeats", type=int, default=1,
                        help="pytorch-ood: interleaved rounds after the warm-up one (best of; default 1)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("out/perf.json"))
    args = parser.parse_args(argv)
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    result = {}
    if "extraction" in parts:
        result["extraction"] = measure_extraction(args.n, args.batch_size, args.device, args.repeats)
    # the parts that read the benchmark's cache
    options = RunOptions(cache_dir=args.cache_dir or default_cache_dir(), out_dir=args.out.parent,
                         data_root=args.data_root or default_data_root(), device=args.device, progress=False)
    if "network" in parts:
        result["network"] = measure_network(args.n, args.batch_size, args.device, args.repeats)
    if "scale" in parts:
        result["scale"] = measure_scale(scaled_shape(args.scale_fraction), args.workdir)
    if "reinference" in parts:
        result["reinference"] = measure_reinference(args.benchmark, options)
    if "pytorch-ood" in parts:
        from harness.perf_pytorch_ood import measure_pytorch_ood

        result["pytorch_ood"] = measure_pytorch_ood(options, args.pytorch_ood_repeats, interleaved_best)
    if "intervals" in parts:
        result["intervals"] = measure_intervals(args.benchmark, options)
    if "knn" in parts:
        result["knn"] = {"benchmark": measure_knn_benchmark(args.benchmark, options),
                         "scale": measure_knn_scale(scaled_shape(args.scale_fraction), args.workdir)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
