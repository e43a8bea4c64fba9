"""Tests of results.leaderboard (aggregation and exports) and results.plots."""
import re

import numpy as np
import pandas as pd
import pytest

from results.leaderboard import METRICS, build_leaderboard
from results.plots import plot_score_histograms

SETS = {"cifar100": "near", "tin": "near", "svhn": "far"}
# FPR@95 and AUROC per (method, seed) and OOD set, in the order of SETS.
FPR = {
    ("energy", 0): [0.50, 0.40, 0.10],
    ("energy", 1): [0.60, 0.30, 0.20],
    ("msp", 0): [0.70, 0.55, 0.30],
    ("msp", 1): [0.65, 0.45, 0.40],
}
AUROC = {
    ("energy", 0): [0.80, 0.85, 0.95],
    ("energy", 1): [0.82, 0.83, 0.97],
    ("msp", 0): [0.75, 0.78, 0.90],
    ("msp", 1): [0.77, 0.80, 0.88],
}
ID_ACC = {("energy", 0): 0.90, ("energy", 1): 0.92, ("msp", 0): 0.90, ("msp", 1): 0.92}


def make_metrics(seeds=(0, 1), groups=True, convention="id_positive"):
    """A tidy metrics frame: seeds x {energy, msp} x 3 OOD sets with the values above."""
    rows = []
    for seed in seeds:
        for method in ("energy", "msp"):
            for i, (ood_set, group) in enumerate(SETS.items()):
                rows.append({
                    "benchmark": "cifar10", "backbone": "resnet18", "seed": seed, "method": method,
                    "ood_set": ood_set, "group": group if groups else "",
                    "fpr95": FPR[method, seed][i], "auroc": AUROC[method, seed][i],
                    "aupr_in": 0.5 + 0.1 * i, "aupr_out": 0.4 + 0.1 * seed,
                    "id_acc": ID_ACC[method, seed],
                })
    frame = pd.DataFrame(rows)
    frame.attrs["convention"] = convention
    return frame


@pytest.fixture
def board():
    return build_leaderboard(make_metrics())


def test_layout(board):
    assert list(board.mean.index) == ["energy", "msp"]
    columns = list(dict.fromkeys(board.mean.columns.get_level_values(0)))
    assert columns == ["cifar100", "tin", "svhn", "near avg", "far avg", "avg", "ID"]
    assert board.mean.columns[-1] == ("ID", "acc")
    assert list(board.mean["avg"].columns) == list(METRICS)
    assert board.std.columns.equals(board.mean.columns)
    assert (board.convention, board.benchmark, board.backbone) == ("id_positive", "cifar10", "resnet18")
    assert board.n_seeds.to_dict() == {"energy": 2, "msp": 2}


def test_per_set_mean_and_std(board):
    for i, ood_set in enumerate(SETS):
        values = [FPR["energy", 0][i], FPR["energy", 1][i]]
        assert board.mean.at["energy", (ood_set, "fpr95")] == pytest.approx(np.mean(values))
        assert board.std.at["energy", (ood_set, "fpr95")] == pytest.approx(np.std(values, ddof=1))
    assert board.mean.at["msp", ("tin", "auroc")] == pytest.approx(0.79)
    assert board.std.at["msp", ("tin", "auroc")] == pytest.approx(np.std([0.78, 0.80], ddof=1))
    assert board.mean.at["msp", ("svhn", "aupr_in")] == pytest.approx(0.7)
    assert board.std.at["msp", ("svhn", "aupr_in")] == pytest.approx(0.0)


def test_averages_per_seed_then_over_seeds(board):
    # msp FPR: seed 0 avg = (0.70+0.55+0.30)/3, seed 1 avg = (0.65+0.45+0.40)/3.
    per_seed_avg = [np.mean(FPR["msp", 0]), np.mean(FPR["msp", 1])]
    assert board.mean.at["msp", ("avg", "fpr95")] == pytest.approx(np.mean(per_seed_avg))
    assert board.std.at["msp", ("avg", "fpr95")] == pytest.approx(np.std(per_seed_avg, ddof=1))
    near = [np.mean(AUROC["energy", s][:2]) for s in (0, 1)]
    assert board.mean.at["energy", ("near avg", "auroc")] == pytest.approx(np.mean(near))
    assert board.std.at["energy", ("near avg", "auroc")] == pytest.approx(np.std(near, ddof=1))
    far = [AUROC["energy", s][2] for s in (0, 1)]
    assert board.mean.at["energy", ("far avg", "auroc")] == pytest.approx(0.96)
    assert board.std.at["energy", ("far avg", "auroc")] == pytest.approx(np.std(far, ddof=1))
    assert board.mean.at["energy", ("ID", "acc")] == pytest.approx(0.91)
    assert board.std.at["energy", ("ID", "acc")] == pytest.approx(np.std([0.90, 0.92], ddof=1))


