"""The paper-scale datasets (extract.paper_datasets) on tiny fixtures written in each real format:
CIFAR python pickles, SVHN .mat, ImageFolder trees (ODIN's LSUN/iSUN, MOS's sets, DTD, ImageNet
val), torchvision's Places365 layout; their subsets, the missing-dataset errors and the
torchvision download path (the network faked at torchvision's dataset class)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat
from torchvision import transforms

import extract.datasets as ds
from extract.backbones import Preprocessing
from extract.datasets import DatasetUnavailable, ImageFiles, load_dataset
from extract.extraction import forward_rows
from tests.test_backbones import digits_backbone


def write_cifar(root, name="cifar10", n=12, seed=0):
    """CIFAR-10's (or CIFAR-100's) python pickle layout with ``n`` test images (protocol 2, as released)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = [int(x) for x in rng.integers(0, 10, n)]
    rows = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # the released row layout: R plane, G plane, B plane
    if name == "cifar10":
        folder, batch, meta = root / "cifar-10-batches-py", {"data": rows, "labels": labels}, \
            ("batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
        test_file = "test_batch"
    else:
        folder, batch, meta = (root / "cifar-100-python",
                               {"data": rows, "fine_labels": labels, "coarse_labels": labels},
                               ("meta", {"fine_label_names": [f"f{i}" for i in range(100)]}))
        test_file = "test"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / test_file).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / meta[0]).write_bytes(pickle.dumps(meta[1], protocol=2))
    return images, np.array(labels)


def write_svhn(root, labels):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
    (root / "svhn").mkdir(parents=True, exist_ok=True)
    savemat(root / "svhn" / "test_32x32.mat",
            {"X": images.transpose(1, 2, 3, 0), "y": np.where(labels == 0, 10, labels).reshape(-1, 1).astype(np.uint8)})
    return images


def write_images(folder, sizes, seed=0, suffix=".png"):
    """Images of the given (height, width) sizes in ``folder``, named 000.png, 001.png, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = folder / f"{i:03d}{suffix}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles_load_as_torchvision_reads_them(tmp_path, name):
    images, labels = write_cifar(tmp_path, name)
    loaded = load_dataset(name, "test", data_root=tmp_path)
    np.testing.assert_array_equal(loaded.images, images)  # HWC uint8 from the planar rows
    np.testing.assert_array_equal(loaded.labels, labels)
    assert loaded.classes[0] == ("c0" if name == "cifar10" else "f0")
    batches = "data_batch_1" if name == "cifar10" else "pickle batches train"
    with pytest.raises(DatasetUnavailable, match=f"(?s){batches}.*How to get it: `oodbench fetch {name}`"):
        load_dataset(name, "train", data_root=tmp_path)


def test_cifar_download_goes_through_torchvision_into_the_data_root(tmp_path, monkeypatch):
    """The network boundary faked: torchvision's CIFAR10 class 'downloads' by writing the pickles."""
    import torchvision.datasets

    calls = []

    def fake_cifar10(root, download, train):
        calls.append((root, download, train))
        write_cifar(tmp_path / "data")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    loaded = load_dataset("cifar10", "test", data_root=tmp_path / "data", download=True)
    assert calls == [(str(tmp_path / "data"), True, False)] and len(loaded) == 12

    def failing(root, download, train):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", failing)
    with pytest.raises(DatasetUnavailable,
                       match="downloading dataset 'cifar10' with torchvision .* failed: no network"):
        load_dataset("cifar10", "test", data_root=tmp_path / "other", download=True)


def test_svhn_mat_maps_label_10_to_0_and_selects_the_first_per_class(tmp_path):
    labels = np.array([0, 1, 0, 2, 1, 0, 3, 3, 2, 9] * 2)
    images = write_svhn(tmp_path, labels)
    full = load_dataset("svhn", "test", data_root=tmp_path)
    np.testing.assert_array_equal(full.images, images)
    np.testing.assert_array_equal(full.labels, labels)
    selected = load_dataset("svhn", "test", data_root=tmp_path, per_class=2)
    expected = np.sort(np.concatenate([np.flatnonzero(labels == c)[:2] for c in range(10)]))
    np.testing.assert_array_equal(selected.images, images[expected])
    assert np.bincount(selected.labels, minlength=10).max() == 2
    with pytest.raises(DatasetUnavailable, match="(?s)test_32x32.mat.*svhn"):
        load_dataset("svhn", "test", data_root=tmp_path / "nothing")


