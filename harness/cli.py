"""The ``oodbench`` command line (also ``python -m harness``).

    oodbench run BENCHMARK            train/extract what is missing, score every method, write the leaderboard
    oodbench extract BENCHMARK        train/extract only
    oodbench score BENCHMARK --method NAME [--param k=v ...]   one scorer from the cache alone
    oodbench sweep BENCHMARK --method NAME [--grid k=v1,v2 ...]  a hyperparameter grid from the cache,
                                      selected on the benchmark's validation OOD set
    oodbench leaderboard BENCHMARK    re-render the leaderboard from cached scores
    oodbench compare BENCHMARK --methods A,B   paired tests of two methods on every OOD set
    oodbench epochs BENCHMARK --backbone NAME [--methods energy,msp]   OOD metrics of every training snapshot
    oodbench cache ls | verify | rm   inspect, check or delete cache files
    oodbench fetch DATASET            download a dataset with torchvision (needs internet)
    oodbench list                     registered benchmarks, datasets, backbones and methods
"""
from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import re
import sys
import time
import traceback
from pathlib import Path

from extract.cachefiles import nearest_existing
from extract.datasets import DATASETS, DatasetUnavailable, fetch_dataset
from extract.store import CacheCorrupt, CacheMissing, FeatureStore, verify_file
from harness.api import CACHE_ENV, Bench, default_cache_dir
from harness.config import BenchmarkError, available_benchmarks, check_seeds, parse_intervals
from harness.evaluation import BACKENDS, RunSummary, ScoringGrid
from harness.resolution import Resolution
from methods import METHODS, make_method, parameter_grid
from methods.base import installed_plugins, usable_cpus
from results.leaderboard import METRICS

# Nothing imported above loads torch (3 s): `score` and `leaderboard` from a recorded resolution
# never need it. Commands that do (run, extract, list, resolving afresh) import harness.pipeline.

# What the user, the data or the machine can cause (bad input, missing or damaged files, a full
# disk, permissions): one `error:` line and exit code 2. Anything else is a bug (exit code 1).
USER_ERRORS = (BenchmarkError, CacheMissing, CacheCorrupt, DatasetUnavailable, ValueError, OSError, MemoryError)
EXIT_USER_ERROR, EXIT_BUG, EXIT_INTERRUPTED = 2, 1, 130


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return check_seeds([int(s) for s in text.split(",")], "--seeds")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err) if isinstance(err, BenchmarkError) else
                                         f"--seeds takes comma-separated integers, got {text!r}") from None


def _interval_option(key: str, kind: type):
    """The argparse type of ``--level`` (float) or ``--resamples`` (int), checked as a benchmark
    file's ``intervals:`` is."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{key} takes {'a number' if kind is float else 'an integer'}, "
                                             f"got {text!r}") from None
        try:
            return getattr(parse_intervals({key: value}, f"--{key}"), key)
        except BenchmarkError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return parse


def _workers(text: str) -> int:
    try:
        workers = int(text)
    except ValueError:
        workers = -1
    if workers < 0:
        raise argparse.ArgumentTypeError(f"--workers takes a number of processes >= 0 (0: decode in the main "
                                         f"process), got {text!r}")
    return workers


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", text):
        raise argparse.ArgumentTypeError(f"--device takes auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def folder_option(path: Path, option: str) -> Path:
    """``path`` for a folder option, or one clear error when it cannot be a folder (it, or a folder
    above it, is a file)."""
    path = Path(path).expanduser()
    existing = nearest_existing(path)
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under {existing}, which is a file"
        raise ValueError(f"{option} {path} {where}, not a folder; give a folder path")
    return path


def _param(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param takes key=value, got {text!r}")
    return key, value


def _grid_axis(text: str) -> tuple[str, list[str]]:
    key, values = _param(text)
    return key, [v for v in values.split(",") if v]


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    try:
        shard = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N (shard I of N, 0-based), got {text!r}") from None
    if not 0 <= shard[0] < shard[1]:
        raise argparse.ArgumentTypeError(f"expected 0 <= I < N, got {text!r}")
    return shard


def torchrun_shard() -> tuple[int, int] | None:
    """(rank, world size) from the environment ``torchrun`` (or a Slurm wrapper setting RANK and
    WORLD_SIZE) gives each process; None for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else None


