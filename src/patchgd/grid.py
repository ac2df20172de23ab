"""Patch grid geometry: how an image becomes a grid of patches, in one place.

An image of ``H × W`` pixels is cut into patches of ``patch_size × patch_size`` pixels whose
top-left corners are ``stride`` pixels apart (``stride < patch_size`` gives overlap). When the
patches do not tile the image exactly, the image is padded at the bottom and on the right with
``pad_value`` so that no pixel is ever dropped. Patch ``(r, c)`` covers rows
``r*stride : r*stride + patch_size`` and columns ``c*stride : c*stride + patch_size`` of the
padded image, and its embedding lives at ``Z[b, :, r, c]`` (image layout: row = y, column = x).

Positions are also addressed by a flat index ``i = r * cols + c`` (row-major), which is what the
samplers hand out.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import ConfigError

PadValue = float | Sequence[float]


def as_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``(v, v)`` for an int, else the two values of a pair; ``name`` is used in the error."""
    if isinstance(value, int):
        return value, value
    pair = tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ConfigError(f"{name} must be an int or a (height, width) pair, got {value!r}")
    return pair[0], pair[1]


@dataclass(frozen=True)
class PatchGrid:
    """The grid of patches of an ``image_size`` image.

    Args:
        image_size: ``(height, width)`` of the input image in pixels, or one int for a square.
        patch_size: side of a square patch in pixels.
        stride: distance between neighbouring patches; defaults to ``patch_size`` (no overlap).
        pad_value: fill for the padding at the bottom and right, one value or one per channel,
            in the units of the tensor handed to :meth:`extract` (after any normalisation).
    """

    image_size: tuple[int, int]
    patch_size: int
    stride: int | None = None
    pad_value: PadValue = 0.0

    def __post_init__(self) -> None:
        h, w = as_pair(self.image_size, "image_size")
        object.__setattr__(self, "image_size", (h, w))
        if self.stride is None:
            object.__setattr__(self, "stride", self.patch_size)
        p, s = self.patch_size, self.stride
        if h < 1 or w < 1:
            raise ConfigError(f"image_size must be at least 1 px a side, got {h}×{w}")
        if p < 1:
            raise ConfigError(f"patch_size must be at least 1, got {p}")
        if s is None or not 1 <= s <= p:
            raise ConfigError(f"stride must be between 1 and patch_size={p}, got {s}")
        if h < p or w < p:
            raise ConfigError(
                f"patch_size={p} is larger than the image ({h}×{w} px); "
                "use a smaller patch_size or a larger image_size"
            )
        if not isinstance(self.pad_value, int | float):
            object.__setattr__(self, "pad_value", tuple(float(v) for v in self.pad_value))

    # -- geometry -------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        """Number of patch rows, m."""
        return _count(self.image_size[0], self.patch_size, self.stride)

    @property
    def cols(self) -> int:
        """Number of patch columns, n."""
        return _count(self.image_size[1], self.patch_size, self.stride)

    @property
    def step(self) -> int:
        """Deprecated name of ``stride`` (one word per concept: "step" is an outer step)."""
        warnings.warn("PatchGrid.step is deprecated; use stride", FutureWarning, stacklevel=2)
        assert self.stride is not None
        return self.stride

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the latent grid Z."""
        return self.rows, self.cols

    @property
    def num_patches(self) -> int:
        return self.rows * self.cols

    @property
    def padded_size(self) -> tuple[int, int]:
        """``(height, width)`` after padding: the smallest size the grid covers exactly."""
        p, s = self.patch_size, self.stride
        return p + s * (self.rows - 1), p + s * (self.cols - 1)

    @property
    def padding(self) -> tuple[int, int]:
        """Pixels added at the bottom and on the right."""
        (h, w), (ph, pw) = self.image_size, self.padded_size
        return ph - h, pw - w

    def extent(self, size: Sequence[int]) -> tuple[int, int]:
        """``(rows, cols)`` of the grid of an image of ``size`` ``(height, width)`` at the
        top-left of this grid's image: the grid the image would have alone (at least 1 × 1)."""
        p, s = self.patch_size, self.stride
        assert s is not None
        rows = _count(max(int(size[0]), p), p, s)
        cols = _count(max(int(size[1]), p), p, s)
        return min(rows, self.rows), min(cols, self.cols)

    def position(self, index: int) -> tuple[int, int]:
        """``(row, col)`` of flat index ``index``."""
        return divmod(index, self.cols)

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """``(top, left, bottom, right)`` pixel box of patch ``(row, col)`` in the padded image."""
        top, left = row * self.stride, col * self.stride
        return top, left, top + self.patch_size, left + self.patch_size

    # -- tensors --------------------------------------------------------------------------
    def pad(self, images: Tensor) -> Tensor:
        """Pad a ``(B, C, H, W)`` batch at the bottom and right to :attr:`padded_size`."""
        self._check_images(images)
        dh, dw = self.padding
        if dh == 0 and dw == 0:
            return images
        b, c, h, w = images.shape
        fill = self.pad_colour(c, images.dtype, images.device)
        out = fill.expand(b, c, h + dh, w + dw).clone()
        out[:, :, :h, :w] = images
        return out

    def pad_colour(self, channels: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``pad_value`` as a ``(1, C or 1, 1, 1)`` tensor, checked against ``channels``."""
        fill = torch.as_tensor(self.pad_value, dtype=dtype, device=device)
        if fill.numel() not in (1, channels):
            raise ConfigError(
                f"pad_value has {fill.numel()} values but the images have {channels} channels"
            )
        return fill.reshape(1, -1, 1, 1)

    def patch_view(self, padded: Tensor) -> Tensor:
        """A strided ``(B, C, rows, cols, p, p)`` view of a padded batch: no copy is made."""
        p, s = self.patch_size, self.stride
        return padded.unfold(2, p, s).unfold(3, p, s)

    def gather(self, view: Tensor, image_index: Tensor, flat_index: Tensor) -> Tensor:
        """Patches ``(image_index[i], flat_index[i])`` of a :meth:`patch_view`, ``(n, C, p, p)``.

        Only the requested patches are copied, so memory is bounded by the number asked for.
        """
        rows, cols = flat_index // self.cols, flat_index % self.cols
        # Advanced indices on dims 0, 2, 3 around a slice put the index dim first: (n, C, p, p).
        return view[image_index, :, rows, cols]

    def extract(self, images: Tensor) -> Tensor:
        """Every patch of a ``(B, C, H, W)`` batch as ``(B, rows, cols, C, p, p)`` (a copy)."""
        return self.patch_view(self.pad(images)).permute(0, 2, 3, 1, 4, 5).contiguous()

    def _check_images(self, images: Tensor) -> None:
        if images.dim() != 4:
            raise ConfigError(f"expected a (B, C, H, W) batch, got shape {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != self.image_size:
            raise ConfigError(
                f"images are {images.shape[-2]}×{images.shape[-1]} px but the grid was built for "
                f"image_size={self.image_size[0]}×{self.image_size[1]}"
            )


def extent_mask(extents: Tensor, shape: Sequence[int]) -> Tensor:
    """``(B, rows, cols)`` bool: the top-left ``extents[b]`` rows × cols (a ``(B, 2)`` tensor,
    e.g. :meth:`PatchGrid.extent` per image) of a grid of ``shape``."""
    rows = torch.arange(shape[0], device=extents.device)[None, :, None] < extents[:, 0, None, None]
    cols = torch.arange(shape[1], device=extents.device)[None, None, :] < extents[:, 1, None, None]
    return rows & cols


def _count(length: int, patch: int, stride: int) -> int:
    """Patches along one side so that the last one reaches (or passes) the image edge."""
    return math.ceil((length - patch) / stride) + 1
