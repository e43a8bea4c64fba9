"""Tests for extract.datasets and extract.idx: real formats on tiny fixtures, generators, errors, real data."""
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images

import extract.datasets as ds
from extract.datasets import (
    CIFAR10_CLASSES,
    DATASETS,
    DatasetUnavailable,
    ImageSet,
    default_data_root,
    fetch_dataset,
    load_dataset,
)
from extract.idx import IdxFormatError, read_idx

# ---------------------------------------------------------------- fixture writers (the real formats, by hand)

def idx_bytes(array):
    """The idx encoding of a uint8 array: magic 0x00 0x00 0x08 ndim, big-endian int32 dims, data."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.tobytes()


def write_idx(path, array, compress=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def make_mnist_like(seed, n=12):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), rng.integers(0, 10, size=n).astype(np.uint8)


def write_idx_pair(folder, prefix, images, labels, compress=True):
    suffix = ".gz" if compress else ""
    write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)


@pytest.fixture
def no_debian_fashion(monkeypatch, tmp_path):
    """Point the Debian Fashion-MNIST location at an empty path, so only data_root is searched."""
    missing = tmp_path / "no-debian"
    monkeypatch.setattr(ds, "DEBIAN_FASHION_MNIST", missing)
    return missing


# ---------------------------------------------------------------- idx reader

@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, compress):
    images, labels = make_mnist_like(0)
    suffix = ".gz" if compress else ""
    got = read_idx(write_idx(tmp_path / f"images{suffix}", images, compress))
    assert got.dtype == np.uint8 and got.shape == (12, 28, 28)
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / f"labels{suffix}", labels, compress)), labels)
    got[0, 0, 0] ^= 1  # fresh and writable


def test_read_idx_bad_magic_names_file(tmp_path):
    path = tmp_path / "bad-images-idx3-ubyte"
    path.write_bytes(b"\x12\x34\x08\x03" + bytes(16))
    with pytest.raises(IdxFormatError, match="bad-images-idx3-ubyte.*magic"):
        read_idx(path)


def test_read_idx_unsupported_type(tmp_path):
    path = tmp_path / "float-idx"
    path.write_bytes(bytes([0, 0, 0x0D, 1]) + struct.pack(">i", 2) + bytes(8))
    with pytest.raises(IdxFormatError, match="float-idx.*type code 0x0d"):
        read_idx(path)


def test_read_idx_truncated_data_names_file(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((3, 28, 28)))[:-5])
    with pytest.raises(IdxFormatError, match="t10k-images-idx3-ubyte.*truncated"):
        read_idx(path)


def test_read_idx_truncated_header(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(bytes([0, 0, 0x08, 3, 0, 0]))
    with pytest.raises(IdxFormatError, match="short.*truncated idx header"):
        read_idx(path)


def test_read_idx_trailing_bytes(tmp_path):
    path = tmp_path / "long"
    path.write_bytes(idx_bytes(np.zeros(4)) + b"\0")
    with pytest.raises(IdxFormatError, match="long.*longer than its header"):
        read_idx(path)


def test_read_idx_truncated_gzip_names_file(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.arange(200)))[:-20])
    with pytest.raises(IdxFormatError, match="t10k-labels-idx1-ubyte.gz.*truncated or corrupt"):
        read_idx(path)


# ---------------------------------------------------------------- MNIST family from files

def test_mnist_reads_what_was_written(tmp_path):
    images, labels = make_mnist_like(1)
    write_idx_pair(tmp_path / "mnist", "t10k", images, labels)
    loaded = load_dataset("mnist", "test", data_root=tmp_path)
    assert (loaded.name, loaded.split, len(loaded)) == ("mnist", "test", 12)
    np.testing.assert_array_equal(loaded.images, images)
    assert loaded.images.dtype == np.uint8
    assert loaded.labels.dtype == np.int64
    np.testing.assert_array_equal(loaded.labels, labels)
    assert loaded.classes == tuple("0123456789")
    assert "t10k-images-idx3-ubyte.gz" in loaded.source


def test_uncompressed_idx_accepted(tmp_path):
    images, labels = make_mnist_like(2)
    write_idx_pair(tmp_path / "notmnist", "t10k", images, labels, compress=False)
    loaded = load_dataset("notmnist", data_root=tmp_path)
    np.testing.assert_array_equal(loaded.images, images)
    assert loaded.classes == tuple("ABCDEFGHIJ")


@pytest.mark.parametrize("layout", ["fashion-mnist", "FashionMNIST/raw"])
def test_fashion_mnist_layouts_found(tmp_path, no_debian_fashion, layout):
    images, labels = make_mnist_like(3)
    write_idx_pair(tmp_path / layout, "train", images, labels)
    loaded = load_dataset("fashion-mnist", "train", data_root=tmp_path)
    np.testing.assert_array_equal(loaded.images, images)
    np.testing.assert_array_equal(loaded.labels, labels)
    assert loaded.classes[0] == "T-shirt/top" and len(loaded.classes) == 10
    assert layout in loaded.source


def test_own_folder_searched_before_torchvision_layout(tmp_path, no_debian_fashion):
    first, second = make_mnist_like(4), make_mnist_like(5)
    write_idx_pair(tmp_path / "fashion-mnist", "t10k", *first)
    write_idx_pair(tmp_path / "FashionMNIST" / "raw", "t10k", *second)
    np.testing.assert_array_equal(load_dataset("fashion-mnist", data_root=tmp_path).images, first[0])


def test_debian_path_searched_last(tmp_path, monkeypatch):
    images, labels = make_mnist_like(6)
    debian = tmp_path / "debian"
    write_idx_pair(debian, "t10k", images, labels)
    monkeypatch.setattr(ds, "DEBIAN_FASHION_MNIST", debian)
    loaded = load_dataset("fashion-mnist", data_root=tmp_path / "empty")
    np.testing.assert_array_equal(loaded.images, images)
    assert str(debian) in loaded.source


def test_missing_idx_data_message(tmp_path, no_debian_fashion):
    with pytest.raises(DatasetUnavailable) as info:
        load_dataset("fashion-mnist", "test", data_root=tmp_path)
    message = str(info.value)
    for expected in (
        "'fashion-mnist'", str(tmp_path / "fashion-mnist"), str(tmp_path / "FashionMNIST" / "raw"),
        str(no_debian_fashion), "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
        "apt-get install dataset-fashion-mnist", "oodbench fetch fashion-mnist",
    ):
        assert expected in message


def test_missing_notmnist_points_to_conversion(tmp_path):
    with pytest.raises(DatasetUnavailable, match=r"(?s)notmnist.*t10k-images-idx3-ubyte\.gz.*notMNIST-to-MNIST"):
        load_dataset("notmnist", data_root=tmp_path)


def test_images_without_labels_is_unavailable(tmp_path):
    images, _ = make_mnist_like(7)
    write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", images)
    with pytest.raises(DatasetUnavailable, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", data_root=tmp_path)


def test_no_data_root_message(monkeypatch):
    monkeypatch.delenv("OODBENCH_DATA_ROOT", raising=False)
    with pytest.raises(DatasetUnavailable, match="(?s)Searched:\n  .*downloads.*KMNIST.*OODBENCH_DATA_ROOT"):
        load_dataset("kmnist")
    with pytest.raises(DatasetUnavailable, match="(?s)Searched:\n  nothing.*OODBENCH_DATA_ROOT"):
        load_dataset("notmnist")


def test_data_root_from_environment(tmp_path, monkeypatch):
    images, labels = make_mnist_like(8)
    write_idx_pair(tmp_path / "kmnist", "t10k", images, labels)
    monkeypatch.setenv("OODBENCH_DATA_ROOT", str(tmp_path))
    assert default_data_root() == tmp_path
    np.testing.assert_array_equal(load_dataset("kmnist").images, images)


def test_mismatched_idx_pair(tmp_path):
    images, labels = make_mnist_like(9)
    write_idx_pair(tmp_path / "mnist", "t10k", images, labels[:5])
    with pytest.raises(ValueError, match="expected \\(N,H,W\\) images and \\(N,\\) labels"):
        load_dataset("mnist", data_root=tmp_path)


# ---------------------------------------------------------------- torchvision download, network faked

@pytest.fixture
def fake_kmnist_server(monkeypatch):
    """Replace the function torchvision's MNIST classes call per URL with one that 'downloads' fixtures.

    It writes the gz file torchvision asked for and then runs torchvision's own extract_archive,
    so torchvision's download(), integrity check and raw-folder layout are exercised.
    """
    import torchvision.datasets.mnist as tv_mnist
    from torchvision.datasets.utils import extract_archive

    splits = {"train": make_mnist_like(10, n=20), "t10k": make_mnist_like(11, n=8)}
    urls = []

    def fake_download_and_extract_archive(url, download_root, filename=None, md5=None, **kwargs):
        urls.append(url)
        prefix, kind = filename.split("-")[:2]
        array = splits[prefix][0 if kind == "images" else 1]
        archive = write_idx(Path(download_root) / filename, array)
        extract_archive(str(archive), download_root)

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", fake_download_and_extract_archive)
    return splits, urls


def test_kmnist_download_through_torchvision(tmp_path, fake_kmnist_server):
    splits, urls = fake_kmnist_server
    loaded = load_dataset("kmnist", "test", data_root=tmp_path, download=True)
    np.testing.assert_array_equal(loaded.images, splits["t10k"][0])
    np.testing.assert_array_equal(loaded.labels, splits["t10k"][1])
    assert str(tmp_path / "KMNIST" / "raw") in loaded.source
    assert len(urls) == 4 and all("kmnist" in url for url in urls)
    # Present now: a second load reads the files without downloading again.
    load_dataset("kmnist", data_root=tmp_path, download=True)
    assert len(urls) == 4


def test_fetch_dataset_downloads(tmp_path, fake_kmnist_server):
    fetch_dataset("kmnist", tmp_path / "new-root")
    assert (tmp_path / "new-root" / "KMNIST" / "raw" / "t10k-images-idx3-ubyte.gz").is_file()
    np.testing.assert_array_equal(load_dataset("kmnist", data_root=tmp_path / "new-root").labels,
                                  fake_kmnist_server[0]["t10k"][1])


def test_download_without_data_root_goes_to_the_download_dir(tmp_path, monkeypatch, fake_kmnist_server):
    monkeypatch.delenv("OODBENCH_DATA_ROOT", raising=False)
    monkeypatch.setenv("OODBENCH_DOWNLOAD_DIR", str(tmp_path / "downloads"))
    loaded = load_dataset("kmnist", download=True)
    assert (tmp_path / "downloads" / "KMNIST" / "raw" / "t10k-images-idx3-ubyte.gz").is_file()
    # Found there afterwards without a data root and without downloading again.
    np.testing.assert_array_equal(load_dataset("kmnist").images, loaded.images)
    assert len(fake_kmnist_server[1]) == 4


@pytest.mark.parametrize("name, hint", [("notmnist", "notMNIST-to-MNIST"), ("gaussian", "needs no files")])
def test_fetch_dataset_refuses_others(tmp_path, name, hint):
    with pytest.raises(ValueError, match=f"{name}.*cannot be fetched.*{hint}"):
        fetch_dataset(name, tmp_path)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- fingerprint and ImageSet

def test_fingerprint_stable_and_content_sensitive(tmp_path):
    images, labels = make_mnist_like(12)
    write_idx_pair(tmp_path / "mnist", "t10k", images, labels)
    first = load_dataset("mnist", data_root=tmp_path)
    second = load_dataset("mnist", data_root=tmp_path)
    assert len(first.fingerprint()) == 64
    assert first.fingerprint() == second.fingerprint()
    second.images[3, 10, 10] ^= 1
    assert first.fingerprint() != second.fingerprint()
    assert first.images[3, 10, 10] == images[3, 10, 10]  # loads do not share arrays
    relabelled = ImageSet("mnist", "test", first.images, first.labels[::-1].copy(), "x")
    renamed = ImageSet("kmnist", "test", first.images, first.labels, "x")
    assert len({first.fingerprint(), relabelled.fingerprint(), renamed.fingerprint()}) == 3
    as_float = ImageSet("mnist", "test", first.images.astype(np.float32), first.labels, "x")
    assert as_float.fingerprint() != first.fingerprint()


def test_imageset_validates():
    with pytest.raises(ValueError, match="labels must be int64"):
        ImageSet("x", "test", np.zeros((2, 4, 4), np.uint8), np.zeros(2, np.int32), "x")
    with pytest.raises(ValueError, match="labels must be int64 of shape \\(2,\\)"):
        ImageSet("x", "test", np.zeros((2, 4, 4), np.uint8), np.zeros(3, np.int64), "x")
    with pytest.raises(TypeError, match="uint8 or float32"):
        ImageSet("x", "test", np.zeros((2, 4, 4)), np.zeros(2, np.int64), "x")
    with pytest.raises(ValueError, match="\\(N,H,W\\) or \\(N,H,W,3\\)"):
        ImageSet("x", "test", np.zeros((2, 4), np.uint8), np.zeros(2, np.int64), "x")
    assert len(ImageSet("x", "test", np.zeros((2, 4, 4, 3), np.float32), np.zeros(2, np.int64), "x")) == 2


# ---------------------------------------------------------------- animal-mnist and textures from files

def test_animal_mnist_npz(tmp_path):
    images, labels = make_mnist_like(13)
    (tmp_path / "animal-mnist").mkdir()
    np.savez(tmp_path / "animal-mnist" / "animal_mnist_10k.npz", images=images, labels=labels.astype(np.int32))
    loaded = load_dataset("animal-mnist", data_root=tmp_path)
    np.testing.assert_array_equal(loaded.images, images)
    np.testing.assert_array_equal(loaded.labels, labels)
    assert loaded.labels.dtype == np.int64


def test_animal_mnist_missing_and_malformed(tmp_path):
    with pytest.raises(DatasetUnavailable, match=r"(?s)animal-mnist.*animal_mnist_10k\.npz.*pip install animal-mnist"):
        load_dataset("animal-mnist", data_root=tmp_path)
    (tmp_path / "animal-mnist").mkdir()
    np.savez(tmp_path / "animal-mnist" / "animal_mnist_10k.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="animal_mnist_10k.npz: expected arrays 'images' and 'labels'"):
        load_dataset("animal-mnist", data_root=tmp_path)


# Each fixture texture encodes its pixel positions, so a patch tells where it was cut from.
TEXTURE_SIDE = 16
_grid = np.arange(TEXTURE_SIDE * TEXTURE_SIDE, dtype=np.uint8).reshape(TEXTURE_SIDE, TEXTURE_SIDE)
FIXTURE_TEXTURES = {"brick": _grid, "grass": 255 - _grid, "gravel": _grid.T.copy()}


def write_textures(folder):
    folder.mkdir(parents=True)
    Image.fromarray(FIXTURE_TEXTURES["brick"]).save(folder / "brick.png")
    Image.fromarray(FIXTURE_TEXTURES["grass"]).convert("RGB").save(folder / "grass.png")  # any mode is read as L
    Image.fromarray(FIXTURE_TEXTURES["gravel"]).save(folder / "gravel.png")


def test_textures_patches_are_crops_of_their_texture(tmp_path):
    write_textures(tmp_path / "textures")
    size = 4
    loaded = load_dataset("textures", data_root=tmp_path, n=6000, size=size, seed=3)
    assert loaded.images.shape == (6000, size, size) and loaded.images.dtype == np.uint8
    assert loaded.classes == ("brick", "grass", "gravel")
    np.testing.assert_array_equal(loaded.labels, np.arange(6000) % 3)
    for label, texture in enumerate(FIXTURE_TEXTURES.values()):
        patches = loaded.images[loaded.labels == label]
        origins = set()
        for patch in patches:
            row, col = map(int, np.argwhere(texture == patch[0, 0])[0])
            np.testing.assert_array_equal(patch, texture[row:row + size, col:col + size])
            origins.add((row, col))
        assert len(origins) == (TEXTURE_SIDE - size + 1) ** 2  # every position is reachable and drawn


def test_textures_deterministic_per_seed(tmp_path):
    write_textures(tmp_path / "textures")
    a, b, c = (load_dataset("textures", data_root=tmp_path, n=50, size=5, seed=s) for s in (0, 0, 1))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_textures_missing_and_too_small(tmp_path):
    with pytest.raises(DatasetUnavailable, match=r"(?s)textures.*brick\.png, grass\.png and gravel\.png"):
        load_dataset("textures", data_root=tmp_path)
    write_textures(tmp_path / "textures")
    with pytest.raises(ValueError, match="smaller than the patch size 28"):
        load_dataset("textures", data_root=tmp_path)


# ---------------------------------------------------------------- synthetic sets

@pytest.mark.parametrize("name", ["gaussian", "bernoulli", "blobs", "uniform"])
def test_synthetic_deterministic_and_shaped(name):
    a = load_dataset(name, n=300, seed=7)
    b = load_dataset(name, n=300, seed=7)
    c = load_dataset(name, n=300, seed=8)
    assert a.images.shape == (300, 28, 28) and a.images.dtype == np.float32
    assert a.images.tobytes() == b.images.tobytes()
    assert a.images.tobytes() != c.images.tobytes()
    np.testing.assert_array_equal(a.labels, np.full(300, -1))
    assert a.labels.dtype == np.int64
    assert load_dataset(name, n=5, size=11).images.shape == (5, 11, 11)
    assert len(load_dataset(name)) == 10000


def test_gaussian_statistics():
    images = load_dataset("gaussian", n=2000).images
    assert images.min() == 0.0 and images.max() == 1.0
    assert abs(images.mean() - 0.5) < 0.005
    # P(N(0.5, 0.5) < 0) = P(Z < -1) = 0.1587 at each end.
    assert abs((images == 0).mean() - 0.1587) < 0.005
    assert abs((images == 1).mean() - 0.1587) < 0.005


def test_bernoulli_statistics():
    images = load_dataset("bernoulli", n=2000).images
    assert set(np.unique(images)) == {0.0, 1.0}
    assert abs(images.mean() - 0.5) < 0.005


def test_uniform_statistics():
    images = load_dataset("uniform", n=2000).images
    assert 0.0 <= images.min() < 1e-4 and 1 - 1e-4 < images.max() < 1.0
    assert abs(images.mean() - 0.5) < 0.005
    assert abs(images.var() - 1 / 12) < 0.001  # the variance of U[0,1]
    assert abs((images < 0.25).mean() - 0.25) < 0.005


def test_blobs_follow_the_outlier_exposure_recipe():
    from scipy.ndimage import gaussian_filter

    images = load_dataset("blobs", n=2000).images
    # Independent reference: the OE recipe written out for the same seeded noise.
    noise = (np.random.default_rng(0).random((2000, 28, 28), dtype=np.float32) < 0.7).astype(np.float32)
    expected = np.stack([gaussian_filter(image, sigma=1.5, mode="nearest") for image in noise])
    expected[expected < 0.75] = 0.0
    np.testing.assert_allclose(images, expected, atol=1e-6)
    kept = images[images > 0]
    assert kept.min() >= 0.75 and kept.max() <= 1.0
    assert 0.2 < (images > 0).mean() < 0.45
    # Blurring makes blobs: neighbouring pixels agree far more often than in independent noise.
    mask = images > 0
    p = mask.mean()
    assert (mask[:, :, 1:] == mask[:, :, :-1]).mean() > 0.8 > p**2 + (1 - p) ** 2
    # Images are blurred independently: the first image does not depend on the rest.
    np.testing.assert_array_equal(load_dataset("blobs", n=1).images[0], images[0])


@pytest.mark.parametrize("bad", [{"n": 0}, {"size": -1}, {"n": 2.5}, {"size": True}])
def test_synthetic_rejects_bad_parameters(bad):
    with pytest.raises(ValueError, match="must be a positive integer"):
        load_dataset("gaussian", **bad)


# ---------------------------------------------------------------- scikit-learn's bundled data

def test_digits_benchmark_splits():
    target = load_digits().target
    train, test, ood = (load_dataset("digits", split) for split in ("train", "test", "ood"))
    for part in (train, test, ood):
        assert part.images.dtype == np.float32 and part.images.shape[1:] == (8, 8)
        assert part.labels.dtype == np.int64
        assert 0.0 <= part.images.min() and part.images.max() == 1.0
    assert len(train) + len(test) == int((target < 6).sum())
    assert set(np.unique(train.labels)) == set(np.unique(test.labels)) == set(range(6))
    # Disjoint: no image of train appears in test.
    train_rows = {row.tobytes() for row in train.images}
    assert not any(row.tobytes() in train_rows for row in test.images)
    # Stratified 50/50: per class counts differ by at most one.
    assert np.abs(np.bincount(train.labels) - np.bincount(test.labels)).max() <= 1
    np.testing.assert_array_equal(np.unique(ood.labels), [6, 7, 8, 9])
    assert len(ood) == int((target >= 6).sum())
    assert train.fingerprint() == load_dataset("digits", "train").fingerprint()
    assert train.fingerprint() != load_dataset("digits", "train", seed=1).fingerprint()
    assert len(load_dataset("digits", "test", test_fraction=0.25)) == pytest.approx(0.25 * (target < 6).sum(), abs=3)


def test_digits28_matches_torch_bilinear():
    torch = pytest.importorskip("torch")
    loaded = load_dataset("digits28")
    digits = load_digits()
    assert loaded.images.shape == (1797, 28, 28) and loaded.images.dtype == np.float32
    np.testing.assert_array_equal(loaded.labels, digits.target)
    small = torch.from_numpy((digits.images[:20] / 16).astype(np.float32))[:, None]
    expected = torch.nn.functional.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(loaded.images[:20], expected[:, 0].numpy(), atol=1e-5)


@pytest.mark.parametrize("size", [28, 8])
def test_photo_patches(size):
    a = load_dataset("photo-patches", n=200, size=size)
    assert a.images.shape == (200, size, size) and a.images.dtype == np.float32
    assert 0.0 <= a.images.min() and a.images.max() <= 1.0
    np.testing.assert_array_equal(a.labels, np.arange(200) % 2)
    assert a.classes == ("china", "flower")
    assert a.fingerprint() == load_dataset("photo-patches", n=200, size=size).fingerprint()
    assert a.fingerprint() != load_dataset("photo-patches", n=200, size=size, seed=1).fingerprint()
    assert a.images.std(axis=(1, 2)).mean() > 0.01  # real image content, not constant


def test_bundled_files_read_as_scikit_learn_reads_them():
    """The loaders read scikit-learn's bundled files directly (no slow import); same arrays as its API."""
    from PIL import Image

    from extract.datasets import PHOTO_NAMES, _sklearn_bundled, bundled_digits

    images, labels, _ = bundled_digits()
    reference = load_digits()
    np.testing.assert_array_equal(images, reference.images)
    np.testing.assert_array_equal(labels, reference.target)
    for name, photo in zip(PHOTO_NAMES, load_sample_images().images):
        with Image.open(_sklearn_bundled(f"datasets/images/{name}.jpg")) as image:
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")), photo)


