"""Benchmark definitions: YAML files in ``benchmarks/`` parsed into small dataclasses, validated once.

A benchmark names its ID dataset (fit and test splits, class count), its OOD sets grouped
near/far, the validation OOD set that sweeps select hyperparameters on, the seeds, the metric
convention, the methods (default: every registered one), the backbones (a registry
architecture with a training recipe, or ``module:factory`` + checkpoint) and what extraction
caches. Every unknown key or name is an error that lists the valid ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from extract.datasets import DATASETS
from methods import METHODS, make_method
from results.metrics import CONVENTIONS

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

    @property
    def id_fit(self) -> DatasetRef:
        return DatasetRef(self.id_dataset, self.fit_split, self.fit_params, name=f"{self.id_dataset}-{self.fit_split}")

    @property
    def id_test(self) -> DatasetRef:
        return DatasetRef(self.id_dataset, self.test_split, self.test_params,
                          name=f"{self.id_dataset}-{self.test_split}")


class BenchmarkError(ValueError):
    """A benchmark file that cannot be used, with the file and the reason."""


def _check_keys(where: str, mapping: dict, required: set, optional: set) -> None:
    if not isinstance(mapping, dict):
        raise BenchmarkError(f"{where}: expected a mapping, got {type(mapping).__name__}")
    missing = required - set(mapping)
    unknown = set(mapping) - required - optional
    if missing or unknown:
        raise BenchmarkError(f"{where}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}; "
                             f"allowed: {sorted(required | optional)}")


def _dataset_ref(where: str, item, group: str) -> DatasetRef:
    if isinstance(item, str):
        item = {"dataset": item}
    _check_keys(where, item, {"dataset"}, {"split", "params", "name"})
    ref = DatasetRef(item["dataset"], item.get("split", "test"), dict(item.get("params", {})),
                     item.get("name", ""), group)
    if ref.dataset not in DATASETS:
        raise BenchmarkError(f"{where}: unknown dataset {ref.dataset!r}; registered: {', '.join(sorted(DATASETS))}")
    entry = DATASETS[ref.dataset]
    if ref.split not in entry.splits:
        raise BenchmarkError(f"{where}: dataset {ref.dataset!r} has no split {ref.split!r}; splits: {entry.splits}")
    unknown = set(ref.params) - set(entry.defaults)
    if unknown:
        raise BenchmarkError(f"{where}: dataset {ref.dataset!r} has no parameters {sorted(unknown)}; "
                             f"parameters: {entry.defaults or 'none'}")
    return ref


def _backbone(where: str, item: dict) -> BackboneConfig:
    # Imported here: the backbone registry imports torch (3 s), which reading a benchmark's resolved
    # record (`oodbench score` on a warm cache) never needs.
    from extract.backbones import get_backbone_spec, preprocessing_from_config
    from extract.training import Recipe

    _check_keys(where, item, {"name"}, {"arch", "train", "factory", "checkpoint", "kwargs", "head", "layers",
                                         "preprocessing", "shaping_layer", "finetune"})
    if "finetune" in item:
        return _finetuned_backbone(where, item)
    if bool(item.get("arch")) == bool(item.get("factory")):
        raise BenchmarkError(f"{where}: give either 'arch' (a registry architecture trained from 'train') or "
                             "'factory' + 'checkpoint' (a user model)")
    if item.get("arch"):
        try:
            get_backbone_spec(item["arch"])
            recipe = Recipe.from_config(item["train"]) if "train" in item else None
        except (ValueError, TypeError) as err:
            raise BenchmarkError(f"{where}: {err}") from err
        if (recipe is None) == ("checkpoint" not in item):
            raise BenchmarkError(f"{where}: architecture {item['arch']!r} needs either a 'train' recipe or a "
                                 "'checkpoint' with its weights")
        return BackboneConfig(item["name"], arch=item["arch"], recipe=recipe, checkpoint=str(item.get("checkpoint", "")))
    for key in ("checkpoint", "head", "preprocessing"):
        if key not in item:
            raise BenchmarkError(f"{where}: a factory backbone needs {key!r}")
    try:
        preprocessing_from_config(item["preprocessing"])
    except (ValueError, TypeError) as err:
        raise BenchmarkError(f"{where}: {err}") from err
    return BackboneConfig(item["name"], factory=item["factory"], checkpoint=str(item["checkpoint"]),
                          kwargs=dict(item.get("kwargs", {})), head=item["head"],
                          layers=tuple(item.get("layers", ())), preprocessing=dict(item["preprocessing"]),
                          shaping_layer=str(item.get("shaping_layer", "")))


def _finetuned_backbone(where: str, item: dict) -> BackboneConfig:
    from extract.finetuning import FineTuneRecipe

    if set(item) != {"name", "finetune"}:
        raise BenchmarkError(f"{where}: a fine-tuned backbone has only 'name' and 'finetune' (its architecture, "
                             f"weights and layers are its base's); got {sorted(item)}")
    config = dict(item["finetune"]) if isinstance(item["finetune"], dict) else {}
    base = config.pop("from", "")
    if not base:
        raise BenchmarkError(f"{where}: 'finetune' needs 'from', the name of the backbone it starts from")
    try:
        recipe = FineTuneRecipe.from_config(config)
    except (ValueError, TypeError) as err:
        raise BenchmarkError(f"{where}: {err}") from err
    return BackboneConfig(item["name"], base=str(base), finetune=recipe)


def outlier_ref(recipe: FineTuneRecipe) -> DatasetRef:
    """The auxiliary outlier set of a fine-tuning recipe: a dataset name (its first split) or a
    mapping {dataset, split, params} like any OOD set of a benchmark file."""
    item = recipe.outliers if isinstance(recipe.outliers, dict) else {"dataset": recipe.outliers}
    entry = DATASETS.get(item.get("dataset"))
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
    _check_keys(where, item, {"name"}, {"params"})
    ref = MethodRef(item["name"], dict(item.get("params", {})))
    try:
        make_method(ref.name, **ref.params)
    except ValueError as err:
        raise BenchmarkError(f"{where}: {err}") from err
    return ref


def parse_benchmark(data: dict, source: str = "<mapping>") -> Benchmark:
    """Validate a benchmark mapping (as loaded from YAML) into a ``Benchmark``."""
    _check_keys(source, data, {"name", "id", "ood", "backbones"},
                {"description", "validation", "seeds", "convention", "methods", "extraction"})
    _check_keys(f"{source}: id", data["id"], {"dataset", "fit_split", "test_split", "num_classes"},
                {"fit_params", "test_params"})
    id_config = data["id"]
    id_ref = _dataset_ref(f"{source}: id", {"dataset": id_config["dataset"], "split": id_config["test_split"],
                                            "params": id_config.get("test_params") or {}}, "")
    fit_ref = _dataset_ref(f"{source}: id fit split", {"dataset": id_ref.dataset, "split": id_config["fit_split"],
                                                       "params": id_config.get("fit_params") or {}}, "")
    ood_config = data["ood"]
    grouped = isinstance(ood_config, dict)
    if grouped:
        _check_keys(f"{source}: ood", ood_config, set(), {"near", "far"})
    groups = ood_config.items() if grouped else [("", ood_config)]
    ood = tuple(_dataset_ref(f"{source}: ood {group or ''} #{i + 1}", item, group)
                for group, items in groups for i, item in enumerate(items or []))
    if not ood:
        raise BenchmarkError(f"{source}: no OOD sets listed under 'ood'")
    labels = [ref.label for ref in ood]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise BenchmarkError(f"{source}: OOD sets {duplicates} appear twice; give them distinct 'name's")
    validation = None
    if data.get("validation") is not None:
        validation = _dataset_ref(f"{source}: validation", data["validation"], "validation")
        taken = {ref.dataset for ref in ood} | {id_ref.dataset}
        if validation.dataset in taken or validation.label in labels:
            raise BenchmarkError(f"{source}: the validation OOD set {validation.dataset!r} must be disjoint from "
                                 f"the ID set and every test OOD set ({', '.join(sorted(taken))}); hyperparameters "
                                 "selected on a test set would make its results optimistic")
    convention = data.get("convention", "id_positive")
    if convention not in CONVENTIONS:
        raise BenchmarkError(f"{source}: convention {convention!r} is not one of {CONVENTIONS}")
    extraction = data.get("extraction", {})
    _check_keys(f"{source}: extraction", extraction, set(), {"batch_size", "layers", "activations_dtype"})
    method_items = data.get("methods") or sorted(METHODS)
    seeds = data.get("seeds", [0])
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise BenchmarkError(f"{source}: seeds must be a non-empty list of integers, got {seeds!r}")
    backbones = tuple(_backbone(f"{source}: backbones #{i + 1}", b) for i, b in enumerate(data["backbones"]))
    _check_finetuned(source, backbones, {ref.dataset for ref in ood} | {id_ref.dataset}
                     | ({validation.dataset} if validation else set()))
    return Benchmark(
        name=data["name"], description=data.get("description", ""), id_dataset=id_ref.dataset,
        fit_split=data["id"]["fit_split"], test_split=data["id"]["test_split"],
        num_classes=int(data["id"]["num_classes"]), ood=ood,
        backbones=backbones,
        methods=tuple(_method(f"{source}: methods #{i + 1}", m) for i, m in enumerate(method_items)),
        validation=validation, seeds=tuple(seeds), convention=convention,
        batch_size=int(extraction.get("batch_size", 256)),
        layers=tuple(extraction.get("layers", ())), activations_dtype=extraction.get("activations_dtype", "float32"),
        source=source, fit_params=fit_ref.params, test_params=id_ref.params)


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
    with open(path) as handle:
        try:
            data = yaml.safe_load(handle)
        except yaml.YAMLError as err:
            raise BenchmarkError(f"{path}: not valid YAML ({err})") from err
    return parse_benchmark(data, source=str(path))
