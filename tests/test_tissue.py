"""Tissue masks find stained tissue, map exactly onto grids and are computed once per image."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from images import write_pyramid
from patchgd.data import tissue
from patchgd.data.lazy import LazyImage
from patchgd.data.tissue import (
    TissueMasks,
    mask_preview,
    otsu_threshold,
    patch_candidates,
    tissue_mask,
)
from patchgd.errors import ConfigError
from patchgd.grid import PatchGrid
from patchgd.sampler import RandomPatchSampler

# -- synthetic slides ------------------------------------------------------------------------


def blob_mask(height: int, width: int, center=(0.45, 0.4), radii=(0.3, 0.25)) -> np.ndarray:
    """An ellipse, in relative coordinates, evaluated at the pixel centres of a raster."""
    y = (np.arange(height)[:, None] + 0.5) / height
    x = (np.arange(width)[None, :] + 0.5) / width
    return ((y - center[0]) / radii[0]) ** 2 + ((x - center[1]) / radii[1]) ** 2 <= 1


def synthetic_slide(height: int, width: int, seed: int = 0, pen: bool = True, **blob) -> np.ndarray:
    """Off-white noisy glass, an H&E-like pink/purple blob and a black pen stroke."""
    rng = np.random.default_rng(seed)
    slide = rng.normal(238, 3, (height, width, 3)) + rng.normal(0, 2, 3)  # slight gray cast
    inside = blob_mask(height, width, **blob)
    eosin, hematoxylin = np.array([225, 140, 185]), np.array([130, 80, 165])
    mix = rng.random((height, width, 1))
    stain = mix * eosin + (1 - mix) * hematoxylin + rng.normal(0, 8, (height, width, 3))
    slide[inside] = stain[inside]
    if pen:  # black marker: dark, with a bluish tint, so its saturation is high
        rows = slice(int(0.85 * height), int(0.85 * height) + max(2, height // 60))
        ink = np.array([22, 18, 34]) + rng.normal(0, 3, (height, width, 3))
        slide[rows, width // 10 :] = ink[rows, width // 10 :]
    return np.clip(np.rint(slide), 0, 255).astype(np.uint8)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# -- otsu_threshold and tissue_mask -----------------------------------------------------------


def test_otsu_separates_two_modes_in_the_middle_of_the_gap():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.integers(20, 41, 5000), rng.integers(150, 181, 1000)])
    t = otsu_threshold(values.astype(np.uint8))
    assert 40 <= t < 150 and abs(t - 95) <= 1  # middle of the empty gap
    t_float = otsu_threshold(values / 255.0)
    assert 40 / 255 < t_float < 150 / 255
    assert ((values / 255.0 > t_float) == (values > t)).all()


def test_otsu_on_overlapping_modes_lies_between_them():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(60, 15, 4000), rng.normal(170, 20, 4000)])
    t = otsu_threshold(np.clip(values, 0, 255).astype(np.uint8))
    assert 90 < t < 140


@pytest.mark.parametrize("value", [0, 17, 255])
def test_flat_image_has_no_foreground(value):
    flat = np.full((20, 30), value, np.uint8)
    assert not (flat > otsu_threshold(flat)).any()
    assert not (flat / 255.0 > otsu_threshold(flat / 255.0)).any()
    assert not tissue_mask(np.full((20, 30, 3), value, np.uint8)).any()


def test_tissue_mask_finds_the_stained_blob_not_glass_or_pen():
    slide = synthetic_slide(240, 320)
    mask = tissue_mask(slide)
    assert mask.shape == (240, 320) and mask.dtype == bool
    truth = blob_mask(240, 320)
    assert iou(mask, truth) > 0.95
    pen_rows = slice(int(0.85 * 240), int(0.85 * 240) + 4)
    assert not mask[pen_rows].any()
    # The ink is saturated: only the darkness limit keeps it out of the mask.
    assert tissue_mask(slide, min_value=0.0)[pen_rows].mean() > 0.5


def test_blank_noisy_slide_has_no_tissue():
    rng = np.random.default_rng(3)
    glass = np.clip(rng.normal(236, 4, (200, 260, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(glass).any()  # the median filter removes the channel noise
    calm = np.clip(rng.normal(236, 1.5, (200, 260, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(calm, blur=1).any()  # the saturation floor alone suffices here


def test_tissue_mask_rejects_bad_input():
    with pytest.raises(ConfigError):
        tissue_mask(np.zeros((10, 10), np.uint8))
    with pytest.raises(ConfigError):
        tissue_mask(np.zeros((10, 10, 3), np.uint8), blur=4)


def test_mask_preview_tints_background_only():
    slide = synthetic_slide(60, 80, pen=False)
    mask = blob_mask(60, 80)
    preview = mask_preview(slide, mask)
    assert preview.shape == slide.shape and preview.dtype == np.uint8
    np.testing.assert_array_equal(preview[mask], slide[mask])
    assert (preview[~mask] != slide[~mask]).any(axis=1).all()


# -- patch_candidates against a per-patch loop ------------------------------------------------


def slow_candidates(mask, image_size, grid, min_fraction, fallback_all=True):
    """Upsample the mask pixel by pixel, then count each patch's tissue in a Python loop."""
    h, w = image_size
    mh, mw = mask.shape
    ty = ((2 * np.arange(h) + 1) * mh) // (2 * h)  # nearest cell by pixel centre
    tx = ((2 * np.arange(w) + 1) * mw) // (2 * w)
    full = np.zeros(grid.padded_size, bool)
    full[:h, :w] = mask[np.ix_(ty, tx)]
    p = grid.patch_size
    out = np.zeros(grid.num_patches, bool)
    for i in range(grid.num_patches):
        top, left, bottom, right = grid.box(*grid.position(i))
        count = int(full[top:bottom, left:right].sum())
        out[i] = count > 0 and count >= min_fraction * p * p
    if fallback_all and not out.any():
        for i in range(grid.num_patches):
            top, left, _, _ = grid.box(*grid.position(i))
            out[i] = top < h and left < w
    return out


