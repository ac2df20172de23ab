"""PatchGD against the GD baselines under one memory budget, on a task that downscaling ruins.

The task is FineDetail (:mod:`patchgd.data.finedetail`): the label is a 2 px texture on a few
small objects of a large canvas, and an antialiased resize by two erases it. The demo's variant
puts the texture on every object, at twice the default contrast: with the default (one to three
textured objects among up to eight) nothing learns from scratch in a three-minute run, while GD
without a budget (batch 8) reaches 0.73 on this variant after one epoch. PatchGD encodes
patches of 128 px: without a budget it scored 0.64 there against 0.52 at 64 px (3 seeds), with
epochs a quarter shorter (``benchmarks/patch_size.py``), so four epochs fit in the three
minutes. PatchGD takes one optimizer step per inner iteration (ε = 1, the paper's best
UltraMNIST setting, Table 5) and fills Z with its encoder's running BatchNorm statistics (the
library's default), and every method's learning rate falls linearly from its peak to 0 over the
run (the studies behind all three are in ``docs/reproduction.md``). Every method gets the
same emulated budget. The planner (:mod:`patchgd.planner`) measures trial steps and gives each
method the largest batch up to ``batch_size`` that fits; downscaled GD instead gets the largest
input side at that batch. A method that cannot train
even one image is reported as not fitting. Before every evaluation each model's BatchNorm is
recalibrated on training images (:mod:`patchgd.batchnorm`). The first epoch runs under the
memory probe (:func:`patchgd.memory.measure`), so the table reports each method's measured peak
beside the budget. Uses only the public engine API and a plain PyTorch loop, so it doubles as
an example of training PatchGD in your own loop.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from .algorithm import FillNorm, InnerLoopConfig
from .backbones import LinearInit
from .baselines import DownscaledGDClassifier, GDClassifier, GDExtendedClassifier
from .data.finedetail import FineDetail, FineDetailConfig
from .errors import ConfigError, require_count
from .head import HeadConfig, Pool
from .memory import live_training_bytes, measure
from .model import Classifier, PatchGDClassifier
from .planner import parse_size, plan_classifier
from .schedule import warmup_then_linear_decay


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo run; the defaults finish in about three minutes on two CPU cores."""

    backbone: str = "mobilenetv3_small_050"
    canvas_size: int = 512
    object_size: int = 24
    objects: int = 4
    textured: int = 4
    contrast: float = 0.8
    patch_size: int = 128
    per_class_train: int = 30
    per_class_val: int = 10
    calibration_images: int = 64
    epochs: int = 4
    batch_size: int = 8
    memory_budget: str = "48MiB"
    lr: float = 1e-3
    lr_decay: bool = True  # every method's learning rate falls linearly to 0 over the run
    accumulation: int | None = 1  # PatchGD's ε: inner iterations per optimizer step (None: ζ)
    sampling_fraction: float = 0.125
    max_visit_fraction: float = 0.5
    latent_dim: int = 32
    head_layers: int = 0  # stride-2 convolutions on Z; 0: Z pooled, one linear layer
    head_pool: Pool = "avg"  # how the head pools Z: "avg" or "attention" (gated attention-MIL)
    fill_chunk: int = 64
    fill_norm: FillNorm = "running"  # PatchGD's BatchNorm in the Z-fill: "running" or "batch"
    linear_init: LinearInit = "default"  # PatchGD's projection and head layer (see backbones)
    z_refresh_every: int = 1  # PatchGD's Z reuse: fill each image's Z on one epoch in this many
    baselines: bool = True  # false: PatchGD alone
    val_each_epoch: bool = True  # false: validate after the last epoch only (same training)
    accumulated_gd: bool = False  # also checkpointed GD accumulating to PatchGD's batch (slow)
    extended_gd: bool = False  # also GD-extended (PatchGD's head on the feature map), 2 ways
    seed: int = 0
    out: str = "demo"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "per_class_train", "per_class_val"):
            require_count(f"--{name.replace('_', '-')}", getattr(self, name))
        if self.calibration_images < 0:
            raise ConfigError(
                f"--calibration-images must be 0 or more, got {self.calibration_images}"
            )
        if not self.lr > 0:
            raise ConfigError(f"--lr must be above 0, got {self.lr}")


@dataclass(frozen=True)
class DemoResult:
    """One method's row: its plan, what it learned, what it cost."""

    method: str
    fits: bool
    batch: int | None = None
    input_px: int | None = None
    val_acc: float | None = None
    val_curve: list[float] = field(default_factory=list)  # after each validated epoch
    epochs: int = 0
    train_loss: float | None = None
    peak_mib: float | None = None  # weights + the peak of live tensors in the first epoch
    budget_mib: float = 0.0
    s_per_epoch: float | None = None  # the mean of the epochs after the first (unprobed)
    note: str = ""


