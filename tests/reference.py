"""Slow, obvious references and tiny encoders that the engine tests compare against."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from patchgd import PatchGrid


class TinyEncoder(nn.Module):
    """A small conv encoder for tests that need speed, not timm: (n, C, p, p) -> (n, D)."""

    def __init__(self, in_chans: int = 3, latent_dim: int = 8, batchnorm: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 6, 3, padding=1)
        self.norm = nn.BatchNorm2d(6) if batchnorm else nn.Identity()
        self.proj = nn.Linear(6, latent_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(torch.relu(self.norm(self.conv(x))).mean(dim=(2, 3)))


def reference_padded(images: Tensor, grid: PatchGrid) -> Tensor:
    """The padded image built pixel-region by region, without PatchGrid.pad."""
    b, c, h, w = images.shape
    ph, pw = grid.padded_size
    fill = torch.as_tensor(grid.pad_value, dtype=images.dtype).reshape(-1)
    out = torch.empty(b, c, ph, pw, dtype=images.dtype)
    for ch in range(c):
        out[:, ch] = fill[ch % fill.numel()]
    out[:, :, :h, :w] = images
    return out


def reference_patch(images: Tensor, grid: PatchGrid, row: int, col: int) -> Tensor:
    """Patch (row, col) of every image, cut by plain slicing at its pixel box."""
    top, left, bottom, right = grid.box(row, col)
    return reference_padded(images, grid)[:, :, top:bottom, left:right]


def reference_z(encoder: nn.Module, images: Tensor, grid: PatchGrid) -> Tensor:
    """Z from one encoder call per grid position, with gradients: the full-image model's Z."""
    cols = []
    for r in range(grid.rows):
        cols.append(
            torch.stack(
                [encoder(reference_patch(images, grid, r, c)) for c in range(grid.cols)], dim=-1
            )
        )
    return torch.stack(cols, dim=-2)  # (B, D, rows, cols)
