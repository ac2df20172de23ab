"""patchgd: train neural networks end to end on very large images with Patch Gradient Descent.

The public API:

- :class:`PatchGDClassifier`, trained with ``model.training_step(images, targets, optimizer)``;
- the baselines :class:`GDClassifier`, :class:`GDExtendedClassifier`,
  :class:`DownscaledGDClassifier`, with the same ``training_step``;
- the pieces, for your own loop: :class:`PatchGrid`, :class:`PatchEncoder`, :class:`LatentHead`,
  :func:`fill_z` (Algorithm 2), :func:`train_step` (Algorithm 1), :class:`InnerLoopConfig`,
  :class:`PatchSampler`, :class:`RandomPatchSampler`, :class:`StepHooks`.
"""

from .algorithm import (
    InnerLoopConfig,
    ResolvedLoop,
    StepHooks,
    StepResult,
    accumulation_groups,
    fill_mode,
    fill_z,
    infer,
    train_step,
)
from .backbones import create_backbone
from .baselines import DownscaledGDClassifier, GDClassifier, GDExtendedClassifier, gd_train_step
from .encoder import PatchEncoder
from .errors import ConfigError, DataError, PatchGDError
from .grid import PatchGrid
from .head import HeadConfig, LatentHead
from .model import Classifier, PatchGDClassifier
from .sampler import PatchSampler, RandomPatchSampler, SamplePlan

__version__ = "0.1.0"

__all__ = [
    "Classifier",
    "ConfigError",
    "DataError",
    "DownscaledGDClassifier",
    "GDClassifier",
    "GDExtendedClassifier",
    "HeadConfig",
    "InnerLoopConfig",
    "LatentHead",
    "PatchEncoder",
    "PatchGDClassifier",
    "PatchGDError",
    "PatchGrid",
    "PatchSampler",
    "RandomPatchSampler",
    "ResolvedLoop",
    "SamplePlan",
    "StepHooks",
    "StepResult",
    "accumulation_groups",
    "create_backbone",
    "fill_mode",
    "fill_z",
    "gd_train_step",
    "infer",
    "train_step",
    "__version__",
]
