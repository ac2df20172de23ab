"""Per-channel normalisation, ``(x - mean) / std`` on pixels scaled to [0, 1]: one
implementation for every way images reach a model (generated data sets held in memory, files
resized on read, patches read lazily from disk)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class ChannelNorm:
    """``(x - mean) / std`` per channel, for ``(C, H, W)`` or ``(N, C, H, W)`` tensors.

    ``mean`` and ``std`` hold one value for every channel or one per channel (``patchgd data
    stats`` measures them); ``None`` leaves that part out (mean 0, std 1).
    """

    def __init__(self, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32)

    @property
    def is_identity(self) -> bool:
        return self.mean is None and self.std is None

    def __call__(self, x: Tensor, *, in_place: bool = False) -> Tensor:
        """``x`` normalised; ``in_place`` overwrites ``x`` (a tensor made for the purpose,
        never one a data set keeps)."""
        if not in_place:
            x = x.clone()
        if self.mean is not None:
            x.sub_(self.mean.to(x.device).view(-1, 1, 1))
        if self.std is not None:
            x.div_(self.std.to(x.device).view(-1, 1, 1))
        return x
