"""Plain gradient-descent baselines on the same backbones, for honest comparisons with PatchGD.

- :class:`GDClassifier`: the whole image through the backbone, pooled, linear classifier (GD).
- :class:`GDExtendedClassifier`: the backbone's feature map through the same head as PatchGD
  (the paper's GD-extended), so a gain of PatchGD cannot be put down to its extra head.
- :class:`DownscaledGDClassifier`: GD on the image resized down to ``input_size``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .algorithm import gd_train_step  # noqa: F401 - public here too, beside the baselines
from .backbones import ChannelsLast, Pretrained, create_backbone, in_backbone_layout
from .errors import ConfigError, from_data, require_count
from .grid import as_pair
from .head import HeadConfig
from .model import Classifier


class GDClassifier(Classifier):
    """The backbone on the full image with its own pooling and a linear classifier.

    Args:
        backbone: timm model name.
        num_classes: number of classes.
        image_size: input size; needed by ViTs (position embeddings), ignored by CNNs.
        in_chans: image channels.
        pretrained: local weights file (or ``True`` for timm's hub weights).
        backbone_kwargs: extra ``timm.create_model`` arguments (``num_classes`` here overrides
            the backbone's own classifier width, e.g. 0 for pooled features).
        freeze_bn: keep the backbone's BatchNorm in eval mode while training (see
            :meth:`~patchgd.model.Classifier.train`).
        grad_checkpointing: activation checkpointing (timm's ``set_grad_checkpointing``): the
            backbone keeps only its stages' inputs and recomputes the rest in the backward
            pass, so larger images fit in the same memory at the cost of time. The honest rival
            of PatchGD under a budget.
        micro_batch: gradient accumulation: each training batch is forwarded in micro-batches
            of at most this many images whose gradients add up to the whole batch's, for one
            optimizer step. Memory is a micro-batch's; BatchNorm in training mode normalises
            each micro-batch with its own statistics. ``None``: the whole batch at once.
        channels_last: the memory format the backbone runs in, as PatchGD's encoder
            (:data:`~patchgd.backbones.ChannelsLast`; by default channels-last on the CPU).
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int | None = None,
        image_size: int | tuple[int, int] | None = None,
        *,
        in_chans: int = 3,
        pretrained: Pretrained = None,
        backbone_kwargs: dict[str, Any] | None = None,
        freeze_bn: bool = False,
        grad_checkpointing: bool = False,
        micro_batch: int | None = None,
        channels_last: ChannelsLast = None,
    ) -> None:
        super().__init__()
        num_classes = from_data(type(self).__name__, "num_classes", num_classes)
        image_size = from_data(type(self).__name__, "image_size", image_size)
        if num_classes < 2:
            raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
        self.num_classes, self.in_chans = num_classes, in_chans
        self.image_size = self.input_size = as_pair(image_size, "image_size")
        self.backbone = create_backbone(
            backbone,
            image_size=self.input_size,
            in_chans=in_chans,
            pretrained=pretrained,
            channels_last=channels_last,
            **{"num_classes": num_classes, **(backbone_kwargs or {})},
        )
        self.freeze_bn = freeze_bn
        self.grad_checkpointing = grad_checkpointing
        if micro_batch is not None:
            micro_batch = require_count("micro_batch", micro_batch)
        self.micro_batch = micro_batch
        self.channels_last = channels_last
        if grad_checkpointing:
            try:
                self.backbone.set_grad_checkpointing(True)
            except (AttributeError, NotImplementedError, AssertionError) as err:
                raise ConfigError(
                    f"grad_checkpointing: timm's {backbone} does not support activation "
                    f"checkpointing ({err or type(err).__name__})"
                ) from None
        self.train(self.training)

    def backbone_module(self) -> nn.Module:
        return self.backbone

    def head_module(self) -> nn.Module:
        return self.backbone.get_classifier()  # timm's last layer

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(in_backbone_layout(images, self.channels_last))


class DownscaledGDClassifier(GDClassifier):
    """GD on images resized (antialiased bilinear) from ``image_size`` down to ``input_size``."""

    plans_input_size = True

    def __init__(
        self,
        backbone: str,
        num_classes: int | None = None,
        image_size: int | tuple[int, int] | None = None,
        input_size: int | tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> None:
        if input_size is None:
            raise ConfigError(f"{type(self).__name__}: input_size must be given")
        super().__init__(backbone, num_classes, input_size, **kwargs)
        image_size = from_data(type(self).__name__, "image_size", image_size)
        self.image_size = as_pair(image_size, "image_size")  # what it takes; input_size: sees

    def forward(self, images: Tensor) -> Tensor:
        if tuple(images.shape[-2:]) != self.input_size:
            images = F.interpolate(
                images, size=self.input_size, mode="bilinear", antialias=True, align_corners=False
            )
        return self.backbone(in_backbone_layout(images, self.channels_last))


class GDExtendedClassifier(GDClassifier):
    """The backbone's last feature map, projected to ``latent_dim``, through PatchGD's head.

    The feature map plays the role of Z: a 1×1 convolution maps its channels to ``latent_dim``
    and :class:`~patchgd.head.LatentHead` classifies it. ViT tokens are reshaped to their grid.
    ``latent_dim`` and ``head`` are as PatchGD's; every other argument is
    :class:`GDClassifier`'s.
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int | None = None,
        image_size: int | tuple[int, int] | None = None,
        *,
        latent_dim: int = 256,
        head: HeadConfig | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        require_count("latent_dim", latent_dim)
        backbone_kwargs = {**(backbone_kwargs or {}), "num_classes": 0}  # features only
        super().__init__(
            backbone, num_classes, image_size, backbone_kwargs=backbone_kwargs, **kwargs
        )
        with torch.device("meta"):  # the feature map's shape, without allocating anything
            probe = create_backbone(
                backbone, image_size=self.input_size, in_chans=self.in_chans, **backbone_kwargs
            )
            shape = _feature_map(probe, torch.empty(1, self.in_chans, *self.input_size)).shape
        self.proj = nn.Conv2d(shape[1], latent_dim, kernel_size=1)
        self.head = (head or HeadConfig()).build(latent_dim, self.num_classes, (shape[2], shape[3]))

    def head_module(self) -> nn.Module:
        return nn.ModuleList([self.proj, self.head])

    def forward(self, images: Tensor) -> Tensor:
        images = in_backbone_layout(images, self.channels_last)
        return self.head(self.proj(_feature_map(self.backbone, images)))


def _feature_map(backbone: nn.Module, images: Tensor) -> Tensor:
    """The backbone's last feature map as ``(B, C, h, w)``."""
    features = backbone.forward_features(images)
    if features.dim() == 4:
        if getattr(backbone, "output_fmt", "NCHW") == "NHWC":
            features = features.permute(0, 3, 1, 2)
        return features
    patch_embed = getattr(backbone, "patch_embed", None)
    if features.dim() == 3 and patch_embed is not None:  # ViT tokens: (B, prefix + h·w, C)
        prefix = getattr(backbone, "num_prefix_tokens", 0)
        h, w = (
            patch_embed.dynamic_feat_size(images.shape[-2:])
            if hasattr(patch_embed, "dynamic_feat_size")
            else patch_embed.grid_size
        )
        tokens = features[:, prefix:]
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
    raise ConfigError(
        f"cannot read a spatial feature map from {type(backbone).__name__} "
        f"(forward_features gave shape {tuple(features.shape)}); GD-extended needs a CNN or ViT"
    )
