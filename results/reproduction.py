"""Reproduction reports: a leaderboard beside a paper's published numbers, with the difference per cell.

The published values are data: ``benchmarks/published/tables.yaml`` holds one entry per paper table
(ASH, RG, UM; ``../shared/METHODS.md`` section 4) naming the packaged benchmark and backbone it
corresponds to, the paper's columns (OOD sets, their average) mapped to the benchmark's set
labels, the metrics in the order the paper prints them, and one row per method with the
harness method (name and hyperparameters) that implements it. A cell is written as the paper
prints it: ``"54.99/87.74"`` (one value per metric, ``-`` where the paper has none) with an
optional ``±std``.

Every row states its ``source``: the paper table that first printed the number, the code that
computed it, and the protocol facts a harness method must match to stand for it (the Mahalanobis
variant and its layers, ODIN's temperature, epsilon and epsilon units, the ID images statistics
were fitted on), plus the differences the harness run declares. ``tests/test_reproduction.py``
checks each row's method and parameters against these facts; the loader checks their form.

``reproduction_frame`` puts the harness's mean (± std over seeds, with the seed count) beside
the published value and ``ours - paper`` in percentage points; ``write_reproduction`` exports
it as CSV, LaTeX and Markdown, with one source line per row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import yaml

from results.leaderboard import (
    CONVENTIONS,
    ID_COLUMN,
    METRICS,
    Leaderboard,
    _latex_escape,
    _markdown_escape,
    _pipe_row,
    _prepare,
)

PUBLISHED_FILE = Path(__file__).resolve().parents[1] / "benchmarks" / "published" / "tables.yaml"
PARTS = ("ours", "paper", "diff")

MAHALANOBIS_VARIANTS = ("penultimate", "ensemble")  # METHODS.md 1.5(b) and 1.5(a)
ODIN_SPACES = ("pixel", "normalized")  # ODIN's epsilon units: [0,1] pixels, or the normalised input (METHODS.md 1.4)
# the ID images a source fitted (or tuned) a method's statistics on: its training set, a held-out
# ID validation split, or (any of) the ID test images the table is evaluated on
FIT_SETS = ("train", "validation", "test")
SOURCE_KEYS = ("paper", "code", "mahalanobis", "layers", "odin", "fit", "differs")
# facts a row may declare the harness run does not follow (with the reason): those no method
# parameter expresses; the Mahalanobis variant, its layers and ODIN's settings must match
DECLARABLE = ("fit",)


@dataclass(frozen=True)
class OdinSetting:
    """ODIN's hyperparameters in a source: temperature ``T`` and ``epsilon`` (None where the source
    does not state them) and the units of epsilon, ``space`` ('pixel' or 'normalized')."""

    T: float | None
    epsilon: float | None
    space: str

    def describe(self) -> str:
        T = "T not stated" if self.T is None else f"T = {self.T:g}"
        eps = "epsilon not stated" if self.epsilon is None else f"epsilon = {self.epsilon:g}"
        return f"ODIN {T}, {eps} ({'[0,1] pixel' if self.space == 'pixel' else 'normalised-input'} units)"


@dataclass(frozen=True)
class RowSource:
    """Where a published number comes from and the protocol facts behind it.

    ``paper``: the table that first printed it; ``code``: the repository (and file) that computed
    it, '' when there is none. ``mahalanobis``: 'penultimate' (1.5(b)) or 'ensemble' (the original
    multi-layer detector, 1.5(a)) for a Mahalanobis row, with ``layers``, the feature maps the
    code used, in the harness backbone's module names. ``odin``: ODIN's settings for an ODIN row.
    ``fit``: the ID images the source fitted (or tuned) the method on (``FIT_SETS``; 'test' when
    any of them are the ID test images). ``differs``: {fact: why} for facts the harness run does
    not follow (only ``DECLARABLE`` ones)."""

    paper: str
    code: str = ""
    mahalanobis: str = ""
    layers: tuple[str, ...] = ()
    odin: OdinSetting | None = None
    fit: str = ""
    differs: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        parts = [self.paper, f"code {self.code}" if self.code else "no public code"]
        if self.mahalanobis:
            parts.append(f"Mahalanobis {self.mahalanobis}" + (f" over {', '.join(self.layers)}" if self.layers else ""))
        if self.odin:
            parts.append(self.odin.describe())
        if self.fit:
            parts.append(f"fitted on ID {self.fit} images")
        return "; ".join(parts)


@dataclass(frozen=True)
class PublishedRow:
    """One method of a paper table: the paper's name for it, the harness leaderboard label that
    implements it (e.g. 'ash_s(p=95)'), the backbone it ran on, and its values in percent:
    {(column, metric): (mean, std or None)}; (``ID``, ``acc``) is the ID accuracy. ``method_name``
    and ``params`` are the harness method as the file names it; ``source`` says where the number
    comes from, ``note`` anything else a reader needs."""

    paper_method: str
    method: str
    backbone: str
    values: dict[tuple[str, str], tuple[float, float | None]]
    method_name: str = ""
    params: dict = field(default_factory=dict)
    source: RowSource | None = None
    note: str = ""

    def describe(self) -> str:
        """One line: the published number's source, the harness method standing for it, the
        differences the row declares and its note."""
        text = f"{self.paper_method}: {self.source.describe() if self.source else 'source not stated'}. " \
               f"Here: {self.method} on {self.backbone}."
        if self.source:
            text += "".join(f" Differs ({fact}): {why}" for fact, why in self.source.differs.items())
        return text + (f" {self.note}" if self.note else "")


@dataclass(frozen=True)
class PublishedTable:
    id: str
    source: str
    benchmark: str
    convention: str
    keys: tuple[tuple[str, str], ...]  # (benchmark column, metric) in the paper's order
    rows: tuple[PublishedRow, ...]
    note: str = ""


def _cell(text, where: str) -> tuple[float, float | None] | None:
    """'54.99', '20.83±1.58' or '-' (None)."""
    text = str(text).strip()
    if text in ("-", "—"):
        return None
    mean, _, std = text.partition("±")
    try:
        return float(mean), (float(std) if std else None)
    except ValueError:
        raise ValueError(f"{where}: {text!r} is not a number, 'mean±std' or '-'") from None


def _number_or_none(value, what: str, where: str, minimum: float, strict: bool) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not (value > minimum if strict else value >= minimum):
        raise ValueError(f"{where}: {what} must be a number {'>' if strict else '>='} {minimum:g} or null "
                         f"(not stated by the source), got {value!r}")
    return float(value)


def _source(record, where: str) -> RowSource:
    """A row's ``source`` mapping, checked for form (the consistency with the row's method is the
    test suite's: tests/test_reproduction.py)."""
    where = f"{where}: source"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: must be a mapping with keys {list(SOURCE_KEYS)} (at least paper), "
                         f"got {record!r}")
    unknown = sorted(set(record) - set(SOURCE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {list(SOURCE_KEYS)}")
    for key in ("paper", "code"):
        if key in record and not (isinstance(record[key], str) and record[key].strip()):
            raise ValueError(f"{where}: {key} must be a non-empty string, got {record[key]!r}")
    if "paper" not in record:
        raise ValueError(f"{where}: needs paper (the table that first printed the number)")
    mahalanobis = record.get("mahalanobis", "")
    if mahalanobis and mahalanobis not in MAHALANOBIS_VARIANTS:
        raise ValueError(f"{where}: mahalanobis must be one of {list(MAHALANOBIS_VARIANTS)}, got {mahalanobis!r}")
    layers = record.get("layers", [])
    if not isinstance(layers, list) or not all(isinstance(name, str) and name for name in layers):
        raise ValueError(f"{where}: layers must be a list of module names, got {layers!r}")
    if (mahalanobis == "ensemble") != bool(layers):
        raise ValueError(f"{where}: layers (the feature maps of the ensemble) go with mahalanobis: ensemble, and "
                         f"only with it; got mahalanobis {mahalanobis or 'absent'!r} and layers {layers}")
    odin = None
    if "odin" in record:
        setting = record["odin"]
        if not isinstance(setting, dict) or set(setting) != {"T", "epsilon", "space"}:
            raise ValueError(f"{where}: odin must be a mapping with exactly T, epsilon and space (T and epsilon "
                             f"null where the source does not state them), got {setting!r}")
        if setting["space"] not in ODIN_SPACES:
            raise ValueError(f"{where}: odin space (the units of epsilon) must be one of {list(ODIN_SPACES)}, "
                             f"got {setting['space']!r}")
        odin = OdinSetting(_number_or_none(setting["T"], "odin T", where, 0.0, strict=True),
                           _number_or_none(setting["epsilon"], "odin epsilon", where, 0.0, strict=False),
                           setting["space"])
    fit = record.get("fit", "")
    if fit and fit not in FIT_SETS:
        raise ValueError(f"{where}: fit must be one of {list(FIT_SETS)}, got {fit!r}")
    differs = record.get("differs", {})
    if not isinstance(differs, dict):
        raise ValueError(f"{where}: differs must map facts to the reason the harness run differs, got {differs!r}")
    for fact, why in differs.items():
        if fact not in DECLARABLE:
            raise ValueError(f"{where}: differs may only declare {list(DECLARABLE)} (facts no method parameter "
                             f"expresses), not {fact!r}: a row's method must match the rest")
        if not record.get(fact):
            raise ValueError(f"{where}: differs declares {fact!r}, which the source does not record")
        if not (isinstance(why, str) and why.strip()):
            raise ValueError(f"{where}: differs {fact!r} needs the reason, got {why!r}")
    return RowSource(record["paper"].strip(), record.get("code", "").strip(), mahalanobis, tuple(layers), odin, fit,
                     dict(differs))


ROW_KEYS = ("paper", "method", "params", "backbone", "values", "id_acc", "source", "note")


def _table(item: dict, where: str, label: Callable[[str, dict], str]) -> PublishedTable:
    where = f"{where} ({item.get('id', 'no id')})"
    required = {"id", "source", "benchmark", "backbone", "metrics", "columns", "rows"}
    missing, unknown = required - set(item), set(item) - required - {"convention", "note"}
    if missing or unknown:
        raise ValueError(f"{where}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
    metrics = tuple(item["metrics"])
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"{where}: unknown metrics {bad}; choose from {list(METRICS)}")
    convention = item.get("convention", "id_positive")
    if convention not in CONVENTIONS:
        raise ValueError(f"{where}: convention {convention!r} is not one of {list(CONVENTIONS)}")
    columns = dict(item["columns"])  # paper column -> benchmark column label ('avg' for the average)
    keys = tuple((columns[c], m) for c in columns for m in metrics)
    rows = []
    for i, row in enumerate(item["rows"]):
        here = f"{where}: row #{i + 1}"
        unknown = set(row) - set(ROW_KEYS)
        if unknown or not {"paper", "method", "values", "source"} <= set(row):
            raise ValueError(f"{here}: needs paper, method, values and source (optional params, backbone, id_acc, "
                             f"note); got {sorted(row)}" + (f", unknown {sorted(unknown)}" if unknown else ""))
        params = dict(row.get("params") or {})
        try:
            method = label(row["method"], params)
        except ValueError as err:
            raise ValueError(f"{here} ({row['paper']}): {err}") from err
        source = _source(row["source"], f"{here} ({row['paper']})")
        note = row.get("note", "")
        if not isinstance(note, str):
            raise ValueError(f"{here} ({row['paper']}): note must be a string, got {note!r}")
        values = {}
        for column, text in row["values"].items():
            if column not in columns:
                raise ValueError(f"{here} ({row['paper']}): column {column!r} is not one of {list(columns)}")
            parts = str(text).split("/")
            if len(parts) != len(metrics):
                raise ValueError(f"{here} ({row['paper']}): {column} {text!r} has {len(parts)} values for the "
                                 f"{len(metrics)} metrics {list(metrics)}")
            for metric, part in zip(metrics, parts):
                cell = _cell(part, f"{here} ({row['paper']}) {column}")
                if cell is not None:
                    values[columns[column], metric] = cell
        if "id_acc" in row:
            values[ID_COLUMN] = _cell(row["id_acc"], f"{here} ({row['paper']}) id_acc")
        rows.append(PublishedRow(str(row["paper"]), method, str(row.get("backbone", item["backbone"])), values,
                                 str(row["method"]), params, source, note.strip()))
    if any(ID_COLUMN in r.values for r in rows):
        keys += (ID_COLUMN,)
    return PublishedTable(str(item["id"]), str(item["source"]), str(item["benchmark"]), convention, keys,
                          tuple(rows), str(item.get("note", "")))


def load_published(label: Callable[[str, dict], str], path: str | Path | None = None) -> list[PublishedTable]:
    """Every table of the published-values file (default ``PUBLISHED_FILE``), validated (metrics,
    cell formats; the methods by ``label``). ``label(method, params)`` is the leaderboard label of
    a harness method (e.g. 'ash_s(p=95)'), a ValueError for an unknown method or parameter: the
    method registry's, which the harness hands in (``results`` sits below ``methods``)."""
    path = Path(path or PUBLISHED_FILE)
    data = yaml.safe_load(path.read_text()) or {}
    tables = [_table(item, f"{path}: tables #{i + 1}", label) for i, item in enumerate(data.get("tables", []))]
    ids = [t.id for t in tables]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: table ids appear twice: {sorted({i for i in ids if ids.count(i) > 1})}")
    return tables


def reproduction_frame(table: PublishedTable, boards: dict[str, Leaderboard]) -> pd.DataFrame:
    """The paper's rows with, per (column, metric), ``ours`` (mean in %), ``ours_std``, ``paper``,
    ``paper_std`` and ``diff`` = ours - paper (percentage points), plus ``n_seeds``. ``boards``
    maps backbone names to leaderboards of ``table.benchmark``; a method or set the run lacks is
    NaN. Raises ValueError when a board uses another metric convention than the paper."""
    records = []
    for row in table.rows:
        board = boards.get(row.backbone)
        if board is not None and board.convention != table.convention:
            raise ValueError(f"{table.id}: the paper's convention is {table.convention}, the leaderboard of "
                             f"{row.backbone} uses {board.convention}; metrics of different conventions are never "
                             "compared")
        present = board is not None and row.method in board.mean.index
        record = {("method", "", ""): row.paper_method, ("harness", "", ""): f"{row.method} on {row.backbone}",
                  ("n_seeds", "", ""): int(board.n_seeds[row.method]) if present else 0,
                  ("source", "", ""): row.describe()}
        for key in table.keys:
            ours = ours_std = np.nan
            if present and key in board.mean.columns:
                ours = 100 * board.mean.at[row.method, key]
                ours_std = 100 * board.std.at[row.method, key]
            paper, paper_std = row.values.get(key, (np.nan, None))
            record.update({(*key, "ours"): ours, (*key, "ours_std"): ours_std, (*key, "paper"): paper,
                           (*key, "paper_std"): np.nan if paper_std is None else paper_std,
                           (*key, "diff"): ours - paper})
        records.append(record)
    frame = pd.DataFrame(records)
    frame.columns = pd.MultiIndex.from_tuples(frame.columns, names=["column", "metric", "value"])
    return frame


def _number(mean: float, std: float) -> str:
    if np.isnan(mean):
        return "—"
    return f"{mean:.2f}" if np.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _diff(value: float) -> str:
    return "—" if np.isnan(value) else f"{value:+.2f}"


def _caption(table: PublishedTable) -> str:
    return (f"{table.source} beside this harness ({table.benchmark}): values in %, ours as mean ± std over the seeds "
            f"counted; diff = ours - paper in points. {CONVENTIONS[table.convention]}."
            + (f" {table.note}" if table.note else ""))


def write_reproduction(table: PublishedTable, frame: pd.DataFrame, folder: str | Path) -> list[Path]:
    """``<folder>/<table id>.csv`` (every number, flat columns ``<column>/<metric>/<value>``),
    ``.tex`` (booktabs) and ``.md``; returns the three paths."""
    folder = Path(folder)
    flat = frame.copy()
    flat.columns = ["/".join(p for p in key if p) for key in frame.columns]
    csv = _prepare(folder / f"{table.id}.csv")
    flat.to_csv(csv, index=False)

    def label(key):
        return "ID Acc" if key == ID_COLUMN else f"{key[0]} {METRICS[key[1]]}"

    cells = [[_number(r[(*k, "ours")], r[(*k, "ours_std")]) for k in table.keys] for _, r in frame.iterrows()]
    papers = [[_number(r[(*k, "paper")], r[(*k, "paper_std")]) for k in table.keys] for _, r in frame.iterrows()]
    diffs = [[_diff(r[(*k, "diff")]) for k in table.keys] for _, r in frame.iterrows()]
    names = [f"{r[('method', '', '')]} ({r[('n_seeds', '', '')]})" for _, r in frame.iterrows()]

    header = ["Method (seeds)"] + [f"{label(k)} {part}" for k in table.keys for part in PARTS]
    lines = [_markdown_escape(_caption(table)), "", _pipe_row([_markdown_escape(h) for h in header]),
             _pipe_row([":--"] + ["--:"] * (len(header) - 1))]
    for name, ours, paper, diff in zip(names, cells, papers, diffs):
        values = [v for triple in zip(ours, paper, diff) for v in triple]
        lines.append(_pipe_row([_markdown_escape(name)] + values))
    sources = list(frame[("source", "", "")]) if ("source", "", "") in frame.columns else []
    if sources:
        lines += ["", "Sources:", ""] + [f"- {_markdown_escape(text)}" for text in sources]
    markdown = _prepare(folder / f"{table.id}.md")
    markdown.write_text("\n".join(lines) + "\n")

    spans = " & ".join(rf"\multicolumn{{3}}{{c}}{{{_latex_escape(label(k))}}}" for k in table.keys)
    rules = "".join(rf"\cmidrule(lr){{{2 + 3 * i}-{4 + 3 * i}}}" for i in range(len(table.keys)))
    tex_lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_latex_escape(_caption(table))}}}",
                 r"\begin{tabular}{l" + "rrr" * len(table.keys) + "}", r"\toprule", rf" & {spans} \\", rules,
                 "Method (seeds) & " + " & ".join(["ours", "paper", r"$\Delta$"] * len(table.keys)) + r" \\",
                 r"\midrule"]
    for name, ours, paper, diff in zip(names, cells, papers, diffs):
        values = [_latex_escape(v) for triple in zip(ours, paper, diff) for v in triple]
        tex_lines.append(" & ".join([_latex_escape(name)] + values) + r" \\")
    tex_lines += [r"\bottomrule", r"\end{tabular}"]
    if sources:
        tex_lines += [r"\par\footnotesize", r"\begin{itemize}",
                      *(rf"\item {_latex_escape(text)}" for text in sources), r"\end{itemize}"]
    tex_lines += [r"\end{table}", ""]
    tex = _prepare(folder / f"{table.id}.tex")
    tex.write_text("\n".join(tex_lines))
    return [csv, tex, markdown]
