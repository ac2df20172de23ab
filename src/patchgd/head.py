"""The classifier head g_θ2 that reads the whole latent grid Z."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from .conv import StrideSafeConv2d
from .errors import ConfigError

Norm = Literal["batch", "group", "none"]
Pool = Literal["flatten", "avg"]

#: Largest input the final linear layer may have with ``pool="flatten"``: beyond this the head
#: does not reduce the grid enough and would be mostly one huge matrix.
MAX_FLAT_FEATURES = 1 << 20


def _reduced(size: int, stride2_layers: int) -> int:
    # Conv3×3, padding 1, stride 2 maps n to ceil(n / 2).
    for _ in range(stride2_layers):
        size = (size + 1) // 2
    return size


class LatentHead(nn.Module):
    """Convolutions over Z ``(B, D, rows, cols)``, then a linear layer to class logits.

    The default is the paper's head: one stride-1 and three stride-2 3×3 convolutions of 256
    channels, each Conv → ReLU → Norm → Dropout2d(0.2), then flatten and Linear.

    Args:
        latent_dim: D, channels of Z.
        num_classes: number of classes (at least 2).
        grid_shape: ``(rows, cols)`` of Z; fixes the linear layer's width when ``pool="flatten"``.
        width: channels of every convolution.
        stride1_layers: 3×3 stride-1 convolutions first (the paper's variants: 0, 1, 2).
        stride2_layers: 3×3 stride-2 convolutions after them; each halves the grid (rounding up).
        dropout: Dropout2d probability after each convolution.
        norm: ``"batch"`` (paper), ``"group"`` (GroupNorm, at most 32 groups of 2+ channels;
            independent of the batch size, so batches of one image train), or ``"none"``.
        pool: ``"flatten"`` (paper; the head then serves one grid shape) or ``"avg"`` (global
            average pooling; any grid shape, e.g. images of varying size at inference).
    """

    def __init__(
        self,
        latent_dim: int,
        num_classes: int,
        grid_shape: tuple[int, int],
        width: int = 256,
        stride1_layers: int = 1,
        stride2_layers: int = 3,
        dropout: float = 0.2,
        norm: Norm = "batch",
        pool: Pool = "flatten",
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
        if min(stride1_layers, stride2_layers) < 0 or width < 1:
            raise ConfigError(
                f"head layers and width must be non-negative/positive, got stride1_layers="
                f"{stride1_layers}, stride2_layers={stride2_layers}, width={width}"
            )
        if norm not in ("batch", "group", "none"):
            raise ConfigError(f"head norm must be 'batch', 'group' or 'none', got {norm!r}")
        if pool not in ("flatten", "avg"):
            raise ConfigError(f"head pool must be 'flatten' or 'avg', got {pool!r}")
        rows, cols = grid_shape
        if rows < 1 or cols < 1:
            raise ConfigError(f"grid_shape must be positive, got {grid_shape}")
        self.grid_shape = (rows, cols)
        self.norm = norm
        self.pool = pool

        layers: list[nn.Module] = []
        channels = latent_dim
        for stride in [1] * stride1_layers + [2] * stride2_layers:
            layers += [
                StrideSafeConv2d(channels, width, 3, stride=stride, padding=1),
                nn.ReLU(inplace=True),
                _norm_layer(norm, width),
                nn.Dropout2d(dropout),
            ]
            channels = width
        self.convs = nn.Sequential(*layers)
        self.out_shape = (_reduced(rows, stride2_layers), _reduced(cols, stride2_layers))
        if pool == "flatten":
            features = channels * self.out_shape[0] * self.out_shape[1]
            if features > MAX_FLAT_FEATURES:
                raise ConfigError(
                    f"the head cannot reduce a {rows}×{cols} latent grid: {stride2_layers} "
                    f"stride-2 layers leave {self.out_shape[0]}×{self.out_shape[1]}×{channels} = "
                    f"{features} features for the linear layer (max {MAX_FLAT_FEATURES}); "
                    "add stride2_layers or use pool='avg'"
                )
            self.pool_layer: nn.Module = nn.Flatten()
        else:
            features = channels
            self.pool_layer = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(features, num_classes)

    def forward(self, z: Tensor) -> Tensor:
        if self.pool == "flatten" and tuple(z.shape[-2:]) != self.grid_shape:
            raise ConfigError(
                f"the head was built for a {self.grid_shape[0]}×{self.grid_shape[1]} latent grid "
                f"but got {z.shape[-2]}×{z.shape[-1]}; build it for this grid or use pool='avg'"
            )
        if (
            self.training
            and self.norm == "batch"
            and len(self.convs) > 0
            and z.shape[0] * self.out_shape[0] * self.out_shape[1] == 1
        ):
            raise ConfigError(
                "head norm='batch' cannot train on a batch of 1 image whose grid reduces to 1×1; "
                "use a batch of 2 or more images or head norm='group'"
            )
        return self.fc(self.pool_layer(self.convs(z)))


def _norm_layer(norm: Norm, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        # At most 32 groups of at least 2 channels, so a 1×1 grid still normalises.
        groups = next((g for g in (32, 16, 8, 4, 2) if channels % g == 0 and channels >= 2 * g), 1)
        return nn.GroupNorm(groups, channels)
    return nn.Identity()


@dataclass(frozen=True)
class HeadConfig:
    """The head's shape without its input and output sizes; see :class:`LatentHead`."""

    width: int = 256
    stride1_layers: int = 1
    stride2_layers: int = 3
    dropout: float = 0.2
    norm: Norm = "batch"
    pool: Pool = "flatten"

    def build(self, latent_dim: int, num_classes: int, grid_shape: tuple[int, int]) -> LatentHead:
        return LatentHead(
            latent_dim,
            num_classes,
            grid_shape,
            width=self.width,
            stride1_layers=self.stride1_layers,
            stride2_layers=self.stride2_layers,
            dropout=self.dropout,
            norm=self.norm,
            pool=self.pool,
        )
