"""A small side-by-side run of PatchGD and GD on generated UltraMNIST, on the CPU.

Uses only the public engine API and a plain PyTorch loop, so it doubles as an example of
training PatchGD in your own loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy, MulticlassCohenKappa

from .algorithm import InnerLoopConfig
from .baselines import GDClassifier
from .data.ultramnist import UltraMNIST, UltraMNISTConfig
from .head import HeadConfig
from .model import Classifier, PatchGDClassifier


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo run; the defaults finish in a few minutes on two CPU cores."""

    backbone: str = "mobilenetv2_100"
    canvas_size: int = 128
    patch_size: int = 32
    per_class_train: int = 30
    per_class_val: int = 10
    epochs: int = 3
    batch_size: int = 8
    lr: float = 1e-3
    sampling_fraction: float = 0.25
    latent_dim: int = 64
    seed: int = 0


@dataclass(frozen=True)
class DemoResult:
    method: str
    accuracy: float
    qwk: float
    train_loss: float
    seconds_per_epoch: float


def build_models(cfg: DemoConfig) -> dict[str, Classifier]:
    """PatchGD and GD on the same backbone, both from the same seed."""
    torch.manual_seed(cfg.seed)
    patchgd = PatchGDClassifier(
        cfg.backbone,
        10,
        cfg.canvas_size,
        cfg.patch_size,
        in_chans=1,
        latent_dim=cfg.latent_dim,
        head=HeadConfig(width=cfg.latent_dim),
        loop=InnerLoopConfig(sampling_fraction=cfg.sampling_fraction),
        seed=cfg.seed,
    )
    torch.manual_seed(cfg.seed)
    gd = GDClassifier(cfg.backbone, 10, cfg.canvas_size, in_chans=1)
    return {"PatchGD": patchgd, "GD": gd}


def evaluate(model: Classifier, loader: DataLoader) -> tuple[float, float]:
    """Accuracy and quadratic weighted kappa of ``model`` on ``loader``."""
    accuracy = MulticlassAccuracy(num_classes=10, average="micro")
    kappa = MulticlassCohenKappa(num_classes=10, weights="quadratic")
    model.eval()
    with torch.no_grad():
        for images, targets in loader:
            preds = model(images).argmax(dim=1)
            accuracy.update(preds, targets)
            kappa.update(preds, targets)
    return float(accuracy.compute()), float(kappa.compute())


def run_demo(cfg: DemoConfig = DemoConfig(), log: bool = True) -> list[DemoResult]:
    """Train PatchGD and GD for ``cfg.epochs`` epochs each and evaluate on a validation split."""
    data_cfg = UltraMNISTConfig(canvas_size=cfg.canvas_size)
    train = UltraMNIST("train", cfg.per_class_train, data_cfg, seed=cfg.seed)
    val = UltraMNIST("val", cfg.per_class_val, data_cfg, seed=cfg.seed)
    results = []
    for method, model in build_models(cfg).items():
        generator = torch.Generator().manual_seed(cfg.seed)
        loader = DataLoader(
            train, cfg.batch_size, shuffle=True, drop_last=True, generator=generator
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        losses, start = [], time.perf_counter()
        for epoch in range(cfg.epochs):
            model.train()
            epoch_losses = [model.training_step(x, y, optimizer).loss for x, y in loader]
            losses.append(sum(epoch_losses) / len(epoch_losses))
            if log:
                print(f"{method:8s} epoch {epoch + 1}/{cfg.epochs}  train loss {losses[-1]:.3f}")
        seconds = (time.perf_counter() - start) / cfg.epochs
        acc, qwk = evaluate(model, DataLoader(val, cfg.batch_size))
        results.append(DemoResult(method, acc, qwk, losses[-1], seconds))
    return results


def format_table(results: list[DemoResult]) -> str:
    rows = [f"{'method':8s} {'val acc':>8s} {'val QWK':>8s} {'train loss':>10s} {'s/epoch':>8s}"]
    rows += [
        f"{r.method:8s} {r.accuracy:8.3f} {r.qwk:8.3f} {r.train_loss:10.3f} "
        f"{r.seconds_per_epoch:8.1f}"
        for r in results
    ]
    return "\n".join(rows)
