"""Leaderboards: aggregate tidy per-seed metrics and export them as CSV, LaTeX, Markdown or text.

The input is a tidy DataFrame with one row per (seed, method, OOD set) and the columns
listed in ``REQUIRED_COLUMNS``; ``df.attrs["convention"]`` (or a single-valued
``convention`` column) says which class is positive. Aggregation follows the spec:

1. per seed, the unweighted mean over OOD sets gives the ``avg`` column, and the
   unweighted means over the "near" and "far" sets give ``near avg`` / ``far avg``
   (only when the benchmark groups its sets);
2. over seeds, every per-set value, every average and the ID accuracy get a mean and
   a sample standard deviation (ddof=1, NaN with a single seed): the training noise.

Given each (method, seed)'s resampled results (``results.uncertainty.MethodSamples``), every
value also gets its sample noise, kept apart from the seeds' spread:

3. the percentile bootstrap interval (``lo``, ``hi``) of the seed mean, the averages over OOD
   sets bootstrapped jointly (the same resamples averaged);
4. per column, every method's difference to the best one (lowest FPR, highest otherwise) with
   its interval and p-value (DeLong's test for a set's AUROC, a paired bootstrap otherwise), and
   ``tied``: the best method and every method whose Holm-corrected p-value is at least
   ``1 - level``, i.e. not significantly worse.

Values are kept as fractions; the exports show percentages with two decimals.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd

from results.uncertainty import (
    DEFAULT_LEVEL,
    METRIC_ORDER,
    MethodSamples,
    delong_test,
    holm,
    paired_bootstrap_test,
    percentile_interval,
)

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
COMPARISON_COLUMNS = ("column", "metric", "method", "best", "difference", "lo", "hi", "p", "p_holm", "test", "tied")


@dataclass(frozen=True)
class Leaderboard:
    """Aggregated results of one benchmark and backbone.

    ``mean`` and ``std`` are indexed by method (order of first appearance in the input)
    and have MultiIndex columns ``(column, metric)``: each OOD set in input order, then
    ``near avg`` and ``far avg`` (grouped benchmarks only), ``avg``, and ``("ID", "acc")``.
    Values are fractions; ``std`` is NaN for methods with a single seed.

    Built with resampled results (``build_leaderboard(..., samples=...)``), ``lo`` and ``hi``
    bound the ``level`` percentile bootstrap interval of every value over test samples,
    ``comparisons`` holds every method's test against the best of each column
    (``COMPARISON_COLUMNS``) and ``tied`` marks the best and those tied with it; ``compare``
    tests any two methods. Without them ``lo``/``hi`` are NaN, ``comparisons`` is empty and
    ``tied`` marks the values equal to the best at the two decimals shown.
    """

    mean: pd.DataFrame
    std: pd.DataFrame
    n_seeds: pd.Series
    convention: str
    benchmark: str
    backbone: str
    lo: pd.DataFrame
    hi: pd.DataFrame
    tied: pd.DataFrame
    comparisons: pd.DataFrame
    level: float | None = None  # None: built without resampled results
    resamples: int | None = None
    replicates: dict = field(default_factory=dict, repr=False)  # (column, metric) -> (methods, B) seed means
    components: dict = field(default_factory=dict, repr=False)  # OOD set -> seed-mean (V10, V01) per method

    def to_csv(self, path: str | Path) -> Path:
        """Write a machine-readable CSV of numbers only and return its path.

        Columns: ``method``, then for every column of the leaderboard ``<column>/<metric>``, its
        bootstrap interval ``<column>/<metric>_lo`` and ``_hi`` (NaN without resampled results)
        and its standard deviation over seeds ``<column>/<metric>_std``; the same four for
        ``id_acc``; and ``n_seeds``. Values are fractions at full precision. The convention is
        stated by the LaTeX/Markdown captions and by the ``convention`` column of the tidy
        ``metrics.csv`` beside it.
        """
        flat = {}
        for key in self.mean.columns:
            name = "id_acc" if key == ID_COLUMN else f"{key[0]}/{key[1]}"
            flat[name] = self.mean[key]
            flat[f"{name}_lo"] = self.lo[key]
            flat[f"{name}_hi"] = self.hi[key]
            flat[f"{name}_std"] = self.std[key]
        flat["n_seeds"] = self.n_seeds
        path = _prepare(path)
        pd.DataFrame(flat, index=self.mean.index).to_csv(path, index_label="method")
        return path

    def to_latex(self, path: str | Path, metrics: tuple[str, ...] = ("fpr95", "auroc")) -> Path:
        """Write a booktabs LaTeX table (``metrics`` per column, plus ID accuracy) and return its path.

        Cells are percentages with two decimals: ``$m \\pm h$`` with ``h`` half the width of the
        bootstrap interval, followed by ``(sd s)`` when the method has several seeds. The best
        value per column and those tied with it are in ``\\textbf{}``, which a note under the
        table explains. Needs the ``booktabs`` package.
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
        note = rf"\par\smallskip{{\footnotesize {_latex_escape(_bold_note(self))}}}"
        lines += [r"\bottomrule", r"\end{tabular}", note, r"\end{table}", ""]
        path = _prepare(path)
        path.write_text("\n".join(lines))
        return path

    def to_markdown(self, path: str | Path, metrics: tuple[str, ...] = ("fpr95", "auroc")) -> Path:
        """Write a GitHub pipe table with the same content as ``to_latex`` and return its path.

        A caption line above the table states the benchmark, seeds, intervals and convention; the
        best value per column and those tied with it are bold (``**x**``), which a note under the
        table explains.
        """
        keys = _table_keys(self, metrics)
        cells = _format_cells(self, keys)
        arrows = {True: "↓", False: "↑"}
        header = ["Method"] + [_markdown_escape(f"{_column_label(k)} {arrows[_lower_is_better(k)]}") for k in keys]
        lines = [_markdown_escape(_caption(self)), "", _pipe_row(header), _pipe_row([":--"] + ["--:"] * len(keys))]
        for method, row in zip(self.mean.index, cells):
            lines.append(_pipe_row([_markdown_escape(method)] + [_markdown_cell(c) for c in row]))
        lines += ["", _markdown_escape(_bold_note(self))]
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
            [str(method)] + [_plain_cell(c, "") for c in row] + [str(self.n_seeds[method])]
            for method, row in zip(self.mean.index, cells)
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def line(values: list[str]) -> str:
            first = values[0].ljust(widths[0])
            return "  ".join([first] + [v.rjust(w) for v, w in zip(values[1:], widths[1:])])

        return "\n".join([_caption(self), line(header), line(["-" * w for w in widths]), *map(line, rows)])

    def compare(self, a: str, b: str) -> pd.DataFrame:
        """Method ``a`` against method ``b`` in every column and metric: one row per (column,
        metric) with both values, ``difference`` = a - b, its interval (``lo``, ``hi``) at the
        board's level, the two-sided ``p`` and the ``test`` (``_test``). Needs resampled results."""
        if self.level is None:
            raise ValueError("comparing two methods needs a leaderboard built with resampled results (samples=)")
        missing = [name for name in (a, b) if name not in self.mean.index]
        if missing:
            raise ValueError(f"no method {missing[0]!r} on this leaderboard; it has {', '.join(self.mean.index)}")
        rows, methods = [], list(self.mean.index)
        for key in self.mean.columns:
            difference, lo, hi, p, test = _test(self, key, self.mean[key].to_numpy(), methods.index(a),
                                                methods.index(b))
            rows.append({"column": key[0], "metric": key[1], a: self.mean.at[a, key], b: self.mean.at[b, key],
                         "difference": difference, "lo": lo, "hi": hi, "p": p, "test": test})
        return pd.DataFrame(rows)


