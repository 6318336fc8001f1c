"""Data for tolgate_flows: image datasets read from local files (never downloaded), reproducible
dequantized batches, the bi-directional spirals, the 1-D Gaussian mixture and FFJORD's 2-D toy
densities (the low-dimensional testbeds, by name in ``TESTBEDS``)."""

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
from .testbeds import TESTBEDS, ToyData, toy_data
from .toy2d import PINWHEEL_ARMS, TOY2D, checkerboard, eight_gaussians, labelled_pinwheel, pinwheel

__all__ = [
    "CLOCKWISE",
    "COUNTER_CLOCKWISE",
    "DATASET_NAMES",
    "DEFAULT_VAL_FRACTION",
    "MIXTURE_MEANS",
    "MIXTURE_STDS",
    "MIXTURE_WEIGHTS",
    "PINWHEEL_ARMS",
    "SPIRAL_TEST_SEED",
    "SPIRAL_TRAIN_SEED",
    "TESTBEDS",
    "THREE_GAUSSIANS",
    "TOY2D",
    "DataError",
    "DataNotFoundError",
    "GaussianMixture1D",
    "ImageBatch",
    "ImageBatches",
    "ImageDataset",
    "ImageSplit",
    "RestrictedUnpickler",
    "SpiralData",
    "ToyData",
    "bits_per_dim",
    "checkerboard",
    "dequantize",
    "derived_seed",
    "eight_gaussians",
    "labelled_pinwheel",
    "load_dataset",
    "load_restricted_pickle",
    "make_batches",
    "make_spiral_splits",
    "make_spirals",
    "pinwheel",
    "toy_data",
]
