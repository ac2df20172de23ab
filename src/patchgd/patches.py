"""Where the engine gets patches from: an in-memory batch, or any reader behind the same interface.

The engine never needs a whole image at once. It asks for every patch once, in chunks, to fill
Z, and then for a few sampled patches per inner iteration. :class:`PatchProvider` is that
interface. :class:`TensorPatches` serves an in-memory ``(B, C, H, W)`` batch; the data layer
serves images read region by region from disk (``patchgd.data.source_patches.SourcePatches``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .errors import ConfigError, require_count
from .grid import PatchGrid


@runtime_checkable
class PatchProvider(Protocol):
    """Patches of a batch of images on one :class:`~patchgd.grid.PatchGrid`.

    A provider whose images can be smaller than the grid (images of different sizes on one
    canvas) may also have ``extents()``: each image's own grid, ``(B, 2)`` rows and cols at the
    top-left, or ``None`` when every image fills the grid (see :func:`extents_of`).
    """

    @property
    def batch_size(self) -> int: ...

    def gather(self, image_index: Tensor, flat_index: Tensor) -> Tensor:
        """Patches ``(image_index[i], flat_index[i])`` as ``(n, C, p, p)`` on the compute device."""
        ...

    def chunks(self, chunk: int, ids: Tensor | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Every patch of every image (or only those of ``ids``) once, at most ``chunk`` at a time.

        A patch's id is ``image * rows·cols + flat position``; ``ids`` is an ascending 1-D
        tensor of them. Yields ``(ids, patches)`` in that order, ``patches[i]`` being patch
        ``ids[i]``. Chunks are balanced (sizes differ by at most one).
        """
        ...

    def blank(self, image_index: Tensor) -> Tensor:
        """One patch of background per entry of ``image_index``: the colour the images are
        padded with, as ``(n, C, p, p)`` on the compute device."""
        ...


def balanced_chunks(
    ids: Tensor | int, chunk: int, device: torch.device | None = None
) -> list[Tensor]:
    """``ids`` (or ``arange(ids)``) in ``ceil(len / chunk)`` parts of sizes that differ by ≤ 1.

    Balanced parts never leave a lone trailing patch, which BatchNorm with batch statistics
    could not normalise.
    """
    require_count("fill_chunk", chunk)
    if isinstance(ids, int):
        ids = torch.arange(ids, device=device)
    if not len(ids):
        return []
    return list(torch.tensor_split(ids.to(device), math.ceil(len(ids) / chunk)))


class TensorPatches:
    """Patches of an in-memory ``(B, C, H, W)`` batch: a strided view, copied patch by patch.

    The batch is padded once (only when the grid needs padding); every patch request copies
    just the patches asked for.
    """

    def __init__(self, images: Tensor, grid: PatchGrid) -> None:
        self.grid = grid
        self.view = grid.patch_view(grid.pad(images))

    @property
    def batch_size(self) -> int:
        return self.view.shape[0]

    def gather(self, image_index: Tensor, flat_index: Tensor) -> Tensor:
        device = self.view.device
        return self.grid.gather(self.view, image_index.to(device), flat_index.to(device))

    def chunks(self, chunk: int, ids: Tensor | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        n = self.grid.num_patches
        wanted = self.batch_size * n if ids is None else ids
        for part in balanced_chunks(wanted, chunk, self.view.device):
            yield part, self.grid.gather(self.view, part // n, part % n)

    def blank(self, image_index: Tensor) -> Tensor:
        _, c, _, _, p, _ = self.view.shape
        fill = self.grid.pad_colour(c, self.view.dtype, self.view.device)
        return fill.expand(len(image_index), c, p, p).clone()


class RandomPatches:
    """Random patches made on demand, for ``batch`` images on ``grid``: what a lazily read batch
    costs in memory (no pixels held between reads) without reading anything. The memory
    planner's trial steps for lazy data run on it."""

    def __init__(self, batch: int, grid: PatchGrid, in_chans: int, device: torch.device) -> None:
        self.grid, self.in_chans, self.device, self._batch = grid, in_chans, device, batch

    @property
    def batch_size(self) -> int:
        return self._batch

    def _patches(self, n: int) -> Tensor:
        p = self.grid.patch_size
        return torch.randn(n, self.in_chans, p, p, device=self.device)

    def gather(self, image_index: Tensor, flat_index: Tensor) -> Tensor:
        return self._patches(len(flat_index))

    def chunks(self, chunk: int, ids: Tensor | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        wanted = self._batch * self.grid.num_patches if ids is None else ids
        for part in balanced_chunks(wanted, chunk, self.device):
            yield part, self._patches(len(part))

    def blank(self, image_index: Tensor) -> Tensor:
        return self._patches(len(image_index))


def extents_of(patches: PatchProvider) -> Tensor | None:
    """Each image's own grid, ``(B, 2)`` rows and cols, from a provider that has
    ``extents()``; ``None``: every image fills the grid."""
    extents = getattr(patches, "extents", None)
    return None if extents is None else extents()


def as_patches(images: Tensor | PatchProvider, grid: PatchGrid) -> PatchProvider:
    """``images`` as a :class:`PatchProvider`: tensors are wrapped, providers pass through."""
    if isinstance(images, Tensor):
        return TensorPatches(images, grid)
    if isinstance(images, PatchProvider):
        return images
    raise ConfigError(
        f"expected a (B, C, H, W) tensor or a PatchProvider, got {type(images).__name__}"
    )
