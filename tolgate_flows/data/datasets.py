"""`load_dataset`: one entry point for CIFAR-10, MNIST and the 8x8 digits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from .cifar10 import CIFAR10_CLASSES, CIFAR10_LEVELS, CIFAR10_SHAPE, load_cifar10
from .digits import DIGITS_CLASSES, DIGITS_LEVELS, DIGITS_SHAPE, load_digits_splits
from .images import ImageDataset, ImageSplit, carve_validation
from .mnist import MNIST_CLASSES, MNIST_LEVELS, MNIST_SHAPE, load_mnist

DEFAULT_VAL_FRACTION = 0.1


class _Spec(NamedTuple):
    read: Callable[[str | Path | None], tuple[ImageSplit, ImageSplit, str]]
    levels: int
    n_classes: int
    image_shape: tuple[int, int, int]
    flip_symmetric: bool  # digits are not mirror-symmetric (a flipped 2 is no 2); CIFAR-10 scenes are


_SPECS: dict[str, _Spec] = {
    "cifar10": _Spec(load_cifar10, CIFAR10_LEVELS, CIFAR10_CLASSES, CIFAR10_SHAPE, True),
    "mnist": _Spec(load_mnist, MNIST_LEVELS, MNIST_CLASSES, MNIST_SHAPE, False),
    # The digits ship with scikit-learn, so their reader ignores data_dir.
    "digits": _Spec(lambda _: load_digits_splits(), DIGITS_LEVELS, DIGITS_CLASSES, DIGITS_SHAPE, False),
}
DATASET_NAMES: tuple[str, ...] = tuple(_SPECS)


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    split_seed: int = 0,
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> ImageDataset:
    """Load `name` ("cifar10", "mnist" or "digits") with a validation split carved from its training data.

    data_dir: folder with the official files (CIFAR-10, MNIST); ignored for "digits", which is bundled
        with scikit-learn. Nothing is ever downloaded: absent files raise `DataNotFoundError`, whose
        message says where to put them.
    split_seed: seeds the train/validation permutation (the test split is always the official one,
        or for digits a fixed one).
    val_fraction: share of the official training images moved to the validation split.
    """
    if name not in _SPECS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    spec = _SPECS[name]
    full_train, test, source = spec.read(data_dir)
    train, val = carve_validation(full_train, val_fraction=val_fraction, seed=split_seed)
    return ImageDataset(
        name=name,
        train=train,
        val=val,
        test=test,
        levels=spec.levels,
        n_classes=spec.n_classes,
        image_shape=spec.image_shape,
        flip_symmetric=spec.flip_symmetric,
        source=source,
    )
