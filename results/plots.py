"""Plots of OOD scores, rendered off-screen with matplotlib's Agg canvas and saved as PNG."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

N_BINS = 50
MAX_COLUMNS = 3


def _save(figure: Figure, path: str | Path, title: str | None) -> Path:
    """Title ``figure``, save it as a PNG at ``path`` (folders created) and release it."""
    if title is not None:
        figure.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    figure.clear()
    return path


def plot_score_histograms(
    scores: dict[str, dict[str, np.ndarray]], path: str | Path, title: str | None = None
) -> Path:
    """Plot ID vs OOD score histograms, one subplot per method, save a PNG and return its path.

    ``scores[method]`` maps ``"ID"`` (the ID test scores) and each OOD set name to 1-D
    arrays of scores where higher means more ID-like. Each subplot overlays the ID
    histogram (filled) and one step histogram per OOD set, all on the same bins and
    normalised to densities so that sets of different sizes compare. The figure is drawn
    on an Agg canvas (no display, no pyplot state) and released after saving.
    Raises ``ValueError`` for no methods, a method without ``"ID"`` scores, or arrays
    that are empty, not 1-D or not finite.
    """
    if not scores:
        raise ValueError("no methods to plot")
    for method, by_set in scores.items():
        if "ID" not in by_set:
            raise ValueError(f"method {method!r} has no 'ID' scores")
        for name, values in by_set.items():
            values = np.asarray(values)
            if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)):
                raise ValueError(f"scores of {method!r} / {name!r} must be a non-empty 1-D array of finite values")

    n_columns = min(MAX_COLUMNS, len(scores))
    n_rows = math.ceil(len(scores) / n_columns)
    figure = Figure(figsize=(4.5 * n_columns, 3.5 * n_rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(n_rows, n_columns, squeeze=False).ravel()
    for ax, (method, by_set) in zip(axes, scores.items()):
        bins = np.histogram_bin_edges(np.concatenate([np.asarray(v, dtype=float) for v in by_set.values()]), N_BINS)
        ax.hist(by_set["ID"], bins=bins, density=True, alpha=0.4, color="C0", label="ID")
        ood_sets = [name for name in by_set if name != "ID"]
        for index, name in enumerate(ood_sets, start=1):
            ax.hist(by_set[name], bins=bins, density=True, histtype="step", linewidth=1.5, color=f"C{index}",
                    label=name)
        ax.set_title(method)
        ax.set_xlabel("score (higher = more ID)")
        ax.set_ylabel("density")
        ax.legend(fontsize="small")
    for ax in axes[len(scores):]:
        ax.set_visible(False)
    return _save(figure, path, title)


def plot_epoch_curves(metrics, path: str | Path, title: str | None = None) -> Path:
    """The OOD metrics of a training run's snapshots against the epoch, with its loss and accuracy
    (the Unleashing Mask paper's Figures 1 and 2 for any backbone); save a PNG, return its path.

    ``metrics``: a tidy frame with one row per (method, ood_set, epoch) holding ``fpr95`` and
    ``auroc``, and per epoch ``train_loss``, ``test_loss``, ``train_acc``, ``test_acc`` (values
    as fractions; means over seeds when several). One row of panels per method: FPR@95 and AUROC
    per OOD set plus their unweighted average (thick, black); a last row with the losses and the
    accuracies.
    """
    if len(metrics) == 0:
        raise ValueError("no snapshot metrics to plot")
    methods = list(dict.fromkeys(metrics["method"]))
    figure = Figure(figsize=(11, 3.2 * (len(methods) + 1)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(methods) + 1, 2, squeeze=False)
    for row, method in zip(axes, methods):
        frame = metrics[metrics["method"] == method]
        for ax, metric, label in zip(row, ("fpr95", "auroc"), ("FPR@95TPR (%)", "AUROC (%)")):
            table = frame.pivot_table(index="epoch", columns="ood_set", values=metric, sort=False)
            for index, name in enumerate(table.columns):
                ax.plot(table.index, 100 * table[name], marker=".", linewidth=1, color=f"C{index}", label=name)
            ax.plot(table.index, 100 * table.mean(axis=1), marker="o", linewidth=2.5, color="black", label="average")
            ax.set_title(f"{method}: {label}")
        row[0].legend(fontsize="x-small", ncol=2)
    curves = metrics.groupby("epoch")[["train_loss", "test_loss", "train_acc", "test_acc"]].mean()
    loss_ax, acc_ax = axes[-1]
    for ax, names, label in ((loss_ax, ("train_loss", "test_loss"), "cross-entropy"),
                             (acc_ax, ("train_acc", "test_acc"), "accuracy (%)")):
        for name in names:
            values = curves[name] * (100 if "acc" in name else 1)
            ax.plot(curves.index, values, marker="o", label=name.replace("_", " "))
        ax.set_title(label)
        ax.legend(fontsize="small")
    for ax in axes.ravel():
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(figure, path, title)
