"""What the synthetic data sets share: splits, per-image seeds, labels, channels, transforms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from patchgd.errors import ConfigError, require_count

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_CODE = {name: code for code, name in enumerate(SPLITS)}


def is_int(value: object) -> bool:
    """An integer, numpy's included, and not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class GeneratedSplit(Dataset):
    """One split of a data set generated on the fly, with no files on disk.

    Image ``i`` has label ``i % num_classes`` (``per_class`` images per class) and is drawn from
    ``SeedSequence([seed, split_code, i])``, so any image can be generated alone, by any worker.
    Subclasses draw the image; ``__getitem__`` returns ``(image, label)``, the image a float32
    tensor ``(channels, H, W)`` in [0, 1] (``channels=3`` repeats the gray channel), through
    ``transform`` when one is given.
    """

    def __init__(
        self,
        split: Split,
        per_class: int,
        num_classes: int,
        seed: int,
        transform: Callable[[torch.Tensor], object] | None,
        channels: int,
    ) -> None:
        if split not in SPLIT_CODE:
            raise ConfigError(f"split={split!r}: expected one of {list(SPLITS)}")
        per_class = require_count(f"per_class ({split} split)", per_class)
        seed = require_count("seed", seed, at_least=0)
        if channels not in (1, 3):
            raise ConfigError(f"channels={channels!r}: must be 1 or 3")
        self.split, self.per_class, self.num_classes = split, per_class, num_classes
        self.seed, self.transform, self.channels = seed, transform, channels

    def __len__(self) -> int:
        return self.per_class * self.num_classes

    @property
    def labels(self) -> list[int]:
        """Every image's label, without generating the images."""
        return [i % self.num_classes for i in range(len(self))]

    def seed_of(self, index: int) -> tuple[np.random.SeedSequence, int]:
        """The seed sequence and label of image ``index`` (negative indices count from the end)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        seq = np.random.SeedSequence([self.seed, SPLIT_CODE[self.split], index])
        return seq, index % self.num_classes

    def output(self, gray: torch.Tensor) -> object:
        """A ``(H, W)`` float image as this split returns it: channels, then the transform."""
        image = gray.unsqueeze(0)
        if self.channels == 3:
            image = image.repeat(3, 1, 1)
        return self.transform(image) if self.transform else image
