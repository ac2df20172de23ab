"""Test images written to disk: tiled pyramidal TIFFs like small slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

BASE_MPP = 0.25  # microns per pixel of level 0, written into the resolution tags


def write_pyramid(
    path: Path, base: np.ndarray, n_levels: int = 3, tile: int = 128, compression="zlib", **kw
) -> None:
    """Pyramidal tiled TIFF: level 0 plus SubIFDs of 2x-subsampled levels."""
    levels = [base]
    for _ in range(n_levels - 1):
        previous = levels[-1]
        levels.append(previous[: previous.shape[0] // 2 * 2 : 2, : previous.shape[1] // 2 * 2 : 2])
    resolution = (1e4 / BASE_MPP, 1e4 / BASE_MPP)
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            levels[0],
            tile=(tile, tile),
            subifds=n_levels - 1,
            compression=compression,
            resolution=resolution,
            resolutionunit="CENTIMETER",
            **kw,
        )
        for level in levels[1:]:
            tif.write(level, tile=(tile, tile), subfiletype=1, compression=compression, **kw)
