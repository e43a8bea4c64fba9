"""Everything that touches images and networks: datasets, backbones, extraction, the HDF5 store."""
