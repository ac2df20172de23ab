"""Where a run's outputs go: under ``--trainer.default_root_dir``, and, when ``fit`` resumes a
checkpoint of a run folder, into that same folder again.

Resuming in place keeps the best-checkpoint tracking: Lightning's ``ModelCheckpoint`` restores
its best score and best file only when the run writes to the folder the checkpoint came from,
so a resumed run in a new folder could keep a different "best" than the uninterrupted run.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger

from .._io import atomic_write_csv

#: Where runs go unless ``--trainer.default_root_dir`` says otherwise.
DEFAULT_RUNS = "runs"
#: The default loggers: the CSV logger's folder is the run folder, TensorBoard's mirrors it.
CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"
TENSORBOARD_LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"


def default_loggers() -> list[dict[str, Any]]:
    """The CSV and TensorBoard loggers every run gets, by class path (for ``config.yaml``)."""
    return [
        {"class_path": CSV_LOGGER, "init_args": {"save_dir": DEFAULT_RUNS}},
        {
            "class_path": TENSORBOARD_LOGGER,
            "init_args": {"save_dir": DEFAULT_RUNS, "name": "tensorboard"},
        },
    ]


def _default(loggers: Any, any_folder: bool = False) -> list[Any]:
    """The default loggers among ``loggers`` (parsed config namespaces), still unchanged (or,
    with ``any_folder``, in whatever folder a run's saved config put them)."""
    if not isinstance(loggers, list):
        return []
    return [
        logger
        for logger in loggers
        if getattr(logger, "class_path", None) in (CSV_LOGGER, TENSORBOARD_LOGGER)
        and (any_folder or logger.init_args.get("save_dir") == DEFAULT_RUNS)
        and logger.init_args.get("version") is None
    ]


def _saved_defaults(loggers: Any) -> list[Any]:
    """The default pair as a run's ``config.yaml`` holds it: the CSV logger and TensorBoard's
    ``tensorboard``, in one folder (the root that run had)."""
    pair = _default(loggers, any_folder=True)
    classes = sorted(logger.class_path for logger in pair)
    if classes != sorted([CSV_LOGGER, TENSORBOARD_LOGGER]):
        return []
    folders = {logger.init_args.get("save_dir") for logger in pair}
    tensorboard = next(x for x in pair if x.class_path == TENSORBOARD_LOGGER)
    return pair if len(folders) == 1 and tensorboard.init_args.get("name") == "tensorboard" else []


def route_to_root(loggers: Any, root: str | None) -> None:
    """Point the default loggers at ``root`` (``--trainer.default_root_dir``) instead of ./runs,
    also when they come from a run's ``config.yaml``, which names that run's root."""
    if root:
        for logger in _default(loggers) or _saved_defaults(loggers):
            logger.init_args.save_dir = str(root)


def run_folder_of(checkpoint: str | Path) -> Path | None:
    """The run folder a checkpoint was written in (``<root>/lightning_logs/version_N``), or
    ``None`` for a checkpoint kept anywhere else."""
    folder = Path(checkpoint).resolve().parent
    if folder.name != "checkpoints" or folder.parent.parent.name != "lightning_logs":
        return None
    return folder.parent


def route_to_run(loggers: Any, run: Path) -> bool:
    """Point the default loggers at an existing run folder; ``False`` if they are not ours."""
    ours = _default(loggers)
    if not ours:
        return False
    for logger in ours:
        logger.init_args.save_dir = str(run.parent.parent)
        logger.init_args.version = run.name
    return True


def kept_metrics(run: Path, epoch: int, step: int) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of ``run``'s ``metrics.csv`` logged up to the resumed checkpoint,
    saved in ``epoch`` at optimizer step ``step``: the rows logged after it, before the run
    stopped, are dropped, since the resumed run logs those steps again. (The first batch of the
    next epoch logs at the same step as the checkpoint, hence the epoch too.)"""
    path = run / "metrics.csv"
    if not path.is_file():
        return [], []

    def before(row: dict[str, str]) -> bool:
        at = (int(row.get("epoch") or 0), int(row.get("step") or 0))
        return at[0] < epoch or (at[0] == epoch and at[1] <= step)

    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = [row for row in reader if before(row)]
        return list(reader.fieldnames or []), rows


def restore_metrics(logger: CSVLogger, header: list[str], rows: list[dict[str, str]]) -> None:
    """Write the kept rows back after the CSV logger has cleared the run's ``metrics.csv``.

    The logger's writer deletes an existing file when it starts; it is told the old header so
    that its later appends keep the old columns.
    """
    writer = logger.experiment  # starting it removes the old file
    if not header or not hasattr(writer, "metrics_file_path"):  # nothing kept, or not rank 0
        return
    header = sorted(header)  # the writer's own column order
    table = [header, *([row.get(key, "") for key in header] for row in rows)]
    atomic_write_csv(writer.metrics_file_path, table)
    writer.metrics_keys = header