def test_photo_patches_are_antialiased_bilinear_resizes_of_crops():
    """Grouping crops by side and resizing each group at once equals resizing every crop alone."""
    torch = pytest.importorskip("torch")
    size, seed, n = 8, 3, 40
    patches = load_dataset("photo-patches", n=n, size=size, seed=seed).images
    photos = [(p.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) / 255
              for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    sides = rng.integers(size, 4 * size, size=n, endpoint=True)
    u = rng.random((n, 2))
    for i in range(n):
        photo = photos[i % 2]
        side = min(sides[i], *photo.shape)
        row = int(u[i, 0] * (photo.shape[0] - side + 1))
        col = int(u[i, 1] * (photo.shape[1] - side + 1))
        crop = torch.from_numpy(np.ascontiguousarray(photo[row:row + side, col:col + side]))[None, None]
        expected = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                                                   antialias=True)[0, 0].clamp(0, 1).numpy()
        np.testing.assert_allclose(patches[i], expected, atol=1e-6)


def test_photo_patches_grayscale_is_luma():
    """With size = the photo height every crop is the full height, unresized: exactly a window of the luma."""
    china = load_sample_images().images[0].astype(np.float64)
    luma = (0.299 * china[..., 0] + 0.587 * china[..., 1] + 0.114 * china[..., 2]) / 255
    height = luma.shape[0]
    patch = load_dataset("photo-patches", n=1, size=height, seed=4).images[0]
    assert patch.shape == (height, height)
    errors = [np.abs(patch - luma[:, col:col + height]).max() for col in range(luma.shape[1] - height + 1)]
    assert min(errors) < 1e-5


