"""MNIST from the four official IDX files in a local folder, gzipped or not; never downloads.

IDX layout (big-endian): two zero bytes, a type code (0x08 = unsigned byte), the number of
dimensions, one uint32 per dimension, then the values. Images: magic 0x00000803, dims (N, 28, 28);
labels: magic 0x00000801, dims (N,). Images stay 28x28 with one channel (no padding).
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path
from typing import BinaryIO

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


# Deflate cannot expand data by more than about 1032:1 (a 258-byte match costs at least two
# bits), so a header promising more bytes than that lies about the file and is refused before
# anything is decompressed. The slack covers the gzip header and trailer of tiny files.
_MAX_DEFLATE_RATIO = 1032
_GZIP_SLACK_BYTES = 1024
_CHUNK_BYTES = 1 << 20


def _read_into(stream: BinaryIO, buffer: memoryview) -> int:
    """Fill `buffer` from `stream` in chunks; return how many bytes came (fewer at end of data)."""
    filled = 0
    while filled < len(buffer):
        got = stream.readinto(buffer[filled : filled + _CHUNK_BYTES])
        if not got:
            break
        filled += got
    return filled


def _read_header(stream: BinaryIO, path: Path, ndim: int) -> tuple[int, tuple[int, ...]]:
    """The header's byte length and dimensions; `DataError` naming `path` on a bad magic or truncation."""
    head = stream.read(4)
    if len(head) < 4:
        raise DataError(f"{path}: {len(head)} bytes is too short for an IDX header")
    zero_a, zero_b, type_code, file_ndim = head
    magic = int.from_bytes(head, "big")
    expected_magic = (_UNSIGNED_BYTE << 8) | ndim
    if zero_a != 0 or zero_b != 0 or type_code != _UNSIGNED_BYTE or file_ndim != ndim:
        raise DataError(
            f"{path}: magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"(unsigned bytes, {ndim} dimension(s)); not the IDX file expected here"
        )
    header = 4 + 4 * ndim
    raw_dims = stream.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise DataError(f"{path}: truncated inside the IDX header ({4 + len(raw_dims)} of {header} bytes)")
    return header, tuple(int.from_bytes(raw_dims[4 * i : 4 * i + 4], "big") for i in range(ndim))


def _check_size_before_reading(path: Path, header: int, dims: tuple[int, ...], gzipped: bool) -> None:
    """Refuse, from the file's size on disk alone, a header whose dimensions the file cannot hold."""
    # math.prod on Python ints cannot overflow (np.prod of four uint32 dims wraps around in int64).
    expected = header + math.prod(dims)
    size = path.stat().st_size
    if not gzipped:
        if size != expected:
            kind = "truncated" if size < expected else "has trailing bytes"
            raise DataError(f"{path}: {kind}: header promises dims {dims}, i.e. {expected} bytes, file has {size}")
        return
    limit = _MAX_DEFLATE_RATIO * size + _GZIP_SLACK_BYTES
    if expected > limit:
        raise DataError(
            f"{path}: truncated or corrupt: header promises dims {dims}, i.e. {expected} bytes, more than a "
            f"{size}-byte gzip file can hold (at most {limit} bytes at deflate's {_MAX_DEFLATE_RATIO}:1 ratio)"
        )


def _read_idx_stream(stream: BinaryIO, path: Path, ndim: int, gzipped: bool) -> np.ndarray:
    header, dims = _read_header(stream, path, ndim)
    _check_size_before_reading(path, header, dims, gzipped)
    values = np.empty(math.prod(dims), dtype=np.uint8)
    got = _read_into(stream, memoryview(values))
    promise = f"header promises dims {dims}, i.e. {header + values.size} bytes"
    source = "the decompressed data has" if gzipped else "the file has"
    if got < values.size:
        raise DataError(f"{path}: truncated: {promise}, {source} {header + got}")
    # One byte more, never the rest: data past the promised size is refused without decompressing
    # it all. At the end of a gzip stream this read also checks the CRC and length trailer.
    if stream.read(1):
        raise DataError(f"{path}: has trailing bytes: {promise}, {source} more")
    return values.reshape(dims)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file with `ndim` dimensions; `DataError` names the file on any mismatch.

    The header is read first and checked against the file's size (for a `.gz`, against the most
    that deflate can expand it to); the values are then streamed into an array of exactly the
    promised size, so neither a lying header nor an oversize `.gz` is ever read in full.
    """
    if path.suffix != ".gz":
        with open(path, "rb") as handle:
            return _read_idx_stream(handle, path, ndim, gzipped=False)
    try:
        with gzip.open(path, "rb") as stream:
            return _read_idx_stream(stream, path, ndim, gzipped=True)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a readable gzip file (truncated or corrupt): {exc}") from exc


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
