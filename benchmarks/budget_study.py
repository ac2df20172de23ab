"""PatchGD against the GD baselines where the memory budget starves GD, on FineDetail.

The demo's comparison (``patchgd demo``) scaled up: canvases of 1024 px (three seeds) and
2048 px (one seed), under budgets in which full-resolution GD cannot train one image and GD
with activation checkpointing fits exactly one (1024 px at 192 MiB, 2048 px at 512 MiB), so
every rival has to give something up: checkpointed GD keeps the resolution at a batch of one
and pays in recomputation (alone, with gradient accumulation to PatchGD's batch, and as
GD-extended with PatchGD's head on its feature map), downscaled GD keeps a batch and loses the
2 px textures. Each canvas keeps
the demo's density of evidence (4 objects per 512 × 512 px, all textured), so a larger canvas is
a larger image of the same task, not a harder one.

Each seed draws its own training, validation and test images and its own initialisation. Every
method is planned by :func:`patchgd.planner.plan_classifier` under the budget and trained for
the demo's epochs (:func:`patchgd.demo.run_demo`), and PatchGD once more for twice as many
(``--patchgd-epochs``), about checkpointed GD's training time; the last epoch's model is scored
on the test split, which nothing else sees (no checkpoint is chosen). Results go to
``docs/reproduction.md``, beside the 512 px paper-setting study.

    python benchmarks/budget_study.py                 # both canvases: 101 minutes on two cores
    python benchmarks/budget_study.py --canvas 1024   # the 1024 px rows alone, 27 minutes
    python benchmarks/budget_study.py --quick         # a smoke run (tests)

Each canvas has its own section of the page (``budget-1024``, ``budget-2048``), written as soon
as its seeds are done: an interrupted run keeps the canvases it finished, and ``--canvas``
reruns one without touching the others.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass, replace

from _report import (
    DOCS,
    add_common_options,
    markdown_table,
    mean_sd,
    output_page,
    run_lines,
    save_figure,
    write_section,
)
from torch.utils.data import DataLoader

from patchgd.data.finedetail import FineDetail
from patchgd.demo import (
    DemoConfig,
    DemoResult,
    evaluate,
    materialise,
    run_demo,
    task_config,
)


@dataclass(frozen=True)
class Setting:
    """One canvas of the study: its side, its budget and its seeds."""

    canvas: int
    budget: str
    seeds: tuple[int, ...]


def density_scaled(cfg: DemoConfig, canvas: int) -> DemoConfig:
    """``cfg`` on a ``canvas`` px image with the demo's objects per unit area."""
    objects = max(1, round(cfg.objects * (canvas / DemoConfig.canvas_size) ** 2))
    return replace(cfg, canvas_size=canvas, objects=objects, textured=objects)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_options(parser)
    parser.add_argument("--per-class-test", type=int, default=50)
    parser.add_argument(
        "--canvas", type=int, action="append", help="run only this canvas (repeatable)"
    )
    parser.add_argument(
        "--z-reuse",
        type=int,
        nargs="+",
        default=[],
        metavar="R",
        help="also PatchGD filling each image's Z once every R epochs (Z reuse)",
    )
    parser.add_argument(
        "--patchgd-epochs",
        type=int,
        nargs="*",
        default=None,
        metavar="E",
        help="also PatchGD trained for E epochs (default: twice the others', about checkpointed "
        "GD's training time)",
    )
    parser.add_argument(
        "--patchgd-only",
        action="store_true",
        help="no baselines; writes the section budget-<canvas>-zreuse (with --z-reuse)",
    )
    args = parser.parse_args()
    page = output_page(args, DOCS / "reproduction.md")
    # Only the last epoch's model is scored: validating the others would change no weight.
    base = DemoConfig(
        accumulated_gd=True,
        extended_gd=True,
        baselines=not args.patchgd_only,
        val_each_epoch=False,
    )
    suffix = "-zreuse" if args.patchgd_only else ""
    settings = [Setting(1024, "192MiB", (0, 1, 2)), Setting(2048, "512MiB", (0,))]
    per_class_test = args.per_class_test
    longer = [2 * base.epochs] if args.patchgd_epochs is None else args.patchgd_epochs
    if args.quick:
        base = replace(base, backbone="test_resnet", patch_size=32, per_class_train=2,
                       per_class_val=1, calibration_images=4, epochs=1, latent_dim=8)  # fmt: skip
        settings = [Setting(64, "12MiB", (0, 1)), Setting(96, "16MiB", (0,))]
        per_class_test = 1
    if args.canvas:
        settings = [s for s in settings if s.canvas in args.canvas]
        if not settings:
            parser.error(f"--canvas: none of {args.canvas} is in the study")

    rows_by: dict[tuple[int, str], list[tuple[DemoResult, float]]] = {}
    chance = 0.0

    def train_seconds(r: DemoResult) -> float:
        """About the whole training's time: the unprobed epochs' mean times the epochs."""
        return (r.s_per_epoch or 0.0) * r.epochs

    def spread(values: list[float]) -> str:
        return mean_sd(values, 3) if values else "does not fit"

    def publish(setting: Setting, minutes: float) -> None:
        """One canvas's section and plot (``budget-<canvas>``), written when it is done."""
        name = f"budget-{setting.canvas}{suffix}"
        table = []
        for (canvas, method), runs in rows_by.items():
            if canvas != setting.canvas:
                continue
            fitted = [(r, a) for r, a in runs if r.fits]
            accs = [a for _, a in fitted]
            table.append(
                (
                    f"{canvas} px, {setting.budget}",
                    method,
                    " / ".join(str(r.batch) for r, _ in fitted) or "-",
                    " / ".join(str(r.input_px) for r, _ in fitted) or "-",
                    " / ".join(f"{a:.3f}" for a in accs) or "-",
                    spread(accs),
                    f"{max(r.peak_mib or 0.0 for r, _ in fitted):.1f}" if fitted else "-",
                    f"{statistics.median(r.s_per_epoch or 0.0 for r, _ in fitted):.1f}"
                    if fitted
                    else "-",
                    f"{statistics.median(train_seconds(r) for r, _ in fitted):.0f}"
                    if fitted
                    else "-",
                )
            )
        text = "\n\n".join(
            [
                run_lines(),
                f"### {setting.canvas} px under {setting.budget} (FineDetail, "
                f"`{base.backbone}`, patch {base.patch_size}, {4 * base.per_class_train} "
                f"training images, {base.epochs} epochs unless named, Adam {base.lr:g}"
                + (" decaying linearly to 0" if base.lr_decay else "")
                + f", PatchGD's ε = {base.accumulation or 'ζ'}, "
                f"{4 * per_class_test} test images per seed)",
                "Test accuracy of the last epoch's model, one value per seed (each seed draws its "
                f"own images and initialisation); chance is {chance:.2f}. Batch and input size are "
                "the planner's, per seed; peak is the largest measured over the seeds; time per "
                "epoch the median (the first, probed epoch left out); training seconds are that "
                f"times the epochs. This canvas took {minutes:.0f} minutes of wall time, "
                "planning, training and scoring included.",
                markdown_table(
                    (
                        "canvas, budget",
                        "method",
                        "batch",
                        "input px",
                        "test acc by seed",
                        "mean ± sd",
                        "peak MiB",
                        "s/epoch",
                        "training s",
                    ),
                    table,
                ),
            ]
        )
        if page is None:
            print(text)
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        methods = [m for c, m in rows_by if c == setting.canvas]
        fig, ax = plt.subplots(figsize=(7, 3.8))
        for i, method in enumerate(methods):
            accs = [a for r, a in rows_by[(setting.canvas, method)] if r.fits]
            if accs:
                sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
                ax.bar(i, statistics.mean(accs), 0.6, yerr=sd, capsize=3, color=f"C{i}")
            else:
                ax.text(i, 0.02, "does not fit", ha="center", rotation=90, fontsize=8)
        ax.axhline(chance, color="gray", linestyle=":", label="chance")
        ax.set_xticks(range(len(methods)), methods, rotation=20, fontsize=8)
        ax.set_ylabel("test accuracy (mean ± sd of seeds)")
        ax.set_ylim(0, 1)
        ax.set_title(f"FineDetail, {setting.canvas} px under {setting.budget}")
        ax.legend(fontsize=8)
        figure = save_figure(fig, name.replace("budget-", "budget_study_").replace("-", "_"), page)
        text += f"\n\n![test accuracy under the budget]({figure.name})"
        write_section(name, text, page)

    with tempfile.TemporaryDirectory() as scratch:
        for setting in settings:
            started = time.perf_counter()
            for seed in setting.seeds:
                cfg = replace(
                    density_scaled(base, setting.canvas),
                    memory_budget=setting.budget,
                    seed=seed,
                    out=scratch,
                )
                results, models, _ = run_demo(cfg, log=False)
                for r in args.z_reuse:
                    more, more_models, _ = run_demo(
                        replace(cfg, baselines=False, z_refresh_every=r), log=False
                    )
                    label = f"PatchGD, Z every {r} epochs"
                    results += [replace(m, method=label) for m in more]
                    models[label] = more_models["PatchGD"]
                for epochs in longer:
                    more, more_models, _ = run_demo(
                        replace(cfg, baselines=False, epochs=epochs), log=False
                    )
                    label = f"PatchGD, {epochs} epochs"
                    results += [replace(m, method=label) for m in more]
                    models[label] = more_models["PatchGD"]
                data = task_config(cfg)
                chance = 1 / data.num_classes
                test = materialise(FineDetail("test", per_class_test, data, seed=seed))
                for r in results:
                    # run_demo recalibrated each model's BatchNorm before its last validation.
                    acc = (
                        evaluate(models[r.method], DataLoader(test, 8), data.num_classes)
                        if r.fits
                        else float("nan")
                    )
                    rows_by.setdefault((setting.canvas, r.method), []).append((r, acc))
                    print(f"{setting.canvas} px seed {seed} {r.method}: test {acc:.3f}", flush=True)
            minutes = (time.perf_counter() - started) / 60
            print(f"{setting.canvas} px: {minutes:.1f} minutes", flush=True)
            publish(setting, minutes)


if __name__ == "__main__":
    main()
