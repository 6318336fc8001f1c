"""Reproducible, resumable mini-batches: uniform dequantization and flips drawn per batch.

How the randomness is carried. Every random draw comes from a fresh CPU `torch.Generator` seeded
by `derived_seed(seed, epoch, ...)` (numpy's SeedSequence mixes the words), never from global RNG:
  - the epoch's permutation from (seed, epoch, 0);
  - batch `b`'s dequantization noise and flip coins from (seed, epoch, 1, b), drawn for the whole
    global batch and then sliced to this rank's shard.
So a batch is a pure function of (seed, epoch, batch index): a checkpoint needs only the base seed
and the position (epoch, next batch index), `ImageBatches.epoch(e, start_batch=b)` resumes exactly
there, and the data seen do not depend on the device, the number of DDP ranks, the batch order of
other epochs or anything else that consumes random numbers.

Not a torch DataLoader on purpose: the data are already uint8 tensors in memory and a batch is one
gather; DataLoader workers would only add processes whose RNGs need seeding of their own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .images import ImageDataset, ImageSplit

_PERMUTATION_STREAM = 0
_BATCH_STREAM = 1


def derived_seed(*words: int) -> int:
    """A 63-bit seed mixed from non-negative integers `words` (SeedSequence, so nearby words decorrelate)."""
    if any(w < 0 for w in words):
        raise ValueError(f"seed words must be non-negative, got {words}")
    low, high = np.random.SeedSequence(list(words)).generate_state(2, dtype=np.uint32)
    return int(low) | (int(high) & 0x7FFFFFFF) << 32


def dequantize(pixels: Tensor, levels: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantization x = (pixel + u) / levels, u ~ U[0, 1) per value.

    pixels: (B, ...) integer tensor with values in {0, ..., levels - 1}.
    Returns float32 of the same shape in [0, 1]. Float32 rounding puts about one value in 10^5 on
    the upper edge (pixel + 1) / levels of its bin (1 itself for the top bin): harmless for the
    density, but do not recover pixels by floor(x * levels). The density of x times levels^D
    lower-bounds the probability of the discrete pixels.
    """
    noise = torch.rand(pixels.shape, generator=generator, dtype=torch.float32)
    return noise.add_(pixels).div_(levels)


def bits_per_dim(log_px_nats: Tensor, dims: int, levels: int) -> Tensor:
    """Bits per dimension of the discrete data from log p(x) of the dequantized x in [0, 1]^D.

    log_px_nats: (...,) log-density in nats of x in [0, 1]^D (the logit transform's log-det included).
    Returns (...,): -(log p(x) - D log(levels)) / (D ln 2); the -D log(levels) term is the change of
    variables from pixel units [0, levels)^D to [0, 1]^D.
    """
    if dims <= 0 or levels <= 1:
        raise ValueError(f"need dims > 0 and levels > 1, got dims={dims}, levels={levels}")
    return -(log_px_nats - dims * math.log(levels)) / (dims * math.log(2.0))


@dataclass(frozen=True)
class ImageBatch:
    """x: (B, C, H, W) float32 in [0, 1], dequantized (and flipped); y: (B,) int64 labels;
    index: (B,) int64 row of each image in its split."""

    x: Tensor
    y: Tensor
    index: Tensor


class ImageBatches:
    """The batches of one split for any epoch; see the module docstring for how the RNG is carried.

    With world_size > 1 every rank forms the same global batch of `batch_size` images and keeps its
    contiguous shard (`torch.tensor_split`), so all ranks yield the same number of batches. Shards
    differ by at most one image; with drop_last=False the last batch may leave a rank with none.
    """

    def __init__(
        self,
        split: ImageSplit,
        *,
        levels: int,
        batch_size: int,
        seed: int,
        shuffle: bool,
        flip: bool,
        drop_last: bool,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if drop_last and batch_size < world_size:
            raise ValueError(f"batch_size {batch_size} leaves some of {world_size} ranks without data")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        n_batches = len(split) // batch_size if drop_last else math.ceil(len(split) / batch_size)
        if n_batches == 0:
            raise ValueError(
                f"batch_size {batch_size} exceeds the {len(split)} images of the split "
                "and drop_last is set: an epoch would be empty"
            )
        self.split = split
        self.levels = levels
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.flip = flip
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._n_batches = n_batches

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        return self._n_batches

    def _order(self, epoch: int) -> Tensor:
        if not self.shuffle:
            return torch.arange(len(self.split))
        generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch, _PERMUTATION_STREAM))
        return torch.randperm(len(self.split), generator=generator)

    def _batch(self, epoch: int, batch: int, global_index: Tensor) -> ImageBatch:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch, _BATCH_STREAM, batch))
        pixels = self.split.images[global_index]
        x = dequantize(pixels, self.levels, generator)
        if self.flip:
            mirrored = torch.rand(x.shape[0], generator=generator) < 0.5
            x[mirrored] = x[mirrored].flip(-1)
        shard = torch.tensor_split(torch.arange(x.shape[0]), self.world_size)[self.rank]
        index = global_index[shard]
        return ImageBatch(
            x=x[shard].to(self.device, non_blocking=True),
            y=self.split.labels[index].to(self.device, non_blocking=True),
            index=index,
        )

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[ImageBatch]:
        """Yield this rank's batches `start_batch, ..., len(self) - 1` of `epoch` (>= 0)."""
        if epoch < 0 or not 0 <= start_batch <= self._n_batches:
            raise ValueError(
                f"need epoch >= 0 and 0 <= start_batch <= {self._n_batches}, "
                f"got epoch={epoch}, start_batch={start_batch}"
            )
        order = self._order(epoch)
        for batch in range(start_batch, self._n_batches):
            yield self._batch(epoch, batch, order[batch * self.batch_size : (batch + 1) * self.batch_size])


def make_batches(
    dataset: ImageDataset,
    split: str,
    batch_size: int,
    *,
    seed: int,
    flip: bool | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
) -> ImageBatches:
    """Batches of `dataset.split(split)` with the usual settings for that split.

    "train": shuffled, last partial batch dropped, flipped when `flip` (default
    `dataset.flip_symmetric`: on for CIFAR-10, off for digits and MNIST). "val" / "test": in order,
    every image, never flipped; their dequantization noise is still seeded, so evaluating
    `.epoch(0)` twice gives identical inputs.
    """
    training = split == "train"
    if flip and not training:
        raise ValueError(f"flips are a training augmentation; got flip=True for split {split!r}")
    return ImageBatches(
        dataset.split(split),
        levels=dataset.levels,
        batch_size=batch_size,
        seed=seed,
        shuffle=training,
        flip=(dataset.flip_symmetric if flip is None else flip) and training,
        drop_last=training,
        rank=rank,
        world_size=world_size,
        device=device,
    )
