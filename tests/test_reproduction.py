"""Reproduction reports (results.reproduction): the published-values file, the side-by-side frame
with per-cell differences, its exports, and `oodbench` writing it for a benchmark a table names."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

import results.reproduction as reproduction
from harness.config import available_benchmarks, load_benchmark
from harness.evaluation import method_label
from results.leaderboard import build_leaderboard
from results.reproduction import load_published, reproduction_frame, write_reproduction
from tests.conftest import oodbench
from tests.test_leaderboard import AUROC, FPR, ID_ACC, make_metrics

TABLE = {
    "id": "toy-table", "source": "A paper, Table 9", "benchmark": "cifar10", "backbone": "resnet18",
    "metrics": ["fpr95", "auroc"], "columns": {"CIFAR-100": "cifar100", "SVHN": "svhn", "Average": "avg"},
    "rows": [
        {"paper": "Energy", "method": "energy", "values": {"CIFAR-100": "50.00/80.00", "SVHN": "-/96.50±0.25",
                                                          "Average": "40.00/85.00"}, "id_acc": "91.00±0.50"},
        {"paper": "MSP", "method": "msp", "values": {"Average": "60.00/82.00"}},
        {"paper": "Energy (T=2)", "method": "energy", "params": {"T": 2.0}, "values": {"Average": "41.00/86.00"}},
    ]}


def write_published(path, *tables):
    path.write_text(yaml.safe_dump({"tables": list(tables)}, sort_keys=False))
    return path


def test_packaged_published_values_load_with_their_cells(tmp_path):
    tables = {t.id: t for t in load_published(method_label)}
    assert len(tables) == 8
    ash = {row.paper_method: row for row in tables["ash-table1-resnet50"].rows}
    assert ash["ASH-S@90"].method == "ash_s" and ash["ASH-P@60"].method == "ash_p(p=60)"
    assert ash["ASH-S@90"].values["textures", "fpr95"] == (11.93, None)
    assert ash["ASH-S@90"].values["avg", "auroc"] == (95.12, None)
    dice = next(r for r in tables["ash-table2-cifar10"].rows if r.paper_method == "DICE")
    assert dice.values["avg", "fpr95"] == (20.83, 1.58) and dice.values["avg", "auroc"] == (95.24, 0.24)
    um = {row.paper_method: row for row in tables["um-table1-cifar10"].rows}
    assert um["Energy+UM"].backbone == "densenet-bc-100+um" and um["Energy+UM"].values["ID", "acc"] == (92.80, 0.47)
    assert tables["um-table1-cifar10"].keys[-1] == ("ID", "acc")
    assert tables["rg-table7-resnet50"].rows[-1].method == "rg(k=0.5)"


def test_published_tables_name_packaged_benchmarks_sets_and_backbones():
    """Every table names a packaged benchmark, maps its columns to that file's OOD labels and its
    rows to that file's backbones."""
    for table in load_published(method_label):
        assert table.benchmark in available_benchmarks(), table.id
        bench = load_benchmark(table.benchmark)
        labels = {ref.label for ref in bench.ood} | {"avg", "ID"}
        assert {column for column, _ in table.keys} <= labels, table.id
        assert {row.backbone for row in table.rows} <= {b.name for b in bench.backbones}, table.id


@pytest.mark.parametrize("change, message", [
    (lambda t: t["rows"][0]["values"].update({"SVHN": "1/2/3"}), "has 3 values for the 2 metrics"),
    (lambda t: t["rows"][0]["values"].update({"SVHN": "1/abc"}), "'abc' is not a number, 'mean±std' or '-'"),
    (lambda t: t["rows"][1].update({"method": "nope"}), "unknown method 'nope'"),
    (lambda t: t["rows"][1].update({"params": {"tau": 1}}), "row #2 (MSP): "),
    (lambda t: t["rows"][1]["values"].update({"LSUN": "1/2"}), "column 'LSUN' is not one of"),
    (lambda t: t.update({"metrics": ["fpr"]}), "unknown metrics ['fpr']"),
    (lambda t: t.pop("benchmark"), "missing keys ['benchmark']"),
])
def test_malformed_published_tables_say_what_is_wrong(tmp_path, change, message):
    table = yaml.safe_load(yaml.safe_dump(TABLE))
    change(table)
    with pytest.raises(ValueError) as err:
        load_published(method_label, write_published(tmp_path / "published.yaml", table))
    assert message in str(err.value) and "toy-table" in str(err.value)


