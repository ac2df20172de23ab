"""LargeImageDataset: resize mode equals a slow full-decode reference, reads the right level in
bounded bands; lazy mode decodes nothing; bad inputs are one line each and the rest survive."""

from __future__ import annotations

import logging
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torch.utils.data import DataLoader

from images import smooth_rgb, spy_levels, write_pyramid
from patchgd.data import dataset as dataset_module
from patchgd.data import sources
from patchgd.data.dataset import LargeImageDataset, resized_shape
from patchgd.data.lazy import LazyImage
from patchgd.data.table import ImageTable, SkippedItem, TableItem
from patchgd.errors import ConfigError, DataError

BILINEAR = Image.Resampling.BILINEAR


# ---------------------------------------------------------------------------------- helpers


def table_of(*paths: Path | str, labels: list[int] | None = None) -> ImageTable:
    labels = labels or [i % 2 for i in range(len(paths))]
    items = [TableItem(Path(p).name, str(p), label) for p, label in zip(paths, labels, strict=True)]
    return ImageTable(items, num_classes=max(labels) + 1, source="test.csv")


def reference_resized(level: np.ndarray, target: int, fill, one_call: bool = False):
    """Slow reference: the whole level in PIL, resized, padded at the bottom and right."""
    level = level[..., None] if level.ndim == 2 else level
    h, w = resized_shape(level.shape[:2], target)
    image = Image.fromarray(level[..., 0] if level.shape[2] == 1 else level)
    if one_call:
        small = image.resize((w, h), BILINEAR)
    else:  # the dataset's documented order: horizontal pass, then vertical
        small = image.resize((w, level.shape[0]), BILINEAR).resize((w, h), BILINEAR)
    out = np.empty((target, target, level.shape[2]), np.uint8)
    out[...] = np.asarray(fill, np.uint8)
    out[:h, :w] = np.asarray(small).reshape(h, w, level.shape[2])
    return out


