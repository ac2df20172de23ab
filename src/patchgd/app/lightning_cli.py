"""``patchgd fit | validate | test | predict``: LightningCLI over the task and data modules."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .._io import remove_stale_temps
from ..errors import ConfigError, PatchGDError
from ..planner import parse_size, plan_classifier
from .callbacks import (
    STALE_CHECKPOINT_TEMPS,
    PredictionWriter,
    RunCheckpoint,
    RunSummary,
    TrainingCurves,
    planned_config,
)
from .runs import (
    default_loggers,
    kept_metrics,
    restore_metrics,
    route_to_root,
    route_to_run,
    run_folder_of,
)
from .task import PatchGDTask

SUBCOMMANDS = ("fit", "validate", "test", "predict")


def trainer_defaults() -> dict[str, Any]:
    """Trainer defaults every run gets: best and last checkpoints, summary, curves, loggers."""
    return {
        "callbacks": [
            RunCheckpoint(  # the best epoch by validation accuracy
                monitor="val/acc",
                mode="max",
                filename="best-epoch{epoch:03d}",
                auto_insert_metric_name=False,
            ),
            # Every epoch, whatever the metric, for resuming: Lightning's own save_last only
            # writes when a monitored checkpoint was saved at the same step.
            RunCheckpoint(
                filename="last", enable_version_counter=False, save_on_train_epoch_end=True
            ),
            RunSummary(),
            TrainingCurves(),
            PredictionWriter(),
        ],
        "logger": default_loggers(),
        # By class path, so the saved config.yaml can be read back by validate/test/predict.
        "plugins": [{"class_path": "patchgd.app.callbacks.AtomicCheckpointIO"}],
    }


class PatchGDCLI(LightningCLI):
    """LightningCLI with ``--memory-budget``: plan ``fit`` by measured trial steps, cap CUDA."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Accepted by every subcommand: a saved fit config carries it into validate/test/predict.
        parser.add_argument(
            "--memory-budget",
            type=str | None,
            default=None,
            help="e.g. 4GB: before fit, measure trial steps and use the largest batch up to "
            "data.batch_size (PatchGD: also k and the fill chunk; downscaled GD: the input size) "
            "that fits; on CUDA also cap the process at this size",
        )

    def before_instantiate_classes(self) -> None:
        """Route the default loggers: to ``--trainer.default_root_dir``, and for ``fit`` from a
        checkpoint of a run folder, back into that folder (so the best checkpoint carries on)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        loggers = config.trainer.get("logger")
        path = config.get("ckpt_path")
        run = run_folder_of(path) if self.subcommand == "fit" and _is_file_path(path) else None
        self._resumed_run: tuple[list[str], list[dict[str, str]]] | None = None
        if run is not None and route_to_run(loggers, run):
            self._resumed_run = kept_metrics(run, *self._checkpoint_at)
            rank_zero_info(f"resuming in {run}")
        else:
            route_to_root(loggers, config.trainer.get("default_root_dir"))
        if self.subcommand in ("fit", "validate", "test"):
            fill_from_data(config)

    def after_instantiate_classes(self) -> None:
        csv_logger = next((x for x in self.trainer.loggers if isinstance(x, CSVLogger)), None)
        if self._resumed_run is not None and csv_logger is not None:
            restore_metrics(csv_logger, *self._resumed_run)

    def before_fit(self) -> None:
        self._apply_budget(plan=True)

    def before_validate(self) -> None:
        self._apply_budget(plan=False)

    def before_test(self) -> None:
        self._apply_budget(plan=False)

    def before_predict(self) -> None:
        self._apply_budget(plan=False)

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint's hyperparameters here, before any other hook.
        self._check_checkpoint()
        super()._parse_ckpt_path()

    def _check_checkpoint(self) -> None:
        """Refuse a ``--ckpt_path`` that is not a readable checkpoint, in one line naming it."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path is None and subcommand in ("validate", "test", "predict"):
            rank_zero_warn(
                f"{subcommand} without --ckpt_path: the model has its initial weights "
                "(random, or the pretrained backbone's), not trained ones"
            )
        if not _is_file_path(path):
            return
        try:  # memory-mapped: the tensors are not read, only the file's structure
            checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
            self._checkpoint_at = (checkpoint.get("epoch", 0), checkpoint.get("global_step", 0))
        except Exception as err:  # noqa: BLE001 - any failure means the same to the user
            reason = " ".join(str(err).split()) or type(err).__name__
            raise ConfigError(f"--ckpt_path {path}: not a readable checkpoint ({reason})") from err
        missing = [
            key for key in ("state_dict", "pytorch-lightning_version") if key not in checkpoint
        ]
        if missing:
            raise ConfigError(
                f"--ckpt_path {path}: not a Lightning checkpoint (no {', '.join(missing)}); "
                "give a .ckpt written by `patchgd fit`"
            )
        if subcommand != "fit":  # a run may still be writing there while others read
            return
        for temp in remove_stale_temps(Path(path).parent, STALE_CHECKPOINT_TEMPS):
            rank_zero_info(f"removed {temp}, left by an interrupted checkpoint write")

    def _apply_budget(self, plan: bool) -> None:
        config = self.config[self.subcommand]
        if not config.get("memory_budget"):
            return
        task = self.model
        task.memory_budget = parse_size(config.memory_budget)
        if not plan:
            return
        if self.trainer.world_size > 1:
            raise ConfigError(
                "--memory-budget plans for one process; plan with --trainer.devices 1 and copy "
                "the planned values from its config.yaml"
            )
        device = self.trainer.strategy.root_device
        rank_zero_info(f"planning under {config.memory_budget} on {device} (trial steps):")
        args = config["model.classifier.init_args"]
        args = args.as_dict() if hasattr(args, "as_dict") else dict(args)
        rebuild = lambda size: type(task.classifier)(**{**args, "input_size": size})  # noqa: E731
        data = self.datamodule
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            classifier, run_plan = plan_classifier(
                task.classifier,
                task.memory_budget,
                data.batch_size,
                rebuild=rebuild,
                lazy=getattr(data, "mode", None) == "lazy",
                device=device,
                log=rank_zero_info,
            )
        data.batch_size = run_plan.batch_size
        if classifier is not task.classifier:
            task.set_classifier(classifier)
        task.memory_plan = run_plan
        for key, value in planned_config(run_plan).items():
            config[key] = value  # the saved config.yaml reruns the plan
        rank_zero_info(f"memory plan: {run_plan.description}")


