"""PatchGD as one module: grid, encoder, head, inner-loop settings and sampler together."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .algorithm import (
    FillNorm,
    InnerLoopConfig,
    StepHooks,
    StepResult,
    check_fill_norm,
    fill_z,
    gd_train_step,
    infer,
    keep_modes,
    valid_positions,
)
from .algorithm import train_step as patchgd_train_step
from .backbones import ChannelsLast, LinearInit, Pretrained, fan_out_init
from .batchnorm import recalibrating
from .encoder import PatchEncoder
from .errors import ConfigError, from_data, require_count
from .grid import PadValue, PatchGrid
from .head import HeadConfig, evidence, read_head
from .latent_cache import LatentCache
from .patches import PatchProvider, as_patches, extents_of
from .sampler import PatchSampler, RandomPatchSampler

LossFn = Callable[[Tensor, Tensor], Tensor]

#: Elements of the backbone's largest layer output per encoder call while filling Z, by device
#: type, when ``fill_chunk`` is not given: the default chunk is as many patches as keep a call's
#: largest activation at this size (at least one). On the CPU a call's speed follows that size,
#: not its patch count nor its pixels: calls whose largest activation is about 16 MiB in fp32
#: filled fastest for ResNet18/50, EfficientNet-B0 and MobileNetV3 alike, which is 262 144 px
#: of patches for ResNet50 and 1 M px for MobileNetV3-small; much larger calls leave the
#: caches and the allocator's reused memory, much smaller ones leave the cores waiting on
#: per-call overhead. GPUs want large calls (docs/benchmarks.md, "Fill chunk").
DEFAULT_FILL_ACTIVATION: dict[str, int] = {"cpu": 2**22, "cuda": 2**28}


#: The precision of the Z-fill: a dtype name (``"bfloat16"``, ``"float16"``), or ``None``.
FillDtype = Literal["bfloat16", "float16"] | None


def _fill_dtype(name: FillDtype | torch.dtype) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in ("bfloat16", "float16"):
        raise ConfigError(f"fill_dtype must be 'bfloat16', 'float16' or None, got {name!r}")
    return getattr(torch, name)


def default_fill_chunk(largest_activation: int, device: torch.device | str) -> int:
    """Patches per fill call on ``device`` when none is given, for an encoder whose largest
    layer output has ``largest_activation`` elements per patch
    (:meth:`~patchgd.encoder.PatchEncoder.largest_activation`): :data:`DEFAULT_FILL_ACTIVATION`
    divided by it, at least one."""
    kind = torch.device(device).type
    budget = DEFAULT_FILL_ACTIVATION.get(kind, DEFAULT_FILL_ACTIVATION["cuda"])
    return max(1, budget // max(1, largest_activation))


class Classifier(nn.Module):
    """What PatchGD and the baselines share, and all that the application, the planner and the
    demo may ask of a model: logits from images, one training step, and the facts below."""

    #: Whether the backbone's BatchNorm layers stay in eval mode when the model trains.
    freeze_bn: bool = False
    #: Image channels the model takes (set by every subclass).
    in_chans: int
    #: Classes it predicts (set by every subclass).
    num_classes: int
    #: Whether it takes a :class:`~patchgd.patches.PatchProvider` (images read patch by patch,
    #: e.g. lazily from disk) wherever it takes an image tensor.
    reads_patches: bool = False
    #: ``(height, width)`` of the images it takes from the data (set by every subclass).
    image_size: tuple[int, int]
    #: ``(height, width)`` its backbone sees: ``image_size`` except for downscaled GD.
    input_size: tuple[int, int]
    #: Whether a memory planner chooses ``input_size`` (downscaled GD: the largest that fits).
    plans_input_size: bool = False
    #: Gradient accumulation: images per forward pass within a batch (``None``: the whole batch).
    micro_batch: int | None = None
    #: The memory format its backbone runs in (:data:`~patchgd.backbones.ChannelsLast`).
    channels_last: ChannelsLast = None

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps one :meth:`training_step` takes (PatchGD: ceil(ζ / ε))."""
        return 1

    @property
    def trains_on_running_statistics(self) -> bool:
        """Whether training reads BatchNorm running statistics that
        :meth:`recalibrate_batchnorm` sets (PatchGD's Z-fill with ``fill_norm="running"``).
        Where it does not, recalibrating between epochs changes no weight: only evaluation
        reads those statistics."""
        return False

    def backbone_module(self) -> nn.Module:
        """The pretrainable feature extractor, whose BatchNorm ``freeze_bn`` freezes."""
        raise NotImplementedError

    def head_module(self) -> nn.Module:
        """The layers after the backbone's features, which ``head_lr`` trains."""
        raise NotImplementedError

    def param_groups(self, encoder_lr: float, head_lr: float) -> Sequence[dict[str, Any]]:
        """Optimizer parameter groups: the backbone at ``encoder_lr``, the rest at ``head_lr``.

        Every parameter is in exactly one group.
        """
        head = list(self.head_module().parameters())
        ids = {id(p) for p in head}
        encoder = [p for p in self.parameters() if id(p) not in ids]
        return [
            {"params": encoder, "lr": encoder_lr, "name": "encoder"},
            {"params": head, "lr": head_lr, "name": "head"},
        ]

    def predict_with_map(
        self, images: Tensor, candidates: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Class probabilities (as :meth:`predict_proba`) and a ``(B, rows, cols)`` map of each
        position's evidence for the predicted class, or ``None`` for models without one.
        ``candidates`` (patch models only): the positions that hold the image."""
        return self.predict_proba(images), None

    def train(self, mode: bool = True) -> Classifier:
        """As :meth:`torch.nn.Module.train`, except that with ``freeze_bn`` the backbone's
        BatchNorm layers stay in eval mode: they normalise with their running statistics and
        leave them unchanged, while their affine weights still train. The usual choice for a
        pretrained backbone trained with tiny batches (streaming CNNs freeze it too)."""
        super().train(mode)
        if mode and self.freeze_bn:
            for module in self.backbone_module().modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def predict_proba(self, images: Tensor) -> Tensor:
        """Class probabilities ``(B, num_classes)``, computed in eval mode without gradients."""
        with keep_modes(self), torch.no_grad():
            self.eval()
            return self(images).float().softmax(dim=1)

    def training_step(
        self,
        images: Tensor,
        targets: Tensor,
        optimizer: torch.optim.Optimizer,
        *,
        loss_fn: LossFn = F.cross_entropy,
        hooks: StepHooks | None = None,
        keys: Sequence[Hashable] | None = None,
    ) -> StepResult:
        """One training step on a batch: here plain gradient descent on the whole image
        (:func:`~patchgd.algorithm.gd_train_step`, in ``micro_batch`` slices), which PatchGD
        overrides. ``keys`` name the images (e.g. their indices in the data set), for models
        that keep state per image (PatchGD's Z reuse); GD ignores them."""
        return gd_train_step(
            self,
            images,
            targets,
            optimizer,
            loss_fn=loss_fn,
            hooks=hooks,
            micro_batch=self.micro_batch,
        )

    def recalibrate_batchnorm(self, batches: Sequence[Tensor]) -> None:
        """Set the running statistics of every trainable BatchNorm layer to those of ``batches``.

        Run a few training batches (a few hundred images' worth is plenty) through this before
        evaluating: eval mode then normalises with statistics of the current weights, not a
        lagging average of earlier ones (see :mod:`patchgd.batchnorm`). Layers frozen by
        ``freeze_bn`` are left alone; weights, gradients and train/eval modes are unchanged.
        """
        with keep_modes(self):
            self.train()  # freeze_bn keeps its layers in eval mode: they are skipped
            with recalibrating(self):
                for images in batches:
                    self(images)


class PatchGDClassifier(Classifier):
    """An image classifier trained by Patch Gradient Descent.

    Args:
        backbone: timm model name of the patch encoder.
        num_classes: number of classes.
        image_size: ``(height, width)`` (or one int) of the input images. Both may be left
            out (or ``null``) in a config for ``patchgd fit``, which takes them from the data
            (:func:`patchgd.errors.from_data`); any other caller must give them.
        patch_size: side of a square patch, in pixels.
        stride: patch stride (defaults to ``patch_size``; smaller values overlap patches).
        pad_value: fill for the bottom/right padding when patches do not tile the image exactly.
        latent_dim: D, channels of the latent grid Z.
        in_chans: image channels.
        pretrained: local weights file for the backbone (or ``True`` for timm's hub weights).
        head: shape of the head on Z (the paper's head by default).
        loop: k, ζ, ε and the visit cap (:class:`InnerLoopConfig`).
        sampler: the patch sampler (uniform, per image, by default).
        fill_chunk: most patches encoded at once while filling Z; by default
            :func:`default_fill_chunk` for the encoder's largest activation and its device.
        fill_norm: BatchNorm during the fill in training, ``"running"`` (its running
            statistics, as inference) or ``"batch"`` (each fill chunk's); see
            :func:`patchgd.algorithm.fill_mode`.
        fill_dtype: ``"bfloat16"`` runs every Z-fill (training and inference) under bf16
            autocast, Z kept in float32: the fast path on GPUs and on CPUs with AVX512-BF16 or
            AMX (docs/benchmarks.md). ``None``: the caller's precision.
        freeze_bn: keep the encoder's BatchNorm in eval mode while training (running
            statistics everywhere, never updated; see :meth:`Classifier.train`). The fill then
            uses running statistics whatever ``fill_norm`` says. With nothing to renormalise
            them, the encoder's features can shrink until Z no longer tells images apart: give
            the encoder a lower learning rate (``docs/reproduction.md``).
        linear_init: how the encoder's projection to Z and the head's last linear layer start
            (:data:`~patchgd.backbones.LinearInit`).
        channels_last: the memory format the encoder runs in: by default channels-last on the
            CPU, where it trained 1.04–1.46× as fast in fp32 (docs/benchmarks.md), and the
            images' own elsewhere; ``True``: channels-last everywhere, weights included;
            ``False``: the images' own (:data:`~patchgd.backbones.ChannelsLast`).
        compile_encoder: compile the patch encoder with ``torch.compile`` (in place, so the
            state dict and checkpoints are unchanged). The first steps pay the compile (1–2
            minutes for ResNet50 on two CPU cores); measured in docs/benchmarks.md, off by
            default. Every compiled model in a process adds to dynamo's recompile limit (8 per
            code object, beyond which it runs eager): compile one model per process.
        z_refresh_every: Z reuse: fill an image's Z on one visit in this many, and otherwise
            start from the Z its previous visit left (:class:`~patchgd.latent_cache.
            LatentCache`; 1, the default, fills at every step as the paper). Needs the images'
            ``keys`` in :meth:`training_step`.
        seed: seed of the default sampler.
        backbone_kwargs: extra ``timm.create_model`` arguments.

    ``model(images)`` gives inference logits (Z filled without gradients, head run once);
    train with :meth:`training_step`. The sampler's random state is part of ``state_dict()``.
    """

    reads_patches = True  # images or a PatchProvider (lazy images) alike

    def __init__(
        self,
        backbone: str,
        num_classes: int | None = None,
        image_size: int | tuple[int, int] | None = None,
        patch_size: int | None = None,
        *,
        stride: int | None = None,
        pad_value: PadValue = 0.0,
        latent_dim: int = 256,
        in_chans: int = 3,
        pretrained: Pretrained = None,
        head: HeadConfig | None = None,
        loop: InnerLoopConfig | None = None,
        sampler: PatchSampler | None = None,
        fill_chunk: int | None = None,
        fill_norm: FillNorm = "running",
        fill_dtype: FillDtype = None,
        freeze_bn: bool = False,
        linear_init: LinearInit = "default",
        channels_last: ChannelsLast = None,
        compile_encoder: bool = False,
        z_refresh_every: int = 1,
        seed: int = 0,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        num_classes = from_data(type(self).__name__, "num_classes", num_classes)
        image_size = from_data(type(self).__name__, "image_size", image_size)
        if patch_size is None:
            raise ConfigError(f"{type(self).__name__}: patch_size must be given")
        self.grid = PatchGrid(image_size, patch_size, stride, pad_value)
        self.loop_config = loop or InnerLoopConfig()
        self.loop = self.loop_config.resolve(self.grid.num_patches)  # fail early
        check_fill_norm(fill_norm)
        self.fill_chunk: int | None = None
        self.configure_loop(fill_chunk=fill_chunk)
        self.fill_norm: FillNorm = fill_norm
        self.fill_dtype = _fill_dtype(fill_dtype)
        self.num_classes, self.in_chans = num_classes, in_chans
        self.encoder = PatchEncoder(
            backbone,
            patch_size,
            latent_dim,
            in_chans,
            pretrained,
            channels_last,
            **(backbone_kwargs or {}),
        )
        self.head = (head or HeadConfig()).build(latent_dim, num_classes, self.grid.shape)
        if linear_init == "fan_out":
            fan_out_init(self.encoder.proj)
            fan_out_init(self.head.fc)
        elif linear_init != "default":
            raise ConfigError(f"linear_init must be 'default' or 'fan_out', got {linear_init!r}")
        if compile_encoder:
            self.encoder.compile()
        self.sampler = sampler or RandomPatchSampler(seed)
        self.latent_cache = LatentCache(z_refresh_every)
        self.freeze_bn = freeze_bn
        self.train(self.training)

    def configure_loop(
        self, loop: InnerLoopConfig | None = None, *, fill_chunk: int | None = None
    ) -> None:
        """Change k, ζ, ε or the visit cap (``loop``) and the fill chunk, checked as at init."""
        if loop is not None:
            resolved = loop.resolve(self.grid.num_patches)
            self.loop_config, self.loop = loop, resolved
        if fill_chunk is not None:
            self.fill_chunk = require_count("fill_chunk", fill_chunk)

    @property
    def image_size(self) -> tuple[int, int]:  # type: ignore[override]
        return self.grid.image_size

    @property
    def input_size(self) -> tuple[int, int]:  # type: ignore[override]
        return self.grid.image_size  # the patches come from the whole image

    @property
    def channels_last(self) -> ChannelsLast:  # type: ignore[override]
        return self.encoder.channels_last  # only the encoder runs convolutions on pixels

    @channels_last.setter
    def channels_last(self, value: ChannelsLast) -> None:
        self.encoder.channels_last = value

    @property
    def optimizer_steps(self) -> int:
        return self.loop.optimizer_steps

    @property
    def trains_on_running_statistics(self) -> bool:
        # Frozen layers (freeze_bn) keep statistics that recalibration leaves alone.
        return self.fill_norm == "running" and not self.freeze_bn

    def backbone_module(self) -> nn.Module:
        return self.encoder

    def head_module(self) -> nn.Module:
        return self.head

    def predict_with_map(
        self, images: Tensor, candidates: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Class probabilities and each position's evidence for the predicted class, from one
        fill (see :func:`patchgd.head.evidence`); ``candidates`` as in :meth:`forward`."""
        patches = as_patches(images, self.grid)
        with keep_modes(self):
            self.eval()
            with torch.no_grad():
                z = self.fill_z(patches, candidates)
            valid = valid_positions(candidates, self.grid, z.device)
            return evidence(self.head, z, valid, extents_of(patches))

    def chunk_for(self, device: torch.device | str | None = None) -> int:
        """The fill chunk used on ``device`` (default: the encoder's)."""
        if self.fill_chunk is not None:
            return self.fill_chunk
        if device is None:
            device = next(self.encoder.parameters()).device
        return default_fill_chunk(self.encoder.largest_activation(), device)

    def fill_z(self, images: Tensor | PatchProvider, candidates: Tensor | None = None) -> Tensor:
        """Algorithm 2 with the current encoder: Z of shape ``(B, D, rows, cols)``.

        With ``candidates`` only those patches are encoded (see :func:`patchgd.algorithm.fill_z`).
        """
        return fill_z(
            self.encoder,
            images,
            self.grid,
            self.chunk_for(),
            self.fill_norm,
            dtype=self.fill_dtype,
            candidates=candidates,
        )

    def forward(self, images: Tensor | PatchProvider, candidates: Tensor | None = None) -> Tensor:
        """Logits in eval mode; pass the ``candidates`` the model trained with, if any."""
        return infer(
            self.encoder,
            self.head,
            self.grid,
            images,
            self.chunk_for(),
            self.fill_dtype,
            candidates=candidates,
        )

    def training_step(
        self,
        images: Tensor | PatchProvider,
        targets: Tensor,
        optimizer: torch.optim.Optimizer,
        *,
        loss_fn: LossFn = F.cross_entropy,
        hooks: StepHooks | None = None,
        candidates: Tensor | None = None,
        keys: Sequence[Hashable] | None = None,
    ) -> StepResult:
        """One outer step of Algorithm 1 on a batch; see :func:`patchgd.algorithm.train_step`.

        ``images`` is a ``(B, C, H, W)`` batch or a
        :class:`~patchgd.patches.PatchProvider` (images read lazily from disk).
        ``candidates`` optionally restricts, per image, the positions the fill encodes and the
        sampler may pick (a ``(B, rows·cols)`` boolean mask, e.g. tissue patches); the other
        positions of Z hold the image's background embedding. ``keys`` name the images
        (e.g. their indices in the data set) for Z reuse (``z_refresh_every``).
        """
        cached = None if keys is None else self.latent_cache.lookup(keys)
        if cached is not None:
            cached = cached.to(next(self.head.parameters()).device)
        result = patchgd_train_step(
            self.encoder,
            self.head,
            self.grid,
            images,
            targets,
            optimizer,
            self.loop_config,
            self.sampler,
            loss_fn=loss_fn,
            fill_chunk=self.chunk_for(),
            fill_norm=self.fill_norm,
            fill_dtype=self.fill_dtype,
            candidates=candidates,
            hooks=hooks,
            z=cached,
        )
        if keys is not None and result.z is not None:
            self.latent_cache.store(keys, result.z, filled=cached is None)
        return result

    def recalibrate_batchnorm(
        self,
        batches: Sequence[Tensor | PatchProvider],
        candidates: Sequence[Tensor | None] | None = None,
    ) -> None:
        """As :meth:`Classifier.recalibrate_batchnorm`, in the order inference uses the layers.

        The encoder's layers get the statistics of every patch of ``batches`` that inference
        encodes, in fill chunks: every patch, or with ``candidates`` (one mask or ``None`` per
        batch) the candidates and one blank patch per image. Then Z is filled as at inference
        (the encoder in eval mode, with its new statistics) and the head's layers get the
        statistics of that Z.
        """
        chunk = self.chunk_for()
        masks = list(candidates) if candidates is not None else [None] * len(batches)
        if len(masks) != len(batches):
            raise ConfigError(f"got {len(masks)} candidate masks for {len(batches)} batches")
        with keep_modes(self):
            self.train()
            with recalibrating(self.encoder):
                for images, mask in zip(batches, masks, strict=True):
                    fill_z(self.encoder, images, self.grid, chunk, None, candidates=mask)
            self.encoder.eval()
            with recalibrating(self.head):
                for images, mask in zip(batches, masks, strict=True):
                    patches = as_patches(images, self.grid)
                    z = fill_z(
                        self.encoder,
                        patches,
                        self.grid,
                        chunk,
                        dtype=self.fill_dtype,
                        candidates=mask,
                    )
                    valid = valid_positions(mask, self.grid, z.device)
                    read_head(self.head, z, valid, extents_of(patches))

    def get_extra_state(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
