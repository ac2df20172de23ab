"""A dataset of large images listed in a labels table (see :mod:`patchgd.data.table`).

Two modes:

* ``mode="resize"`` (the paper's preparation): each image is resized so that its *longest*
  side is ``target_size`` (aspect ratio kept), then padded to a ``target_size`` square with
  ``fill`` at the bottom and on the right: the image sits at the top-left, the same convention
  as :class:`patchgd.PatchGrid`'s padding. The file is opened with
  ``open_image(path, target_size=T)``, so the smallest pyramid level whose longest side is at
  least ``T`` is read (a smaller level is never scaled up while a larger one exists). That
  level is read in horizontal bands of about :data:`BAND_BYTES` bytes, each band resized on
  its own, so a 20 000-px level is never in memory whole. The filter is PIL's ``BILINEAR``
  without ``reducing_gap``: an antialiased triangle filter whose support grows with the
  reduction factor. It runs as two passes, horizontal then vertical, and each band is read
  with enough margin rows that the result equals resizing the whole level at once with
  ``img.resize((w, H), BILINEAR).resize((w, h), BILINEAR)``, up to one uint8 step where
  Pillow's single-precision ``box`` rounds a sample position (a one-call
  ``img.resize((w, h), BILINEAR)`` may run the passes in the other order: also at most one
  step apart, as the filter's weights are non-negative). ``__getitem__`` returns
  ``(tensor, label)`` with a float32 ``(C, T, T)`` tensor in [0, 1] (padding included),
  normalised by ``mean``/``std`` if given.
* ``mode="lazy"``: nothing is decoded; ``__getitem__`` returns ``(LazyImage, label)``
  describing the file, its level, its size there and the dataset's common canvas.

Pixel conversion (16-bit, alpha, grayscale, palette) follows the rules in
:mod:`patchgd.data.sources`: every image becomes 3-channel RGB uint8, or 1 channel for a
grayscale image with ``keep_gray=True``.

Bad input is found at construction by opening every file's header once: a missing,
unreadable or truncated-TIFF file, an unsupported pixel format, a level out of range, an image
smaller than ``min_size`` or larger than a given ``canvas``. With ``on_error="skip"`` (default)
these are dropped, logged as one line each to the ``patchgd.data`` logger (``logging``, level
WARNING) and listed in :attr:`LargeImageDataset.skipped` after the table's own skipped rows;
``on_error="raise"`` raises :class:`DataError` at the first. Damage that only decoding reveals
(a truncated PNG or JPEG, corrupt tile data) raises :class:`DataError` naming the file in
``__getitem__``; run :func:`patchgd.data.prepare.prepare_images` once to find such files up front.

The dataset holds no open files: each item opens its file and closes it again, so it can be
pickled to DataLoader workers.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from patchgd.data.lazy import LazyImage
from patchgd.data.normalisation import ChannelNorm
from patchgd.data.sources import ImageSource, open_image
from patchgd.data.table import ImageTable, SkippedItem, TableItem, _check_on_error
from patchgd.errors import ConfigError, DataError, PatchGDError, require_count

__all__ = ["BAND_BYTES", "LargeImageDataset", "level_bands", "resized_bands", "resized_shape"]

logger = logging.getLogger("patchgd.data")

Mode = Literal["resize", "lazy"]
BAND_BYTES = 8 * 2**20
"""Bytes of source pixels read per band when resizing or scanning a level."""
_RESAMPLE = Image.Resampling.BILINEAR
_SUPPORT = 1.0  # PIL's support of the bilinear (triangle) filter, in output pixels


def resized_shape(size: tuple[int, int], target_size: int) -> tuple[int, int]:
    """``(height, width)`` with the longest side ``target_size`` and the aspect ratio kept
    (the other side rounded half up, at least 1)."""
    height, width = size
    if height >= width:
        return target_size, max(1, (2 * width * target_size + height) // (2 * height))
    return max(1, (2 * height * target_size + width) // (2 * width)), target_size


def _rows_per_band(width: int, channels: int, band_bytes: int) -> int:
    return max(1, band_bytes // max(1, width * channels))


def level_bands(
    source: ImageSource, band_bytes: int | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, pixels)`` bands covering the source's working level, top to bottom."""
    height, width = source.size
    rows = _rows_per_band(width, source.channels, band_bytes or BAND_BYTES)
    for top in range(0, height, rows):
        yield top, source.read_region(top, 0, min(rows, height - top), width)