def _global_options(parser: argparse.ArgumentParser, after_command: bool) -> None:
    """Options every command takes, before or after its name (``oodbench --quiet run ...`` and
    ``oodbench run ... --quiet``): after it, an absent option leaves the value given before it."""
    unset = {"default": argparse.SUPPRESS} if after_command else {}
    parser.add_argument("--cache-dir", type=Path, **(unset or {"default": None}),
                        help=f"feature cache root (default ${CACHE_ENV} or ~/.cache/oodbench/store)")
    parser.add_argument("--quiet", action="store_true", **unset, help="no progress bars or info logging")
    parser.add_argument("--debug", action="store_true", **unset,
                        help="print the traceback of an error (for bug reports)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, after_command=True)

    bench = argparse.ArgumentParser(add_help=False, parents=[common])
    bench.add_argument("benchmark", help="packaged benchmark name or path to a benchmark YAML file")
    bench.add_argument("--data-root", type=Path, default=None,
                       help="folder holding datasets (default $OODBENCH_DATA_ROOT)")
    bench.add_argument("--out", type=Path, default=Path("out"), help="output folder for leaderboards (default ./out)")
    bench.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda[:N] or mps (default auto)")
    bench.add_argument("--seeds", type=_seeds, default=None, help="comma-separated seeds (default: the benchmark's)")
    bench.add_argument("--download", action="store_true", help="download missing torchvision datasets first")
    bench.add_argument("--workers", type=_workers, default=min(4, max(1, usable_cpus() - 1)),
                       help="data-loading processes decoding image files (ImageNet-scale sets; default "
                            "min(4, cores - 1), at most the number of cores); 0 decodes in the main process")
    bench.add_argument("--amp", action="store_true", help="mixed-precision extraction (float16 on CUDA, bfloat16 "
                       "on the CPU); cached as entries of their own")

    grid = argparse.ArgumentParser(add_help=False)
    grid.add_argument("--jobs", type=int, default=1, help="workers scoring cache-only methods (default 1; -1: one "
                      "per core; at most the number of cores without a cluster)")
    grid.add_argument("--backend", default="loky", choices=BACKENDS, help="joblib backend of the scoring grid "
                      "(default loky; dask and ray reach a cluster with --scheduler)")
    grid.add_argument("--scheduler", default="", metavar="ADDRESS", help="the Dask scheduler (tcp://host:8786) or "
                      "Ray cluster (host:6379) address; without one dask starts a local cluster")
    intervals = argparse.ArgumentParser(add_help=False)
    intervals.add_argument("--level", type=_interval_option("level", float), default=None,
                           help="level of the bootstrap intervals; 1 - level is the level of the tests (default: the "
                                "benchmark's intervals: level, else 0.95)")
    intervals.add_argument("--resamples", type=_interval_option("resamples", int), default=None,
                           help="bootstrap resamples of the test sets, at least 100 (default: the benchmark's "
                                "intervals: resamples, else 1000)")
    parser = argparse.ArgumentParser(prog="oodbench", description="OOD detection benchmark harness with an HDF5 "
                                     "feature cache.")
    _global_options(parser, after_command=False)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", parents=[bench, grid, intervals],
                              help="extract what is missing, score, write the leaderboard")
    run.add_argument("--methods", default=None, help="comma-separated method names (default: the benchmark's)")
    extract = commands.add_parser("extract", parents=[bench], help="train and extract only")
    extract.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                         help="extract only shard I of N of every entry (0-based; default: $RANK/$WORLD_SIZE under "
                              "torchrun); the shard that completes an entry merges it")
    score = commands.add_parser("score", parents=[bench], help="run one scorer from the cache (no network)")
    score.add_argument("--method", required=True)
    score.add_argument("--param", type=_param, action="append", default=[], metavar="KEY=VALUE")
    sweep = commands.add_parser("sweep", parents=[bench, grid], help="a method's hyperparameter grid from the cache, "
                                "selected on the benchmark's validation OOD set")
    sweep.add_argument("--method", required=True)
    sweep.add_argument("--grid", type=_grid_axis, action="append", default=[], metavar="KEY=V1,V2,...",
                       help="replace or add one axis of the registry's grid (repeatable)")
    sweep.add_argument("--criterion", default="auroc", choices=tuple(METRICS),
                       help="validation metric to select by (default auroc; fpr95 is minimised)")
    commands.add_parser("leaderboard", parents=[bench, grid, intervals],
                        help="re-render the leaderboard from cached scores")
    compare = commands.add_parser("compare", parents=[bench, grid, intervals],
                                  help="paired tests of two methods on every OOD set (scores from the cache, "
                                       "computed from cached features where missing)")
    compare.add_argument("--methods", required=True, metavar="A,B", help="the two methods, comma-separated")
    epochs = commands.add_parser("epochs", parents=[bench], help="OOD metrics against the training epoch: every "
                                 "snapshot of a backbone extracted and scored (its recipe needs snapshot_every)")
    epochs.add_argument("--backbone", required=True, help="the benchmark's backbone whose snapshots to score")
    epochs.add_argument("--methods", default="energy,msp", help="comma-separated cache-only methods (default "
                        "energy,msp)")
    cache = commands.add_parser("cache", parents=[common], help="inspect, verify or remove cache files")
    cache.add_argument("action", choices=("ls", "verify", "rm"))
    cache.add_argument("patterns", nargs="*", help="glob patterns on the relative path (rm needs at least one; "
                       "'*' removes everything)")
    cache.add_argument("--stale", action="store_true", help="rm: remove the temporary files of writes whose "
                       "process is gone (killed runs); `cache verify` lists them")
    fetch = commands.add_parser("fetch", parents=[common], help="download a dataset with torchvision")
    fetch.add_argument("dataset")
    fetch.add_argument("--data-root", type=Path, default=None, help="where to put it (default: the download "
                       "folder, $OODBENCH_DOWNLOAD_DIR or ~/.cache/oodbench/data, which the loaders always search)")
    commands.add_parser("list", parents=[common], help="list benchmarks, datasets, backbones and methods")
    return parser


