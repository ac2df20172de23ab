"""Patch grid geometry: sizes, padding, coverage and exact pixel reads."""

from __future__ import annotations

import pytest
import torch

from patchgd import ConfigError, PatchGrid
from reference import reference_padded, reference_patch

SHAPES = [  # (H, W, patch, stride)
    (64, 64, 32, 32),  # exact tiling
    (70, 50, 16, 16),  # padding on both sides
    (64, 96, 32, 16),  # 50 % overlap, exact
    (65, 33, 32, 20),  # overlap and padding
    (31, 31, 31, 7),  # one patch, stride irrelevant
    (40, 17, 5, 3),  # many small patches
]


@pytest.mark.parametrize(("h", "w", "p", "s"), SHAPES)
def test_grid_covers_every_pixel_and_no_more_padding_than_needed(h, w, p, s):
    grid = PatchGrid((h, w), p, s)
    covered = torch.zeros(grid.padded_size, dtype=torch.int32)
    for r in range(grid.rows):
        for c in range(grid.cols):
            t, left, b, right = grid.box(r, c)
            covered[t:b, left:right] += 1
    assert (covered > 0).all(), "some pixel of the padded image is in no patch"
    assert grid.padded_size[0] >= h and grid.padded_size[1] >= w
    # One row/column of patches fewer would leave image pixels uncovered.
    assert (grid.rows - 2) * s + p < h and (grid.cols - 2) * s + p < w
    assert grid.padding == (grid.padded_size[0] - h, grid.padded_size[1] - w)
    assert grid.num_patches == grid.rows * grid.cols


@pytest.mark.parametrize(("h", "w", "p", "s"), SHAPES)
@pytest.mark.parametrize("pad_value", [0.0, -1.5, (0.25, 0.5, 1.0)])
def test_extract_reads_exact_pixels_in_image_layout(h, w, p, s, pad_value):
    grid = PatchGrid((h, w), p, s, pad_value=pad_value)
    images = torch.rand(2, 3, h, w, dtype=torch.float64)
    patches = grid.extract(images)
    assert patches.shape == (2, grid.rows, grid.cols, 3, p, p)
    for r in range(grid.rows):
        for c in range(grid.cols):
            assert torch.equal(patches[:, r, c], reference_patch(images, grid, r, c))
    assert torch.equal(grid.pad(images), reference_padded(images, grid))


def test_gather_returns_the_requested_patches_only():
    grid = PatchGrid((50, 70), 16, 12)
    images = torch.rand(3, 2, 50, 70)
    view = grid.patch_view(grid.pad(images))
    image_index = torch.tensor([2, 0, 1, 2])
    flat = torch.tensor([0, grid.num_patches - 1, 7, 7])
    got = grid.gather(view, image_index, flat)
    assert got.shape == (4, 2, 16, 16)
    full = grid.extract(images)
    for i, (b, f) in enumerate(zip(image_index.tolist(), flat.tolist(), strict=True)):
        r, c = grid.position(f)
        assert torch.equal(got[i], full[b, r, c])


def test_position_is_row_major():
    grid = PatchGrid((64, 96), 32)
    assert grid.shape == (2, 3)
    assert [grid.position(i) for i in range(6)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert grid.box(1, 2) == (32, 64, 64, 96)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(image_size=(64, 20), patch_size=32), "patch_size=32 is larger than the image"),
        (dict(image_size=64, patch_size=16, stride=17), "stride must be between 1 and"),
        (dict(image_size=64, patch_size=16, stride=0), "stride must be between 1 and"),
        (dict(image_size=64, patch_size=0), "patch_size must be at least 1"),
        (dict(image_size=(1, 2, 3), patch_size=1), "image_size must be"),
    ],
)
def test_bad_geometry_is_refused_with_the_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PatchGrid(**kwargs)


def test_wrong_image_size_and_pad_channels_are_refused():
    grid = PatchGrid(64, 24, pad_value=(0.0, 1.0))
    with pytest.raises(ConfigError, match="images are 60×64 px but the grid was built for"):
        grid.extract(torch.zeros(1, 2, 60, 64))
    with pytest.raises(ConfigError, match="pad_value has 2 values but the images have 3"):
        grid.extract(torch.zeros(1, 3, 64, 64))
