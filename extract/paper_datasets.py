"""The paper-scale datasets of the CIFAR and ImageNet OOD benchmarks (``../shared/METHODS.md`` 3.2),
read in their real on-disk formats and registered in ``extract.datasets.DATASETS``.

- ``cifar10``, ``cifar100``: the python pickle batches torchvision's CIFAR10/CIFAR100 download
  (``cifar-10-batches-py/``, ``cifar-100-python/``).
- ``svhn``: torchvision's SVHN ``.mat`` files (``test_32x32.mat``: X (32,32,3,N), y with 10 for 0).
- ``dtd``: the Describable Textures ImageFolder (``dtd/images/<class>/*.jpg``, 5,640 images).
- ``places365``: torchvision's Places365 small-image layout (``val_256/`` + ``places365_val.txt``,
  ``test_256/`` + ``places365_test.txt``).
- ImageFolder trees: ``lsun-crop`` (``LSUN/``), ``lsun-resize`` (``LSUN_resize/``), ``isun``
  (``iSUN/``) as released with ODIN; ``inaturalist``, ``sun``, ``places`` (``iNaturalist/``,
  ``SUN/``, ``Places/``) as released with MOS; ``imagenet`` (``imagenet/val/<wnid>/*.JPEG``).

Images of varying size stay files (``ImageFiles``), decoded during extraction; ``size`` (with
``fit``) fixes a set's size for every backbone, as the CIFAR protocols do. ``subset`` names a
text file listing the exact images a protocol uses (paths relative to the set's folder, one per
line, in order); ``n`` with ``pick`` takes the first n (ASH's Places365) or n seeded random ones.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from extract.datasets import (
    HOW_TO_GET,
    IMAGE_SUFFIXES,
    DatasetUnavailable,
    ImageFiles,
    ImageSet,
    download_dir,
    register_dataset,
    torchvision_download,
    unavailable,
)

PICKS = ("first", "random")

HOW_TO_GET.update({
    "cifar10": "`oodbench fetch cifar10` or `--download` (torchvision's CIFAR10); https://www.cs.toronto.edu/~kriz/cifar.html",
    "cifar100": "`oodbench fetch cifar100` or `--download` (torchvision's CIFAR100); https://www.cs.toronto.edu/~kriz/cifar.html",
    "svhn": "`oodbench fetch svhn` or `--download` (torchvision's SVHN) into <data_root>/svhn/; "
            "http://ufldl.stanford.edu/housenumbers/",
})


def _first_existing(name, split, data_root, candidates, expected, ok=lambda path: path.exists()) -> Path:
    """The first of ``candidates`` (relative to the data root, then to ``download_dir()``, where
    torchvision downloads go without one) that ``ok`` accepts, else the missing-dataset error
    naming all of them."""
    roots = ([data_root] if data_root is not None else []) + [download_dir()]
    searched = [root / c for root in roots for c in candidates]
    found = next((path for path in searched if ok(path)), None)
    if found is None:
        raise unavailable(name, split, data_root, searched, expected)
    return found


def _with_download(name, split, data_root, download, locate):
    """``locate()``, downloading the set with torchvision first when it is missing and ``download``."""
    try:
        return locate()
    except DatasetUnavailable:
        if not download:
            raise
        torchvision_download(name, data_root, split)
        return locate()


def _choose(n_total: int, n: int, pick: str, seed: int) -> np.ndarray:
    """Row indices: all (n = 0), the first n, or n drawn without replacement by default_rng(seed), sorted."""
    if pick not in PICKS:
        raise ValueError(f"pick must be one of {PICKS}, got {pick!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0 (0: every image), got {n}")
    if not n or n >= n_total:
        return np.arange(n_total)
    if pick == "first":
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n_total, size=n, replace=False))


# ---------------------------------------------------------------- CIFAR pickles

def _unpickle(path: Path) -> dict:
    with open(path, "rb") as handle:
        return pickle.load(handle, encoding="latin1")  # as torchvision reads them


def _load_cifar(name, folder_name, split, data_root, download, files, label_key, meta_file, names_key):
    def locate():
        return _first_existing(name, split, data_root, [folder_name, f"{name}/{folder_name}"],
                               f"the python pickle batches {', '.join(files[split])} and {meta_file} in "
                               f"{folder_name}/", ok=lambda p: all((p / f).is_file() for f in files[split]))

    folder = _with_download(name, split, data_root, download, locate)
    batches = [_unpickle(folder / f) for f in files[split]]
    images = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.concatenate([b[label_key] for b in batches]).astype(np.int64)
    classes = tuple(_unpickle(folder / meta_file)[names_key]) if (folder / meta_file).is_file() else None
    return ImageSet(name, split, np.ascontiguousarray(images, dtype=np.uint8), labels,
                    source=f"{folder} ({', '.join(files[split])})", classes=classes,
                    inputs=(folder, *(folder / f for f in files[split])))


@register_dataset("cifar10", ("train", "test"), "CIFAR-10, 32x32 RGB, 10 classes (python pickle batches)")
def load_cifar10(split, data_root, download):
    """CIFAR-10 (Krizhevsky 2009): ``<root>/cifar-10-batches-py/`` (data_batch_1-5, test_batch)."""
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    return _load_cifar("cifar10", "cifar-10-batches-py", split, data_root, download, files, "labels",
                       "batches.meta", "label_names")


@register_dataset("cifar100", ("train", "test"), "CIFAR-100, 32x32 RGB, 100 fine classes (python pickles)")
def load_cifar100(split, data_root, download):
    """CIFAR-100 (Krizhevsky 2009): ``<root>/cifar-100-python/`` (train, test), fine labels."""
    return _load_cifar("cifar100", "cifar-100-python", split, data_root, download,
                       {"train": ["train"], "test": ["test"]}, "fine_labels", "meta", "fine_label_names")


# ---------------------------------------------------------------- SVHN .mat

@register_dataset("svhn", ("train", "test"), "SVHN house-number digits, 32x32 RGB (torchvision's .mat files)",
                  per_class=0)
def load_svhn(split, data_root, download, *, per_class):
    """SVHN (Netzer et al. 2011): ``<root>/svhn/{train,test}_32x32.mat`` with X (32,32,3,N) uint8 and
    y (N,1), label 10 meaning the digit 0 (mapped to 0 as torchvision does). ``per_class`` > 0 keeps
    the first that many images of each class in file order: the DICE/ASH "selected" 10,000
    (per_class 1000); 0 keeps all (the UM and energy_ood protocols)."""
    from scipy.io import loadmat  # imported where used: scipy.io is slow to import

    def locate():
        return _first_existing("svhn", split, data_root, [f"svhn/{split}_32x32.mat", f"SVHN/{split}_32x32.mat"],
                               f"{split}_32x32.mat (torchvision's SVHN format) in svhn/", ok=Path.is_file)

    path = _with_download("svhn", split, data_root, download, locate)
    mat = loadmat(path)
    images = np.ascontiguousarray(mat["X"].transpose(3, 0, 1, 2), dtype=np.uint8)
    labels = mat["y"].astype(np.int64).reshape(-1) % 10
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0 (0: all), got {per_class}")
    index = np.arange(len(labels))
    if per_class:
        index = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
    source = f"{path}" + (f", the first {per_class} per class" if per_class else "")
    return ImageSet("svhn", split, images[index], labels[index], source=source,
                    classes=tuple(str(d) for d in range(10)), inputs=(path.parent, path))


# ---------------------------------------------------------------- image folders

def image_folder_files(root: Path) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
    """torchvision's ImageFolder order: class folders sorted, files sorted within each; the labels
    and class names. Files directly in ``root`` (no class folders) form one class."""
    classes = tuple(sorted(d.name for d in root.iterdir() if d.is_dir()))
    groups = [(label, root / name) for label, name in enumerate(classes)] or [(0, root)]
    files = [(label, path) for label, folder in groups for path in sorted(folder.iterdir())
             if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES]
    return [p for _, p in files], np.array([label for label, _ in files], dtype=np.int64), classes or (root.name,)


def _read_subset(path: Path, folder: Path) -> list[Path]:
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    files = [folder / line for line in lines]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise DatasetUnavailable(f"subset list {path}: {len(absent)} of {len(files)} listed images are not in "
                                 f"{folder} (first: {absent[0]})", searched=(path, folder))
    return files


def _image_folder_set(name, split, data_root, candidates, expected, *, size, fit, subset, n, pick, seed,
                      labelled=True) -> ImageSet:
    def has_images(path):
        return path.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*"))

    folder = _first_existing(name, split, data_root, candidates, expected, ok=has_images)
    files, labels, classes = image_folder_files(folder)
    if subset:
        listed = _read_subset(Path(subset), folder)
        label_of = dict(zip(files, labels))
        files, labels = listed, np.array([label_of.get(f, -1) for f in listed], dtype=np.int64)
    index = _choose(len(files), n, pick, seed)
    files, labels = [files[i] for i in index], labels[index]
    if not labelled:
        labels = np.full(len(files), -1, dtype=np.int64)
    how = (f"subset {subset}, " if subset else "") + (f"{pick} {n}, " if n else "") + \
        (f"{fit} to {size}x{size}" if size else "decoded by the backbone's preprocessing")
    return ImageSet(name, split, ImageFiles(files, folder, size, fit), labels, source=f"{folder} ({how})",
                    classes=classes if labelled else None, inputs=(folder, *{f.parent for f in files}))


def _register_image_folder(name, candidates, description, expected, how, labelled=False):
    HOW_TO_GET[name] = how

    @register_dataset(name, ("test",), description, size=0, fit="crop", subset="", n=0, pick="first", seed=0)
    def load(split, data_root, download, *, size, fit, subset, n, pick, seed):
        return _image_folder_set(name, split, data_root, candidates, expected, size=size, fit=fit, subset=subset,
                                 n=n, pick=pick, seed=seed, labelled=labelled)

    load.__doc__ = f"{description}: an ImageFolder tree, {expected}."
    return load


_ODIN = "the ODIN release (https://github.com/facebookresearch/odin): download and extract"
_MOS = "the MOS release (https://github.com/deeplearning-wisc/large_scale_ood): download and extract"
_register_image_folder("lsun-crop", ["LSUN", "lsun-crop"], "LSUN crops (10,000, 36x36; ODIN)",
                       "LSUN/<any folder>/*.jpg", f"{_ODIN} LSUN.tar.gz into <data_root>/LSUN/")
_register_image_folder("lsun-resize", ["LSUN_resize", "lsun-resize"], "LSUN resized (10,000, 32x32; ODIN)",
                       "LSUN_resize/<any folder>/*.jpg", f"{_ODIN} LSUN_resize.tar.gz into <data_root>/LSUN_resize/")
_register_image_folder("isun", ["iSUN", "isun"], "iSUN (8,925, 32x32; ODIN)", "iSUN/<any folder>/*.jpeg",
                       f"{_ODIN} iSUN.tar.gz into <data_root>/iSUN/")
_register_image_folder("inaturalist", ["iNaturalist", "inaturalist"],
                       "iNaturalist OOD subset (10,000 images of 110 plant classes disjoint from ImageNet; MOS)",
                       "iNaturalist/images/*.jpg", f"{_MOS} iNaturalist.tar.gz into <data_root>/iNaturalist/")
_register_image_folder("sun", ["SUN", "sun"], "SUN OOD subset (10,000 images of 50 classes; MOS)",
                       "SUN/images/*.jpg", f"{_MOS} SUN.tar.gz into <data_root>/SUN/")
_register_image_folder("places", ["Places", "places"], "Places OOD subset (10,000 images of 50 classes; MOS)",
                       "Places/images/*.jpg", f"{_MOS} Places.tar.gz into <data_root>/Places/")

HOW_TO_GET["dtd"] = ("`oodbench fetch dtd` or `--download` (torchvision's DTD), or extract dtd-r1.0.1.tar.gz "
                      "from https://www.robots.ox.ac.uk/~vgg/data/dtd/ into <data_root>/ (gives dtd/images/)")


@register_dataset("dtd", ("test",), "Describable Textures (all 5,640 images, 47 classes; Cimpoi et al. 2014)",
                  size=0, fit="crop", subset="", n=0, pick="first", seed=0)
def load_dtd(split, data_root, download, *, size, fit, subset, n, pick, seed):
    """DTD: ``<root>/dtd/images/<class>/*.jpg`` (the original tarball) or ``<root>/dtd/dtd/images/``
    (torchvision's download); every image, labels from the sorted class folders."""
    return _with_download("dtd", split, data_root, download, lambda: _image_folder_set(
        "dtd", split, data_root, ["dtd/images", "dtd/dtd/images"], "dtd/images/<class>/*.jpg", size=size, fit=fit,
        subset=subset, n=n, pick=pick, seed=seed))


HOW_TO_GET["places365"] = ("`oodbench fetch places365` or `--download` (torchvision's Places365, small images: the val "
                            "split only) into <data_root>/places365/; for test_256 and places365_test.txt see "
                            "http://places2.csail.mit.edu/download.html")


@register_dataset("places365", ("val", "test"), "Places365 small images (256x256; torchvision's layout)",
                  size=0, fit="crop", n=10000, pick="first", seed=0)
def load_places365(split, data_root, download, *, size, fit, n, pick, seed):
    """Places365 (Zhou et al. 2017) in torchvision's small-image layout under ``<root>/places365/``:
    ``val_256/`` listed with labels by ``places365_val.txt``, or ``test_256/`` listed by
    ``places365_test.txt`` (no labels). ``n`` images (default 10,000): the first in list order (ASH)
    or seeded random ones (``pick: random``, as POEM); 0 for all."""
    def locate():
        return _first_existing("places365", split, data_root, ["places365"],
                               f"places365/{split}_256/ and places365/places365_{split}.txt",
                               ok=lambda p: (p / f"places365_{split}.txt").is_file() and (p / f"{split}_256").is_dir())

    folder = _with_download("places365", split, data_root, download, locate)
    rows = [line.split() for line in (folder / f"places365_{split}.txt").read_text().splitlines() if line.strip()]
    files = [folder / f"{split}_256" / row[0].lstrip("/") for row in rows]
    labels = np.array([int(row[1]) if len(row) > 1 else -1 for row in rows], dtype=np.int64)
    index = _choose(len(files), n, pick, seed)
    files, labels = [files[i] for i in index], labels[index]
    absent = next((f for f in files if not f.is_file()), None)
    if absent is not None:
        raise DatasetUnavailable(f"places365: {absent} is listed in places365_{split}.txt but missing",
                                 searched=(absent,))
    how = f"{pick} {n or 'all'}, " + (f"{fit} to {size}x{size}" if size else "decoded by the backbone's preprocessing")
    return ImageSet("places365", split, ImageFiles(files, folder, size, fit), labels, source=f"{folder} ({how})",
                    inputs=(folder, folder / f"places365_{split}.txt", folder / f"{split}_256"))


HOW_TO_GET["imagenet"] = ("no automatic download (license); put the ILSVRC-2012 validation images in "
                           "<data_root>/imagenet/val/<wnid>/*.JPEG (e.g. with torchvision.datasets.ImageNet's devkit "
                           "preparation or the valprep.sh script); https://image-net.org")


@register_dataset("imagenet", ("train", "val"), "ImageNet-1k (ILSVRC-2012): train (1.28M) and val (50,000), "
                  "1,000 classes", subset="", n=0, pick="first", seed=0)
def load_imagenet(split, data_root, download, *, subset, n, pick, seed):
    """ILSVRC-2012 as ImageFolder trees ``<root>/imagenet/{train,val}/<wnid>/*.JPEG``; labels are the
    sorted wnid folders' indices (torchvision's and the pretrained models' class order). A fit split
    is usually a seeded part of train (``n`` with ``pick: random``) or an exact ``subset`` list."""
    return _image_folder_set("imagenet", split, data_root, [f"imagenet/{split}", f"ILSVRC2012/{split}"],
                             f"imagenet/{split}/<wnid>/*.JPEG (1,000 class folders)", size=0, fit="crop",
                             subset=subset, n=n, pick=pick, seed=seed, labelled=True)