def test_average_is_unweighted_over_sets_not_groups(board):
    # The overall avg weighs the three sets equally, not the two groups.
    expected = np.mean([np.mean(FPR["energy", s]) for s in (0, 1)])
    assert board.mean.at["energy", ("avg", "fpr95")] == pytest.approx(expected)
    group_mean = (board.mean.at["energy", ("near avg", "fpr95")] + board.mean.at["energy", ("far avg", "fpr95")]) / 2
    assert board.mean.at["energy", ("avg", "fpr95")] != pytest.approx(group_mean)


def test_no_groups_omits_group_averages():
    board = build_leaderboard(make_metrics(groups=False))
    columns = list(dict.fromkeys(board.mean.columns.get_level_values(0)))
    assert columns == ["cifar100", "tin", "svhn", "avg", "ID"]
    assert "near" not in board.to_text()


def test_single_seed_has_nan_std_and_no_plus_minus(tmp_path):
    board = build_leaderboard(make_metrics(seeds=(0,)))
    assert board.n_seeds.to_dict() == {"energy": 1, "msp": 1}
    assert board.std.isna().all().all()
    assert board.mean.at["energy", ("avg", "fpr95")] == pytest.approx(np.mean(FPR["energy", 0]))
    latex = board.to_latex(tmp_path / "t.tex").read_text()
    markdown = board.to_markdown(tmp_path / "t.md").read_text()
    assert r"\pm" not in latex and "±" not in markdown and "±" not in board.to_text()
    assert "1 seed" in latex and "1 seed" in markdown


def test_csv_round_trip(board, tmp_path):
    path = board.to_csv(tmp_path / "out" / "board.csv")
    assert path.is_file()
    frame = pd.read_csv(path, index_col="method")
    assert list(frame.index) == ["energy", "msp"]
    assert all(pd.api.types.is_numeric_dtype(dtype) for dtype in frame.dtypes)
    assert frame.columns[:4].tolist() == ["cifar100/fpr95", "cifar100/fpr95_lo", "cifar100/fpr95_hi",
                                          "cifar100/fpr95_std"]
    assert frame.columns[-5:].tolist() == ["id_acc", "id_acc_lo", "id_acc_hi", "id_acc_std", "n_seeds"]
    assert frame.filter(regex="_(lo|hi)$").isna().all().all()  # no resampled results: no intervals
    assert frame.at["msp", "avg/fpr95"] == board.mean.at["msp", ("avg", "fpr95")]
    assert frame.at["energy", "near avg/auroc_std"] == board.std.at["energy", ("near avg", "auroc")]
    assert frame.at["energy", "id_acc"] == board.mean.at["energy", ("ID", "acc")]
    assert frame["n_seeds"].tolist() == [2, 2]
    for key in board.mean.columns:
        name = "id_acc" if key == ("ID", "acc") else f"{key[0]}/{key[1]}"
        np.testing.assert_allclose(frame[name], board.mean[key], rtol=0, atol=1e-15)
        np.testing.assert_allclose(frame[f"{name}_std"], board.std[key], rtol=0, atol=1e-15)


def latex_row(latex, method):
    """The cells of one method's row in a LaTeX table."""
    line = next(line for line in latex.splitlines() if line.startswith(method + " &"))
    return [cell.strip() for cell in line.removesuffix(r"\\").split(" & ")]


def test_latex(board, tmp_path):
    latex = board.to_latex(tmp_path / "t.tex").read_text()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert latex.count(rule) == 1
    assert r"\caption{" in latex
    assert "ID is the positive class (FPR at 95\\% TPR of ID)" in latex
    assert "2 seeds" in latex
    # Columns: method, then FPR/AUROC for cifar100, tin, svhn, near avg, far avg, avg, then ID acc.
    energy, msp = latex_row(latex, "energy"), latex_row(latex, "msp")
    # cifar100 FPR: energy 55.00 (best, lowest) vs msp 67.50.
    assert energy[1] == r"\textbf{55.00 (sd 7.07)}"
    assert msp[1] == r"67.50 (sd 3.54)"
    # cifar100 AUROC: energy 81.00 (best, highest) vs msp 76.00.
    assert energy[2].startswith(r"\textbf{") and "81.00" in energy[2]
    assert "textbf" not in msp[2] and "76.00" in msp[2]
    # ID acc tie (91.00 both): both bold.
    assert energy[-1].startswith(r"\textbf{") and msp[-1].startswith(r"\textbf{")


