"""The classifier head g_θ2 that reads the whole latent grid Z."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .conv import StrideSafeConv2d
from .errors import ConfigError
from .grid import extent_mask

Norm = Literal["batch", "group", "none"]
Pool = Literal["flatten", "avg", "attention"]

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
        pool: ``"flatten"`` (paper; the head then serves one grid shape), ``"avg"`` (global
            average pooling; any grid shape, e.g. images of varying size at inference) or
            ``"attention"`` (gated attention-MIL pooling, :class:`GatedAttentionPool`; any grid
            shape, and :meth:`attention` gives each position's weight).
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
        if pool not in ("flatten", "avg", "attention"):
            raise ConfigError(f"head pool must be 'flatten', 'avg' or 'attention', got {pool!r}")
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
        elif pool == "attention":
            features = channels
            self.pool_layer = GatedAttentionPool(channels)
        else:
            features = channels
            self.pool_layer = MaskedAveragePool()
        self.fc = nn.Linear(features, num_classes)
        self.stride2_layers = stride2_layers

    def forward(
        self, z: Tensor, valid: Tensor | None = None, extent: Tensor | None = None
    ) -> Tensor:
        """Class logits ``(B, classes)`` from Z ``(B, D, rows, cols)``.

        ``valid`` (optional, ``(B, rows, cols)`` boolean): the positions that hold the image
        (tissue, not background or padding). The pooling heads read only those: the average
        is over them, and attention gives every other position exactly zero weight. After
        stride-2 convolutions a position counts as valid if its 3×3 footprint holds a valid
        one. An image without any valid position is read whole.

        ``extent`` (optional, ``(B, 2)`` integers): each image's own grid, ``rows × cols`` at
        the top-left of Z, for images smaller than Z's grid. Outside it Z is taken as absent:
        zero before every convolution (as their padding is) and never pooled, so an image's
        logits are those it would get alone on its own grid. The flatten head reads every
        position whatever ``valid`` and ``extent`` say: its layout is fixed.
        """
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
        if self.pool == "flatten":
            return self.fc(self.pool_layer(self.convs(z)))
        h, inside = self._convolve(z, extent)
        return self.fc(self.pool_layer(h, self._reduce_mask(valid, h, inside)))

    def attention(
        self, z: Tensor, valid: Tensor | None = None, extent: Tensor | None = None
    ) -> Tensor:
        """Each position's attention weight ``(B, rows', cols')``, summing to 1 per image and 0
        outside ``valid`` and ``extent`` (``pool="attention"`` only; the grid after the head's
        convolutions)."""
        return self.logits_and_attention(z, valid, extent)[1]

    def logits_and_attention(
        self, z: Tensor, valid: Tensor | None = None, extent: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """:meth:`forward`'s logits and :meth:`attention`'s weights from one pass."""
        if not isinstance(self.pool_layer, GatedAttentionPool):
            raise ConfigError(
                f"attention weights need pool='attention', this head has {self.pool!r}"
            )
        h, inside = self._convolve(z, extent)
        features, weights = self.pool_layer.pool(h, self._reduce_mask(valid, h, inside))
        return self.fc(features), weights

    def _convolve(self, z: Tensor, extent: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The convolutions over Z, and where each image's own grid lies on their output
        (``None``: everywhere). Outside an image's extent its input is zeroed before every
        convolution, as the convolution's zero padding would be on the image alone."""
        if extent is None:
            return self.convs(z), None
        extent = extent.to(z.device)
        h = z
        for layer in self.convs:
            if isinstance(layer, nn.Conv2d):
                h = h * extent_mask(extent, h.shape[-2:]).unsqueeze(1).to(h.dtype)
                if layer.stride[0] == 2:
                    extent = (extent + 1) // 2  # a 3×3, stride-2, padding-1 conv: ceil(n / 2)
            h = layer(h)
        return h, extent_mask(extent, h.shape[-2:])

    def _reduce_mask(
        self, valid: Tensor | None, h: Tensor, inside: Tensor | None = None
    ) -> Tensor | None:
        if valid is None:
            return inside
        mask = valid.to(device=h.device, dtype=torch.float32)[:, None]
        for _ in range(self.stride2_layers):  # the footprint of a 3×3, stride-2, padding-1 conv
            mask = F.max_pool2d(mask, 3, stride=2, padding=1)
        mask = mask[:, 0] > 0
        if inside is not None:
            mask = mask & inside
        whole = inside if inside is not None else torch.ones_like(mask)
        return torch.where(mask.flatten(1).any(dim=1)[:, None, None], mask, whole)  # none: all