def _capped(value: int, option: str) -> int:
    """``value`` of a process-count option, at most the CPUs this process may use (a note when capped)."""
    cpus = usable_cpus()
    if value > cpus:
        print(f"note: {option} {value} is more than the {cpus} CPUs available; using {cpus}", file=sys.stderr)
        return cpus
    return value


def _bench(args) -> Bench:
    """The ``Bench`` of a benchmark command's options (checked before any work)."""
    return Bench(args.benchmark, cache_dir=folder_option(args.cache_dir or default_cache_dir(), "--cache-dir"),
                 out_dir=folder_option(args.out, "--out"), data_root=args.data_root, device=args.device,
                 seeds=args.seeds, download=args.download, progress=not args.quiet,
                 workers=_capped(args.workers, "--workers"), amp=args.amp, level=getattr(args, "level", None),
                 resamples=getattr(args, "resamples", None))


def _grid(args) -> dict:
    """The scoring grid options of ``--backend/--jobs/--scheduler``; without a cluster
    (``--scheduler``) its workers are processes of this machine, at most one per CPU."""
    local = args.backend in ("loky", "threading") or not args.scheduler
    jobs = _capped(args.jobs, "--jobs") if local else args.jobs
    ScoringGrid(args.backend, jobs, args.scheduler)  # checked now, before any work
    return {"jobs": jobs, "backend": args.backend, "scheduler": args.scheduler}


def _print_summary(summary: RunSummary, resolution: Resolution | None, started: float) -> None:
    print()
    for line in summary.lines + (resolution.skipped if resolution else []):
        print(line)
    stages = ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in summary.timings.items())
    print(f"time: {time.perf_counter() - started:.1f}s ({stages})")
    for path in summary.outputs:
        print(f"wrote {path}")


def cmd_run(args, compute: bool = True) -> int:
    started = time.perf_counter()
    methods = [name.strip() for name in args.methods.split(",")] if getattr(args, "methods", None) else None
    bench = _bench(args)
    (bench.run if compute else bench.leaderboard)(methods, **_grid(args))
    for board in bench.leaderboards.values():
        print()
        print(board.to_text())
    _print_summary(bench.summary, bench.resolution, started)
    return 0


def cmd_extract(args) -> int:
    started = time.perf_counter()
    bench = _bench(args)
    shard = args.shard or torchrun_shard()
    if shard is not None:
        bench.summary.lines += bench.extract(shard)
        _print_summary(bench.summary, None, started)
        return 0
    resolution = bench.extract()
    for backbone in resolution.backbones:
        for label, path in backbone.entries.items():
            print(f"{backbone.name} seed {backbone.seed} {label}: {path}")
        bench.summary.lines.append(backbone.line())
    _print_summary(bench.summary, resolution, started)
    return 0


def cmd_score(args) -> int:
    """Score one method from the cache: no training, no extraction, no forward pass."""
    started = time.perf_counter()
    make_method(args.method, **dict(args.param))  # a bad name or parameter fails before any work
    bench = _bench(args)
    metrics = bench.score(args.method, **dict(args.param))
    columns = ["seed", "backbone", "ood_set", "fpr95", "auroc", "aupr_in", "aupr_out", "id_acc"]
    table = metrics[columns].copy()
    table[columns[3:]] = (100 * table[columns[3:]]).round(2)
    print(f"{metrics['method'].iloc[0]} on {bench.resolution.benchmark} ({bench.resolution.convention}, values in %)")
    print(table.to_string(index=False))
    means = table.groupby(["backbone", "seed"])[columns[3:]].mean().round(2)
    print("\naverage over OOD sets:\n" + means.to_string())
    _print_summary(bench.summary, bench.resolution, started)
    return 0


