"""Image sources read any region exactly as a full decode would, and only the tiles they need."""

from __future__ import annotations

import json
import multiprocessing
import pickle
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from tifffile.zarr import ZarrTiffStore

from images import BASE_MPP, spy_levels, write_pyramid
from patchgd.data import sources
from patchgd.data.sources import (
    ArraySource,
    ImageSource,
    PillowSource,
    SlideSource,
    TiffSource,
    choose_level,
    open_image,
)
from patchgd.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


def reference(full: np.ndarray, top: int, left: int, height: int, width: int, fill=0):
    """Region of ``full`` by explicit index arithmetic; outside pixels are ``fill``."""
    full = full[..., None] if full.ndim == 2 else full
    out = np.empty((height, width, full.shape[2]), np.uint8)
    out[...] = np.asarray(fill, np.uint8)
    rows, cols = np.arange(top, top + height), np.arange(left, left + width)
    rin = (rows >= 0) & (rows < full.shape[0])
    cin = (cols >= 0) & (cols < full.shape[1])
    out[np.ix_(rin, cin)] = full[np.ix_(rows[rin], cols[cin])]
    return out


def regions(height: int, width: int, seed: int = 0):
    """Aligned, unaligned, border-crossing, covering, outside and empty regions."""
    fixed = [
        (0, 0, 128, 128),
        (37, 91, 200, 150),
        (height - 50, width - 70, 128, 128),  # crosses bottom and right
        (-20, -30, 100, 90),  # crosses top and left
        (-5, -5, height + 10, width + 10),  # the whole image plus a border
        (height + 10, 0, 32, 32),  # fully outside
        (-100, -100, 50, 50),
        (10, 10, 0, 5),  # empty
        (height - 1, width - 1, 1, 1),
    ]
    rng = np.random.default_rng(seed)
    for _ in range(12):
        h, w = (int(v) for v in rng.integers(1, 300, 2))
        top, left = int(rng.integers(-h, height)), int(rng.integers(-w, width))
        fixed.append((top, left, h, w))
    return fixed


def assert_regions_match(source: ImageSource, full: np.ndarray, fills=(0, (10, 20, 30))) -> None:
    height, width = full.shape[:2]
    assert source.size == (height, width)
    for i, (top, left, h, w) in enumerate(regions(height, width)):
        fill = fills[i % len(fills)]
        got = source.read_region(top, left, h, w, fill=fill)
        assert got.dtype == np.uint8 and got.shape == (h, w, source.channels)
        np.testing.assert_array_equal(got, reference(full, top, left, h, w, fill))


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    color, alpha = rgba[..., :-1].astype(float), rgba[..., -1:].astype(float)
    return np.floor(color * alpha / 255 + 255 * (1 - alpha / 255) + 0.5).astype(np.uint8)


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None] if gray.ndim == 2 else gray, 3, axis=2)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pyramid") / "pyramid.tif"
    rng = np.random.default_rng(1)
    write_pyramid(path, rng.integers(0, 256, (1001, 1303, 3), dtype=np.uint8), photometric="rgb")
    return path


def full_level(path: Path, level: int) -> np.ndarray:
    return tifffile.imread(path, series=0, level=level)


@pytest.mark.parametrize("level", [0, 1, 2])
def test_tiled_pyramid_regions_equal_full_decode(pyramid, level):
    with TiffSource(pyramid, level=level) as source:
        assert source.level_sizes == [(1001, 1303), (500, 651), (250, 325)]
        assert source.channels == 3
        assert_regions_match(source, full_level(pyramid, level))


def test_jpeg_tiled_pyramid_like_a_slide(tmp_path):
    """JPEG tiles (YCbCr in the file, as in most slides) decode as tifffile decodes them."""
    path = tmp_path / "jpeg.tif"
    rng = np.random.default_rng(13)
    write_pyramid(path, rng.integers(0, 256, (300, 410, 3), dtype=np.uint8), 2, 64, "jpeg")
    assert tifffile.TiffFile(path).pages.first.photometric == tifffile.PHOTOMETRIC.YCBCR
    for level in (0, 1):
        for cls in (TiffSource, SlideSource):
            with cls(path, level=level) as source:
                assert_regions_match(source, full_level(path, level))


