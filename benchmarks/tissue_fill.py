"""The Z-fill with tissue candidates against the fill of every patch, in images per second.

Slides are mostly background. With a candidate mask (``candidates``, e.g. from
``patchgd.data.tissue``) the fill encodes only the candidate patches and gives every other
position of Z the image's background embedding (one blank patch per image, encoded with the
first chunk). This script times ``fill_z`` on one random batch with candidate masks that keep a
given fraction of each image's patches (drawn at random: the fill's cost depends on how many
patches it encodes, not where they are), against the same fill with no mask, repeats
interleaved, medians reported. Training mode, batch statistics, the library's default chunk.

    python benchmarks/tissue_fill.py           # resnet50 and mobilenetv3_small_050: ~5 min
    python benchmarks/tissue_fill.py --quick   # a smoke run (tests)
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _report import Panel, add_common_options, draw, markdown_table, publish, run_lines
from _timing import interleaved, num, progress

from patchgd import PatchGDClassifier, fill_z

SECTION, FIGURE = "tissue-fill", "tissue_fill"
FRACTIONS = (1.0, 0.7, 0.5, 0.3, 0.1)


def random_candidates(batch: int, patches: int, fraction: float, seed: int) -> torch.Tensor:
    """``(batch, patches)`` masks keeping ``round(fraction · patches)`` random positions each."""
    generator = torch.Generator().manual_seed(seed)
    keep = max(1, round(fraction * patches))
    order = torch.rand(batch, patches, generator=generator).argsort(dim=1)
    mask = torch.zeros(batch, patches, dtype=torch.bool)
    mask.scatter_(1, order[:, :keep], True)
    return mask


def sweep(
    backbone: str, patch: int, args: argparse.Namespace, device: torch.device
) -> dict[str, float]:
    """Images per second of the full fill and of candidate fills at each fraction."""
    torch.manual_seed(0)
    model = PatchGDClassifier(backbone, 2, args.image, patch, latent_dim=64).to(device).train()
    images = torch.randn(args.batch, 3, args.image, args.image, device=device)
    n, chunk = model.grid.num_patches, model.chunk_for()
    masks = {"all": None} | {
        f"{f:.0%}": random_candidates(args.batch, n, f, seed=1) for f in FRACTIONS
    }

    def fill(mask: torch.Tensor | None) -> None:
        fill_z(model.encoder, images, model.grid, chunk, candidates=mask)

    calls = {name: (lambda m=mask: fill(m)) for name, mask in masks.items()}
    seconds = interleaved(calls, args.repeats, device)
    progress(f"{backbone} patch {patch} done")
    return {name: args.batch / statistics.median(s) for name, s in seconds.items()}


def report(results: dict[tuple[str, int], dict[str, float]], args: argparse.Namespace) -> None:
    names = ["all", *(f"{f:.0%}" for f in FRACTIONS)]
    rows = [
        [
            f"`{b}`",
            p,
            f"{(args.image // p) ** 2}",
            *(f"{num(rates[m])} ({rates[m] / rates['all']:.2f}×)" for m in names),
        ]
        for (b, p), rates in results.items()
    ]
    header = [
        "backbone",
        "patch px",
        "patches",
        "every patch",
        *(f"{m} candidates" for m in names[1:]),
    ]
    text = "\n".join(
        [
            run_lines(args.device),
            "",
            f"### The fill with tissue candidates, images per second ({args.image} px, batch "
            f"{args.batch}, training mode, the default chunk; median of {args.repeats} "
            "interleaved repeats)",
            "",
            "In brackets: the ratio to the fill of every patch, measured side by side.",
            "",
            markdown_table(header, rows),
        ]
    )
    panel = Panel("", "candidate patches (%)", "speed-up over filling every patch", log_y=True)
    panel.log2_x = False
    percents = [100 * f for f in FRACTIONS]
    for (b, p), rates in results.items():
        speedups = [rates[f"{f:.0%}"] / rates["all"] for f in FRACTIONS]
        panel.lines.append((f"{b}, patch {p}", percents, speedups, "o-"))
    panel.lines.append(("1 / fraction", [10, 100], [10, 1], "k:"))
    publish(args, SECTION, text, lambda: draw([panel], 5.5, 3.6), FIGURE, caption="fill speed-up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_options(parser)
    parser.add_argument("--backbones", nargs="+", help="timm names (default resnet50 and a small)")
    parser.add_argument("--patches", type=int, nargs="+", help="patch sides (default 64–256)")
    parser.add_argument("--image", type=int, help="image side (default 1024)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, help="timed fills per mask (default 5)")
    args = parser.parse_args()
    quick = args.quick
    args.backbones = args.backbones or (
        ["test_resnet"] if quick else ["resnet50", "mobilenetv3_small_050"]
    )
    args.patches = args.patches or ([16, 32] if quick else [64, 128, 256])
    args.image = args.image or (64 if quick else 1024)
    args.repeats = args.repeats or (1 if quick else 5)
    device = torch.device(args.device)
    results = {(b, p): sweep(b, p, args, device) for b in args.backbones for p in args.patches}
    report(results, args)


if __name__ == "__main__":
    main()
