"""Backbones from timm, by name, with optional weights from a local file."""

from __future__ import annotations

import difflib
import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from torch import Tensor, nn

from .conv import use_stride_safe_convolutions
from .errors import ConfigError, require_count

Pretrained = str | Path | bool | None
#: How PatchGD's projection to Z and its head's linear layer start: ``"default"``, PyTorch's
#: (uniform ±1/√fan_in); ``"fan_out"``, uniform ±1/√fan_out with zero bias, as timm starts the
#: classifiers of MobileNet and EfficientNet (see :func:`fan_out_init`).
LinearInit = Literal["default", "fan_out"]
#: The memory format a backbone's convolutions run in: ``True`` channels-last on every device,
#: ``False`` as the images come (contiguous), ``None`` channels-last on the CPU only. On the CPU
#: (oneDNN) channels-last trained every backbone measured (ResNet18/50, EfficientNet-B0,
#: MobileNetV2/V3) 1.04–1.76× as fast in fp32, PatchGD and GD alike (docs/benchmarks.md, "One
#: training step"); on GPUs it is unmeasured here.
ChannelsLast = bool | None


def in_backbone_layout(images: Tensor, channels_last: ChannelsLast) -> Tensor:
    """``images`` (``(B, C, H, W)``) in the memory format that ``channels_last`` names for
    their device. The values are unchanged; a convolution given channels-last input runs its
    channels-last kernels, and its output, and so every later layer, stays channels-last."""
    wanted = images.device.type == "cpu" if channels_last is None else channels_last
    if not wanted or images.dim() != 4 or images.stride(1) == 1:
        return images  # channels-last already: the channels of a pixel lie side by side
    # A copy with channels-last strides, which a convolution reads to pick its kernels.
    # Not .contiguous(memory_format=...): it returns a one-channel batch as it is, since that
    # counts as channels-last contiguous whatever its strides say.
    return torch.empty_like(images, memory_format=torch.channels_last).copy_(images)


def fan_out_init(layer: nn.Linear) -> None:
    """Uniform ±1/√fan_out weights and zero bias: timm's classifier init for MobileNets.

    For a layer that narrows (fan_out < fan_in, e.g. 1 024 pooled features to 32 latent
    channels) this starts far larger than PyTorch's default, so the backbone's features reach
    the logits at init as strongly as they do through GD's timm classifier.
    """
    bound = 1.0 / math.sqrt(layer.out_features)
    nn.init.uniform_(layer.weight, -bound, bound)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


@lru_cache(maxsize=1)
def _all_model_names() -> tuple[str, ...]:
    return tuple(timm.list_models())


def check_backbone_name(name: str) -> None:
    """Raise :class:`ConfigError` naming close matches when timm does not know ``name``."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, _all_model_names(), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise ConfigError(f"backbone={name!r} is not a timm model{hint}")


def create_backbone(
    name: str,
    *,
    num_classes: int = 0,
    image_size: int | tuple[int, int] | None = None,
    in_chans: int = 3,
    pretrained: Pretrained = None,
    channels_last: ChannelsLast = None,
    **kwargs: Any,
) -> nn.Module:
    """Build timm model ``name``.

    Args:
        name: any ``timm.list_models()`` name (CNNs, ViTs such as ``deit_small_patch16_224``).
        num_classes: 0 returns pooled features of width ``model.num_features``.
        image_size: input size for models that are built for one (ViTs: position embeddings);
            ignored by models that take any size (CNNs).
        in_chans: input channels (1 for grayscale).
        pretrained: a local weights file (``.pth``, ``.bin``, ``.safetensors``) loaded through
            timm, which adapts the classifier, ``in_chans`` and ViT position embeddings; ``True``
            downloads timm's default weights (needs a network); ``None``/``False``: random init.
        channels_last: ``True`` stores the weights channels-last (the pixels' layout is set
            per call by :func:`in_backbone_layout`); ``None`` and ``False`` leave them as built.
        **kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``, ``norm_layer``).

    Strided convolutions become :class:`~patchgd.conv.StrideSafeConv2d` (same function and
    weights), which avoids a oneDNN bf16 gradient defect on small feature maps.
    """
    model = use_stride_safe_convolutions(
        _create(name, num_classes, image_size, in_chans, pretrained, **kwargs)
    )
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _create(
    name: str,
    num_classes: int,
    image_size: int | tuple[int, int] | None,
    in_chans: int,
    pretrained: Pretrained,
    **kwargs: Any,
) -> nn.Module:
    check_backbone_name(name)
    require_count("in_chans", in_chans)
    load: dict[str, Any] = {"pretrained": False}
    if isinstance(pretrained, str | Path):
        path = Path(pretrained)
        if not path.is_file():
            raise ConfigError(f"pretrained weights file not found: {path}")
        load = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}
    elif pretrained:
        load = {"pretrained": True}
    args = dict(num_classes=num_classes, in_chans=in_chans, **load, **kwargs)
    if image_size is not None:
        try:
            return timm.create_model(name, img_size=image_size, **args)
        except TypeError as err:  # CNNs take any input size and have no img_size argument
            if "img_size" not in str(err):
                raise
    try:
        return timm.create_model(name, **args)
    except (RuntimeError, OSError, ValueError) as err:
        if isinstance(pretrained, str | Path):
            raise ConfigError(f"cannot load pretrained weights from {pretrained}: {err}") from err
        raise
