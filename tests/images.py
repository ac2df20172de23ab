"""Test images written to disk: tiled pyramidal TIFFs like small slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

BASE_MPP = 0.25  # microns per pixel of level 0, written into the resolution tags


def write_pyramid(
    path: Path, base: np.ndarray, n_levels: int = 3, tile: int = 128, compression="zlib", **kw
) -> Path:
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
    return path


def smooth_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Gradients plus noise: resizing errors show, and zlib stays fast."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256])
    noise = rng.integers(-20, 21, (3, height, width))
    return np.clip(base + noise, 0, 255).astype(np.uint8).transpose(1, 2, 0).copy()


def spy_levels(monkeypatch) -> list[int]:
    """Record the pyramid level of every pixel read a TiffSource makes (for level-choice tests)."""
    from patchgd.data.sources import TiffSource

    levels_read: list[int] = []
    original = TiffSource._read_pixels

    def spy(self, level, *args):
        levels_read.append(level)
        return original(self, level, *args)

    monkeypatch.setattr(TiffSource, "_read_pixels", spy)
    return levels_read


def tiny_ultramnist_args(out, per_class: int = 1) -> list[str]:
    """``patchgd`` arguments for a 64 px UltraMNIST: ``per_class`` training images per class,
    one per class for validation and test."""
    sizes = ["--per-class", str(per_class), "--val-per-class", "1", "--test-per-class", "1"]
    return ["data", "ultramnist", "--out", str(out), "--size", "64", *sizes, "--quiet"]


def damage_first_tile(source: Path, target: Path) -> Path:
    """``target``: a copy of the TIFF ``source`` whose first level-0 tile no longer decodes."""
    damaged = bytearray(source.read_bytes())
    offset = tifffile.TiffFile(source).pages[0].dataoffsets[0]
    damaged[offset + 8 : offset + 200] = b"\xff" * 192
    target.write_bytes(bytes(damaged))
    return target
