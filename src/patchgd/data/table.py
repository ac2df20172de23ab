"""The labels table of a folder of large images: a CSV of image ids, labels and splits, validated.

A CSV names each image by ``image_id`` and gives its ``label`` (optionally a ``split`` such as
``train``/``val``/``test`` and a cross-validation ``fold``). An image id is either a path to the
file (relative to ``root``, or absolute) or a bare id such as PANDA's
``0005f7aaab2800f6170c399693a96917``, resolved to ``root/<id><ext>`` with the first extension
that exists.

Every problem of a row is one line that names the CSV and its line number (``labels.csv, line
7: ...``) or the file. With ``on_error="skip"`` (default) bad rows are dropped, logged to the
``patchgd.data`` logger and kept in :attr:`ImageTable.skipped`; ``on_error="raise"`` raises
:class:`DataError` at the first one.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from patchgd.errors import ConfigError, DataError, require_count

__all__ = [
    "DEFAULT_EXTENSIONS",
    "ImageTable",
    "SkippedItem",
    "TableItem",
    "read_table",
    "stratified_folds",
]

logger = logging.getLogger("patchgd.data")

OnError = Literal["skip", "raise"]
DEFAULT_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".svs",
    ".ndpi",
    ".ome.tif",
)


@dataclass(frozen=True)
class TableItem:
    """One image: its id as written in the CSV, the resolved file, its label, split and fold."""

    image_id: str
    path: str
    label: int
    split: str | None = None
    fold: int | None = None


@dataclass(frozen=True)
class SkippedItem:
    """An image or CSV row left out: ``item`` identifies it, ``reason`` is one full line that
    names the CSV line or the file."""

    item: str
    reason: str


@dataclass
class ImageTable:
    """The usable rows of a labels CSV, and what was skipped.

    Attributes:
        items: the images, in CSV order.
        num_classes: labels lie in ``0..num_classes - 1``.
        skipped: rows or images left out, with their reasons.
        classes: class names (label ``i`` is ``classes[i]``) when the CSV used names.
        source: where the table came from (the CSV path), for messages.
    """

    items: list[TableItem]
    num_classes: int
    skipped: list[SkippedItem] = field(default_factory=list)
    classes: tuple[str, ...] | None = None
    source: str | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[TableItem]:
        return iter(self.items)

    def __getitem__(self, index: int) -> TableItem:
        return self.items[index]

    @property
    def labels(self) -> list[int]:
        """Every item's label, in order."""
        return [item.label for item in self.items]

    def class_counts(self) -> list[int]:
        """Number of items of each class ``0..num_classes - 1``."""
        counts = [0] * self.num_classes
        for item in self.items:
            counts[item.label] += 1
        return counts

    def with_items(self, items: Sequence[TableItem]) -> ImageTable:
        """A table with the same classes, skipped list and source but other items."""
        return dataclasses.replace(self, items=list(items), skipped=list(self.skipped))

    def split(self, name: str) -> ImageTable:
        """The items whose split is ``name``; an unknown split is a ConfigError listing the
        splits present."""
        found = sorted({item.split for item in self.items if item.split is not None})
        if name not in found:
            where = f" of {self.source}" if self.source else ""
            raise ConfigError(
                f"split={name!r} is not in the table{where}; splits found: "
                + (", ".join(found) if found else "none (the CSV has no split column)")
            )
        return self.with_items([item for item in self.items if item.split == name])

    def fold(self, k: int, role: Literal["train", "val"] = "train") -> ImageTable:
        """Cross-validation: fold ``k`` is the validation set (``role="val"``), every other
        fold the training set (``role="train"``), as in PANDA's 5-fold protocol."""
        if role not in ("train", "val"):
            raise ConfigError(f"role={role!r}: expected 'train' or 'val'")
        if any(item.fold is None for item in self.items):
            raise ConfigError(
                f"fold(k={k!r}): not every item has a fold; assign them with stratified_folds()"
            )
        folds = sorted({item.fold for item in self.items if item.fold is not None})
        if k not in folds:
            raise ConfigError(f"fold {k!r} is not a fold of the table; folds found: {folds}")
        keep = [item for item in self.items if (item.fold == k) == (role == "val")]
        return self.with_items(keep)

    def report(self) -> str:
        """A short summary: item count per class and one line per skipped item."""
        name = f"{self.source}: " if self.source else ""
        counts = ", ".join(f"{c}: {n}" for c, n in enumerate(self.class_counts()))
        lines = [f"{name}{len(self.items)} images in {self.num_classes} classes ({counts})"]
        if not self.skipped:
            lines.append("nothing skipped")
        else:
            lines.append(f"{len(self.skipped)} skipped:")
            lines.extend(f"  - {s.reason}" for s in self.skipped)
        return "\n".join(lines)


