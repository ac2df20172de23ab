"""One-off preparation of a dataset: cache resized images, compute normalisation statistics.

:func:`prepare_images` decodes every image once, exactly as :class:`LargeImageDataset`'s
``mode="resize"`` would, and writes the result, so training reads small files instead of
slides, and so every file that cannot be decoded (a truncated PNG, corrupt tile data) is found
up front. :func:`channel_stats` gives the per-channel mean and std of the training inputs.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
import tifffile
from PIL import Image
from tqdm.auto import tqdm

from patchgd._io import atomic_write
from patchgd.data.dataset import LargeImageDataset, level_bands, resized_bands
from patchgd.data.sources import SLIDE_SUFFIXES
from patchgd.data.table import DEFAULT_EXTENSIONS, ImageTable, SkippedItem, TableItem
from patchgd.errors import ConfigError, DataError, require_count

__all__ = ["MAX_PNG_SIZE", "channel_stats", "prepare_images"]

logger = logging.getLogger("patchgd.data")

MAX_PNG_SIZE = 8192
"""Largest ``target_size`` written as PNG: a PNG is decoded whole on every read."""
_SETTINGS = "prepare.json"
_IMAGE_SUFFIXES = sorted(
    {*DEFAULT_EXTENSIONS, *SLIDE_SUFFIXES, ".ome.tiff", ".bmp", ".webp"}, key=len, reverse=True
)


def _output_name(image_id: str, path: str, suffix: str) -> PurePosixPath:
    """``image_id`` as a relative path inside the output folder, with the new suffix.

    Relative ids keep their folders (``train/a.svs`` -> ``train/a.png``); absolute ids and ids
    that climb out of the root (``..``) keep only their last part. A known image suffix is
    replaced; anything else in the name is kept (``a.v2`` -> ``a.v2.png``).
    """
    rel = PurePosixPath(image_id.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        last = rel.name if rel.name not in ("", ".", "..") else Path(path).name
        rel = PurePosixPath(last)
    name = rel.name
    for known in _IMAGE_SUFFIXES:
        if name.lower().endswith(known) and len(name) > len(known):
            name = name[: -len(known)]
            break
    return rel.with_name(name + suffix)


def _write_image(path: Path, pixels: np.ndarray, fmt: str) -> None:
    """Atomic write (temp file + rename): a failure leaves no partial file."""
    gray = pixels.shape[2] == 1
    if fmt == "png":
        image = Image.fromarray(pixels[..., 0] if gray else pixels)
        atomic_write(path, lambda fh: image.save(fh, "PNG"))
    else:
        # tifffile wants a named file; the encoded TIFF is no larger than the pixels.
        buffer = io.BytesIO()
        tifffile.imwrite(
            buffer,
            pixels[..., 0] if gray else pixels,
            tile=(256, 256),
            compression="zlib",
            photometric="minisblack" if gray else "rgb",
        )
        atomic_write(path, lambda fh: fh.write(buffer.getbuffer()))


def _write_csv(path: Path, items: Sequence[TableItem]) -> None:
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(("image_id", "label", "split", "fold"))
    for item in items:
        fold = "" if item.fold is None else item.fold
        writer.writerow((item.image_id, item.label, item.split or "", fold))
    atomic_write(path, lambda fh: fh.write(text.getvalue().encode()))


def prepare_images(
    table: ImageTable,
    out_dir: str | os.PathLike[str],
    *,
    target_size: int,
    fill: float | Sequence[float] | None = None,
    format: Literal["png", "tiff"] = "png",  # noqa: A002 - the option's natural name
    keep_gray: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> ImageTable:
    """Write every image of ``table`` resized as ``LargeImageDataset(mode="resize")`` does.

    Args:
        table: the images (see :func:`patchgd.data.table.read_table`).
        out_dir: output folder; created if needed.
        target_size: longest side of the written images.
        fill: ``None`` (default) writes the resized image without padding (longest side
            ``target_size``), so the padding colour can still be chosen when training and
            :func:`channel_stats` on the result sees only image pixels. A fill colour (uint8
            units) writes the padded ``target_size`` square instead.
        format: ``"png"`` (``target_size`` at most :data:`MAX_PNG_SIZE`) or ``"tiff"`` (tiled
            256 x 256, zlib), for large targets that will be read patch by patch.
        keep_gray: grayscale images stay 1-channel.
        overwrite: rewrite outputs that exist; by default they are kept (resume).
        progress: show a tqdm progress bar.

    Each image is written atomically (a temp file renamed into place): an interrupted run leaves
    no partial file, and a rerun skips the outputs already written without decoding their
    inputs again (headers are still opened once, to check them). ``out_dir/prepare.json``
    records the settings; a rerun with other settings is a ConfigError unless
    ``overwrite=True``. Relative ids keep their folders (``train/a.svs`` -> ``train/a.png``).
    Images that cannot be opened or decoded are skipped, logged and listed in the returned
    table's ``skipped``, which also keeps ``table.skipped``. ``out_dir/labels.csv``
    (``image_id,label,split,fold``; the id is the output path relative to ``out_dir``) is
    written last. Returns the table of the written images; when reading that CSV back later,
    pass ``num_classes`` to :func:`read_table` (inferring it from the labels misses a last
    class with no image).
    """
    if format not in ("png", "tiff"):
        raise ConfigError(f"format={format!r}: expected 'png' or 'tiff'")
    if format == "png" and isinstance(target_size, int) and target_size > MAX_PNG_SIZE:
        raise ConfigError(
            f"target_size={target_size} is above {MAX_PNG_SIZE} for format='png' (a PNG is "
            "decoded whole on every read); use format='tiff'"
        )
    # Opens every header once: bad files are skipped here, with the table's skipped rows.
    dataset = LargeImageDataset(
        table,
        mode="resize",
        target_size=target_size,
        fill=0 if fill is None else fill,
        keep_gray=keep_gray,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "target_size": target_size,
        "fill": None if fill is None else list(dataset.fill),
        "format": format,
        "keep_gray": keep_gray,
    }
    settings_path = out / _SETTINGS
    if settings_path.is_file() and not overwrite:
        try:
            previous = json.loads(settings_path.read_text())
        except (OSError, ValueError):
            previous = None
        if previous != settings:
            raise ConfigError(
                f"out_dir={os.fspath(out_dir)!r} was prepared with {previous}, not {settings}; "
                "pass overwrite=True or use another out_dir"
            )

    payload = json.dumps(settings, indent=1).encode()
    atomic_write(settings_path, lambda fh: fh.write(payload))
    suffix = ".png" if format == "png" else ".tif"
    skipped: list[SkippedItem] = list(dataset.skipped)
    written: list[TableItem] = []
    taken: set[PurePosixPath] = set()
    for index in tqdm(range(len(dataset)), disable=not progress, desc="prepare", unit="image"):
        item = dataset.items[index]
        rel = first = _output_name(item.image_id, item.path, suffix)
        number = 1
        while rel in taken:  # two ids that name the same output: keep both, deterministically
            rel = first.with_name(f"{first.name[: -len(suffix)]}-{number}{suffix}")
            number += 1
        taken.add(rel)
        target = out / rel
        if os.path.abspath(target) == os.path.abspath(item.path):
            raise ConfigError(f"out_dir={os.fspath(out_dir)!r} would overwrite {item.path}")
        if overwrite or not target.is_file():
            try:
                pixels = dataset.read_resized(index, pad=fill is not None)
            except DataError as exc:  # decoding reveals what headers did not
                reason = " ".join(str(exc).split())
                logger.warning("skipped: %s", reason)
                skipped.append(SkippedItem(item.image_id, reason))
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_image(target, pixels, format)
        path = str(target.resolve())
        written.append(TableItem(rel.as_posix(), path, item.label, item.split, item.fold))
    if not written:
        raise DataError(f"no image of {table.source or 'the table'} could be prepared")
    _write_csv(out / "labels.csv", written)
    return ImageTable(written, table.num_classes, skipped, table.classes, str(out / "labels.csv"))


def channel_stats(
    dataset_or_table: LargeImageDataset | ImageTable,
    *,
    target_size: int | None = None,
    max_images: int | None = None,
    keep_gray: bool = False,
    progress: bool = True,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of the training inputs, in [0, 1] units.

    Pass the training dataset (its mode and resolution are used: the resized images in
    ``mode="resize"``, the working level in ``mode="lazy"``), or a table and ``target_size``
    (then ``mode="resize"``). Only image pixels count: the padding ``fill`` is not an image
    pixel, so it is left out. Images are read band by band and the pixel values counted in
    per-channel histograms of 256 integers, so the result is exact up to the final float64
    arithmetic and does not depend on the reading order. The std is the population std.
    ``max_images`` uses that many images evenly spaced over the dataset, first and last
    included (deterministic). An
    image that fails to decode is skipped with a warning (raised if the dataset was built
    with ``on_error="raise"``).
    """
    if isinstance(dataset_or_table, ImageTable):
        if target_size is None:
            raise ConfigError("target_size=None: channel_stats of a table needs a target_size")
        dataset = LargeImageDataset(
            dataset_or_table, mode="resize", target_size=target_size, keep_gray=keep_gray
        )
    elif isinstance(dataset_or_table, LargeImageDataset):
        dataset = dataset_or_table
        if target_size is not None and target_size != dataset.target_size:
            raise ConfigError(
                f"target_size={target_size} differs from the dataset's {dataset.target_size}; "
                "leave it out to use the dataset's resolution"
            )
    else:
        raise ConfigError(
            f"dataset_or_table={type(dataset_or_table).__name__}: expected a "
            "LargeImageDataset or an ImageTable"
        )
    count = len(dataset)
    if max_images is not None:
        count = min(count, require_count("max_images", max_images))
    # evenly spaced, first and last included (a step >= 1 keeps the rounded indices distinct)
    last = len(dataset) - 1
    indices = [round(i * last / (count - 1)) for i in range(count)] if count > 1 else [0]
    channels = dataset.channels
    histogram = np.zeros((channels, 256), np.int64)
    for index in tqdm(indices, disable=not progress, desc="channel stats", unit="image"):
        try:
            with dataset.open(index) as source:
                if dataset.mode == "resize":
                    bands = resized_bands(source, dataset.out_size(index))
                else:
                    bands = level_bands(source)
                for _, band in bands:
                    for c in range(channels):
                        histogram[c] += np.bincount(band[..., c].ravel(), minlength=256)
        except DataError as exc:
            if dataset.on_error == "raise":
                raise
            logger.warning("channel_stats skipped: %s", " ".join(str(exc).split()))
    total = histogram.sum(axis=1)
    if not total.all():
        raise DataError("channel_stats: no image could be read")
    values = np.arange(256, dtype=np.float64) / 255.0
    mean = histogram @ values / total
    var = (histogram * (values[None, :] - mean[:, None]) ** 2).sum(axis=1) / total
    return tuple(float(m) for m in mean), tuple(float(math.sqrt(v)) for v in var)
