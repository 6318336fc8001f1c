"""The multiscale CNF of Appendix B (FFJORD's ODENVP, after RealNVP's multiscale design).

Data side to latent side::

    x in [0,1]^(C,H,W) --logit--> scale 0 --> scale 1 --> ... --> scale S-1
    scale s < S-1:  n_flows blocks on (C,H,W), squeeze to (4C,H/2,W/2), n_flows blocks,
                    factor out the second half of the channels (2C,H/2,W/2), keep the first half
    scale S-1:      n_flows blocks, no squeeze; its whole output is the top latent

CIFAR-10 (3,32,32) with 4 scales: 3 x 4 + 2 = 14 blocks, factored-out sizes 1536 + 768 + 384
and a 384-dim top latent. 8x8 digits with 2 scales: 6 blocks, 32 + 32.

Canonical latent order (the order of :attr:`MultiscaleFlow.latent_shapes` and of the flat
``z``): the factor-out of scale 0 first, then scale 1, ..., the top latent last; each piece
flattened in ``(C, H, W)`` order. The first half of ``z`` (for more than one scale) is exactly
the factor-out of the first scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .cnf import CNFBlock, Encoding, Regularisers

ImageShape = tuple[int, int, int]
# make_block(block_index, (C, H, W) of the block's state) -> the CNF block; indices in network order.
BlockFactory = Callable[[int, ImageShape], CNFBlock]


class LogitTransform(nn.Module):
    """``x -> logit(alpha + (1 - 2 alpha) x)``: maps ``[0,1]`` to the real line (RealNVP's preprocessing).

    ``alpha`` keeps ``x = 0`` and ``x = 1`` finite (``|logit| <= log(1/alpha)``).
    """

    def __init__(self, alpha: float = 1e-6) -> None:
        super().__init__()
        if not 0.0 < alpha < 0.5:
            raise ValueError(f"logit alpha must be in (0, 0.5), got {alpha!r}")
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: ``(batch, ...)`` in ``[0,1]``. Returns ``y`` and ``log|det dy/dx|`` ``(batch,)`` nats."""
        s = self.alpha + (1 - 2 * self.alpha) * x
        y = torch.log(s) - torch.log1p(-s)
        log_det = (math.log(1 - 2 * self.alpha) - torch.log(s) - torch.log1p(-s)).flatten(1).sum(dim=1)
        return y, log_det

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W) -> (B, 4C, H/2, W/2)``: each 2x2 patch becomes 4 channels (RealNVP's squeeze)."""
    return F.pixel_unshuffle(x, 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`squeeze`."""
    return F.pixel_shuffle(x, 2)


def default_n_scales(image_shape: ImageShape) -> int:
    """FFJORD's rule: one scale per halving while both sides are at least 4 (8x8: 2, 28x28: 3, 32x32: 4)."""
    _, h, w = image_shape
    n = 0
    while h >= 4 and w >= 4:
        n, h, w = n + 1, h // 2, w // 2
    return max(n, 1)


class _Scale(nn.Module):
    """``pre`` blocks, then (unless the top scale) squeeze and ``post`` blocks."""

    def __init__(self, pre: list[CNFBlock], post: list[CNFBlock], squeezes: bool) -> None:
        super().__init__()
        self.pre = nn.ModuleList(pre)
        self.post = nn.ModuleList(post)
        self.squeezes = squeezes

    def forward(self, z: torch.Tensor, logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Regularisers]:
        regularisers = Regularisers()
        for block in self.pre:
            z, logp, carried = block.solve(z, logp)
            regularisers += carried
        if self.squeezes:
            z = squeeze(z)
            for block in self.post:
                z, logp, carried = block.solve(z, logp)
                regularisers += carried
        return z, logp, regularisers

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        if self.squeezes:
            for block in reversed(self.post):
                z = block.transport(z, reverse=True)
            z = unsqueeze(z)
        for block in reversed(self.pre):
            z = block.transport(z, reverse=True)
        return z


class MultiscaleFlow(nn.Module):
    """Logit transform and ``n_scales`` scales of CNF blocks; see the module docstring.

    ``make_block(index, (C, H, W))`` builds each block, called in network order.
    """

    def __init__(
        self,
        image_shape: ImageShape,
        n_scales: int,
        n_flows: int,
        make_block: BlockFactory,
        alpha: float = 1e-6,
    ) -> None:
        super().__init__()
        _check_geometry(image_shape, n_scales, n_flows)
        self.image_shape = tuple(image_shape)
        self.logit = LogitTransform(alpha)
        scales, latent_shapes = [], []
        c, h, w = image_shape
        index = 0
        for s in range(n_scales):
            top = s == n_scales - 1
            pre = [make_block(index + k, (c, h, w)) for k in range(n_flows)]
            index += n_flows
            post = []
            if not top:
                c, h, w = 4 * c, h // 2, w // 2
                post = [make_block(index + k, (c, h, w)) for k in range(n_flows)]
                index += n_flows
                c = c // 2
            latent_shapes.append((c, h, w))
            scales.append(_Scale(pre, post, squeezes=not top))
        self.scales = nn.ModuleList(scales)
        self.latent_shapes: list[ImageShape] = latent_shapes
        self.dims = math.prod(image_shape)

    @property
    def blocks(self) -> list[CNFBlock]:
        """Every CNF block, in network order (data side first)."""
        return [m for m in self.modules() if isinstance(m, CNFBlock)]

    @property
    def latent_sizes(self) -> list[int]:
        """Dimensions of each scale's latent piece, in canonical order (they sum to ``dims``)."""
        return [math.prod(shape) for shape in self.latent_shapes]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``x`` ``(B, C, H, W)`` in ``[0,1]``: returns ``z`` ``(B, dims)`` in canonical order
        and ``log|det dz/dx|`` ``(B,)`` in nats, logit transform included."""
        encoding = self.encode(x)
        return encoding.z, encoding.log_det

    def encode(self, x: torch.Tensor) -> Encoding:
        """:meth:`forward`, with the RNODE integrals summed over the blocks
        (:class:`~tolgate_flows.cnf.Regularisers`)."""
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"expected images of shape (batch, {self.image_shape}), got {tuple(x.shape)}")
        h, log_det_logit = self.logit(x)
        logp = h.new_zeros(h.shape[0])
        pieces = []
        regularisers = Regularisers()
        for s, scale in enumerate(self.scales):
            h, logp, carried = scale(h, logp)
            regularisers += carried
            if s < len(self.scales) - 1:
                keep = h.shape[1] // 2
                h, factored = h[:, :keep], h[:, keep:]
                pieces.append(factored.flatten(1))
        pieces.append(h.flatten(1))
        # Each block returned logp - integral of the trace, so -logp is the flow's log-det.
        return Encoding(torch.cat(pieces, dim=1), log_det_logit - logp, regularisers)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Decode ``z`` ``(B, dims)`` (canonical order) back to images ``(B, C, H, W)``."""
        if z.dim() != 2 or z.shape[1] != self.dims:
            raise ValueError(f"expected a latent of shape (batch, {self.dims}), got {tuple(z.shape)}")
        pieces = torch.split(z, self.latent_sizes, dim=1)
        batch = z.shape[0]
        h = pieces[-1].reshape(batch, *self.latent_shapes[-1])
        h = self.scales[-1].inverse(h)
        for s in range(len(self.scales) - 2, -1, -1):
            factored = pieces[s].reshape(batch, *self.latent_shapes[s])
            h = self.scales[s].inverse(torch.cat([h, factored], dim=1))
        return self.logit.inverse(h)


def _check_geometry(image_shape: ImageShape, n_scales: int, n_flows: int) -> None:
    if len(image_shape) != 3 or any(not isinstance(d, int) or d < 1 for d in image_shape):
        raise ValueError(f"image_shape must be three positive ints (C, H, W), got {image_shape!r}")
    if not isinstance(n_scales, int) or n_scales < 1:
        raise ValueError(f"n_scales must be a positive integer, got {n_scales!r}")
    if not isinstance(n_flows, int) or n_flows < 1:
        raise ValueError(f"n_flows must be a positive integer, got {n_flows!r}")
    _, h, w = image_shape
    halvings = 2 ** (n_scales - 1)
    if h % halvings or w % halvings:
        raise ValueError(
            f"{n_scales} scales squeeze {n_scales - 1} times, so H and W must be divisible by {halvings}; "
            f"got image_shape={image_shape!r}"
        )
