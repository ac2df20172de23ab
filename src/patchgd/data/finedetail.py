"""FineDetail: a detail-bound benchmark, where the label lives in a few pixels of texture.

Each image is a large dark canvas with a few small square objects of equal size and equal mean
brightness, scattered at random. Most are plain; in every class but the first, one to a few of
them carry a fine texture whose kind is the label:

====  ===========  ================================================================
class name         the textured objects
====  ===========  ================================================================
0     ``plain``    none: every object is plain (as a benign slide has no lesion)
1     ``rows``     stripes along the rows, one pixel high (period 2 px)
2     ``columns``  stripes along the columns, one pixel wide (period 2 px)
3     ``checker``  a one-pixel checkerboard
====  ===========  ================================================================

Why it is detail-bound: every texture is a pattern of period 2 px (amplitude ``contrast``/2
under a smooth window) around the object's mean, and a textured object is exactly as bright as
a plain one. Its spectrum sits at the Nyquist frequency, so resizing with antialiased bilinear
interpolation (what downscaled GD uses) by an even factor (1024 → 512, 256, 128 px) leaves less
than 0.5 % of its amplitude, far below the pixel noise: a downscaled textured object cannot be
told from a plain one. Factors in between, and area averaging, leave a few percent as aliasing;
:func:`texture_residue` measures it and ``docs/finedetail.md`` tabulates it for every size.
The objects keep their size in pixels however large the canvas, so the larger the canvas, the
further it must be shrunk to fit a memory budget; and the evidence is anywhere, so no fixed
crop keeps it.

Image ``i`` of a split has label ``i % 4`` and is generated from
``SeedSequence([seed, split_code, i])``, so any image can be produced alone, by any worker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from patchgd.errors import ConfigError

from .generated import GeneratedSplit, Split

CLASSES: tuple[str, ...] = ("plain", "rows", "columns", "checker")


@dataclass(frozen=True)
class FineDetailConfig:
    """How FineDetail images are drawn.

    Args:
        canvas_size: image side in pixels (even).
        object_size: side of every object in pixels (even), whatever the canvas size.
        objects: (fewest, most) objects per image, textured and plain together.
        textured: (fewest, most) textured objects in an image of classes 1-3 (at most the
            image's object count); class 0 has none.
        background: brightness of the canvas, in [0, 1].
        brightness: mean brightness of every object, textured or plain.
        contrast: peak-to-peak amplitude of the texture; its pixels are at
            ``brightness ± contrast / 2``.
        noise: standard deviation of the Gaussian pixel noise over the whole canvas.
    """

    canvas_size: int = 1024
    object_size: int = 24
    objects: tuple[int, int] = (4, 8)
    textured: tuple[int, int] = (1, 3)
    background: float = 0.1
    brightness: float = 0.5
    contrast: float = 0.4
    noise: float = 0.05

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"FineDetailConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("canvas_size", "object_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 2 or value % 2:
                raise bad(name, "must be an even integer of at least 2")
        for name in ("objects", "textured"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise bad(name, "must be (fewest, most) with 1 <= fewest <= most")
        if self.textured[0] > self.objects[0]:
            raise bad("textured", f"its fewest exceeds the fewest objects {self.objects[0]}")
        cells = (self.canvas_size // (2 * self.object_size)) ** 2
        if self.objects[1] > cells:
            raise bad("objects", f"more than the {cells} places for {self.object_size} px objects")
        for name in ("background", "brightness", "noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "must be in [0, 1]")
        half = self.contrast / 2
        if not 0.0 < half <= min(self.brightness, 1.0 - self.brightness):
            raise bad("contrast", "must be positive and keep the texture within [0, 1]")

    @property
    def num_classes(self) -> int:
        return len(CLASSES)


@dataclass(frozen=True)
class PlacedObject:
    """One object: its top-left corner, side, and texture (a class name; ``plain`` for none)."""

    top: int
    left: int
    size: int
    texture: str


@dataclass(frozen=True)
class FineDetailSample:
    image: np.ndarray  # (H, W) float32 in [0, 1]
    label: int
    objects: list[PlacedObject] = field(default_factory=list)


def texture(kind: str, size: int) -> np.ndarray:
    """A texture's pattern on a ``size`` × ``size`` object, in [-1, 1] (zeros for ``plain``).

    A one-pixel parity pattern under a Hann window (zero at the object's border, one at its
    centre). The window keeps the pattern's spectrum next to the Nyquist frequency, so an
    antialiasing resize removes it whole; a pattern cut off sharply at the border would leave
    a trace of its orientation along the edges. For an even size the window is symmetric and
    the pattern sums to exactly zero: a textured object is exactly as bright as a plain one.
    """
    r, c = np.indices((size, size))
    parity = {"plain": None, "rows": r % 2, "columns": c % 2, "checker": (r + c) % 2}
    if kind not in parity:
        raise ConfigError(f"unknown texture {kind!r}; expected one of {list(CLASSES)}")
    bits = parity[kind]
    if bits is None:
        return np.zeros((size, size), np.float32)
    window = np.sin(np.pi * (np.arange(size) + 0.5) / size) ** 2
    return ((1.0 - 2.0 * bits) * np.outer(window, window)).astype(np.float32)


def generate_sample(
    config: FineDetailConfig,
    rng_or_seed: np.random.Generator | int | np.random.SeedSequence,
    label: int,
) -> FineDetailSample:
    """One image of class ``label``, drawn from ``rng_or_seed``."""
    if not 0 <= label < config.num_classes:
        raise ConfigError(f"label={label}: expected 0..{config.num_classes - 1}")
    rng = (
        rng_or_seed
        if isinstance(rng_or_seed, np.random.Generator)
        else np.random.default_rng(rng_or_seed)
    )
    side, size = config.canvas_size, config.object_size
    count = int(rng.integers(config.objects[0], config.objects[1] + 1))
    textured = 0 if label == 0 else int(rng.integers(config.textured[0], config.textured[1] + 1))
    textured = min(textured, count)
    # Objects sit in distinct cells of a grid of pitch 2·size, at an even offset inside the
    # cell: never overlapping, never touching, always at even coordinates.
    cells = side // (2 * size)
    chosen = rng.choice(cells * cells, size=count, replace=False)
    image = np.full((side, side), config.background, np.float32)
    placed = []
    for i, cell in enumerate(chosen):
        top = int(cell // cells) * 2 * size + 2 * int(rng.integers(0, size // 2 + 1))
        left = int(cell % cells) * 2 * size + 2 * int(rng.integers(0, size // 2 + 1))
        kind = CLASSES[label] if i < textured else "plain"
        pattern = texture(kind, size)
        image[top : top + size, left : left + size] = (
            config.brightness + config.contrast / 2 * pattern
        )
        placed.append(PlacedObject(top, left, size, kind))
    if config.noise > 0:
        image += rng.normal(0.0, config.noise, image.shape).astype(np.float32)
    np.clip(image, 0.0, 1.0, out=image)
    order = rng.permutation(count)  # the textured objects are not always listed first
    return FineDetailSample(image, label, [placed[i] for i in order])


class FineDetail(GeneratedSplit):
    """FineDetail generated on the fly, with no files on disk.

    Image ``i`` has label ``i % 4`` (``per_class`` images per class) and is generated from
    ``SeedSequence([seed, split_code, i])``. ``__getitem__`` returns ``(image, label)`` where
    ``image`` is a float32 tensor ``(channels, H, W)`` in [0, 1]; ``channels=3`` repeats the
    gray channel.
    """

    def __init__(
        self,
        split: Split = "train",
        per_class: int = 100,
        config: FineDetailConfig = FineDetailConfig(),  # noqa: B008 - frozen, safe to share
        seed: int = 0,
        transform: Callable[[torch.Tensor], object] | None = None,
        channels: int = 1,
    ) -> None:
        super().__init__(split, per_class, config.num_classes, seed, transform, channels)
        self.config = config

    def sample(self, index: int) -> FineDetailSample:
        """Image ``index`` with its record of placed objects."""
        seq, label = self.seed_of(index)
        return generate_sample(self.config, seq, label)

    def __getitem__(self, index: int) -> tuple[object, int]:
        s = self.sample(index)
        return self.output(torch.from_numpy(s.image)), s.label


def texture_residue(config: FineDetailConfig, input_size: int, mode: str = "bilinear") -> float:
    """How much of a texture survives resizing the canvas to ``input_size``, from 0 to 1.

    Resizes (antialiased bilinear, as downscaled GD does; or ``"area"``) a noise-free textured
    object and its plain twin, and returns the largest pixel difference between them divided by
    the texture's amplitude (``contrast / 2``). 1 means the texture is intact; 0 means the
    downscaled textured object cannot be told from a plain one, for any texture.
    """
    side, size = config.canvas_size, config.object_size
    worst = 0.0
    for kind in CLASSES[1:]:
        for offset in (0, 2):  # objects sit at even coordinates
            canvas = torch.zeros(2, 1, side, side)
            box = (slice(offset + 2 * size, offset + 3 * size),) * 2
            canvas[0, 0][box] = torch.from_numpy(texture(kind, size)) * (config.contrast / 2)
            if mode == "area":
                small = F.interpolate(canvas, size=(input_size, input_size), mode="area")
            else:
                small = F.interpolate(
                    canvas, (input_size, input_size), mode=mode, antialias=True, align_corners=False
                )
            worst = max(worst, float((small[0] - small[1]).abs().max()) / (config.contrast / 2))
    return worst


__all__ = [
    "CLASSES",
    "FineDetail",
    "FineDetailConfig",
    "FineDetailSample",
    "PlacedObject",
    "generate_sample",
    "texture",
    "texture_residue",
]