@pytest.mark.parametrize("level", [0, 1, 2])
def test_slide_source_reads_generic_pyramid_exactly(pyramid, level):
    with SlideSource(pyramid, level=level) as source:
        assert source.level_sizes == [(1001, 1303), (500, 651), (250, 325)]
        assert source.mpp == pytest.approx(BASE_MPP * 1303 / source.size[1])
        assert_regions_match(source, full_level(pyramid, level))


def test_open_image_dispatches_on_suffix_and_content(pyramid, tmp_path):
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    shutil.copy(pyramid, tmp_path / "slide.svs")
    shutil.copy(pyramid, tmp_path / "no_suffix")
    assert isinstance(open_image(pyramid), TiffSource)
    assert isinstance(open_image(tmp_path / "slide.svs"), SlideSource)
    assert isinstance(open_image(tmp_path / "no_suffix"), TiffSource)  # TIFF magic bytes
    assert isinstance(open_image(tmp_path / "a.png"), PillowSource)
    for source in (open_image(pyramid), ArraySource(np.zeros((4, 4), np.uint8))):
        assert isinstance(source, ImageSource)


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_plain_striped_tiff(tmp_path, compression):
    data = np.random.default_rng(3).integers(0, 256, (300, 500, 3), dtype=np.uint8)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, data, photometric="rgb", compression=compression, rowsperstrip=16)
    with TiffSource(path) as source:
        assert_regions_match(source, data)
        # uncompressed contiguous data is memory-mapped, compressed strips go through zarr
        assert isinstance(source._array(0), np.memmap) == (compression is None)


def _tiff_cases():
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (150, 170, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (150, 170), dtype=np.uint8)
    rgb16 = rng.integers(0, 65536, (150, 170, 3), dtype=np.uint16)
    gray16 = rng.integers(0, 65536, (150, 170), dtype=np.uint16)
    rgba = rng.integers(0, 256, (150, 170, 4), dtype=np.uint8)
    colormap = rng.integers(0, 65536, (3, 256), dtype=np.uint16)
    tile = {"tile": (64, 64)}
    return {  # name: (data, write options, expected RGB)
        "gray": (gray, tile, gray_to_rgb(gray)),
        "gray16": (gray16, {}, gray_to_rgb((gray16 >> 8).astype(np.uint8))),
        "rgb16": (rgb16, {"photometric": "rgb", **tile}, (rgb16 >> 8).astype(np.uint8)),
        "planar": (
            rgb.transpose(2, 0, 1).copy(),
            {"photometric": "rgb", "planarconfig": "separate", **tile},
            rgb,
        ),
        "rgba": (
            rgba,
            {"photometric": "rgb", "extrasamples": ["unassalpha"], **tile},
            composite_on_white(rgba),
        ),
        "palette": (
            gray,
            {"photometric": "palette", "colormap": colormap},
            (colormap >> 8).astype(np.uint8).T[gray],
        ),
        "miniswhite": (gray, {"photometric": "miniswhite"}, gray_to_rgb(255 - gray)),
    }


@pytest.mark.parametrize("case", list(_tiff_cases()))
def test_tiff_variants_follow_the_conversion_rules(tmp_path, case):
    data, options, expected = _tiff_cases()[case]
    path = tmp_path / f"{case}.tif"
    tifffile.imwrite(path, data, **options)
    with TiffSource(path) as source:
        assert source.channels == 3
        assert_regions_match(source, expected)


