"""A large image referenced, not loaded: what a dataset hands out when images are read lazily."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import DataError


@dataclass(frozen=True)
class LazyImage:
    """An image on disk placed on a common canvas, read patch by patch when training.

    The image's pixels at pyramid ``level`` sit at the top-left of a ``canvas`` of
    ``(height, width)`` pixels shared by every image of a batch; everything outside the image is
    ``fill``. Region reads past the image's edge return ``fill``, so the canvas costs nothing.

    Attributes:
        path: the file, opened with :func:`patchgd.data.sources.open_image`.
        level: pyramid level to read (0 = full resolution).
        size: ``(height, width)`` of the image at ``level``.
        canvas: ``(height, width)`` of the canvas; at least ``size``.
        fill: padding colour in uint8 units, one value per channel (white for slides).
        keep_gray: read grayscale as one channel instead of RGB.
    """

    path: str
    level: int
    size: tuple[int, int]
    canvas: tuple[int, int]
    fill: tuple[float, ...] = (0.0, 0.0, 0.0)
    keep_gray: bool = False

    def __post_init__(self) -> None:
        if self.size[0] > self.canvas[0] or self.size[1] > self.canvas[1]:
            raise ValueError(
                f"{self.path}: image {self.size} is larger than its canvas {self.canvas}"
            )


def on_canvas(image: LazyImage, canvas: tuple[int, int]) -> LazyImage:
    """``image`` placed on a ``canvas`` of ``(height, width)`` pixels (a model's image size);
    :class:`~patchgd.errors.DataError` naming the file if it does not fit."""
    if image.size[0] > canvas[0] or image.size[1] > canvas[1]:
        raise DataError(
            f"{image.path}: {image.size[0]}×{image.size[1]} px at level {image.level}, larger "
            f"than the model's image_size {canvas[0]}×{canvas[1]}"
        )
    return replace(image, canvas=tuple(canvas))
