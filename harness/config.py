"""Benchmark definitions: YAML files in ``benchmarks/`` parsed into small dataclasses, validated once.

A benchmark names its ID dataset (fit and test splits, class count), its OOD sets grouped
near/far, the validation OOD set that sweeps select hyperparameters on, the seeds, the metric
convention, the methods (default: every registered one), the backbones (a registry
architecture with a training recipe, or ``module:factory`` + checkpoint), what extraction
caches and the level and resample count of the leaderboard's bootstrap intervals. Every
unknown key or name is an error that lists the valid ones, and every value is checked for its type
and range when the file is read (``_typed``; recipes by their fields' annotations and ``LIMITS``),
so a wrong one stops the run at once with the file and the key.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from extract.datasets import DATASETS
from methods import METHODS, make_method
from results.metrics import CONVENTIONS, FPR_RULES
from results.uncertainty import DEFAULT_LEVEL, DEFAULT_RESAMPLES

if TYPE_CHECKING:
    from extract.finetuning import FineTuneRecipe
    from extract.training import Recipe

BENCHMARK_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


@dataclass(frozen=True)
class DatasetRef:
    """One dataset split as a benchmark uses it; ``name`` labels it in tables (default: the dataset)."""

    dataset: str
    split: str = "test"
    params: dict = field(default_factory=dict)
    name: str = ""
    group: str = ""

    @property
    def label(self) -> str:
        return self.name or self.dataset


@dataclass(frozen=True)
class MethodRef:
    name: str
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class IDValidation:
    """Where a benchmark's ID validation split comes from (what sweeps select on, beside the
    validation OOD set; OpenOOD v1.5's protocol): the ID dataset's own ``split`` (with
    ``params``), or, without one, a seeded stratified ``fraction`` of the fit split, which is then
    held out of the methods' fitting."""

    split: str = ""
    params: dict = field(default_factory=dict)
    fraction: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class Intervals:
    """The uncertainty every leaderboard value carries (``results.uncertainty``): percentile bootstrap
    intervals of ``level`` from ``resamples`` seeded resamples of the test sets, and the tests
    against the best of each column at ``1 - level`` (a benchmark file's ``intervals:``)."""

    level: float = DEFAULT_LEVEL
    resamples: int = DEFAULT_RESAMPLES


@dataclass(frozen=True)
class BackboneConfig:
    name: str
    arch: str = ""
    recipe: Recipe | None = None
    factory: str = ""
    checkpoint: str = ""
    kwargs: dict = field(default_factory=dict)
    head: str = ""
    layers: tuple[str, ...] = ()
    preprocessing: dict = field(default_factory=dict)
    shaping_layer: str = ""
    base: str = ""  # a fine-tuned backbone: the backbone it starts from, and how
    finetune: FineTuneRecipe | None = None


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    id_dataset: str
    fit_split: str
    test_split: str
    num_classes: int
    ood: tuple[DatasetRef, ...]
    backbones: tuple[BackboneConfig, ...]
    methods: tuple[MethodRef, ...]
    validation: DatasetRef | None = None  # the OOD set sweeps select on; disjoint from ``ood``
    seeds: tuple[int, ...] = (0,)
    convention: str = "id_positive"
    batch_size: int = 256
    layers: tuple[str, ...] = ()
    activations_dtype: str = "float32"
    source: str = ""
    fit_params: dict = field(default_factory=dict)  # the ID dataset's parameters for each split
    test_params: dict = field(default_factory=dict)
    val: IDValidation = field(default_factory=lambda: IDValidation())
    fpr_rule: str = "canonical"  # results.metrics.FPR_RULES
    fit_subsets: dict = field(default_factory=dict)  # method name -> {n or fraction, seed}: its own fit rows
    intervals: Intervals = field(default_factory=Intervals)

    @property
    def id_fit(self) -> DatasetRef:
        return DatasetRef(self.id_dataset, self.fit_split, self.fit_params, name=f"{self.id_dataset}-{self.fit_split}")

    @property
    def id_val(self) -> DatasetRef:
        """The ID validation split: the dataset's own ``val.split``, or (split '') the slice
        ``val.fraction`` of the fit split held out from it."""
        return DatasetRef(self.id_dataset, self.val.split, self.val.params, name=f"{self.id_dataset}-val")

    @property
    def id_test(self) -> DatasetRef:
        return DatasetRef(self.id_dataset, self.test_split, self.test_params,
                          name=f"{self.id_dataset}-{self.test_split}")