def task_config(cfg: DemoConfig) -> FineDetailConfig:
    """The demo's FineDetail: ``objects`` objects per image, ``textured`` of them textured."""
    return FineDetailConfig(
        canvas_size=cfg.canvas_size,
        object_size=cfg.object_size,
        objects=(cfg.objects, cfg.objects),
        textured=(cfg.textured, cfg.textured),
        contrast=cfg.contrast,
    )


def patchgd_head(cfg: DemoConfig) -> HeadConfig:
    """The head on Z: ``head_layers`` stride-2 convolutions, ``head_pool``, one linear layer."""
    return HeadConfig(
        width=cfg.latent_dim,
        stride1_layers=0,
        stride2_layers=cfg.head_layers,
        dropout=0.0,
        pool=cfg.head_pool,
    )


def patchgd_model(cfg: DemoConfig, loop: InnerLoopConfig | None = None) -> PatchGDClassifier:
    """The demo's PatchGD: ``cfg``'s patches, latent width and head, trained by ``loop``.

    ``loop`` defaults to ``cfg``'s sampling (``sampling_fraction``, ``max_visit_fraction``) and
    ``accumulation`` (ε).
    """
    return PatchGDClassifier(
        cfg.backbone,
        FineDetailConfig().num_classes,
        cfg.canvas_size,
        cfg.patch_size,
        in_chans=1,
        latent_dim=cfg.latent_dim,
        head=patchgd_head(cfg),
        loop=loop
        or InnerLoopConfig(
            sampling_fraction=cfg.sampling_fraction,
            max_visit_fraction=cfg.max_visit_fraction,
            accumulation=cfg.accumulation,
        ),
        fill_chunk=cfg.fill_chunk,
        fill_norm=cfg.fill_norm,
        linear_init=cfg.linear_init,
        z_refresh_every=cfg.z_refresh_every,
        seed=cfg.seed,
    )


def build_models(cfg: DemoConfig) -> dict[str, tuple[Classifier, Callable[[int], Classifier]]]:
    """PatchGD and the GD baselines on the same backbone, each from the same seed.

    Each comes with ``rebuild(input_size)``, which the planner uses for downscaled GD.
    """
    classes = FineDetailConfig().num_classes

    def seeded(build: Callable[[], Classifier]) -> Classifier:
        torch.manual_seed(cfg.seed)
        return build()

    def downscaled(size: int) -> Classifier:
        return DownscaledGDClassifier(cfg.backbone, classes, cfg.canvas_size, size, in_chans=1)

    def gd(checkpointing: bool, micro_batch: int | None = None) -> Classifier:
        return GDClassifier(
            cfg.backbone,
            classes,
            cfg.canvas_size,
            in_chans=1,
            grad_checkpointing=checkpointing,
            micro_batch=micro_batch,
        )

    def extended(checkpointing: bool) -> Classifier:
        return GDExtendedClassifier(
            cfg.backbone,
            classes,
            cfg.canvas_size,
            latent_dim=cfg.latent_dim,
            head=patchgd_head(cfg),
            in_chans=1,
            grad_checkpointing=checkpointing,
        )

    patchgd = seeded(lambda: patchgd_model(cfg))
    if not cfg.baselines:
        return {"PatchGD": (patchgd, downscaled)}
    methods = {
        "PatchGD": (patchgd, downscaled),
        "GD": (seeded(lambda: gd(False)), downscaled),
        "GD, checkpointed": (seeded(lambda: gd(True)), downscaled),
    }
    if cfg.accumulated_gd:
        methods[ACCUMULATED] = (seeded(lambda: gd(True, micro_batch=1)), downscaled)
    if cfg.extended_gd:
        methods["GD-extended"] = (seeded(lambda: extended(False)), downscaled)
        methods["GD-ext., ckpt"] = (seeded(lambda: extended(True)), downscaled)
    methods["GD, downscaled"] = (seeded(lambda: downscaled(cfg.canvas_size)), downscaled)
    return methods


#: Checkpointed GD accumulating gradients over PatchGD's batch: as many images per optimizer
#: step as PatchGD, in the largest micro-batches the budget leaves beside the whole batch.
ACCUMULATED = "GD, ckpt, accum."