def test_frame_puts_the_seed_mean_beside_the_paper_with_the_difference(tmp_path):
    [table] = load_published(method_label, write_published(tmp_path / "published.yaml", TABLE))
    board = build_leaderboard(make_metrics())  # energy and msp, seeds 0 and 1, on cifar100/tin/svhn
    frame = reproduction_frame(table, {"resnet18": board})
    energy, msp, energy_t2 = (frame.iloc[i] for i in range(3))
    ours = 100 * np.mean([FPR["energy", s][0] for s in (0, 1)])  # cifar100 FPR over the two seeds
    assert energy["cifar100", "fpr95", "ours"] == pytest.approx(ours)
    assert energy["cifar100", "fpr95", "ours_std"] == pytest.approx(100 * np.std([0.50, 0.60], ddof=1))
    assert energy["cifar100", "fpr95", "diff"] == pytest.approx(ours - 50.0)
    svhn_auroc = 100 * np.mean([AUROC["energy", s][2] for s in (0, 1)])
    assert energy["svhn", "auroc", "diff"] == pytest.approx(svhn_auroc - 96.50)
    assert energy["svhn", "auroc", "paper_std"] == 0.25
    assert np.isnan(energy["svhn", "fpr95", "paper"]) and np.isnan(energy["svhn", "fpr95", "diff"])  # "-"
    msp_avg = 100 * np.mean([np.mean(FPR["msp", s]) for s in (0, 1)])  # unweighted over sets, then seeds
    assert msp["avg", "fpr95", "diff"] == pytest.approx(msp_avg - 60.0)
    assert energy["ID", "acc", "diff"] == pytest.approx(100 * np.mean([ID_ACC["energy", s] for s in (0, 1)]) - 91.0)
    assert (energy["n_seeds"].item(), msp["n_seeds"].item(), energy_t2["n_seeds"].item()) == (2, 2, 0)
    assert np.isnan(energy_t2["avg", "fpr95", "ours"])  # energy(T=2) was not run: no number, never a guess

    csv, tex, markdown = write_reproduction(table, frame, tmp_path / "out")
    flat = pd.read_csv(csv)
    assert flat.loc[0, "cifar100/fpr95/diff"] == pytest.approx(ours - 50.0)
    assert list(flat["method"]) == ["Energy", "MSP", "Energy (T=2)"]
    text = markdown.read_text()
    assert f"| Energy (2) | {ours:.2f} ± {100 * np.std([0.5, 0.6], ddof=1):.2f} | 50.00 | {ours - 50:+.2f} |" in text
    assert "| Energy (T=2) (0) | — |" in text and "A paper, Table 9" in text
    assert r"\cmidrule(lr){2-4}" in tex.read_text() and r"$\Delta$" in tex.read_text()

    other = build_leaderboard(make_metrics(convention="ood_positive"))
    with pytest.raises(ValueError, match="metrics of different conventions are never compared"):
        reproduction_frame(table, {"resnet18": other})


def test_a_run_of_a_benchmark_a_table_names_writes_the_reproduction(warm, cache_copy, tmp_path, capsys, monkeypatch):
    table = {"id": "digits-paper", "source": "A digits paper, Table 1", "benchmark": "digits",
             "backbone": "digits-net", "metrics": ["fpr95", "auroc"],
             "columns": {"Gaussian": "gaussian", "Mean": "avg"},
             "rows": [{"paper": "Energy", "method": "energy", "values": {"Gaussian": "10.00/90.00", "Mean": "20/80"}}]}
    monkeypatch.setattr(reproduction, "PUBLISHED_FILE", write_published(tmp_path / "published.yaml", table))
    code, out, err = oodbench(capsys, "leaderboard", "digits", "--cache-dir", cache_copy, "--out", tmp_path / "out",
                              "--quiet")
    assert code == 0, err
    flat = pd.read_csv(tmp_path / "out/digits/reproduction/digits-paper.csv")
    board = pd.read_csv(tmp_path / "out/digits/digits-net/leaderboard.csv", index_col="method")
    assert flat.loc[0, "gaussian/fpr95/ours"] == pytest.approx(100 * board.loc["energy", "gaussian/fpr95"])
    assert flat.loc[0, "avg/auroc/diff"] == pytest.approx(100 * board.loc["energy", "avg/auroc"] - 80.0)
    report = (tmp_path / "out/digits/report.md").read_text()
    assert "## Beside the paper: A digits paper, Table 1" in report