class BenchmarkError(ValueError):
    """A benchmark file that cannot be used, with the file and the reason."""


# ---------------------------------------------------------------- checking what a file gives

# torch.manual_seed takes [-2^63, 2^64) and numpy's generators any integer >= 0; training's
# per-epoch seed is reduced modulo 2^32 (extract/training.py). Every consumer takes [0, 2^63).
SEED_LIMIT = 2**63


def check_seeds(seeds, where: str) -> tuple[int, ...]:
    """``seeds`` as a tuple when it is a non-empty list of distinct integers (not booleans) in
    [0, SEED_LIMIT), the range every consumer of a seed accepts; else a ``BenchmarkError`` naming
    ``where`` (the CLI's '--seeds', or '<file>: seeds')."""
    valid = (isinstance(seeds, (list, tuple)) and len(seeds) > 0
             and all(_fits(s, int) and 0 <= s < SEED_LIMIT for s in seeds) and len(set(seeds)) == len(seeds))
    if not valid:
        raise BenchmarkError(f"{where} must be a non-empty list of distinct integers in [0, 2**63), got {seeds!r}")
    return tuple(seeds)


def _fits(value, kind) -> bool:
    """Whether a YAML value is of ``kind``: a type, a union (``str | None``) or ``tuple[X, ...]``
    (a YAML list of X). A bool is not an integer; an integer is a number; a number is finite."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(kind))
    if typing.get_origin(kind) in (tuple, list):
        return isinstance(value, (list, tuple)) and all(_fits(v, typing.get_args(kind)[0]) for v in value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, kind)


_KIND_NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
               bool: ("true or false", "booleans"), dict: ("a mapping", "mappings"), list: ("a list", "lists"),
               type(None): ("null", "nulls")}


def _describe(kind, plural: bool = False, limit: str = "") -> str:
    """How an error names ``kind``: 'an integer >= 1', 'a list of numbers in (0, 1)', 'a number >= 0 or null'."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg, plural, "" if arg is type(None) else limit) for arg in typing.get_args(kind))
    if typing.get_origin(kind) in (tuple, list):
        return f"{'lists' if plural else 'a list'} of {_describe(typing.get_args(kind)[0], True, limit)}"
    return _KIND_NAMES[kind][plural] + (f" {'in ' if limit[0] in '([' else ''}{limit}" if limit else "")


def _within(value, limit: str) -> bool:
    """``value`` against a range: '>= 1', '> 0', or an interval such as '(0, 1]'."""
    if limit[0] in "([":
        low, high = (float(bound) for bound in limit[1:-1].split(","))
        return (low <= value if limit[0] == "[" else low < value) and (value <= high if limit[-1] == "]"
                                                                      else value < high)
    op, bound = limit.split()
    return value >= float(bound) if op == ">=" else value > float(bound)


def _typed(where: str, key: str, value, kind, limit: str | tuple | None = None):
    """``value`` when it is of ``kind`` (see ``_fits``) and within ``limit``: a range (see
    ``_within``; for a list, every item) or a tuple of choices. Else one ``BenchmarkError``:
    '<where>: <key> must be <what>, got <value>' ('<where>: <key> <value> is not one of <choices>')."""
    valid = _fits(value, kind)
    if valid and isinstance(limit, tuple):
        valid = value in limit
    elif valid and limit and value is not None:
        valid = all(_within(v, limit) for v in (value if isinstance(value, (list, tuple)) else [value]))
    if not valid and isinstance(limit, tuple):
        raise BenchmarkError(f"{where}: {key} {value!r} is not one of {limit}")
    if not valid:
        raise BenchmarkError(f"{where}: {key} must be {_describe(kind, limit=limit)}, got {value!r}")
    return value


