"""Deprecated module path, kept for one release: the data modules live in
:mod:`patchgd.app.datamodules`.

Configs and checkpoints written before the rename name classes here (``class_path:
patchgd.app.data.…``); they still load, with a ``FutureWarning``.
"""

from .._moved import moved_to
from . import datamodules

__getattr__ = moved_to(__name__, datamodules)
