"""In-memory image datasets: integer pixels and labels, validated once, split once."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .errors import DataError


@dataclass(frozen=True)
class ImageSplit:
    """One split of an image dataset, kept as integers so the data take one byte per pixel.

    images: (N, C, H, W) torch.uint8, pixel values in {0, ..., levels - 1}.
    labels: (N,) torch.int64, class indices in {0, ..., n_classes - 1}.
    """

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: Tensor) -> ImageSplit:
        """The rows `indices` ((K,) int64) of this split, copied."""
        return ImageSplit(self.images[indices].clone(), self.labels[indices].clone())


@dataclass(frozen=True)
class ImageDataset:
    """A dataset with fixed train / validation / test splits.

    levels: number of pixel values (256 for CIFAR-10 and MNIST, 17 for the 8x8 digits).
    image_shape: (C, H, W).
    flip_symmetric: whether a horizontal flip is a valid augmentation (CIFAR-10 yes; digits no).
    source: where the data were read from, for logs.
    """

    name: str
    train: ImageSplit
    val: ImageSplit
    test: ImageSplit
    levels: int
    n_classes: int
    image_shape: tuple[int, int, int]
    flip_symmetric: bool
    source: str

    @property
    def dims(self) -> int:
        """Number of pixel values per image, C * H * W (the D of bits/dim)."""
        channels, height, width = self.image_shape
        return channels * height * width

    def split(self, name: str) -> ImageSplit:
        """The split called `name`: "train", "val" or "test"."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {name!r}")
        return getattr(self, name)


def validate_split(
    split: ImageSplit,
    *,
    levels: int,
    n_classes: int,
    image_shape: tuple[int, int, int],
    source: str,
) -> None:
    """Raise `DataError` naming `source` unless `split` has the promised dtypes, shapes and ranges."""
    images, labels = split.images, split.labels
    if images.dtype != torch.uint8:
        raise DataError(f"{source}: images must be uint8, got {images.dtype}")
    if labels.dtype != torch.int64:
        raise DataError(f"{source}: labels must be int64, got {labels.dtype}")
    if images.dim() != 4 or tuple(images.shape[1:]) != tuple(image_shape):
        raise DataError(
            f"{source}: images must have shape (N, {', '.join(map(str, image_shape))}), got {tuple(images.shape)}"
        )
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{source}: {images.shape[0]} images but labels of shape {tuple(labels.shape)}")
    if images.shape[0] == 0:
        raise DataError(f"{source}: holds no images")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= n_classes:
        raise DataError(f"{source}: labels must lie in [0, {n_classes - 1}], found range [{low}, {high}]")
    top = int(images.max())
    if top >= levels:
        raise DataError(f"{source}: pixel values must lie in [0, {levels - 1}], found maximum {top}")


def carve_validation(full_train: ImageSplit, *, val_fraction: float, seed: int) -> tuple[ImageSplit, ImageSplit]:
    """Split the official training data into (train, val), disjoint, by a seeded permutation.

    The validation set has round(val_fraction * N) images (at least one); the same `seed` always
    gives the same split, whatever else the program does with random numbers.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    n = len(full_train)
    n_val = max(1, round(val_fraction * n))
    if n_val >= n:
        raise DataError(f"cannot carve {n_val} validation images out of {n} training images")
    order = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    # Sorting each part keeps the original order inside a split, which makes files easy to inspect.
    val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
    return full_train.subset(train_idx), full_train.subset(val_idx)
