"""Lightning plug-ins for a run's outputs: atomic checkpoints, a JSON summary, a curves plot."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .._io import atomic_write, atomic_write_csv, remove_stale_temps
from ..errors import one_line
from ..memory import lifetime_peak_rss
from ..planner import ClassifierPlan

#: The temp files of checkpoints that :func:`~patchgd._io.atomic_write` was killed writing.
STALE_CHECKPOINT_TEMPS = ".*.ckpt.*.tmp"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes checkpoints through a temp file and a rename: a kill leaves the old file or none.

    The temp files such a kill leaves behind are removed by the first write into the folder,
    and by ``fit --ckpt_path`` from the folder of the checkpoint it resumes.
    """

    def __init__(self) -> None:
        super().__init__()
        self._cleaned: set[Path] = set()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.parent not in self._cleaned:
            remove_stale_temps(target.parent, STALE_CHECKPOINT_TEMPS)
            self._cleaned.add(target.parent)
        atomic_write(target, lambda handle: torch.save(checkpoint, handle))


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that recognises its own folder however the path was spelled.

    Lightning restores the best score and files on resume only when the checkpoint's folder
    string equals the new one; a run resumed in place by an absolute ``--ckpt_path`` spells the
    same folder differently (``runs/...`` against ``/home/.../runs/...``) and would lose them.
    """

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key, so that checkpoints written before this class still resume.
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("dirpath")
        if saved and self.dirpath and Path(saved).resolve() == Path(self.dirpath).resolve():
            state_dict = {**state_dict, "dirpath": self.dirpath}
        super().load_state_dict(state_dict)


def planned_config(plan: ClassifierPlan) -> dict[str, Any]:
    """A memory plan as the dotted config keys it sets (what ``config.yaml`` saves)."""
    changes = {f"model.classifier.init_args.{k}": v for k, v in plan.classifier_args.items()}
    if plan.batch_planned:
        changes["data.init_args.batch_size"] = plan.batch_size
    return changes


def peak_memory_bytes() -> dict[str, int]:
    """Peak memory so far: CUDA allocator peak when on a GPU, and the process's peak RSS."""
    peaks = {"process_peak_rss": lifetime_peak_rss()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks["cuda_peak_allocated"] = torch.cuda.max_memory_allocated()
    return peaks


def _run_folder(trainer: L.Trainer) -> Path | None:
    """The run folder on rank 0, ``None`` elsewhere or without a logger.

    ``trainer.log_dir`` broadcasts from rank 0, so every rank must read it, not only rank 0.
    """
    log_dir = trainer.log_dir
    return Path(log_dir) if trainer.is_global_zero and log_dir is not None else None


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if torch.as_tensor(v).numel() == 1}


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True).encode()
    atomic_write(path, lambda handle: handle.write(text))


def _memory_plan(task: L.LightningModule) -> dict[str, Any]:
    """The ``--memory-budget`` plan and the second step's measured peak, when there was one."""
    plan = getattr(task, "memory_plan", None)
    if plan is None:
        return {}
    return {
        "memory_plan": {
            "budget_bytes": plan.budget_bytes,
            "predicted_peak_bytes": plan.predicted_peak_bytes,
            "measured_peak_bytes": getattr(task, "measured_peak_bytes", None),
            "plan": plan.description,
            "planned_config": planned_config(plan),
        }
    }