def _check_on_error(on_error: str) -> None:
    if on_error not in ("skip", "raise"):
        raise ConfigError(f"on_error={on_error!r}: expected 'skip' or 'raise'")


def _parse_label(raw: str, class_index: dict[str, int] | None) -> int | str:
    """The label as an int, or a message saying why it is not one."""
    if class_index is not None:
        if raw in class_index:
            return class_index[raw]
        names = list(class_index)
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        return f"label {raw!r} is not one of the classes [{shown}]"
    try:
        return int(raw)
    except ValueError:
        pass
    try:  # "3.0", as pandas writes an integer column that has gaps
        number = float(raw)
    except ValueError:
        number = math.nan
    if math.isfinite(number) and number.is_integer():
        return int(number)
    return f"label {raw!r} is not an integer"


class _Listing:
    """Folder listings read once: resolving 10 000 bare ids with 8 extensions each would
    otherwise cost 100 000+ ``stat`` calls, slow on network file systems."""

    def __init__(self) -> None:
        self._names: dict[Path, frozenset[str]] = {}

    def is_file(self, path: Path) -> bool:
        folder = path.parent
        if folder not in self._names:
            try:
                self._names[folder] = frozenset(os.listdir(folder))
            except OSError:
                self._names[folder] = frozenset()
        return path.name in self._names[folder] and path.is_file()


def _resolve(image_id: str, root: Path, extensions: Sequence[str], listing: _Listing) -> str | None:
    """The file an id names: ``root/id`` (or the absolute path), else ``root/id + ext``."""
    base = Path(image_id) if os.path.isabs(image_id) else root / image_id
    candidates = [base]
    for ext in extensions:
        candidates.extend(base.with_name(base.name + s) for s in dict.fromkeys((ext, ext.upper())))
    for candidate in candidates:  # upper-case extensions: for case-sensitive file systems
        if listing.is_file(candidate):
            return os.path.normpath(os.path.abspath(candidate))
    return None