def test_hopper_patches_are_crops_of_matplotlibs_photograph_in_luma():
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    with Image.open(path) as image:
        luma = (np.asarray(image.convert("RGB"), dtype=np.float32) @ np.array([0.299, 0.587, 0.114],
                                                                            dtype=np.float32)) / 255
    side = min(luma.shape)  # a crop as large as the photo allows, resized to its own size: an exact crop
    outliers = load_dataset("hopper-patches", "train", n=3, size=side, seed=2)
    assert outliers.images.shape == (3, side, side) and (outliers.labels == 0).all() and outliers.inputs == (path,)
    for patch in outliers.images:
        errors = [np.abs(patch - luma[row:row + side]).max() for row in range(luma.shape[0] - side + 1)]
        assert min(errors) < 1e-5
    small = load_dataset("hopper-patches", "train", n=50)
    assert small.images.shape == (50, 28, 28) and 0 <= small.images.min() and small.images.max() <= 1
    assert small.fingerprint() != load_dataset("hopper-patches", "train", n=50, seed=1).fingerprint()


# ---------------------------------------------------------------- registry and argument errors

def test_registry_names():
    assert set(DATASETS) == {
        "fashion-mnist", "mnist", "notmnist", "kmnist", "animal-mnist", "textures", "digits28",
        "photo-patches", "gaussian", "bernoulli", "blobs", "uniform", "digits", "cifar10-jpeg", "hopper-patches",
        "negative-mnist", "cifar10", "cifar100", "svhn", "dtd", "places365", "lsun-crop", "lsun-resize", "isun",
        "inaturalist", "sun", "places", "imagenet",
    }
    assert DATASETS["gaussian"].defaults == {"n": 10000, "size": 28, "seed": 0}
    assert DATASETS["digits"].splits == ("train", "test", "ood")


