"""Packaged benchmark files run end to end on tiny fixtures in the real on-disk formats (idx files,
npz, torch checkpoints at the paths the file names), including the failure path of each missing
dataset: an optional OOD set is skipped visibly, the ID set or a checkpoint stops the run with
the expected layout."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import extract.datasets as ds
from extract.backbones import get_backbone_spec
from harness.config import BENCHMARK_DIR
from tests.conftest import oodbench
from tests.test_datasets import make_mnist_like, write_idx_pair
from tests.test_pipeline import write_yaml

MNIST_CHECKPOINTS = ("baseline_epoch_9", "oe_scratch_epoch_9", "oe_tune_epoch_4")


def write_mnist_fixtures(root):
    """The mnist benchmark's files, tiny: MNIST, notMNIST and Fashion-MNIST t10k idx pairs, the
    Animal-MNIST npz, and the three Outlier Exposure checkpoints as plain state dicts (random
    weights of the registry architecture)."""
    images, labels = make_mnist_like(0, n=40)
    labels = (np.arange(40) % 10).astype(np.uint8)  # 4 per class: the stratified fit/eval halves need 2+
    write_idx_pair(root / "mnist", "t10k", images, labels)
    write_idx_pair(root / "notmnist", "t10k", *make_mnist_like(1, n=30))
    write_idx_pair(root / "fashion-mnist", "t10k", *make_mnist_like(2, n=30))
    (root / "animal-mnist").mkdir(parents=True)
    animals, animal_labels = make_mnist_like(3, n=30)
    np.savez(root / "animal-mnist" / "animal_mnist_10k.npz", images=animals, labels=animal_labels)
    folder = root / "checkpoints" / "mnist-convnet-oe"
    folder.mkdir(parents=True)
    for seed, name in enumerate(MNIST_CHECKPOINTS):
        torch.manual_seed(seed)
        torch.save(get_backbone_spec("mnist-convnet-oe").build().state_dict(), folder / f"{name}.pt")


def write_grayscale_ood_sets(root, idx_sets):
    """The grayscale OOD sets the small benchmarks share: t10k idx pairs of ``idx_sets``, the
    Animal-MNIST npz and the three texture photographs, 20 images each."""
    for seed, name in enumerate(idx_sets):
        write_idx_pair(root / name, "t10k", *make_mnist_like(12 + seed, n=20))
    (root / "animal-mnist").mkdir()
    animals, labels = make_mnist_like(15, n=20)
    np.savez(root / "animal-mnist" / "animal_mnist_10k.npz", images=animals, labels=labels)
    write_texture_photos(root)


def run_without_each_set(capsys, extract_argv, data, folders: dict[str, str]):
    """Each optional OOD set's file or folder (relative to ``data``) taken away alone: `oodbench
    extract` (the run's resolution without its scoring) succeeds and names the skipped set."""
    for label, relative in folders.items():
        path = data / relative
        path.rename(path.with_name(path.name + ".away"))
        code, out, err = oodbench(capsys, *extract_argv)
        assert code == 0, err
        assert f"skipped OOD set {label}: dataset" in out and "How to get it:" in out, out
        path.with_name(path.name + ".away").rename(path)


@pytest.mark.slow
def test_mnist_benchmark_runs_on_fixtures_and_names_each_missing_dataset(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ds, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")  # only the fixtures are read
    data = tmp_path / "data"
    write_mnist_fixtures(data)
    argv = ("run", "mnist", "--data-root", data, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out",
            "--methods", "energy,ash_layer,odin", "--quiet")
    code, out, err = oodbench(capsys, *argv)
    assert code == 0, err
    for backbone in ("oe-baseline", "oe-scratch", "oe-tune"):
        board = pd.read_csv(tmp_path / "out" / "mnist" / backbone / "leaderboard.csv", index_col="method")
        assert sorted(board.index) == ["ash_layer", "energy", "odin"]
        for ood_set in ("notmnist", "negative-mnist", "animal-mnist", "fashion-mnist", "gaussian", "bernoulli"):
            assert board[f"{ood_set}/auroc"].between(0, 1).all()
        assert {"near avg/auroc", "far avg/auroc"} <= set(board.columns)
    metrics = pd.read_csv(tmp_path / "out" / "mnist" / "metrics.csv")
    assert (metrics.groupby("backbone")["id_acc"].nunique() >= 1).all()

    (data / "notmnist" / "t10k-images-idx3-ubyte.gz").unlink()  # an optional OOD set goes missing
    code, out, err = oodbench(capsys, *argv)
    assert code == 0, err
    assert "skipped OOD set notmnist: dataset 'notmnist' (split 'test') not found." in out
    assert "notmnist/auroc" not in pd.read_csv(tmp_path / "out/mnist/oe-tune/leaderboard.csv").columns

    (data / "checkpoints" / "mnist-convnet-oe" / "oe_tune_epoch_4.pt").unlink()
    code, _, err = oodbench(capsys, *argv)
    assert code == 2 and "backbone oe-tune: checkpoint" in err and "oe_tune_epoch_4.pt does not exist" in err

    (data / "mnist" / "t10k-images-idx3-ubyte.gz").unlink()  # the ID set: required
    code, _, err = oodbench(capsys, *argv)
    assert code == 2
    assert "dataset 'mnist' (split 'test') not found" in err and "t10k-images-idx3-ubyte.gz" in err


def write_checkpoint(path, arch, num_classes, seed=0):
    """A registry architecture's random weights saved as a plain state dict (the public checkpoints' form)."""
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(get_backbone_spec(arch).build(num_classes=num_classes).state_dict(), path)


def write_cifar_protocol_fixtures(root, classes):
    """Every dataset of the four CIFAR benchmark files, tiny, in its real format."""
    import pickle

    from tests.test_paper_datasets import write_cifar, write_images, write_svhn

    for name in ("cifar10", "cifar100"):
        write_cifar(root, name, n=20 if name == f"cifar{classes}" else 8)
    folder = root / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    test = pickle.loads((folder / ("test_batch" if classes == 10 else "test")).read_bytes())
    for train_file in ([f"data_batch_{i}" for i in range(1, 6)] if classes == 10 else ["train"]):
        (folder / train_file).write_bytes(pickle.dumps(test, protocol=2))  # a train split in the same format
    write_svhn(root, np.arange(20) % 10)
    for folder_name, sizes in (("LSUN/test", [(36, 36)] * 4), ("LSUN_resize/LSUN_resize", [(32, 32)] * 4),
                               ("iSUN/iSUN_patches", [(32, 32)] * 4), ("SUN/images", [(300, 240)] * 3),
                               ("iNaturalist/images", [(280, 320)] * 3), ("dtd/images/banded", [(300, 300)] * 3)):
        write_images(root / folder_name, sizes, suffix=".jpg")
    write_images(root / "places365" / "test_256", [(256, 256)] * 4, suffix=".jpg")
    (root / "places365" / "places365_test.txt").write_text("".join(f"{i:03d}.jpg\n" for i in range(4)))


@pytest.mark.slow
@pytest.mark.parametrize("benchmark, classes", [("cifar10-ash", 10), ("cifar100-ash", 100), ("cifar10-um", 10),
                                                ("cifar100-um", 100)])
def test_cifar_benchmark_files_run_on_fixtures_in_the_real_formats(tmp_path, capsys, benchmark, classes):
    """The packaged CIFAR files as written - sets, protocols, backbones - on tiny fixtures (the UM
    files' training and fine-tuning cut to one epoch), then the failure path of every missing set."""
    data = tmp_path / "data"
    write_cifar_protocol_fixtures(data, classes)
    config = yaml.safe_load((BENCHMARK_DIR / f"{benchmark}.yaml").read_text())
    for backbone in config["backbones"]:
        if "checkpoint" in backbone:
            write_checkpoint(Path(backbone["checkpoint"].replace("{data_root}", str(data))), backbone["arch"], classes)
        for recipe in (backbone.get("train"), backbone.get("finetune")):
            if recipe:
                recipe["epochs"] = 1
    config["validation"]["params"]["n"] = 4
    bench = write_yaml(tmp_path / f"{benchmark}.yaml", config)
    common = (bench, "--data-root", data, "--cache-dir", tmp_path / "cache", "--quiet", "--workers", "0")
    code, out, err = oodbench(capsys, "run", *common, "--out", tmp_path / "out", "--methods", "energy,react")
    assert code == 0, err
    labels = [ref.get("name") or ref["dataset"] for ref in config["ood"]]
    for backbone in config["backbones"]:
        board = pd.read_csv(tmp_path / "out" / benchmark / backbone["name"] / "leaderboard.csv", index_col="method")
        assert sorted(board.index) == ["energy", "react"]
        assert all(board[f"{label}/auroc"].between(0, 1).all() for label in labels)
    if benchmark.endswith("-um"):  # the published UM table is rendered beside the run
        assert (tmp_path / "out" / benchmark / "reproduction" / f"um-table1-cifar{classes}.md").is_file()

    where = {"svhn": "svhn/test_32x32.mat", "lsun-crop": "LSUN", "lsun": "LSUN", "isun": "iSUN",
             "lsun-resize": "LSUN_resize", "places365": "places365", "textures": "dtd", "sun": "SUN",
             "inaturalist": "iNaturalist", "cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
    run_without_each_set(capsys, ("extract", *common), data, {label: where[label] for label in labels})
    own = data / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    own.rename(own.with_name("gone"))  # the ID set is required
    code, _, err = oodbench(capsys, "extract", *common)
    assert code == 2 and f"dataset 'cifar{classes}'" in err and "not found" in err


@pytest.mark.slow
def test_imagenet_benchmark_file_runs_on_fixtures_in_the_real_formats(tmp_path, capsys, monkeypatch):
    """The packaged ImageNet file with all four backbones: torchvision checkpoints found in the torch
    hub cache, BiT's official .npz under the data root, ImageFolder trees of varying image sizes
    decoded per backbone (224 crops, BiT's 480 squash); then each missing set and a missing weight file."""
    from tests.test_imagenet_backbones import bit_npz_name
    from tests.test_paper_datasets import write_images

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    data = tmp_path / "data"
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            write_images(data / "imagenet" / split / wnid, [(300, 400)], suffix=".JPEG")
    for folder in ("iNaturalist/images", "SUN/images", "Places/images", "dtd/images/banded"):
        write_images(data / folder, [(240, 320), (500, 375)], suffix=".jpg")
    config = yaml.safe_load((BENCHMARK_DIR / "imagenet.yaml").read_text())
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    for backbone in config["backbones"]:
        path = Path(backbone["checkpoint"].replace("{torch_hub}", str(hub)).replace("{data_root}", str(data)))
        torch.manual_seed(0)
        model = get_backbone_spec(backbone["arch"]).build(num_classes=1000)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".npz":  # BiT's release format: TF names, HWIO kernels
            np.savez(path, **{bit_npz_name(k): v.numpy().transpose(2, 3, 1, 0) if v.ndim == 4 else v.numpy()
                              for k, v in model.state_dict().items()})
        else:
            torch.save(model.state_dict(), path)
    config["validation"]["params"]["n"] = 2
    bench = write_yaml(tmp_path / "imagenet.yaml", config)
    common = (bench, "--data-root", data, "--cache-dir", tmp_path / "cache", "--quiet", "--workers", "0")
    code, out, err = oodbench(capsys, "run", *common, "--out", tmp_path / "out", "--methods", "energy,react")
    assert code == 0, err
    for backbone in ("resnet50", "mobilenet-v2", "densenet121", "bit-s-r101x1"):
        board = pd.read_csv(tmp_path / "out" / "imagenet" / backbone / "leaderboard.csv", index_col="method")
        assert {f"{s}/auroc" for s in ("inaturalist", "sun", "places", "textures")} <= set(board.columns)
    assert (tmp_path / "out" / "imagenet" / "reproduction" / "ash-table1-resnet50.md").is_file()
    assert (tmp_path / "out" / "imagenet" / "reproduction" / "rg-table1-bit.md").is_file()

    run_without_each_set(capsys, ("extract", *common), data, {"inaturalist": "iNaturalist", "sun": "SUN",
                                                             "places": "Places", "textures": "dtd"})
    (hub / "mobilenet_v2-b0353104.pth").unlink()
    code, _, err = oodbench(capsys, "extract", *common)
    assert code == 2 and "backbone mobilenet-v2: checkpoint" in err and "mobilenet_v2-b0353104.pth" in err
    (data / "imagenet" / "val").rename(data / "imagenet" / "val.away")
    code, _, err = oodbench(capsys, "extract", *common)
    assert code == 2 and "dataset 'imagenet' (split 'val') not found" in err and "How to get it" in err


def write_texture_photos(root, side=64):
    """<root>/textures/{brick,grass,gravel}.png, grayscale photographs large enough for 32x32 patches."""
    from PIL import Image

    (root / "textures").mkdir(parents=True)
    rng = np.random.default_rng(5)
    for name in ("brick", "grass", "gravel"):
        Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).save(root / "textures" / f"{name}.png")


@pytest.mark.slow
def test_fashion_mnist_benchmark_file_runs_on_fixtures_in_the_real_formats(tmp_path, capsys, monkeypatch):
    """The default benchmark as packaged (training and both fine-tunings cut to one epoch) on idx,
    npz and PNG fixtures, then each missing file set skipped by name and the ID set required."""
    monkeypatch.setattr(ds, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    data = tmp_path / "data"
    write_idx_pair(data / "fashion-mnist", "train", make_mnist_like(10, n=64)[0], np.arange(64, dtype=np.uint8) % 10)
    write_idx_pair(data / "fashion-mnist", "t10k", make_mnist_like(11, n=30)[0], np.arange(30, dtype=np.uint8) % 10)
    write_grayscale_ood_sets(data, ("mnist", "notmnist", "kmnist"))
    config = yaml.safe_load((BENCHMARK_DIR / "fashion-mnist.yaml").read_text())
    for backbone in config["backbones"]:
        (backbone.get("train") or backbone["finetune"])["epochs"] = 1
    bench = write_yaml(tmp_path / "fashion-mnist.yaml", config)
    common = (bench, "--data-root", data, "--cache-dir", tmp_path / "cache", "--quiet")
    code, out, err = oodbench(capsys, "run", *common, "--out", tmp_path / "out", "--methods", "energy,msp")
    assert code == 0, err
    for backbone in ("cnn28", "cnn28+um", "cnn28+umap"):
        board = pd.read_csv(tmp_path / "out" / "fashion-mnist" / backbone / "leaderboard.csv", index_col="method")
        assert {"mnist/auroc", "kmnist/auroc", "textures/auroc", "blobs/auroc"} <= set(board.columns)
    run_without_each_set(capsys, ("extract", *common), data, {
        "mnist": "mnist", "notmnist": "notmnist", "kmnist": "kmnist", "animal-mnist": "animal-mnist",
        "textures": "textures"})
    (data / "fashion-mnist").rename(data / "gone")
    code, _, err = oodbench(capsys, "extract", *common)
    assert code == 2 and "dataset 'fashion-mnist' (split 'train') not found" in err


@pytest.mark.slow
def test_cifar10_jpeg_benchmark_file_runs_on_fixtures_in_the_real_formats(tmp_path, capsys, monkeypatch):
    """CIFAR-10 (JPEG) as packaged - the four option-A ResNet checkpoints found by glob under the
    data root, every OOD set - on fixtures, then each missing set, a missing checkpoint and the ID set."""
    from tests.test_backbones import option_a_checkpoint
    from tests.test_datasets import write_cifar_jpeg_tree

    monkeypatch.setattr(ds, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    data = tmp_path / "data"
    write_cifar_jpeg_tree(data, per_class=4)
    write_grayscale_ood_sets(data, ("mnist", "notmnist", "fashion-mnist"))
    (data / "checkpoints" / "cifar10-resnet").mkdir(parents=True)
    for depth, digest in ((20, "a1"), (32, "b2"), (44, "c3"), (56, "d4")):
        option_a_checkpoint(data / "checkpoints" / "cifar10-resnet" / f"resnet{depth}-{digest}.th", depth)
    config = yaml.safe_load((BENCHMARK_DIR / "cifar10-jpeg.yaml").read_text())
    for ref in [*config["ood"], config["validation"]]:  # the generated sets at 20 images, not 10,000
        if isinstance(ref, dict):
            ref["params"]["n"] = 20
    bench = write_yaml(tmp_path / "cifar10-jpeg.yaml", config)
    common = (bench, "--data-root", data, "--cache-dir", tmp_path / "cache", "--quiet")
    code, out, err = oodbench(capsys, "run", *common, "--out", tmp_path / "out", "--methods", "energy,ash_layer")
    assert code == 0, err
    for depth in (20, 32, 44, 56):
        board = pd.read_csv(tmp_path / "out" / "cifar10-jpeg" / f"resnet{depth}" / "leaderboard.csv",
                            index_col="method")
        assert sorted(board.index) == ["ash_layer", "energy"]
        assert {f"{s}/auroc" for s in ("textures", "animal-mnist", "notmnist", "mnist", "fashion-mnist",
                                        "gaussian")} <= set(board.columns)
    run_without_each_set(capsys, ("extract", *common), data, {
        "textures": "textures", "animal-mnist": "animal-mnist", "notmnist": "notmnist", "mnist": "mnist",
        "fashion-mnist": "fashion-mnist"})
    (data / "checkpoints" / "cifar10-resnet" / "resnet44-c3.th").unlink()
    code, _, err = oodbench(capsys, "extract", *common)
    assert code == 2 and "backbone resnet44: checkpoint" in err and "resnet44-*.th: no file matches" in err
    (data / "cifar10-test-jpeg").rename(data / "gone")
    code, _, err = oodbench(capsys, "extract", *common)
    assert code == 2 and "dataset 'cifar10-jpeg'" in err and "cifar10-test-jpeg/<class>/<NNNN>.jpg" in err
