"""scikit-learn's bundled 8x8 handwritten digits: 1797 images, 17 grey levels, no download.

The set has no official test split, so a fixed one is drawn with `DIGITS_TEST_SEED` (the same for
every run and every `split_seed`, so test numbers from different runs are comparable).
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import DataError
from .images import ImageSplit, validate_split

DIGITS_SHAPE = (1, 8, 8)
DIGITS_LEVELS = 17  # pixel values 0..16 (each is a count of on-pixels in a 4x4 block)
DIGITS_CLASSES = 10
DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 20190918  # fixed forever: changing it changes every reported digits test number
_SOURCE = "sklearn.datasets.load_digits"


def load_digits_splits() -> tuple[ImageSplit, ImageSplit, str]:
    """The digits as (train, test, source): (1437, 1, 8, 8) and (360, 1, 8, 8) uint8, fixed split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataError(f"the digits dataset needs scikit-learn ({exc}); install tolgate[flows]") from exc
    bunch = load_digits()
    pixels = np.asarray(bunch.images)
    # Checked before the uint8 cast, which would wrap out-of-range values silently.
    if not np.array_equal(pixels, np.round(pixels)) or pixels.min() < 0 or pixels.max() >= DIGITS_LEVELS:
        raise DataError(
            f"{_SOURCE}: pixel values must be integers in [0, {DIGITS_LEVELS - 1}], "
            f"found range [{pixels.min()}, {pixels.max()}]"
        )
    full = ImageSplit(
        torch.from_numpy(pixels.astype(np.uint8)).unsqueeze(1),
        torch.from_numpy(np.asarray(bunch.target, dtype=np.int64)),
    )
    validate_split(full, levels=DIGITS_LEVELS, n_classes=DIGITS_CLASSES, image_shape=DIGITS_SHAPE, source=_SOURCE)
    order = torch.from_numpy(np.random.default_rng(DIGITS_TEST_SEED).permutation(len(full)))
    n_test = round(DIGITS_TEST_FRACTION * len(full))
    return full.subset(order[n_test:].sort().values), full.subset(order[:n_test].sort().values), _SOURCE