def test_unknown_name_lists_registered():
    with pytest.raises(ValueError, match="unknown dataset 'nope-set'.*fashion-mnist.*mnist"):
        load_dataset("nope-set")


def test_unknown_split_names_valid():
    with pytest.raises(ValueError, match="no split 'train'; valid splits: test"):
        load_dataset("notmnist", "train")


def test_unknown_parameter_names_valid():
    with pytest.raises(ValueError, match="unknown parameter.*sigma.*valid parameters: n, seed, size"):
        load_dataset("blobs", sigma=2)
    with pytest.raises(ValueError, match="valid parameters: none"):
        load_dataset("notmnist", n=3)


# ---------------------------------------------------------------- the real development data

@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["mnist", "notmnist"])
def test_real_idx_sets(shared_data, name):
    loaded = load_dataset(name, "test", data_root=shared_data)
    assert loaded.images.shape == (10000, 28, 28) and loaded.images.dtype == np.uint8
    assert loaded.labels.dtype == np.int64
    counts = np.bincount(loaded.labels)
    assert len(counts) == 10
    if name == "notmnist":
        assert (counts == 1000).all()


@pytest.mark.shared_data
def test_real_mnist_has_no_train_split(shared_data):
    with pytest.raises(DatasetUnavailable, match="train-images-idx3-ubyte.gz"):
        load_dataset("mnist", "train", data_root=shared_data)