def _check_keys(where: str, mapping: dict, required: set, optional: set) -> None:
    if not isinstance(mapping, dict):
        raise BenchmarkError(f"{where}: expected a mapping, got {type(mapping).__name__}")
    missing = required - set(mapping)
    unknown = set(mapping) - required - optional
    if missing or unknown:
        raise BenchmarkError(f"{where}: missing keys {sorted(missing)}, unknown keys {sorted(unknown, key=str)}; "
                             f"allowed: {sorted(required | optional)}")


def _checked(where: str, mapping, kinds: dict, required: set = frozenset(), limits: dict | None = None) -> dict:
    """``mapping`` once it has every ``required`` key and no key outside ``kinds``, and every value
    is of its key's kind and within its limit (``_typed``)."""
    _check_keys(where, mapping, set(required), set(kinds) - set(required))
    for key, value in mapping.items():
        _typed(where, key, value, kinds[key], (limits or {}).get(key))
    return mapping


def _checked_fields(where: str, mapping, cls, limits: dict) -> dict:
    """``_checked`` against a dataclass: its fields are the keys, their annotations the kinds, the
    fields without a default the required keys."""
    fields = dataclasses.fields(cls)
    required = {f.name for f in fields if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING}
    hints = typing.get_type_hints(cls)
    return _checked(where, mapping, {f.name: hints[f.name] for f in fields}, required, limits)


# The preprocessing of a factory backbone (extract.backbones.Preprocessing's fields), beyond their
# types; Preprocessing itself checks that mean and std have `channels` values.
PREPROCESSING_LIMITS = {"input_size": ">= 1", "channels": (1, 3), "std": "> 0", "resize_to": ">= 0"}
# The keys of a benchmark file, of its `id`, `extraction` and backbone entries, and of a dataset reference.
BENCHMARK_KEYS = {"name": str, "description": str, "id": dict, "ood": list | dict, "validation": str | dict | None,
                  "seeds": object, "convention": str, "fpr_rule": str, "methods": list | None, "backbones": list,
                  "extraction": dict, "fit": dict, "intervals": dict}
FIT_SUBSET_KEYS = {"n": int, "fraction": float, "seed": int}
ID_KEYS = {"dataset": str, "fit_split": str, "test_split": str, "num_classes": int, "fit_params": dict | None,
           "test_params": dict | None, "val": dict}
ID_VAL_KEYS = {"split": str, "params": dict, "fraction": float, "seed": int}
EXTRACTION_KEYS = {"batch_size": int, "layers": tuple[str, ...], "activations_dtype": str}
BACKBONE_KEYS = {"name": str, "arch": str, "train": dict, "factory": str, "checkpoint": str, "kwargs": dict,
                 "head": str, "layers": tuple[str, ...], "preprocessing": dict, "shaping_layer": str, "finetune": dict}
DATASET_REF_KEYS = {"dataset": str, "split": str, "params": dict, "name": str}
# A percentile interval's bounds are order statistics of the resamples: with fewer than 100 there
# are none to speak of beyond the bounds of a 95% interval.
INTERVALS_KEYS = {"level": float, "resamples": int}
INTERVALS_LIMITS = {"level": "(0, 1)", "resamples": ">= 100"}


def _dataset_ref(where: str, item, group: str, params_key: str = "params") -> DatasetRef:
    if isinstance(item, str):
        item = {"dataset": item}
    _checked(where, item, DATASET_REF_KEYS, {"dataset"})
    ref = DatasetRef(item["dataset"], item.get("split", "test"), dict(item.get("params", {})),
                     item.get("name", ""), group)
    if ref.dataset not in DATASETS:
        raise BenchmarkError(f"{where}: unknown dataset {ref.dataset!r}; registered: {', '.join(sorted(DATASETS))}")
    entry = DATASETS[ref.dataset]
    if ref.split not in entry.splits:
        raise BenchmarkError(f"{where}: dataset {ref.dataset!r} has no split {ref.split!r}; splits: {entry.splits}")
    unknown = set(ref.params) - set(entry.defaults)
    if unknown:
        raise BenchmarkError(f"{where}: dataset {ref.dataset!r} has no parameters {sorted(unknown, key=str)}; "
                             f"parameters: {entry.defaults or 'none'}")
    for key, value in ref.params.items():  # of the type of the registry's default, where it has a plain one
        if type(entry.defaults[key]) in (int, float, bool, str):
            _typed(f"{where}: {params_key}", key, value, type(entry.defaults[key]))
    return ref