def evaluate(
    model: Classifier,
    loader: DataLoader,
    num_classes: int,
    calibration: Sequence[torch.Tensor] = (),
) -> float:
    """Accuracy of ``model`` on ``loader``, after recalibrating its BatchNorm on ``calibration``.

    Recalibration (:meth:`~patchgd.model.Classifier.recalibrate_batchnorm`) matters: from random
    initialisation the running statistics lag the weights, and in eval mode a model whose
    training loss has fallen can still score at chance (``docs/finedetail.md``).
    """
    if calibration:
        model.recalibrate_batchnorm(calibration)
    accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
    model.eval()
    with torch.no_grad():
        for images, targets in loader:
            accuracy.update(model(images).argmax(dim=1), targets)
    return float(accuracy.compute())


def calibration_batches(train: TensorDataset, images: int, batch_size: int) -> list[torch.Tensor]:
    """The first ``images`` training images in batches of ``batch_size``, for recalibration."""
    first = train.tensors[0][:images]
    return list(first.split(batch_size))


def materialise(dataset: FineDetail) -> TensorDataset:
    """Every image of ``dataset`` generated once, as a tensor data set."""
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return TensorDataset(torch.stack(images), torch.as_tensor(labels))


def train_epoch(
    model: Classifier,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> float:
    """One training epoch of any classifier; the mean loss. A loader of ``(images, targets,
    indices)`` names each image by its index (PatchGD's Z reuse keeps Z by it). ``schedule``
    advances once per batch, so every method follows the same curve through its data."""
    model.train()
    losses = []
    for x, y, *rest in loader:
        losses.append(
            model.training_step(x, y, optimizer, keys=rest[0].tolist() if rest else None).loss
        )
        if schedule is not None:
            schedule.step()
    return sum(losses) / len(losses)


def decay_schedule(
    optimizer: torch.optim.Optimizer, batches: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate from its peak at the first batch linearly down to 0 after ``batches``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: warmup_then_linear_decay(i, 0, batches, 0.0)
    )


def run_demo(
    cfg: DemoConfig = DemoConfig(), log: bool = True
) -> tuple[list[DemoResult], dict[str, Classifier], FineDetail]:
    """Plan each method under ``cfg.memory_budget``, train it, evaluate it after every epoch.

    Returns the rows, the trained models by method, and the validation split.
    """
    methods = build_models(cfg)  # bad model options fail before any work
    data_cfg = task_config(cfg)
    classes = data_cfg.num_classes
    # Generated once, before any probe: the probe then sees training, not image synthesis.
    train = materialise(FineDetail("train", cfg.per_class_train, data_cfg, seed=cfg.seed))
    val_split = FineDetail("val", cfg.per_class_val, data_cfg, seed=cfg.seed)
    val = DataLoader(materialise(val_split), cfg.batch_size)
    budget = parse_size(cfg.memory_budget)
    say = print if log else (lambda _: None)
    results, models = [], {}
    patchgd_batch: int | None = None
    for method, (model, rebuild) in methods.items():
        wanted = cfg.batch_size
        if method == ACCUMULATED:
            wanted = patchgd_batch or cfg.batch_size
        with torch.random.fork_rng():  # planning must not shift the training's random stream
            try:
                model, plan = plan_classifier(model, budget, wanted, rebuild=rebuild)
            except ConfigError as err:
                say(f"{method:16s} does not fit: {err}")
                results.append(DemoResult(method, False, budget_mib=budget / 2**20, note=str(err)))
                continue
        batch, note = plan.batch_size, ""
        if method == "PatchGD":
            patchgd_batch = batch
        if method == ACCUMULATED and model.micro_batch is not None:
            note = f"micro-batches of {model.micro_batch}, accumulated to batch {batch}"
        say(f"{method:16s} plan: {plan.description}" + (f"; {note}" if note else ""))
        generator = torch.Generator().manual_seed(cfg.seed)
        keyed = TensorDataset(*train.tensors, torch.arange(len(train)))  # indices: Z reuse's keys
        loader = DataLoader(keyed, batch, shuffle=True, drop_last=True, generator=generator)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        schedule = decay_schedule(optimizer, cfg.epochs * len(loader)) if cfg.lr_decay else None
        calibration = calibration_batches(train, cfg.calibration_images, batch)
        losses, seconds, curve = [], [], []
        report = None
        for epoch in range(cfg.epochs):
            start = time.perf_counter()
            if epoch == 0:
                # The first epoch runs under the probe: batches, activations, gradients and the
                # Adam state it creates. Later epochs repeat the same steps, unprobed and timed.
                loss, report = measure(
                    lambda m=model, o=optimizer, d=loader, s=schedule: train_epoch(m, o, d, s)
                )
            else:
                loss = train_epoch(model, optimizer, loader, schedule)
            seconds.append(time.perf_counter() - start)
            losses.append(loss)
            if cfg.val_each_epoch or epoch == cfg.epochs - 1:
                curve.append(evaluate(model, val, classes, calibration))
                say(
                    f"{method:16s} epoch {epoch + 1}/{cfg.epochs}  train loss {loss:.3f}  "
                    f"val acc {curve[-1]:.3f}"
                )
            elif calibration and model.trains_on_running_statistics:
                # The next epoch's fills read these statistics: recalibrate as validation
                # would, so that skipping it leaves training unchanged.
                model.recalibrate_batchnorm(calibration)
        assert report is not None
        timed = seconds[1:] or seconds  # the probe slows the first epoch down
        results.append(
            DemoResult(
                method,
                True,
                batch=batch,
                input_px=model.input_size[0],
                val_acc=curve[-1],
                val_curve=curve,
                epochs=cfg.epochs,
                train_loss=losses[-1],
                peak_mib=(live_training_bytes(model) + report.tensor_bytes) / 2**20,
                budget_mib=budget / 2**20,
                s_per_epoch=sum(timed) / len(timed),
                note=note,
            )
        )
        models[method] = model
    return results, models, val_split


def format_table(results: list[DemoResult], chance: float) -> str:
    """The results as a fixed-width table, one row per method."""
    header = (
        f"{'method':16s} {'batch':>5s} {'input px':>8s} {'val acc':>8s} {'train loss':>10s} "
        f"{'peak MiB':>9s} {'budget MiB':>10s} {'s/epoch':>8s}"
    )
    rows = [header]
    for r in results:
        if not r.fits:
            rows.append(
                f"{r.method:16s} {'-':>5s} {'-':>8s} {'does not fit':>19s} {'-':>9s} "
                f"{r.budget_mib:10.1f} {'-':>8s}"
            )
            continue
        rows.append(
            f"{r.method:16s} {r.batch:5d} {r.input_px:8d} {r.val_acc:8.3f} {r.train_loss:10.3f} "
            f"{r.peak_mib:9.1f} {r.budget_mib:10.1f} {r.s_per_epoch:8.1f}"
        )
    rows.append(f"chance accuracy: {chance:.3f}")
    return "\n".join(rows)


def write_outputs(
    cfg: DemoConfig,
    results: list[DemoResult],
    models: dict[str, Classifier],
    val: FineDetail,
) -> tuple[Path, Path]:
    """Write ``summary.json`` and ``demo.png`` into ``cfg.out``, atomically; return their paths."""
    from ._io import atomic_write

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    chance = 1.0 / val.config.num_classes
    summary = {
        "task": "FineDetail",
        "canvas_px": cfg.canvas_size,
        "chance": chance,
        "budget_mib": parse_size(cfg.memory_budget) / 2**20,
        "config": asdict(cfg),
        "methods": [asdict(r) for r in results],
    }
    summary_path = out / "summary.json"
    atomic_write(summary_path, lambda fh: fh.write(json.dumps(summary, indent=1).encode()))
    figure_path = out / "demo.png"
    _plot(results, models.get("PatchGD"), val, chance, figure_path)
    return summary_path, figure_path


def _plot(
    results: list[DemoResult],
    patchgd: Classifier | None,
    val: FineDetail,
    chance: float,
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.3))
    curves = axes[0]
    for r in results:
        if r.fits:
            epochs = range(r.epochs - len(r.val_curve) + 1, r.epochs + 1)  # the last ones
            curves.plot(epochs, r.val_curve, "o-", label=f"{r.method} ({r.input_px} px)")
    curves.axhline(chance, color="gray", linestyle=":", label="chance")
    curves.set_xlabel("epoch")
    curves.xaxis.get_major_locator().set_params(integer=True)
    curves.set_ylabel("validation accuracy")
    curves.set_ylim(0, 1)
    curves.set_title("the same memory budget")
    curves.legend(fontsize=8)

    sample = val.sample(1)  # class 1: a few objects carry the texture
    axes[1].imshow(sample.image, cmap="gray", vmin=0, vmax=1)
    for o in sample.objects:
        colour = "red" if o.texture != "plain" else "cyan"
        axes[1].add_patch(
            Rectangle((o.left, o.top), o.size, o.size, fill=False, edgecolor=colour, lw=0.8)
        )
    axes[1].set_title("a validation image (red: textured, the evidence)", fontsize=9)
    heat = None
    if patchgd is not None:
        _, heat = patchgd.predict_with_map(torch.from_numpy(sample.image)[None, None])
    if heat is not None:
        # Each patch's share of the predicted class's logit, or its attention weight with an
        # attention head (patchgd.head.evidence).
        limit = float(heat.abs().max()) or 1.0
        axes[2].imshow(heat[0].numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
        axes[2].set_title("PatchGD's evidence for its prediction, per patch", fontsize=9)
    else:
        axes[2].set_title("PatchGD did not fit the budget", fontsize=9)
    for ax in axes[1:]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
