"""Exception types raised by patchgd for bad configurations and bad input."""

from __future__ import annotations


class PatchGDError(Exception):
    """Base class of every error patchgd raises on purpose."""


class ConfigError(PatchGDError, ValueError):
    """A configuration that cannot work; the message names the option and its value."""


class DataError(PatchGDError, ValueError):
    """Input data that cannot be used; the message names the file or item."""


class DivergedError(PatchGDError, FloatingPointError):
    """Training produced non-finite gradients or weights; the message names the step."""
