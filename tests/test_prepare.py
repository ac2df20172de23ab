"""prepare_images writes exactly the dataset's resize output, atomically and resumably, and finds
undecodable files; channel_stats equals numpy over the real image pixels."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from images import smooth_rgb, write_pyramid
from patchgd.data import dataset as dataset_module
from patchgd.data.dataset import LargeImageDataset
from patchgd.data.prepare import channel_stats, prepare_images
from patchgd.data.table import ImageTable, TableItem, read_table
from patchgd.errors import ConfigError, DataError


@pytest.fixture()
def images(tmp_path) -> ImageTable:
    """A pyramid, a wide PNG in a subfolder, a gray PNG, with splits and folds."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    write_pyramid(root / "slide.tif", smooth_rgb(600, 400, seed=1), tile=64, photometric="rgb")
    Image.fromarray(smooth_rgb(90, 300, seed=2)).save(root / "sub" / "wide.png")
    Image.fromarray(smooth_rgb(120, 100, seed=3)[..., 0]).save(root / "gray.png")
    (root / "labels.csv").write_text(
        "image_id,label,split,fold\nslide,2,train,0\nsub/wide.png,0,val,1\ngray.png,1,train,\n"
    )
    return read_table(root / "labels.csv")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_written_images_equal_the_dataset_output(images, tmp_path):
    out = tmp_path / "out"
    prepared = prepare_images(images, out, target_size=64, progress=False)
    assert files_under(out) == [
        "gray.png",
        "labels.csv",
        "prepare.json",
        "slide.png",
        "sub/wide.png",
    ]  # no temp files left
    dataset = LargeImageDataset(images, target_size=64)
    for index, item in enumerate(prepared):
        written = np.asarray(Image.open(item.path).convert("RGB"))
        np.testing.assert_array_equal(written, dataset.read_resized(index, pad=False))
    assert [Image.open(item.path).size for item in prepared] == [(43, 64), (64, 19), (53, 64)]
    assert read_csv(out / "labels.csv") == [
        {"image_id": "slide.png", "label": "2", "split": "train", "fold": "0"},
        {"image_id": "sub/wide.png", "label": "0", "split": "val", "fold": "1"},
        {"image_id": "gray.png", "label": "1", "split": "train", "fold": ""},
    ]
    assert prepared.num_classes == 3 and prepared.labels == [2, 0, 1]
    assert prepared.items[1].path == str(out / "sub" / "wide.png")
    # training from the prepared folder gives the same tensors as from the originals
    again = LargeImageDataset(read_table(out / "labels.csv"), target_size=64, fill=7)
    original = LargeImageDataset(images, target_size=64, fill=7)
    for index in range(3):
        assert torch.equal(again[index][0], original[index][0])


def test_padded_tiled_tiff_output(images, tmp_path):
    out = tmp_path / "tiff"
    prepared = prepare_images(
        images, out, target_size=300, fill=(255, 0, 0), format="tiff", progress=False
    )
    dataset = LargeImageDataset(images, target_size=300, fill=(255, 0, 0))
    for index, item in enumerate(prepared):
        assert item.image_id.endswith(".tif")
        with tifffile.TiffFile(item.path) as tif:
            page = tif.pages.first
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
            assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
            pixels = page.asarray()
        np.testing.assert_array_equal(pixels, dataset.read_resized(index))
    assert pixels[299, 299].tolist() == [255, 0, 0]  # padding written: the image is 300 x 250


def test_failure_mid_write_leaves_no_partial_file_and_a_rerun_resumes(
    images, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    original_save = Image.Image.save
    calls = []

    def failing_save(self, fp, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second image: half written, then the disk "fails"
            fp.write(b"\x89PNG partial")
            raise OSError("No space left on device")
        return original_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        prepare_images(images, out, target_size=64, progress=False)
    assert files_under(out) == ["prepare.json", "slide.png"]  # no partial, no temp file
    first_mtime = (out / "slide.png").stat().st_mtime_ns

    monkeypatch.setattr(Image.Image, "save", original_save)
    read = []
    original_read = LargeImageDataset.read_resized

    def counting_read(self, index, pad=True):
        read.append(self.items[index].image_id)
        return original_read(self, index, pad)

    monkeypatch.setattr(LargeImageDataset, "read_resized", counting_read)
    prepared = prepare_images(images, out, target_size=64, progress=False)
    assert read == ["sub/wide.png", "gray.png"]  # slide.png was kept, not decoded again
    assert (out / "slide.png").stat().st_mtime_ns == first_mtime
    assert len(prepared) == 3 and len(read_csv(out / "labels.csv")) == 3
    read.clear()
    prepare_images(images, out, target_size=64, progress=False)
    assert read == []
    prepare_images(images, out, target_size=64, overwrite=True, progress=False)
    assert len(read) == 3
    with pytest.raises(ConfigError, match=r"was prepared with .*'target_size': 64.*overwrite=True"):
        prepare_images(images, out, target_size=32, progress=False)


def test_undecodable_images_are_found_reported_and_skipped(images, tmp_path, caplog):
    root = Path(images[0].path).parent
    truncated = root / "truncated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 100, 3), np.uint8)).save(
        truncated
    )
    truncated.write_bytes(truncated.read_bytes()[:2000])
    (root / "text.tif").write_text("not a tiff")
    table = images.with_items(
        [
            *images.items,
            TableItem("truncated.png", str(truncated), 0),
            TableItem("text.tif", str(root / "text.tif"), 1),
        ]
    )
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="patchgd.data"):
        prepared = prepare_images(table, out, target_size=64, progress=False)
    assert [item.image_id for item in prepared] == ["slide.png", "sub/wide.png", "gray.png"]
    reasons = [s.reason for s in prepared.skipped]
    assert len(reasons) == 2 and all("\n" not in r for r in reasons)
    assert f"cannot open TIFF {root / 'text.tif'}" in reasons[0]  # found from the header
    assert f"cannot decode {truncated}" in reasons[1]  # found only by decoding
    assert "truncated.png" in prepared.report() and "text.tif" in prepared.report()
    assert not (out / "truncated.png").exists()
    assert [row["image_id"] for row in read_csv(out / "labels.csv")] == [
        "slide.png",
        "sub/wide.png",
        "gray.png",
    ]


