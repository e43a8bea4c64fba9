"""Reader for the idx format of MNIST and its look-alikes (Fashion-MNIST, KMNIST, notMNIST).

An idx file is a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), one big-endian int32 per dimension, then the data in C order. Only
the unsigned-byte type (code 0x08) occurs in these datasets, so only it is read.
Files may be gzip-compressed (``.gz``), as distributed, or plain.
"""
import gzip
import zlib
from pathlib import Path

import numpy as np

UBYTE_TYPE_CODE = 0x08


class IdxFormatError(ValueError):
    """An idx file is malformed: bad magic number, unsupported type, wrong size or broken gzip."""


def read_idx(path):
    """Read an idx file (``.gz`` or plain) into a fresh, writable uint8 array of the stored shape.

    Raises IdxFormatError, naming the file, when the magic number is wrong, the
    type is not unsigned byte, the data is shorter or longer than the header
    says, or the gzip stream is broken.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise IdxFormatError(f"{path}: cannot read the gzip stream ({exc}); the file is truncated or corrupt") from exc

    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IdxFormatError(
            f"{path}: bad idx magic number {raw[:4].hex() or '(empty file)'}; "
            "expected two zero bytes, a type code and the number of dimensions"
        )
    if raw[2] != UBYTE_TYPE_CODE:
        raise IdxFormatError(f"{path}: idx type code 0x{raw[2]:02x} is not supported (only 0x08, unsigned byte)")
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise IdxFormatError(f"{path}: truncated idx header ({len(raw)} bytes, need {header_size} for {ndim} dims)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    n_values = int(np.prod(shape, dtype=np.int64))
    n_stored = len(raw) - header_size
    if n_stored != n_values:
        kind = "truncated" if n_stored < n_values else "longer than its header says"
        raise IdxFormatError(f"{path}: idx file {kind}: shape {shape} needs {n_values} bytes of data, found {n_stored}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape).copy()
