"""Tissue detection: which grid patches of a slide show tissue, so background can be skipped.

A low-resolution thumbnail of each image is thresholded once (Otsu on the HSV saturation, as in
CLAM and other pathology tools: stained tissue is saturated, glass and white background are not),
and the mask is mapped onto a :class:`~patchgd.grid.PatchGrid` as a ``(rows * cols,)`` bool vector
of *candidate* positions for the sampler. :class:`TissueMasks` caches the thumbnail masks in
memory and, optionally, on disk so they are computed once per image across epochs and processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter

from patchgd._io import atomic_write
from patchgd.data.lazy import LazyImage
from patchgd.data.sources import open_image
from patchgd.errors import ConfigError
from patchgd.grid import PatchGrid

__all__ = ["TissueMasks", "mask_preview", "otsu_threshold", "patch_candidates", "tissue_mask"]

logger = logging.getLogger("patchgd.data")
_CACHE_VERSION = 1  # bump when the mask computation changes, so old cache files are ignored


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of ``values``; the foreground is ``values > threshold``.

    ``values`` is ``uint8`` (threshold in 0..255) or floating point in ``[0, 1]`` (quantised to
    256 levels; the threshold lies half a level above the last background level). When several
    thresholds split the histogram equally well (an empty gap between two modes), the middle of
    the gap is returned. A flat input (a single level, e.g. a blank slide) returns its maximum,
    so nothing is foreground.
    """
    values = np.asarray(values)
    is_float = values.dtype.kind == "f"
    levels = np.rint(np.clip(values, 0, 1) * 255).astype(np.uint8) if is_float else values
    if levels.dtype != np.uint8:
        raise ConfigError(f"otsu_threshold expects uint8 or float values, got {values.dtype}")
    hist = np.bincount(levels.ravel(), minlength=256).astype(np.float64)
    if np.count_nonzero(hist) < 2:
        return float(values.max()) if values.size else 0.0
    p = hist / hist.sum()
    omega, mu = np.cumsum(p), np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1.0 - omega))
    between = np.nan_to_num(between, nan=0.0, posinf=0.0)
    first = int(np.argmax(between))
    last = first  # empty bins after `first` give the same split: take the gap's middle
    while last + 1 < 256 and hist[last + 1] == 0:
        last += 1
    k = (first + last) // 2
    return (k + 0.5) / 255.0 if is_float else float(k)