class MaskedAveragePool(nn.Module):
    """The mean of ``h (B, C, rows, cols)`` over its positions, or over the ``valid`` ones."""

    def forward(self, h: Tensor, valid: Tensor | None = None) -> Tensor:
        if valid is None:
            return h.mean(dim=(-2, -1))
        # Summed in fp32: an fp16 sum over a large grid can overflow where a mean would not.
        weights = valid.to(torch.float32)[:, None]
        mean = (h.float() * weights).sum(dim=(-2, -1)) / weights.sum(dim=(-2, -1))
        return mean.to(h.dtype)


class GatedAttentionPool(nn.Module):
    """Gated attention-MIL pooling (Ilse, Tomczak and Welling, ICML 2018) over grid positions.

    Each position's feature h gets the score ``w · (tanh(V h) ⊙ sigmoid(U h))``; a softmax over
    the positions turns the scores into weights, and the output is the weighted sum of the
    features ``(B, C)``. Unlike the average, the weights let a few informative positions (an
    object among background) carry the image's features, and they are the heatmap of what
    the head reads.
    """

    def __init__(self, channels: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or max(channels // 2, 8)
        self.tanh_branch = nn.Conv2d(channels, hidden, 1)
        self.gate_branch = nn.Conv2d(channels, hidden, 1)
        self.score = nn.Conv2d(hidden, 1, 1)

    def weights(self, h: Tensor, valid: Tensor | None = None) -> Tensor:
        """Softmax weights ``(B, rows, cols)`` over the positions of ``h (B, C, rows, cols)``;
        exactly 0 outside ``valid`` (``(B, rows, cols)`` boolean, at least one per image)."""
        scores = self.score(self.tanh_branch(h).tanh() * self.gate_branch(h).sigmoid())[:, 0]
        if valid is not None:
            scores = scores.masked_fill(~valid, float("-inf"))
        return scores.flatten(1).softmax(dim=1).view_as(scores)

    def pool(self, h: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The pooled features ``(B, C)`` and the weights that pooled them."""
        weights = self.weights(h, valid)
        return (h * weights.unsqueeze(1)).sum(dim=(-2, -1)), weights

    def forward(self, h: Tensor, valid: Tensor | None = None) -> Tensor:
        return self.pool(h, valid)[0]


def read_head(
    head: nn.Module, z: Tensor, valid: Tensor | None = None, extent: Tensor | None = None
) -> Tensor:
    """``head(z)``, or ``head(z, valid, extent)`` for a :class:`LatentHead` (also inside a DDP
    wrapper) when there is a validity mask ``(B, rows, cols)`` or an extent ``(B, 2)`` per image;
    any other head module takes Z alone."""
    if (valid is None and extent is None) or not isinstance(
        getattr(head, "module", head), LatentHead
    ):
        return head(z)
    return head(z, valid, extent)


def evidence(
    head: nn.Module, z: Tensor, valid: Tensor | None = None, extent: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Class probabilities ``(B, classes)`` and each position's evidence ``(B, rows, cols)``.

    With an attention head the evidence is its attention weights (they sum to 1 per image over
    the head's grid; after stride-2 convolutions each Z position shows the weight of the head
    position whose 2^k × 2^k cell it falls in). With any other head it is each position's
    contribution to the predicted class's logit, gradient × input:
    ``Σ_d Z[d, r, c] · ∂logit/∂Z[d, r, c]``. For a head that is linear in Z (average pooling
    and one linear layer) this is exact: the map sums to the logit less its bias. Negative
    values are evidence against the predicted class. ``valid`` and ``extent`` as in
    :meth:`LatentHead.forward`.
    """
    if isinstance(head, LatentHead) and isinstance(head.pool_layer, GatedAttentionPool):
        with torch.no_grad():
            logits, weights = head.logits_and_attention(z, valid, extent)
            cell = 2**head.stride2_layers  # back onto Z's grid
            weights = weights.repeat_interleave(cell, 1).repeat_interleave(cell, 2)
            return logits.float().softmax(dim=1), weights[:, : z.shape[2], : z.shape[3]].float()
    # Lightning predicts under inference mode, whose tensors autograd refuses: leave it, and
    # take copies of Z and the mask made outside it.
    with torch.inference_mode(False), torch.enable_grad():
        z = z.detach().clone().requires_grad_(True)
        valid = None if valid is None else valid.clone()
        extent = None if extent is None else extent.clone()
        logits = read_head(head, z, valid, extent)
        chosen = logits.gather(1, logits.argmax(dim=1, keepdim=True))
        (grad,) = torch.autograd.grad(chosen.sum(), z)
    contribution = (grad * z).sum(dim=1)
    return logits.detach().float().softmax(dim=1), contribution.detach().float()


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
        return LatentHead(latent_dim, num_classes, grid_shape, **asdict(self))
