"""Figures the training run writes: curves (Figure 3's panels), tolerance histograms (Figure 2b),
class-conditional sample grids (Figure 7). matplotlib with the Agg backend (no screen needed),
imported on the first figure: importing the trainer does not import matplotlib or change the
backend of a caller's session."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch


def _pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: Sequence[dict], path: str | Path) -> None:
    """Test error, test bits/dim (conditional and marginal) and NFE per iteration against epoch."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    if history and history[0]["test"].get("error") is not None:
        axes[0].plot(epochs, [100 * h["test"]["error"] for h in history], marker="o")
    axes[0].set(title="test classification error", xlabel="epoch", ylabel="error (%)")
    axes[1].plot(epochs, [h["test"]["bpd_cond"] for h in history], marker="o", label="-log p(x|y)")
    axes[1].plot(epochs, [h["test"]["bpd_marginal"] for h in history], marker="s", label="-log p(x)")
    axes[1].set(title="test bits/dim", xlabel="epoch", ylabel="bits/dim")
    axes[1].legend()
    axes[2].plot(epochs, [h["train"]["nfe_forward"] for h in history], marker="o", label="train forward")
    axes[2].plot(epochs, [h["train"]["nfe_backward"] for h in history], marker="s", label="train backward")
    axes[2].plot(epochs, [h["test"]["nfe_forward"] for h in history], marker="^", label="test forward")
    axes[2].set(title="NFE per iteration (sum over blocks)", xlabel="epoch", ylabel="NFE")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tolerance_histograms(log10_tolerances: Sequence[Sequence[float]], path: str | Path, title: str) -> None:
    """One histogram of the drawn log10 tolerance per CNF block (Figure 2b)."""
    plt = _pyplot()
    n = len(log10_tolerances)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.axis("off")
            continue
        ax.hist(log10_tolerances[k], bins=30, color="tab:blue")
        ax.set_title(f"block {k}", fontsize=9)
        ax.set_xlabel("log10 tolerance", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int) -> None:
    """Images ``(B, C, H, W)`` in ``[0, 1]`` as a grid PNG with ``nrow`` images per row."""
    plt = _pyplot()
    images = images.detach().float().cpu().clamp(0, 1)
    batch, channels, height, width = images.shape
    ncol = (batch + nrow - 1) // nrow
    grid = torch.ones(channels, ncol * (height + 1) + 1, nrow * (width + 1) + 1)
    for k in range(batch):
        r, c = divmod(k, nrow)
        grid[
            :, 1 + r * (height + 1) : 1 + r * (height + 1) + height, 1 + c * (width + 1) : 1 + c * (width + 1) + width
        ] = images[k]
    scale = max(1, 384 // grid.shape[2])  # small images (8x8 digits) are enlarged, pixels kept sharp
    grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    array = grid.permute(1, 2, 0).numpy()
    plt.imsave(path, array[..., 0] if channels == 1 else array, cmap="gray" if channels == 1 else None, vmin=0, vmax=1)