def _same_data(a: DatasetRef, b: DatasetRef) -> bool:
    """Whether two references name the same images: dataset, split and parameters (defaults filled in)."""
    defaults = DATASETS[a.dataset].defaults
    return (a.dataset, a.split) == (b.dataset, b.split) and {**defaults, **a.params} == {**defaults, **b.params}


def _fit_subsets(where: str, mapping: dict) -> dict[str, dict]:
    """The ``fit:`` mapping: a method name -> a seeded random subset of the ID fit split that
    method fits on, ``{n: rows}`` or ``{fraction: f}``, with ``seed`` (default 0); e.g. ViM on
    200,000 ImageNet training images, KNN on 1% of them."""
    subsets = {}
    for name, spec in mapping.items():
        method = METHODS.get(name)
        if method is None:
            raise BenchmarkError(f"{where}: {name!r} is not a method name; registered methods: {', '.join(METHODS)}")
        if "network" in method.reads:
            raise BenchmarkError(f"{where}: {name} fits through the network on the fit split's images; a fit "
                                 "subset applies to the methods that fit on cached arrays")
        config = _checked(f"{where} {name}", spec, FIT_SUBSET_KEYS, limits={"n": ">= 1", "fraction": "(0, 1]",
                                                                            "seed": ">= 0"})
        if ("n" in config) == ("fraction" in config):
            raise BenchmarkError(f"{where} {name}: give either 'n' (rows) or 'fraction' (of the fit split)")
        subsets[name] = {"seed": 0, **config}
    return subsets


def parse_intervals(mapping, where: str) -> Intervals:
    """The ``intervals:`` mapping of a benchmark file, ``{level, resamples}`` (default
    {level: 0.95, resamples: 1000}); the command line's ``--level`` and ``--resamples`` are checked
    the same way. A level outside (0, 1) or fewer than 100 resamples is a ``BenchmarkError``."""
    return Intervals(**_checked(where, mapping, INTERVALS_KEYS, limits=INTERVALS_LIMITS))


def benchmark_intervals(benchmark) -> Intervals:
    """The intervals of a benchmark (a packaged name, a YAML path or a mapping), read from its file
    alone: the other keys are checked when the benchmark is loaded, which imports torch."""
    if isinstance(benchmark, dict):
        data, where = benchmark, "<mapping>"
    else:
        path = benchmark_path(benchmark)
        data, where = _read_yaml(path), str(path)
    return parse_intervals((data if isinstance(data, dict) else {}).get("intervals", {}), f"{where}: intervals")


def _id_validation(where: str, mapping, id_test: DatasetRef, id_fit: DatasetRef) -> IDValidation:
    """The ``id: val`` mapping: ``{split, params}`` (the dataset's own validation split, disjoint
    from the fit and test splits) or ``{fraction, seed}`` (held out of the fit split; default
    {fraction: 0.1, seed: 0})."""
    config = _checked(where, mapping, ID_VAL_KEYS, limits={"fraction": "(0, 1)", "seed": ">= 0"})
    if "split" in config and ({"fraction", "seed"} & set(config)):
        raise BenchmarkError(f"{where}: give either 'split' (the dataset's own validation split) or 'fraction' and "
                             "'seed' (a slice held out of the fit split), not both")
    if "split" not in config and "params" in config:
        raise BenchmarkError(f"{where}: 'params' belongs to a 'split'")
    val = IDValidation(config.get("split", ""), dict(config.get("params") or {}), config.get("fraction", 0.1),
                       config.get("seed", 0))
    if val.split:
        ref = _dataset_ref(where, {"dataset": id_test.dataset, "split": val.split, "params": val.params}, "")
        for other, what in ((id_fit, "fit"), (id_test, "test")):
            if _same_data(ref, other):
                raise BenchmarkError(f"{where}: the ID validation split ({val.split!r}) is the {what} split; it must "
                                     f"be disjoint from the fit and test splits (sweeps select on it)")
    return val