def build_leaderboard(metrics: pd.DataFrame, samples: dict[tuple[str, int], MethodSamples] | None = None,
                      level: float = DEFAULT_LEVEL) -> Leaderboard:
    """Aggregate a tidy metrics frame (one row per seed, method and OOD set) into a ``Leaderboard``;
    with ``samples`` ({(method, seed): its resampled results, the same resamples for all}), add the
    ``level`` bootstrap intervals and the tests against the best of each column.

    Raises ``ValueError`` for missing columns, an empty frame, an unknown, missing or mixed
    convention, several benchmarks or backbones, bad groups, duplicate or missing
    (method, seed, OOD set) rows, metric values outside [0, 1], an ID accuracy that
    differs between the rows of one (method, seed), and samples that miss a (method, seed).
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
    mean = by_method.mean().reindex(methods)
    board = Leaderboard(
        mean=mean,
        std=by_method.std(ddof=1).reindex(methods),
        n_seeds=by_method.size().reindex(methods).rename("n_seeds"),
        convention=convention,
        benchmark=benchmark,
        backbone=backbone,
        lo=pd.DataFrame(np.nan, index=mean.index, columns=mean.columns),
        hi=pd.DataFrame(np.nan, index=mean.index, columns=mean.columns),
        tied=_equal_to_best_shown(mean),
        comparisons=pd.DataFrame(columns=list(COMPARISON_COLUMNS)),
    )
    if samples is None:
        return board
    return _with_uncertainty(board, per_seed.index, {s: groups[s] for s in sets}, samples, level)


def _with_uncertainty(board: Leaderboard, rows: pd.MultiIndex, groups: dict[str, str],
                      samples: dict[tuple[str, int], MethodSamples], level: float) -> Leaderboard:
    """``board`` with its intervals, comparisons and ties from the resampled results of its
    (method, seed) ``rows``; ``groups`` maps each OOD set to its group."""
    missing = [row for row in rows if row not in samples]
    if missing:
        raise ValueError(f"no resampled results for (method, seed) {missing[0]}; give samples for every row")
    methods = list(board.mean.index)
    seeds_of = [[i for i, row in enumerate(rows) if row[0] == method] for method in methods]

    def seed_mean(per_row: list[np.ndarray]) -> np.ndarray:
        return np.stack([np.mean([per_row[i] for i in where], axis=0) for where in seeds_of])

    # Per (column, metric): the seed mean on every resample, (methods, B); averages over OOD sets
    # average the same resamples, which is the joint bootstrap of the average.
    replicates = {(s, metric): seed_mean([samples[row].replicates[s][:, k] for row in rows])
                  for s in groups for k, metric in enumerate(METRIC_ORDER)}
    members = {f"{g} avg": [s for s in groups if groups[s] == g] for g in GROUPS}
    members = {**{column: sets for column, sets in members.items() if sets}, "avg": list(groups)}
    for column, sets in members.items():
        for metric in METRIC_ORDER:
            replicates[column, metric] = np.mean([replicates[s, metric] for s in sets], axis=0)
    replicates[ID_COLUMN] = seed_mean([samples[row].accuracy for row in rows])
    components = {s: list(zip(seed_mean([samples[row].components[s][0] for row in rows]),
                              seed_mean([samples[row].components[s][1] for row in rows]))) for s in groups}
    lo, hi = board.lo.copy(), board.hi.copy()
    for key in board.mean.columns:
        lo[key], hi[key] = percentile_interval(replicates[key], level)
    board = replace(board, lo=lo, hi=hi, level=level, resamples=replicates[ID_COLUMN].shape[1], replicates=replicates,
                    components=components)
    comparisons = _comparisons(board)
    tied = comparisons.pivot(index="method", columns=["column", "metric"], values="tied")
    return replace(board, tied=tied.reindex(index=board.mean.index, columns=board.mean.columns).astype(bool),
                   comparisons=comparisons)


def _comparisons(board: Leaderboard) -> pd.DataFrame:
    """Every method against the best of each column (the first one on equal values): the
    difference, its interval, p-value and Holm-adjusted p-value over the methods of that column,
    and ``tied`` where that adjusted p-value is at least ``1 - level`` (the best is tied with itself)."""
    rows, methods = [], list(board.mean.index)
    for key in board.mean.columns:
        values = board.mean[key].to_numpy()
        best = int(np.argmin(values) if _lower_is_better(key) else np.argmax(values))
        tests = [(methods[i], *_test(board, key, values, i, best)) for i in range(len(methods)) if i != best]
        adjusted = holm([p for *_, p, _ in tests])
        rows.append({"column": key[0], "metric": key[1], "method": methods[best], "best": methods[best],
                     "difference": 0.0, "lo": 0.0, "hi": 0.0, "p": 1.0, "p_holm": 1.0, "test": "", "tied": True})
        for (method, difference, lo, hi, p, test), p_holm in zip(tests, adjusted):
            rows.append({"column": key[0], "metric": key[1], "method": method, "best": methods[best],
                         "difference": difference, "lo": lo, "hi": hi, "p": p, "p_holm": float(p_holm),
                         "test": test, "tied": bool(p_holm >= 1 - board.level)})
    return pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS))


def _test(board: Leaderboard, key: tuple[str, str], values: np.ndarray, a: int,
          b: int) -> tuple[float, float, float, float, str]:
    """The ``a``-th method against the ``b``-th on the same samples in column ``key`` (whose values
    are ``values``): ``(difference a - b, lo, hi, p, test)``. A single OOD set's AUROC: DeLong's test
    on the seed-mean components, with the normal interval ``d +- z se``; everything else (FPR@95,
    AUPR, averages over sets, ID accuracy): the paired bootstrap of the seed-mean difference
    (``results.uncertainty``)."""
    difference = float(values[a] - values[b])
    if key[1] == "auroc" and key[0] in board.components:
        components = board.components[key[0]]
        _, se, p = delong_test(components[a], components[b])
        z = NormalDist().inv_cdf((1 + board.level) / 2)
        return difference, difference - z * se, difference + z * se, p, "DeLong"
    replicates = board.replicates[key]
    lo, hi, _, p = paired_bootstrap_test(difference, replicates[a] - replicates[b], board.level)
    return difference, lo, hi, p, "paired bootstrap"


def _equal_to_best_shown(mean: pd.DataFrame) -> pd.DataFrame:
    """Without tests: the values equal to the best of their column at the two decimals shown."""
    shown = (mean * 100).round(2)
    best = {k: shown[k].min() if _lower_is_better(k) else shown[k].max() for k in shown.columns}
    return pd.DataFrame({k: shown[k] == best[k] for k in shown.columns}, index=mean.index)


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
    """One formatted table cell in percent: the value, half the width of its bootstrap interval
    (None without resampled results), its std over seeds (None without several seeds), and
    whether it is the best of its column or tied with it."""

    mean: str
    half: str | None
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
    """Rows of formatted cells for ``keys``; ``best`` from ``board.tied``."""
    half = (board.hi - board.lo) / 2
    rows = []
    for method in board.mean.index:
        row = []
        for k in keys:
            std, width = board.std.at[method, k], half.at[method, k]
            row.append(_Cell(
                mean=f"{100 * board.mean.at[method, k]:.2f}",
                half=None if np.isnan(width) else f"{100 * width:.2f}",
                std=None if np.isnan(std) else f"{100 * std:.2f}",
                best=bool(board.tied.at[method, k]),
            ))
        rows.append(row)
    return rows


def _caption(board: Leaderboard) -> str:
    """Caption stating benchmark, backbone, units, intervals, seed count and convention."""
    counts = board.n_seeds
    if counts.nunique() == 1 and counts.iloc[0] == 1:
        seeds = "1 seed"
    else:
        each = f"{counts.iloc[0]} seeds" if counts.nunique() == 1 else \
            "seeds (" + ", ".join(f"{m}: {n}" for m, n in counts.items()) + ")"
        seeds = f"mean over {each}, (sd s): their standard deviation (training noise)"
    intervals = "" if board.level is None else (
        f" ± half the width of the {board.level:.0%} percentile bootstrap interval over the test samples "
        f"({board.resamples} resamples; sample noise only, the networks held fixed);")
    return (f"{board.benchmark} ({board.backbone}); values in %,{intervals} {seeds}. "
            f"{CONVENTIONS[board.convention]}.")


def _bold_note(board: Leaderboard) -> str:
    """The note under a table saying what bold means."""
    if board.level is None:
        return "Bold: the best value per column."
    return (f"Bold: the best value per column and every value statistically tied with it: not worse at "
            f"{1 - board.level:.0%} after Holm's correction over the methods compared with the best (DeLong's "
            f"test for the AUROC of one OOD set, a paired bootstrap otherwise; every test in comparisons.csv).")


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
    """``m``, ``$m \\pm h$`` and `` (sd s)`` after it, in ``\\textbf`` (with ``\\boldmath`` for math) when best."""
    value = cell.mean if cell.half is None else rf"${cell.mean} \pm {cell.half}$"
    if cell.std is not None:
        value += f" (sd {cell.std})"
    if not cell.best:
        return value
    return rf"\textbf{{\boldmath{value}}}" if cell.half else rf"\textbf{{{value}}}"


def _markdown_escape(text: str) -> str:
    """Backslash-escape characters that Markdown tables or emphasis would interpret."""
    return "".join("\\" + ch if ch in "\\|*_`" else ch for ch in str(text))


def _markdown_cell(cell: _Cell) -> str:
    """``m``, ``m ± h`` and `` (sd s)`` after it, in ``**`` when best."""
    value = _plain_cell(cell, " ")
    return f"**{value}**" if cell.best else value


def _pipe_row(values: list[str]) -> str:
    """One row of a GitHub pipe table."""
    return "| " + " | ".join(values) + " |"


def _plain_cell(cell: _Cell, space: str) -> str:
    """``m``, ``m ± h`` and `` (sd s)`` after it (``space`` around the ±: compact for the terminal)."""
    value = cell.mean if cell.half is None else f"{cell.mean}{space}±{space}{cell.half}"
    return value if cell.std is None else f"{value} (sd {cell.std})"


def _prepare(path: str | Path) -> Path:
    """``path`` as a Path, with its parent folder created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
