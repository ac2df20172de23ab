"""Deprecated module path, kept for one release: the command line's LightningCLI lives in
:mod:`patchgd.app.lightning_cli`.

Code written before the rename imports from here; it still works, with a ``FutureWarning``.
"""

from .._moved import moved_to
from . import lightning_cli

__getattr__ = moved_to(__name__, lightning_cli)
