"""Everything that touches images and networks: datasets, backbones, extraction, the HDF5 store.

Importing this package registers every dataset in ``extract.datasets.DATASETS``: the small sets
of ``extract.datasets`` and the paper-scale ones (CIFAR, SVHN, DTD, Places365, the LSUN, iSUN, MOS
and ImageNet image folders), which register themselves from ``extract.paper_datasets``.
"""
from extract import paper_datasets  # noqa: F401  (registers the paper-scale datasets)
