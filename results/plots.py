"""Plots of OOD scores, rendered off-screen with matplotlib's Agg canvas and saved as PNG."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

N_BINS = 50
MAX_COLUMNS = 3


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
            ax.hist(by_set[name], bins=bins, density=True, histtype="step", linewidth=1.5, color=f"C{index}", label=name)
        ax.set_title(method)
        ax.set_xlabel("score (higher = more ID)")
        ax.set_ylabel("density")
        ax.legend(fontsize="small")
    for ax in axes[len(scores):]:
        ax.set_visible(False)
    if title is not None:
        figure.suptitle(title)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    figure.clear()
    return path
