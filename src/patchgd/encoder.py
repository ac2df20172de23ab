"""The patch encoder f_θ1: a timm backbone whose pooled features are projected to ``latent_dim``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .backbones import ChannelsLast, Pretrained, create_backbone, in_backbone_layout
from .batchnorm import keep_modes
from .errors import require_count


class PatchEncoder(nn.Module):
    """Encodes a batch of patches ``(n, C, p, p)`` into embeddings ``(n, latent_dim)``.

    The backbone is any timm model, built for ``patch_size`` inputs (ViTs get
    ``img_size=patch_size``), with its classifier removed; its globally pooled features go
    through ``Linear(num_features, latent_dim)``, as the paper's ResNet50 with its classifier
    replaced by ``Linear(2048, D)``.

    Args:
        backbone: timm model name, e.g. ``"resnet50"``, ``"mobilenetv2_100"``,
            ``"deit_tiny_patch16_224"``.
        patch_size: side of the square patches the encoder receives.
        latent_dim: D, the channels of the latent grid Z (the paper uses 256).
        in_chans: image channels.
        pretrained: local weights file, ``True`` for timm's hub weights, or ``None``.
        channels_last: the memory format the backbone runs in (:data:`~patchgd.backbones.
            ChannelsLast`; by default channels-last on the CPU). ``True`` also stores the
            backbone's weights channels-last.
        **backbone_kwargs: passed to ``timm.create_model``.
    """

    def __init__(
        self,
        backbone: str,
        patch_size: int,
        latent_dim: int = 256,
        in_chans: int = 3,
        pretrained: Pretrained = None,
        channels_last: ChannelsLast = None,
        **backbone_kwargs: Any,
    ) -> None:
        super().__init__()
        require_count("latent_dim", latent_dim)
        self.backbone_name = backbone
        self.patch_size = patch_size
        self.latent_dim = latent_dim
        self.in_chans = in_chans
        self.backbone = create_backbone(
            backbone,
            num_classes=0,
            image_size=patch_size,
            in_chans=in_chans,
            pretrained=pretrained,
            channels_last=channels_last,
            **backbone_kwargs,
        )
        # Some heads (MobileNetV3, GhostNet, VGG) widen the pooled features with a conv_head.
        width = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.proj = nn.Linear(width, latent_dim)
        self._largest_activation: int | None = None
        self.channels_last = channels_last

    def forward(self, patches: Tensor) -> Tensor:
        return self.proj(self.backbone(in_backbone_layout(patches, self.channels_last)))

    def largest_activation(self) -> int:
        """Elements of the backbone's largest layer output for one patch (the outputs of its
        leaf modules; what a layer computes inside, such as a ViT's attention scores, is not
        seen).

        The speed of a fill call on the CPU follows this size times the patches per call, not
        their pixels (docs/benchmarks.md, "Fill chunk"). Measured once, by an inference
        forward of one blank patch with the backbone's layers hooked; modes, statistics and
        random streams are left as they were.
        """
        if self._largest_activation is None:
            sizes = [0]

            def record(module: nn.Module, args: object, out: object) -> None:
                if isinstance(out, Tensor):
                    sizes.append(out.numel())

            leaves = [m for m in self.backbone.modules() if next(m.children(), None) is None]
            handles = [m.register_forward_hook(record) for m in leaves]
            weight = next(self.backbone.parameters())
            blank = weight.new_zeros(1, self.in_chans, self.patch_size, self.patch_size)
            try:
                with keep_modes(self.backbone), torch.no_grad():
                    self.backbone.eval()
                    self.backbone(in_backbone_layout(blank, self.channels_last))
            finally:
                for handle in handles:
                    handle.remove()
            self._largest_activation = max(sizes)
        return self._largest_activation
