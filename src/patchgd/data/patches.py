"""Deprecated module path, kept for one release: patches read from disk live in
:mod:`patchgd.data.source_patches`.

Code written before the rename imports from here; it still works, with a ``FutureWarning``.
"""

from .._moved import moved_to
from . import source_patches

__getattr__ = moved_to(__name__, source_patches)