def as_uint8(tensor: torch.Tensor) -> np.ndarray:
    return (tensor * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> Path:
    """1200 x 800 (portrait) RGB, levels 1200x800, 600x400, 300x200."""
    path = tmp_path_factory.mktemp("pyr") / "pyramid.tif"
    return write_pyramid(path, smooth_rgb(1200, 800), tile=64, photometric="rgb")


# ------------------------------------------------------------------------------ resize mode


def test_resize_reads_the_level_closest_above_and_equals_the_reference(pyramid, monkeypatch):
    levels_read = spy_levels(monkeypatch)
    fill = (10, 20, 30)
    ds = LargeImageDataset(table_of(pyramid), target_size=256, fill=fill)
    assert ds.levels == [2] and ds.sizes == [(300, 200)] and ds.canvas == (256, 256)
    tensor, label = ds[0]
    assert set(levels_read) == {2}  # never level 0 or 1
    assert tensor.shape == (3, 256, 256) and tensor.dtype == torch.float32 and label == 0
    level2 = tifffile.imread(pyramid, series=0, level=2)
    got = as_uint8(tensor)
    np.testing.assert_array_equal(got, ds.read_resized(0))
    expected = reference_resized(level2, 256, fill)
    assert np.abs(got.astype(int) - expected).max() <= 1
    assert (got != expected).mean() < 1e-3
    one_call = reference_resized(level2, 256, fill, one_call=True)
    assert np.abs(got.astype(int) - one_call).max() <= 1
    # aspect ratio: 300 x 200 -> 256 x 171; everything right of column 171 is the fill, exactly
    assert ds.out_size(0) == (256, 171)
    fill_tensor = torch.tensor(fill, dtype=torch.float32).reshape(3, 1, 1).expand(3, 256, 85)
    assert torch.equal(tensor[:, :, 171:] * 255, fill_tensor)
    assert not np.all(got[:, 170] == fill)


def test_bands_give_the_same_image_as_one_band(pyramid, monkeypatch):
    ds = LargeImageDataset(table_of(pyramid), target_size=100)  # level 2, factor 3
    whole = ds.read_resized(0)
    monkeypatch.setattr(dataset_module, "BAND_BYTES", 1)  # one output row per band
    assert np.abs(ds.read_resized(0).astype(int) - whole).max() <= 1
    monkeypatch.setattr(dataset_module, "BAND_BYTES", 7000)
    assert np.abs(ds.read_resized(0).astype(int) - whole).max() <= 1


def test_whole_slide_formats_go_through_tiffslide(pyramid, tmp_path):
    slide = tmp_path / "slide.svs"
    slide.write_bytes(pyramid.read_bytes())
    ds = LargeImageDataset(table_of(pyramid, slide), target_size=256)
    assert ds.levels == [2, 2]
    with ds.open(1) as source:
        assert isinstance(source, sources.SlideSource)
    np.testing.assert_array_equal(ds.read_resized(1), ds.read_resized(0))


def test_landscape_upscaled_and_normalised(tmp_path):
    image = smooth_rgb(60, 90, seed=2)
    path = tmp_path / "small.png"
    Image.fromarray(image).save(path)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    plain = LargeImageDataset(table_of(path), target_size=128)
    normed = LargeImageDataset(table_of(path), target_size=128, mean=mean, std=std)
    x, _ = plain[0]
    y, _ = normed[0]
    expected = (x - torch.tensor(mean).reshape(3, 1, 1)) / torch.tensor(std).reshape(3, 1, 1)
    torch.testing.assert_close(y, expected)
    assert plain.out_size(0) == (85, 128)  # 60 x 90 scaled up: longest side 128
    np.testing.assert_array_equal(as_uint8(x)[85:], 0)  # default fill black, at the bottom
    assert np.abs(as_uint8(x).astype(int) - reference_resized(image, 128, 0)).max() <= 1


def test_pixel_modes_follow_the_source_rules(tmp_path):
    rng = np.random.default_rng(5)
    gray = rng.integers(0, 256, (70, 50), dtype=np.uint8)
    rgba = rng.integers(0, 256, (50, 70, 4), dtype=np.uint8)
    deep = rng.integers(0, 65536, (64, 64, 3), dtype=np.uint16)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    tifffile.imwrite(tmp_path / "deep.tif", deep, photometric="rgb")
    table = table_of(tmp_path / "gray.png", tmp_path / "rgba.png", tmp_path / "deep.tif")
    ds = LargeImageDataset(table, target_size=32, fill=255)
    alpha = rgba[..., 3:].astype(float) / 255
    on_white = np.floor(rgba[..., :3] * alpha + 255 * (1 - alpha) + 0.5).astype(np.uint8)
    references = [np.repeat(gray[..., None], 3, axis=2), on_white, (deep >> 8).astype(np.uint8)]
    for index, level in enumerate(references):
        tensor, _ = ds[index]
        assert tensor.shape == (3, 32, 32)
        expected = reference_resized(level, 32, 255)
        assert np.abs(as_uint8(tensor).astype(int) - expected).max() <= 1, index
    got = as_uint8(ds[0][0])
    assert np.array_equal(got[..., 0], got[..., 1]) and np.array_equal(got[..., 1], got[..., 2])
    kept = LargeImageDataset(table_of(tmp_path / "gray.png"), target_size=32, keep_gray=True)
    assert kept[0][0].shape == (1, 32, 32) and kept.channels == 1 and kept.fill == (0.0,)


def test_band_reading_keeps_memory_far_below_the_level(tmp_path):
    """6000 x 6000 RGB (108 MB decoded) resized to 512 never holds a quarter of it."""
    path = tmp_path / "big.tif"
    tiles = (
        np.full((256, 256, 3), (5 * i + 3 * j) % 256, np.uint8)
        for i in range(24)
        for j in range(24)
    )
    options = {"tile": (256, 256), "compression": "zlib", "photometric": "rgb"}
    tifffile.imwrite(path, tiles, shape=(6000, 6000, 3), dtype=np.uint8, **options)
    ds = LargeImageDataset(table_of(path), target_size=512)
    tracemalloc.start()
    try:
        tensor, _ = ds[0]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    level_bytes = 6000 * 6000 * 3
    assert peak < level_bytes / 4, f"peak {peak / 2**20:.1f} MiB"  # about 19 MiB of 103
    assert tensor.shape == (3, 512, 512)
    # tile (0, 0) is the constant 0, tile (1, 1) the constant 8
    assert as_uint8(tensor)[5, 5, 0] == 0 and as_uint8(tensor)[30, 30, 0] == 8


# -------------------------------------------------------------------------------- lazy mode


def test_lazy_mode_decodes_nothing_and_shares_a_canvas(pyramid, tmp_path, monkeypatch):
    png = tmp_path / "wide.png"
    Image.fromarray(smooth_rgb(90, 450)).save(png)
    table = table_of(pyramid, png, labels=[1, 0])
    ds = LargeImageDataset(table, mode="lazy", level=0, fill=255, canvas_multiple=64)
    assert ds.sizes == [(1200, 800), (90, 450)] and ds.levels == [0, 0]
    assert ds.canvas == (1216, 832)  # max (1200, 800) rounded up to 64
    assert ds.labels == [1, 0]

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded pixels in __getitem__")

    monkeypatch.setattr(sources._Source, "_read", no_decoding)
    monkeypatch.setattr(dataset_module, "open_image", no_decoding)
    lazy, label = ds[0]
    assert label == 1
    assert lazy == LazyImage(str(pyramid), 0, (1200, 800), (1216, 832), (255.0,) * 3, False)
    assert ds[1][0] == LazyImage(str(png), 0, (90, 450), (1216, 832), (255.0,) * 3, False)
    assert pickle.loads(pickle.dumps(ds))[1][0] == ds[1][0]


def test_lazy_levels_by_target_size_and_a_given_canvas(pyramid, tmp_path, caplog):
    png = tmp_path / "wide.png"
    Image.fromarray(smooth_rgb(90, 450)).save(png)
    by_target = LargeImageDataset(table_of(pyramid, png), mode="lazy", target_size=300)
    assert by_target.levels == [2, 0] and by_target.sizes == [(300, 200), (90, 450)]
    assert by_target.canvas == (300, 450)
    slide = tmp_path / "with_mpp.tif"
    write_pyramid(slide, smooth_rgb(400, 256), tile=64, photometric="rgb")  # BASE_MPP = 0.25
    by_mpp = LargeImageDataset(table_of(slide, png), mode="lazy", mpp=0.5)
    assert by_mpp.levels == [1] and by_mpp.sizes == [(200, 128)]  # 0.25 um at level 0
    assert f"{png} has no pixel-size metadata" in by_mpp.skipped[0].reason
    too_deep = LargeImageDataset(table_of(slide, png), mode="lazy", level=2)
    assert [i.path for i in too_deep.items] == [str(slide)]
    assert f"level=2 is out of range: {png} has 1 level(s)" in too_deep.skipped[0].reason
    with pytest.raises(ConfigError, match="mpp=-1"):
        LargeImageDataset(table_of(slide), mode="lazy", mpp=-1)
    by_level = LargeImageDataset(table_of(pyramid), mode="lazy", level=1, canvas=(600, 600))
    assert by_level[0][0].canvas == (600, 600) and by_level[0][0].size == (600, 400)
    with pytest.raises(DataError, match=rf"^{pyramid} is 1200x800 px at level 0, larger than "):
        LargeImageDataset(
            table_of(pyramid, png), mode="lazy", canvas=(1000, 1000), on_error="raise"
        )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="patchgd.data"):
        ds = LargeImageDataset(table_of(pyramid, png), mode="lazy", canvas=(1000, 1000))
    assert [item.path for item in ds.items] == [str(png)]
    assert "larger than canvas=(1000, 1000)" in ds.skipped[0].reason
    assert str(pyramid) in caplog.text
    assert [r.name for r in caplog.records if r.message.startswith("skipped")] == ["patchgd.data"]


# -------------------------------------------------------------------------------- bad input


def test_bad_inputs_are_one_line_each_and_the_rest_survive(pyramid, tmp_path, caplog):
    good = tmp_path / "good.png"
    Image.fromarray(smooth_rgb(200, 300)).save(good)
    truncated_png = tmp_path / "truncated.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 200, 3), np.uint8)).save(
        truncated_png
    )
    truncated_png.write_bytes(truncated_png.read_bytes()[:3000])
    truncated_tif = tmp_path / "truncated.tif"
    truncated_tif.write_bytes(pyramid.read_bytes()[: pyramid.stat().st_size // 2])
    text = tmp_path / "text.tif"
    text.write_text("not an image\n")
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((40, 300, 3), np.uint8)).save(tiny)
    missing = tmp_path / "missing.png"
    table = table_of(good, truncated_png, truncated_tif, text, tiny, missing, pyramid)
    table.skipped.append(SkippedItem("x", "test.csv, line 9: label 'x' is not an integer"))

    with caplog.at_level(logging.WARNING, logger="patchgd.data"):
        ds = LargeImageDataset(table, mode="lazy", level=0, min_size=64)
    names = [Path(item.path).name for item in ds.items]
    assert names == ["good.png", "truncated.png", "pyramid.tif"]
    reasons = [s.reason for s in ds.skipped]
    assert reasons[0] == "test.csv, line 9: label 'x' is not an integer"  # the table's first
    expected = {
        truncated_tif: "is truncated",
        text: "cannot open TIFF",
        tiny: "is 40x300 px (level 0), smaller than min_size=64",
        missing: "image file not found",
    }
    assert len(reasons) == 1 + len(expected)
    for reason, (path, words) in zip(reasons[1:], expected.items(), strict=True):
        assert str(path) in reason and words in reason and "\n" not in reason, reason
    ours = [r for r in caplog.records if r.name == "patchgd.data"]
    assert len(ours) == len(expected)  # one warning per dropped image
    report = ds.report()
    assert all(r in report for r in reasons) and "3 images" in report
    assert len(table.skipped) == 1  # the input table is left alone

    # a truncated PNG has an intact header: decoding is where it fails, naming the file
    resized = LargeImageDataset(table, target_size=128, min_size=64)
    assert len(resized) == 3
    with pytest.raises(DataError, match=rf"cannot decode {truncated_png}") as info:
        resized[1]
    assert "\n" not in str(info.value)
    assert resized[0][0].shape == (3, 128, 128)
    # in resize mode min_size applies to the resized image: 40 x 300 -> 17 x 128
    assert any("tiny.png is 17x128 px (resized), smaller" in s.reason for s in resized.skipped)

    with pytest.raises(DataError, match=rf"^{truncated_tif} is truncated"):
        LargeImageDataset(table, target_size=128, on_error="raise")


def test_nothing_usable_and_bad_options(pyramid, tmp_path):
    with pytest.raises(DataError, match=r"no usable images in test.csv: image file not found"):
        LargeImageDataset(table_of(tmp_path / "none.png"), target_size=64)
    table = table_of(pyramid)
    with pytest.raises(ConfigError, match="target_size=None: mode='resize' needs"):
        LargeImageDataset(table)
    with pytest.raises(ConfigError, match="level=1 is for mode='lazy'"):
        LargeImageDataset(table, target_size=64, level=1)
    with pytest.raises(ConfigError, match=r"give at most one of level, mpp and target_size"):
        LargeImageDataset(table, mode="lazy", level=1, target_size=64)
    with pytest.raises(ConfigError, match="mode='crop'"):
        LargeImageDataset(table, mode="crop", target_size=64)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"fill=\(1, 2\)"):
        LargeImageDataset(table, target_size=64, fill=(1, 2))
    with pytest.raises(ConfigError, match="fill=300"):
        LargeImageDataset(table, target_size=64, fill=300)
    with pytest.raises(ConfigError, match="std=0"):
        LargeImageDataset(table, target_size=64, std=0)
    with pytest.raises(ConfigError, match=r"canvas=\(100, 100\) is not a multiple"):
        LargeImageDataset(table, mode="lazy", canvas=(100, 100), canvas_multiple=64)


def test_keep_gray_with_mixed_channels_skips_the_odd_image(tmp_path):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "c.png")
    ds = LargeImageDataset(
        table_of(tmp_path / "g.png", tmp_path / "c.png"), target_size=32, keep_gray=True
    )
    assert len(ds) == 1 and "has 3 channel(s); the other images have 1" in ds.skipped[0].reason


# ------------------------------------------------------------------------- DataLoader workers


def test_works_in_dataloader_workers(pyramid, tmp_path):
    png = tmp_path / "a.png"
    Image.fromarray(smooth_rgb(50, 80)).save(png)
    ds = LargeImageDataset(table_of(pyramid, png), target_size=64, mean=0.5, std=0.25)
    expected = torch.stack([ds[0][0], ds[1][0]])
    loader = DataLoader(ds, batch_size=2, num_workers=2)
    [(images, labels)] = list(loader)
    torch.testing.assert_close(images, expected, rtol=0, atol=0)
    assert labels.tolist() == [0, 1]
