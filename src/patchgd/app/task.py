"""The LightningModule that trains any patchgd classifier: PatchGD or a GD baseline.

Lightning owns the plumbing (devices, precision, checkpoints, logging); the algorithm stays in
the engine. Optimisation is manual because one PatchGD batch makes ceil(ζ/ε) optimizer steps:
the engine's :class:`~patchgd.algorithm.StepHooks` route its backward passes through
``manual_backward`` (precision scaling) and its optimizer steps through Lightning's optimizer,
advancing the learning-rate schedule once per optimizer step.
"""

from __future__ import annotations

import atexit
import logging
import math
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCohenKappa

from ..algorithm import StepHooks, StepResult
from ..data.lazy import LazyImage, on_canvas
from ..data.source_patches import LazyBatch
from ..errors import ConfigError, DataError, DivergedError
from ..memory import live_training_bytes, measure
from ..model import Classifier
from ..planner import ClassifierPlan, cap_cuda_memory
from ..schedule import warmup_then_linear_decay
from .datamodules import KeyedBatch, PredictBatch

logger = logging.getLogger("patchgd.data")  # skipped images, as the data modules report them


def _lazy_images(batch: Any) -> list[LazyImage]:
    """The lazy images of a batch, none for a batch of tensors."""
    return batch.images if isinstance(batch, LazyBatch) else []


def _metrics(num_classes: int, prefix: str) -> MetricCollection:
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
            "qwk": MulticlassCohenKappa(num_classes=num_classes, weights="quadratic"),
        },
        prefix=prefix,
    )