def resized_bands(
    source: ImageSource, out_size: tuple[int, int], band_bytes: int | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """``(first output row, pixels)`` bands of the working level resized to ``out_size``.

    The resize is two separable PIL ``BILINEAR`` passes, horizontal then vertical, so the
    result equals ``img.resize((w, H)).resize((w, h))`` on the whole level. Output rows
    ``r0:r1`` sample source rows around ``r0 * H/h .. r1 * H/h``: the band read reaches the
    filter's support beyond them, and the vertical pass's ``box`` puts the sample centres where
    the whole-level resize puts them.
    """
    height, width = source.size
    out_h, out_w = out_size
    if (out_h, out_w) == (height, width):
        yield from level_bands(source, band_bytes)
        return
    channels = source.channels
    scale = height / out_h  # source rows per output row
    support = _SUPPORT * max(scale, 1.0)
    margin = math.ceil(support) + 2
    budget = _rows_per_band(width, channels, band_bytes or BAND_BYTES)
    out_rows = max(1, int((budget - 2 * margin) / scale))
    for r0 in range(0, out_h, out_rows):
        r1 = min(out_h, r0 + out_rows)
        y0, y1 = r0 * scale, r1 * scale
        if out_h == height:
            top, bottom = r0, r1
        else:
            top = max(0, math.floor(y0 - support) - 1)
            bottom = min(height, math.ceil(y1 + support) + 1)
        band = source.read_region(top, 0, bottom - top, width)
        image = Image.fromarray(band[..., 0] if channels == 1 else band)
        # One call per axis: Pillow's one-call resize picks the pass order itself, by cost,
        # and a band would not always get the order the whole level gets.
        if out_w != width:
            image = image.resize((out_w, bottom - top), _RESAMPLE)
        if out_h != height:
            box = (0, y0 - top, out_w, y1 - top)
            image = image.resize((out_w, r1 - r0), _RESAMPLE, box=box)
        del band  # before the next band is read: one band in memory at a time
        yield r0, np.asarray(image).reshape(r1 - r0, out_w, channels)


def _per_channel(option: str, value: object, low: float, high: float) -> tuple[float, ...]:
    """One value or a sequence of values in [low, high], as floats."""
    values = (value,) if isinstance(value, (int, float)) else value
    try:
        floats = tuple(float(v) for v in values)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        floats = ()
    if not floats or not all(low <= v <= high for v in floats) or len(floats) not in (1, 3):
        bounds = f" in [{low:g}, {high:g}]" if math.isfinite(low) or math.isfinite(high) else ""
        raise ConfigError(f"{option}={value!r}: need one value or 3 values{bounds}")
    return floats


class LargeImageDataset(Dataset):
    """Images of an :class:`ImageTable`, resized to a square or handed out lazily.

    Args:
        table: the images and labels (see :func:`patchgd.data.table.read_table`).
        mode: ``"resize"`` (tensors) or ``"lazy"`` (:class:`LazyImage`); see the module doc.
        target_size: resize mode: output side ``T`` (required). Lazy mode: choose each image's
            level as the smallest one whose longest side is at least ``target_size``; the image
            is not resized.
        level, mpp: lazy mode only, instead of ``target_size``: a fixed pyramid level, or the
            coarsest level at least as fine as ``mpp`` microns per pixel. Default level 0.
        fill: padding colour in uint8 units, one value or one per channel.
        keep_gray: grayscale images stay 1-channel (all images must then be grayscale; an
            image with another channel count than the first is a bad item).
        mean, std: per-channel normalisation in [0, 1] units (resize mode), e.g. from
            :func:`patchgd.data.prepare.channel_stats`; one value or one per channel.
        min_size: images whose shorter side is below this (at the working resolution: the
            resized size in resize mode, the level size in lazy mode) are bad items; pass the
            patch size.
        canvas: lazy mode: the common canvas ``(height, width)``; an image larger than it is a
            bad item. Default: the largest height and width, rounded up to ``canvas_multiple``.
        canvas_multiple: lazy mode: the computed canvas is a multiple of this (e.g. the patch
            size or stride).
        on_error: ``"skip"`` or ``"raise"`` for bad items found at construction.
    """

    def __init__(
        self,
        table: ImageTable,
        *,
        mode: Mode = "resize",
        target_size: int | None = None,
        level: int | None = None,
        mpp: float | None = None,
        fill: float | Sequence[float] = (0, 0, 0),
        keep_gray: bool = False,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        min_size: int | None = None,
        canvas: tuple[int, int] | None = None,
        canvas_multiple: int = 1,
        on_error: Literal["skip", "raise"] = "skip",
    ) -> None:
        if not isinstance(table, ImageTable):
            raise ConfigError(f"table={type(table).__name__}: expected an ImageTable")
        if mode not in ("resize", "lazy"):
            raise ConfigError(f"mode={mode!r}: expected 'resize' or 'lazy'")
        _check_on_error(on_error)
        if target_size is not None:
            target_size = require_count("target_size", target_size)
        if mode == "resize":
            if target_size is None:
                raise ConfigError("target_size=None: mode='resize' needs a target_size")
            for option, value in (("level", level), ("mpp", mpp), ("canvas", canvas)):
                if value is not None:
                    raise ConfigError(
                        f"{option}={value!r} is for mode='lazy'; mode='resize' reads the level "
                        "closest above target_size and pads to a target_size square"
                    )
        else:
            options = {"level": level, "mpp": mpp, "target_size": target_size}
            given = [name for name, value in options.items() if value is not None]
            if len(given) > 1:
                raise ConfigError(f"give at most one of level, mpp and target_size, got {given}")
            # checked here: open_image's ConfigError for them would be taken as a bad file
            if level is not None and (not isinstance(level, int) or level < 0):
                raise ConfigError(f"level={level!r}: must be a non-negative integer")
            if mpp is not None and not (isinstance(mpp, (int, float)) and 0 < mpp < math.inf):
                raise ConfigError(f"mpp={mpp!r}: must be a positive number of microns per pixel")
        fills = _per_channel("fill", fill, 0, 255)
        if keep_gray not in (True, False):
            raise ConfigError(f"keep_gray={keep_gray!r}: must be True or False")
        self._mean = None if mean is None else _per_channel("mean", mean, -math.inf, math.inf)
        # std's lower bound 0 is checked as "positive" below, with its own message
        self._std = None if std is None else _per_channel("std", std, 0, math.inf)
        if self._std is not None and min(self._std) <= 0:
            raise ConfigError(f"std={std!r}: must be positive")
        self._norm = ChannelNorm(self._mean, self._std)
        self.min_size = None if min_size is None else require_count("min_size", min_size)
        if mode == "resize" and self.min_size is not None and self.min_size > target_size:
            raise ConfigError(f"min_size={min_size} is larger than target_size={target_size}")
        canvas_multiple = require_count("canvas_multiple", canvas_multiple)
        if canvas is not None:
            canvas = (require_count("canvas", canvas[0]), require_count("canvas", canvas[1]))
            if canvas[0] % canvas_multiple or canvas[1] % canvas_multiple:
                raise ConfigError(
                    f"canvas={canvas} is not a multiple of canvas_multiple={canvas_multiple}"
                )

        self.mode: Mode = mode
        self.target_size = target_size
        self.keep_gray = keep_gray
        self.on_error = on_error
        self._open_args = {"level": level, "mpp": mpp, "target_size": target_size}

        self.items: list[TableItem] = []
        self.levels: list[int] = []  # working level of each item
        self.sizes: list[tuple[int, int]] = []  # (height, width) at that level
        own_skipped: list[SkippedItem] = []
        channels: int | None = None
        for item in table.items:
            problem, found = self._probe(item, canvas)
            if problem is None and channels is not None and found[2] != channels:
                problem = f"{item.path} has {found[2]} channel(s); the other images have {channels}"
            if problem is not None:
                if on_error == "raise":
                    raise DataError(problem)
                logger.warning("skipped: %s", problem)
                own_skipped.append(SkippedItem(item.image_id, problem))
                continue
            channels = found[2]
            self.items.append(item)
            self.levels.append(found[0])
            self.sizes.append(found[1])
        if not self.items:
            first = own_skipped[0].reason if own_skipped else "the table is empty"
            raise DataError(f"no usable images in {table.source or 'the table'}: {first}")
        self.channels: int = channels or 3
        if self.channels == 1 and len(set(fills)) == 1:
            fills = fills[:1]  # the default (0, 0, 0) is black for gray images too
        if len(fills) != 1 and len(fills) != self.channels:
            raise ConfigError(f"fill={fill!r}: need 1 or {self.channels} values")
        self.fill: tuple[float, ...] = fills * self.channels if len(fills) == 1 else fills
        for option, values in (("mean", self._mean), ("std", self._std)):
            if values is not None and len(values) not in (1, self.channels):
                raise ConfigError(f"{option}: need 1 or {self.channels} values, got {values}")
        self.table = table.with_items(self.items)
        self.table.skipped = [*table.skipped, *own_skipped]

        if mode == "resize":
            self.canvas: tuple[int, int] = (target_size, target_size)  # type: ignore[assignment]
        elif canvas is not None:
            self.canvas = canvas
        else:

            def up(n: int) -> int:
                return -(-n // canvas_multiple) * canvas_multiple

            self.canvas = (up(max(h for h, _ in self.sizes)), up(max(w for _, w in self.sizes)))

    def _probe(
        self, item: TableItem, canvas: tuple[int, int] | None
    ) -> tuple[str | None, tuple[int, tuple[int, int], int]]:
        """Open the header: (problem or None, (level, size at level, channels))."""
        try:
            with open_image(item.path, keep_gray=self.keep_gray, **self._open_args) as source:
                found = (getattr(source, "level", 0), source.size, source.channels)
        except (PatchGDError, OSError) as exc:
            message = " ".join(str(exc).split())
            if item.path not in message:
                message = f"{item.path}: {message}"
            return message, (0, (0, 0), 0)
        level, size, _ = found
        work = resized_shape(size, self.target_size) if self.mode == "resize" else size
        if self.min_size is not None and min(work) < self.min_size:
            where = "resized" if self.mode == "resize" else f"level {level}"
            return (
                f"{item.path} is {work[0]}x{work[1]} px ({where}), smaller than "
                f"min_size={self.min_size}",
                found,
            )
        if canvas is not None and (size[0] > canvas[0] or size[1] > canvas[1]):
            return (
                f"{item.path} is {size[0]}x{size[1]} px at level {level}, larger than "
                f"canvas={canvas}",
                found,
            )
        return None, found

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> list[int]:
        """Every item's label, in order, without reading any image (for samplers)."""
        return [item.label for item in self.items]

    @property
    def num_classes(self) -> int:
        return self.table.num_classes

    @property
    def skipped(self) -> list[SkippedItem]:
        """The table's skipped rows, then the images dropped at construction."""
        return self.table.skipped

    def report(self) -> str:
        """Summary of the usable images and one line per skipped item."""
        return self.table.report()

    def out_size(self, index: int) -> tuple[int, int]:
        """Resize mode: ``(height, width)`` of the resized image before padding."""
        return resized_shape(self.sizes[index], self.target_size or max(self.sizes[index]))

    def open(self, index: int) -> ImageSource:
        """The item's source at its working level (the caller closes it)."""
        item = self.items[index]
        source = open_image(item.path, level=self.levels[index], keep_gray=self.keep_gray)
        if source.size != self.sizes[index]:
            source.close()
            raise DataError(
                f"{item.path} changed on disk: {source.size} px at level "
                f"{self.levels[index]}, {self.sizes[index]} when the dataset was built"
            )
        return source

    def read_resized(self, index: int, pad: bool = True) -> np.ndarray:
        """Resize mode's pixels as uint8 ``(T, T, C)`` (``pad=False``: ``(h, w, C)``), before
        normalisation."""
        if self.mode != "resize":
            raise ConfigError("read_resized is for mode='resize'; this dataset is mode='lazy'")
        out_h, out_w = self.out_size(index)
        shape = (self.target_size, self.target_size) if pad else (out_h, out_w)
        out = np.empty((*shape, self.channels), np.uint8)
        out[...] = np.rint(self.fill).astype(np.uint8)
        with self.open(index) as source:
            for r0, band in resized_bands(source, (out_h, out_w)):
                out[r0 : r0 + len(band), :out_w] = band
        return out

    def thumbnail(self, index: int, max_side: int = 1024) -> np.ndarray:
        """The item's whole image as uint8 ``(h, w, C)``, longest side at most ``max_side``
        (:meth:`~patchgd.data.sources.ImageSource.thumbnail`: bounded memory at any size)."""
        with self.open(index) as source:
            return source.thumbnail(max_side)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | LazyImage, int]:
        index = operator.index(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        item = self.items[index]
        if self.mode == "lazy":
            size, level = self.sizes[index], self.levels[index]
            lazy = LazyImage(item.path, level, size, self.canvas, self.fill, self.keep_gray)
            return lazy, item.label
        pixels = self.read_resized(index)
        tensor = torch.from_numpy(pixels).permute(2, 0, 1).to(torch.float32).div_(255.0)
        return self._norm(tensor, in_place=True), item.label

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)} images, mode={self.mode!r}, "
            f"canvas={self.canvas}, skipped={len(self.skipped)})"
        )
