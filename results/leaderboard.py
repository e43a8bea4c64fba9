"""Leaderboards: aggregate tidy per-seed metrics and export them as CSV, LaTeX, Markdown or text.

The input is a tidy DataFrame with one row per (seed, method, OOD set) and the columns
listed in ``REQUIRED_COLUMNS``; ``df.attrs["convention"]`` (or a single-valued
``convention`` column) says which class is positive. Aggregation follows the spec:

1. per seed, the unweighted mean over OOD sets gives the ``avg`` column, and the
   unweighted means over the "near" and "far" sets give ``near avg`` / ``far avg``
   (only when the benchmark groups its sets);
2. over seeds, every per-set value, every average and the ID accuracy get a mean and
   a sample standard deviation (ddof=1, NaN with a single seed).

Values are kept as fractions; the exports show percentages with two decimals.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

METRICS = {"fpr95": "FPR@95", "auroc": "AUROC", "aupr_in": "AUPR-In", "aupr_out": "AUPR-Out"}
LOWER_IS_BETTER = frozenset({"fpr95"})  # every other metric, and the ID accuracy, is higher-is-better
REQUIRED_COLUMNS = ("benchmark", "backbone", "seed", "method", "ood_set", "group", *METRICS, "id_acc")
CONVENTIONS = {
    "id_positive": "ID is the positive class (FPR at 95% TPR of ID)",
    "ood_positive": "OOD is the positive class, as in OpenOOD v1.5 (FPR at 95% TPR of OOD)",
}
GROUPS = ("near", "far")
ID_COLUMN = ("ID", "acc")
RESERVED_COLUMNS = frozenset({"avg", "ID", *(f"{g} avg" for g in GROUPS)})


@dataclass(frozen=True)
class Leaderboard:
    """Aggregated results of one benchmark and backbone.

    ``mean`` and ``std`` are indexed by method (order of first appearance in the input)
    and have MultiIndex columns ``(column, metric)``: each OOD set in input order, then
    ``near avg`` and ``far avg`` (grouped benchmarks only), ``avg``, and ``("ID", "acc")``.
    Values are fractions; ``std`` is NaN for methods with a single seed.
    """

    mean: pd.DataFrame
    std: pd.DataFrame
    n_seeds: pd.Series
    convention: str
    benchmark: str
    backbone: str

    def to_csv(self, path: str | Path) -> Path:
        """Write a machine-readable CSV of numbers only and return its path.

        Columns: ``method``, then ``<column>/<metric>`` and ``<column>/<metric>_std`` for every
        column of the leaderboard, ``id_acc``, ``id_acc_std`` and ``n_seeds``; values are
        fractions at full precision. The convention is stated by the LaTeX/Markdown captions and
        by the ``convention`` column of the tidy ``metrics.csv`` beside it.
        """
        flat = {}
        for key in self.mean.columns:
            name = "id_acc" if key == ID_COLUMN else f"{key[0]}/{key[1]}"
            flat[name] = self.mean[key]
            flat[f"{name}_std"] = self.std[key]
        flat["n_seeds"] = self.n_seeds
        path = _prepare(path)
        pd.DataFrame(flat, index=self.mean.index).to_csv(path, index_label="method")
        return path

    def to_latex(self, path: str | Path, metrics: tuple[str, ...] = ("fpr95", "auroc")) -> Path:
        """Write a booktabs LaTeX table (``metrics`` per column, plus ID accuracy) and return its path.

        Cells are percentages with two decimals, ``$m \\pm s$`` when the method has several
        seeds; the best value per column is in ``\\textbf{}`` (ties all bold). Needs the
        ``booktabs`` package.
        """
        keys = _table_keys(self, metrics)
        cells = _format_cells(self, keys)
        spans = _header_spans(keys)
        top = [" "] + [rf"\multicolumn{{{n}}}{{c}}{{{_latex_escape(name)}}}" for name, n in spans]
        rules, start = [], 2
        for _, n in spans:
            rules.append(rf"\cmidrule(lr){{{start}-{start + n - 1}}}")
            start += n
        arrows = {True: r"$\downarrow$", False: r"$\uparrow$"}
        sub = ["Method"] + [f"{_latex_escape(_metric_label(k))} {arrows[_lower_is_better(k)]}" for k in keys]
        lines = [
            r"\begin{table}[ht]",
            r"\centering",
            rf"\caption{{{_latex_escape(_caption(self))}}}",
            rf"\begin{{tabular}}{{l{'r' * len(keys)}}}",
            r"\toprule",
            " & ".join(top) + r" \\",
            " ".join(rules),
            " & ".join(sub) + r" \\",
            r"\midrule",
        ]
        for method, row in zip(self.mean.index, cells):
            lines.append(" & ".join([_latex_escape(method)] + [_latex_cell(c) for c in row]) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
        path = _prepare(path)
        path.write_text("\n".join(lines))
        return path

    def to_markdown(self, path: str | Path, metrics: tuple[str, ...] = ("fpr95", "auroc")) -> Path:
        """Write a GitHub pipe table with the same content as ``to_latex`` and return its path.

        A caption line above the table states the benchmark, seeds and convention; the best
        value per column is bold (``**x**``, ties all bold).
        """
        keys = _table_keys(self, metrics)
        cells = _format_cells(self, keys)
        arrows = {True: "↓", False: "↑"}
        header = ["Method"] + [_markdown_escape(f"{_column_label(k)} {arrows[_lower_is_better(k)]}") for k in keys]
        lines = [_markdown_escape(_caption(self)), "", _pipe_row(header), _pipe_row([":--"] + ["--:"] * len(keys))]
        for method, row in zip(self.mean.index, cells):
            lines.append(_pipe_row([_markdown_escape(method)] + [_markdown_cell(c) for c in row]))
        path = _prepare(path)
        path.write_text("\n".join(lines) + "\n")
        return path

    def to_text(self) -> str:
        """Return a compact plain-text table: averages (overall, near, far), ID accuracy and seeds."""
        columns = [c for c in ("avg", "near avg", "far avg") if c in self.mean.columns]
        keys = [(c, m) for c in columns for m in ("fpr95", "auroc")] + [ID_COLUMN]
        cells = _format_cells(self, keys)
        header = ["method"] + [_column_label(k) for k in keys] + ["seeds"]
        rows = [
            [str(method)] + [_text_cell(c) for c in row] + [str(self.n_seeds[method])]
            for method, row in zip(self.mean.index, cells)
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def line(values: list[str]) -> str:
            first = values[0].ljust(widths[0])
            return "  ".join([first] + [v.rjust(w) for v, w in zip(values[1:], widths[1:])])

        return "\n".join([_caption(self), line(header), line(["-" * w for w in widths]), *map(line, rows)])


def build_leaderboard(metrics: pd.DataFrame) -> Leaderboard:
    """Aggregate a tidy metrics frame (one row per seed, method and OOD set) into a ``Leaderboard``.

    Raises ``ValueError`` for missing columns, an empty frame, an unknown, missing or mixed
    convention, several benchmarks or backbones, bad groups, duplicate or missing
    (method, seed, OOD set) rows, metric values outside [0, 1], and an ID accuracy that
    differs between the rows of one (method, seed).
    """
    _validate(metrics)
    convention = _convention(metrics)
    benchmark = _single_value(metrics, "benchmark")
    backbone = _single_value(metrics, "backbone")
    methods = list(dict.fromkeys(metrics["method"]))
    sets = list(dict.fromkeys(metrics["ood_set"]))

    # Per seed: columns (metric, ood_set) -> one (method, seed) x metric frame per OOD set.
    wide = metrics.set_index(["method", "seed", "ood_set"])[list(METRICS)].unstack("ood_set")
    if wide.isna().any().any():
        raise ValueError("every (method, seed) must have a row for every OOD set; some are missing")
    per_set = {s: wide.xs(s, axis=1, level="ood_set")[list(METRICS)] for s in sets}

    blocks = dict(per_set)
    groups = _groups(metrics)
    for group in GROUPS:
        members = [s for s in sets if groups[s] == group]
        if members:
            blocks[f"{group} avg"] = sum(per_set[s] for s in members) / len(members)
    blocks["avg"] = sum(per_set[s] for s in sets) / len(sets)
    id_acc = metrics.groupby(["method", "seed"])["id_acc"]
    if (id_acc.nunique() > 1).any():
        raise ValueError("id_acc must be the same on every row of a (method, seed)")
    blocks[ID_COLUMN[0]] = id_acc.first().to_frame(ID_COLUMN[1])

    per_seed = pd.concat(blocks, axis=1, names=["column", "metric"])
    by_method = per_seed.groupby(level="method")
    return Leaderboard(
        mean=by_method.mean().reindex(methods),
        std=by_method.std(ddof=1).reindex(methods),
        n_seeds=by_method.size().reindex(methods).rename("n_seeds"),
        convention=convention,
        benchmark=benchmark,
        backbone=backbone,
    )


def _validate(metrics: pd.DataFrame) -> None:
    """Check columns, emptiness, value ranges, reserved names and duplicate rows."""
    missing = [c for c in REQUIRED_COLUMNS if c not in metrics.columns]
    if missing:
        raise ValueError(f"metrics frame is missing columns: {', '.join(missing)}")
    if metrics.empty:
        raise ValueError("metrics frame is empty: nothing to put on a leaderboard")
    values = metrics[[*METRICS, "id_acc"]].to_numpy(dtype=float)
    if not np.all((values >= 0) & (values <= 1)):
        raise ValueError("metric values and id_acc must be fractions in [0, 1] (no NaN, no percentages)")
    reserved = RESERVED_COLUMNS.intersection(metrics["ood_set"])
    if reserved:
        raise ValueError(f"OOD set names clash with leaderboard columns: {sorted(reserved)}")
    if metrics.duplicated(["method", "seed", "ood_set"]).any():
        raise ValueError("duplicate rows for the same (method, seed, ood_set)")


def _convention(metrics: pd.DataFrame) -> str:
    """The convention from ``attrs["convention"]`` and/or a single-valued ``convention`` column."""
    convention = metrics.attrs.get("convention")
    if "convention" in metrics.columns:
        found = list(dict.fromkeys(metrics["convention"]))
        if len(found) > 1:
            raise ValueError(f"mixed conventions in one metrics frame: {found}")
        if convention is not None and convention != found[0]:
            raise ValueError(f"attrs convention {convention!r} disagrees with the column ({found[0]!r})")
        convention = found[0]
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {sorted(CONVENTIONS)} (df.attrs['convention']), "
                         f"got {convention!r}")
    return convention


def _single_value(metrics: pd.DataFrame, column: str) -> str:
    """The one value of ``column``; one leaderboard covers one benchmark and one backbone."""
    found = list(dict.fromkeys(metrics[column]))
    if len(found) > 1:
        raise ValueError(f"one leaderboard needs a single {column}, got {found}; build one per {column}")
    return str(found[0])


def _groups(metrics: pd.DataFrame) -> dict[str, str]:
    """Map each OOD set to its group; groups are all empty or all "near"/"far", one per set."""
    pairs = metrics[["ood_set", "group"]].drop_duplicates()
    if pairs["ood_set"].duplicated().any():
        raise ValueError("an OOD set appears with more than one group")
    groups = dict(zip(pairs["ood_set"], pairs["group"]))
    labels = set(groups.values())
    if labels != {""} and not labels <= set(GROUPS):
        raise ValueError(f"group must be '' for every set or one of {GROUPS} for every set, got {sorted(labels)}")
    return groups


# Formatting shared by the exporters.


@dataclass(frozen=True)
class _Cell:
    """One formatted table cell: mean and std in percent (std is None without several seeds)."""

    mean: str
    std: str | None
    best: bool


def _table_keys(board: Leaderboard, metrics: tuple[str, ...]) -> list[tuple[str, str]]:
    """The (column, metric) keys shown in LaTeX/Markdown: ``metrics`` for every column, then ID accuracy."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {list(METRICS)}")
    columns = [c for c in dict.fromkeys(board.mean.columns.get_level_values("column")) if c != ID_COLUMN[0]]
    return [(c, m) for c in columns for m in metrics] + [ID_COLUMN]


