"""Inference throughput: PatchGD (Z-fill plus head) against GD on the full image.

Both models are built from the same timm backbone with random weights and run in one process on
the same random batch, in eval mode under ``torch.no_grad()``:

- GD: ``GDClassifier.forward``, the backbone on the whole image;
- PatchGD: ``PatchGDClassifier.forward``, every patch encoded into Z (Algorithm 2), then the head
  once on Z.

Each size gets one warm-up call per model, then the repeats interleaved (GD, PatchGD, GD,
PatchGD, ...). The table gives medians of seconds per image, images per second, and the ratio of
the medians. The paper's A100 figures at 2048 px (GD 39.0, PatchGD 32.5 images/s) stand beside.

    python benchmarks/inference_speed.py            # resnet50, 512/2048/4096 px: ~9 min, 2 cores
    python benchmarks/inference_speed.py --quick    # mobilenetv2_100, 256/512 px: < 1 min
    python benchmarks/inference_speed.py --device cuda --batch 8 --repeats 10
    python benchmarks/inference_speed.py --backbone resnet50 mobilenetv2_100 --sizes 1024 2048

A full run writes its section of docs/benchmarks.md and docs/inference_speed.png; a quick run
only prints, unless ``--page`` is given.

On the CPU two settings move the figures a lot, so the section records them: on a machine
shared with other work, ``--threads 1`` keeps timings steady (OpenMP threads waiting at barriers
for a busy core slowed small models several-fold here); and glibc's malloc hands tensors above
32 MiB back to the kernel, so every large activation is faulted in afresh, which costs GD's
full-image passes (and PatchGD's large fill chunks) up to a third of their time.
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000`` (or jemalloc, tcmalloc) avoids that.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _report import (
    add_common_options,
    command_line,
    fill_chunk,
    machine_line,
    markdown_table,
    output_page,
    save_figure,
    write_section,
)
from _timing import ForwardClock, environment_line, num, progress, timed

from patchgd import GDClassifier, PatchGDClassifier

SECTION = "inference"
FIGURE = "inference_speed"
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


def markdown(rows: list[Row], args: argparse.Namespace, figure: str | None) -> str:
    table_rows: list[list[object]] = [
        [
            r.backbone,
            f"{r.size} px",
            f"{r.grid[0]} × {r.grid[1]}",
            num(1 / r.gd_s),
            num(1 / r.patchgd_s),
            num(r.gd_s),
            num(r.patchgd_s),
            f"{100 * r.fill_share:.0f} %",
            f"**{r.ratio:.2f}×**",
        ]
        for r in rows
    ]
    table_rows.append(
        [
            "ResNet50, the paper (A100)",
            f"{PAPER['size']} px",
            "–",
            num(PAPER["gd"]),
            num(PAPER["patchgd"]),
            num(1 / PAPER["gd"]),
            num(1 / PAPER["patchgd"]),
            "–",
            f"{PAPER['patchgd'] / PAPER['gd']:.2f}×",
        ]
    )
    header = [
        "backbone",
        "image",
        "grid",
        "GD images/s",
        "PatchGD images/s",
        "GD s/image",
        "PatchGD s/image",
        "PatchGD in encoder",
        "PatchGD / GD throughput",
    ]
    parts = [
        "## Inference throughput: PatchGD against GD",
        "",
        "`benchmarks/inference_speed.py` times inference on random images. Both models are built "
        "from the same timm backbone with random weights, in one process, on the same batch of "
        f"{args.batch} image{'s' if args.batch > 1 else ''}:",
        "",
        "- **GD**: `GDClassifier.forward`, the backbone on the whole image.",
        f"- **PatchGD**: `PatchGDClassifier.forward`: every {args.patch_size} px patch encoded "
        f"into Z (Algorithm 2, up to {fill_chunk(args)} per encoder call, "
        f"latent_dim {args.latent_dim}), then the head once on Z.",
        "",
        "Both run in eval mode under `torch.no_grad()`"
        + (", models and batch in channels-last memory format" if args.channels_last else "")
        + ". Each size gets one warm-up call per "
        f"model, then {args.repeats} repeat{'s' if args.repeats > 1 else ''} interleaved "
        "(GD, PatchGD, GD, ...); the table gives "
        "medians over the repeats, and the ratio is GD's median time over PatchGD's (PatchGD's "
        "throughput over GD's). *PatchGD in encoder* is the share of PatchGD's time spent inside "
        "the encoder's forward calls (timed by forward hooks); the rest is cutting out patches, "
        "writing Z and the head.",
        "",
        f"Command: `{command_line()}`",
        "",
        machine_line(str(args.device)),
        environment_line(),
        "",
        markdown_table(header, table_rows),
        "",
        f"Target: PatchGD's throughput at least {TARGET_RATIO:.1f}× GD's at {TARGET_SIZE} px.",
        "",
        *target_lines(rows, args.backbone),
    ]
    if figure:
        parts += ["", f"![Inference time per image, PatchGD and GD]({figure})"]
    return "\n".join(parts) + "\n"


def plot(rows: list[Row], backbones: list[str]) -> object:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_time, ax_ratio) = plt.subplots(1, 2, figsize=(10, 4))
    for backbone in backbones:
        mine = sorted((r for r in rows if r.backbone == backbone), key=lambda r: r.size)
        sizes = [r.size for r in mine]
        ax_time.plot(sizes, [r.gd_s for r in mine], "o-", label=f"GD, {backbone}")
        ax_time.plot(sizes, [r.patchgd_s for r in mine], "s--", label=f"PatchGD, {backbone}")
        ax_ratio.plot(sizes, [r.ratio for r in mine], "o-", label=backbone)
    ax_ratio.plot(
        [PAPER["size"]], [PAPER["patchgd"] / PAPER["gd"]], "k*", ms=10, label="paper, A100"
    )
    ax_ratio.axhline(TARGET_RATIO, color="grey", lw=1, ls=":", label="target")
    sizes = {r.size for r in rows}
    for ax, ticks in ((ax_time, sorted(sizes)), (ax_ratio, sorted(sizes | {PAPER["size"]}))):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("image side (px)")
        ax.legend(fontsize=8)
    ax_time.set_yscale("log")
    ax_time.set_ylabel("seconds per image (median)")
    ax_time.set_title("Inference time")
    ax_ratio.set_ylabel("PatchGD / GD throughput")
    ax_ratio.set_title("PatchGD relative to GD")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_options(parser)
    parser.add_argument("--backbone", nargs="+", help="timm names (default resnet50)")
    parser.add_argument("--sizes", type=int, nargs="+", help="image sides in px")
    parser.add_argument("--patch-size", type=int, help="patch side (default 256; quick 128)")
    parser.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    parser.add_argument("--repeats", type=int, help="timed calls per model (default 3; quick 2)")
    parser.add_argument(
        "--fill-chunk",
        type=int,
        help="patches per encoder call in the Z-fill (default: the library's for the device)",
    )
    parser.add_argument("--latent-dim", type=int, default=256)
    parser.add_argument(
        "--channels-last", action="store_true", help="both models and the batch in channels-last"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's; quick: 1, steady on a busy machine)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.backbone = args.backbone or (["mobilenetv2_100"] if quick else ["resnet50"])
    args.sizes = args.sizes or ([256, 512] if quick else [512, 2048, 4096])
    args.patch_size = args.patch_size or (128 if quick else 256)
    args.threads = args.threads or (1 if quick else None)
    args.repeats = args.repeats or (2 if quick else 3)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    page: Path | None = output_page(args)

    rows = []
    for backbone in args.backbone:
        for size in args.sizes:
            rows.append(measure(backbone, size, args, device))
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the last size's models are gone; return their memory

    figure = f"{FIGURE}.png" if page is not None else None
    text = markdown(rows, args, figure)
    print(text)
    if page is not None:
        save_figure(plot(rows, args.backbone), FIGURE, page)
        write_section(SECTION, text, page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
