"""Data for tolgate_flows: image datasets read from local files (never downloaded), reproducible
dequantized batches, the bi-directional spirals and the 1-D Gaussian mixture."""

from .batches import ImageBatch, ImageBatches, bits_per_dim, dequantize, derived_seed, make_batches
from .datasets import DATASET_NAMES, DEFAULT_VAL_FRACTION, load_dataset
from .errors import DataError, DataNotFoundError
from .images import ImageDataset, ImageSplit
from .mixture import MIXTURE_MEANS, MIXTURE_STDS, MIXTURE_WEIGHTS, THREE_GAUSSIANS, GaussianMixture1D
from .safe_pickle import RestrictedUnpickler, load_restricted_pickle
from .spirals import (
    CLOCKWISE,
    COUNTER_CLOCKWISE,
    SPIRAL_TEST_SEED,
    SPIRAL_TRAIN_SEED,
    SpiralData,
    make_spiral_splits,
    make_spirals,
)

__all__ = [
    "CLOCKWISE",
    "COUNTER_CLOCKWISE",
    "DATASET_NAMES",
    "DEFAULT_VAL_FRACTION",
    "MIXTURE_MEANS",
    "MIXTURE_STDS",
    "MIXTURE_WEIGHTS",
    "SPIRAL_TEST_SEED",
    "SPIRAL_TRAIN_SEED",
    "THREE_GAUSSIANS",
    "DataError",
    "DataNotFoundError",
    "GaussianMixture1D",
    "ImageBatch",
    "ImageBatches",
    "ImageDataset",
    "ImageSplit",
    "RestrictedUnpickler",
    "SpiralData",
    "bits_per_dim",
    "dequantize",
    "derived_seed",
    "load_dataset",
    "load_restricted_pickle",
    "make_batches",
    "make_spiral_splits",
    "make_spirals",
]