def _format_cells(board: Leaderboard, keys: list[tuple[str, str]]) -> list[list[_Cell]]:
    """Rows of formatted cells for ``keys``; best = lowest (FPR) or highest shown value, ties all best."""
    shown = (board.mean[keys] * 100).round(2)
    best = {k: shown[k].min() if _lower_is_better(k) else shown[k].max() for k in keys}
    rows = []
    for method in board.mean.index:
        row = []
        for k in keys:
            std = board.std.at[method, k]
            row.append(_Cell(
                mean=f"{shown.at[method, k]:.2f}",
                std=None if np.isnan(std) else f"{100 * std:.2f}",
                best=bool(shown.at[method, k] == best[k]),
            ))
        rows.append(row)
    return rows


def _caption(board: Leaderboard) -> str:
    """Caption stating benchmark, backbone, units, seed count and convention."""
    counts = board.n_seeds
    if counts.nunique() == 1 and counts.iloc[0] == 1:
        seeds = "1 seed"
    elif counts.nunique() == 1:
        seeds = f"mean ± std over {counts.iloc[0]} seeds"
    else:
        seeds = "mean ± std over seeds (" + ", ".join(f"{m}: {n}" for m, n in counts.items()) + ")"
    return (
        f"{board.benchmark} ({board.backbone}); values in %, {seeds}. "
        f"{CONVENTIONS[board.convention]}. Best value per column in bold."
    )