def _read_rows(csv_path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, fields) rows; any problem with the file is a DataError."""
    if not csv_path.is_file():
        raise DataError(f"labels CSV not found: {csv_path}")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            rows = [(reader.line_num, row) for row in reader if any(f.strip() for f in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        detail = " ".join(str(exc).split())
        raise DataError(
            f"cannot read labels CSV {csv_path}: {type(exc).__name__}: {detail}"
        ) from exc
    if header is None or not any(h.strip() for h in header):
        raise DataError(f"labels CSV {csv_path} is empty (no header line)")
    if not rows:
        raise DataError(f"labels CSV {csv_path} has a header but no rows")
    return [h.strip() for h in header], rows


def read_table(
    csv_path: str | os.PathLike[str],
    root: str | os.PathLike[str] | None = None,
    *,
    id_column: str = "image_id",
    label_column: str = "label",
    split_column: str | None = None,
    fold_column: str | None = None,
    num_classes: int | None = None,
    classes: Sequence[str] | None = None,
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    on_error: OnError = "skip",
) -> ImageTable:
    """Read and validate a labels CSV.

    Args:
        csv_path: the CSV (UTF-8, a header line, one row per image; blank lines ignored).
        root: folder that relative ids and bare ids refer to; default the CSV's folder.
        id_column, label_column: column names of the image id and the label.
        split_column, fold_column: column names of the split and the fold. ``None`` uses a
            column named ``split`` / ``fold`` if the CSV has one; a name given must exist. An
            empty cell means no split / no fold for that row.
        num_classes: labels must lie in ``0..num_classes - 1``; default max label + 1.
        classes: class names; labels are then names, mapped to their index in ``classes``.
        extensions: tried in order for an id that is not itself a file (as given, then upper
            case).
        on_error: ``"skip"`` drops bad rows and records them in ``skipped``; ``"raise"`` raises
            :class:`DataError` at the first.

    Bad rows: an empty id, an id listed twice (the later rows), a label that is not an integer
    (or not a class name), out of range or negative, a fold that is not a non-negative integer,
    a row with too few fields, an image file that does not exist, a file named by two ids.
    A missing, unreadable or empty CSV is always a DataError; a missing column a ConfigError
    naming it and listing the columns found. If rows exist but none is usable, DataError.
    """
    _check_on_error(on_error)
    csv_path = Path(csv_path)
    root_dir = Path(root) if root is not None else csv_path.parent
    if root is not None and not root_dir.is_dir():
        raise ConfigError(f"root={os.fspath(root)!r} is not a folder")
    class_index: dict[str, int] | None = None
    if classes is not None:
        if isinstance(classes, str) or len(set(classes)) != len(classes) or not classes:
            raise ConfigError(f"classes={classes!r}: need a non-empty list of distinct names")
        class_index = {str(name): i for i, name in enumerate(classes)}
        if num_classes is not None and num_classes != len(classes):
            raise ConfigError(
                f"num_classes={num_classes!r} differs from the {len(classes)} names in classes"
            )
        num_classes = len(classes)
    if num_classes is not None:
        require_count("num_classes", num_classes)
    if isinstance(extensions, str):
        raise ConfigError(f"extensions={extensions!r}: give a sequence such as ('.png', '.tif')")

    header, rows = _read_rows(csv_path)
    columns = {name: i for i, name in reversed(list(enumerate(header)))}  # first one wins

    def column(option: str, name: str | None, auto: str | None = None) -> int | None:
        if name is None:  # optional column, used if the CSV has it
            return columns.get(auto) if auto else None
        if name not in columns:
            raise ConfigError(
                f"{option}={name!r} is not a column of {csv_path}; "
                f"columns found: {', '.join(header)}"
            )
        return columns[name]

    id_col = column("id_column", id_column)
    label_col = column("label_column", label_column)
    split_col = column("split_column", split_column, "split")
    fold_col = column("fold_column", fold_column, "fold")
    if id_col is None or label_col is None:
        raise ConfigError(f"id_column={id_column!r}, label_column={label_column!r}: need names")
    needed = 1 + max(c for c in (id_col, label_col, split_col, fold_col) if c is not None)

    items: list[TableItem] = []
    skipped: list[SkippedItem] = []
    first_line_of_id: dict[str, int] = {}
    first_line_of_path: dict[str, int] = {}
    listing = _Listing()

    def bad(line: int, item: str, message: str) -> None:
        reason = f"{csv_path}, line {line}: {message}"
        if on_error == "raise":
            raise DataError(reason)
        logger.warning("skipped: %s", reason)
        skipped.append(SkippedItem(item or f"line {line}", reason))

    for line, row in rows:
        if len(row) < needed:
            bad(line, "", f"expected {len(header)} fields, found {len(row)}")
            continue
        image_id = row[id_col].strip()
        if not image_id:
            bad(line, "", f"empty {id_column}")
            continue
        if image_id in first_line_of_id:
            first = first_line_of_id[image_id]
            bad(line, image_id, f"{id_column} {image_id!r} is listed twice (first on line {first})")
            continue
        first_line_of_id[image_id] = line
        label = _parse_label(row[label_col].strip(), class_index)
        if isinstance(label, str):
            bad(line, image_id, label)
            continue
        if label < 0 or (num_classes is not None and label >= num_classes):
            limit = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
            bad(line, image_id, f"label {label} is out of range {limit}")
            continue
        split = None if split_col is None else (row[split_col].strip() or None)
        fold: int | None = None
        if fold_col is not None and row[fold_col].strip():
            raw = row[fold_col].strip()
            fold = int(raw) if raw.isdigit() else None
            if fold is None:
                bad(line, image_id, f"fold {raw!r} is not a non-negative integer")
                continue
        path = _resolve(image_id, root_dir, extensions, listing)
        if path is None:
            tried = ", ".join(extensions)
            missing = root_dir / image_id
            bad(line, image_id, f"image file not found: {missing} (also tried {tried})")
            continue
        if path in first_line_of_path:
            bad(line, image_id, f"{path} is already listed on line {first_line_of_path[path]}")
            continue
        first_line_of_path[path] = line
        items.append(TableItem(image_id, path, label, split, fold))

    if not items:
        raise DataError(
            f"{csv_path}: none of the {len(rows)} rows is usable; first problem: "
            f"{skipped[0].reason}"
        )
    if num_classes is None:
        num_classes = 1 + max(item.label for item in items)
    return ImageTable(
        items,
        int(num_classes),
        skipped,
        None if classes is None else tuple(str(c) for c in classes),
        str(csv_path),
    )


def stratified_folds(table: ImageTable, k: int = 5, seed: int = 0) -> ImageTable:
    """A copy of ``table`` with folds ``0..k-1`` assigned, stratified on the label.

    Each class is shuffled (``numpy`` generator seeded by ``seed``) and dealt round-robin, and
    each class starts dealing at the fold where the previous class stopped. So every fold gets
    ``n // k`` or ``n // k + 1`` items of each class (every class is in every fold when it has at
    least ``k`` items) and fold sizes differ by at most one. Existing folds are replaced.
    """
    require_count("num_folds", k, at_least=2)
    if len(table.items) < k:
        raise ConfigError(f"k={k} folds need at least {k} images; the table has {len(table)}")
    rng = np.random.default_rng(seed)
    folds: list[int] = [0] * len(table.items)
    start = 0
    for label in sorted({item.label for item in table.items}):
        members = [i for i, item in enumerate(table.items) if item.label == label]
        for position, j in enumerate(rng.permutation(len(members))):
            folds[members[int(j)]] = (start + position) % k
        start = (start + len(members)) % k
    items = [dataclasses.replace(it, fold=f) for it, f in zip(table.items, folds, strict=True)]
    return table.with_items(items)
