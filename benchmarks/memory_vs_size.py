"""Peak training-step memory against image size: GD against PatchGD, batch of one image.

Each backbone × method × side is one steady Adam step in a fresh subprocess of this script,
measured as the planner does (:func:`patchgd.planner.measure_training_step`); the methods, the
columns and the prediction for GD sizes left out are described in docs/benchmarks.md.

    python benchmarks/memory_vs_size.py            # 512 to 8192 px (TIFF to 16384), ResNet50
                                                   # and MobileNetV2; writes docs/benchmarks.md
    python benchmarks/memory_vs_size.py --quick    # MobileNetV2, 256 and 512 px: a smoke run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _report import (
    add_common_options,
    markdown_table,
    mib,
    publish,
    ram_gib,
    run_lines,
)
from read_memory import write_tiff

SECTION = "memory"
FIGURE = "memory_vs_size"
NUM_CLASSES = 10
IN_CHANS = 3
GD, PATCHGD_MEMORY, PATCHGD_TIFF = "GD", "PatchGD, image in memory", "PatchGD, from TIFF"
METHODS = (GD, PATCHGD_MEMORY, PATCHGD_TIFF)


# --------------------------------------------------------------------------------------------
# The child process: one training step, one JSON line
# --------------------------------------------------------------------------------------------
def _param_bytes(module: Any) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def measure_step(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the model and its batch, measure a steady Adam step, report the figures."""
    import torch

    from patchgd import GDClassifier, HeadConfig, InnerLoopConfig, PatchGDClassifier
    from patchgd.planner import measure_training_step

    torch.manual_seed(0)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    size, method = spec["size"], spec["method"]
    if method == GD:
        model = GDClassifier(spec["backbone"], NUM_CLASSES, size, in_chans=IN_CHANS)
    else:
        model = PatchGDClassifier(
            spec["backbone"],
            NUM_CLASSES,
            size,
            spec["patch"],
            latent_dim=spec["latent_dim"],
            in_chans=IN_CHANS,
            head=HeadConfig(norm=spec["head_norm"], pool=spec["head_pool"]),
            loop=InnerLoopConfig(
                patches_per_iteration=spec["k"], inner_iterations=spec["inner_iterations"]
            ),
            fill_chunk=spec["fill_chunk"],
        )
    model = model.to(device).train()
    if method == PATCHGD_TIFF:
        from patchgd.data.lazy import LazyImage
        from patchgd.data.source_patches import SourcePatches

        image = LazyImage(spec["tiff"], 0, (size, size), (size, size))
        batch: Any = SourcePatches([image], model.grid, device=device, num_workers=0)
        batch_bytes = 0  # the provider holds a file handle, no pixels
    else:
        batch = torch.randn(1, IN_CHANS, size, size, device=device)
        batch_bytes = batch.numel() * batch.element_size()
    targets = torch.arange(1, device=device) % NUM_CLASSES
    start = time.perf_counter()
    static, report = measure_training_step(model, batch, targets, device)
    seconds = time.perf_counter() - start
    weights = _param_bytes(model)
    return {
        "weights_bytes": weights,
        "static_bytes": static,
        "batch_bytes": batch_bytes,
        "head_bytes": None if method == GD else _param_bytes(model.head),
        "step_bytes": report.tensor_bytes,
        "peak_bytes": static + report.tensor_bytes,
        "rss_bytes": report.rss_bytes,
        "seconds": seconds,
        "grid": None if method == GD else list(model.grid.shape),
    }


# --------------------------------------------------------------------------------------------
# The parent: TIFFs, the run plan, predictions, the report
# --------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One table row: a measurement, a prediction, or a run left out (with the reason)."""

    backbone: str
    method: str
    size: int
    result: dict[str, Any] | None = None
    predicted_bytes: float | None = None
    note: str = ""

    @property
    def peak(self) -> float | None:
        return None if self.result is None else self.result["peak_bytes"]


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one measurement in a fresh process; raise RuntimeError with its output on failure."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"timed out after {timeout:.0f} s") from err
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        raise RuntimeError(f"exit status {done.returncode}: " + " / ".join(tail))
    return json.loads(done.stdout.strip().splitlines()[-1])