def _header_spans(keys: list[tuple[str, str]]) -> list[tuple[str, int]]:
    """Consecutive top-level column names of ``keys`` with the number of metrics under each."""
    spans: list[tuple[str, int]] = []
    for column, _ in keys:
        if spans and spans[-1][0] == column:
            spans[-1] = (column, spans[-1][1] + 1)
        else:
            spans.append((column, 1))
    return spans


def _lower_is_better(key: tuple[str, str]) -> bool:
    """Whether lower values of this (column, metric) are better (FPR only)."""
    return key[1] in LOWER_IS_BETTER


def _metric_label(key: tuple[str, str]) -> str:
    """Metric name under a column, e.g. "AUROC"; "Acc" for the ID accuracy."""
    return "Acc" if key == ID_COLUMN else METRICS[key[1]]


def _column_label(key: tuple[str, str]) -> str:
    """Flat label of a (column, metric) key, e.g. "near avg AUROC" or "ID Acc"."""
    return f"{key[0]} {_metric_label(key)}"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$",
}


def _latex_escape(text: str) -> str:
    """Escape LaTeX special characters (and write ± as $\\pm$)."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _latex_cell(cell: _Cell) -> str:
    """``m`` or ``$m \\pm s$``, in ``\\textbf`` (with ``\\boldmath`` for math) when best."""
    if cell.std is None:
        return rf"\textbf{{{cell.mean}}}" if cell.best else cell.mean
    value = rf"${cell.mean} \pm {cell.std}$"
    return rf"\textbf{{\boldmath{value}}}" if cell.best else value


def _markdown_escape(text: str) -> str:
    """Backslash-escape characters that Markdown tables or emphasis would interpret."""
    return "".join("\\" + ch if ch in "\\|*_`" else ch for ch in str(text))


def _markdown_cell(cell: _Cell) -> str:
    """``m`` or ``m ± s``, in ``**`` when best."""
    value = cell.mean if cell.std is None else f"{cell.mean} ± {cell.std}"
    return f"**{value}**" if cell.best else value


def _pipe_row(values: list[str]) -> str:
    """One row of a GitHub pipe table."""
    return "| " + " | ".join(values) + " |"


def _text_cell(cell: _Cell) -> str:
    """``m`` or ``m±s`` for the terminal table."""
    return cell.mean if cell.std is None else f"{cell.mean}±{cell.std}"


def _prepare(path: str | Path) -> Path:
    """``path`` as a Path, with its parent folder created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
