"""Lightning data modules: UltraMNIST generated on the fly, and a CSV + folder of images."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from ..data.dataset import LargeImageDataset
from ..data.finedetail import FineDetail, FineDetailConfig
from ..data.lazy import LazyImage
from ..data.normalisation import ChannelNorm
from ..data.source_patches import SourcePatches, collate_lazy, image_patches
from ..data.table import DEFAULT_EXTENSIONS, ImageTable, TableItem, read_table, stratified_folds
from ..data.tissue import TissueMasks
from ..data.ultramnist import UltraMNIST, UltraMNISTConfig
from ..errors import ConfigError, DataError
from ..grid import PatchGrid

logger = logging.getLogger("patchgd.data")


class _Normalized(Dataset):
    """A dataset of ``(tensor, label)`` with its tensors normalised (:class:`ChannelNorm`)."""

    def __init__(self, data: Dataset, norm: ChannelNorm) -> None:
        self.data, self.norm = data, norm

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.data[index]
        return self.norm(image), label  # a copy: the data set keeps its tensors


class KeyedBatch(NamedTuple):
    """A training batch with its images' indices in the training split.

    The keys let a model keep state per image between visits (PatchGD's Z reuse,
    ``z_refresh_every``); ``batch`` is what the split's collate gives (``[images, targets]``
    or a :class:`~patchgd.data.source_patches.LazyBatch`).
    """

    batch: Any
    keys: Tensor


class _Keyed(Dataset):
    """Item i of ``data`` paired with i."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.data[index], index