def cmd_sweep(args) -> int:
    """A method's grid scored from the cache alone; the setting is chosen on the validation OOD set."""
    started = time.perf_counter()
    points = parameter_grid(args.method, dict(args.grid))  # checked before any work
    bench = _bench(args)
    table = bench.sweep(args.method, dict(args.grid), args.criterion, **_grid(args))
    resolution = bench.resolution
    val = f"val_{args.criterion}"
    print(f"{args.method} sweep on {resolution.benchmark}: {len(points)} settings, selected by {args.criterion} "
          f"on the validation OOD set {resolution.validation} ({resolution.convention}, values in %)")
    shown = table.drop(columns=["method"]).copy()
    metric_columns = [c for c in shown.columns if c == val or c.endswith(("_fpr95", "_auroc"))]
    shown[metric_columns] = (100 * shown[metric_columns]).round(2)
    shown["selected"] = shown["selected"].map({True: "*", False: ""})
    print(shown.to_string(index=False))
    for _, row in table[table["selected"]].iterrows():
        print(f"\nselected for {row['backbone']} seed {row['seed']}: {row['method']} (validation {args.criterion} "
              f"{100 * row[val]:.2f}) -> test FPR@95 {100 * row['test_fpr95']:.2f}, "
              f"AUROC {100 * row['test_auroc']:.2f}")
    _print_summary(bench.summary, resolution, started)
    return 0


def cmd_compare(args) -> int:
    """Two methods' paired tests on every OOD set, the averages and the ID accuracy, per backbone."""
    started = time.perf_counter()
    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    for name in methods:
        make_method(name)  # a bad name fails before any work
    bench = _bench(args)
    table = bench.compare(methods, **_grid(args))
    first, second = table.columns[3:5]
    level = bench.intervals.level
    for backbone, rows in table.groupby("backbone", sort=False):
        print(f"\n{first} vs {second} on {bench.resolution.benchmark} ({backbone}, {bench.resolution.convention}, "
              f"values in %): difference {first} - {second} with its {level:.0%} interval, two-sided p-value")
        shown = rows.drop(columns="backbone").copy()
        shown["metric"] = shown["metric"].map({**METRICS, "acc": "ID acc"})
        for column in (first, second, "difference", "lo", "hi"):
            shown[column] = (100 * shown[column]).round(2)
        shown["p"] = shown["p"].map(lambda p: f"{p:.2g}")
        print(shown.to_string(index=False))
    _print_summary(bench.summary, bench.resolution, started)
    return 0


def cmd_epochs(args) -> int:
    started = time.perf_counter()
    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    for name in methods:
        make_method(name)
    bench = _bench(args)
    table, paths = bench.epochs(args.backbone, methods)
    bench.summary.outputs += paths
    averages = table.groupby(["method", "epoch"])[["fpr95", "auroc", "test_acc"]].mean().mul(100).round(2)
    print(f"{args.backbone} on {bench.benchmark.name}: average over the OOD sets by epoch (%)")
    print(averages.to_string())
    _print_summary(bench.summary, bench.pipeline().resolution([]), started)
    return 0


def cmd_cache(args) -> int:
    store = FeatureStore(folder_option(args.cache_dir or default_cache_dir(), "--cache-dir"))
    files = [p for p in store.files()
             if not args.patterns or any(fnmatch.fnmatch(str(p.relative_to(store.root)), pat) for pat in args.patterns)]
    if args.action == "ls":
        rows = store.listing()
        shown = {str(p.relative_to(store.root)) for p in files}
        print(f"cache {store.root}: {len(shown)} files")
        for row in rows:
            if row["path"] in shown:
                print(f"{row['kind']:9} {row['bytes'] / 1e6:9.2f} MB  {row['what']:28} {row['path']}")
        return 0
    if args.action == "verify":
        return _verify_cache(store, files)
    if args.stale:
        removed = store.remove_stale()
        for temporary in removed:
            print(f"removed {temporary.describe()}")
        print(f"removed {len(removed)} temporary files of killed writes from {store.root}")
        if not args.patterns:
            return 0
    if not args.patterns:
        raise ValueError("cache rm needs at least one pattern (use '*' to remove everything) or --stale")
    store.remove(files)
    print(f"removed {len(files)} files from {store.root}")
    return 0


