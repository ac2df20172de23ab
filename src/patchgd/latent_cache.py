"""Z reuse: each training image's Z kept between its visits, so most outer steps skip the fill.

Algorithm 1 refills Z at every outer step: one pass of the encoder over every patch, without
gradients, which costs about as much as the inner iterations' share of the image with them. With
:class:`LatentCache` an image's Z is filled on its first visit and then only every
``refresh_every``-th visit; in between, the step starts from the Z the image's previous visit
left, in which every patch re-encoded then holds its newest embedding (:attr:`StepResult.z
<patchgd.algorithm.StepResult>`). The rest of that Z is older: embeddings of earlier weights.
``refresh_every=1`` is the paper's loop.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from .errors import ConfigError, require_count


class LatentCache:
    """Each image's Z, by key, with the number of visits since it was last filled.

    A batch reuses Z only when every image in it has a Z younger than ``refresh_every`` visits;
    otherwise the whole batch is filled. An epoch visits each image once, so the images of a
    batch come due together however the loader shuffles.

    Args:
        refresh_every: r, fill an image's Z on one visit in r (1: every visit, as the paper).
        device: where the cached Z are kept (``"cpu"`` by default: D·rows·cols floats per
            image, e.g. 256 KiB for D = 256 on a 16 × 16 grid).
    """

    def __init__(self, refresh_every: int, device: str | torch.device = "cpu") -> None:
        self.refresh_every = require_count("z_refresh_every", refresh_every)
        self.device = torch.device(device)
        self._z: dict[Hashable, Tensor] = {}
        self._age: dict[Hashable, int] = {}  # visits since the last fill

    def lookup(self, keys: Sequence[Hashable]) -> Tensor | None:
        """The stacked Z of ``keys`` if none is due for a refill, else ``None`` (fill them)."""
        if self.refresh_every == 1 or not all(
            k in self._z and self._age[k] < self.refresh_every for k in keys
        ):
            return None
        return torch.stack([self._z[k] for k in keys])

    def store(self, keys: Sequence[Hashable], z: Tensor, filled: bool) -> None:
        """Keep ``z`` (``(B, D, rows, cols)``) for ``keys`` after a step; ``filled``: it
        started from a fresh fill (age 1), else from the cache (age + 1)."""
        if self.refresh_every == 1:
            return
        if len(keys) != z.shape[0]:
            raise ConfigError(f"{len(keys)} keys for a Z of {z.shape[0]} images")
        for key, latent in zip(keys, z.detach().to(self.device), strict=True):
            self._age[key] = 1 if filled else self._age[key] + 1
            self._z[key] = latent.clone()

    def clear(self) -> None:
        """Forget every Z (e.g. after loading other weights)."""
        self._z.clear()
        self._age.clear()

    def __len__(self) -> int:
        return len(self._z)

    @property
    def nbytes(self) -> int:
        """Bytes the cached Z take."""
        return sum(z.numel() * z.element_size() for z in self._z.values())