CASES = [
    # (mask shape, image size, grid image size (canvas), patch, stride)
    ((50, 50), (200, 200), (200, 200), 20, 20),  # exact tiling, integer scale
    ((37, 53), (201, 283), (201, 283), 32, 32),  # padding, non-integer scale, non-square
    ((37, 53), (201, 283), (201, 283), 32, 12),  # overlap
    ((61, 45), (301, 220), (400, 350), 40, 25),  # canvas larger than the image
    ((40, 40), (35, 27), (64, 64), 16, 7),  # mask larger than the image (downsampled)
    ((23, 31), (1000, 1337), (1100, 1400), 64, 48),  # big upscale
    ((13, 9), (97, 61), (97, 61), 97 // 2, 5),  # many overlapping patches
]


@pytest.mark.parametrize("shape, size, canvas, patch, stride", CASES)
@pytest.mark.parametrize("min_fraction", [0.0, 0.1, 0.5, 1.0])
def test_patch_candidates_equal_a_per_patch_loop(shape, size, canvas, patch, stride, min_fraction):
    rng = np.random.default_rng(sum(shape) + patch)
    grid = PatchGrid(canvas, patch, stride)
    blobby = blob_mask(*shape) | (rng.random(shape) < 0.15)
    for mask in (blobby, rng.random(shape) < 0.5, np.zeros(shape, bool), np.ones(shape, bool)):
        got = patch_candidates(mask, size, grid, min_fraction=min_fraction)
        assert got.shape == (grid.num_patches,) and got.dtype == bool
        np.testing.assert_array_equal(got, slow_candidates(mask, size, grid, min_fraction))


def test_fallback_is_all_image_patches_or_nothing():
    grid = PatchGrid((100, 100), 20)
    empty = np.zeros((10, 10), bool)
    fallback = patch_candidates(empty, (50, 70), grid).reshape(5, 5)
    assert fallback[:3, :4].all() and fallback.sum() == 12  # only patches over the image
    assert not patch_candidates(empty, (50, 70), grid, fallback_all=False).any()


def test_patch_candidates_follow_the_tissue():
    mask = np.zeros((10, 10), bool)
    mask[:5, 5:] = True  # top-right quarter
    got = patch_candidates(mask, (100, 100), PatchGrid(100, 50), min_fraction=0.5)
    np.testing.assert_array_equal(got, [False, True, False, False])


def test_patch_candidates_reject_bad_arguments():
    grid = PatchGrid((100, 100), 20)
    with pytest.raises(ConfigError):
        patch_candidates(np.ones((5, 5), bool), (120, 100), grid)  # image larger than the grid
    with pytest.raises(ConfigError):
        patch_candidates(np.ones(5, bool), (100, 100), grid)
    with pytest.raises(ConfigError):
        patch_candidates(np.ones((5, 5), bool), (100, 100), grid, min_fraction=1.5)


# -- TissueMasks: computed once, cached on disk, invalidated by changes -----------------------


@pytest.fixture()
def slide_file(tmp_path) -> Path:
    path = tmp_path / "slide.tif"
    write_pyramid(path, synthetic_slide(480, 640), tile=64, photometric="rgb")
    return path


@pytest.fixture()
def opens(monkeypatch) -> list[str]:
    """Records every open_image call the tissue module makes."""
    calls: list[str] = []
    real = tissue.open_image

    def counting(path, *args, **kwargs):
        calls.append(os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(tissue, "open_image", counting)
    return calls


def test_slide_mask_covers_the_blob(slide_file):
    mask = TissueMasks(max_side=256).mask(slide_file)
    assert mask.shape == (120, 160)  # level 2 of 480x640 is exactly 120x160
    assert iou(mask, blob_mask(120, 160)) > 0.9


def test_mask_computed_once_per_image_across_calls_and_grids(slide_file, tmp_path, opens):
    other = tmp_path / "other.tif"
    write_pyramid(
        other,
        synthetic_slide(300, 200, seed=1, center=(0.7, 0.6), radii=(0.2, 0.3)),
        tile=64,
        photometric="rgb",
    )
    masks = TissueMasks(max_side=128)
    for grid in (PatchGrid((480, 640), 64), PatchGrid((500, 700), 48, 32), PatchGrid(640, 100)):
        for _ in range(3):
            a = masks.candidates(LazyImage(str(slide_file), 0, (480, 640), grid.image_size), grid)
            assert a.shape == (grid.num_patches,) and 0 < a.sum() < grid.num_patches
            masks.candidates(other, grid, size=(300, 200))
    assert sorted(opens) == sorted([str(slide_file), str(other)])


def test_disk_cache_is_reused_and_invalidated(slide_file, tmp_path, opens):
    cache = tmp_path / "cache"
    grid = PatchGrid((480, 640), 32)
    first = TissueMasks(cache, max_side=128).candidates(slide_file, grid)
    assert len(opens) == 1
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].endswith(".npz")  # no temporary file left behind

    fresh = TissueMasks(cache, max_side=128)
    np.testing.assert_array_equal(fresh.candidates(slide_file, grid), first)
    assert len(opens) == 1  # read from disk, not recomputed

    TissueMasks(cache, max_side=64).candidates(slide_file, grid)  # other setting: other entry
    assert len(opens) == 2 and len(os.listdir(cache)) == 2

    # Rewrite the file with the tissue elsewhere: new size/mtime, so the cache must not be used.
    write_pyramid(
        slide_file,
        synthetic_slide(480, 640, center=(0.5, 0.8), radii=(0.2, 0.15)),
        tile=64,
        photometric="rgb",
    )
    stat = os.stat(slide_file)
    os.utime(slide_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = TissueMasks(cache, max_side=128).candidates(slide_file, grid)
    assert len(opens) == 3
    assert not np.array_equal(changed, first)
    expected = patch_candidates(blob_mask(120, 160, (0.5, 0.8), (0.2, 0.15)), (480, 640), grid)
    assert (changed != expected).mean() < 0.03
    # The in-memory cache notices the change too.
    os.utime(slide_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2 * 10**9))
    fresh.candidates(slide_file, grid)
    assert len(opens) == 4
    assert not [name for name in os.listdir(cache) if not name.endswith(".npz")]


def test_corrupt_cache_entry_is_recomputed(slide_file, tmp_path, opens):
    cache = tmp_path / "cache"
    grid = PatchGrid((480, 640), 64)
    expected = TissueMasks(cache, max_side=128).candidates(slide_file, grid)
    (entry,) = cache.iterdir()
    for junk in (b"not a zip file", b""):
        entry.write_bytes(junk)
        again = TissueMasks(cache, max_side=128).candidates(slide_file, grid)
        np.testing.assert_array_equal(again, expected)
    assert len(opens) == 3


def test_failed_cache_write_warns_and_leaves_no_temp_file(slide_file, tmp_path, monkeypatch):
    cache = tmp_path / "cache"

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(tissue.os, "replace", broken_replace)
    with pytest.warns(UserWarning, match="could not write"):
        mask = TissueMasks(cache, max_side=128).mask(slide_file)
    assert mask.any() and os.listdir(cache) == []


def test_candidates_batch_feeds_the_sampler(slide_file, tmp_path, caplog):
    blank = tmp_path / "blank.tif"
    write_pyramid(blank, np.full((200, 300, 3), 240, np.uint8), tile=64, photometric="rgb")
    grid = PatchGrid((480, 640), 32)
    images = [
        LazyImage(str(slide_file), 0, (480, 640), (480, 640)),
        LazyImage(str(blank), 0, (200, 300), (480, 640)),
    ]
    masks = TissueMasks(max_side=128, memory_items=1)  # also exercises eviction
    with caplog.at_level(logging.WARNING, logger="patchgd.data"):
        batch = masks.candidates_batch(images, grid)
        masks.candidates_batch(images, grid)
    # The slide without tissue is named once, however often it is visited.
    assert [r.getMessage() for r in caplog.records] == [
        f"no tissue found in {blank} (thumbnail saturation and brightness): every patch of the "
        "image is a candidate"
    ]
    assert batch.dtype == torch.bool and batch.shape == (2, grid.num_patches)
    np.testing.assert_array_equal(batch[0].numpy(), masks.candidates(images[0], grid))
    # The blank slide falls back to every patch over its image area, none in the canvas.
    over_image = np.zeros(grid.shape, bool)
    over_image[: -(-200 // 32), : -(-300 // 32)] = True
    np.testing.assert_array_equal(batch[1].numpy(), over_image.ravel())
    assert masks.candidates_batch([], grid).shape == (0, grid.num_patches)

    plan = RandomPatchSampler(seed=0).plan(2, grid.num_patches, 8, 4, 0.5, candidates=batch)
    for step in plan:
        for b in range(2):
            chosen = step[b][step[b] >= 0]
            assert batch[b, chosen].all()
