"""Patches of images on disk, read region by region: a PatchProvider for huge images.

No image is ever decoded whole. Z-filling reads every patch once, in chunks, through the
worker processes of a standard ``DataLoader``; an inner iteration reads its few sampled patches
in the main process. Memory is bounded by ``chunk`` patches (and the readers' tile caches),
whatever the image size.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, DataError
from ..grid import PatchGrid, extent_mask
from ..patches import balanced_chunks
from .lazy import LazyImage
from .normalisation import ChannelNorm
from .sources import ImageSource, open_image


@dataclass
class ReadWait:
    """Seconds this process waited for patches read from disk, and how many it got.

    With reader workers the fill's reads overlap the encoder's work and the wait is what the
    compute did not hide; an inner iteration's few patches are read in the process itself.
    ``benchmarks/gigapixel.py`` reports it as the share of time spent reading.
    """

    seconds: float = 0.0
    patches: int = 0


#: The totals of every :class:`SourcePatches` of this process.
read_wait = ReadWait()


class LazyBatch(NamedTuple):
    """A batch of lazy images: their records (read patch by patch later) and their labels.

    A tuple, so ``images, targets = batch`` works as for a batch of tensors; a type of its own,
    so the training code tells it from one without looking inside.
    """

    images: list[LazyImage]
    targets: Tensor


def collate_lazy(batch: Sequence[tuple[LazyImage, int]]) -> LazyBatch:
    """``collate_fn`` for a DataLoader over lazy images: the images as a list, labels stacked."""
    images, labels = zip(*batch, strict=True)
    return LazyBatch(list(images), torch.as_tensor(labels, dtype=torch.long))


def image_extents(images: Sequence[LazyImage], grid: PatchGrid) -> Tensor:
    """``(B, 2)`` long: each image's own grid, ``(rows, cols)`` at the top-left of ``grid``
    (:meth:`PatchGrid.extent <patchgd.grid.PatchGrid.extent>`)."""
    return torch.tensor([grid.extent(image.size) for image in images], dtype=torch.long).reshape(
        -1, 2
    )


def image_patches(images: Sequence[LazyImage], grid: PatchGrid) -> Tensor:
    """``(B, rows · cols)`` bool: the patches of each image's own grid, not its canvas padding.

    On a common canvas a small image's grid is mostly padding; as ``candidates`` this keeps the
    fill and the sampler off the patches that hold nothing but the fill colour.
    """
    return extent_mask(image_extents(images, grid), grid.shape).flatten(1)


class _PatchReader:
    """Reads patch ``(b, flat)`` of ``images`` as uint8 ``(p, p, C)``; opens each file once."""

    def __init__(self, images: Sequence[LazyImage], grid: PatchGrid) -> None:
        self.images = list(images)
        self.grid = grid
        self._sources: dict[int, ImageSource] = {}

    def source(self, b: int) -> ImageSource:
        if b not in self._sources:
            image = self.images[b]
            self._sources[b] = open_image(image.path, level=image.level, keep_gray=image.keep_gray)
        return self._sources[b]

    def read(self, b: int, flat: int) -> np.ndarray:
        top, left, bottom, right = self.grid.box(*self.grid.position(flat))
        # Past the image's edge (canvas and grid padding alike) the source returns the fill.
        return self.source(b).read_region(
            top, left, bottom - top, right - left, fill=self.images[b].fill
        )

    def blank(self, b: int) -> np.ndarray:
        """A patch of image b's fill colour: a region read wholly past the image's corner."""
        image, p = self.images[b], self.grid.patch_size
        return self.source(b).read_region(*image.size, p, p, fill=image.fill)

    def read_many(self, image_index: Sequence[int], flat_index: Sequence[int]) -> np.ndarray:
        return np.stack([self.read(b, f) for b, f in zip(image_index, flat_index, strict=True)])

    def close(self) -> None:
        for source in self._sources.values():
            source.close()
        self._sources.clear()


class _ChunkDataset(Dataset):
    """Item i: the ids of fill chunk i and its patches as uint8 ``(n, p, p, C)``."""

    def __init__(self, reader: _PatchReader, chunks: list[Tensor]) -> None:
        self.reader, self.chunks = reader, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        ids = self.chunks[i]
        n = self.reader.grid.num_patches
        patches = self.reader.read_many((ids // n).tolist(), (ids % n).tolist())
        return ids, torch.from_numpy(patches)


class SourcePatches:
    """A :class:`~patchgd.patches.PatchProvider` over :class:`LazyImage` s read from disk.

    Args:
        images: the batch; every image's ``canvas`` must equal ``grid.image_size``.
        grid: the patch grid of the model.
        mean, std: per-channel normalisation in [0, 1] units (``(x/255 - mean) / std``);
            ``None`` leaves pixels in [0, 1]. Padding reads as the images' ``fill`` colour,
            normalised like any pixel; the grid's ``pad_value`` is not used.
        device: where patches are delivered (the encoder's device).
        num_workers: DataLoader worker processes reading the fill's chunks (0: main process).
    """

    def __init__(
        self,
        images: Sequence[LazyImage],
        grid: PatchGrid,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        device: str | torch.device = "cpu",
        num_workers: int = 0,
    ) -> None:
        for image in images:
            if tuple(image.canvas) != grid.image_size:
                raise ConfigError(
                    f"{image.path}: canvas {image.canvas} differs from the grid's image_size "
                    f"{grid.image_size}"
                )
        self.reader = _PatchReader(images, grid)
        self.device = torch.device(device)
        self.num_workers = num_workers
        self.norm = ChannelNorm(mean, std)

    @property
    def batch_size(self) -> int:
        return len(self.reader.images)

    def gather(self, image_index: Tensor, flat_index: Tensor) -> Tensor:
        start = time.perf_counter()
        patches = self.reader.read_many(image_index.tolist(), flat_index.tolist())
        read_wait.seconds += time.perf_counter() - start
        read_wait.patches += len(patches)
        return self._to_tensor(torch.from_numpy(patches))

    def chunks(self, chunk: int, ids: Tensor | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        wanted = self.batch_size * self.reader.grid.num_patches if ids is None else ids.cpu()
        dataset = _ChunkDataset(self.reader, balanced_chunks(wanted, chunk))
        # Its own generator: drawing worker seeds from the global stream would shift dropout.
        loader = DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers, generator=torch.Generator()
        )
        batches = iter(loader)  # with workers: they start here, and that is waiting too
        while True:
            start = time.perf_counter()
            try:
                ids, patches = next(batches, (None, None))
            except DataError as err:  # a worker's: its message carries the worker's traceback
                reason = str(err).strip().splitlines()[-1].split("DataError: ", 1)[-1]
                raise DataError(reason) from None
            read_wait.seconds += time.perf_counter() - start
            if ids is None:
                return
            read_wait.patches += len(ids)
            yield ids, self._to_tensor(patches)

    def extents(self) -> Tensor | None:
        """``(B, 2)`` rows and cols of each image's own grid; ``None`` when every image fills
        the grid (:func:`image_extents`; the engine reads it through
        :func:`patchgd.patches.extents_of`)."""
        extents = image_extents(self.reader.images, self.reader.grid)
        grid = self.reader.grid
        if bool((extents == torch.tensor(grid.shape)).all()):
            return None
        return extents

    def blank(self, image_index: Tensor) -> Tensor:
        blanks = np.stack([self.reader.blank(b) for b in image_index.tolist()])
        return self._to_tensor(torch.from_numpy(blanks))

    def _to_tensor(self, patches: Tensor) -> Tensor:
        """uint8 ``(n, p, p, C)`` → float ``(n, C, p, p)`` on the device, normalised."""
        x = patches.to(self.device).permute(0, 3, 1, 2).contiguous().float().div_(255)
        return self.norm(x, in_place=True)

    def close(self) -> None:
        """Close the files opened in this process."""
        self.reader.close()