class RunSummary(Callback):
    """Writes ``summary.json`` in the run folder: final and best metrics, time, peak memory.

    ``fit`` writes the final and best validation metrics and the seconds of every epoch;
    ``validate`` and ``test`` add their metrics under their own key. A run that fails or is
    interrupted after its folder was made gets ``status`` (``failed`` or ``interrupted``, the
    error, the epoch) instead.
    """

    def __init__(self) -> None:
        self.epoch_seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_seconds.append(time.perf_counter() - self._start)

    def _update(self, trainer: L.Trainer, key: str, payload: dict[str, Any]) -> None:
        log_dir = _run_folder(trainer)
        if log_dir is None:
            return
        path = log_dir / "summary.json"
        summary = json.loads(path.read_text()) if path.exists() else {}
        summary[key] = payload
        summary["peak_memory_bytes"] = peak_memory_bytes()
        _write_json(path, summary)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        best: dict[str, Any] = {}
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.best_model_path:
            best = {
                "monitor": checkpoint.monitor,
                "score": float(checkpoint.best_model_score)
                if checkpoint.best_model_score is not None
                else None,
                "checkpoint": checkpoint.best_model_path,
            }
        seconds = self.epoch_seconds
        self._update(
            trainer,
            "fit",
            {
                "epochs": trainer.current_epoch,
                "final_metrics": _scalars(trainer.callback_metrics),
                "best": best,
                "seconds_per_epoch": seconds,
                "mean_seconds_per_epoch": sum(seconds) / len(seconds) if seconds else None,
                **_memory_plan(pl_module),
            },
        )

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # The logs reach disk with every checkpoint: a run killed later and resumed from it
        # keeps every row up to it (the loggers otherwise flush every 100 steps).
        for logger in trainer.loggers:
            logger.save()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Mark a run folder that already exists as failed or interrupted (Ctrl-C, SIGTERM),
        with why."""
        log_dir = _run_folder(trainer)
        if log_dir is None or not log_dir.is_dir():
            return  # nothing was written: nothing to mark
        interrupted = isinstance(exception, KeyboardInterrupt | SIGTERMException)
        self._update(
            trainer,
            "status",
            {
                "state": "interrupted" if interrupted else "failed",
                "stage": str(trainer.state.fn.value if trainer.state.fn else None),
                "error": " ".join(one_line(exception).split()) or type(exception).__name__,
                "epoch": trainer.current_epoch,
                "seconds_per_epoch": self.epoch_seconds,
            },
        )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._update(trainer, "validate", _scalars(trainer.callback_metrics))

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._update(trainer, "test", _scalars(trainer.callback_metrics))


class TrainingCurves(Callback):
    """At the end of ``fit``, plots the CSV logger's loss and accuracy curves to ``curves.png``."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = _run_folder(trainer)
        if log_dir is None:
            return
        metrics_csv = log_dir / "metrics.csv"
        if not metrics_csv.exists():
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with open(metrics_csv, newline="") as handle:
            rows = list(csv.DictReader(handle))
        panels = [
            ("loss", ["train/loss_epoch", "val/loss"]),
            ("accuracy", ["train/acc", "val/acc"]),
        ]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, (title, keys) in zip(axes, panels, strict=True):
            for key in keys:
                points = [(int(r["epoch"]), float(r[key])) for r in rows if r.get(key)]
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=key)
            ax.set_xlabel("epoch")
            ax.set_title(title)
            ax.legend()
        fig.tight_layout()
        atomic_write(log_dir / "curves.png", lambda handle: fig.savefig(handle, format="png"))
        plt.close(fig)


