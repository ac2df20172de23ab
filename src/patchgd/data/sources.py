"""Image sources that read regions of very large images lazily, at a chosen pyramid level.

Every source has the :class:`ImageSource` interface: ``size`` (height, width) at the working
level, ``channels``, ``read_region(top, left, height, width, fill)`` and ``thumbnail(max_side)``.
Regions may cross or miss the image: the part outside comes out as ``fill``. A region read decodes
only the tiles (or strips) it overlaps; PNG/JPEG are not tiled and are decoded whole, once.

Conversion rules (every read returns ``uint8`` in RGB channel order):

* depth: ``uint8`` as is; wider unsigned integers keep their top 8 bits, i.e. the *type's* range is
  scaled (``>> 8`` for ``uint16``, so 12-bit data stored in ``uint16`` comes out dark); 1-bit
  (bool) becomes 0/255; signed and floating-point samples are refused with :class:`DataError`.
* alpha: RGBA and gray+alpha are composited on white, ``round(c*a/255 + 255*(1 - a/255))``, so
  the transparent background of slides comes out white; premultiplied TIFF alpha gives
  ``min(c + 255 - a, 255)``. Extra TIFF samples marked "unspecified" are dropped.
* grayscale becomes RGB by repeating the channel, unless ``keep_gray=True`` (then 1 channel).
* palette images go through their colour map (PIL ``P`` via ``convert``, a TIFF colormap
  ``>> 8``); MINISWHITE TIFFs are inverted; other PIL modes (CMYK, YCbCr, ...) via
  ``convert("RGB")``. JPEG EXIF orientation is not applied.
* pixel size (``mpp``, microns per pixel) is read from slide properties, OME ``PhysicalSizeX``
  or the TIFF resolution tags, assuming square pixels.

Sources reopen their file after a fork or unpickling, so they can be handed to DataLoader workers.
"""

from __future__ import annotations

import math
import operator
import os
import re
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import tifffile
import zarr
from PIL import Image

from patchgd.errors import ConfigError, DataError, require_count

__all__ = [
    "ArraySource",
    "ImageSource",
    "PillowSource",
    "SlideSource",
    "TiffSource",
    "choose_level",
    "open_image",
]

SLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".mrxs", ".bif")
TIFF_SUFFIXES = (".tif", ".tiff")  # includes .ome.tif / .ome.tiff
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_THUMBNAIL_BAND_BYTES = 64 * 2**20  # a thumbnail of a big level is reduced band by band
_PIL_GRAY = {"1", "L", "LA", "La", "I;16", "I;16L", "I;16B", "I;16N"}
_PIL_CONVERT = {
    "1": "L",
    "La": "LA",
    "RGBa": "RGBA",
    "RGBX": "RGB",
    "CMYK": "RGB",
    "YCbCr": "RGB",
    "LAB": "RGB",
    "HSV": "RGB",
}
_JPEG_LIKE = {6, 7, 33003, 33004, 33005, 33007, 34712, 34892}  # decoders that return RGB
_READ_ERRORS = (OSError, ValueError, RuntimeError, KeyError, IndexError, EOFError, SyntaxError)


@runtime_checkable
class ImageSource(Protocol):
    """A large image whose regions are read on demand at a working resolution."""

    path: str

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) at the working level."""
        ...

    @property
    def channels(self) -> int:
        """Channels of every read: 3 (RGB), or 1 for grayscale opened with ``keep_gray``."""
        ...

    def read_region(
        self, top: int, left: int, height: int, width: int, fill: float | Sequence[float] = 0
    ) -> np.ndarray: ...

    def thumbnail(self, max_side: int) -> np.ndarray: ...

    def close(self) -> None: ...


def choose_level(level_sizes: Sequence[tuple[int, int]], target_longest_side: int) -> int:
    """Index of the smallest level whose longest side is still >= ``target_longest_side``.

    A level is never chosen if it would have to be scaled up while a larger one exists; if no
    level is large enough the largest one (level 0 of a normal pyramid) is returned.
    """
    if len(level_sizes) == 0:
        raise ConfigError("choose_level needs at least one level size, got none")
    target = require_count("target_longest_side", target_longest_side)
    longest = [max(int(h), int(w)) for h, w in level_sizes]
    large_enough = [i for i, side in enumerate(longest) if side >= target]
    if not large_enough:
        return max(range(len(longest)), key=longest.__getitem__)
    return min(large_enough, key=lambda i: (longest[i], i))


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}".rstrip(": ")


def _existing_file(path: str | os.PathLike[str]) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"image file not found: {path}")
    return path


def _check_dtype(dtype: np.dtype, name: str) -> None:
    if dtype != np.bool_ and dtype.kind != "u":
        raise DataError(f"{name}: unsupported sample type {dtype}; use 8- or 16-bit unsigned data")


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Depth rule of the module docstring (unsigned or bool input, checked at open)."""
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.bool_:
        return pixels.astype(np.uint8) * np.uint8(255)
    return (pixels >> (8 * pixels.dtype.itemsize - 8)).astype(np.uint8)


