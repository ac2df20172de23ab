"""Patch size on the demo's task: how fast the patch-level model learns, exactly and by PatchGD.

PatchGD's model encodes each patch on its own and classifies the grid of embeddings. This
benchmark separates two questions on the task of ``patchgd demo`` (FineDetail, 512 px), with no
memory budget and one batch size for every run, so that only the patch size changes:

1. **The model.** The patch-level model trained by exact GD (every patch re-encoded with
   gradients, ζ = 1), for each patch size, against GD on the whole image (one patch of 512 px
   is the whole-image model with a projection in front of the linear layer).
2. **The sampling.** The same model trained by PatchGD as the demo trains it (k = 1/8 of the
   grid per inner iteration, half of the grid visited per outer step).

Validation accuracy after the last epoch, BatchNorm recalibrated on 64 training images, for
three initialisation seeds; time per epoch beside it. Written to ``docs/finedetail.md``.

    python benchmarks/patch_size.py           # about 17 minutes on two cores
    python benchmarks/patch_size.py --quick   # a smoke run (tests)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import torch
from _report import (
    DOCS,
    Panel,
    add_common_options,
    draw,
    markdown_table,
    mean_sd,
    publish,
    run_lines,
)
from torch.utils.data import DataLoader

from patchgd import GDClassifier, InnerLoopConfig
from patchgd.data.finedetail import FineDetail
from patchgd.demo import (
    DemoConfig,
    calibration_batches,
    evaluate,
    materialise,
    patchgd_model,
    task_config,
    train_epoch,
)
from patchgd.model import Classifier

BATCH = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_options(parser)
    args = parser.parse_args()

    cfg = DemoConfig()
    if args.quick:
        cfg = replace(cfg, backbone="test_resnet", canvas_size=128, per_class_train=2,
                      per_class_val=1, calibration_images=4, epochs=1)  # fmt: skip
    # One patch of the whole canvas is the exact model only: PatchGD would re-encode it anyway.
    patch_sizes = (32, 64) if args.quick else (64, 128, 256)
    exact_sizes = (*patch_sizes, cfg.canvas_size)
    seeds = (0,) if args.quick else (0, 1, 2)
    data = task_config(cfg)
    classes = data.num_classes
    train = materialise(FineDetail("train", cfg.per_class_train, data, seed=cfg.seed))
    val = DataLoader(materialise(FineDetail("val", cfg.per_class_val, data, seed=cfg.seed)), 8)
    calibration = calibration_batches(train, cfg.calibration_images, BATCH)

    def patch_model(patch: int, exact: bool) -> Callable[[], Classifier]:
        # Exact: every patch re-encoded with gradients in one inner iteration; else the demo's.
        loop = InnerLoopConfig(sampling_fraction=1.0, max_visit_fraction=1.0) if exact else None
        return lambda: patchgd_model(replace(cfg, patch_size=patch), loop)

    runs: dict[str, tuple[str, int | None, Callable[[], Classifier]]] = {
        f"GD on the whole {cfg.canvas_size} px image": (
            "whole image",
            None,
            lambda: GDClassifier(cfg.backbone, classes, cfg.canvas_size, in_chans=1),
        ),
    }
    for patch in exact_sizes:
        runs[f"patch {patch}: the patch-level model by exact GD"] = (
            "exact",
            patch,
            patch_model(patch, exact=True),
        )
    for patch in patch_sizes:
        runs[f"patch {patch}: PatchGD as the demo trains it"] = (
            "PatchGD",
            patch,
            patch_model(patch, exact=False),
        )

    scores: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}
    for name, (_, _, build) in runs.items():
        scores[name], seconds[name] = [], []
        for seed in seeds:
            torch.manual_seed(seed)
            model = build()
            optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
            generator = torch.Generator().manual_seed(seed)
            for _ in range(cfg.epochs):
                loader = DataLoader(train, BATCH, shuffle=True, drop_last=True, generator=generator)
                start = time.perf_counter()
                train_epoch(model, optimizer, loader)
                seconds[name].append(time.perf_counter() - start)
            scores[name].append(evaluate(model, val, classes, calibration))
            print(f"{name} seed {seed}: {scores[name][-1]:.3f}", flush=True)

    rows = [
        (
            name,
            " / ".join(f"{s:.2f}" for s in scores[name]),
            mean_sd(scores[name]),
            f"{statistics.median(seconds[name]):.1f}",
        )
        for name in runs
    ]
    text = "\n\n".join(
        [
            run_lines(),
            f"### Patch size on the demo's task ({cfg.canvas_size} px, `{cfg.backbone}`, "
            f"{len(train)} training and {len(val.dataset)} validation images, batch {BATCH}, "
            f"{cfg.epochs} epochs, Adam {cfg.lr:g}, no budget)",
            "Validation accuracy after the last epoch (BatchNorm recalibrated) for "
            f"initialisation seeds {', '.join(map(str, seeds))}; chance is {1 / classes:.2f}.",
            markdown_table(
                ("run", "val acc by seed", "mean ± sd", "median s/epoch"),
                rows,
            ),
        ]
    )
    panel = Panel(
        "FineDetail, the demo's task: accuracy against patch size",
        "patch side (px)",
        "validation accuracy (mean of seeds)",
    )
    for kind, marker in (("exact", "o-"), ("PatchGD", "s--")):
        xs = [runs[n][1] for n in runs if runs[n][0] == kind]
        ys = [statistics.mean(scores[n]) for n in runs if runs[n][0] == kind]
        label = "patch-level model, exact GD" if kind == "exact" else "PatchGD (demo's sampling)"
        panel.lines.append((label, xs, ys, marker))
    whole = next(n for n in runs if runs[n][0] == "whole image")
    ends = [min(exact_sizes), max(exact_sizes)]
    panel.lines.append(("GD, whole image", ends, [statistics.mean(scores[whole])] * 2, "k-"))
    panel.references, panel.ylim = [(1 / classes, "chance")], (0, 1)
    page, caption = DOCS / "finedetail.md", "accuracy against patch size"
    figure = partial(draw, [panel], 6, 3.5)
    publish(args, "patchsize", text, figure, "finedetail_patch_size", page, caption=caption)


if __name__ == "__main__":
    main()