def test_latex_escapes_names(tmp_path):
    frame = make_metrics()
    frame["method"] = frame["method"].replace({"energy": "knn_k50&T=1"})
    frame["ood_set"] = frame["ood_set"].replace({"cifar100": "cifar_100"})
    board = build_leaderboard(frame)
    latex = board.to_latex(tmp_path / "t.tex").read_text()
    assert r"knn\_k50\&T=1 &" in latex
    assert r"{cifar\_100}" in latex
    assert "knn_k50" not in latex and "cifar_100" not in latex


def test_markdown(board, tmp_path):
    markdown = board.to_markdown(tmp_path / "t.md").read_text()
    assert "ID is the positive class (FPR at 95% TPR of ID)" in markdown
    assert "2 seeds" in markdown
    lines = markdown.splitlines()
    header = next(line for line in lines if line.startswith("| Method"))
    assert re.fullmatch(r"\|( :?-+:? \|)+", lines[lines.index(header) + 1])
    energy = next(line for line in lines if line.startswith("| energy")).split(" | ")
    msp = next(line for line in lines if line.startswith("| msp")).split(" | ")
    assert energy[1] == "**55.00 (sd 7.07)**"
    assert msp[1] == "67.50 (sd 3.54)"
    assert lines[-1] == "Bold: the best value per column."
    assert "**" not in msp[2]
    assert len(energy) == len(msp) == header.count(" | ") + 1


def test_ood_positive_caption(tmp_path):
    board = build_leaderboard(make_metrics(convention="ood_positive"))
    assert "OOD is the positive class" in board.to_markdown(tmp_path / "t.md").read_text()
    assert "OOD is the positive class" in board.to_text()


def test_text(board):
    text = board.to_text()
    lines = text.splitlines()
    assert "ID is the positive class" in lines[0]
    assert "avg FPR@95" in lines[1] and "near avg AUROC" in lines[1] and "ID Acc" in lines[1]
    msp = next(line for line in lines if line.startswith("msp"))
    expected_avg = 100 * np.mean([np.mean(FPR["msp", 0]), np.mean(FPR["msp", 1])])
    assert f"{expected_avg:.2f} (sd " in msp


@pytest.mark.parametrize("column", ["auroc", "group", "id_acc"])
def test_missing_column(column):
    with pytest.raises(ValueError, match=column):
        build_leaderboard(make_metrics().drop(columns=column))


def test_empty_frame():
    frame = make_metrics().iloc[:0]
    with pytest.raises(ValueError, match="empty"):
        build_leaderboard(frame)


def test_mixed_conventions():
    frame = make_metrics()
    frame["convention"] = ["id_positive"] * 6 + ["ood_positive"] * (len(frame) - 6)
    with pytest.raises(ValueError, match="mixed conventions"):
        build_leaderboard(frame)


def test_missing_or_unknown_convention():
    frame = make_metrics()
    frame.attrs.clear()
    with pytest.raises(ValueError, match="convention"):
        build_leaderboard(frame)
    frame.attrs["convention"] = "positive"
    with pytest.raises(ValueError, match="convention"):
        build_leaderboard(frame)


def test_multiple_backbones():
    frame = make_metrics()
    frame.loc[frame["method"] == "msp", "backbone"] = "vit_b16"
    with pytest.raises(ValueError, match="backbone"):
        build_leaderboard(frame)


def test_incomplete_or_duplicate_rows():
    frame = make_metrics()
    with pytest.raises(ValueError, match="missing"):
        build_leaderboard(frame.iloc[1:])
    with pytest.raises(ValueError, match="duplicate"):
        build_leaderboard(pd.concat([frame, frame.iloc[:1]]))


def test_percentages_rejected():
    frame = make_metrics()
    frame["auroc"] *= 100
    with pytest.raises(ValueError, match="fractions"):
        build_leaderboard(frame)


def test_score_histograms_png(tmp_path):
    rng = np.random.default_rng(0)
    scores = {
        method: {"ID": rng.normal(2, 1, 500), "cifar100": rng.normal(0, 1, 300), "svhn": rng.normal(-1, 1, 200)}
        for method in ("energy", "msp", "knn", "vim")
    }
    path = plot_score_histograms(scores, tmp_path / "plots" / "hist.png", title="cifar10")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000


def test_score_histograms_need_id_scores(tmp_path):
    with pytest.raises(ValueError, match="ID"):
        plot_score_histograms({"energy": {"svhn": np.zeros(3)}}, tmp_path / "h.png")