def linear_in_pixels(points: list[tuple[int, float]], size: int) -> float:
    """Extrapolate ``value = a + b·side²`` through the two largest measured sides.

    With one point, the value is scaled with the pixels (an overestimate: weights do not grow).
    """
    if len(points) == 1:
        ((s2, v2),) = points
        return v2 * size**2 / s2**2
    (s1, v1), (s2, v2) = sorted(points)[-2:]
    slope = (v2 - v1) / (s2**2 - s1**2)
    return v2 + slope * (size**2 - s2**2)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_all(args: argparse.Namespace, spec_base: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    limit = args.max_gd_gib * 2**30
    with tempfile.TemporaryDirectory(prefix="patchgd-bench-") as workdir:
        tiffs: dict[int, str] = {}

        def tiff_for(size: int) -> str:
            if size not in tiffs:
                path = Path(workdir) / f"image_{size}.tif"
                start = time.perf_counter()
                level = 1 if args.compression == "zlib" else None  # the fastest to write
                write_tiff(path, size, args.tile, args.compression, level)
                log(
                    f"wrote {size} px TIFF ({path.stat().st_size / 2**20:.1f} MiB) "
                    f"in {time.perf_counter() - start:.1f} s"
                )
                tiffs[size] = str(path)
            return tiffs[size]

        for backbone in args.backbones:
            for method in METHODS:
                sizes = list(args.sizes) + (list(args.tiff_sizes) if method == PATCHGD_TIFF else [])
                measured: list[tuple[int, float]] = []  # (side, peak) of this backbone × method
                rss: list[tuple[int, float]] = []
                for size in sizes:
                    row = Row(backbone, method, size)
                    rows.append(row)
                    if method == GD and measured:
                        guess = linear_in_pixels(measured, size)
                        guess_rss = linear_in_pixels(rss, size) if rss else 0.0
                        if max(guess, guess_rss) > limit:
                            row.predicted_bytes = guess
                            row.note = f"not run: predicted above --max-gd-gib {args.max_gd_gib:g}"
                            log(f"{backbone} {method} {size} px: {row.note} ({mib(guess)} MiB)")
                            continue
                    if method == PATCHGD_TIFF and size > max(args.sizes) and measured:
                        # The fill dominates: its time grows with the pixels.
                        last_size = sorted(measured)[-1][0]
                        last = find(rows, backbone, method, last_size)
                        assert last is not None and last.result is not None
                        minutes = last.result["seconds"] * size**2 / last_size**2 / 60
                        if minutes > args.max_minutes:
                            row.note = (
                                f"not run: its step would take about {minutes:.1f} min "
                                f"(over --max-minutes {args.max_minutes:g})"
                            )
                            log(f"{backbone} {method} {size} px: {row.note}")
                            continue
                    spec = {**spec_base, "backbone": backbone, "method": method, "size": size}
                    if method == PATCHGD_TIFF:
                        spec["tiff"] = tiff_for(size)
                    start = time.perf_counter()
                    try:
                        row.result = run_child(spec, args.child_timeout)
                    except RuntimeError as err:
                        row.note = f"failed: {err}"
                        log(f"{backbone} {method} {size} px: {row.note}")
                        continue
                    measured.append((size, row.result["peak_bytes"]))
                    if row.result["rss_bytes"] is not None:
                        rss.append((size, row.result["rss_bytes"]))
                    log(
                        f"{backbone} {method} {size} px: peak {mib(row.peak)} MiB, "
                        f"RSS {mib(row.result['rss_bytes'])} MiB, step "
                        f"{row.result['seconds']:.1f} s ({time.perf_counter() - start:.1f} s "
                        "with the process)"
                    )
    return rows


def find(rows: list[Row], backbone: str, method: str, size: int) -> Row | None:
    return next(
        (r for r in rows if (r.backbone, r.method, r.size) == (backbone, method, size)), None
    )


def target_checks(args: argparse.Namespace, rows: list[Row]) -> list[str]:
    """The two targets, each met or missed with the measured ratio."""
    low, high = min(args.sizes), max(args.sizes)
    at = 2048 if 2048 in args.sizes else None
    lines = [
        f"Target 1: PatchGD's peak grows by at most {args.growth_target:g}× from {low} to "
        f"{high} px."
    ]
    for backbone in args.backbones:
        for method in (PATCHGD_TIFF, PATCHGD_MEMORY):
            a, b = find(rows, backbone, method, low), find(rows, backbone, method, high)
            if a is None or b is None or a.peak is None or b.peak is None:
                lines.append(f"- {backbone}, {method}: not checked (a size was not measured)")
                continue
            ratio = b.peak / a.peak
            verdict = "**met**" if ratio <= args.growth_target else "**missed**"
            lines.append(
                f"- {backbone}, {method}: {verdict}, {ratio:.3f}× "
                f"({mib(a.peak)} → {mib(b.peak)} MiB)"
            )
    lines.append(
        f"- With the image in memory the batch alone grows from {mib(low**2 * IN_CHANS * 4)} to "
        f"{mib(high**2 * IN_CHANS * 4)} MiB (float32); reading patches from the TIFF removes it."
    )

    gd_sizes = sorted({r.size for r in rows if r.method == GD and r.peak is not None}, reverse=True)
    if at is None and gd_sizes:  # quick runs: the largest size GD was measured at
        at = gd_sizes[0]
    lines += [
        "",
        f"Target 2: at {at} px PatchGD's peak is at most {args.ratio_target:g}× GD's"
        + ("" if at == 2048 else " (2048 px is not in this run's sizes)")
        + ".",
    ]
    for backbone in args.backbones:
        gd = find(rows, backbone, GD, at) if at else None
        for method in (PATCHGD_MEMORY, PATCHGD_TIFF):
            pgd = find(rows, backbone, method, at) if at else None
            if gd is None or pgd is None or pgd.peak is None or gd.peak is None:
                why = "GD not measured there" if gd is not None and gd.peak is None else "no data"
                lines.append(f"- {backbone}, {method}: not checked ({why})")
                continue
            ratio = pgd.peak / gd.peak
            verdict = "**met**" if ratio <= args.ratio_target else "**missed**"
            lines.append(
                f"- {backbone}, {method}: {verdict}, {ratio:.3f}× "
                f"({mib(pgd.peak)} against {mib(gd.peak)} MiB)"
            )
    return lines


def table(rows: list[Row], patch: int) -> str:
    header = [
        "backbone",
        "method",
        "side (px)",
        "grid",
        "peak (MiB)",
        "step tensors (MiB)",
        "weights + batch + Adam state (MiB)",
        "peak RSS (MiB)",
        "step (s)",
    ]
    body = []
    for r in rows:
        if r.result is not None:
            res = r.result
            grid = "—" if res["grid"] is None else f"{res['grid'][0]}×{res['grid'][1]}"
            body.append(
                [
                    r.backbone,
                    r.method,
                    r.size,
                    grid,
                    f"**{mib(res['peak_bytes'])}**",
                    mib(res["step_bytes"]),
                    mib(res["static_bytes"]),
                    mib(res["rss_bytes"]),
                    f"{res['seconds']:.1f}",
                ]
            )
        else:
            peak = (
                f"*≈ {mib(r.predicted_bytes)} predicted*" if r.predicted_bytes is not None else "—"
            )
            grid = "—" if r.method == GD else f"{-(-r.size // patch)}×{-(-r.size // patch)}"
            body.append([r.backbone, r.method, r.size, grid, peak, r.note, "", "", ""])
    return markdown_table(header, body)


def figure(rows: list[Row], args: argparse.Namespace) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {GD: "tab:red", PATCHGD_MEMORY: "tab:blue", PATCHGD_TIFF: "tab:green"}
    styles = ["-", "--", "-.", ":"]
    markers = ["o", "s", "^", "D"]
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, backbone in enumerate(args.backbones):
        for method in METHODS:
            mine = [r for r in rows if r.backbone == backbone and r.method == method]
            done = [(r.size, r.peak / 2**20) for r in mine if r.peak is not None]
            guess = [(r.size, r.predicted_bytes / 2**20) for r in mine if r.predicted_bytes]
            style = dict(color=colours[method], marker=markers[i % len(markers)])
            if done:
                ax.plot(
                    [x for x, _ in done],
                    [y for _, y in done],
                    linestyle=styles[i % len(styles)],
                    **style,
                    label=f"{backbone}, {method}",
                )
            if guess:
                ax.plot(
                    [x for x, _ in done[-1:] + guess],
                    [y for _, y in done[-1:] + guess],
                    linestyle=":",
                    markerfacecolor="none",
                    **style,
                    label=f"{backbone}, {method}: predicted, not run",
                )
    ram = ram_gib()
    if ram and args.device == "cpu":
        ax.axhline(ram * 1024, color="grey", linewidth=0.8, linestyle="--")
        ax.annotate(
            f"RAM of this machine ({ram:.0f} GiB)",
            (0.01, ram * 1024),
            color="grey",
            xycoords=("axes fraction", "data"),
            va="bottom",
            fontsize=8,
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    sides = sorted({r.size for r in rows})
    ax.set_xticks(sides, [str(s) for s in sides])
    ax.set_xlabel("image side (px), batch of 1 image")
    ax.set_ylabel("training-step peak: weights + batch + step tensors (MiB)")
    ax.set_title(f"Peak memory of one training step ({args.device})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return fig


def report(args: argparse.Namespace, rows: list[Row]) -> str:
    heads = sorted(
        {(r.size, r.result["head_bytes"]) for r in rows if r.result and r.result["head_bytes"]}
    )
    settings = (
        f"Settings: patch {args.patch} px, latent_dim {args.latent_dim}, k = {args.k}, "
        f"ζ = ε = {args.inner_iterations}, fill chunk {args.fill_chunk}, head "
        f"{args.head_pool} pooling with {args.head_norm} norm (parameters: "
        + (", ".join(f"{mib(b)} MiB at {s} px" for s, b in heads) or "n/a")
        + f"); TIFF {args.tile} px tiles, {args.compression or 'no'} compression; "
        f"GD run only where predicted under {args.max_gd_gib:g} GiB."
    )
    lines = [run_lines(args.device), "", settings, "", table(rows, args.patch), ""]
    return "\n".join(lines + target_checks(args, rows)) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_options(parser)
    parser.add_argument(
        "--backbones",
        nargs="+",
        help="timm names (default: resnet50 and mobilenetv2_100; --quick: mobilenetv2_100)",
    )
    parser.add_argument("--sizes", nargs="+", type=int, help="image sides for every method")
    parser.add_argument("--tiff-sizes", nargs="*", type=int, help="extra sides, PatchGD from TIFF")
    parser.add_argument("--patch", type=int, help="patch side (default 256; --quick: 128)")
    parser.add_argument("--latent-dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=4, help="patches per inner iteration")
    parser.add_argument("--inner-iterations", type=int, default=2, help="ζ")
    parser.add_argument("--fill-chunk", type=int, default=16)
    parser.add_argument("--head-norm", default="group", choices=["group", "batch", "none"])
    parser.add_argument("--head-pool", default="flatten", choices=["flatten", "avg"])
    parser.add_argument("--tile", type=int, default=256, help="TIFF tile side")
    parser.add_argument("--compression", default="zlib", help="tifffile compression, or none")
    parser.add_argument(
        "--max-gd-gib",
        type=float,
        default=12.0,
        help="run GD only where its predicted peak and RSS stay below this",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=8.0,
        help="skip an extra TIFF size whose step would take longer",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads in every measurement (default: torch's; --quick: 1)",
    )
    parser.add_argument("--child-timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--growth-target", type=float, default=1.25)
    parser.add_argument("--ratio-target", type=float, default=0.15)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a measurement's spec, as JSON
    args = parser.parse_args(argv)
    quick = args.quick
    args.backbones = args.backbones or (
        ["mobilenetv2_100"] if quick else ["resnet50", "mobilenetv2_100"]
    )
    args.sizes = sorted(args.sizes or ([256, 512] if quick else [512, 1024, 2048, 4096, 8192]))
    if args.tiff_sizes is None:
        args.tiff_sizes = [1024] if quick else [16384]
    args.tiff_sizes = sorted(s for s in args.tiff_sizes if s > max(args.sizes))
    args.patch = args.patch or (128 if quick else 256)
    if args.threads is None and quick:
        args.threads = 1  # a smoke run: one thread starts fast on a busy machine
    args.compression = None if args.compression.lower() == "none" else args.compression
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure_step(json.loads(args.child))))
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # so the machine line names the children's count
    spec_base = {
        "threads": args.threads,
        "device": args.device,
        "patch": args.patch,
        "latent_dim": args.latent_dim,
        "k": args.k,
        "inner_iterations": args.inner_iterations,
        "fill_chunk": args.fill_chunk,
        "head_norm": args.head_norm,
        "head_pool": args.head_pool,
    }
    start = time.perf_counter()
    rows = run_all(args, spec_base)
    log(f"all runs: {time.perf_counter() - start:.0f} s")

    caption = "peak memory against image size"
    publish(args, SECTION, report(args, rows), lambda: figure(rows, args), FIGURE, caption=caption)
    failed = [r for r in rows if r.note.startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
