"""Helpers for application tests: runs in a subprocess, and the callbacks and plug-ins such
runs load by class path from their config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from patchgd._io import atomic_write
from patchgd.app.callbacks import AtomicCheckpointIO

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "ultramnist" / "patchgd_tiny.yaml"


def run_dir(base: Path, version: int = 0) -> Path:
    """The run folder of the ``version``-th run started in ``base``."""
    return base / "runs" / "lightning_logs" / f"version_{version}"


def trainer_config(folder: Path, key: str, class_path: str, **init_args: int) -> Path:
    """A config file that gives the trainer one object by class path under ``key``
    (``"callbacks"`` or ``"plugins"``), e.g. to kill or interrupt a run at a chosen point."""
    path = folder / f"{class_path.rsplit('.', 1)[-1]}.yaml"
    args = ", ".join(f"{name}: {value}" for name, value in init_args.items())
    entry = f"    - class_path: {class_path}\n      init_args: {{{args}}}\n"
    path.write_text(f"trainer:\n  {key}:\n{entry}")
    return path


def fit_in_subprocess(cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    """``patchgd fit`` of the tiny config for 3 epochs in a child process (which may be killed),
    with this folder importable for class paths."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    )
    command = [sys.executable, "-m", "patchgd.cli", "fit", "--config", str(TINY)]
    return subprocess.run(
        [*command, "--trainer.max_epochs", "3", *extra],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


class KillAt(Callback):
    """SIGKILLs the process after training batch ``batch`` of epoch ``epoch``: no clean-up runs."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


class KillDuringCheckpointWrite(AtomicCheckpointIO):
    """SIGKILLs the process in the middle of writing the first checkpoint of epoch ``epoch``:
    a temp file holding half a checkpoint is left behind, as after a crash or a power loss."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if checkpoint["epoch"] == self.epoch:

            def half_then_die(handle) -> None:
                handle.write(b"PK\x03\x04 half a checkpoint")
                handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)

            atomic_write(Path(path), half_then_die)
        super().save_checkpoint(checkpoint, path, storage_options)


class InterruptAt(Callback):
    """Raises KeyboardInterrupt (what Ctrl-C raises) after training batch ``batch`` of epoch
    ``epoch``."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise KeyboardInterrupt


class TermAt(Callback):
    """Sends this process SIGTERM (what a scheduler or ``kill`` sends) after training batch
    ``batch`` of epoch ``epoch``; Lightning's signal handler stops the run at the next check."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


def predict_args(run: Path, inputs: str) -> list[str]:
    """``patchgd predict`` from ``run``'s config and last checkpoint, with heatmaps, on
    ``inputs`` (a YAML list) through ``PredictImagesDataModule``."""
    return [
        "predict",
        "--config",
        str(run / "config.yaml"),
        "--ckpt_path",
        str(run / "checkpoints" / "last.ckpt"),
        "--model.predict_heatmaps",
        "true",
        "--data",
        "patchgd.app.datamodules.PredictImagesDataModule",
        "--data.inputs",
        inputs,
    ]
