"""Inference throughput: PatchGD (Z-fill plus head) against GD on the full image.

The method and the columns are described in docs/benchmarks.md beside the section this script
writes, with the paper's A100 figures at 2048 px (GD 39.0, PatchGD 32.5 images/s).

    python benchmarks/inference_speed.py            # resnet50, 512/2048/4096 px: ~9 min, 2 cores
    python benchmarks/inference_speed.py --quick    # mobilenetv2_100, 256/512 px: < 1 min
    python benchmarks/inference_speed.py --device cuda --batch 8 --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field
from functools import partial

import torch
from _report import Panel, add_common_options, draw, fill_chunk, markdown_table, publish, run_lines
from _timing import ForwardClock, add_speed_options, num, progress, speed_defaults, timed

from patchgd import GDClassifier, PatchGDClassifier

SECTION = "inference"
FIGURE = "inference_speed"
CAPTION = "Inference time per image, PatchGD and GD"
TARGET_SIZE = 2048  # where the target applies: PatchGD at least as fast as GD
TARGET_RATIO = 1.0
# The paper's figures (A100, ResNet50, 2048 px), images per second.
PAPER = {"size": 2048, "gd": 39.0, "patchgd": 32.5}


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One backbone at one image size; times are seconds per image, one entry per repeat."""

    backbone: str
    size: int
    grid: tuple[int, int]
    gd: list[float] = field(default_factory=list)
    patchgd: list[float] = field(default_factory=list)
    fill: list[float] = field(default_factory=list)  # PatchGD's time inside the encoder

    @property
    def gd_s(self) -> float:
        return statistics.median(self.gd)

    @property
    def patchgd_s(self) -> float:
        return statistics.median(self.patchgd)

    @property
    def ratio(self) -> float:
        """PatchGD's throughput over GD's: > 1 means PatchGD is faster."""
        return self.gd_s / self.patchgd_s

    @property
    def fill_share(self) -> float:
        return statistics.median(f / t for f, t in zip(self.fill, self.patchgd, strict=True))


def measure(backbone: str, size: int, args: argparse.Namespace, device: torch.device) -> Row:
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    gd = GDClassifier(backbone, 2, size).to(device, memory_format=fmt).eval()
    patchgd = PatchGDClassifier(
        backbone,
        2,
        size,
        args.patch_size,
        latent_dim=args.latent_dim,
        fill_chunk=args.fill_chunk,
    )
    patchgd = patchgd.to(device, memory_format=fmt).eval()
    clock = ForwardClock(patchgd.encoder, device)
    images = torch.randn(args.batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    row = Row(backbone, size, patchgd.grid.shape)

    def run_gd() -> None:
        with torch.no_grad():
            gd(images)

    def run_patchgd() -> None:
        with torch.no_grad():
            patchgd(images)

    run_gd()  # warm-up: allocator, kernel selection, lazy initialisation
    run_patchgd()
    clock.take()
    for _ in range(args.repeats):
        row.gd.append(timed(run_gd, device) / args.batch)
        row.patchgd.append(timed(run_patchgd, device) / args.batch)
        row.fill.append(sum(clock.take()) / args.batch)  # all without autograd here
        progress(
            f"{backbone} {size} px: GD {row.gd[-1]:.3g} s/img, PatchGD {row.patchgd[-1]:.3g} s/img"
        )
    return row


def target_lines(rows: list[Row], backbones: list[str]) -> list[str]:
    lines = []
    paper = PAPER["patchgd"] / PAPER["gd"]
    for backbone in backbones:
        hit = [r for r in rows if r.backbone == backbone and r.size == TARGET_SIZE]
        if not hit:
            lines.append(f"- {backbone}: not measured in this run (no {TARGET_SIZE} px row).")
            continue
        r = hit[0]
        verdict = "met" if r.ratio >= TARGET_RATIO else "missed"
        lines.append(
            f"- {backbone}: **{verdict}**, PatchGD at {r.ratio:.2f}× GD's throughput "
            f"({1 / r.patchgd_s:.3g} against {1 / r.gd_s:.3g} images/s); "
            f"the paper measured {paper:.2f}× on an A100."
        )
    return lines


def markdown(rows: list[Row], args: argparse.Namespace) -> str:
    def cells(name: str, size: int, grid: str, gd: float, pgd: float) -> list[str]:
        return [name, f"{size} px", grid, num(1 / gd), num(1 / pgd), num(gd), num(pgd)]

    table_rows = [
        cells(r.backbone, r.size, f"{r.grid[0]} × {r.grid[1]}", r.gd_s, r.patchgd_s)
        + [f"{100 * r.fill_share:.0f} %", f"**{r.ratio:.2f}×**"]
        for r in rows
    ]
    gd, pgd = 1 / PAPER["gd"], 1 / PAPER["patchgd"]
    paper = cells("ResNet50, the paper (A100)", PAPER["size"], "–", gd, pgd)
    table_rows.append(paper + ["–", f"{gd / pgd:.2f}×"])
    header = ["backbone", "image", "grid", "GD images/s", "PatchGD images/s", "GD s/image"]
    header += ["PatchGD s/image", "PatchGD in encoder", "PatchGD / GD throughput"]
    parts = [
        run_lines(str(args.device)),
        "",
        f"Settings: batch {args.batch}, patches of {args.patch_size} px, latent_dim "
        f"{args.latent_dim}, fill chunk {fill_chunk(args)}"
        + (", models and batch channels-last" if args.channels_last else "")
        + f"; medians of {args.repeats} interleaved repeats after one warm-up call.",
        "",
        markdown_table(header, table_rows),
        "",
        f"Target: PatchGD's throughput at least {TARGET_RATIO:.1f}× GD's at {TARGET_SIZE} px.",
        "",
        *target_lines(rows, args.backbone),
    ]
    return "\n".join(parts) + "\n"


def plot(rows: list[Row], backbones: list[str]) -> object:
    time = Panel("Inference time", "image side (px)", "seconds per image (median)", log_y=True)
    ratio = Panel("PatchGD relative to GD", "image side (px)", "PatchGD / GD throughput")
    ratio.references = [(TARGET_RATIO, "target")]
    for backbone in backbones:
        mine = sorted((r for r in rows if r.backbone == backbone), key=lambda r: r.size)
        sizes = [r.size for r in mine]
        time.lines.append((f"GD, {backbone}", sizes, [r.gd_s for r in mine], "o-"))
        time.lines.append((f"PatchGD, {backbone}", sizes, [r.patchgd_s for r in mine], "s--"))
        ratio.lines.append((backbone, sizes, [r.ratio for r in mine], "o-"))
    paper = ([PAPER["size"]], [PAPER["patchgd"] / PAPER["gd"]])
    ratio.lines.append(("paper, A100", *paper, "k*"))
    return draw([time, ratio])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_options(parser)
    add_speed_options(parser, batch=1, repeats=3, quick_repeats=2)
    return speed_defaults(parser.parse_args(argv), [512, 2048, 4096], 3, 2)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for backbone in args.backbone:
        for size in args.sizes:
            rows.append(measure(backbone, size, args, device))
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the last size's models are gone; return their memory

    figure = partial(plot, rows, args.backbone)
    publish(args, SECTION, markdown(rows, args), figure, FIGURE, caption=CAPTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