class PredictionWriter(BasePredictionWriter):
    """After ``predict``: ``predictions.csv`` and, when asked, ``heatmaps/`` in the run folder.

    The CSV has one row per image: its id (the file, for ``PredictImagesDataModule``; the index
    otherwise), the predicted class and the probability of every class. Images that could not
    be read are listed with the reason in ``skipped.csv`` instead. A heatmap shows each grid
    position's evidence for the predicted class over the image's thumbnail (a PNG), and the raw
    ``(rows, cols)`` array beside it (a ``.npy``): the attention weights of an attention head,
    or each position's contribution to the predicted class's logit (:func:`patchgd.head.evidence`).
    Heatmaps come from ``patchgd predict ... --model.predict_heatmaps true`` with PatchGD.
    """

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        predictions: Any,
        batch_indices: Any,
    ) -> None:
        log_dir = trainer.log_dir  # read on every rank: it broadcasts
        if not trainer.is_global_zero or not predictions:
            return
        out = Path(log_dir or ".")
        data = trainer.datamodule
        probs = torch.cat([p["probs"] for p in predictions]).cpu()
        names = getattr(data, "image_ids", None) or [str(i) for i in range(len(probs))]
        positions = list(range(len(probs)))
        skipped: list[tuple[str, str]] = list(getattr(data, "skipped", []))
        if "index" in predictions[0]:  # PredictBatch: unreadable images were left out
            positions = torch.cat([p["index"] for p in predictions]).tolist()
            skipped += [(names[i], reason) for p in predictions for i, reason in p["failed"]]
        ids = [names[i] for i in positions]
        rows = [["image", "predicted"] + [f"prob_{c}" for c in range(probs.shape[1])]]
        rows += [
            [image_id, int(p.argmax())] + [f"{v:.6f}" for v in p.tolist()]
            for image_id, p in zip(ids, probs, strict=True)
        ]
        atomic_write_csv(out / "predictions.csv", rows)
        if skipped:
            atomic_write_csv(out / "skipped.csv", [["image", "reason"], *skipped])
            rank_zero_warn(
                f"predict: {len(skipped)} of {len(ids) + len(skipped)} images skipped as "
                f"unreadable, listed in {out / 'skipped.csv'}"
            )
        maps = [p["evidence"] for p in predictions if "evidence" in p]
        if maps:
            dataset = getattr(data, "datasets", {}).get("predict")
            grid = getattr(pl_module.classifier, "grid", None)
            heatmaps = zip(positions, ids, torch.cat(maps).cpu(), strict=True)
            _write_heatmaps(out / "heatmaps", heatmaps, dataset, grid)


def _write_heatmaps(
    folder: Path, heatmaps: Iterable[tuple[int, str, torch.Tensor]], dataset: Any, grid: Any
) -> None:
    """One PNG and one ``.npy`` per ``(position in dataset, image id, evidence map)``: the PNG
    shows the image (when the dataset can give it) under the map, the array is the map itself.

    Cells are placed at the grid's stride from the top-left, as the patches are; cells over the
    padding fall outside the image's frame.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for index, image_id, heat in heatmaps:
        fig, ax = plt.subplots(figsize=(5, 5))
        pixels, frame = None, None
        if getattr(dataset, "mode", None) == "lazy":  # a slide: its thumbnail, at its size
            pixels, frame = dataset.thumbnail(index), dataset.sizes[index]
        elif dataset is not None and hasattr(dataset, "read_resized"):
            pixels = dataset.read_resized(index)
            frame = pixels.shape[:2]
        if pixels is not None and frame is not None:
            ax.imshow(
                pixels.squeeze(),
                cmap="gray" if pixels.shape[-1] == 1 else None,
                extent=(0, frame[1], frame[0], 0),
            )
        rows, cols = heat.shape
        step = grid.stride if grid is not None else 1
        # Diverging colours centred on 0: a contribution can count against the class.
        limit = float(heat.abs().max()) or 1.0
        shown = ax.imshow(
            heat.numpy(),
            cmap="RdBu_r",
            vmin=-limit,
            vmax=limit,
            alpha=0.55 if pixels is not None else 1.0,
            extent=(0, cols * step, rows * step, 0),
            interpolation="nearest",
        )
        if frame is not None:
            ax.set_xlim(0, frame[1])
            ax.set_ylim(frame[0], 0)
        fig.colorbar(
            shown,
            ax=ax,
            fraction=0.046,
            format="%.2g",  # attention over thousands of positions is ~1e-4 each
            label="evidence (share of the predicted logit, or attention)",
        )
        ax.set_title(Path(image_id).name, fontsize=9)
        ax.axis("off")
        name = f"{index:05d}_{Path(image_id).stem}"
        atomic_write(
            folder / f"{name}.png", lambda handle, f=fig: f.savefig(handle, format="png", dpi=100)
        )
        plt.close(fig)
        array = heat.numpy()
        atomic_write(folder / f"{name}.npy", lambda handle, a=array: np.save(handle, a))
