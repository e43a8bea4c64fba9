"""Reproduction reports (results.reproduction): the published-values file, the side-by-side frame
with per-cell differences, its exports, and `oodbench` writing it for a benchmark a table names;
and the protocol check: every published row names a harness method that follows the protocol of
the row's recorded source (Mahalanobis variant and layers, ODIN's settings and units, fit set)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import results.reproduction as reproduction
from extract.backbones import get_backbone_spec
from harness.config import available_benchmarks, load_benchmark
from harness.evaluation import method_label
from methods import make_method, network_scores
from methods.network_scores import BACKBONE_LAYERS
from results.leaderboard import build_leaderboard
from results.reproduction import load_published, reproduction_frame, write_reproduction
from tests.conftest import oodbench
from tests.test_leaderboard import AUROC, FPR, ID_ACC, make_metrics

SOURCE = {"paper": "A paper, Table 9", "code": "someone/somecode"}
TABLE = {
    "id": "toy-table", "source": "A paper, Table 9", "benchmark": "cifar10", "backbone": "resnet18",
    "metrics": ["fpr95", "auroc"], "columns": {"CIFAR-100": "cifar100", "SVHN": "svhn", "Average": "avg"},
    "rows": [
        {"paper": "Energy", "method": "energy", "values": {"CIFAR-100": "50.00/80.00", "SVHN": "-/96.50±0.25",
                                                          "Average": "40.00/85.00"}, "id_acc": "91.00±0.50",
         "source": SOURCE},
        {"paper": "MSP", "method": "msp", "values": {"Average": "60.00/82.00"}, "source": SOURCE,
         "note": "A note on MSP."},
        {"paper": "Energy (T=2)", "method": "energy", "params": {"T": 2.0}, "values": {"Average": "41.00/86.00"},
         "source": {"paper": "Another paper, Table 2"}},
    ]}


def write_published(path, *tables):
    path.write_text(yaml.safe_dump({"tables": list(tables)}, sort_keys=False))
    return path


def test_packaged_published_values_load_with_their_cells(tmp_path):
    tables = {t.id: t for t in load_published(method_label)}
    assert len(tables) == 8
    ash = {row.paper_method: row for row in tables["ash-table1-resnet50"].rows}
    assert ash["ASH-S@90"].method == "ash_s" and ash["ASH-P@60"].method == method_label("ash_p", {"p": 60.0})
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
    (lambda t: t["rows"][1].pop("source"), "needs paper, method, values and source"),
    (lambda t: t["rows"][1].update({"comment": "x"}), "unknown ['comment']"),
    (lambda t: t["rows"][1].update({"note": 3}), "note must be a string"),
    (lambda t: t["rows"][1].update({"source": "ReAct"}), "source: must be a mapping"),
    (lambda t: t["rows"][1]["source"].update({"protocol": "x"}), "source: unknown keys ['protocol']"),
    (lambda t: t["rows"][1]["source"].pop("paper"), "source: needs paper"),
    (lambda t: t["rows"][1]["source"].update({"mahalanobis": "multi"}), "mahalanobis must be one of"),
    (lambda t: t["rows"][1]["source"].update({"mahalanobis": "ensemble"}), "layers (the feature maps"),
    (lambda t: t["rows"][1]["source"].update({"layers": ["conv1"]}), "only with it"),
    (lambda t: t["rows"][1]["source"].update({"odin": {"T": 1000, "epsilon": 0.005}}), "exactly T, epsilon and space"),
    (lambda t: t["rows"][1]["source"].update({"odin": {"T": 1000, "epsilon": 0.005, "space": "std"}}),
     "odin space (the units of epsilon) must be one of"),
    (lambda t: t["rows"][1]["source"].update({"odin": {"T": 0, "epsilon": 0.005, "space": "pixel"}}),
     "odin T must be a number > 0"),
    (lambda t: t["rows"][1]["source"].update({"fit": "val"}), "fit must be one of ['train', 'validation', 'test']"),
    (lambda t: t["rows"][1]["source"].update({"fit": "test", "differs": {"odin": "x"}}), "differs may only declare"),
    (lambda t: t["rows"][1]["source"].update({"differs": {"fit": "x"}}), "which the source does not record"),
    (lambda t: t["rows"][1]["source"].update({"fit": "test", "differs": {"fit": " "}}), "needs the reason"),
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
    assert flat.loc[1, "source"] == ("MSP: A paper, Table 9; code someone/somecode. Here: msp on resnet18. "
                                     "A note on MSP.")
    assert flat.loc[2, "source"].startswith("Energy (T=2): Another paper, Table 2; no public code. Here: energy(T=2)")
    text = markdown.read_text()
    assert "Sources:" in text and "- MSP: A paper, Table 9; code someone/somecode. Here: msp on resnet18." in text
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
             "rows": [{"paper": "Energy", "method": "energy", "values": {"Gaussian": "10.00/90.00", "Mean": "20/80"},
                       "source": {"paper": "A digits paper, Table 1"}}]}
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


# ---------------------------------------------------------------- the protocol check
# A published row compares like with like only when the harness method it names follows the
# protocol its source records. The facts are data (each row's `source` in tables.yaml); these rules
# tie them to the row's method and parameters.

MAHALANOBIS_VARIANT = {"mahalanobis": "penultimate", "mahalanobis_ens": "ensemble"}  # METHODS.md 1.5(b), 1.5(a)


def backbone_config(benchmark: str, backbone: str):
    """A benchmark's backbone entry; a fine-tuned one's base (its weights' architecture and layers)."""
    configs = {b.name: b for b in load_benchmark(benchmark).backbones}
    config = configs[backbone]
    while config.base:
        config = configs[config.base]
    return config


def ensemble_layers(benchmark: str, backbone: str, layers: str) -> tuple[str, ...]:
    """The module names a `mahalanobis_ens` layers parameter stands for on a benchmark's backbone
    ('backbone': the layers the backbone declares)."""
    if layers != BACKBONE_LAYERS:
        return tuple(name.strip() for name in layers.split(",") if name.strip())
    config = backbone_config(benchmark, backbone)
    return tuple(config.layers) or get_backbone_spec(config.arch).layers


def module_names(benchmark: str, backbone: str) -> set[str]:
    config = backbone_config(benchmark, backbone)
    with torch.device("meta"):  # the module tree only: no weights are allocated
        model = get_backbone_spec(config.arch).build(**config.kwargs)
    return {name for name, _ in model.named_modules() if name}


def protocol_mismatches(table, row) -> list[str]:
    """Where the harness method a published row names departs from the protocol of the row's
    source: the Mahalanobis variant and its layers, ODIN's T, epsilon and epsilon units, and the
    ID images fitted on (which a row may declare in `differs`, with the reason)."""
    method = make_method(row.method_name, **row.params)
    params, source, problems = method.get_params(), row.source, []
    variant = MAHALANOBIS_VARIANT.get(method.name, "")
    if variant != source.mahalanobis:
        problems.append(f"the source's Mahalanobis is {source.mahalanobis or 'absent'}, the method "
                        f"{method.name} is {variant or 'no Mahalanobis'}")
    elif variant == "ensemble":
        layers = ensemble_layers(table.benchmark, row.backbone, params["layers"])
        if layers != source.layers:
            problems.append(f"the ensemble runs over {list(layers)}, the source's over {list(source.layers)}")
        missing = sorted(set(layers) - module_names(table.benchmark, row.backbone))
        if missing:
            problems.append(f"{row.backbone} has no modules {missing}")
    if (method.name == "odin") != (source.odin is not None):
        records = "records" if source.odin else "has no"
        problems.append(f"the method is {method.name}, the source {records} ODIN settings")
    elif source.odin:
        odin = source.odin
        if odin.T is not None and params["T"] != odin.T:
            problems.append(f"ODIN T is {params['T']:g}, the source's {odin.T:g}")
        if odin.epsilon is not None and params["epsilon"] != odin.epsilon:
            problems.append(f"ODIN epsilon is {params['epsilon']:g}, the source's {odin.epsilon:g}")
        elif odin.epsilon and params["space"] != odin.space:  # the units of a zero step do not matter
            problems.append(f"ODIN epsilon is in {params['space']} units, the source's in {odin.space} units")
    if source.fit:
        ours = "validation" if getattr(method, "fits_on", "fit") == "val" else "train"
        if (ours != source.fit) != ("fit" in source.differs):
            problems.append(f"the source fits on ID {source.fit} images, the harness on ID {ours} images, and "
                            + ("differs declares it all the same" if ours == source.fit else "differs does not say so"))
    return [f"{table.id}: {row.paper_method} ({row.method} on {row.backbone}): {p}" for p in problems]


def test_every_published_row_follows_the_protocol_of_its_source():
    mismatches = [m for table in load_published(method_label) for row in table.rows
                  for m in protocol_mismatches(table, row)]
    assert not mismatches, "\n".join(mismatches)


def test_mahalanobis_and_odin_rows_run_each_papers_protocol():
    """Issue 17: ReAct's (ASH Table 1), GradNorm's (RG Table 1), the DICE code's (ASH Table 2) and
    UM's Mahalanobis is the multi-layer ensemble over the layers their code used; ODIN carries each
    paper's epsilon in its units (ReAct's tuned 0.005 / 0.03 in normalised units; GradNorm's 0)."""
    expected = {
        "ash-table1-resnet50": (("mahalanobis_ens", {"layers": "layer4"}),
                                ("odin", {"T": 1000.0, "epsilon": 0.005, "space": "normalized"})),
        "ash-table1-mobilenetv2": (("mahalanobis_ens", {"layers": "features.18"}),
                                   ("odin", {"T": 1000.0, "epsilon": 0.03, "space": "normalized"})),
        "ash-table2-cifar10": (("mahalanobis_ens", {}), ("odin", {"T": 1000.0, "epsilon": 0.0014, "space": "pixel"})),
        "ash-table2-cifar100": (("mahalanobis_ens", {}), ("odin", {"T": 1000.0, "epsilon": 0.0014, "space": "pixel"})),
        "rg-table1-bit": (("mahalanobis_ens", {"layers": "root,body.block1,body.block2,body.block3,body.block4"}),
                          ("odin", {"T": 1000.0, "epsilon": 0.0})),
        "um-table1-cifar10": (("mahalanobis_ens", {}), ("odin", {"T": 1000.0, "epsilon": 0.0014, "space": "pixel"})),
        "um-table1-cifar100": (("mahalanobis_ens", {}), ("odin", {"T": 1000.0, "epsilon": 0.0014, "space": "pixel"})),
    }
    tables = {t.id: t for t in load_published(method_label)}
    for table_id, (mahalanobis, odin) in expected.items():
        rows = {row.paper_method: row for row in tables[table_id].rows}
        assert rows["Mahalanobis"].method == method_label(*mahalanobis), table_id
        assert rows["ODIN"].method == method_label(*odin), table_id
        assert "mahalanobis_ens" in tables[table_id].note and "penultimate" in tables[table_id].note, table_id
    assert tables["ash-table2-cifar10"].rows[1].source.odin.epsilon is None  # DICE states no epsilon
    assert reproduction.ODIN_SPACES == network_scores.ODIN_SPACES  # results may not import methods: kept equal here
    assert tables["rg-table7-resnet50"].rows[0].source.fit == "train"


def protocol_case(tmp_path, row: dict, backbone: str) -> list[str]:
    """The protocol mismatches of one row on an imagenet backbone, loaded as the harness loads it."""
    table = {"id": "case", "source": "A case", "benchmark": "imagenet", "backbone": backbone,
             "metrics": ["fpr95"], "columns": {"Average": "avg"}, "rows": [{"values": {"Average": "50"}, **row}]}
    [table] = load_published(method_label, write_published(tmp_path / "published.yaml", table))
    return protocol_mismatches(table, table.rows[0])


REACT_ODIN = {"paper": "ReAct, Table 1", "odin": {"T": 1000.0, "epsilon": 0.005, "space": "normalized"}}
REACT_MAHALANOBIS = {"paper": "ReAct, Table 1", "mahalanobis": "ensemble", "layers": ["layer4"]}
GRADNORM_MAHALANOBIS = {"paper": "GradNorm, Table 1", "mahalanobis": "ensemble",
                        "layers": ["root", "body.block1", "body.block2", "body.block3", "body.block4"]}


@pytest.mark.parametrize("row, backbone, message", [
    # the mappings of the file before issue 17: the penultimate variant for the ensemble, default ODIN
    ({"paper": "Mahalanobis", "method": "mahalanobis", "source": REACT_MAHALANOBIS}, "resnet50",
     "the source's Mahalanobis is ensemble, the method mahalanobis is penultimate"),
    ({"paper": "ODIN", "method": "odin", "source": REACT_ODIN}, "resnet50",
     "ODIN epsilon is 0.0014, the source's 0.005"),
    ({"paper": "Mahalanobis", "method": "mahalanobis", "source": GRADNORM_MAHALANOBIS}, "bit-s-r101x1",
     "the method mahalanobis is penultimate"),
    # an ensemble over other layers: the backbone's declared ones, or a module the backbone lacks
    ({"paper": "Mahalanobis", "method": "mahalanobis_ens", "source": REACT_MAHALANOBIS}, "resnet50",
     "the ensemble runs over ['layer1', 'layer2', 'layer3', 'layer4'], the source's over ['layer4']"),
    ({"paper": "Mahalanobis", "method": "mahalanobis_ens", "source": GRADNORM_MAHALANOBIS,  # without the root
      "params": {"layers": "body.block1,body.block2,body.block3,body.block4"}}, "bit-s-r101x1",
     "the ensemble runs over ['body.block1'"),
    ({"paper": "Mahalanobis", "method": "mahalanobis_ens", "params": {"layers": "layer5"},
      "source": {**REACT_MAHALANOBIS, "layers": ["layer5"]}}, "resnet50", "resnet50 has no modules ['layer5']"),
    ({"paper": "Mahalanobis", "method": "mahalanobis_ens", "params": {"layers": "layer4"},
      "source": {"paper": "ViM", "mahalanobis": "penultimate"}}, "resnet50",
     "the source's Mahalanobis is penultimate, the method mahalanobis_ens is ensemble"),
    ({"paper": "MSP", "method": "msp", "source": REACT_MAHALANOBIS}, "resnet50", "the method msp is no Mahalanobis"),
    # ODIN: the epsilon's units, T, and settings on a row that is not ODIN or missing from one that is
    ({"paper": "ODIN", "method": "odin", "params": {"epsilon": 0.005}, "source": REACT_ODIN}, "resnet50",
     "ODIN epsilon is in pixel units, the source's in normalized units"),
    ({"paper": "ODIN", "method": "odin", "params": {"T": 1.0, "epsilon": 0.005, "space": "normalized"},
      "source": REACT_ODIN}, "resnet50", "ODIN T is 1, the source's 1000"),
    ({"paper": "ODIN", "method": "odin", "source": {"paper": "ReAct, Table 1"}}, "resnet50",
     "the method is odin, the source has no ODIN settings"),
    ({"paper": "Energy", "method": "energy", "source": REACT_ODIN}, "resnet50",
     "the method is energy, the source records ODIN settings"),
    # the fit set: a difference must be declared, and a declared one must be real
    ({"paper": "ReAct", "method": "react", "source": {"paper": "ReAct, Table 1", "fit": "test"}}, "resnet50",
     "the source fits on ID test images, the harness on ID train images, and differs does not say so"),
    ({"paper": "KNN", "method": "knn", "source": {"paper": "KNN", "fit": "train", "differs": {"fit": "no"}}},
     "resnet50", "differs declares it all the same"),
])
def test_a_row_whose_method_departs_from_its_source_is_caught(tmp_path, row, backbone, message):
    problems = protocol_case(tmp_path, row, backbone)
    assert any(message in p for p in problems), problems


@pytest.mark.parametrize("row, backbone", [
    ({"paper": "ODIN", "method": "odin", "params": {"epsilon": 0.005, "space": "normalized"}, "source": REACT_ODIN},
     "resnet50"),
    ({"paper": "ODIN", "method": "odin", "params": {"epsilon": 0.0},  # a zero step has no units
      "source": {"paper": "GradNorm", "odin": {"T": 1000.0, "epsilon": 0.0, "space": "normalized"}}}, "bit-s-r101x1"),
    ({"paper": "ODIN", "method": "odin", "source": {"paper": "DICE", "odin": {"T": None, "epsilon": None,
                                                                            "space": "normalized"}}}, "resnet50"),
    ({"paper": "Mahalanobis", "method": "mahalanobis_ens", "params": {"layers": "layer4"}, "source": REACT_MAHALANOBIS},
     "resnet50"),
    ({"paper": "Mahalanobis", "method": "mahalanobis_ens", "source": {**REACT_MAHALANOBIS, "layers": [
        "layer1", "layer2", "layer3", "layer4"]}}, "resnet50"),  # layers=backbone: the declared layers
    ({"paper": "Mahalanobis", "method": "mahalanobis", "source": {"paper": "ViM", "mahalanobis": "penultimate"}},
     "resnet50"),
    ({"paper": "ReAct", "method": "react", "source": {"paper": "ReAct", "fit": "test", "differs": {"fit": "why"}}},
     "resnet50"),
])
def test_a_row_that_follows_its_source_passes(tmp_path, row, backbone):
    assert protocol_case(tmp_path, row, backbone) == []