def tissue_mask(
    thumbnail_rgb: np.ndarray,
    *,
    min_saturation: float = 0.05,
    min_value: float = 0.2,
    blur: int = 5,
) -> np.ndarray:
    """Tissue mask ``(h, w)`` bool of an RGB ``uint8`` thumbnail.

    Tissue is ``saturation > max(otsu(saturation), min_saturation)`` where saturation is HSV's
    ``(max - min) / max`` of the RGB channels, median-filtered over ``blur × blur`` pixels first
    (odd, ``<= 1`` disables) to drop speckle. The ``min_saturation`` floor keeps white or gray
    background from becoming tissue when Otsu has nothing real to separate (a blank slide). Pixels
    whose HSV value ``max / 255`` is below ``min_value`` are never tissue: black pen marks and
    scanner borders, whose saturation is meaningless (0 disables). Coloured pen marks are
    saturated and are *not* excluded. If the thumbnail is all tissue, Otsu splits the tissue.
    """
    rgb = np.asarray(thumbnail_rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ConfigError(f"tissue_mask expects an (h, w, 3) uint8 RGB array, got {rgb.shape}")
    if blur > 1 and blur % 2 == 0:
        raise ConfigError(f"blur must be odd (a median window), got {blur}")
    high, low = rgb.max(axis=2).astype(np.int32), rgb.min(axis=2).astype(np.int32)
    # Saturation on the 0..255 scale (as OpenCV's HSV); 0 for black, where max is 0.
    saturation = ((high - low) * 255 + high // 2) // np.maximum(high, 1)
    saturation = saturation.astype(np.uint8)
    if blur > 1:
        image = Image.fromarray(saturation).filter(ImageFilter.MedianFilter(blur))
        saturation = np.asarray(image)
    threshold = max(otsu_threshold(saturation), min_saturation * 255.0)
    return (saturation > threshold) & (high >= min_value * 255.0)


def _cell_starts(cells: int, pixels: int) -> np.ndarray:
    """First image pixel of each mask cell (and ``pixels`` at the end), ``(cells + 1,)``.

    Image pixel ``y`` takes the mask cell ``floor((y + 0.5) * cells / pixels)`` (nearest by pixel
    centres), so cell ``i`` starts at ``ceil(i * pixels / cells - 0.5)``; integer arithmetic.
    """
    i = np.arange(cells + 1, dtype=np.int64)
    return np.clip(-((cells - 2 * i * pixels) // (2 * cells)), 0, pixels)


def _cumulative_rows(values: np.ndarray, starts: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """``out[k, j]`` = sum of the upsampled ``values`` over image rows ``[0, bounds[k])``.

    ``values`` is ``(cells, n)``, one row per mask cell, and cell ``i`` spans image rows
    ``starts[i]:starts[i + 1]``; every image row of a cell contributes the cell's row.
    """
    lengths = np.diff(starts)[:, None]
    prefix = np.concatenate([np.zeros_like(values[:1]), np.cumsum(values * lengths, axis=0)])
    cell = np.clip(np.searchsorted(starts, bounds, side="right") - 1, 0, len(values) - 1)
    partial = (bounds - starts[cell])[:, None]  # rows of `cell` above the bound
    return prefix[cell] + partial * values[cell]


def patch_candidates(
    mask: np.ndarray,
    image_size: tuple[int, int],
    grid: PatchGrid,
    *,
    min_fraction: float = 0.1,
    fallback_all: bool = True,
) -> np.ndarray:
    """Grid positions ``(rows * cols,)`` bool whose patch is at least ``min_fraction`` tissue.

    ``mask`` is a tissue mask of the whole image, which is ``image_size`` pixels at the working
    level and sits at the top-left of the grid's image (a canvas, possibly padded further by the
    grid). The mask is upsampled to ``image_size`` by nearest neighbour (pixel centres, any
    non-integer scale) and a patch's tissue pixels are counted exactly; the fraction is of the
    full patch area, so canvas and grid padding count as background. A patch needs at least one
    tissue pixel, so ``min_fraction=0`` means "any tissue". Counting uses cumulative sums over
    the mask (O(rows · mask width + rows · cols)), never a loop over patches.

    With ``fallback_all`` (default) an image without any qualifying patch gets every patch that
    overlaps the image instead, so it stays trainable (e.g. a blank or grayscale slide);
    with ``fallback_all=False`` such an image gets all-False and the caller decides.
    """
    mask = np.asarray(mask)
    h, w = (int(v) for v in image_size)
    if mask.ndim != 2 or mask.size == 0:
        raise ConfigError(f"mask must be a non-empty 2-D array, got shape {mask.shape}")
    if not (0 < h <= grid.image_size[0] and 0 < w <= grid.image_size[1]):
        raise ConfigError(f"image_size {image_size} does not fit the grid's {grid.image_size}")
    if not 0.0 <= min_fraction <= 1.0:
        raise ConfigError(f"min_fraction must be in [0, 1], got {min_fraction}")
    p, s = grid.patch_size, grid.stride
    tops, lefts = np.arange(grid.rows) * s, np.arange(grid.cols) * s
    # Distinct patch edges clipped to the image (what lies beyond has no tissue); without
    # overlap a patch's bottom is the next one's top, so about rows + 1 of them.
    ys, y_at = np.unique(np.clip(np.concatenate([tops, tops + p]), 0, h), return_inverse=True)
    xs, x_at = np.unique(np.clip(np.concatenate([lefts, lefts + p]), 0, w), return_inverse=True)
    ystarts, xstarts = _cell_starts(mask.shape[0], h), _cell_starts(mask.shape[1], w)
    # Summed-area table at the edges: table[k, l] = tissue pixels in [0, ys[k]) × [0, xs[l]).
    above = _cumulative_rows(mask.astype(np.int64), ystarts, ys)  # (edges, mask width)
    table = _cumulative_rows(above.T, xstarts, xs).T  # (row edges, column edges)
    r, c = grid.rows, grid.cols
    top, bottom, left, right = y_at[:r], y_at[r:], x_at[:c], x_at[c:]
    tissue = (
        table[np.ix_(bottom, right)]
        - table[np.ix_(bottom, left)]
        - table[np.ix_(top, right)]
        + table[np.ix_(top, left)]
    )
    keep = (tissue >= min_fraction * p * p) & (tissue > 0)
    if fallback_all and not keep.any():
        keep = (tops[:, None] < h) & (lefts[None, :] < w)
    return keep.ravel()


def mask_preview(
    thumbnail: np.ndarray, mask: np.ndarray, tint: Sequence[int] = (0, 0, 255), alpha: float = 0.5
) -> np.ndarray:
    """The thumbnail with non-tissue pixels blended towards ``tint``, for a quick visual check."""
    out = np.asarray(thumbnail, dtype=np.float32).copy()
    background = ~np.asarray(mask, dtype=bool)
    out[background] = (1 - alpha) * out[background] + alpha * np.asarray(tint, np.float32)
    return np.rint(out).astype(np.uint8)


class TissueMasks:
    """Per-image tissue masks computed once, then mapped onto any grid.

    The thumbnail mask of an image (``open_image(path).thumbnail(max_side)`` through
    :func:`tissue_mask`) is kept in memory (packed bits, the ``memory_items`` most recently used)
    and, with ``cache_dir``, in a ``.npz`` per image named by a hash of the absolute path, the
    file's size and mtime, ``max_side`` and the mask parameters, so a changed file or setting is
    recomputed and other processes reuse the result. Files are written to a temporary name and
    renamed, so a reader never sees a partial file; a failed write only warns.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        max_side: int = 1024,
        min_fraction: float = 0.1,
        *,
        min_saturation: float = 0.05,
        min_value: float = 0.2,
        blur: int = 5,
        fallback_all: bool = True,
        memory_items: int = 4096,
    ) -> None:
        self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        if self.cache_dir is not None:
            os.makedirs(self.cache_dir, exist_ok=True)
        self.max_side, self.min_fraction, self.fallback_all = max_side, min_fraction, fallback_all
        self.mask_params = {"min_saturation": min_saturation, "min_value": min_value, "blur": blur}
        self.memory_items = memory_items
        self._no_tissue: set[str] = set()
        self._memory: OrderedDict[str, tuple[tuple[int, int], np.ndarray]] = OrderedDict()

    def _key(self, path: str) -> str:
        stat = os.stat(path)
        ident = [os.path.abspath(path), stat.st_size, stat.st_mtime_ns, self.max_side]
        blob = json.dumps([_CACHE_VERSION, ident, sorted(self.mask_params.items())])
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def mask(self, path: str | os.PathLike[str]) -> np.ndarray:
        """The thumbnail tissue mask of the image at ``path`` (computed at most once)."""
        path = os.fspath(path)
        key = self._key(path)
        if key in self._memory:
            self._memory.move_to_end(key)
            shape, bits = self._memory[key]
            return np.unpackbits(bits, count=shape[0] * shape[1]).reshape(shape).astype(bool)
        mask = self._load(key)
        if mask is None:
            source = open_image(path)
            try:
                mask = tissue_mask(source.thumbnail(self.max_side), **self.mask_params)
            finally:
                source.close()
            self._store(key, mask)
        self._memory[key] = (mask.shape, np.packbits(mask))
        while len(self._memory) > self.memory_items:
            self._memory.popitem(last=False)
        return mask

    def candidates(
        self,
        image: LazyImage | str | os.PathLike[str],
        grid: PatchGrid,
        size: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """Candidate positions ``(rows * cols,)`` bool of one image on ``grid``.

        A :class:`LazyImage` brings its own size at its level; for a path, ``size`` is the
        image's size at the working level, by default the grid's whole image.
        """
        if isinstance(image, LazyImage):
            path, size = image.path, image.size
        else:
            path, size = os.fspath(image), size or grid.image_size
        mask = self.mask(path)
        keep = patch_candidates(
            mask, size, grid, min_fraction=self.min_fraction, fallback_all=False
        )
        if keep.any() or not self.fallback_all:
            return keep
        if path not in self._no_tissue:  # said once per image, not at every visit
            self._no_tissue.add(path)
            logger.warning(
                "no tissue found in %s (thumbnail saturation and brightness): every patch of "
                "the image is a candidate",
                path,
            )
        return patch_candidates(mask, size, grid, min_fraction=self.min_fraction)

    def candidates_batch(self, images: Sequence[LazyImage], grid: PatchGrid) -> torch.Tensor:
        """``(B, rows * cols)`` bool tensor of candidates, the sampler's ``candidates``."""
        rows = [self.candidates(image, grid) for image in images]
        if not rows:
            return torch.zeros(0, grid.num_patches, dtype=torch.bool)
        return torch.from_numpy(np.stack(rows))

    def _file(self, key: str) -> str | None:
        return None if self.cache_dir is None else os.path.join(self.cache_dir, f"{key}.npz")

    def _load(self, key: str) -> np.ndarray | None:
        file = self._file(key)
        if file is None or not os.path.exists(file):
            return None
        try:
            with np.load(file) as data:
                return data["mask"].astype(bool)
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
            return None  # unreadable cache entry: recompute and overwrite it

    def _store(self, key: str, mask: np.ndarray) -> None:
        file = self._file(key)
        if file is None:
            return
        try:
            atomic_write(file, lambda handle: np.savez_compressed(handle, mask=mask))
        except OSError as exc:  # a cache that cannot be written only costs recomputation
            warnings.warn(f"could not write tissue-mask cache {file}: {exc}", stacklevel=3)
