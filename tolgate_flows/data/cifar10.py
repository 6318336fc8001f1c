"""CIFAR-10 from the official files in a local folder (binary or python format); never downloads.

Binary format (`cifar-10-batches-bin/`, from cifar-10-binary.tar.gz): `data_batch_1.bin` ...
`data_batch_5.bin` and `test_batch.bin`, each a sequence of 3073-byte records: one label byte, then
3072 pixel bytes (1024 red, 1024 green, 1024 blue, each plane a row-major 32x32 image).

Python format (`cifar-10-batches-py/`, from cifar-10-python.tar.gz): `data_batch_1` ...
`data_batch_5` and `test_batch`, each a pickled dict with b"data" ((N, 3072) uint8, same layout) and
b"labels" (N ints). They are read with `RestrictedUnpickler`, which refuses anything but arrays,
containers and strings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DataError, DataNotFoundError
from .images import ImageSplit, validate_split
from .safe_pickle import load_restricted_pickle

CIFAR10_SHAPE = (3, 32, 32)
CIFAR10_LEVELS = 256
CIFAR10_CLASSES = 10
_PIXELS = 3 * 32 * 32
_RECORD_BYTES = 1 + _PIXELS
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCH = "test_batch"
_BIN_DIR = "cifar-10-batches-bin"
_PY_DIR = "cifar-10-batches-py"

_WHERE_TO_PUT = (
    "CIFAR-10 is never downloaded by this package. Get cifar-10-binary.tar.gz (preferred) or "
    "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extract it into a "
    f"folder DIR so that DIR/{_BIN_DIR}/data_batch_1.bin ... data_batch_5.bin and test_batch.bin "
    f"(or DIR/{_PY_DIR}/data_batch_1 ... data_batch_5 and test_batch) exist, and pass DIR as "
    "data_dir (--data-dir DIR)."
)


def _find_folder(data_dir: Path) -> tuple[Path, str]:
    """The folder holding the batches and its format, "bin" or "py"; binary preferred."""
    for folder, fmt, probe in (
        (data_dir / _BIN_DIR, "bin", "data_batch_1.bin"),
        (data_dir, "bin", "data_batch_1.bin"),
        (data_dir / _PY_DIR, "py", "data_batch_1"),
        (data_dir, "py", "data_batch_1"),
    ):
        if (folder / probe).is_file():
            return folder, fmt
    raise DataNotFoundError(f"no CIFAR-10 batches found in {data_dir}. {_WHERE_TO_PUT}")


def _read_binary_batch(path: Path) -> ImageSplit:
    records = np.fromfile(path, dtype=np.uint8)
    if records.size == 0 or records.size % _RECORD_BYTES != 0:
        raise DataError(
            f"{path}: {records.size} bytes is not a positive multiple of the {_RECORD_BYTES}-byte "
            "CIFAR-10 record (1 label byte + 3072 pixel bytes); the file is truncated or not a CIFAR-10 batch"
        )
    records = records.reshape(-1, _RECORD_BYTES)
    labels = torch.from_numpy(records[:, 0].astype(np.int64))
    images = torch.from_numpy(np.ascontiguousarray(records[:, 1:]).reshape(-1, *CIFAR10_SHAPE))
    return ImageSplit(images, labels)


def _entry(batch: dict[Any, Any], key: str, path: Path) -> Any:
    # Python 2 pickles read with encoding="bytes" have bytes keys; re-pickled files may have str keys.
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    raise DataError(f"{path}: the pickled dict has no {key!r} entry (keys: {sorted(map(repr, batch))})")


def _read_python_batch(path: Path) -> ImageSplit:
    batch = load_restricted_pickle(path)
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    data = _entry(batch, "data", path)
    wanted = f"'data' must be a uint8 array of shape (N, {_PIXELS})"
    if not isinstance(data, np.ndarray):
        raise DataError(f"{path}: {wanted}, got {type(data).__name__}")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise DataError(f"{path}: {wanted}, got a {data.dtype} array of shape {data.shape}")
    raw_labels = _entry(batch, "labels", path)
    labels = np.asarray(raw_labels)
    if labels.dtype.kind not in "iu":
        raise DataError(f"{path}: 'labels' must be integers, got values of dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {data.shape[0]} images but 'labels' has shape {labels.shape}")
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, *CIFAR10_SHAPE).copy())
    return ImageSplit(images, torch.from_numpy(labels))


def _read_batches(folder: Path, fmt: str, names: tuple[str, ...]) -> ImageSplit:
    paths = [folder / (name + ".bin" if fmt == "bin" else name) for name in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataNotFoundError(f"missing CIFAR-10 file(s): {', '.join(missing)}. {_WHERE_TO_PUT}")
    reader = _read_binary_batch if fmt == "bin" else _read_python_batch
    parts = [reader(p) for p in paths]
    for path, part in zip(paths, parts, strict=True):
        validate_split(
            part, levels=CIFAR10_LEVELS, n_classes=CIFAR10_CLASSES, image_shape=CIFAR10_SHAPE, source=str(path)
        )
    return ImageSplit(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


def load_cifar10(data_dir: str | Path | None) -> tuple[ImageSplit, ImageSplit, str]:
    """Read CIFAR-10's official training and test sets from `data_dir`.

    Returns (train, test, folder): train (50000, 3, 32, 32) uint8 for the official files, test
    (10000, ...), and the folder read. Every file is validated (record size, shapes, label range).
    Raises `DataNotFoundError` (saying where to put the files) when they are absent.
    """
    if data_dir is None:
        raise DataNotFoundError(f"CIFAR-10 needs a data_dir. {_WHERE_TO_PUT}")
    folder, fmt = _find_folder(Path(data_dir))
    return _read_batches(folder, fmt, _TRAIN_BATCHES), _read_batches(folder, fmt, (_TEST_BATCH,)), str(folder)
