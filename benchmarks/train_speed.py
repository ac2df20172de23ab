"""Training time per image: PatchGD (full and 50 % coverage) against GD on the full image.

The method, the columns and the settings that move CPU figures are described in
docs/benchmarks.md beside the section this script writes.

    python benchmarks/train_speed.py            # resnet50, 512/1024/2048 px: ~10 min, 2 cores
    python benchmarks/train_speed.py --quick    # mobilenetv2_100, 256/512 px: < 1 min
    python benchmarks/train_speed.py --device cuda --batch 4 --repeats 10
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from _report import Panel, add_common_options, draw, fill_chunk, markdown_table, publish, run_lines
from _timing import (
    ForwardClock,
    add_speed_options,
    num,
    progress,
    speed_defaults,
    synchronize,
    timed,
)
from torch import nn

from patchgd import GDClassifier, HeadConfig, InnerLoopConfig, PatchGDClassifier, measure
from patchgd.memory import resident_bytes

SECTION = "training"
FIGURE = "train_speed"
CAPTION = "Training time per image, PatchGD and GD"
TARGET_SIZE = 1024  # where the targets apply
TARGET_FULL = 1.4  # PatchGD 100 % coverage: at most this many times GD's time per image
TARGET_HALF = 0.8  # PatchGD 50 % coverage
MEMORY_HEADROOM = 0.8  # use at most this share of the free memory for GD's estimated step
MEMORY_PROBE_SIDE = 768  # GD's step is measured at this side to extrapolate to larger images
LR = 1e-3

# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------
METHODS = ("gd", "full", "half")
LABELS = {"gd": "GD", "full": "PatchGD, 100 %", "half": "PatchGD, 50 %"}
COVERAGE = {"full": 1.0, "half": 0.5}


@dataclass
class Timing:
    """One method's repeats, seconds per image: the whole step and its parts."""

    total: list[float] = field(default_factory=list)
    fill: list[float] = field(default_factory=list)  # forward without autograd (PatchGD's fill)
    forward: list[float] = field(default_factory=list)  # forward with autograd

    def median(self, name: str = "total") -> float:
        return statistics.median(getattr(self, name))

    @property
    def rest(self) -> float:
        """Backward, head, optimizer step and bookkeeping: the total less the timed forwards."""
        return statistics.median(
            t - f - g for t, f, g in zip(self.total, self.fill, self.forward, strict=True)
        )


@dataclass
class Row:
    backbone: str
    size: int
    batch: int
    grid: tuple[int, int]
    loops: dict[str, tuple[int, int]]  # method -> (k, ζ)
    gd_note: str = ""  # why GD ran at a smaller batch or not at all
    times: dict[str, Timing] = field(default_factory=lambda: {m: Timing() for m in METHODS})

    def has(self, method: str) -> bool:
        return bool(self.times[method].total)

    def ratio(self, method: str) -> float | None:
        if not (self.has(method) and self.has("gd")):
            return None
        return self.times[method].median() / self.times["gd"].median()

    def expected(self, method: str) -> float | None:
        """The ratio if PatchGD's passes cost what GD's cost per pixel: a no-grad pass over
        every patch (GD's forward) plus forward and backward of the visited share of the
        patches (that share of GD's step)."""
        if not self.has("gd"):
            return None
        gd = self.times["gd"]
        return COVERAGE[method] + gd.median("forward") / gd.median()


@dataclass(frozen=True)
class GDMemory:
    """GD's training-step memory, measured on one image at ``side`` px and scaled with the
    pixels (an overestimate: weights, gradients and optimizer state do not grow)."""

    footprint: float
    side: int

    def need(self, batch: int, size: int) -> float:
        return self.footprint * batch * size * size / self.side**2

    @classmethod
    def probe(cls, backbone: str, device: torch.device, side: int) -> GDMemory:
        torch.manual_seed(0)
        model = GDClassifier(backbone, 2, side).to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        images = torch.randn(1, 3, side, side, device=device)
        targets = torch.zeros(1, dtype=torch.long, device=device)
        before = resident_bytes()
        _, report = measure(partial(model.training_step, images, targets, optimizer), device)
        footprint = report.tensor_bytes
        if device.type == "cpu" and report.rss_bytes is not None and before is not None:
            # The process's growth counts allocator slack and library workspaces too.
            footprint = max(footprint, report.rss_bytes - before)
        return cls(footprint, side)