class _KeyedCollate:
    """Collates ``(item, index)`` pairs into a :class:`KeyedBatch` (a class, so worker
    processes can pickle it)."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate or default_collate

    def __call__(self, pairs: list[tuple[Any, int]]) -> KeyedBatch:
        items, keys = zip(*pairs, strict=True)
        return KeyedBatch(self.collate(list(items)), torch.as_tensor(keys, dtype=torch.long))


class EpochShuffle(Sampler[int]):
    """A random order per epoch that depends only on ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` before every epoch (as for ``DistributedSampler``), so a
    run resumed at epoch e draws the same order as an uninterrupted run does at epoch e.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):  # type: ignore[no-untyped-def]
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


class _Loaders(L.LightningDataModule):
    """Shared DataLoader settings; subclasses fill ``self.datasets`` in ``setup``."""

    def __init__(self, batch_size: int, num_workers: int, seed: int) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ConfigError(
                f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}"
            )
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.datasets: dict[str, Dataset] = {}

    @property
    def channels(self) -> int | None:
        """Image channels, once ``setup`` has built the splits (``None`` before)."""
        data = next(iter(self.datasets.values()), None)
        return getattr(data, "channels", None)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        data, collate = self.datasets[split], self._collate()
        if split == "train":  # training batches name their images: see KeyedBatch
            data, collate = _Keyed(data), _KeyedCollate(collate)
        return DataLoader(
            data,
            batch_size=self.batch_size,
            sampler=EpochShuffle(len(data), self.seed) if shuffle else None,  # type: ignore[arg-type]
            drop_last=shuffle,
            num_workers=self.num_workers,
            # Its own generator: a loader must not draw its base seed from the global stream,
            # or an extra pass (a resumed run's sanity check) would shift dropout's randomness.
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=collate,
        )

    def _collate(self) -> Any:
        """The DataLoaders' ``collate_fn`` (``None``: PyTorch's default)."""
        return None

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class _Generated(_Loaders):
    """A synthetic data set generated on the fly: ``config`` has ``canvas_size`` and
    ``num_classes``; subclasses build one split in ``_split``."""

    config: Any

    def __init__(
        self,
        sizes: dict[str, int],
        channels: int,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        batch_size: int,
        num_workers: int,
        seed: int,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        self.sizes, self._channels, self.mean, self.std = sizes, channels, mean, std

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def channels(self) -> int:
        return self._channels

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.config.canvas_size, self.config.canvas_size)

    def _split(self, split: str, per_class: int) -> Dataset:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        for split, per_class in self.sizes.items():
            data = self._split(split, per_class)
            norm = ChannelNorm(self.mean, self.std)
            if not norm.is_identity:
                data = _Normalized(data, norm)
            self.datasets[split] = data


class UltraMNISTDataModule(_Generated):
    """UltraMNIST generated on the fly (no files), the project's embedded default data.

    Args:
        canvas_size: image side in pixels (the paper: 512).
        per_class_train, per_class_val, per_class_test: images per class of each split; the
            splits draw on disjoint digit pictures.
        variant: ``"paper"`` (10 classes) or ``"original"`` (28 classes).
        channels: 1 (grayscale) or 3 (gray repeated, for RGB backbones).
        mean, std: per-channel normalisation (``patchgd data stats``); ``None`` keeps [0, 1].
        batch_size, num_workers: DataLoader settings.
        seed: generation seed and shuffle seed.
    """

    def __init__(
        self,
        canvas_size: int = 512,
        per_class_train: int = 1000,
        per_class_val: int = 100,
        per_class_test: int = 100,
        variant: Literal["paper", "original"] = "paper",
        channels: int = 1,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        sizes = {"train": per_class_train, "val": per_class_val, "test": per_class_test}
        super().__init__(sizes, channels, mean, std, batch_size, num_workers, seed)
        self.config = UltraMNISTConfig(canvas_size=canvas_size, variant=variant)

    def _split(self, split: str, per_class: int) -> Dataset:
        return UltraMNIST(split, per_class, self.config, self.seed, channels=self.channels)


class FineDetailDataModule(_Generated):
    """FineDetail generated on the fly (no files): a detail-bound task (``docs/finedetail.md``).

    Args:
        canvas_size: image side in pixels (even; 1024 by default).
        object_size: side of every object in pixels, whatever the canvas.
        per_class_train, per_class_val, per_class_test: images per class of each split.
        channels: 1 (grayscale) or 3 (gray repeated, for RGB backbones).
        mean, std: per-channel normalisation; ``None`` keeps [0, 1].
        batch_size, num_workers: DataLoader settings.
        seed: generation seed and shuffle seed.
    """

    def __init__(
        self,
        canvas_size: int = 1024,
        object_size: int = 24,
        per_class_train: int = 250,
        per_class_val: int = 50,
        per_class_test: int = 250,
        channels: int = 1,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        sizes = {"train": per_class_train, "val": per_class_val, "test": per_class_test}
        super().__init__(sizes, channels, mean, std, batch_size, num_workers, seed)
        self.config = FineDetailConfig(canvas_size=canvas_size, object_size=object_size)

    def _split(self, split: str, per_class: int) -> Dataset:
        return FineDetail(split, per_class, self.config, self.seed, channels=self.channels)


class _LazyLoaders(_Loaders):
    """Lazy mode's options, and what the task asks of a data module whose images are read
    patch by patch from disk (:meth:`patch_provider`, :meth:`candidates`)."""

    fill: Sequence[float]
    mean: Sequence[float] | None
    std: Sequence[float] | None
    keep_gray: bool = False

    def _lazy_options(
        self,
        mode: str,
        level: int | None,
        mpp: float | None,
        canvas: tuple[int, int] | None,
        reader_workers: int,
        tissue_masks: bool,
        tissue_cache: str | None,
    ) -> None:
        if mode not in ("resize", "lazy"):
            raise ConfigError(f"mode must be 'resize' or 'lazy', got {mode!r}")
        if mode == "resize" and (level is not None or mpp is not None or tissue_masks):
            raise ConfigError("level, mpp and tissue_masks are lazy-mode options; set mode: lazy")
        self.mode, self.level, self.mpp, self._canvas = mode, level, mpp, canvas
        self.reader_workers = reader_workers
        self.masks = TissueMasks(tissue_cache) if tissue_masks else None

    def _lazy(self, table: ImageTable, canvas: tuple[int, int] | None) -> LargeImageDataset:
        level_choice = {"level": self.level, "mpp": self.mpp}
        if self.level is None and self.mpp is None:
            level_choice = {"level": 0}
        return LargeImageDataset(
            table,
            mode="lazy",
            fill=self.fill,
            canvas=canvas,
            keep_gray=self.keep_gray,
            **level_choice,
        )

    def patch_provider(self, images: list[LazyImage], grid: PatchGrid, device: torch.device):
        """The batch's patches, read from disk on demand (lazy mode)."""
        return SourcePatches(
            images,
            grid,
            mean=self.mean,
            std=self.std,
            device=device,
            num_workers=self.reader_workers,
        )

    def candidates(self, images: list[LazyImage], grid: PatchGrid) -> Tensor | None:
        """Per image, the patches the fill encodes and the sampler visits: its tissue patches
        with tissue masks, else those that overlap the image (``None``: every patch)."""
        if self.masks is not None:  # tissue within each image's own grid
            return self.masks.candidates_batch(images, grid) & image_patches(images, grid)
        if self.trainer is not None and self.trainer.world_size > 1:
            # The default ζ follows the batch's candidates, and every DDP process must make as
            # many inner iterations as the others: padding alone is not worth that risk.
            return None
        inside = image_patches(images, grid)
        return None if bool(inside.all()) else inside

    def _collate(self) -> Any:
        return collate_lazy if self.mode == "lazy" else None  # LazyImage records: a list


class ImageFolderDataModule(_LazyLoaders):
    """Images listed in a labels CSV: resized as in the paper, or read patch by patch from disk.

    The CSV's ``split`` column (train/val/test) chooses the splits; without one, ``fold``
    selects the validation fold of a stratified ``num_folds``-fold split of the rows (PANDA's
    protocol) and the test split is the validation fold.

    Args:
        csv: the labels CSV; ``root``: the folder its ids are relative to.
        target_size: the longest side after resizing; images are padded to a square.
        fill: padding colour in uint8 units (255 for slides).
        num_classes: classes (default: from the labels).
        mean, std: per-channel normalisation (``patchgd data stats``).
        fold, num_folds: cross-validation when the CSV has no split column.
        mode: ``"resize"`` (the paper's preparation, tensors) or ``"lazy"``: nothing is decoded
            up front; PatchGD reads each patch from the pyramid ``level`` (or the level for
            ``mpp``) when it needs it, so images of any size train in bounded memory.
        level, mpp: lazy mode's pyramid level, or its microns per pixel.
        canvas: lazy mode's common ``[height, width]``, equal to the model's ``image_size``;
            images sit at its top-left, padded with ``fill``. Default: the largest image.
        reader_workers: lazy mode: DataLoader workers reading the fill's patches.
        tissue_masks: lazy mode: sample only tissue patches (Otsu on thumbnail saturation);
            masks are cached in ``tissue_cache`` when given.
    """

    def __init__(
        self,
        csv: str,
        root: str | None = None,
        target_size: int = 512,
        fill: Sequence[float] = (255.0, 255.0, 255.0),
        num_classes: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        fold: int = 0,
        num_folds: int = 5,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        mode: Literal["resize", "lazy"] = "resize",
        level: int | None = None,
        mpp: float | None = None,
        canvas: tuple[int, int] | None = None,
        reader_workers: int = 0,
        tissue_masks: bool = False,
        tissue_cache: str | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        self._lazy_options(mode, level, mpp, canvas, reader_workers, tissue_masks, tissue_cache)
        self.csv, self.root, self._num_classes = csv, root, num_classes
        self.target_size, self.fill, self.mean, self.std = target_size, fill, mean, std
        self.fold, self.num_folds = fold, num_folds
        self._table: ImageTable | None = None

    @property
    def table(self) -> ImageTable:
        """The validated labels table, read on first use (so a config builds without data)."""
        if self._table is None:
            self._table = read_table(self.csv, self.root, num_classes=self._num_classes)
        return self._table

    @property
    def num_classes(self) -> int:
        return self.table.num_classes

    @property
    def image_size(self) -> tuple[int, int]:
        if self.mode == "resize":
            return (self.target_size, self.target_size)
        if self._canvas is None:  # the largest image at its level, found from the headers
            self._canvas = self._lazy(self.table, canvas=None).canvas
        return tuple(self._canvas)  # type: ignore[return-value]

    def _splits(self) -> dict[str, ImageTable]:
        if any(item.split is not None for item in self.table.items):
            return {s: self.table.split(s) for s in ("train", "val", "test")}
        folded = stratified_folds(self.table, self.num_folds, self.seed)
        val = folded.fold(self.fold, "val")
        return {"train": folded.fold(self.fold, "train"), "val": val, "test": val}

    def setup(self, stage: str | None = None) -> None:
        for split, table in self._splits().items():
            if self.mode == "lazy":
                self.datasets[split] = self._lazy(table, canvas=self.image_size)
            else:
                self.datasets[split] = LargeImageDataset(
                    table,
                    target_size=self.target_size,
                    fill=self.fill,
                    mean=self.mean,
                    std=self.std,
                )


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Files as given; folders replaced by the images inside them (recursively, sorted)."""
    paths: list[str] = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            named = sorted(
                p for p in path.rglob("*") if p.name.lower().endswith(tuple(DEFAULT_EXTENSIONS))
            )
            found = []
            for p in named:
                if p.is_file():
                    found.append(str(p))
                else:  # a folder, broken link or link loop named like an image
                    logger.warning("skipped %s: not a readable file", p)
            if not found:
                logger.warning("skipped %s: a folder with no image in it", path)
            paths += found
        else:
            paths.append(str(path))  # a missing file is reported (and skipped) by the dataset
    if not paths:
        raise ConfigError(f"inputs={list(inputs)!r}: no image found")
    return paths


class PredictBatch(NamedTuple):
    """A batch of images to classify: the readable ones, and the ones whose decoding failed."""

    #: the readable images (lazy mode: their :class:`LazyImage` records), ``None`` when none was
    images: Tensor | list[LazyImage] | None
    index: Tensor  #: their positions in the data set
    failed: list[tuple[int, str]]  #: ``(position, reason)`` of each unreadable image


class _Readable(Dataset):
    """``(image, position, None)``, or ``(None, position, reason)`` when decoding fails.

    Damage that only decoding reveals (a truncated PNG) costs that image alone, also inside a
    DataLoader worker.
    """

    def __init__(self, data: LargeImageDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Tensor | None, int, str | None]:
        try:
            image, _ = self.data[index]
        except DataError as err:
            logger.warning("skipped: %s", err)
            return None, index, str(err)
        return image, index, None  # type: ignore[return-value]


def collate_readable(
    items: list[tuple[Tensor | LazyImage | None, int, str | None]],
) -> PredictBatch:
    """Stack the readable images of a batch (list lazy ones); keep the reasons of the others."""
    readable = [(image, index) for image, index, _ in items if image is not None]
    images: Tensor | list[LazyImage] | None = None
    if readable and isinstance(readable[0][0], LazyImage):
        images = [image for image, _ in readable]  # type: ignore[misc]
    elif readable:
        images = torch.stack([image for image, _ in readable])  # type: ignore[misc]
    return PredictBatch(
        images=images,
        index=torch.tensor([index for _, index in readable], dtype=torch.long),
        failed=[(index, reason) for image, index, reason in items if image is None],
    )


class PredictImagesDataModule(_LazyLoaders):
    """Images to classify, without labels: files and folders, in any format ``open_image`` reads.

    Images are resized like ``ImageFolderDataModule`` (longest side ``target_size``, padded to a
    square with ``fill``), or with ``mode: lazy`` read patch by patch from pyramid ``level`` (or
    the level for ``mpp``), each on its own grid within the model's ``image_size``, with tissue
    masks as in training; use the training run's ``mean``/``std`` and lazy options. Unreadable
    files are skipped and reported, one line each: files that cannot be opened when the data
    set is built, and files whose decoding fails (a truncated PNG, a corrupt tile) when their
    batch is read; the others are predicted. Batches are :class:`PredictBatch`.
    """

    def __init__(
        self,
        inputs: list[str],
        target_size: int = 512,
        fill: Sequence[float] = (255.0, 255.0, 255.0),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        keep_gray: bool = False,
        batch_size: int = 8,
        num_workers: int = 0,
        mode: Literal["resize", "lazy"] = "resize",
        level: int | None = None,
        mpp: float | None = None,
        reader_workers: int = 0,
        tissue_masks: bool = False,
        tissue_cache: str | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, seed=0)
        # No canvas: each image is placed on the model's (see PatchGDTask.predict_step).
        self._lazy_options(mode, level, mpp, None, reader_workers, tissue_masks, tissue_cache)
        self.inputs, self.target_size, self.fill = inputs, target_size, fill
        self.mean, self.std, self.keep_gray = mean, std, keep_gray

    def setup(self, stage: str | None = None) -> None:
        items = [TableItem(image_id=p, path=p, label=0) for p in expand_inputs(self.inputs)]
        table = ImageTable(items=items, num_classes=1, source="inputs")
        if self.mode == "lazy":
            self.datasets["predict"] = self._lazy(table, canvas=None)
            return
        self.datasets["predict"] = LargeImageDataset(
            table,
            target_size=self.target_size,
            fill=self.fill,
            mean=self.mean,
            std=self.std,
            keep_gray=self.keep_gray,
        )

    @property
    def image_size(self) -> tuple[int, int] | None:
        """The resized size; ``None`` in lazy mode, where each image takes the model's."""
        return (self.target_size, self.target_size) if self.mode == "resize" else None

    @property
    def image_ids(self) -> list[str]:
        """The images of the data set by position (files that could not be opened left out)."""
        return [item.path for item in self.datasets["predict"].items]  # type: ignore[attr-defined]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """``(file, reason)`` of each file left out when the data set was built."""
        data = self.datasets["predict"]
        return [(s.item, s.reason) for s in data.skipped]  # type: ignore[attr-defined]

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            _Readable(self.datasets["predict"]),  # type: ignore[arg-type]
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=collate_readable,
        )
