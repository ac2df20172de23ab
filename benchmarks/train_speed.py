"""Training time per image: PatchGD (full and 50 % coverage) against GD on the full image.

All models are built from the same timm backbone with random weights and trained in one
process on the same random batch, with SGD (lr 1e-3, momentum 0.9):

- GD: ``GDClassifier.training_step``: forward and backward of the whole image, one step;
- PatchGD, 100 %: ``PatchGDClassifier.training_step`` with
  ``InnerLoopConfig(sampling_fraction=f, max_visit_fraction=1.0)``: the Z-fill, then
  ζ = ceil(1 / f) inner iterations that re-encode every patch once with gradients, ε = ζ (one
  optimizer step per batch, as GD);
- PatchGD, 50 %: the same with ``max_visit_fraction=0.5``: half the patches re-encoded, ζ halved.

Each size gets one warm-up step per model, then the repeats interleaved (GD, PatchGD 100 %,
PatchGD 50 %, GD, ...). The tables give medians of seconds per image and the ratios of the
medians, and split every step into its parts by forward hooks (no extra work is timed).

    python benchmarks/train_speed.py            # resnet50, 512/1024/2048 px: ~10 min, 2 cores
    python benchmarks/train_speed.py --quick    # mobilenetv2_100, 256/512 px: < 1 min
    python benchmarks/train_speed.py --device cuda --batch 4 --repeats 10
    python benchmarks/train_speed.py --sampling-fraction 0.125 --sizes 1024

GD's memory grows with the image: a size where GD's step would not fit the free memory at
``--batch`` (extrapolated from a measured step on one 768 px image) runs at the largest batch
that fits, for every model, and says so. A full run writes its section of docs/benchmarks.md and
docs/train_speed.png; a quick run only prints, unless ``--page`` is given.

On the CPU two settings move the figures a lot, so the section records them: on a machine
shared with other work, ``--threads 1`` keeps timings steady (OpenMP threads waiting at barriers
for a busy core slowed small models several-fold here); and glibc's malloc hands tensors above
32 MiB back to the kernel, so every large activation is faulted in afresh, which costs GD's
full-image passes (and PatchGD's large fill chunks) up to a third of their time.
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000`` (or jemalloc, tcmalloc) avoids that.
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
from _timing import ForwardClock, environment_line, num, progress, synchronize, timed
from torch import nn

from patchgd import GDClassifier, HeadConfig, InnerLoopConfig, PatchGDClassifier, measure
from patchgd.memory import resident_bytes

SECTION = "training"
FIGURE = "train_speed"
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


def markdown(rows: list[Row], args: argparse.Namespace, figure: str | None) -> str:
    main_rows = []
    for r in rows:
        (k, z_full), (_, z_half) = r.loops["full"], r.loops["half"]
        main_rows.append(
            [
                r.backbone,
                f"{r.size} px",
                r.batch,
                f"{r.grid[0]} × {r.grid[1]}; k = {k}; ζ = {z_full} / {z_half}",
                num(r.times["gd"].median()) if r.has("gd") else "–",
                num(r.times["full"].median()),
                times(r.ratio("full"), bold=True),
                times(r.expected("full")),
                num(r.times["half"].median()),
                times(r.ratio("half"), bold=True),
                times(r.expected("half")),
            ]
        )
    main_header = [
        "backbone",
        "image",
        "batch",
        "grid; k; ζ (100 % / 50 %)",
        "GD s/image",
        "PatchGD 100 % s/image",
        "100 % / GD",
        "expected",
        "PatchGD 50 % s/image",
        "50 % / GD",
        "expected",
    ]
    split_rows = []
    for r in rows:
        for method in METHODS:
            if not r.has(method):
                continue
            t = r.times[method]
            split_rows.append(
                [
                    r.backbone,
                    f"{r.size} px",
                    LABELS[method],
                    "–" if method == "gd" else num(t.median("fill")),
                    num(t.median("forward")),
                    num(t.rest),
                    num(t.median()),
                ]
            )
    split_header = [
        "backbone",
        "image",
        "method",
        "Z-fill (no grad)",
        "forward with grad",
        "backward, head, step",
        "total",
    ]
    notes = [f"- {r.size} px, {r.backbone}: {r.gd_note}." for r in rows if r.gd_note]
    batch_text = f"a batch of {args.batch} image{'s' if args.batch > 1 else ''}"
    parts = [
        "## Training time per image: PatchGD against GD",
        "",
        "`benchmarks/train_speed.py` times training steps on random images. All models are "
        "built from the same timm backbone with random weights, in one process, on the same "
        f"batch, with SGD (lr {LR:g}, momentum 0.9); {batch_text} unless noted:",
        "",
        "- **GD**: `GDClassifier.training_step`, forward and backward of the whole image, one "
        "optimizer step.",
        "- **PatchGD, 100 %**: `PatchGDClassifier.training_step` with "
        f"`InnerLoopConfig(sampling_fraction={args.sampling_fraction:g}, "
        "max_visit_fraction=1.0)`: the Z-fill (every patch encoded without gradients, up to "
        f"{fill_chunk(args)} per encoder call), then ζ inner iterations that each re-encode k "
        "patches per image with gradients and run the head on Z, so every patch is re-encoded "
        "once; ε = ζ, one optimizer step per batch as in GD.",
        "- **PatchGD, 50 %**: the same with `max_visit_fraction=0.5`: half the patches "
        "re-encoded, in half as many inner iterations.",
        "",
        f"Patches of {args.patch_size} px, latent_dim {args.latent_dim}, the paper's head "
        "(GroupNorm instead of BatchNorm at batch 1, where one image's grid reduces to 1 × 1)"
        + (", models and batch in channels-last memory format" if args.channels_last else "")
        + ". "
        "Each size gets one warm-up step per model, then "
        f"{args.repeats} repeat{'s' if args.repeats > 1 else ''} interleaved "
        "(GD, PatchGD 100 %, PatchGD 50 %, GD, ...). "
        "Figures are medians over the repeats; ratios are of the medians.",
        "",
        "*expected* is the ratio if PatchGD's passes cost what GD's cost per pixel: its step "
        "does a no-grad pass over every patch (GD's forward) plus forward and backward of the "
        "visited patches (that share of GD's step), so expected = coverage + GD forward / GD "
        "step, from GD's measured split below. With backward = 2 × forward that is the "
        "arithmetic floor, 1.33× for 100 % and 0.83× for 50 %. PatchGD comes in under it where "
        "its batches of patches run faster per pixel than the whole image.",
        "",
        f"Command: `{command_line()}`",
        "",
        machine_line(str(args.device)),
        environment_line(),
        "",
        markdown_table(main_header, main_rows),
        "",
    ]
    if notes:
        parts += ["Batch notes:", "", *notes, ""]
    parts += [
        f"Targets at {TARGET_SIZE} px: PatchGD 100 % ≤ {TARGET_FULL}× GD's time per image, "
        f"PatchGD 50 % ≤ {TARGET_HALF}×.",
        "",
        *target_lines(rows, args.backbone),
        "",
        "Where the time goes, seconds per image (medians; forward hooks on GD's model and on "
        "PatchGD's encoder time the forward calls, and *backward, head, step* is the rest of "
        "the step):",
        "",
        markdown_table(split_header, split_rows),
    ]
    if figure:
        parts += ["", f"![Training time per image, PatchGD and GD]({figure})"]
    return "\n".join(parts) + "\n"


def plot(rows: list[Row], backbones: list[str]) -> object:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_time, ax_ratio) = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"gd": "o-", "full": "s--", "half": "^:"}
    for backbone in backbones:
        mine = sorted((r for r in rows if r.backbone == backbone), key=lambda r: r.size)
        for method in METHODS:
            have = [r for r in mine if r.has(method)]
            ax_time.plot(
                [r.size for r in have],
                [r.times[method].median() for r in have],
                styles[method],
                label=f"{LABELS[method]}, {backbone}",
            )
        for method in ("full", "half"):
            have = [r for r in mine if r.ratio(method) is not None]
            sizes = [r.size for r in have]
            line = ax_ratio.plot(
                sizes, [r.ratio(method) for r in have], styles[method], label=LABELS[method]
            )[0]
            ax_ratio.plot(
                sizes, [r.expected(method) for r in have], "-", color=line.get_color(), alpha=0.3
            )
    ax_ratio.axhline(TARGET_FULL, color="grey", lw=1, ls=":", label="targets (1024 px)")
    ax_ratio.axhline(TARGET_HALF, color="grey", lw=1, ls=":")
    ticks = sorted({r.size for r in rows})
    for ax in (ax_time, ax_ratio):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("image side (px)")
        ax.legend(fontsize=8)
    ax_time.set_yscale("log")
    ax_time.set_ylabel("seconds per image (median)")
    ax_time.set_title("Training step time")
    ax_ratio.set_ylabel("PatchGD / GD time per image (faint: expected)")
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
    parser.add_argument("--batch", type=int, default=2, help="images per step (default 2)")
    parser.add_argument("--repeats", type=int, help="timed steps per model (default 3; quick 1)")
    parser.add_argument(
        "--sampling-fraction",
        type=float,
        default=0.25,
        help="k as a fraction of the grid (default 0.25: ζ = 4 at 100 %%, 2 at 50 %%)",
    )
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
    args.sizes = sorted(args.sizes or ([256, 512] if quick else [512, 1024, 2048]))
    args.patch_size = args.patch_size or (128 if quick else 256)
    args.threads = args.threads or (1 if quick else None)
    args.repeats = args.repeats or (1 if quick else 3)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    page: Path | None = output_page(args)

    rows = []
    for backbone in args.backbone:
        memory = GDMemory.probe(backbone, device, min(MEMORY_PROBE_SIDE, args.sizes[-1]))
        for size in args.sizes:
            rows.append(run_size(backbone, size, args, device, memory))
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
