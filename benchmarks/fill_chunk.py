"""The Z-fill's speed by the size of its encoder calls: the evidence for the default fill chunk.

The fill (Algorithm 2) encodes an image's patches in calls of ``fill_chunk`` patches. Without
one, the library sizes the call by the backbone's largest layer output: as many patches as keep
it at ``patchgd.model.DEFAULT_FILL_ACTIVATION`` elements. This script fills a batch of random
images in training mode (batch statistics, as in training) for several backbones and patch
sizes, with calls sized at several such budgets, and reports images per second (medians of
interleaved repeats), the pixels each call holds, and where the default falls.

    python benchmarks/fill_chunk.py           # 4 backbones, 1024 px, batch 4: ~15 min
    python benchmarks/fill_chunk.py --quick   # a smoke run (tests)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import (  # noqa: E402
    add_common_options,
    command_line,
    machine_line,
    markdown_table,
    output_page,
    save_figure,
    write_section,
)
from _timing import environment_line, interleaved, num, progress  # noqa: E402

from patchgd import PatchGDClassifier, fill_z  # noqa: E402
from patchgd.model import DEFAULT_FILL_ACTIVATION, default_fill_chunk  # noqa: E402

SECTION, FIGURE = "fill-chunk", "fill_chunk"
CLASSES, LATENT = 4, 64


def sweep(
    backbone: str, patch: int, budgets: list[int], args: argparse.Namespace
) -> tuple[int, dict[int, float]]:
    """The backbone's largest activation per patch, and images/s of the fill by budget."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = PatchGDClassifier(backbone, CLASSES, args.image, patch, latent_dim=LATENT)
    model = model.to(device).train()
    largest = model.encoder.largest_activation()
    images = torch.randn(args.batch, 3, args.image, args.image, device=device)
    chunks = {b: max(1, b // largest) for b in budgets}
    calls = {b: (lambda c=chunks[b]: fill_z(model.encoder, images, model.grid, c)) for b in budgets}
    with torch.no_grad():
        seconds = interleaved(calls, args.repeats, device)
    progress(f"{backbone} patch {patch} done")
    return largest, {b: args.batch / statistics.median(s) for b, s in seconds.items()}


def budget_label(elements: int) -> str:
    return f"{elements * 4 / 2**20:g} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_options(parser)
    parser.add_argument("--backbones", nargs="+", help="timm names (default: four)")
    parser.add_argument("--patches", type=int, nargs="+", help="patch sides (default 32 128 256)")
    parser.add_argument("--image", type=int, help="image side (default 1024)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, help="timed fills per call size (default 3)")
    args = parser.parse_args()
    quick = args.quick
    args.backbones = args.backbones or (
        ["test_resnet"]
        if quick
        else ["resnet50", "resnet18", "efficientnet_b0", "mobilenetv3_small_050"]
    )
    args.patches = args.patches or ([16, 32] if quick else [32, 128, 256])
    args.image = args.image or (64 if quick else 1024)
    args.repeats = args.repeats or (1 if quick else 3)
    device = torch.device(args.device)
    default = DEFAULT_FILL_ACTIVATION.get(device.type, DEFAULT_FILL_ACTIVATION["cuda"])
    budgets = [default // 4, default // 2, default, default * 2, default * 4]

    rows, curves = [], {}
    for backbone in args.backbones:
        for patch in args.patches:
            largest, rates = sweep(backbone, patch, budgets, args)
            best = max(rates, key=rates.__getitem__)
            chunk = default_fill_chunk(largest, device)
            rows.append(
                [
                    f"`{backbone}`",
                    patch,
                    f"{largest * 4 / patch**2:.0f}",
                    *(
                        f"{num(rates[b])} ({max(1, b // largest) * patch**2 / 2**10:,.0f}k px)"
                        for b in budgets
                    ),
                    f"{chunk} patches",
                    f"{rates[default] / rates[best]:.2f}",
                ]
            )
            curves[(backbone, patch)] = rates
    table = markdown_table(
        [
            "backbone",
            "patch px",
            "largest output, B/px (fp32)",
            *(budget_label(b) for b in budgets),
            "default chunk",
            "default / best",
        ],
        rows,
    )
    print(table)
    page = output_page(args)
    if page is None:
        return
    text = "\n".join(
        [
            f"Command: `{command_line()}`",
            "",
            machine_line(args.device),
            environment_line(),
            "",
            f"### The fill alone, images per second, by the size of each encoder call's largest "
            f"activation ({args.image} px, batch {args.batch}, training mode, median of "
            f"{args.repeats} interleaved repeats)",
            "",
            "Each column sizes the calls so that the backbone's largest layer output holds that "
            "much fp32 (in brackets: the pixels of patches per call; a call never holds more "
            f"than the batch, {args.batch * args.image**2 / 2**10:,.0f}k px). The library's "
            f"default on {device.type} is {budget_label(default)}. *default / best*: the "
            "default column's speed over the row's fastest.",
            "",
            table,
        ]
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(args.patches), figsize=(4.5 * len(args.patches), 3.6), squeeze=False
    )
    for ax, patch in zip(axes[0], args.patches, strict=True):
        for backbone in args.backbones:
            rates = curves[(backbone, patch)]
            best = max(rates.values())
            ax.plot(
                [b * 4 / 2**20 for b in budgets],
                [rates[b] / best for b in budgets],
                marker="o",
                label=backbone,
            )
        ax.axvline(default * 4 / 2**20, color="gray", linestyle=":", label="default")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("largest activation per call, MiB (fp32)")
        ax.set_ylabel("fill speed / the row's best")
        ax.set_title(f"patch {patch} px, {args.image} px images, {args.device}")
        ax.legend(fontsize=7)
    figure = save_figure(fig, FIGURE, page)
    write_section(SECTION, text + f"\n\n![fill speed by call size]({figure.name})", page)


if __name__ == "__main__":
    main()