def _check_not_id(where: str, ref: DatasetRef, id_test: DatasetRef, id_fit: DatasetRef) -> None:
    """An OOD or validation set that is the ID test split would score like the ID data (AUROC 50%);
    one that is the ID fit split is what the methods learnt as in-distribution."""
    for role, id_ref in (("test", id_test), ("fit", id_fit)):
        if _same_data(ref, id_ref):
            raise BenchmarkError(f"{where}: {ref.dataset!r} split {ref.split!r} with the same parameters is the ID "
                                 f"{role} split itself; an OOD set must be other data (another split, other "
                                 "parameters or another dataset)")


def _backbone(where: str, item) -> BackboneConfig:
    # Imported here: the backbone registry imports torch (3 s), which reading a benchmark's resolved
    # record (`oodbench score` on a warm cache) never needs.
    from extract.backbones import Preprocessing, get_backbone_spec, preprocessing_from_config
    from extract.training import Recipe

    if isinstance(item, dict) and isinstance(item.get("name"), str):
        where = f"{where} ({item['name']})"
    _checked(where, item, BACKBONE_KEYS, {"name"})
    if "finetune" in item:
        return _finetuned_backbone(where, item)
    if bool(item.get("arch")) == bool(item.get("factory")):
        raise BenchmarkError(f"{where}: give either 'arch' (a registry architecture trained from 'train') or "
                             "'factory' + 'checkpoint' (a user model)")
    if item.get("arch"):
        try:
            get_backbone_spec(item["arch"])
        except ValueError as err:
            raise BenchmarkError(f"{where}: {err}") from err
        recipe = None
        if "train" in item:
            config = _checked_fields(f"{where}: train", item["train"], Recipe, Recipe.LIMITS)
            try:
                recipe = Recipe.from_config(config)
            except (ValueError, TypeError) as err:
                raise BenchmarkError(f"{where}: {err}") from err
        if (recipe is None) == ("checkpoint" not in item):
            raise BenchmarkError(f"{where}: architecture {item['arch']!r} needs either a 'train' recipe or a "
                                 "'checkpoint' with its weights")
        return BackboneConfig(item["name"], arch=item["arch"], recipe=recipe, checkpoint=item.get("checkpoint", ""))
    for key in ("checkpoint", "head", "preprocessing"):
        if key not in item:
            raise BenchmarkError(f"{where}: a factory backbone needs {key!r}")
    _checked_fields(f"{where}: preprocessing", item["preprocessing"], Preprocessing, PREPROCESSING_LIMITS)
    try:
        preprocessing_from_config(item["preprocessing"])
    except (ValueError, TypeError) as err:
        raise BenchmarkError(f"{where}: {err}") from err
    return BackboneConfig(item["name"], factory=item["factory"], checkpoint=item["checkpoint"],
                          kwargs=dict(item.get("kwargs", {})), head=item["head"],
                          layers=tuple(item.get("layers", ())), preprocessing=dict(item["preprocessing"]),
                          shaping_layer=item.get("shaping_layer", ""))


def _finetuned_backbone(where: str, item: dict) -> BackboneConfig:
    from extract.finetuning import FineTuneRecipe

    if set(item) != {"name", "finetune"}:
        raise BenchmarkError(f"{where}: a fine-tuned backbone has only 'name' and 'finetune' (its architecture, "
                             f"weights and layers are its base's); got {sorted(item)}")
    config = dict(item["finetune"])
    base = config.pop("from", "")
    if not base:
        raise BenchmarkError(f"{where}: 'finetune' needs 'from', the name of the backbone it starts from")
    _typed(f"{where}: finetune", "from", base, str)
    _checked_fields(f"{where}: finetune", config, FineTuneRecipe, FineTuneRecipe.LIMITS)
    try:
        recipe = FineTuneRecipe.from_config(config)
    except (ValueError, TypeError) as err:
        raise BenchmarkError(f"{where}: {err}") from err
    return BackboneConfig(item["name"], base=base, finetune=recipe)


