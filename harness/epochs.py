"""The OOD metrics of a training run across its epochs (the Unleashing Mask paper's Figures 1 and 2
for any backbone): every snapshot a backbone's recipe kept (``snapshot_every``) is extracted
through the normal cache - each is a backbone entry of its own - and scored by cache-only methods.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from extract.backbones import get_backbone_spec, registered_backbone
from extract.training import load_weights, snapshot_folder
from extract.weights import WeightsCorrupt
from harness.config import MethodRef
from harness.evaluation import Evaluation
from harness.pipeline import BenchmarkRun
from methods.base import method_class
from results.plots import plot_epoch_curves

HISTORY = ("train_loss", "train_acc", "test_loss", "test_acc")


def epoch_metrics(run: BenchmarkRun, backbone_name: str, methods: tuple[MethodRef, ...]) -> pd.DataFrame:
    """Tidy metrics (one row per seed, snapshot epoch, method and OOD set) with the snapshot's
    train/test loss and accuracy; trains the backbone first when it is not cached."""
    config = next((c for c in run.benchmark.backbones if c.name == backbone_name), None)
    if config is None:
        raise ValueError(f"benchmark {run.benchmark.name} has no backbone {backbone_name!r}; its backbones: "
                         f"{', '.join(c.name for c in run.benchmark.backbones)}")
    network = [str(ref.name) for ref in methods if "network" in method_class(ref.name).reads]
    if network:
        raise ValueError(f"the per-epoch report scores from the cache; {', '.join(network)} need network passes "
                         "per snapshot - choose cache-only methods")
    resolved, history = [], {}
    for seed in run.seeds:
        backbone = run.backbone(config, seed)
        recipe = config.recipe or config.finetune
        files = sorted(snapshot_folder(Path(backbone.info.get("weights", ""))).glob("epoch-*.pt"))
        if recipe is None or not files:
            raise ValueError(f"backbone {backbone_name} keeps no per-epoch snapshots; set 'snapshot_every: N' in its "
                             "'train' (or 'finetune') recipe and run again")
        spec = get_backbone_spec(backbone.architecture["registry"])
        for path in files:
            try:
                state, record = load_weights(path)
            except WeightsCorrupt as err:  # a snapshot is made only by training: say how to train again
                raise WeightsCorrupt(f"{err}; remove the run's weights (`oodbench cache rm "
                                     f"'weights/{Path(backbone.info['weights']).stem}*'`) and run again to "
                                     "retrain it") from err
            last = record["history"][-1]
            snapshot = registered_backbone(spec, state, f"{backbone_name}@{last['epoch']}",
                                           run.benchmark.num_classes, {"seed": seed, "epoch": last["epoch"]})
            resolved.append(run.resolved(snapshot, seed))
            history[snapshot.name, seed] = {"epoch": last["epoch"], **{k: last.get(k) for k in HISTORY}}
    evaluation = Evaluation(run.resolution(resolved), run.store, run.options.out_dir, run.summary)
    metrics = evaluation.evaluate(methods, plot=False)
    facts = pd.DataFrame([{"backbone": name, "seed": seed, **values} for (name, seed), values in history.items()])
    return metrics.merge(facts, on=["backbone", "seed"], how="left")


def write_epoch_report(run: BenchmarkRun, backbone_name: str,
                       methods: tuple[MethodRef, ...]) -> tuple[pd.DataFrame, list[Path]]:
    """``epoch_metrics`` written as ``epochs.csv`` (tidy, per seed) and plotted as ``epochs.png``
    (means over seeds) in ``<out>/<benchmark>/epochs/<backbone>/``; returns (metrics, files)."""
    metrics = epoch_metrics(run, backbone_name, methods)
    folder = Path(run.options.out_dir) / run.benchmark.name / "epochs" / backbone_name
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "epochs.csv"
    metrics.to_csv(table, index=False)
    seeds = sorted(metrics["seed"].unique())
    mean = metrics.groupby(["method", "ood_set", "epoch"], sort=False, as_index=False)[
        ["fpr95", "auroc", *HISTORY]].mean()
    title = (f"{run.benchmark.name} / {backbone_name}: OOD detection across training "
             f"(seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}; {metrics['convention'].iloc[0]})")
    return metrics, [table, plot_epoch_curves(mean, folder / "epochs.png", title)]
