"""Image datasets for the OOD benchmarks: a registry of small loaders that read the real on-disk formats.

Every dataset is registered by name in ``DATASETS``; ``load_dataset(name, split)``
returns an ``ImageSet`` (images, int64 labels, where they came from).

Where the data comes from:

- Files under a data root (the ``data_root`` argument, else ``$OODBENCH_DATA_ROOT``):
  ``mnist``, ``fashion-mnist``, ``kmnist``, ``notmnist`` (idx files), ``animal-mnist``
  (npz), ``textures`` (PNGs). ``fashion-mnist`` is also found where Debian's
  ``dataset-fashion-mnist`` package installs it.
- torchvision downloads (``download=True`` or ``fetch_dataset``) for ``mnist``,
  ``fashion-mnist`` and ``kmnist``.
- scikit-learn's bundled data: ``digits``, ``digits28``, ``photo-patches``.
- Generated from a seed: ``gaussian``, ``bernoulli``, ``blobs``, ``uniform``.
- The paper-scale sets (CIFAR, SVHN, DTD, Places365, the LSUN, iSUN, MOS and ImageNet image
  folders) are in ``extract.paper_datasets``, which the ``extract`` package imports, so
  ``DATASETS`` always holds them too.

Nothing is cached: each call reads or generates fresh arrays, which the caller owns.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from scipy.ndimage import gaussian_filter

from extract.idx import read_idx

log = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DATA_ROOT_ENV = "OODBENCH_DATA_ROOT"
DOWNLOAD_DIR_ENV = "OODBENCH_DOWNLOAD_DIR"

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DIGIT_CLASSES = tuple(str(d) for d in range(10))
NOTMNIST_CLASSES = tuple("ABCDEFGHIJ")
KMNIST_CLASSES = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
TEXTURE_NAMES = ("brick", "grass", "gravel")
PHOTO_NAMES = ("china", "flower")
ITU_R_601_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

# Datasets torchvision can download: its class (for the MNIST family also the folder name of its
# layout), the constructor's arguments for a split, and the folder under the root it downloads into.
TORCHVISION_DOWNLOADS = {
    "mnist": ("MNIST", lambda split: {"train": False}, ""),
    "fashion-mnist": ("FashionMNIST", lambda split: {"train": False}, ""),
    "kmnist": ("KMNIST", lambda split: {"train": False}, ""),
    "cifar10": ("CIFAR10", lambda split: {"train": split == "train"}, ""),
    "cifar100": ("CIFAR100", lambda split: {"train": split == "train"}, ""),
    "svhn": ("SVHN", lambda split: {"split": split}, "svhn"),
    "dtd": ("DTD", lambda split: {}, ""),
    "places365": ("Places365", lambda split: {"split": "val", "small": True}, "places365"),  # torchvision has no test
}
IDX_DOWNLOADS = ("mnist", "fashion-mnist", "kmnist")

HOW_TO_GET = {
    "fashion-mnist": (
        "`apt-get install dataset-fashion-mnist` (installs the files in /usr/share/datasets/fashion-mnist/), "
        "or `oodbench fetch fashion-mnist` or `oodbench run ... --download` (torchvision download); "
        "source: https://github.com/zalandoresearch/fashion-mnist"
    ),
    "mnist": (
        "`oodbench fetch mnist` or `oodbench run ... --download` (torchvision download); "
        "source: http://yann.lecun.com/exdb/mnist/"
    ),
    "kmnist": (
        "`oodbench fetch kmnist` or `oodbench run ... --download` (torchvision download); "
        "source: https://github.com/rois-codh/kmnist"
    ),
    "notmnist": (
        "no automatic download; put the idx conversion of notMNIST from "
        "https://github.com/davidflanagan/notMNIST-to-MNIST (MIT) in <data_root>/notmnist/"
    ),
    "animal-mnist": (
        "no automatic download; take the test images of the `animal-mnist` PyPI package "
        "(pip install animal-mnist) and save them with numpy.savez as animal_mnist_10k.npz "
        "holding `images` (N,28,28) uint8 and `labels` (N,)"
    ),
    "cifar10-jpeg": (
        "no automatic download; the CIFAR-10 test set as JPEG files in an ImageFolder tree "
        "<data_root>/cifar10-test-jpeg/<class>/<NNNN>.jpg (10 class folders; sorted folder names give the "
        "standard CIFAR-10 label order), e.g. written from torchvision.datasets.CIFAR10(train=False) "
        "with PIL at JPEG quality 75; source: https://www.cs.toronto.edu/~kriz/cifar.html"
    ),
    "textures": (
        "no automatic download; save scikit-image's skimage.data.brick(), .grass() and .gravel() "
        "(CC0) as 8-bit grayscale PNGs brick.png, grass.png, gravel.png in <data_root>/textures/"
    ),
}


class DatasetUnavailable(RuntimeError):
    """The files of a dataset were not found (or could not be downloaded).

    ``searched``: the paths looked at, so a caller can notice when one of them appears.
    """

    def __init__(self, message: str, searched=()):
        super().__init__(message)
        self.searched = tuple(Path(p) for p in searched)


class ImageFiles:
    """Image files decoded on demand, for sets too large to hold in memory or whose images differ in
    size (ImageNet and its OOD sets): what ``ImageSet.images`` holds instead of an array. Indexing
    with a slice or an index array gives the files of those rows; ``open(i)`` returns the i-th as a
    Pillow image, which the backbone's preprocessing converts, resizes and crops.

    ``size`` > 0 fixes the set's own image size first, as a benchmark protocol does for every
    backbone (the CIFAR benchmarks bring their OOD sets to 32x32): ``fit`` "crop" is torchvision's
    Resize(size) then CenterCrop(size) (DICE, ASH, energy_ood), "squash" is Resize((size, size))
    (ReAct, UM); bilinear with antialiasing."""

    FITS = ("crop", "squash")

    def __init__(self, paths, root: Path, size: int = 0, fit: str = "crop"):
        if fit not in self.FITS:
            raise ValueError(f"fit must be one of {self.FITS}, got {fit!r}")
        self.paths = tuple(Path(p) for p in paths)
        self.root, self.size, self.fit = Path(root), int(size), fit

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index) -> ImageFiles:
        paths = (self.paths[index] if isinstance(index, slice)
                 else [self.paths[i] for i in np.asarray(index).reshape(-1)])
        return ImageFiles(paths, self.root, self.size, self.fit)

    def open(self, i: int):
        with Image.open(self.paths[i]) as image:
            image = image.convert("RGB") if image.mode not in ("RGB", "L") else image.copy()
        if not self.size:
            return image
        from torchvision.transforms import functional as TF  # imported where used: torchvision is slow to import

        if self.fit == "crop":
            return TF.center_crop(TF.resize(image, self.size, antialias=True), [self.size, self.size])
        return TF.resize(image, [self.size, self.size], antialias=True)

    def identity(self) -> str:
        """SHA-256 over the size and fit and every file's path relative to the root, size and
        modification time (ns): a file replaced, rewritten, added or removed changes it, without
        reading gigabytes of images."""
        digest = hashlib.sha256(f"size={self.size} fit={self.fit}\0".encode())
        for path in self.paths:
            stat = path.stat()
            digest.update(f"{path.relative_to(self.root)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        return digest.hexdigest()


@dataclass
class ImageSet:
    """Images of one split of one dataset, with labels and a note of where they came from.

    images: (N,H,W) grayscale or (N,H,W,3) RGB, uint8 in [0,255] or float32 in [0,1].
    labels: int64 (N,), the set's own class labels (-1 where the set has none);
    ``classes[label]`` names a label when ``classes`` is given.
    inputs: the files read and the folders searched before them: the on-disk state this set
    depends on (empty for generated sets).
    """

    name: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    source: str
    classes: tuple[str, ...] | None = None
    inputs: tuple[Path, ...] = ()

    def __post_init__(self):
        images, labels = self.images, self.labels
        if isinstance(images, ImageFiles):
            if labels.dtype != np.int64 or labels.shape != (len(images),):
                raise ValueError(f"{self.name}/{self.split}: labels must be int64 of shape ({len(images)},), "
                                 f"got {labels.dtype} {labels.shape}")
            return
        if images.dtype not in (np.uint8, np.float32):
            raise TypeError(f"{self.name}/{self.split}: images must be uint8 or float32, got {images.dtype}")
        if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
            raise ValueError(f"{self.name}/{self.split}: images must be (N,H,W) or (N,H,W,3), got {images.shape}")
        if labels.dtype != np.int64 or labels.shape != (len(images),):
            raise ValueError(
                f"{self.name}/{self.split}: labels must be int64 of shape ({len(images)},), "
                f"got {labels.dtype} {labels.shape}"
            )

    def __len__(self) -> int:
        return len(self.images)

    def fingerprint(self) -> str:
        """SHA-256 hex digest of name, split, image dtype, shape and bytes (for ``ImageFiles``: their
        ``identity``), and label bytes."""
        digest = hashlib.sha256()
        if isinstance(self.images, ImageFiles):  # files decoded on demand: their paths, sizes and times
            for part in (self.name, self.split, "files", self.images.identity()):
                digest.update(part.encode() + b"\0")
            digest.update(np.ascontiguousarray(self.labels).data)
            return digest.hexdigest()
        for part in (self.name, self.split, self.images.dtype.str, repr(self.images.shape)):
            digest.update(part.encode() + b"\0")
        digest.update(np.ascontiguousarray(self.images).data)
        digest.update(b"\0")
        digest.update(np.ascontiguousarray(self.labels).data)
        return digest.hexdigest()


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: its splits, parameters with defaults, and loader.

    ``loader(split, data_root, download, **params) -> ImageSet``.
    """

    name: str
    splits: tuple[str, ...]
    description: str
    defaults: dict
    loader: Callable


DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(name, splits, description, **defaults):
    """Decorator that registers ``loader`` under ``name`` with its splits and default parameters."""

    def decorator(loader):
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        DATASETS[name] = DatasetEntry(name, tuple(splits), description, dict(defaults), loader)
        return loader

    return decorator


def default_data_root() -> Path | None:
    """The data root from ``$OODBENCH_DATA_ROOT``, or None when it is unset or empty."""
    value = os.environ.get(DATA_ROOT_ENV)
    return Path(value).expanduser() if value else None


def download_dir() -> Path:
    """Where torchvision downloads go when no data root is given: ``$OODBENCH_DOWNLOAD_DIR`` or
    ``~/.cache/oodbench/data``. The MNIST-family loaders always search it too."""
    return Path(os.environ.get(DOWNLOAD_DIR_ENV) or "~/.cache/oodbench/data").expanduser()


def _get_entry(name) -> DatasetEntry:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; registered datasets: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def load_dataset(name, split="test", *, data_root=None, download=False, **params) -> ImageSet:
    """Load one split of a registered dataset.

    data_root: folder holding the dataset folders (default: ``default_data_root()``).
    download: fetch with torchvision when the files are missing (mnist, fashion-mnist, kmnist).
    params: the dataset's parameters (see ``DATASETS[name].defaults``).
    """
    entry = _get_entry(name)
    if split not in entry.splits:
        raise ValueError(f"dataset {name!r} has no split {split!r}; valid splits: {', '.join(entry.splits)}")
    unknown = sorted(set(params) - set(entry.defaults))
    if unknown:
        valid = ", ".join(sorted(entry.defaults)) or "none"
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for dataset {name!r}; valid parameters: {valid}")
    root = Path(data_root) if data_root is not None else default_data_root()
    return entry.loader(split, root, download, **{**entry.defaults, **params})


def fetch_dataset(name, data_root=None, split="test") -> None:
    """Download a dataset with torchvision into ``data_root`` or ``download_dir()`` (the sets of
    ``TORCHVISION_DOWNLOADS`` only)."""
    _get_entry(name)
    if name not in TORCHVISION_DOWNLOADS:
        how = HOW_TO_GET.get(name, "it needs no files: it is generated or bundled with scikit-learn")
        raise ValueError(
            f"dataset {name!r} cannot be fetched automatically (only {', '.join(sorted(TORCHVISION_DOWNLOADS))} can); "
            f"{how}"
        )
    torchvision_download(name, Path(data_root) if data_root is not None else None, split)


def torchvision_download(name, data_root, split="test"):
    """Download with torchvision's dataset class into ``<data_root or download_dir()>/<folder>``
    (the MNIST family lands in ``<Class>/raw/``, which its loaders search)."""
    import torchvision.datasets

    class_name, arguments, folder = TORCHVISION_DOWNLOADS[name]
    target = (data_root if data_root is not None else download_dir()) / folder
    dataset_class = getattr(torchvision.datasets, class_name)
    target.mkdir(parents=True, exist_ok=True)
    try:
        # the MNIST family's download() fetches all four idx files whichever split is constructed
        dataset_class(root=str(target), download=True, **arguments(split))
    except (RuntimeError, OSError) as exc:
        raise DatasetUnavailable(
            f"downloading dataset {name!r} with torchvision into {target} failed: {exc}\n"
            f"How to get it: {HOW_TO_GET[name]}"
        ) from exc


def unavailable(name, split, data_root, searched, expected) -> DatasetUnavailable:
    """The error for missing files: the dataset, every path searched, the layout expected, how to get it."""
    lines = [f"dataset {name!r} (split {split!r}) not found.", "Searched:"]
    lines += [f"  {path}" for path in searched] or ["  nothing"]
    if data_root is None:
        lines.append(f"No data root given: pass data_root (--data-root) or set ${DATA_ROOT_ENV}.")
    lines.append(f"Expected: {expected}")
    lines.append(f"How to get it: {HOW_TO_GET[name]}")
    return DatasetUnavailable("\n".join(lines), searched)


# ---------------------------------------------------------------- idx files (MNIST family)

_IDX_PREFIX = {"train": "train", "test": "t10k"}


def _idx_dirs(name, data_root, extra_dirs):
    """Folders searched, in order: <root>/<name>/, <root>/<TorchvisionClass>/raw/, extra_dirs, then
    <download_dir()>/<TorchvisionClass>/raw/ for the sets torchvision downloads."""
    dirs = []
    if data_root is not None:
        dirs.append(data_root / name)
        if name in IDX_DOWNLOADS:
            dirs.append(data_root / TORCHVISION_DOWNLOADS[name][0] / "raw")
    dirs += list(extra_dirs)
    if name in IDX_DOWNLOADS:
        dirs.append(download_dir() / TORCHVISION_DOWNLOADS[name][0] / "raw")
    return dirs