def outlier_ref(recipe: FineTuneRecipe) -> DatasetRef:
    """The auxiliary outlier set of a fine-tuning recipe: a dataset name (its first split) or a
    mapping {dataset, split, params} like any OOD set of a benchmark file."""
    item = recipe.outliers if isinstance(recipe.outliers, dict) else {"dataset": recipe.outliers}
    entry = DATASETS.get(item["dataset"]) if isinstance(item.get("dataset"), str) else None
    item = {"split": entry.splits[0] if entry else "train", **item}
    return _dataset_ref("outliers", item, "outliers")


def _check_finetuned(source: str, backbones: tuple[BackboneConfig, ...], taken: set[str]) -> None:
    """Fine-tuned backbones start from an earlier registry-architecture backbone, and their auxiliary
    outliers are none of the benchmark's ID, test OOD or validation sets."""
    for i, config in enumerate(backbones):
        if config.finetune is None:
            continue
        where = f"{source}: backbones #{i + 1} ({config.name})"
        earlier = {c.name: c for c in backbones[:i]}
        if config.base not in earlier:
            raise BenchmarkError(f"{where}: fine-tunes {config.base!r}, which is not a backbone listed before it "
                                 f"({', '.join(earlier) or 'none'})")
        if not (earlier[config.base].arch or earlier[config.base].finetune):
            raise BenchmarkError(f"{where}: can only fine-tune a registry architecture ('arch'), not the factory "
                                 f"backbone {config.base!r}")
        if config.finetune.outliers:
            try:
                ref = outlier_ref(config.finetune)
            except BenchmarkError as err:
                raise BenchmarkError(f"{where}: {err}") from err
            if ref.dataset in taken:
                raise BenchmarkError(f"{where}: the auxiliary outliers {ref.dataset!r} must be disjoint from the ID "
                                     f"set, every test OOD set and the validation set ({', '.join(sorted(taken))})")
    names = [c.name for c in backbones]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BenchmarkError(f"{source}: backbones {duplicates} appear twice; give them distinct names")


def _method(where: str, item) -> MethodRef:
    if isinstance(item, str):
        item = {"name": item}
    _checked(where, item, {"name": str, "params": dict}, {"name"})
    ref = MethodRef(item["name"], dict(item.get("params", {})))
    try:
        make_method(ref.name, **ref.params)
    except (ValueError, TypeError) as err:
        raise BenchmarkError(f"{where}: {err}") from err
    return ref


