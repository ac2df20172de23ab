"""patchgd: train neural networks end to end on very large images with Patch Gradient Descent.

The public API:

- :class:`PatchGDClassifier`, trained with ``model.training_step(images, targets, optimizer)``;
- the baselines :class:`GDClassifier`, :class:`GDExtendedClassifier`,
  :class:`DownscaledGDClassifier`, with the same ``training_step``;
- the pieces, for your own loop: :class:`PatchGrid`, :class:`PatchEncoder`, :class:`LatentHead`,
  :func:`fill_z` (Algorithm 2), :func:`train_step` (Algorithm 1), :class:`InnerLoopConfig`,
  :class:`PatchSampler`, :class:`RandomPatchSampler`, :class:`StepHooks`, :class:`LatentCache`
  (Z reuse).
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, DataError, DivergedError, PatchGDError

# The public names and the module that holds each. They are imported on first use (PEP 562),
# so `import patchgd.data.sources` in a reader process does not pull in torch and timm.
_EXPORTS = {
    "algorithm": [
        "InnerLoopConfig",
        "ResolvedLoop",
        "StepHooks",
        "StepResult",
        "accumulation_groups",
        "fill_mode",
        "fill_z",
        "gd_train_step",
        "infer",
        "train_step",
    ],
    "backbones": ["create_backbone"],
    "baselines": [
        "DownscaledGDClassifier",
        "GDClassifier",
        "GDExtendedClassifier",
    ],
    "encoder": ["PatchEncoder"],
    "grid": ["PatchGrid"],
    "head": ["HeadConfig", "LatentHead"],
    "latent_cache": ["LatentCache"],
    "memory": ["MemoryReport", "measure"],
    "model": ["Classifier", "PatchGDClassifier"],
    "patches": ["PatchProvider", "TensorPatches", "as_patches"],
    "sampler": ["PatchSampler", "RandomPatchSampler", "SamplePlan"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

if TYPE_CHECKING:
    from .algorithm import (
        InnerLoopConfig,
        ResolvedLoop,
        StepHooks,
        StepResult,
        accumulation_groups,
        fill_mode,
        fill_z,
        gd_train_step,
        infer,
        train_step,
    )
    from .backbones import create_backbone
    from .baselines import (
        DownscaledGDClassifier,
        GDClassifier,
        GDExtendedClassifier,
    )
    from .encoder import PatchEncoder
    from .grid import PatchGrid
    from .head import HeadConfig, LatentHead
    from .latent_cache import LatentCache
    from .memory import MemoryReport, measure
    from .model import Classifier, PatchGDClassifier
    from .patches import PatchProvider, TensorPatches, as_patches
    from .sampler import PatchSampler, RandomPatchSampler, SamplePlan


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'patchgd' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULE_OF])


__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "DivergedError", "PatchGDError", "__version__", *_MODULE_OF]