def test_output_names_and_options(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    for name in ("a.png", "a.jpg", "0005f7aa"):
        Image.fromarray(smooth_rgb(20, 20)).save(root / name, format="PNG")
    items = [TableItem(n, str(root / n), 0) for n in ("a.png", "a.jpg", "0005f7aa")]
    items.append(TableItem(str(root / "a.png") + "x", str(root / "a.png"), 0))  # absolute id
    prepared = prepare_images(
        ImageTable(items, 1), tmp_path / "out", target_size=16, progress=False
    )
    assert [i.image_id for i in prepared] == ["a.png", "a-1.png", "0005f7aa.png", "a.pngx.png"]
    table = ImageTable(items[:1], 1)
    with pytest.raises(ConfigError, match="target_size=9000 is above 8192 for format='png'"):
        prepare_images(table, tmp_path / "big", target_size=9000)
    with pytest.raises(ConfigError, match="format='jpeg'"):
        prepare_images(table, tmp_path / "x", target_size=16, format="jpeg")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="would overwrite"):
        prepare_images(table, root, target_size=16, progress=False)


# ----------------------------------------------------------------------------- channel_stats


def stats_reference(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.concatenate([a.reshape(-1, a.shape[-1]) for a in arrays]).astype(np.float64)
    pixels /= 255.0
    return pixels.mean(axis=0), pixels.std(axis=0)


def test_channel_stats_equal_numpy_over_the_image_pixels(images, monkeypatch):
    dataset = LargeImageDataset(images, target_size=64, fill=255)
    mean, std = channel_stats(dataset, progress=False)
    pixels = [dataset.read_resized(i, pad=False) for i in range(len(dataset))]
    ref_mean, ref_std = stats_reference(pixels)
    np.testing.assert_allclose(mean, ref_mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(std, ref_std, rtol=0, atol=1e-12)
    padded_mean, _ = stats_reference([dataset.read_resized(i) for i in range(len(dataset))])
    assert np.all(np.abs(np.asarray(mean) - padded_mean) > 0.05)  # padding really left out
    # the same from the table, and twice: deterministic
    assert channel_stats(images, target_size=64, progress=False) == (mean, std)
    assert channel_stats(dataset, progress=False) == (mean, std)
    # max_images: evenly spaced images, here the first and the third
    some = channel_stats(dataset, max_images=2, progress=False)
    ref_mean, ref_std = stats_reference([pixels[0], pixels[2]])
    np.testing.assert_allclose(some[0], ref_mean, atol=1e-12)
    np.testing.assert_allclose(some[1], ref_std, atol=1e-12)


def test_channel_stats_in_lazy_mode_use_the_working_level(images, monkeypatch):
    monkeypatch.setattr(dataset_module, "BAND_BYTES", 20000)  # many bands
    dataset = LargeImageDataset(images, mode="lazy", level=0, fill=255)
    mean, std = channel_stats(dataset, progress=False)
    root = Path(images[0].path).parent
    levels = [
        tifffile.imread(root / "slide.tif", series=0, level=0),
        np.asarray(Image.open(root / "sub" / "wide.png")),
        np.repeat(np.asarray(Image.open(root / "gray.png"))[..., None], 3, axis=2),
    ]
    ref_mean, ref_std = stats_reference(levels)
    np.testing.assert_allclose(mean, ref_mean, atol=1e-12)
    np.testing.assert_allclose(std, ref_std, atol=1e-12)


def test_channel_stats_options(images, tmp_path):
    with pytest.raises(ConfigError, match="needs a target_size"):
        channel_stats(images)
    dataset = LargeImageDataset(images, target_size=64)
    with pytest.raises(ConfigError, match="target_size=32 differs"):
        channel_stats(dataset, target_size=32)
    with pytest.raises(ConfigError, match="max_images must be at least 1, got 0"):
        channel_stats(dataset, max_images=0)
    Path(images[2].path).write_bytes(Path(images[2].path).read_bytes()[:200])  # truncate gray
    mean, _ = channel_stats(dataset, progress=False)  # skipped with a warning
    assert len(mean) == 3
    strict = LargeImageDataset(images, target_size=64, on_error="raise")
    with pytest.raises(DataError, match="gray.png"):
        channel_stats(strict, progress=False)
