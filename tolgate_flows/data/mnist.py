"""MNIST from the four official IDX files in a local folder, gzipped or not; never downloads.

IDX layout (big-endian): two zero bytes, a type code (0x08 = unsigned byte), the number of
dimensions, one uint32 per dimension, then the values. Images: magic 0x00000803, dims (N, 28, 28);
labels: magic 0x00000801, dims (N,). Images stay 28x28 with one channel (no padding).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from .errors import DataError, DataNotFoundError
from .images import ImageSplit, validate_split

MNIST_SHAPE = (1, 28, 28)
MNIST_LEVELS = 256
MNIST_CLASSES = 10
_UNSIGNED_BYTE = 0x08
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_WHERE_TO_PUT = (
    "MNIST is never downloaded by this package. Put the four official files train-images-idx3-ubyte, "
    "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each may be gzipped, "
    "with a .gz suffix) in a folder DIR (or DIR/mnist, or DIR/MNIST/raw as torchvision lays them out) "
    "and pass DIR as data_dir (--data-dir DIR)."
)


def _locate(data_dir: Path, name: str) -> Path:
    for folder in (data_dir, data_dir / "mnist", data_dir / "MNIST" / "raw"):
        for candidate in (folder / name, folder / (name + ".gz")):
            if candidate.is_file():
                return candidate
    raise DataNotFoundError(f"MNIST file {name} (or {name}.gz) not found under {data_dir}. {_WHERE_TO_PUT}")


def _read_bytes(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as handle:
            return handle.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a readable gzip file (truncated or corrupt): {exc}") from exc


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file with `ndim` dimensions; `DataError` names the file on any mismatch."""
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    zero_a, zero_b, type_code, file_ndim = raw[:4]
    magic = int.from_bytes(raw[:4], "big")
    expected_magic = (_UNSIGNED_BYTE << 8) | ndim
    if zero_a != 0 or zero_b != 0 or type_code != _UNSIGNED_BYTE or file_ndim != ndim:
        raise DataError(
            f"{path}: magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"(unsigned bytes, {ndim} dimension(s)); not the IDX file expected here"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated inside the IDX header ({len(raw)} of {header} bytes)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(f"{path}: {kind}: header promises dims {dims}, i.e. {expected} bytes, file has {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _read_split(data_dir: Path, split: str) -> ImageSplit:
    images_path, labels_path = (_locate(data_dir, name) for name in _FILES[split])
    images = read_idx(images_path, 3)
    if images.shape[1:] != MNIST_SHAPE[1:]:
        raise DataError(f"{images_path}: images must be 28x28, got {images.shape[1]}x{images.shape[2]}")
    labels = read_idx(labels_path, 1)
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{labels_path} holds {labels.shape[0]} labels but {images_path} holds {images.shape[0]} images"
        )
    result = ImageSplit(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    validate_split(
        result,
        levels=MNIST_LEVELS,
        n_classes=MNIST_CLASSES,
        image_shape=MNIST_SHAPE,
        source=f"{images_path} + {labels_path}",
    )
    return result


def load_mnist(data_dir: str | Path | None) -> tuple[ImageSplit, ImageSplit, str]:
    """Read MNIST's official training (60000) and test (10000) sets, (N, 1, 28, 28) uint8.

    Returns (train, test, data_dir). Raises `DataNotFoundError` (saying where to put the files)
    when a file is absent and `DataError` naming the file when one is malformed.
    """
    if data_dir is None:
        raise DataNotFoundError(f"MNIST needs a data_dir. {_WHERE_TO_PUT}")
    root = Path(data_dir)
    return _read_split(root, "train"), _read_split(root, "test"), str(root)