def _verify_cache(store: FeatureStore, files: list[Path]) -> int:
    """``cache verify``: every HDF5 file and weights file against its checksums, the quarantined files
    and the temporaries (writes in progress, or left by killed writers); exit 1 when any is corrupt."""
    checked = [p for p in files if p.suffix in (".h5", ".pt")]
    bad = 0
    for path in checked:
        if path.suffix == ".pt":
            from extract.weights import verify_weights  # imports torch

            problems = verify_weights(path)
        else:
            problems = verify_file(path)
        bad += bool(problems)
        for problem in problems:
            print(f"CORRUPT {path}: {problem}")
    for path in files:
        if path.suffix == ".corrupt":
            print(f"quarantined {path} (moved aside when found corrupt, never read; "
                  f"remove with `oodbench cache rm '*.corrupt'`)")
    temporaries = store.temporaries()
    for temporary in temporaries:
        print(f"temporary {temporary.describe()}")
    stale = sum(t.stale for t in temporaries)
    print(f"verified {len(checked)} files under {store.root}: {len(checked) - bad} ok, {bad} corrupt"
          + (f"; {len(temporaries)} temporary files, {stale} of them left by killed writes" if temporaries else "")
          + ("; remove those with `oodbench cache rm --stale`" if stale else ""))
    return 1 if bad else 0


def cmd_list(args) -> int:
    from extract.backbones import BACKBONES  # imports torch

    print("benchmarks: " + ", ".join(available_benchmarks()))
    print("\ndatasets:")
    for name, entry in sorted(DATASETS.items()):
        print(f"  {name:14} splits {','.join(entry.splits):16} {entry.description}")
    print("\nbackbones:")
    for name, spec in sorted(BACKBONES.items()):
        print(f"  {name:16} head {spec.head:6} layers {','.join(spec.layers):29} {spec.description}")
    print("\nmethods:")
    for name, cls in sorted(METHODS.items()):
        params = ", ".join(f"{k}={v}" for k, v in cls.defaults().items()) or "-"
        print(f"  {name:14} {params:20} {(cls.__doc__ or '').strip().splitlines()[0]}")
    plugins = installed_plugins()
    if plugins:
        print("\nmethods of installed plugins (entry points oodbench.methods):")
        for name, target in plugins.items():
            print(f"  {name:14} {target}")
    return 0


def _what(args) -> str:
    """The command line being run, for the interruption message."""
    return " ".join(["oodbench", args.command, *([args.benchmark] if getattr(args, "benchmark", None) else [])])


def _error_line(err: BaseException) -> str:
    """The message of an expected error: its own text (an OSError's names the file and the reason)."""
    return str(err) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command. No exception escapes as a traceback: an expected error (input, data, disk,
    permissions) prints one ``error:`` line and exits 2, Ctrl-C one line and 130, anything else
    one line asking for a bug report and exits 1; ``--debug`` adds the traceback."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    handlers = {"run": cmd_run, "extract": cmd_extract, "score": cmd_score, "sweep": cmd_sweep,
                "leaderboard": lambda a: cmd_run(a, compute=False), "compare": cmd_compare, "epochs": cmd_epochs,
                "cache": cmd_cache,
                "list": cmd_list,
                "fetch": lambda a: fetch_dataset(a.dataset, a.data_root) or 0}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        _report(args, f"interrupted: {_what(args)} stopped by Ctrl-C; what it completed (trained epochs, extracted "
                      "chunks, cached scores) is kept, and running it again resumes from there")
        return EXIT_INTERRUPTED
    except USER_ERRORS as err:
        _report(args, _error_line(err))
        return EXIT_USER_ERROR
    except Exception as err:  # a bug: say so in one line; the traceback is for --debug
        if type(err).__name__ == "OutOfMemoryError":  # torch's, for a GPU: the input's size, not a bug
            _report(args, f"out of GPU memory ({_error_line(err).splitlines()[0]}); lower the benchmark's "
                          "extraction batch_size or use --device cpu")
            return EXIT_USER_ERROR
        _report(args, f"internal error in {_what(args)}: {type(err).__name__}: {_error_line(err).splitlines()[0]}. "
                      "This is a bug in oodbench; please report it with the command line and the output of the "
                      "same command run with --debug")
        return EXIT_BUG


def _report(args, message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    if args.debug:
        traceback.print_exc()


if __name__ == "__main__":
    sys.exit(main())