def free_memory(device: torch.device) -> int | None:
    """Bytes that a new allocation could use now: MemAvailable, or the GPU's free memory."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def fitting_batch(
    memory: GDMemory, size: int, batch: int, device: torch.device
) -> tuple[int, bool, str]:
    """The batch to run ``size`` at, whether GD runs, and a note when that is not ``batch``."""
    gc.collect()  # the previous size's models
    free = free_memory(device)
    if free is None:
        return batch, True, ""
    allowed = MEMORY_HEADROOM * free
    fits = [b for b in range(batch, 0, -1) if memory.need(b, size) <= allowed]
    why = (
        f"GD's step at batch {batch} needs about {memory.need(batch, size) / 2**30:.1f} GiB "
        f"(its measured step at {memory.side} px, batch 1, scaled by the pixels), "
        f"{free / 2**30:.1f} GiB were free"
    )
    if not fits:
        return 1, False, f"GD not run: {why}, and batch 1 would not fit either"
    if fits[0] < batch:
        return fits[0], True, f"batch {fits[0]} for every model: {why}"
    return batch, True, ""


def build_patchgd(
    backbone: str, size: int, batch: int, coverage: float, args: argparse.Namespace
) -> PatchGDClassifier:
    torch.manual_seed(0)
    loop = InnerLoopConfig(sampling_fraction=args.sampling_fraction, max_visit_fraction=coverage)
    # One image whose grid the head reduces to 1 × 1 cannot train BatchNorm: GroupNorm then.
    head = HeadConfig(norm="group") if batch == 1 else HeadConfig()
    return PatchGDClassifier(
        backbone,
        2,
        size,
        args.patch_size,
        latent_dim=args.latent_dim,
        loop=loop,
        head=head,
        fill_chunk=args.fill_chunk,
    )


def run_size(
    backbone: str,
    size: int,
    args: argparse.Namespace,
    device: torch.device,
    memory: GDMemory,
) -> Row:
    batch, run_gd, note = fitting_batch(memory, size, args.batch, device)
    models: dict[str, nn.Module] = {}
    if run_gd:
        torch.manual_seed(0)
        models["gd"] = GDClassifier(backbone, 2, size)
    for method in ("full", "half"):
        models[method] = build_patchgd(backbone, size, batch, COVERAGE[method], args)
    clocks: dict[str, ForwardClock] = {}
    steps: dict[str, Callable[[], object]] = {}
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    targets = torch.arange(batch, device=device) % 2
    for method, model in models.items():
        model.to(device, memory_format=fmt).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        watched = model.encoder if isinstance(model, PatchGDClassifier) else model
        clocks[method] = ForwardClock(watched, device)
        steps[method] = lambda m=model, o=optimizer: m.training_step(images, targets, o)

    patchgd = models["full"]
    assert isinstance(patchgd, PatchGDClassifier)
    loops = {
        m: (models[m].loop.patches_per_iteration, models[m].loop.inner_iterations)  # type: ignore[union-attr]
        for m in ("full", "half")
    }
    row = Row(backbone, size, batch, patchgd.grid.shape, loops, note)

    for method in models:  # warm-up: allocator, kernel selection, optimizer state
        steps[method]()
    synchronize(device)
    for clock in clocks.values():
        clock.take()
    for _ in range(args.repeats):
        for method in models:
            seconds = timed(steps[method], device)
            no_grad, grad = clocks[method].take()
            timing = row.times[method]
            timing.total.append(seconds / batch)
            timing.fill.append(no_grad / batch)
            timing.forward.append(grad / batch)
        progress(
            f"{backbone} {size} px, batch {batch}: "
            + ", ".join(f"{LABELS[m]} {row.times[m].total[-1]:.3g} s/img" for m in models)
        )
    return row


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def times(x: float | None, bold: bool = False) -> str:
    if x is None:
        return "–"
    return f"**{x:.2f}×**" if bold else f"{x:.2f}×"


def target_lines(rows: list[Row], backbones: list[str]) -> list[str]:
    lines = []
    for backbone in backbones:
        hit = [r for r in rows if r.backbone == backbone and r.size == TARGET_SIZE]
        if not hit or hit[0].ratio("full") is None:
            lines.append(f"- {backbone}: not measured in this run (no {TARGET_SIZE} px GD row).")
            continue
        r = hit[0]
        checks = []
        for method, target in (("full", TARGET_FULL), ("half", TARGET_HALF)):
            ratio, expected = r.ratio(method), r.expected(method)
            assert ratio is not None and expected is not None
            verdict = "met" if ratio <= target else "missed"
            checks.append(
                f"{LABELS[method]} ≤ {target:.1f}× GD: **{verdict}**, {ratio:.2f}× "
                f"(expected at GD's cost per pixel: {expected:.2f}×)"
            )
        lines.append(f"- {backbone}: " + "; ".join(checks) + ".")
    return lines


def markdown(rows: list[Row], args: argparse.Namespace) -> str:
    main_rows = [
        [
            r.backbone,
            f"{r.size} px",
            r.batch,
            f"{r.grid[0]} × {r.grid[1]}; k = {r.loops['full'][0]}; "
            f"ζ = {r.loops['full'][1]} / {r.loops['half'][1]}",
            num(r.times["gd"].median()) if r.has("gd") else "–",
            *(
                cell
                for m in ("full", "half")
                for cell in (
                    num(r.times[m].median()),
                    times(r.ratio(m), bold=True),
                    times(r.expected(m)),
                )
            ),
        ]
        for r in rows
    ]
    main_header = ["backbone", "image", "batch", "grid; k; ζ (100 % / 50 %)", "GD s/image"]
    for label in ("100 %", "50 %"):
        main_header += [f"PatchGD {label} s/image", f"{label} / GD", "expected"]
    split_rows = [
        [r.backbone, f"{r.size} px", LABELS[m]]
        + ["–" if m == "gd" else num(r.times[m].median("fill"))]
        + [num(r.times[m].median("forward")), num(r.times[m].rest), num(r.times[m].median())]
        for r in rows
        for m in METHODS
        if r.has(m)
    ]
    split_header = ["backbone", "image", "method", "Z-fill (no grad)", "forward with grad"]
    split_header += ["backward, head, step", "total"]
    notes = [f"- {r.size} px, {r.backbone}: {r.gd_note}." for r in rows if r.gd_note]
    parts = [
        run_lines(str(args.device)),
        "",
        f"Settings: batch {args.batch} unless noted, SGD (lr {LR:g}, momentum 0.9), "
        f"sampling_fraction {args.sampling_fraction:g}, patches of {args.patch_size} px, "
        f"latent_dim {args.latent_dim}, fill chunk {fill_chunk(args)}"
        + (", models and batch channels-last" if args.channels_last else "")
        + f"; medians of {args.repeats} interleaved repeats after one warm-up step.",
        "",
        markdown_table(main_header, main_rows),
        "",
        *(["Batch notes:", "", *notes, ""] if notes else []),
        f"Targets at {TARGET_SIZE} px: PatchGD 100 % ≤ {TARGET_FULL}× GD's time per image, "
        f"PatchGD 50 % ≤ {TARGET_HALF}×.",
        "",
        *target_lines(rows, args.backbone),
        "",
        "Where the time goes, seconds per image (medians):",
        "",
        markdown_table(split_header, split_rows),
    ]
    return "\n".join(parts) + "\n"


def plot(rows: list[Row], backbones: list[str]) -> object:
    styles = {"gd": "o-", "full": "s--", "half": "^:"}
    time = Panel("Training step time", "image side (px)", "seconds per image (median)", log_y=True)
    ylabel = "PatchGD / GD time per image (faint: expected)"
    ratio = Panel("PatchGD relative to GD", "image side (px)", ylabel)
    ratio.references = [(TARGET_FULL, "targets (1024 px)"), (TARGET_HALF, "")]
    for backbone in backbones:
        mine = sorted((r for r in rows if r.backbone == backbone), key=lambda r: r.size)
        for m in METHODS:
            have = [r for r in mine if r.has(m)]
            xs, ys = [r.size for r in have], [r.times[m].median() for r in have]
            time.lines.append((f"{LABELS[m]}, {backbone}", xs, ys, styles[m]))
        for colour, m in zip(("C1", "C2"), ("full", "half"), strict=True):
            have = [r for r in mine if r.ratio(m) is not None]
            xs = [r.size for r in have]
            measured = [r.ratio(m) for r in have]
            ratio.lines.append((LABELS[m], xs, measured, styles[m], {"color": colour}))
            faint = {"color": colour, "alpha": 0.3}
            ratio.lines.append((None, xs, [r.expected(m) for r in have], "-", faint))
    return draw([time, ratio])


# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_options(parser)
    add_speed_options(parser, batch=2, repeats=3, quick_repeats=1)
    parser.add_argument(
        "--sampling-fraction",
        type=float,
        default=0.25,
        help="k as a fraction of the grid (default 0.25: ζ = 4 at 100 %%, 2 at 50 %%)",
    )
    return speed_defaults(parser.parse_args(argv), [512, 1024, 2048], 3, 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for backbone in args.backbone:
        memory = GDMemory.probe(backbone, device, min(MEMORY_PROBE_SIDE, args.sizes[-1]))
        for size in args.sizes:
            rows.append(run_size(backbone, size, args, device, memory))
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the last size's models are gone; return their memory

    figure = partial(plot, rows, args.backbone)
    publish(args, SECTION, markdown(rows, args), figure, FIGURE, caption=CAPTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