def test_ome_tiff_with_channel_axis(tmp_path):
    rgb = np.random.default_rng(5).integers(0, 256, (120, 90, 3), dtype=np.uint8)
    path = tmp_path / "image.ome.tif"
    metadata = {"axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}
    tifffile.imwrite(path, rgb.transpose(2, 0, 1).copy(), metadata=metadata, tile=(32, 32))
    with open_image(path) as source:
        assert source.mpp == 0.5
        assert_regions_match(source, rgb)


def test_keep_gray_gives_one_channel(tmp_path):
    gray = np.random.default_rng(6).integers(0, 256, (64, 80), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "g.tif", gray, tile=(32, 32))
    Image.fromarray(gray).save(tmp_path / "g.png")
    for source in (
        TiffSource(tmp_path / "g.tif", keep_gray=True),
        PillowSource(tmp_path / "g.png", keep_gray=True),
        ArraySource(gray, keep_gray=True),
    ):
        assert source.channels == 1
        assert_regions_match(source, gray, fills=(0, 7, (9,)))
        assert source.thumbnail(16).shape == (13, 16, 1)


def _png_cases():
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (90, 110, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (90, 110, 4), dtype=np.uint8)
    gray = rng.integers(0, 256, (90, 110), dtype=np.uint8)
    gray16 = rng.integers(0, 65536, (90, 110), dtype=np.uint16)
    palette = Image.fromarray(rgb).quantize(16)
    palette_t = palette.copy()
    palette_t.info["transparency"] = 3
    return {  # name: (PIL image, expected RGB)
        "RGB": (Image.fromarray(rgb), rgb),
        "RGBA": (Image.fromarray(rgba), composite_on_white(rgba)),
        "L": (Image.fromarray(gray), gray_to_rgb(gray)),
        "LA": (Image.fromarray(rgba[..., 2:]), gray_to_rgb(composite_on_white(rgba[..., 2:]))),
        "I;16": (Image.fromarray(gray16), gray_to_rgb((gray16 >> 8).astype(np.uint8))),
        "1": (Image.fromarray(gray > 127), gray_to_rgb(np.where(gray > 127, 255, 0))),
        "P": (palette, np.asarray(palette.convert("RGB"))),
        "P+transparency": (palette_t, composite_on_white(np.asarray(palette_t.convert("RGBA")))),
    }


@pytest.mark.parametrize("case", list(_png_cases()))
def test_png_modes(tmp_path, case):
    image, expected = _png_cases()[case]
    path = tmp_path / "image.png"
    image.save(path)
    with open_image(path) as source:
        assert isinstance(source, PillowSource)
        saved = Image.open(path)  # the mode under test survived the round trip
        assert saved.mode == image.mode and saved.info.keys() >= image.info.keys()
        assert_regions_match(source, expected.astype(np.uint8))


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_jpeg_matches_pil_decode(tmp_path, mode):
    rng = np.random.default_rng(8)
    path = tmp_path / "image.jpg"
    Image.fromarray(rng.integers(0, 256, (130, 170, 3), dtype=np.uint8)).convert(mode).save(path)
    expected = np.asarray(Image.open(path).convert("RGB"))
    with open_image(path) as source:
        assert_regions_match(source, expected)


def test_array_source_regions_and_depth():
    data = np.random.default_rng(9).integers(0, 65536, (70, 90, 3), dtype=np.uint16)
    assert_regions_match(ArraySource(data, "noise"), (data >> 8).astype(np.uint8))
    with pytest.raises(DataError, match="noise: unsupported sample type float32"):
        ArraySource(data.astype(np.float32), "noise")
    with pytest.raises(DataError, match=r"expected an \(H, W\)"):
        ArraySource(np.zeros((4, 4, 5), np.uint8))


def test_choose_level_examples():
    sizes = [(1000, 1300), (500, 650), (250, 325)]
    expected = {1: 2, 325: 2, 326: 1, 650: 1, 651: 0, 1300: 0, 5000: 0}
    assert {target: choose_level(sizes, target) for target in expected} == expected
    with pytest.raises(ConfigError, match="target_longest_side must be at least 1"):
        choose_level(sizes, 0)
    with pytest.raises(ConfigError, match="at least one level"):
        choose_level([], 10)


def test_choose_level_never_scales_up_and_picks_the_smallest_sufficient_level():
    rng = np.random.default_rng(10)
    for _ in range(500):
        sizes = [tuple(int(v) for v in rng.integers(1, 5000, 2)) for _ in range(rng.integers(1, 6))]
        target = int(rng.integers(1, 6000))
        longest = [max(s) for s in sizes]
        chosen = choose_level(sizes, target)
        sufficient = [side for side in longest if side >= target]
        if sufficient:
            assert longest[chosen] >= target  # never a level that must be scaled up
            assert longest[chosen] == min(sufficient)  # and the smallest such
        else:
            assert longest[chosen] == max(longest)  # nothing suffices: the largest level


def test_open_image_picks_levels_by_target_size_and_mpp(pyramid):
    assert open_image(pyramid, target_size=300).level == 2
    assert open_image(pyramid, target_size=326).level == 1
    assert open_image(pyramid, target_size=2000).size == (1001, 1303)
    # level 2 is 1.0023 µm/px: within a pixel of rounding of 1.0, so it counts as fine enough
    assert [open_image(pyramid, mpp=m).level for m in (0.1, 0.25, 0.5, 0.6, 1.0, 4)] == [
        0,
        0,
        1,
        1,
        2,
        2,
    ]
    assert open_image(pyramid, level=1).mpp == pytest.approx(BASE_MPP * 1303 / 651)
    with pytest.raises(ConfigError, match="give at most one of level, target_size and mpp"):
        open_image(pyramid, level=1, target_size=100)
    with pytest.raises(ConfigError, match=r"level=3 is out of range: .*pyramid.tif has 3 level"):
        open_image(pyramid, level=3)
    with pytest.raises(ConfigError, match="mpp must be a positive number"):
        open_image(pyramid, mpp=-1.0)


def test_mpp_without_metadata_is_a_data_error(tmp_path):
    path = tmp_path / "plain.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
    with pytest.raises(DataError, match="plain.png has no pixel-size metadata"):
        open_image(path, mpp=0.5)


@pytest.fixture(scope="module")
def big_tiff(tmp_path_factory) -> Path:
    """8192 x 8192 RGB, 256-px zlib tiles; tile (i, j) is the constant (7 i + j) % 256."""
    path = tmp_path_factory.mktemp("big") / "big.tif"
    tiles = (
        np.full((256, 256, 3), (7 * i + j) % 256, np.uint8) for i in range(32) for j in range(32)
    )
    tifffile.imwrite(
        path,
        tiles,
        shape=(8192, 8192, 3),
        dtype=np.uint8,
        tile=(256, 256),
        compression="zlib",
        photometric="rgb",
    )
    return path


def test_region_read_decodes_only_the_overlapping_tiles(big_tiff, monkeypatch):
    fetched: list[str] = []
    original_get = ZarrTiffStore.get

    async def counting_get(self, key, prototype, byte_range=None):
        if not key.rsplit("/", 1)[-1].startswith((".z", "zarr.json")):
            fetched.append(key)
        return await original_get(self, key, prototype, byte_range)

    monkeypatch.setattr(ZarrTiffStore, "get", counting_get)
    with TiffSource(big_tiff) as source:
        tracemalloc.start()
        region = source.read_region(1000, 1000, 256, 256)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    # rows and columns 1000..1255 overlap tiles 3 and 4: four tiles of 192 KiB, not 192 MiB
    assert sorted(fetched) == ["3.3.0", "3.4.0", "4.3.0", "4.4.0"]
    assert peak < 4 * 2**20, f"peak traced allocation {peak / 2**20:.1f} MiB"
    rows, cols = np.arange(1000, 1256) // 256, np.arange(1000, 1256) // 256
    np.testing.assert_array_equal(region[..., 0], (7 * rows[:, None] + cols[None, :]) % 256)


def test_thumbnail_reads_the_smallest_sufficient_level(pyramid, monkeypatch):
    source = TiffSource(pyramid)
    levels_read = spy_levels(monkeypatch)
    thumb = source.thumbnail(300)  # level 2 (250 x 325) is the smallest >= 300, halved
    assert thumb.shape == (125, 163, 3) and max(thumb.shape[:2]) <= 300
    assert set(levels_read) == {2}
    expected = np.asarray(
        Image.fromarray(full_level(pyramid, 2)).resize((163, 125), Image.Resampling.BOX)
    )
    assert np.abs(thumb.astype(int) - expected).mean() < 1.0
    # bounded bands give (almost) the same picture
    monkeypatch.setattr(sources, "_THUMBNAIL_BAND_BYTES", 1)
    assert np.abs(source.thumbnail(300).astype(int) - thumb).mean() < 2.0
    levels_read.clear()
    np.testing.assert_array_equal(source.thumbnail(5000), full_level(pyramid, 0))  # no upscaling
    assert set(levels_read) == {0}
    for side in (1, 7, 64, 651):
        assert max(source.thumbnail(side).shape[:2]) <= side


def test_thumbnail_of_single_level_sources():
    data = np.random.default_rng(11).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    thumb = ArraySource(data).thumbnail(64)
    assert thumb.shape == (60, 40, 3)  # factor 5


def _read_into(source, queue) -> None:
    queue.put(source.read_region(100, 200, 64, 64))


def test_sources_survive_pickle_and_fork(pyramid):
    source = TiffSource(pyramid, level=1)
    expected = source.read_region(100, 200, 64, 64)
    clone = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(clone.read_region(100, 200, 64, 64), expected)
    # a forked child (DataLoader worker) inherits the open file: it must reopen its own
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_into, args=(source, queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(source.read_region(100, 200, 64, 64), expected)


def _assert_one_line_data_error(call, path) -> DataError:
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    return info.value


def test_bad_inputs_raise_one_line_data_errors(pyramid, tmp_path):
    missing = tmp_path / "missing.tif"
    for opener in (open_image, TiffSource, SlideSource, PillowSource):
        error = _assert_one_line_data_error(lambda opener=opener: opener(missing), missing)
        assert "image file not found" in str(error)

    png = tmp_path / "truncated.png"
    rgb = np.random.default_rng(12).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(png)
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    source = open_image(png)  # the header is intact: the decode fails on the first read
    _assert_one_line_data_error(lambda: source.read_region(0, 0, 8, 8), png)

    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(pyramid.read_bytes()[: pyramid.stat().st_size * 2 // 3])
    _assert_one_line_data_error(lambda: open_image(truncated), truncated)

    for name in ("text.tif", "text.png", "text.svs", "text.bin"):
        text = tmp_path / name
        text.write_text("not an image\nat all\n")
        _assert_one_line_data_error(lambda text=text: open_image(text), text)

    corrupt = tmp_path / "corrupt.tif"
    data = bytearray(pyramid.read_bytes())
    offset = TiffSource(pyramid)._tiff.series[0].levels[0].keyframe.dataoffsets[0]
    data[offset + 8 : offset + 200] = b"\xff" * 192
    corrupt.write_bytes(bytes(data))
    source = open_image(corrupt)
    _assert_one_line_data_error(lambda: source.read_region(0, 0, 16, 16), corrupt)

    floats = tmp_path / "float.tif"
    tifffile.imwrite(floats, np.zeros((8, 8), np.float32))
    error = _assert_one_line_data_error(lambda: open_image(floats), floats)
    assert "unsupported sample type float32" in str(error)


def test_bad_read_arguments_are_config_errors(pyramid):
    source = open_image(pyramid)
    with pytest.raises(ConfigError, match=r"fill=\(1, 2\) must be one value or 3 values"):
        source.read_region(0, 0, 4, 4, fill=(1, 2))
    with pytest.raises(ConfigError, match="fill=300"):
        source.read_region(0, 0, 4, 4, fill=300)
    with pytest.raises(ConfigError, match="height must be >= 0, got -1"):
        source.read_region(0, 0, -1, 4)
    with pytest.raises(ConfigError, match="max_side must be at least 1, got 0"):
        source.thumbnail(0)
    source.close()
    with pytest.raises(DataError, match="closed"):
        source.read_region(0, 0, 4, 4)


def _run_benchmark(*args: str) -> dict:
    command = [sys.executable, str(ROOT / "benchmarks" / "read_memory.py"), "--json", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_memory_benchmark_quick():
    result = _run_benchmark("--quick")
    assert result["patches"] == 16 * 16 and result["peak_rss_mb"] < 500


@pytest.mark.slow
def test_reading_every_patch_of_a_20000px_tiff_stays_under_500_mb():
    result = _run_benchmark()
    assert result["patches"] == 79 * 79
    assert result["peak_rss_mb"] < 500, result
