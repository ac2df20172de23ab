"""Module paths renamed within the package, kept for one release (docs/architecture.md)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from types import ModuleType


def moved_to(old: str, module: ModuleType) -> Callable[[str], object]:
    """Warn that ``old`` is now ``module`` and give the old module's ``__getattr__``, which
    serves every name of the new one, so configs and code that name the old path still work."""
    warnings.warn(
        f"{old} is renamed {module.__name__}; the old path goes in the next release",
        FutureWarning,
        stacklevel=3,
    )
    return lambda name: getattr(module, name)