def parse_benchmark(data: dict, source: str = "<mapping>") -> Benchmark:
    """Validate a benchmark mapping (as loaded from YAML) into a ``Benchmark``: every key is checked
    for its type and range here, and every error names ``source`` and the key."""
    from extract.extraction import ACTIVATION_DTYPES

    _checked(source, data, BENCHMARK_KEYS, {"name", "id", "ood", "backbones"},
             {"convention": CONVENTIONS, "fpr_rule": FPR_RULES})
    if data.get("fpr_rule") == "cal_metric" and data.get("convention", "id_positive") != "id_positive":
        raise BenchmarkError(f"{source}: fpr_rule cal_metric is defined with ID as the positive class; it needs "
                             "convention id_positive")
    id_config = _checked(f"{source}: id", data["id"], ID_KEYS, {"dataset", "fit_split", "test_split", "num_classes"},
                         {"num_classes": ">= 2"})
    id_ref = _dataset_ref(f"{source}: id", {"dataset": id_config["dataset"], "split": id_config["test_split"],
                                            "params": id_config.get("test_params") or {}}, "", "test_params")
    fit_ref = _dataset_ref(f"{source}: id fit split", {"dataset": id_ref.dataset, "split": id_config["fit_split"],
                                                       "params": id_config.get("fit_params") or {}}, "", "fit_params")
    if _same_data(fit_ref, id_ref):
        raise BenchmarkError(f"{source}: id: the fit split ({id_config['fit_split']!r}) and the test split are the "
                             "same data; the methods would be fit on the images they are tested on")
    val = _id_validation(f"{source}: id val", id_config.get("val", {}), id_ref, fit_ref)
    ood_config = data["ood"]
    grouped = isinstance(ood_config, dict)
    if grouped:
        _checked(f"{source}: ood", ood_config, {"near": list | None, "far": list | None})
    groups = ood_config.items() if grouped else [("", ood_config)]
    ood = []
    for group, items in groups:
        for i, item in enumerate(items or []):
            where = f"{source}: ood {group} #{i + 1}" if group else f"{source}: ood #{i + 1}"
            ood.append(_dataset_ref(where, item, group))
            _check_not_id(where, ood[-1], id_ref, fit_ref)
    ood = tuple(ood)
    if not ood:
        raise BenchmarkError(f"{source}: no OOD sets listed under 'ood'")
    labels = [ref.label for ref in ood]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise BenchmarkError(f"{source}: OOD sets {duplicates} appear twice; give them distinct 'name's")
    validation = None
    if data.get("validation") is not None:
        validation = _dataset_ref(f"{source}: validation", data["validation"], "validation")
        _check_not_id(f"{source}: validation", validation, id_ref, fit_ref)
        taken = {ref.dataset for ref in ood} | {id_ref.dataset}
        if validation.dataset in taken or validation.label in labels:
            raise BenchmarkError(f"{source}: the validation OOD set {validation.dataset!r} must be disjoint from "
                                 f"the ID set and every test OOD set ({', '.join(sorted(taken))}); hyperparameters "
                                 "selected on a test set would make its results optimistic")
    convention = data.get("convention", "id_positive")
    extraction = _checked(f"{source}: extraction", data.get("extraction", {}), EXTRACTION_KEYS,
                          limits={"batch_size": ">= 1", "activations_dtype": ACTIVATION_DTYPES})
    method_items = data.get("methods") or sorted(METHODS)
    seeds = check_seeds(data.get("seeds", [0]), f"{source}: seeds")
    if not data["backbones"]:
        raise BenchmarkError(f"{source}: no backbones listed under 'backbones'")
    backbones = tuple(_backbone(f"{source}: backbones #{i + 1}", b) for i, b in enumerate(data["backbones"]))
    _check_finetuned(source, backbones, {ref.dataset for ref in ood} | {id_ref.dataset}
                     | ({validation.dataset} if validation else set()))
    return Benchmark(
        name=data["name"], description=data.get("description", ""), id_dataset=id_ref.dataset,
        fit_split=id_config["fit_split"], test_split=id_config["test_split"],
        num_classes=id_config["num_classes"], ood=ood,
        backbones=backbones,
        methods=tuple(_method(f"{source}: methods #{i + 1}", m) for i, m in enumerate(method_items)),
        validation=validation, seeds=seeds, convention=convention,
        batch_size=extraction.get("batch_size", 256),
        layers=tuple(extraction.get("layers", ())), activations_dtype=extraction.get("activations_dtype", "float32"),
        source=source, fit_params=fit_ref.params, test_params=id_ref.params, val=val,
        fpr_rule=data.get("fpr_rule", "canonical"), fit_subsets=_fit_subsets(f"{source}: fit", data.get("fit", {})),
        intervals=parse_intervals(data.get("intervals", {}), f"{source}: intervals"))


def available_benchmarks() -> list[str]:
    return sorted(p.stem for p in BENCHMARK_DIR.glob("*.yaml"))


def benchmark_path(name_or_path: str | Path) -> Path:
    """The YAML file of a packaged benchmark name (e.g. 'fashion-mnist') or of a path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = BENCHMARK_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise BenchmarkError(f"no benchmark {str(name_or_path)!r}: not a file, and not one of the packaged "
                             f"benchmarks ({', '.join(available_benchmarks())})")
    return path


def load_benchmark(name_or_path: str | Path) -> Benchmark:
    """Load a packaged benchmark by name (e.g. 'fashion-mnist') or any YAML file by path."""
    path = benchmark_path(name_or_path)
    return parse_benchmark(_read_yaml(path), source=str(path))


def _read_yaml(path: Path):
    """The content of a YAML file; invalid YAML is a ``BenchmarkError`` naming the file."""
    with open(path) as handle:
        try:
            return yaml.safe_load(handle)
        except yaml.YAMLError as err:
            raise BenchmarkError(f"{path}: not valid YAML ({err})") from err