def _check_normalisation(data: Any, channels: int) -> None:
    """One value, or one per channel, for the data's ``mean`` and ``std``; every std above 0."""
    for name in ("mean", "std"):
        values = getattr(data, name, None)
        if values is None:
            continue
        values = [float(v) for v in values]
        if len(values) not in (1, channels):
            raise ConfigError(
                f"data.init_args.{name} has {len(values)} values but the model takes "
                f"{channels}-channel images; give 1 or {channels}"
            )
        if name == "std" and min(values) <= 0:
            raise ConfigError(f"data.init_args.std must be above 0 for every channel, got {values}")


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _destroy_process_group_at_exit() -> None:
    """Destroy this process's process group when the interpreter exits, while it still runs.

    Lightning does so for NCCL only. A gloo group left to the interpreter's finalisation can
    abort the process ("terminate called without an active exception"): its C++ threads may
    still hold tensors with Python references when the interpreter is torn down
    (pytorch/pytorch#179291, #190489). Unregistering first keeps one registration per process.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        atexit.unregister(_destroy_process_group)
        atexit.register(_destroy_process_group)


class PatchGDTask(L.LightningModule):
    """Trains, validates, tests and predicts with a :class:`~patchgd.model.Classifier`.

    Args:
        classifier: the model: :class:`~patchgd.PatchGDClassifier` or a GD baseline.
        lr: peak learning rate (Adam), for every parameter unless overridden below.
        encoder_lr, head_lr: peak learning rates of the backbone and of the layers after it
            (PatchGD: its encoder and head; GD: timm's classifier layer; GD-extended: its
            projection and head; see ``Classifier.param_groups``). ``None``: ``lr``; 0 leaves
            that part as it is.
        weight_decay: Adam's weight decay.
        warmup_epochs: linear warm-up from 0 over this many epochs (the paper: 2).
        final_lr_fraction: the learning rate decays linearly to this fraction of the peak by the
            last epoch (the paper: 0.5).
        channels_last: the memory format the classifier's backbone runs in: ``True``
            channels-last on every device (weights included), ``False`` as the images come,
            ``None`` the classifier's own (by default channels-last on the CPU; see
            :data:`patchgd.backbones.ChannelsLast`).
        predict_heatmaps: with PatchGD, ``predict`` also returns each position's evidence for
            the predicted class (:func:`patchgd.head.evidence`: attention weights, or the
            contribution to the class's logit), which the prediction writer draws over the image
            and saves as an array.
        recalibrate_bn_batches: before each validation during ``fit``, set BatchNorm's running
            statistics to those of this many training batches under the current weights
            (:meth:`~patchgd.model.Classifier.recalibrate_batchnorm`), so that validation and
            the saved checkpoints do not normalise with a lagging average; 0 turns it off.
    """

    def __init__(
        self,
        classifier: Classifier,
        lr: float = 1e-3,
        encoder_lr: float | None = None,
        head_lr: float | None = None,
        weight_decay: float = 0.0,
        warmup_epochs: float = 2.0,
        final_lr_fraction: float = 0.5,
        channels_last: bool | None = None,
        predict_heatmaps: bool = False,
        recalibrate_bn_batches: int = 4,
    ) -> None:
        super().__init__()
        if recalibrate_bn_batches < 0:
            raise ConfigError(
                f"recalibrate_bn_batches must be 0 (off) or more, got {recalibrate_bn_batches}"
            )
        if lr <= 0 or warmup_epochs < 0 or not 0 <= final_lr_fraction <= 1:
            raise ConfigError(
                f"need lr > 0, warmup_epochs >= 0 and final_lr_fraction in [0, 1]; got lr={lr}, "
                f"warmup_epochs={warmup_epochs}, final_lr_fraction={final_lr_fraction}"
            )
        for name, value in (("encoder_lr", encoder_lr), ("head_lr", head_lr)):
            if value is not None and value < 0:  # 0 is allowed: that part stays as it is
                raise ConfigError(f"model.{name} must be 0 or more, got {value}")
        if weight_decay < 0:
            raise ConfigError(f"model.weight_decay must be 0 or more, got {weight_decay}")
        # predict_heatmaps is a prediction-time switch: kept out of the checkpoint's
        # hyperparameters, which LightningCLI would otherwise re-apply over the command line.
        self.save_hyperparameters(ignore=["classifier", "predict_heatmaps"])
        self.predict_heatmaps = predict_heatmaps
        self.automatic_optimization = False
        self.set_classifier(classifier)
        # Set by the command line's --memory-budget (not hyperparameters: a budget is about the
        # machine, not the model): the cap, the plan, and the second step's measured peak.
        self.memory_budget: int | None = None
        self.memory_plan: ClassifierPlan | None = None
        self.measured_peak_bytes: int | None = None
        self._training_steps_run = 0
        n = classifier.num_classes
        self.train_metrics = _metrics(n, "train/")
        self.val_metrics = _metrics(n, "val/")
        self.test_metrics = _metrics(n, "test/")

    def set_classifier(self, classifier: Classifier) -> None:
        """Use ``classifier`` (e.g. one the memory planner rebuilt at another input size)."""
        self.classifier = classifier
        if self.hparams.channels_last is not None:
            self.classifier.channels_last = self.hparams.channels_last
        if self.hparams.channels_last:
            self.classifier.to(memory_format=torch.channels_last)

    # -- checks before any work -------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Refuse data that does not fit the model, before the first batch; cap CUDA memory;
        have a distributed process destroy its process group before it exits."""
        _destroy_process_group_at_exit()
        if self.memory_budget is not None and self._trainer is not None:
            cap_cuda_memory(self.memory_budget, self.trainer.strategy.root_device)
        data = self.trainer.datamodule if self._trainer is not None else None
        if stage == "predict" and self.trainer.world_size > 1:
            raise ConfigError(
                "predict runs in one process (its CSV lists images in order); "
                "use --trainer.devices 1"
            )
        if data is None:
            return
        classes = getattr(data, "num_classes", None)
        if stage != "predict" and classes is not None and classes != self.classifier.num_classes:
            raise ConfigError(
                f"the data has {classes} classes but model.classifier num_classes="
                f"{self.classifier.num_classes}"
            )
        size = getattr(data, "image_size", None)
        built_for = tuple(self.classifier.image_size)
        if size is not None and tuple(size) != built_for:
            raise ConfigError(
                f"the data gives {size[0]}×{size[1]} px images but model.classifier was built for "
                f"image_size={built_for[0]}×{built_for[1]}"
            )
        _check_normalisation(data, self.classifier.in_chans)
        channels = getattr(data, "channels", None)
        if channels is not None and channels != self.classifier.in_chans:
            raise ConfigError(
                f"the data gives {channels}-channel images but model.classifier was built for "
                f"in_chans={self.classifier.in_chans}"
            )

    # -- optimisation -------------------------------------------------------------------
    @property
    def steps_per_batch(self) -> int:
        """Optimizer steps per training batch: ceil(ζ/ε) for PatchGD, 1 for GD."""
        return self.classifier.optimizer_steps

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = self.classifier.param_groups(
            hp.lr if hp.encoder_lr is None else hp.encoder_lr,
            hp.lr if hp.head_lr is None else hp.head_lr,
        )
        optimizer = torch.optim.Adam(groups, weight_decay=hp.weight_decay)
        warmup, total = self._schedule_length()
        # LambdaLR gives optimizer step i (0-based) the factor of i + 1: the first step already
        # moves (1/warmup of the peak) and the last one runs at exactly final_lr_fraction.
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda i: warmup_then_linear_decay(i + 1, warmup, total, hp.final_lr_fraction),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule}}

    def _schedule_length(self) -> tuple[int, int]:
        """Warm-up and total length of the run, in optimizer steps."""
        trainer, per_batch = self.trainer, self.steps_per_batch
        estimated = trainer.estimated_stepping_batches  # also sets num_training_batches
        if not math.isfinite(estimated) or estimated < 1:
            raise ConfigError(
                "the run has no finite length in training batches: set trainer.max_epochs "
                "(or max_steps) to 1 or more and keep trainer.limit_train_batches above 0"
            )
        batches = int(estimated)
        # Under manual optimisation max_steps counts optimizer steps, not batches.
        total = trainer.max_steps if trainer.max_steps > 0 else batches * per_batch
        per_epoch = trainer.num_training_batches * per_batch
        warmup = round(self.hparams.warmup_epochs * per_epoch)
        if 0 < total <= warmup:
            raise ConfigError(
                f"warmup_epochs={self.hparams.warmup_epochs} ({warmup} optimizer steps) is not "
                f"shorter than the run ({total} optimizer steps); lower model.warmup_epochs or "
                "train longer"
            )
        return warmup, total

    # -- steps --------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> None:
        batch, keys = _unkeyed(batch)
        images, targets = self._prepare(batch)
        optimizer, schedule = self.optimizers(), self.lr_schedulers()

        applied_lr: list[float] = []

        def optimizer_step() -> None:
            self._refuse_nonfinite_gradients(batch_idx)
            applied_lr.append(schedule.get_last_lr()[0])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()  # per optimizer step: ζ and ε do not change the schedule's shape

        start = time.perf_counter()
        hooks = StepHooks(
            backward=self.manual_backward, optimizer_step=optimizer_step, grad_sync=self._grad_sync
        )
        extra: dict[str, Any] = {"keys": keys} if keys is not None else {}

        def step() -> StepResult:
            candidates = self._candidates(batch)  # lazy images: may read a slide's thumbnail
            if candidates is not None:
                extra["candidates"] = candidates
            return self.classifier.training_step(images, targets, optimizer, hooks=hooks, **extra)

        try:
            # The second step is the first in steady state: Adam's state is live throughout it.
            if self.memory_plan is not None and self._training_steps_run == 1:
                result = self._measure_step(step, images, optimizer)
            else:
                result = step()
        except DataError as err:
            if applied_lr or self.trainer.world_size > 1:
                raise  # weights already moved, or the other processes wait for this one
            logger.warning("skipped a training batch: %s", err)  # read before any weight moved
            return
        self._training_steps_run += 1
        seconds = time.perf_counter() - start
        batch_size = targets.shape[0]
        self.train_metrics.update(nonfinite_as_wrong(result.logits.float(), targets), targets)
        # Not synchronised across DDP processes: the progress bar computes the epoch's value on
        # rank 0 alone, before the epoch-end hooks, where a collective would wait for ranks
        # that never join it (Lightning-AI/pytorch-lightning#19604, #21264). Under DDP the
        # logged epoch loss is rank 0's; accuracy and validation are synchronised.
        self.log("train/loss", result.loss, prog_bar=True, on_epoch=True, batch_size=batch_size)
        self.log("train/images_per_s", batch_size / seconds, prog_bar=True, batch_size=batch_size)
        if result.patches_encoded is not None:
            rate = result.patches_encoded / seconds
            self.log("train/patches_per_s", rate, prog_bar=True, batch_size=batch_size)
        self.log("lr", applied_lr[-1], batch_size=batch_size)  # the rate the last step used

    def _refuse_nonfinite_gradients(self, batch_idx: int) -> None:
        """Stop before an optimizer step would write NaN or inf into the weights.

        The weights stay those of the last finite step, so the checkpoints already written stay
        good. Under fp16 the gradient scaler skips such steps itself and is left to do so.
        """
        if self._trainer is not None and self.trainer.precision in ("16-mixed", "16-true"):
            return
        grads = [p.grad for p in self.classifier.parameters() if p.grad is not None]
        if not grads or torch.nn.utils.get_total_norm(grads).isfinite():
            return
        epoch, step = (
            (self.current_epoch, self.global_step) if self._trainer is not None else (0, 0)
        )
        raise DivergedError(
            f"training diverged: non-finite gradients at epoch {epoch}, batch {batch_idx} "
            f"(optimizer step {step}); the weights keep the last finite step; lower model.lr "
            f"(now {self.hparams.lr:g})"
        )

    def _measure_step(
        self, step: Callable[[], StepResult], images: Any, optimizer: Any
    ) -> StepResult:
        """Run a training step under the memory probe and report it beside the plan."""
        optimizer = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper
        live = live_training_bytes(self.classifier, images, optimizer)
        result, report = measure(step, self.device)
        self.measured_peak_bytes = live + report.tensor_bytes
        plan = self.memory_plan
        assert plan is not None
        rank_zero_info(
            f"memory: the second training step peaked at {self.measured_peak_bytes / 2**20:.1f} "
            f"MiB; the plan predicted {plan.predicted_peak_bytes / 2**20:.1f} MiB of the "
            f"{plan.budget_bytes / 2**20:.1f} MiB budget"
        )
        return result

    def _grad_sync(self, sync: bool) -> AbstractContextManager[object]:
        """Under DDP, all-reduce gradients only in the inner iteration before an optimizer step.

        Lightning prepares DDP's reducer in every ``manual_backward`` unless the wrapper is in
        ``no_sync()``: inside it, gradients accumulate locally; the next synced backward reduces
        the accumulated sum.
        """
        model = self.trainer.strategy.model if self._trainer is not None else None
        if sync or not isinstance(model, DistributedDataParallel):
            return nullcontext()
        return model.no_sync()

    def on_train_epoch_end(self) -> None:
        self.log_dict(self.train_metrics.compute())
        self.train_metrics.reset()

    def _evaluate(
        self, batch: tuple[Tensor, Tensor], metrics: MetricCollection, stage: str
    ) -> None:
        images, targets = self._prepare(batch)
        try:
            candidates = self._candidates(batch)
            extra = {} if candidates is None else {"candidates": candidates}
            logits = self.classifier(images, **extra).float()
        except DataError as err:
            if self.trainer.world_size > 1:
                raise  # the other processes wait for this one's metrics
            logger.warning("skipped a %s batch: %s", stage, err)
            return
        self.log(
            f"{stage}/loss",
            F.cross_entropy(logits, targets),
            batch_size=targets.shape[0],
            sync_dist=True,
        )
        metrics.update(nonfinite_as_wrong(logits, targets), targets)

    def on_validation_epoch_start(self) -> None:
        batches = self.hparams.recalibrate_bn_batches
        if batches and self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.recalibrate_batchnorm(batches)

    def recalibrate_batchnorm(self, batches: int) -> None:
        """Recalibrate the classifier's BatchNorm on the first ``batches`` training batches.

        The batches come from a fresh training loader of the data module, drawn under a forked
        random state: the training's data order and dropout do not shift.
        """
        data = self.trainer.datamodule
        if data is None:
            return
        chosen = []
        with torch.random.fork_rng(devices=[]):
            for i, batch in enumerate(data.train_dataloader()):
                if i == batches:
                    break
                chosen.append(self.transfer_batch_to_device(_unkeyed(batch)[0], self.device, 0))
        while chosen:
            try:
                prepared = [self._prepare(batch)[0] for batch in chosen]
                masks = [self._candidates(batch) for batch in chosen]
                if any(mask is not None for mask in masks):  # lazy: what evaluation encodes
                    self.classifier.recalibrate_batchnorm(prepared, candidates=masks)
                else:
                    self.classifier.recalibrate_batchnorm(prepared)
                return
            except DataError as err:  # a slide that cannot be read: without its batch
                named = {id(b) for b in chosen if any(i.path in str(err) for i in _lazy_images(b))}
                if not named:
                    raise
                logger.warning("recalibration skipped a batch: %s", err)
                chosen = [b for b in chosen if id(b) not in named]

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.val_metrics.reset()

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
        self.test_metrics.reset()

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        if isinstance(batch, PredictBatch):  # positions kept: unreadable images left out
            found = {"index": batch.index, "failed": batch.failed}
            if batch.images is None:
                return {**found, "probs": torch.empty(0, self.classifier.num_classes)}
            if isinstance(batch.images, list):  # lazy: read patch by patch from disk
                return self._predict_lazy(batch)
            return {**found, **self._predict(batch.images)}
        return self._predict(batch[0] if isinstance(batch, tuple | list) else batch)

    def _predict(self, images: Any, candidates: Tensor | None = None) -> dict[str, Tensor]:
        if not self.predict_heatmaps and candidates is None:
            return {"probs": self.classifier.predict_proba(images)}
        probs, heatmap = self.classifier.predict_with_map(images, candidates)
        if heatmap is None or not self.predict_heatmaps:
            return {"probs": probs}
        return {"probs": probs, "evidence": heatmap}

    def _predict_lazy(self, batch: PredictBatch) -> dict[str, Any]:
        """A lazy batch's predictions. When an image cannot be read (a corrupt tile, larger
        than the model's ``image_size``), the batch's images are predicted one by one and the
        unreadable ones left out and reported, as unreadable files are."""
        images = batch.images
        assert isinstance(images, list)
        try:
            return {"index": batch.index, "failed": batch.failed, **self._predict_read(images)}
        except DataError:
            pass
        outputs, kept, failed = [], [], list(batch.failed)
        for image, position in zip(images, batch.index.tolist(), strict=True):
            try:
                outputs.append(self._predict_read([image]))
                kept.append(position)
            except DataError as err:
                logger.warning("skipped: %s", err)
                failed.append((position, str(err)))
        found = {"index": torch.tensor(kept, dtype=torch.long), "failed": failed}
        if not outputs:
            return {**found, "probs": torch.empty(0, self.classifier.num_classes)}
        return {**found, **{key: torch.cat([o[key] for o in outputs]) for key in outputs[0]}}

    def _predict_read(self, images: list[LazyImage]) -> dict[str, Tensor]:
        """Predictions for lazily read images, each placed on the model's canvas."""
        if not self.classifier.reads_patches:
            raise ConfigError("lazily read images (data mode: lazy) need PatchGDClassifier")
        grid = self.classifier.grid
        placed = [on_canvas(image, grid.image_size) for image in images]
        data = self.trainer.datamodule
        candidates = data.candidates(placed, grid)
        provider = data.patch_provider(placed, grid, self.device)
        return self._predict(provider, None if candidates is None else candidates.to(self.device))

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        if isinstance(batch, KeyedBatch):
            return batch._replace(
                batch=self.transfer_batch_to_device(batch.batch, device, dataloader_idx)
            )
        if isinstance(batch, LazyBatch):
            # LazyImage records stay on the host: their patches reach the device when read.
            return batch._replace(targets=batch.targets.to(device))
        if isinstance(batch, PredictBatch) and isinstance(batch.images, list):
            return batch  # lazy images, as above; positions stay on the host for the writer
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _prepare(self, batch: tuple[Any, Tensor]) -> tuple[Any, Tensor]:
        images, targets = batch
        if isinstance(batch, LazyBatch):  # read the patches from disk on demand
            if not self.classifier.reads_patches:
                raise ConfigError("lazily read images (data mode: lazy) need PatchGDClassifier")
            grid = self.classifier.grid
            return self.trainer.datamodule.patch_provider(images, grid, self.device), targets
        return images, targets

    def _candidates(self, batch: tuple[Any, Tensor]) -> Tensor | None:
        """Lazy images' tissue patches (``None``: every patch): the only ones the fill encodes
        and the sampler visits, in training and evaluation alike."""
        if not isinstance(batch, LazyBatch):
            return None
        return self.trainer.datamodule.candidates(batch.images, self.classifier.grid)

    # -- reproducible resume ------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint holding NaN or inf (e.g. BatchNorm statistics after a loss near 1e12)
        # is never written, so it can neither replace a good one nor be kept as best.
        for name, value in checkpoint.get("state_dict", {}).items():
            if (
                isinstance(value, Tensor)
                and value.is_floating_point()
                and not value.isfinite().all()
            ):
                raise DivergedError(
                    f"training diverged: {name} holds non-finite values at epoch "
                    f"{self.current_epoch} (optimizer step {self.global_step}); no checkpoint "
                    "was written; lower model.lr"
                )
        # Dropout and the data order draw on the global generators; a resumed run must
        # continue their streams, not restart them.
        # Stored as tensors and numbers only, so checkpoints load with weights_only=True.
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        _check_same_model(checkpoint.get("state_dict", {}), self.state_dict())
        states = checkpoint.get("rng_states")
        if states is not None:
            torch.set_rng_state(states["torch"])
            name, keys, pos, has_gauss, gauss = states["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            random.setstate(states["python"])
            if states.get("cuda") and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])