def _locate_idx_pair(name, split, data_root, extra_dirs=()):
    """Paths of the images and labels idx files (``.gz`` or plain) from the first folder holding both,
    and the folders searched up to that one."""
    stems = (f"{_IDX_PREFIX[split]}-images-idx3-ubyte", f"{_IDX_PREFIX[split]}-labels-idx1-ubyte")
    dirs = _idx_dirs(name, data_root, extra_dirs)
    for i, directory in enumerate(dirs):
        found = [
            next((p for p in (directory / f"{stem}.gz", directory / stem) if p.is_file()), None) for stem in stems
        ]
        if all(found):
            return found, dirs[:i + 1]
    raise unavailable(
        name, split, data_root, dirs,
        f"{stems[0]}.gz and {stems[1]}.gz (or uncompressed) together in one of those folders",
    )


def _load_idx_set(name, split, data_root, download, classes, extra_dirs=()):
    """Read an idx images/labels pair, downloading it with torchvision first when asked and missing."""
    try:
        (images_path, labels_path), searched = _locate_idx_pair(name, split, data_root, extra_dirs)
    except DatasetUnavailable:
        if not (download and name in IDX_DOWNLOADS):
            raise
        torchvision_download(name, data_root, split)
        (images_path, labels_path), searched = _locate_idx_pair(name, split, data_root, extra_dirs)
    images = read_idx(images_path)
    labels = read_idx(labels_path).astype(np.int64)
    if images.ndim != 3 or labels.shape != (len(images),):
        raise ValueError(
            f"{images_path} holds {images.shape} and {labels_path} holds {labels.shape}; "
            "expected (N,H,W) images and (N,) labels"
        )
    return ImageSet(name, split, images, labels, source=f"{images_path}, {labels_path}", classes=classes,
                    inputs=(*searched, images_path, labels_path))


@register_dataset("fashion-mnist", ("train", "test"), "Fashion-MNIST, 28x28 grayscale clothing, 10 classes")
def load_fashion_mnist(split, data_root, download):
    """Fashion-MNIST (Xiao et al. 2017): idx files, uint8 (N,28,28).

    Searched in <data_root>/fashion-mnist/, <data_root>/FashionMNIST/raw/ (torchvision's
    layout), then DEBIAN_FASHION_MNIST (Debian package ``dataset-fashion-mnist``).
    """
    return _load_idx_set("fashion-mnist", split, data_root, download, FASHION_MNIST_CLASSES, [DEBIAN_FASHION_MNIST])


def seeded_fit_split(images: ImageSet, split: str, fit_fraction: float, seed: int, what: str) -> ImageSet:
    """The ``split`` ("fit" or the other one) part of a stratified ``train_test_split(train_size=fit_fraction,
    random_state=seed, stratify=labels)`` of ``images``, in the original order: how a benchmark with
    only a test set gets a fit split for its ID statistics and a disjoint evaluation split."""
    from sklearn.model_selection import train_test_split  # imported here: scikit-learn is slow to import

    if not 0 < fit_fraction < 1:
        raise ValueError(f"fit_fraction must lie strictly between 0 and 1, got {fit_fraction}")
    fit, rest = train_test_split(np.arange(len(images)), train_size=fit_fraction, random_state=seed,
                                 stratify=images.labels)
    index = np.sort(fit if split == "fit" else rest)
    return ImageSet(images.name, split, images.images[index], images.labels[index],
                    source=f"{images.source}; {what}: stratified {split} part of a fit_fraction={fit_fraction} "
                           f"split, seed={seed}",
                    classes=images.classes, inputs=images.inputs)


