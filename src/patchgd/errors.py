"""Exception types raised by patchgd for bad configurations and bad input."""

from __future__ import annotations

import operator
from typing import TypeVar

T = TypeVar("T")


class PatchGDError(Exception):
    """Base class of every error patchgd raises on purpose."""


class ConfigError(PatchGDError, ValueError):
    """A configuration that cannot work; the message names the option and its value."""


class DataError(PatchGDError, ValueError):
    """Input data that cannot be used; the message names the file or item."""


class DivergedError(PatchGDError, FloatingPointError):
    """Training produced non-finite gradients or weights; the message names the step."""


def require_count(name: str, value: object, at_least: int = 1) -> int:
    """``value`` as an int; :class:`ConfigError` unless it is a whole number (an int or a NumPy
    integer, not a bool) of at least ``at_least``."""
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        number = None
    if number is None or isinstance(value, bool):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    if number < at_least:
        raise ConfigError(f"{name} must be at least {at_least}, got {value!r}")
    return number


def one_line(err: BaseException) -> str:
    """The error's message; for one re-raised from a DataLoader worker, whose message PyTorch
    replaces with the worker's whole traceback, the original message again."""
    text = str(err)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        last = text.rstrip().splitlines()[-1]  # "patchgd.errors.DataError: <message>"
        prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
        text = last.removeprefix(prefix)
    return text


def from_data(owner: str, name: str, value: T | None) -> T:
    """``value``, or a :class:`ConfigError` if it is ``None``.

    In a config, ``num_classes: null`` or ``image_size: null`` asks for the data module's value;
    ``patchgd fit``, ``validate`` and ``test`` fill it in before building the model. A model
    built any other way must be given it.
    """
    if value is None:
        raise ConfigError(
            f"{owner}: {name} is null, which only `patchgd fit`, `validate` and `test` fill in "
            "from the data; give it a value"
        )
    return value
