"""A small side-by-side run of PatchGD and GD on generated UltraMNIST, under one memory budget.

Every method gets the same emulated budget. The planner (:mod:`patchgd.planner`) measures trial
steps and gives each method the largest batch up to ``batch_size`` that fits (downscaled GD: the
largest input size at that batch). The first epoch then runs under the memory probe
(:func:`patchgd.memory.measure`), so the table reports each method's measured peak beside the
budget; time per epoch is the mean of the later, unprobed epochs. Uses only the public engine
API and a plain PyTorch loop, so it doubles as an example of training PatchGD in your own loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy, MulticlassCohenKappa

from .algorithm import InnerLoopConfig
from .baselines import DownscaledGDClassifier, GDClassifier
from .data.ultramnist import UltraMNIST, UltraMNISTConfig
from .head import HeadConfig
from .memory import live_training_bytes, measure
from .model import Classifier, PatchGDClassifier
from .planner import parse_size, plan_classifier


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo run; the defaults finish in a few minutes on two CPU cores.

    The default budget is below what GD needs for a batch of 8 full images (about 200 MiB with
    MobileNetV2 at 128 px) and above what PatchGD needs for one (about 70 MiB).
    """

    backbone: str = "mobilenetv2_100"
    canvas_size: int = 128
    patch_size: int = 32
    per_class_train: int = 30
    per_class_val: int = 10
    epochs: int = 3
    batch_size: int = 8
    memory_budget: str = "80MiB"
    lr: float = 1e-3
    sampling_fraction: float = 0.25
    latent_dim: int = 64
    seed: int = 0


@dataclass(frozen=True)
class DemoResult:
    method: str
    batch_size: int
    input_size: int
    accuracy: float
    qwk: float
    train_loss: float
    peak_bytes: int  # weights + the peak of live tensors in the first epoch, measured
    budget_bytes: int
    seconds_per_epoch: float  # the mean of the epochs after the first (unprobed)


def build_models(cfg: DemoConfig) -> dict[str, tuple[Classifier, Callable[[int], Classifier]]]:
    """PatchGD, GD and downscaled GD on the same backbone, each from the same seed.

    Each comes with ``rebuild(input_size)``, which the planner uses for downscaled GD.
    """

    def seeded(build: Callable[[], Classifier]) -> Classifier:
        torch.manual_seed(cfg.seed)
        return build()

    def downscaled(size: int) -> Classifier:
        return DownscaledGDClassifier(cfg.backbone, 10, cfg.canvas_size, size, in_chans=1)

    patchgd = seeded(
        lambda: PatchGDClassifier(
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
    )
    gd = seeded(lambda: GDClassifier(cfg.backbone, 10, cfg.canvas_size, in_chans=1))
    down = seeded(lambda: downscaled(cfg.canvas_size))
    return {
        "PatchGD": (patchgd, downscaled),
        "GD": (gd, downscaled),
        "GD, downscaled": (down, downscaled),
    }


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


def _materialise(dataset: UltraMNIST) -> TensorDataset:
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return TensorDataset(torch.stack(images), torch.as_tensor(labels))


def _epoch(model: Classifier, optimizer: torch.optim.Optimizer, loader: DataLoader) -> float:
    """One training epoch; the mean loss."""
    model.train()
    losses = [model.training_step(x, y, optimizer).loss for x, y in loader]
    return sum(losses) / len(losses)


def _input_size(model: Classifier, cfg: DemoConfig) -> int:
    return model.image_size[0] if isinstance(model, DownscaledGDClassifier) else cfg.canvas_size


def run_demo(cfg: DemoConfig = DemoConfig(), log: bool = True) -> list[DemoResult]:
    """Plan each method under ``cfg.memory_budget``, train it, evaluate on a validation split."""
    data_cfg = UltraMNISTConfig(canvas_size=cfg.canvas_size)
    # Generated once, before any probe: the probe then sees training, not image synthesis.
    train = _materialise(UltraMNIST("train", cfg.per_class_train, data_cfg, seed=cfg.seed))
    val = _materialise(UltraMNIST("val", cfg.per_class_val, data_cfg, seed=cfg.seed))
    budget = parse_size(cfg.memory_budget)
    say = print if log else (lambda _: None)
    results = []
    for method, (model, rebuild) in build_models(cfg).items():
        with torch.random.fork_rng():  # planning must not shift the training's random stream
            model, plan = plan_classifier(model, budget, cfg.batch_size, rebuild=rebuild)
        say(f"{method:15s} plan: {plan.description}")
        generator = torch.Generator().manual_seed(cfg.seed)
        loader = DataLoader(
            train, plan.batch_size, shuffle=True, drop_last=True, generator=generator
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        losses, seconds = [], []
        for epoch in range(cfg.epochs):
            start = time.perf_counter()
            if epoch == 0:
                # The first epoch runs under the probe: batches, activations, gradients and the
                # Adam state it creates. Later epochs repeat the same steps, unprobed and timed.
                loss, report = measure(lambda m=model, o=optimizer, d=loader: _epoch(m, o, d))
            else:
                loss = _epoch(model, optimizer, loader)
            seconds.append(time.perf_counter() - start)
            losses.append(loss)
            say(f"{method:15s} epoch {epoch + 1}/{cfg.epochs}  train loss {loss:.3f}")
        timed = seconds[1:] or seconds  # the probe slows the first epoch down
        acc, qwk = evaluate(model, DataLoader(val, cfg.batch_size))
        results.append(
            DemoResult(
                method,
                plan.batch_size,
                _input_size(model, cfg),
                acc,
                qwk,
                losses[-1],
                live_training_bytes(model) + report.tensor_bytes,
                budget,
                sum(timed) / len(timed),
            )
        )
    return results


def format_table(results: list[DemoResult]) -> str:
    header = (
        f"{'method':15s} {'batch':>5s} {'input px':>8s} {'val acc':>8s} {'val QWK':>8s} "
        f"{'train loss':>10s} {'peak MiB':>9s} {'budget MiB':>10s} {'s/epoch':>8s}"
    )
    rows = [header]
    rows += [
        f"{r.method:15s} {r.batch_size:5d} {r.input_size:8d} {r.accuracy:8.3f} {r.qwk:8.3f} "
        f"{r.train_loss:10.3f} {r.peak_bytes / 2**20:9.1f} {r.budget_bytes / 2**20:10.1f} "
        f"{r.seconds_per_epoch:8.1f}"
        for r in results
    ]
    return "\n".join(rows)