def test_image_folders_keep_files_lazily_and_fix_their_size_as_the_protocols_do(tmp_path):
    paths = write_images(tmp_path / "LSUN" / "test", [(36, 36), (40, 50), (64, 48)])
    lazy = load_dataset("lsun-crop", "test", data_root=tmp_path)
    assert isinstance(lazy.images, ImageFiles) and len(lazy) == 3 and (lazy.labels == -1).all()
    for fit, transform in (("crop", transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32)])),
                           ("squash", transforms.Resize((32, 32)))):
        fixed = load_dataset("lsun-crop", "test", data_root=tmp_path, size=32, fit=fit)
        for i, path in enumerate(paths):
            with Image.open(path) as image:
                expected = np.asarray(transform(image.convert("RGB")))
            np.testing.assert_array_equal(np.asarray(fixed.images.open(i)), expected)
    # the fixed size is part of the set's identity, and so is every file's state
    assert len({load_dataset("lsun-crop", "test", data_root=tmp_path, size=s).fingerprint() for s in (0, 32)}) == 2
    before = lazy.fingerprint()
    Image.fromarray(np.zeros((36, 36, 3), dtype=np.uint8)).save(paths[0])
    assert load_dataset("lsun-crop", "test", data_root=tmp_path).fingerprint() != before
    (tmp_path / "subset.txt").write_text("test/002.png\ntest/000.png\n")
    subset = load_dataset("lsun-crop", "test", data_root=tmp_path, subset=str(tmp_path / "subset.txt"))
    assert [p.name for p in subset.images.paths] == ["002.png", "000.png"]  # the list's exact order
    (tmp_path / "bad.txt").write_text("test/007.png\n")
    with pytest.raises(DatasetUnavailable, match="1 of 1 listed images are not in"):
        load_dataset("lsun-crop", "test", data_root=tmp_path, subset=str(tmp_path / "bad.txt"))
    first = load_dataset("lsun-crop", "test", data_root=tmp_path, n=2)
    drawn = load_dataset("lsun-crop", "test", data_root=tmp_path, n=2, pick="random", seed=3)
    assert [p.name for p in first.images.paths] == ["000.png", "001.png"] and len(drawn) == 2
    with pytest.raises(DatasetUnavailable, match="(?s)dataset 'isun'.*iSUN.*How to get it: the ODIN release"):
        load_dataset("isun", "test", data_root=tmp_path)


def test_image_files_extract_like_arrays_with_and_without_worker_processes(tmp_path):
    write_images(tmp_path / "SUN" / "images", [(8, 8)] * 5 + [(12, 9)])
    images = load_dataset("sun", "test", data_root=tmp_path, size=8, fit="squash")
    backbone = digits_backbone()  # 8x8 grayscale input: the files are decoded and converted to luma
    in_process = forward_rows(backbone, images.images, (), 4, torch.device("cpu"))
    workers = forward_rows(backbone, images.images, (), 4, torch.device("cpu"), workers=1)
    np.testing.assert_array_equal(in_process["logits"], workers["logits"])
    decoded = np.stack([np.asarray(images.images.open(i).convert("L")) for i in range(6)])
    arrays = forward_rows(backbone, decoded, (), 4, torch.device("cpu"))
    np.testing.assert_allclose(in_process["logits"], arrays["logits"], atol=1e-5)


def test_imagenet_val_labels_follow_the_sorted_wnid_folders(tmp_path):
    for wnid in ("n01443537", "n01440764"):
        write_images(tmp_path / "imagenet" / "val" / wnid, [(300, 400), (256, 256)], suffix=".JPEG")
    val = load_dataset("imagenet", "val", data_root=tmp_path)
    assert val.classes == ("n01440764", "n01443537") and list(val.labels) == [0, 0, 1, 1]
    batch = Preprocessing(224, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), resize_to=256)(val.images[:2])
    assert batch.shape == (2, 3, 224, 224)
    with pytest.raises(DatasetUnavailable, match="(?s)imagenet/val/<wnid>/\\*.JPEG.*no automatic download"):
        load_dataset("imagenet", "val", data_root=tmp_path / "none")


def test_dtd_and_places365_in_their_release_layouts(tmp_path):
    for texture in ("banded", "woven"):
        write_images(tmp_path / "dtd" / "images" / texture, [(300, 200), (250, 260)], suffix=".jpg")
    dtd = load_dataset("dtd", "test", data_root=tmp_path, size=32)
    assert len(dtd) == 4 and dtd.classes == ("banded", "woven") and list(dtd.labels) == [0, 0, 1, 1]
    assert np.asarray(dtd.images.open(3)).shape == (32, 32, 3)
    folder = tmp_path / "places365"
    write_images(folder / "val_256", [(256, 256)] * 5, suffix=".jpg")
    (folder / "places365_val.txt").write_text("".join(f"{i:03d}.jpg {7 * i}\n" for i in range(5)))
    places = load_dataset("places365", "val", data_root=tmp_path, n=3)
    assert [p.name for p in places.images.paths] == ["000.jpg", "001.jpg", "002.jpg"]  # ASH: the first n
    assert list(places.labels) == [0, 7, 14]
    drawn = load_dataset("places365", "val", data_root=tmp_path, n=3, pick="random", seed=1)
    assert sorted(drawn.images.paths) == list(drawn.images.paths) and len(set(drawn.images.paths)) == 3
    with pytest.raises(DatasetUnavailable, match="(?s)places365/test_256/ and places365/places365_test.txt"):
        load_dataset("places365", "test", data_root=tmp_path)


def test_every_paper_dataset_says_where_its_public_copy_comes_from():
    for name in ("cifar10", "cifar100", "svhn", "dtd", "places365", "lsun-crop", "lsun-resize", "isun",
                 "inaturalist", "sun", "places", "imagenet"):
        assert name in ds.DATASETS and ds.HOW_TO_GET[name]
