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

import torch
from _report import Panel, add_common_options, draw, markdown_table, publish, run_lines
from _timing import interleaved, num, progress

from patchgd import PatchGDClassifier, fill_z
from patchgd.model import DEFAULT_FILL_ACTIVATION, default_fill_chunk

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
    text = "\n".join(
        [
            run_lines(args.device),
            "",
            f"### The fill alone, images per second, by the size of each encoder call's largest "
            f"activation ({args.image} px, batch {args.batch}, training mode, median of "
            f"{args.repeats} interleaved repeats)",
            "",
            "In brackets: the pixels of patches per call (a call never holds more than the "
            f"batch, {args.batch * args.image**2 / 2**10:,.0f}k px). The library's default on "
            f"{device.type} is {budget_label(default)}.",
            "",
            table,
        ]
    )
    panels = []
    for patch in args.patches:
        title = f"patch {patch} px, {args.image} px images, {args.device}"
        panel = Panel(title, "largest activation per call, MiB (fp32)", "fill speed / best")
        panel.x_references = [(default * 4 / 2**20, "default")]
        for backbone in args.backbones:
            rates = curves[(backbone, patch)]
            speeds = [rates[b] / max(rates.values()) for b in budgets]
            panel.lines.append((backbone, [b * 4 / 2**20 for b in budgets], speeds, "o-"))
        panels.append(panel)
    caption = "fill speed by call size"
    publish(args, SECTION, text, lambda: draw(panels, 4.5, 3.6), FIGURE, caption=caption)


if __name__ == "__main__":
    main()