def held_out(images: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """``images`` cut in two: (the rest, split '<split>-fit'; the held-out part, split
    '<split>-val'), each in the original order. A benchmark's ID validation split when its dataset
    has none: sweeps select on it, and the methods never fit on it.

    The held-out part is a stratified ``train_test_split(test_size=n_val, random_state=seed,
    stratify=labels)`` with n_val = ceil(``fraction`` N) (what ``test_size=fraction`` gives), raised
    to the number of classes. Where no stratified cut exists (a class with one image: the tiny
    fixtures of the tests, not a real training set) it is a seeded random cut, with a warning."""
    from sklearn.model_selection import train_test_split  # imported here: scikit-learn is slow to import

    n, classes = len(images), np.unique(images.labels, return_counts=True)[1]
    if n < 2:
        raise ValueError(f"{images.name}/{images.split}: {n} image(s); an ID validation split needs a fit split of "
                         "at least 2 images, or the dataset's own validation split (id: val: split)")
    n_val = min(max(math.ceil(fraction * n), len(classes)), n - 1)
    if classes.min() >= 2 and len(classes) <= min(n_val, n - n_val):
        rest, val = train_test_split(np.arange(n), test_size=n_val, random_state=seed, stratify=images.labels)
        how = "a stratified"
    else:
        log.warning("%s/%s: a class has a single image, or there are more classes than images to hold out; the ID "
                    "validation split is a seeded random, not stratified, %d of %d images", images.name, images.split,
                    n_val, n)
        rest, val = train_test_split(np.arange(n), test_size=n_val, random_state=seed)
        how = "an unstratified"
    parts = []
    for index, part in ((np.sort(rest), "fit"), (np.sort(val), "val")):
        parts.append(ImageSet(images.name, f"{images.split}-{part}", images.images[index], images.labels[index],
                              source=f"{images.source}; the {part} part of {how} hold-out of fraction={fraction:g}, "
                                     f"seed={seed}",
                              classes=images.classes, inputs=images.inputs))
    return parts[0], parts[1]


@register_dataset("mnist", ("train", "test", "fit", "eval"), "MNIST handwritten digits, 28x28 grayscale, 10 "
                  "classes; fit/eval: seeded stratified halves of the test set", fit_fraction=0.5, seed=0)
def load_mnist(split, data_root, download, *, fit_fraction, seed):
    """MNIST (LeCun et al.): idx files in <data_root>/mnist/ or <data_root>/MNIST/raw/, uint8 (N,28,28).

    ``fit`` and ``eval`` split the 10,000 test images (``seeded_fit_split``; ``fit_fraction`` and
    ``seed`` apply to them only), for benchmarks run where only the test set exists."""
    if split in ("fit", "eval"):
        test = _load_idx_set("mnist", "test", data_root, download, DIGIT_CLASSES)
        return seeded_fit_split(test, split, fit_fraction, seed, "MNIST test")
    return _load_idx_set("mnist", split, data_root, download, DIGIT_CLASSES)


@register_dataset("negative-mnist", ("test",), "MNIST test digits inverted (1 - x): black on white")
def load_negative_mnist(split, data_root, download):
    """Negative MNIST: every MNIST test image with its intensities inverted, 255 - x (1 - x in [0,1]),
    a covariate-shift OOD set with the same shapes as the ID digits. Labels are the digits."""
    try:
        test = _load_idx_set("mnist", "test", data_root, download, DIGIT_CLASSES)
    except DatasetUnavailable as err:
        raise DatasetUnavailable(f"dataset 'negative-mnist' is made from MNIST's test set: {err}",
                                 err.searched) from err
    return ImageSet("negative-mnist", split, 255 - test.images, test.labels, source=f"255 - ({test.source})",
                    classes=DIGIT_CLASSES, inputs=test.inputs)


@register_dataset("notmnist", ("test",), "notMNIST letters A-J in many fonts, 28x28 grayscale")
def load_notmnist(split, data_root, download):
    """notMNIST (Bulatov 2011) in MNIST's idx layout: t10k-* files in <data_root>/notmnist/, uint8 (N,28,28)."""
    return _load_idx_set("notmnist", split, data_root, download, NOTMNIST_CLASSES)


@register_dataset("kmnist", ("test",), "Kuzushiji-MNIST cursive Japanese characters, 28x28 grayscale")
def load_kmnist(split, data_root, download):
    """Kuzushiji-MNIST (Clanuwat et al. 2018): idx files in <data_root>/kmnist/ or <data_root>/KMNIST/raw/."""
    return _load_idx_set("kmnist", split, data_root, download, KMNIST_CLASSES)


# ---------------------------------------------------------------- other files under the data root

@register_dataset("animal-mnist", ("test",), "Animal silhouettes, 28x28 grayscale white-on-black, 10 classes")
def load_animal_mnist(split, data_root, download):
    """Animal-MNIST (the ``animal-mnist`` PyPI package): <data_root>/animal-mnist/animal_mnist_10k.npz.

    The npz holds ``images`` (N,28,28) uint8 and ``labels`` (N,).
    """
    path = None if data_root is None else data_root / "animal-mnist" / "animal_mnist_10k.npz"
    if path is None or not path.is_file():
        raise unavailable(
            "animal-mnist", split, data_root, [path] if path else [],
            "animal_mnist_10k.npz with arrays `images` (N,28,28) uint8 and `labels` (N,)",
        )
    with np.load(path) as npz:
        if not {"images", "labels"} <= set(npz.files):
            raise ValueError(f"{path}: expected arrays 'images' and 'labels', found {npz.files}")
        images, labels = npz["images"], npz["labels"].astype(np.int64)
    if images.dtype != np.uint8 or images.ndim != 3 or labels.shape != (len(images),):
        raise ValueError(f"{path}: expected uint8 images (N,H,W) and labels (N,), got {images.dtype} {images.shape}")
    return ImageSet("animal-mnist", split, images, labels, source=str(path), inputs=(path,))


def _check_positive(**values):
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


def _crop_origins(u, height, width, side):
    """Top-left corners of side x side crops from uniform draws u (M,2) in [0,1)."""
    rows = (u[:, 0] * (height - side + 1)).astype(np.intp)
    cols = (u[:, 1] * (width - side + 1)).astype(np.intp)
    return rows, cols


@register_dataset("textures", ("test",), "Seeded patches of brick, grass and gravel photographs",
                  n=10000, size=28, seed=0)
def load_textures(split, data_root, download, *, n, size, seed):
    """Texture patches: <data_root>/textures/{brick,grass,gravel}.png (scikit-image data, any mode, read as L).

    Patch i comes from texture i % 3 (the label), cropped size x size at a uniformly
    random position drawn with numpy default_rng(seed). uint8 (n,size,size).
    """
    _check_positive(n=n, size=size)
    folder = None if data_root is None else data_root / "textures"
    paths = [] if folder is None else [folder / f"{texture}.png" for texture in TEXTURE_NAMES]
    if folder is None or not all(p.is_file() for p in paths):
        raise unavailable(
            "textures", split, data_root, [folder] if folder else [],
            "brick.png, grass.png and gravel.png (grayscale photographs, at least size x size) in that folder",
        )
    textures = []
    for path in paths:
        with Image.open(path) as image:
            textures.append(np.asarray(image.convert("L")))
        if min(textures[-1].shape) < size:
            raise ValueError(f"{path} is {textures[-1].shape}, smaller than the patch size {size}")
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % len(textures)
    u = rng.random((n, 2))
    images = np.empty((n, size, size), dtype=np.uint8)
    for label, texture in enumerate(textures):
        index = np.flatnonzero(labels == label)
        rows, cols = _crop_origins(u[index], *texture.shape, size)
        images[index] = sliding_window_view(texture, (size, size))[rows, cols]
    source = f"{size}x{size} crops at default_rng({seed}) positions of " + ", ".join(map(str, paths))
    return ImageSet("textures", split, images, labels, source=source, classes=TEXTURE_NAMES, inputs=(folder, *paths))


# ---------------------------------------------------------------- scikit-learn's bundled data

def _sklearn_bundled(relative: str) -> Path:
    """A data file shipped inside scikit-learn, located without importing it (the import takes ~1 s)."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / relative if spec and spec.origin else None
    if path is None or not path.is_file():
        raise DatasetUnavailable(f"scikit-learn's bundled file {relative} was not found; install scikit-learn",
                                 [path] if path else [])
    return path


def bundled_digits() -> tuple[np.ndarray, np.ndarray, Path]:
    """scikit-learn's ``datasets/data/digits.csv.gz`` as ``load_digits`` reads it: 1,797 rows of 64
    pixel values (0..16) and the label. Returns float64 images (1797,8,8), int64 labels and the file."""
    path = _sklearn_bundled("datasets/data/digits.csv.gz")
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64), path


@register_dataset("digits28", ("test",), "scikit-learn's 1,797 8x8 digits upscaled to 28x28")
def load_digits28(split, data_root, download):
    """scikit-learn's bundled digits (all 1,797; ``bundled_digits``), values 0..16 scaled to [0,1],
    upscaled 8x8 -> 28x28 bilinearly (torch ``interpolate``, align_corners=False). float32
    (1797,28,28); labels are the digits."""
    import torch  # imported where used: the registry itself loads without torch (`oodbench score` never needs it)
    import torch.nn.functional as F

    digits, labels, path = bundled_digits()
    small = torch.from_numpy((digits / 16.0).astype(np.float32))[:, None]
    images = F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False)[:, 0].clamp(0, 1).numpy()
    return ImageSet("digits28", split, images, labels,
                    source="scikit-learn's digits.csv.gz (8x8, /16), upscaled to 28x28 bilinearly",
                    classes=DIGIT_CLASSES, inputs=(path,))


def photo_patches(photos: list[np.ndarray], n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded square patches of grayscale photos: patch i comes from photo i % len(photos) (the
    label), a crop with side uniform in [size, 4*size] (clipped to the photo) at a uniformly random
    position, drawn with numpy default_rng(seed), resized to size x size bilinearly with
    antialiasing (torch ``interpolate``, one call per crop side). float32 in [0,1]."""
    import torch  # imported where used, as in load_digits28
    import torch.nn.functional as F

    _check_positive(n=n, size=size)
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % len(photos)
    sides = rng.integers(size, 4 * size, size=n, endpoint=True)
    u = rng.random((n, 2))
    images = np.empty((n, size, size), dtype=np.float32)
    for label, photo in enumerate(photos):
        sides_here = np.minimum(sides, min(photo.shape))
        for side in np.unique(sides_here[labels == label]):
            index = np.flatnonzero((labels == label) & (sides_here == side))
            rows, cols = _crop_origins(u[index], *photo.shape, side)
            crops = torch.from_numpy(np.ascontiguousarray(sliding_window_view(photo, (side, side))[rows, cols]))
            images[index] = F.interpolate(crops[:, None], size=(size, size), mode="bilinear", align_corners=False,
                                          antialias=True)[:, 0].numpy()
    np.clip(images, 0.0, 1.0, out=images)
    return images, labels


def read_luma(path: Path) -> np.ndarray:
    """A photograph in grayscale, ITU-R 601 luma (0.299R+0.587G+0.114B), float32 in [0,1], read with Pillow."""
    with Image.open(path) as image:
        return (np.asarray(image.convert("RGB"), dtype=np.float32) @ ITU_R_601_LUMA) / 255.0


@register_dataset("photo-patches", ("test",), "Seeded grayscale patches of scikit-learn's two sample photos",
                  n=10000, size=28, seed=0)
def load_photo_patches(split, data_root, download, *, n, size, seed):
    """``photo_patches`` of scikit-learn's bundled sample photographs ``datasets/images/{china,flower}.jpg``
    (what ``load_sample_images`` returns); the label is the photo."""
    paths = [_sklearn_bundled(f"datasets/images/{name}.jpg") for name in PHOTO_NAMES]
    images, labels = photo_patches([read_luma(path) for path in paths], n, size, seed)
    source = (f"scikit-learn's china.jpg/flower.jpg luma; crops of side U[{size},{4 * size}] at default_rng({seed}) "
              f"positions, bilinear (antialiased) to {size}x{size}")
    return ImageSet("photo-patches", split, images, labels, source=source, classes=PHOTO_NAMES, inputs=tuple(paths))


@register_dataset("hopper-patches", ("train",), "Seeded grayscale patches of matplotlib's Grace Hopper photograph "
                  "(auxiliary outliers for outlier exposure)", n=20000, size=28, seed=0)
def load_hopper_patches(split, data_root, download, *, n, size, seed):
    """``photo_patches`` of the one photograph matplotlib bundles, ``mpl-data/sample_data/grace_hopper.jpg``
    (a 600x512 portrait): a training set of auxiliary outliers for the outlier-exposure family,
    disjoint from every test OOD set of the packaged benchmarks (none uses this photograph)."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not path.is_file():
        raise DatasetUnavailable(f"hopper-patches: matplotlib's sample photograph is missing at {path}",
                                 searched=(path,))
    images, labels = photo_patches([read_luma(path)], n, size, seed)
    source = (f"matplotlib's grace_hopper.jpg luma; crops of side U[{size},{4 * size}] at default_rng({seed}) "
              f"positions, bilinear (antialiased) to {size}x{size}")
    return ImageSet("hopper-patches", split, images, labels, source=source, classes=("hopper",), inputs=(path,))


@register_dataset("digits", ("train", "test", "ood"), "8x8 digits: classes 0-5 in-distribution, 6-9 held-out OOD",
                  test_fraction=0.5, seed=0)
def load_digits_benchmark(split, data_root, download, *, test_fraction, seed):
    """scikit-learn's bundled ``load_digits`` as a seconds-fast benchmark. float32 (N,8,8), values / 16.

    train/test: classes 0-5, split by a stratified ``train_test_split(test_size=test_fraction,
    random_state=seed)``; ood: every sample of classes 6-9 (labels kept as their digit).
    Samples keep their order in ``load_digits``.
    """
    from sklearn.model_selection import train_test_split  # imported here: scikit-learn is slow to import

    digits, labels, path = bundled_digits()
    if split == "ood":
        index = np.flatnonzero(labels >= 6)
        classes = DIGIT_CLASSES
    else:
        in_distribution = np.flatnonzero(labels < 6)
        train, test = train_test_split(
            in_distribution, test_size=test_fraction, stratify=labels[in_distribution], random_state=seed
        )
        index = np.sort(train if split == "train" else test)
        classes = DIGIT_CLASSES[:6]
    images = (digits[index] / 16.0).astype(np.float32)
    source = (f"sklearn.datasets.load_digits /16; classes 0-5 split stratified with test_fraction={test_fraction}, "
              f"seed={seed}; ood = classes 6-9")
    return ImageSet("digits", split, images, labels[index], source=source, classes=classes, inputs=(path,))


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def read_image_folder(root: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], list[Path]]:
    """An ImageFolder tree (torchvision's layout: <root>/<class>/<image>): RGB uint8 images
    (N,H,W,3) of one size, labels from the sorted class folder names, the class names and files,
    in (class, file name) order."""
    classes = tuple(sorted(d.name for d in root.iterdir() if d.is_dir()))
    files = [(label, path) for label, name in enumerate(classes)
             for path in sorted((root / name).iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise ValueError(f"{root}: no {'/'.join(IMAGE_SUFFIXES)} images in its class folders")
    images = []
    for _, path in files:
        with Image.open(path) as image:
            images.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise ValueError(f"{root}: images of different sizes {sorted(shapes)[:4]}; expected one size")
    return np.stack(images), np.array([label for label, _ in files], dtype=np.int64), classes, [p for _, p in files]


@register_dataset("cifar10-jpeg", ("fit", "test"), "CIFAR-10 test set as JPEG (a real shift: report as "
                  "'CIFAR-10 (JPEG)'), split in a seeded stratified fit/test half", fit_fraction=0.5, seed=0)
def load_cifar10_jpeg(split, data_root, download, *, fit_fraction, seed):
    """CIFAR-10 (JPEG): <data_root>/cifar10-test-jpeg/<class>/<NNNN>.jpg, 32x32 RGB. There is no
    training set, so ID statistics are fit on a seeded stratified ``fit_fraction`` of the images
    and the rest is the ID test split (``train_test_split(train_size=fit_fraction,
    random_state=seed, stratify=labels)``); samples keep their folder order."""
    root = None if data_root is None else data_root / "cifar10-test-jpeg"
    if root is None or not root.is_dir() or not any(d.is_dir() for d in root.iterdir()):
        raise unavailable("cifar10-jpeg", split, data_root, [root] if root else [],
                           "an ImageFolder tree cifar10-test-jpeg/<class>/<NNNN>.jpg with the 10 CIFAR-10 classes")
    classes = tuple(sorted(d.name for d in root.iterdir() if d.is_dir()))
    if classes != CIFAR10_CLASSES:
        raise ValueError(f"{root}: class folders {list(classes)}, "
                         f"expected the CIFAR-10 classes {list(CIFAR10_CLASSES)}")
    images, labels, classes, files = read_image_folder(root)
    whole = ImageSet("cifar10-jpeg", "all", images, labels, source=f"{root} (JPEG)", classes=classes,
                     inputs=(root, *(root / c for c in classes), *files))
    return seeded_fit_split(whole, split, fit_fraction, seed, "CIFAR-10 (JPEG)")


# ---------------------------------------------------------------- synthetic (Outlier Exposure, Hendrycks et al. 2019)

def _unlabelled(name, split, images, source):
    return ImageSet(name, split, images, np.full(len(images), -1, dtype=np.int64), source=source)


@register_dataset("gaussian", ("test",), "Gaussian noise N(0.5, 0.5) clipped to [0,1]", n=10000, size=28, seed=0)
def load_gaussian(split, data_root, download, *, n, size, seed):
    """Gaussian noise: clip(N(mean 0.5, std 0.5), 0, 1) from numpy default_rng(seed). float32 (n,size,size)."""
    _check_positive(n=n, size=size)
    rng = np.random.default_rng(seed)
    images = np.clip(0.5 + 0.5 * rng.standard_normal((n, size, size), dtype=np.float32), 0.0, 1.0)
    source = f"0.5 + 0.5 * default_rng({seed}).standard_normal (float32) clipped to [0,1], n={n}, size={size}"
    return _unlabelled("gaussian", split, images, source)


@register_dataset("uniform", ("test",), "Uniform noise U[0,1]", n=10000, size=28, seed=0)
def load_uniform(split, data_root, download, *, n, size, seed):
    """Uniform noise as in ODIN (Liang et al. 2018): every pixel i.i.d. U[0,1) from numpy
    default_rng(seed). float32 (n,size,size)."""
    _check_positive(n=n, size=size)
    rng = np.random.default_rng(seed)
    images = rng.random((n, size, size), dtype=np.float32)
    return _unlabelled("uniform", split, images, f"default_rng({seed}).random (float32), n={n}, size={size}")


@register_dataset("bernoulli", ("test",), "Bernoulli(0.5) noise in {0,1}", n=10000, size=28, seed=0)
def load_bernoulli(split, data_root, download, *, n, size, seed):
    """Bernoulli noise: each pixel 1 with probability 0.5, from numpy default_rng(seed). float32 (n,size,size)."""
    _check_positive(n=n, size=size)
    rng = np.random.default_rng(seed)
    images = (rng.random((n, size, size), dtype=np.float32) < 0.5).astype(np.float32)
    return _unlabelled("bernoulli", split, images, f"default_rng({seed}).random (float32) < 0.5, n={n}, size={size}")


@register_dataset("blobs", ("test",), "Blurred Bernoulli(0.7) noise, zeroed below 0.75", n=10000, size=28, seed=0)
def load_blobs(split, data_root, download, *, n, size, seed):
    """Blobs as in the Outlier Exposure code: Bernoulli(0.7) noise from numpy default_rng(seed),
    Gaussian-blurred per image (sigma 1.5 over the two spatial axes, edges extended as in
    skimage's ``gaussian``), then values below 0.75 set to 0 (values above keep their blurred
    intensity). float32 (n,size,size) in {0} U [0.75, 1].
    """
    _check_positive(n=n, size=size)
    rng = np.random.default_rng(seed)
    noise = (rng.random((n, size, size), dtype=np.float32) < 0.7).astype(np.float32)
    images = gaussian_filter(noise, sigma=(0.0, 1.5, 1.5), mode="nearest")
    images[images < 0.75] = 0.0
    source = (f"default_rng({seed}).random (float32) < 0.7, blurred with sigma 1.5, zeroed below 0.75; n={n}, "
              f"size={size}")
    return _unlabelled("blobs", split, images, source)

