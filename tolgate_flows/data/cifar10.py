"""CIFAR-10 from the official files in a local folder (binary or python format); never downloads.

Binary format (`cifar-10-batches-bin/`, from cifar-10-binary.tar.gz): `data_batch_1.bin` ...
`data_batch_5.bin` and `test_batch.bin`, each a sequence of 3073-byte records: one label byte, then
3072 pixel bytes (1024 red, 1024 green, 1024 blue, each plane a row-major 32x32 image).

Python format (`cifar-10-batches-py/`, from cifar-10-python.tar.gz): `data_batch_1` ...
`data_batch_5` and `test_batch`, each a pickled dict with b"data" ((N, 3072) uint8, same layout) and
b"labels" (N ints). They are read with `RestrictedUnpickler`, which refuses anything but arrays,
containers and strings.

Record counts: every official batch holds exactly 10000 records. A binary file cut on a record
boundary is still a whole number of records, so the byte count alone cannot catch it; the count
can. No batch may hold more than 10000 records, and all six batches must hold the same number,
so a batch shorter than its siblings is refused, naming it. Six batches of one smaller, equal
size are read as a reduced copy (test fixtures, a subset made on purpose).
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
CIFAR10_RECORDS_PER_BATCH = 10000
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
    size = path.stat().st_size
    if size > CIFAR10_RECORDS_PER_BATCH * _RECORD_BYTES:
        # Refused from the size on disk: a huge file is never read into memory.
        raise DataError(
            f"{path}: {size} bytes is more than {CIFAR10_RECORDS_PER_BATCH} records of {_RECORD_BYTES} bytes "
            f"({CIFAR10_RECORDS_PER_BATCH * _RECORD_BYTES} bytes), the size of a CIFAR-10 batch; not a CIFAR-10 batch"
        )
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


def _labels_array(raw: Any, path: Path) -> np.ndarray:
    """`raw` as a 1-D int64 array: a flat list (or tuple) of ints, or a 1-D integer array.

    Checked by hand before numpy sees it: `np.asarray` of a deeply nested or ragged list raises
    numpy's own error, which names no file, and huge ints would overflow.
    """
    if isinstance(raw, np.ndarray):
        if raw.dtype.kind not in "iu":
            raise DataError(f"{path}: 'labels' must be integers, got values of dtype {raw.dtype}")
        if raw.ndim != 1:
            raise DataError(f"{path}: 'labels' must be a flat sequence, got an array of shape {raw.shape}")
        return raw.astype(np.int64)
    if not isinstance(raw, (list, tuple)):
        raise DataError(f"{path}: 'labels' must be a list of integers, got {type(raw).__name__}")
    for index, value in enumerate(raw):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise DataError(
                f"{path}: 'labels' must be a flat list of integers; entry {index} is a {type(value).__name__}"
            )
        if not 0 <= int(value) < CIFAR10_CLASSES:
            raise DataError(f"{path}: labels must lie in [0, {CIFAR10_CLASSES - 1}]; entry {index} is {int(value)}")
    return np.array([int(v) for v in raw], dtype=np.int64)


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
    labels = _labels_array(_entry(batch, "labels", path), path)
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {data.shape[0]} images but 'labels' has shape {labels.shape}")
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, *CIFAR10_SHAPE).copy())
    return ImageSplit(images, torch.from_numpy(labels))


def _check_record_counts(counts: dict[Path, int]) -> None:
    """Every batch holds at most 10000 records, and all hold the same number (module docstring)."""
    for path, count in counts.items():
        if count > CIFAR10_RECORDS_PER_BATCH:
            raise DataError(
                f"{path}: holds {count} records, more than the {CIFAR10_RECORDS_PER_BATCH} of a CIFAR-10 batch"
            )
    most = max(counts.values())
    short = [f"{path} holds {count} records" for path, count in counts.items() if count < most]
    if short:
        raise DataError(
            f"{'; '.join(short)}, but the other CIFAR-10 batches hold {most} each (the official "
            f"batches hold {CIFAR10_RECORDS_PER_BATCH}): truncated, possibly on a record boundary, or from "
            "another copy of the dataset"
        )


def _read_batches(folder: Path, fmt: str, names: tuple[str, ...]) -> dict[Path, ImageSplit]:
    paths = [folder / (name + ".bin" if fmt == "bin" else name) for name in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataNotFoundError(f"missing CIFAR-10 file(s): {', '.join(missing)}. {_WHERE_TO_PUT}")
    reader = _read_binary_batch if fmt == "bin" else _read_python_batch
    parts = {p: reader(p) for p in paths}
    for path, part in parts.items():
        validate_split(
            part, levels=CIFAR10_LEVELS, n_classes=CIFAR10_CLASSES, image_shape=CIFAR10_SHAPE, source=str(path)
        )
    return parts


def _concatenate(parts: list[ImageSplit]) -> ImageSplit:
    return ImageSplit(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


def load_cifar10(data_dir: str | Path | None) -> tuple[ImageSplit, ImageSplit, str]:
    """Read CIFAR-10's official training and test sets from `data_dir`.

    Returns (train, test, folder): train (50000, 3, 32, 32) uint8 for the official files, test
    (10000, ...), and the folder read. Every file is validated (record size, record count, shapes,
    label range). Raises `DataNotFoundError` (saying where to put the files) when they are absent
    and `DataError` naming the file when one is malformed.
    """
    if data_dir is None:
        raise DataNotFoundError(f"CIFAR-10 needs a data_dir. {_WHERE_TO_PUT}")
    folder, fmt = _find_folder(Path(data_dir))
    train = _read_batches(folder, fmt, _TRAIN_BATCHES)
    test = _read_batches(folder, fmt, (_TEST_BATCH,))
    _check_record_counts({path: len(part) for path, part in (train | test).items()})
    return _concatenate(list(train.values())), _concatenate(list(test.values())), str(folder)