FROM_DATA = ("num_classes", "image_size")


def fill_from_data(config: Any) -> None:
    """Give the classifier's unset (or null) ``num_classes`` and ``image_size`` the data
    module's values (the labels' classes; the lazy canvas, or the resized size), so that one
    config serves any data set. The saved config.yaml records them, for ``predict``."""
    args = config.get("model.classifier.init_args")
    missing = [name for name in FROM_DATA if args is not None and args.get(name) is None]
    if not missing:
        return
    data_config = config.get("data")
    if data_config is None or not data_config.get("class_path"):
        raise ConfigError(f"model.classifier.init_args.{missing[0]} is null, and no data is set")
    module_name, _, class_name = data_config.class_path.rpartition(".")
    init_args = data_config.get("init_args")
    kwargs = init_args.as_dict() if hasattr(init_args, "as_dict") else dict(init_args or {})
    data = getattr(importlib.import_module(module_name), class_name)(**kwargs)
    for name in missing:
        value = getattr(data, name, None)
        if value is None:
            raise ConfigError(
                f"model.classifier.init_args.{name} is null, and {class_name} does not state it"
            )
        config[f"model.classifier.init_args.{name}"] = (
            list(value) if isinstance(value, tuple) else value
        )
        rank_zero_info(f"{name} from the data: {value}")


def _is_file_path(ckpt_path: Any) -> bool:
    """Whether ``--ckpt_path`` names a local file (not "best", "last", or a remote URL)."""
    special = ("best", "last", "hpc", "registry")
    return bool(ckpt_path) and ckpt_path not in special and "://" not in str(ckpt_path)


def _undecodable(paths: Sequence[str]) -> list[str]:
    """The files among ``paths`` that are not UTF-8 text."""
    bad = []
    for path in paths:
        try:
            Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            bad.append(path)
    return bad


def run_lightning(argv: Sequence[str]) -> LightningCLI:
    """Run one LightningCLI subcommand, e.g. ``["fit", "--config", "configs/x.yaml"]``.

    A config that does not parse (an unknown key, a wrong type) raises :class:`ConfigError`
    with jsonargparse's one-line reason instead of printing the whole usage.
    """
    configs = [b for a, b in zip(argv, argv[1:], strict=False) if a == "--config"]
    for path in configs:  # jsonargparse's "Unexpected config" would not name the file
        if Path(path).is_file() and not Path(path).read_bytes().strip():
            raise ConfigError(f"--config {path}: the file is empty")
    with warnings.catch_warnings():
        # `patchgd` forwards its own argv as `args`; Lightning warns when both are present.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        try:
            return PatchGDCLI(
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
        except UnicodeDecodeError as err:  # jsonargparse read a binary file as a config
            raise ConfigError(
                f"--config {' '.join(_undecodable(configs)) or '?'}: not a text (YAML) file"
            ) from err
        except ValueError as err:
            # jsonargparse reports a data module's refusal as "does not validate against any
            # of the Union subtypes", caused by our one-line error: raise that one.
            cause: BaseException | None = err
            while cause is not None and not isinstance(cause, PatchGDError):
                cause = cause.__cause__
            if cause is None:
                raise
            raise cause from err