def _unkeyed(batch: Any) -> tuple[Any, list[int] | None]:
    """A batch without its keys, and the keys (``None`` for a batch that has none)."""
    if isinstance(batch, KeyedBatch):
        return batch.batch, batch.keys.tolist()
    return batch, None


def nonfinite_as_wrong(logits: Tensor, targets: Tensor) -> Tensor:
    """``logits`` with every row holding NaN or inf replaced by a confident wrong answer.

    ``argmax`` of a NaN row is class 0, so without this a diverged model scores as well as class
    0 is frequent, and could be kept as the best.
    """
    bad = ~logits.isfinite().all(dim=1)
    if not bad.any():
        return logits
    classes = logits.shape[1]
    wrong = F.one_hot((targets + 1) % classes, classes).to(logits.dtype)
    return torch.where(bad[:, None], wrong, logits)


def _check_same_model(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` when a checkpoint's weights do not fit this model."""
    shape = lambda v: tuple(v.shape) if isinstance(v, Tensor) else None  # noqa: E731
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    differ = sorted(k for k in set(saved) & set(current) if shape(saved[k]) != shape(current[k]))
    if missing or unexpected or differ:
        example = (
            f"{differ[0]} is {shape(saved[differ[0]])} there, {shape(current[differ[0]])} here"
            if differ
            else f"{(missing or unexpected)[0]} is {'missing' if missing else 'unexpected'}"
        )
        raise ConfigError(
            f"the checkpoint was saved from a different model: {len(missing)} missing, "
            f"{len(unexpected)} unexpected and {len(differ)} differently shaped weights "
            f"(e.g. {example})"
        )
