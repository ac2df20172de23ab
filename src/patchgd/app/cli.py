"""``patchgd fit | validate | test | predict``: LightningCLI over the task and data modules."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from ..errors import ConfigError
from .callbacks import PredictionWriter, RunSummary, TrainingCurves
from .task import PatchGDTask

SUBCOMMANDS = ("fit", "validate", "test", "predict")


def trainer_defaults() -> dict[str, Any]:
    """Trainer defaults every run gets: best and last checkpoints, summary, curves, loggers."""
    return {
        "callbacks": [
            ModelCheckpoint(  # the best epoch by validation accuracy
                monitor="val/acc",
                mode="max",
                filename="best-epoch{epoch:03d}",
                auto_insert_metric_name=False,
            ),
            # Every epoch, whatever the metric, for resuming: Lightning's own save_last only
            # writes when a monitored checkpoint was saved at the same step.
            ModelCheckpoint(
                filename="last", enable_version_counter=False, save_on_train_epoch_end=True
            ),
            RunSummary(),
            TrainingCurves(),
            PredictionWriter(),
        ],
        "logger": [
            {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": "runs"},
            },
            {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": "tensorboard"},
            },
        ],
        # By class path, so the saved config.yaml can be read back by validate/test/predict.
        "plugins": [{"class_path": "patchgd.app.callbacks.AtomicCheckpointIO"}],
    }


def run_lightning(argv: Sequence[str]) -> LightningCLI:
    """Run one LightningCLI subcommand, e.g. ``["fit", "--config", "configs/x.yaml"]``.

    A config that does not parse (an unknown key, a wrong type) raises :class:`ConfigError`
    with jsonargparse's one-line reason instead of printing the whole usage.
    """
    with warnings.catch_warnings():
        # `patchgd` forwards its own argv as `args`; Lightning warns when both are present.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        try:
            return LightningCLI(
                PatchGDTask,
                None,  # any LightningDataModule, chosen by class_path in the config
                subclass_mode_data=True,
                trainer_defaults=trainer_defaults(),
                save_config_kwargs={"overwrite": True},
                parser_kwargs={"exit_on_error": False},
                args=list(argv),
                auto_configure_optimizers=False,
            )
        except ArgumentError as err:
            reason = " ".join(str(err).split())
            raise ConfigError(f"{argv[0]}: {reason} (see `patchgd {argv[0]} --help`)") from err
        except MisconfigurationException as err:  # Lightning's own refusals of trainer options
            raise ConfigError(" ".join(str(err).split())) from err