@pytest.mark.shared_data
def test_real_animal_mnist(shared_data):
    loaded = load_dataset("animal-mnist", data_root=shared_data)
    assert loaded.images.shape == (10000, 28, 28) and loaded.images.dtype == np.uint8
    assert (np.bincount(loaded.labels) == 1000).all()


@pytest.mark.shared_data
def test_real_textures(shared_data):
    loaded = load_dataset("textures", data_root=shared_data)
    assert loaded.images.shape == (10000, 28, 28) and loaded.images.dtype == np.uint8
    textures = [np.asarray(Image.open(shared_data / "textures" / f"{t}.png").convert("L")) for t in loaded.classes]
    windows = [np.lib.stride_tricks.sliding_window_view(t, (28, 28)) for t in textures]
    for patch, label in zip(loaded.images[:6], loaded.labels[:6]):
        rows, cols = np.nonzero(windows[label][:, :, 0, 0] == patch[0, 0])
        assert any((windows[label][r, c] == patch).all() for r, c in zip(rows, cols))


@pytest.mark.skipif(not ds.DEBIAN_FASHION_MNIST.is_dir(),
                    reason=f"{ds.DEBIAN_FASHION_MNIST} absent (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_from_debian(tmp_path):
    for split, n in (("train", 60000), ("test", 10000)):
        loaded = load_dataset("fashion-mnist", split, data_root=tmp_path)
        assert loaded.images.shape == (n, 28, 28) and loaded.images.dtype == np.uint8
        assert str(ds.DEBIAN_FASHION_MNIST) in loaded.source
        np.testing.assert_array_equal(np.bincount(loaded.labels), np.full(10, n // 10))


def write_cifar_jpeg_tree(root, per_class=4, seed=0):
    """A tiny CIFAR-10 (JPEG) ImageFolder tree in the real layout: <root>/cifar10-test-jpeg/<class>/NNNN.jpg."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CIFAR10_CLASSES):
        folder = root / "cifar10-test-jpeg" / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                folder / f"{label * per_class + i:04d}.jpg", quality=75)


def test_cifar10_jpeg_reads_the_image_folder_and_splits_fit_and_test_by_class(tmp_path):
    write_cifar_jpeg_tree(tmp_path)
    fit = load_dataset("cifar10-jpeg", "fit", data_root=tmp_path)
    test = load_dataset("cifar10-jpeg", "test", data_root=tmp_path)
    assert fit.images.shape == (20, 32, 32, 3) and fit.images.dtype == np.uint8 and len(test) == 20
    assert (np.bincount(fit.labels) == 2).all() and (np.bincount(test.labels) == 2).all()  # stratified halves
    assert fit.classes == CIFAR10_CLASSES and "JPEG" in fit.source
    with Image.open(tmp_path / "cifar10-test-jpeg" / "bird" / "0008.jpg") as image:  # the decoded JPEG pixels
        first_bird = np.asarray(image.convert("RGB"))
    together = np.concatenate([fit.images[fit.labels == 2], test.images[test.labels == 2]])
    assert any(np.array_equal(first_bird, image) for image in together)
    assert not set(map(bytes, fit.images)) & set(map(bytes, test.images))
    other = load_dataset("cifar10-jpeg", "fit", data_root=tmp_path, seed=1)
    assert not np.array_equal(other.images, fit.images)


def test_cifar10_jpeg_missing_or_wrong_folders_name_the_layout(tmp_path):
    with pytest.raises(DatasetUnavailable, match="cifar10-test-jpeg/<class>/<NNNN>.jpg"):
        load_dataset("cifar10-jpeg", "test", data_root=tmp_path)
    (tmp_path / "cifar10-test-jpeg" / "cats").mkdir(parents=True)
    with pytest.raises(ValueError, match="expected the CIFAR-10 classes"):
        load_dataset("cifar10-jpeg", "test", data_root=tmp_path)


def test_mnist_fit_and_eval_are_disjoint_stratified_halves_of_the_test_set(tmp_path):
    images = np.repeat(np.arange(40, dtype=np.uint8), 28 * 28).reshape(40, 28, 28)  # every image distinct
    labels = np.arange(40, dtype=np.uint8) % 10
    write_idx_pair(tmp_path / "mnist", "t10k", images, labels)
    test = load_dataset("mnist", "test", data_root=tmp_path)
    fit = load_dataset("mnist", "fit", data_root=tmp_path)
    evaluation = load_dataset("mnist", "eval", data_root=tmp_path)
    assert len(fit) == len(evaluation) == 20
    assert (np.bincount(fit.labels) == 2).all() and (np.bincount(evaluation.labels) == 2).all()
    together = sorted(map(bytes, np.concatenate([fit.images, evaluation.images])))
    assert together == sorted(map(bytes, test.images))  # a partition of the test set
    first = fit.images[:, 0, 0]
    assert (np.diff(first) > 0).all()  # original order kept
    assert "fit part of a fit_fraction=0.5 split, seed=0" in fit.source
    again = load_dataset("mnist", "fit", data_root=tmp_path)
    np.testing.assert_array_equal(again.images, fit.images)
    assert not np.array_equal(load_dataset("mnist", "fit", data_root=tmp_path, seed=1).images, fit.images)
    assert len(load_dataset("mnist", "fit", data_root=tmp_path, fit_fraction=0.25)) == 10
    with pytest.raises(ValueError, match="fit_fraction must lie strictly between 0 and 1"):
        load_dataset("mnist", "fit", data_root=tmp_path, fit_fraction=1.0)


def test_negative_mnist_inverts_every_test_digit(tmp_path):
    images, labels = make_mnist_like(3)
    write_idx_pair(tmp_path / "mnist", "t10k", images, labels)
    negative = load_dataset("negative-mnist", "test", data_root=tmp_path)
    np.testing.assert_array_equal(negative.images.astype(int), 255 - images.astype(int))
    np.testing.assert_array_equal(negative.labels, labels)
    with pytest.raises(DatasetUnavailable, match="(?s)'negative-mnist' is made from MNIST's test set: "
                                                 "dataset 'mnist'.*t10k-images-idx3-ubyte.gz"):
        load_dataset("negative-mnist", "test", data_root=tmp_path / "nothing")


def test_oodbench_fetch_without_a_data_root_downloads_where_the_loaders_look(tmp_path, monkeypatch, capsys,
                                                                          fake_kmnist_server):
    """`make benchmark`'s fallback runs `oodbench fetch fashion-mnist` with no --data-root."""
    from tests.conftest import oodbench

    monkeypatch.setenv("OODBENCH_DOWNLOAD_DIR", str(tmp_path / "downloads"))
    code, _, err = oodbench(capsys, "fetch", "kmnist")
    assert code == 0, err
    assert (tmp_path / "downloads" / "KMNIST" / "raw" / "t10k-images-idx3-ubyte.gz").is_file()
    np.testing.assert_array_equal(load_dataset("kmnist").labels, fake_kmnist_server[0]["t10k"][1])