def _to_output(pixels: np.ndarray, keep_gray: bool, premultiplied: bool = False) -> np.ndarray:
    """(h, w, c) uint8 with c in 1..4 -> (h, w, 3), or (h, w, 1) for gray kept gray."""
    if pixels.shape[2] in (2, 4):  # last channel is alpha: composite on white
        color, alpha = pixels[..., :-1].astype(np.uint16), pixels[..., -1:].astype(np.uint16)
        if premultiplied:
            pixels = np.minimum(color + (255 - alpha), 255).astype(np.uint8)
        else:
            pixels = ((color * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    if pixels.shape[2] == 1 and not keep_gray:
        pixels = np.repeat(pixels, 3, axis=2)
    return pixels


class _Source:
    """Shared logic: level bookkeeping, clipping and fill, thumbnails, reopen after fork."""

    _handles: tuple[str, ...] = ()  # attributes dropped when pickled, rebuilt by _open()

    def __init__(
        self,
        path: str,
        level_sizes: list[tuple[int, int]],
        gray: bool,
        keep_gray: bool,
        level: int | None,
        mpp: float | None = None,
    ) -> None:
        self.path = path
        self.level_sizes = [(int(h), int(w)) for h, w in level_sizes]
        self._channels = 1 if gray and keep_gray else 3
        self._keep_gray = keep_gray
        self._base_mpp = mpp
        self._closed = False
        self._pid: int | None = os.getpid()
        self._level = 0
        try:
            self.level = 0 if level is None else level
        except ConfigError:
            self.close()  # the subclass has already opened its file
            raise

    @property
    def level(self) -> int:
        """Working pyramid level (0 = full resolution); settable."""
        return self._level

    @level.setter
    def level(self, value: int) -> None:
        try:
            index = operator.index(value)
        except TypeError:
            index = -1
        n = len(self.level_sizes)
        if not 0 <= index < n:
            raise ConfigError(f"level={value!r} is out of range: {self.path} has {n} level(s)")
        self._level = index

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) at the working level."""
        return self.level_sizes[self._level]

    @property
    def channels(self) -> int:
        """3 (RGB), or 1 for a grayscale image opened with ``keep_gray=True``."""
        return self._channels

    @property
    def mpp(self) -> float | None:
        """Microns per pixel at the working level, or None if the file does not say."""
        if self._base_mpp is None:
            return None
        return self._base_mpp * self.level_sizes[0][1] / self.size[1]

    def read_region(
        self, top: int, left: int, height: int, width: int, fill: float | Sequence[float] = 0
    ) -> np.ndarray:
        """(height, width, channels) uint8 pixels at the working level; outside is ``fill``.

        ``fill`` is one value or one per channel, in [0, 255].
        """
        top, left = operator.index(top), operator.index(left)
        for name, value in (("height", height), ("width", width)):
            if operator.index(value) < 0:
                raise ConfigError(f"read_region {name} must be >= 0, got {value!r}")
        return self._read(self._level, top, left, int(height), int(width), self._fill(fill))

    def thumbnail(self, max_side: int) -> np.ndarray:
        """Whole-image overview whose longest side is <= ``max_side`` (box-filtered).

        Read from the smallest level that is at least ``max_side`` long, in bands, so memory
        stays bounded even when only a huge level exists.
        """
        max_side = require_count("max_side", max_side)
        level = choose_level(self.level_sizes, max_side)
        height, width = self.level_sizes[level]
        factor = math.ceil(max(height, width) / max_side)
        fill = np.full(self.channels, 255, np.uint8)
        if factor == 1:
            return self._read(level, 0, 0, height, width, fill)
        out_h, out_w = math.ceil(height / factor), math.ceil(width / factor)
        rows_per_band = max(1, _THUMBNAIL_BAND_BYTES // (factor * width * self.channels))
        bands = []
        for row in range(0, out_h, rows_per_band):
            rows = min(rows_per_band, out_h - row)
            top = row * factor
            band = self._read(level, top, 0, min(rows * factor, height - top), width, fill)
            image = Image.fromarray(band[..., 0] if self.channels == 1 else band)
            small = np.asarray(image.resize((out_w, rows), Image.Resampling.BOX))
            bands.append(small.reshape(rows, out_w, self.channels))
        return np.concatenate(bands, axis=0)

    def close(self) -> None:
        """Release the file; reads afterwards raise DataError."""
        self._closed = True
        for name in self._handles:
            setattr(self, name, None)

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        h, w = self.size
        return f"{type(self).__name__}({self.path!r}, level={self._level}, size={h}x{w})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update({name: None for name in self._handles}, _pid=None)
        return state

    def _fill(self, fill: float | Sequence[float]) -> np.ndarray:
        try:
            values = np.atleast_1d(np.asarray(fill, dtype=float))
            ok = values.ndim == 1 and values.size in (1, self.channels)
            ok = ok and bool(np.all((values >= 0) & (values <= 255)))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(
                f"fill={fill!r} must be one value or {self.channels} values in [0, 255]"
            )
        return np.rint(values).astype(np.uint8)

    def _read(
        self, level: int, top: int, left: int, height: int, width: int, fill: np.ndarray
    ) -> np.ndarray:
        out = np.empty((height, width, self.channels), np.uint8)
        out[...] = fill
        level_h, level_w = self.level_sizes[level]
        t0, l0 = max(top, 0), max(left, 0)
        t1, l1 = min(top + height, level_h), min(left + width, level_w)
        if self._closed:
            raise DataError(f"read from a closed image source: {self.path}")
        if t0 >= t1 or l0 >= l1:
            return out  # nothing of the image inside: no file access at all
        if self._pid != os.getpid():  # forked or unpickled: file handles are not shareable
            self._open()
            self._pid = os.getpid()
        try:
            pixels = self._read_pixels(level, t0, l0, t1 - t0, l1 - l0)
        except DataError:
            raise
        except _READ_ERRORS as exc:
            raise DataError(
                f"cannot decode {self.path} (level {level}, rows {t0}:{t1}, "
                f"columns {l0}:{l1}): {_one_line(exc)}"
            ) from exc
        out[t0 - top : t1 - top, l0 - left : l1 - left] = pixels
        return out

    def _open(self) -> None:
        """(Re)build the file handles named in ``_handles``."""

    def _read_pixels(self, level: int, top: int, left: int, height: int, width: int) -> np.ndarray:
        """In-bounds region at ``level`` as (height, width, channels) uint8."""
        raise NotImplementedError


class ArraySource(_Source):
    """An in-memory (H, W) or (H, W, C) array, C in 1..4 (gray, gray+alpha, RGB, RGBA)."""

    def __init__(self, array: np.ndarray, name: str = "array", *, keep_gray: bool = False) -> None:
        pixels = np.asarray(array)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if pixels.ndim != 3 or pixels.shape[2] not in (1, 2, 3, 4) or 0 in pixels.shape[:2]:
            raise DataError(
                f"{name}: expected an (H, W) or (H, W, C<=4) array, got shape {np.shape(array)}"
            )
        _check_dtype(pixels.dtype, name)
        self._array = pixels
        super().__init__(name, [pixels.shape[:2]], pixels.shape[2] <= 2, keep_gray, None)

    def _read_pixels(self, level: int, top: int, left: int, height: int, width: int) -> np.ndarray:
        region = self._array[top : top + height, left : left + width]
        return _to_output(_to_uint8(region), self._keep_gray)


class PillowSource(_Source):
    """PNG, JPEG or anything else PIL opens; decoded whole on the first read (not tiled)."""

    _handles = ("_pixels",)

    def __init__(self, path: str | os.PathLike[str], *, keep_gray: bool = False) -> None:
        path = _existing_file(path)
        try:
            with Image.open(path) as image:  # reads the header only
                width, height, mode = image.width, image.height, image.mode
        except Exception as exc:  # PIL raises many types for unreadable files
            raise DataError(f"cannot open image {path}: {_one_line(exc)}") from exc
        if (
            mode not in _PIL_GRAY
            and mode not in _PIL_CONVERT
            and mode not in ("P", "PA", "RGB", "RGBA")
        ):
            raise DataError(f"{path}: unsupported PIL image mode {mode!r}")
        self._pixels: np.ndarray | None = None
        super().__init__(path, [(height, width)], mode in _PIL_GRAY, keep_gray, None)

    def _read_pixels(self, level: int, top: int, left: int, height: int, width: int) -> np.ndarray:
        if self._pixels is None:
            self._pixels = self._decode()
        return self._pixels[top : top + height, left : left + width]

    def _decode(self) -> np.ndarray:
        try:
            with Image.open(self.path) as image:
                image.load()  # full decode inside the try: truncation shows up here
                if image.mode in ("P", "PA"):
                    alpha = image.mode == "PA" or "transparency" in image.info
                    image = image.convert("RGBA" if alpha else "RGB")
                elif image.mode in _PIL_CONVERT:
                    image = image.convert(_PIL_CONVERT[image.mode])
                pixels = np.asarray(image)
        except MemoryError:
            raise
        except Exception as exc:
            raise DataError(
                f"cannot decode {self.path} (truncated or corrupt?): {_one_line(exc)}"
            ) from exc
        pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
        return _to_output(_to_uint8(pixels), self._keep_gray)


class TiffSource(_Source):
    """Plain, tiled and pyramidal TIFF / OME-TIFF through tifffile and zarr.

    Levels are ``TiffFile.series[0].levels``. Tiled or compressed levels are wrapped with
    ``series.aszarr(level=...)`` so a read decodes only the tiles it overlaps; uncompressed
    contiguous levels are memory-mapped instead.
    """

    _handles = ("_tiff", "_arrays")

    def __init__(
        self, path: str | os.PathLike[str], level: int | None = None, *, keep_gray: bool = False
    ) -> None:
        self.path = path = _existing_file(path)
        self._open()
        levels = self._tiff.series[0].levels
        try:
            self._layouts = [_axes_layout(lvl.axes, lvl.shape, path) for lvl in levels]
            _check_dtype(np.dtype(levels[0].dtype), path)
            channel_axis = self._layouts[0][2]
            nchannels = 1 if channel_axis is None else levels[0].shape[channel_axis]
            self._color = _tiff_color(levels[0].keyframe, nchannels, path)
            _check_extents(levels, path)
        except BaseException:
            self._tiff.close()
            raise
        sizes = [
            (lvl.shape[y], lvl.shape[x])
            for lvl, (y, x, _) in zip(levels, self._layouts, strict=True)
        ]
        super().__init__(path, sizes, self._color[0] == 1, keep_gray, level, _tiff_mpp(self._tiff))

    def _open(self) -> None:
        try:
            self._tiff = tifffile.TiffFile(self.path)
            if not self._tiff.series:
                self._tiff.close()
                raise ValueError("no image series")
        except MemoryError:
            raise
        except Exception as exc:
            raise DataError(f"cannot open TIFF {self.path}: {_one_line(exc)}") from exc
        self._arrays: dict[int, Any] = {}

    def close(self) -> None:
        if getattr(self, "_tiff", None) is not None:
            self._tiff.close()
        super().close()

    def _array(self, level: int) -> Any:
        if level not in self._arrays:
            series = self._tiff.series[0]
            lvl = series.levels[level]
            if lvl.dataoffset is not None and lvl.keyframe.is_memmappable and lvl.dtype != bool:
                dtype = np.dtype(self._tiff.byteorder + lvl.dtype.char)
                self._arrays[level] = np.memmap(
                    self.path, dtype, "r", offset=lvl.dataoffset, shape=lvl.shape
                )
            else:
                store = series.aszarr(level=level)
                self._arrays[level] = zarr.open_array(store, mode="r", zarr_format=2)
        return self._arrays[level]

    def _read_pixels(self, level: int, top: int, left: int, height: int, width: int) -> np.ndarray:
        y, x, c = self._layouts[level]
        array = self._array(level)
        index: list[Any] = [0] * array.ndim  # squeezed series: other axes have length 1
        index[y], index[x] = slice(top, top + height), slice(left, left + width)
        kept = sorted(a for a in (y, x, c) if a is not None)
        if c is not None:
            index[c] = slice(None)
        pixels = np.asarray(array[tuple(index)])
        if c is None:
            pixels = pixels[..., None]
        else:
            pixels = pixels.transpose(kept.index(y), kept.index(x), kept.index(c))
        base, alpha, lut, invert = self._color
        if lut is not None:
            return _to_output(lut[pixels[..., 0]], self._keep_gray)
        pixels = _to_uint8(pixels)
        if invert:
            pixels = 255 - pixels
        keep = base + (alpha is not None)  # drops extra samples that are not alpha
        return _to_output(pixels[..., :keep], self._keep_gray, alpha == "premultiplied")


def _axes_layout(axes: str, shape: Sequence[int], path: str) -> tuple[int, int, int | None]:
    """Positions of the Y, X and channel (S or C) axes; other axes must have length 1."""
    channel = [i for i, a in enumerate(axes) if a in "SC" and shape[i] > 1]
    other = [a for a, n in zip(axes, shape, strict=True) if a not in "YXSC" and n > 1]
    if "Y" not in axes or "X" not in axes or other or len(channel) > 1:
        raise DataError(
            f"{path}: unsupported TIFF axes {axes} with shape {tuple(shape)}; "
            "expected one 2-D image (YX, YXS, SYX or CYX)"
        )
    return axes.index("Y"), axes.index("X"), channel[0] if channel else None


def _tiff_color(keyframe: Any, nchannels: int, path: str) -> tuple[int, str | None, Any, bool]:
    """(base channels, alpha kind, palette lookup table, invert) for a TIFF keyframe."""
    photometric, extras = int(keyframe.photometric), tuple(keyframe.extrasamples or ())
    if photometric == 2 or (photometric == 6 and keyframe.compression in _JPEG_LIKE):
        base = 3  # RGB, or YCbCr that the JPEG-family decoder already turned into RGB
    elif photometric in (0, 1, 3):  # MINISWHITE, MINISBLACK, PALETTE
        base = 3 if photometric == 1 and nchannels == 3 and not extras else 1
    else:
        raise DataError(f"{path}: unsupported TIFF photometric {keyframe.photometric!r}")
    alpha = None
    if nchannels > base and extras and extras[0] in (1, 2):
        alpha = "premultiplied" if extras[0] == 1 else "straight"
    elif nchannels != base and not (nchannels > base and extras and extras[0] == 0):
        raise DataError(f"{path}: cannot interpret {nchannels} channels as RGB or grayscale")
    lut = None
    if photometric == 3:
        colormap = np.asarray(keyframe.colormap)
        lut = (colormap >> 8 if colormap.max() > 255 else colormap).astype(np.uint8).T.copy()
    return base, alpha, lut, photometric == 0


def _check_extents(levels: Sequence[Any], path: str) -> None:
    """A truncated file can still parse (tifffile drops what it cannot read): check data ends."""
    file_size = os.path.getsize(path)
    for number, lvl in enumerate(levels):
        for page in lvl.pages:
            if page is None:  # a missing page reads as fill: nothing to check
                continue
            ends = [
                o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=False) if n
            ] or [0]
            if max(ends) > file_size:
                raise DataError(
                    f"{path} is truncated: level {number} needs {max(ends)} bytes "
                    f"but the file has {file_size}"
                )


def _tiff_mpp(tiff: tifffile.TiffFile) -> float | None:
    if tiff.is_ome and tiff.ome_metadata:
        size = re.search(r'PhysicalSizeX="([^"]+)"', tiff.ome_metadata)
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tiff.ome_metadata)
        if size and (unit is None or unit.group(1) in ("um", "µm", "μm")):
            return float(size.group(1))
    tags = tiff.pages.first.tags
    resolution, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
    if resolution is None or unit is None or int(unit.value) not in (2, 3):
        return None  # unit NONE: the numbers are only an aspect ratio
    numerator, denominator = resolution.value
    if numerator <= 0 or denominator <= 0:
        return None
    return (25400.0 if int(unit.value) == 2 else 10000.0) * denominator / numerator


class SlideSource(_Source):
    """Whole-slide formats (SVS, NDPI, SCN, BIF, generic pyramidal TIFF) through tiffslide."""

    _handles = ("_slide",)

    def __init__(
        self, path: str | os.PathLike[str], level: int | None = None, *, keep_gray: bool = False
    ) -> None:
        self.path = path = _existing_file(path)
        self._open()
        try:
            sizes = [(h, w) for w, h in self._slide.level_dimensions]
            self._downsamples = list(self._slide.level_downsamples)
            probe = np.asarray(self._slide.read_region((0, 0), 0, (1, 1), as_array=True))
            mpp = self._slide.properties.get("tiffslide.mpp-x")
            _check_dtype(probe.dtype, path)
            if probe.ndim != 3 or probe.shape[2] not in (1, 2, 3, 4):
                raise DataError(f"{path}: cannot interpret slide pixels of shape {probe.shape}")
        except BaseException as exc:
            self._slide.close()
            if isinstance(exc, _READ_ERRORS) and not isinstance(exc, DataError):
                raise DataError(f"cannot read slide {path}: {_one_line(exc)}") from exc
            raise
        super().__init__(path, sizes, probe.shape[2] <= 2, keep_gray, level, mpp)

    def _open(self) -> None:
        import tiffslide  # imported here: only slides need it

        try:
            self._slide = tiffslide.TiffSlide(self.path)
        except MemoryError:
            raise
        except Exception as exc:
            raise DataError(
                f"cannot open slide {self.path} with tiffslide: {_one_line(exc)}"
            ) from exc

    def close(self) -> None:
        if getattr(self, "_slide", None) is not None:
            self._slide.close()
        super().close()

    def _read_pixels(self, level: int, top: int, left: int, height: int, width: int) -> np.ndarray:
        ds = self._downsamples[level]
        location = (_level0_coordinate(left, ds), _level0_coordinate(top, ds))
        region = self._slide.read_region(
            location, level, (width, height), as_array=True, padding=False
        )
        pixels = np.asarray(region)
        if pixels.shape[:2] != (height, width):
            raise DataError(
                f"{self.path}: tiffslide returned {pixels.shape[:2]} pixels for a "
                f"{height}x{width} region at level {level}"
            )
        return _to_output(_to_uint8(pixels), self._keep_gray)


def _level0_coordinate(value: int, downsample: float) -> int:
    """Level-0 coordinate that tiffslide maps back to ``value`` (it computes int(x / ds))."""
    x = round(value * downsample)
    while int(x / downsample) > value:
        x -= 1
    while int(x / downsample) < value:
        x += 1
    return x


def _is_tiff(path: str) -> bool:
    with open(path, "rb") as file:
        return file.read(4) in _TIFF_MAGIC


def open_image(
    path: str | os.PathLike[str],
    *,
    level: int | None = None,
    target_size: int | None = None,
    mpp: float | None = None,
    keep_gray: bool = False,
) -> ImageSource:
    """Open ``path`` with the fitting source and choose its working level.

    Slide suffixes (``.svs .ndpi .scn .mrxs .bif``) use :class:`SlideSource`; ``.tif``/``.tiff``
    or TIFF content use :class:`TiffSource`; anything else :class:`PillowSource`. Give at most
    one of ``level`` (explicit), ``target_size`` (longest side in pixels: the smallest level at
    least that long, see :func:`choose_level`) or ``mpp`` (microns per pixel: the coarsest level
    at least that fine, up to one pixel of rounding in level sizes). Level 0 by default.
    """
    given = [
        name
        for name, v in (("level", level), ("target_size", target_size), ("mpp", mpp))
        if v is not None
    ]
    if len(given) > 1:
        raise ConfigError(f"give at most one of level, target_size and mpp, got {given}")
    path = _existing_file(path)
    name = path.lower()
    source: _Source
    if name.endswith(SLIDE_SUFFIXES):
        source = SlideSource(path, keep_gray=keep_gray)
    elif name.endswith(TIFF_SUFFIXES) or _is_tiff(path):
        source = TiffSource(path, keep_gray=keep_gray)
    else:
        source = PillowSource(path, keep_gray=keep_gray)
    try:
        if level is not None:
            source.level = level
        elif target_size is not None:
            source.level = choose_level(source.level_sizes, target_size)
        elif mpp is not None:
            source.level = _level_for_mpp(source, mpp)
    except BaseException:
        source.close()
        raise
    return source


def _level_for_mpp(source: _Source, mpp: float) -> int:
    if not isinstance(mpp, (int, float)) or not math.isfinite(mpp) or mpp <= 0:
        raise ConfigError(f"mpp must be a positive number of microns per pixel, got {mpp!r}")
    if source._base_mpp is None:
        raise DataError(
            f"{source.path} has no pixel-size metadata, so mpp={mpp} cannot choose "
            "a level; pass level= or target_size= instead"
        )
    longest = max(source.level_sizes[0])
    return choose_level(
        source.level_sizes, max(1, math.floor(longest * source._base_mpp / mpp + 1e-6))
    )
