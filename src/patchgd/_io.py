"""Writing files so that readers never see half of one."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(handle)`` on a temp file beside ``path``, then rename it over ``path``.

    A crash or an exception leaves either the old file or none, never a partial one, and removes
    the temp file. The new file gets the usual permissions (0666 less the umask), not the
    owner-only ones of a temp file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_csv(path: str | os.PathLike[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write ``rows`` (the header first) as a CSV file, atomically."""
    text = io.StringIO(newline="")
    csv.writer(text).writerows(rows)
    payload = text.getvalue().encode()
    atomic_write(path, lambda handle: handle.write(payload))


def remove_stale_temps(folder: str | os.PathLike[str], pattern: str = ".*.tmp") -> list[Path]:
    """Delete the temp files that an :func:`atomic_write` killed mid-write (``kill -9``, power
    loss) left in ``folder``; return them. Call it where no write into ``folder`` is under way."""
    removed = [path for path in Path(folder).glob(pattern) if path.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed
