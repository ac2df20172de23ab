"""What every benchmark script shares: the machine line, and writing its section of the docs.

Each script owns one section of ``docs/benchmarks.md`` between the markers
``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``; rerunning the script replaces that section
(atomically) and leaves the rest of the page alone. Plots go beside the page as PNG files.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGE = DOCS / "benchmarks.md"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def machine_line(device: str = "cpu") -> str:
    """Date, machine, device and library versions, as one markdown bullet list."""
    import torch

    ram = ram_gib()
    lines = [
        f"- {_dt.date.today().isoformat()}; {os.cpu_count()} CPU cores ({cpu_name()})"
        + (f", {ram:.0f} GiB RAM" if ram else ""),
        f"- device: {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.startswith("cuda") else "")
        + f"; torch {torch.__version__}, {torch.get_num_threads()} intra-op threads",
    ]
    try:
        import timm

        lines[-1] += f", timm {timm.__version__}"
    except ImportError:
        pass
    return "\n".join(lines)


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that produced a section, as a user would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(ROOT))
    except ValueError:
        script_text = str(script)
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", script_text, *map(shlex.quote, args)])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, markdown: str, page: Path = PAGE) -> None:
    """Replace (or append) the ``name`` section of ``page``, atomically."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = page.read_text() if page.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = page.with_suffix(page.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, page)


def save_figure(fig: object, name: str, page: Path = PAGE) -> Path:
    """Save a matplotlib figure as ``NAME.png`` beside ``page``, atomically; returns the path."""
    path = page.parent / f"{name}.png"
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")  # type: ignore[attr-defined]
    os.replace(tmp, path)
    return path


def mib(nbytes: float | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:,.1f}"


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """``--quick``, ``--page`` and ``--device``, the same in every benchmark script."""
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument(
        "--page",
        type=Path,
        help="markdown page to write the section and plot into (default: docs/benchmarks.md; "
        "with --quick, nothing is written unless --page is given)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")


def output_page(args: argparse.Namespace, default: Path = PAGE) -> Path | None:
    """Where this run's results go: ``--page``, else ``default`` for full runs only."""
    if args.page is not None:
        return args.page
    return None if args.quick else default


def mean_sd(values: Sequence[float], digits: int = 2) -> str:
    """``mean ± sd`` of the values (sd 0 for one value)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def fill_chunk(args: argparse.Namespace) -> str:
    """The Z-fill chunk a run uses, as text: ``--fill-chunk``, else the library's default for
    each of ``args.backbone`` at the patch size on the device."""
    from patchgd.encoder import PatchEncoder
    from patchgd.model import default_fill_chunk

    if args.fill_chunk is not None:
        return f"{args.fill_chunk} patches"
    chunks = []
    for name in args.backbone:
        largest = PatchEncoder(name, args.patch_size).largest_activation()
        chunks.append(f"{default_fill_chunk(largest, args.device)} patches for {name}")
    return ", ".join(chunks)


def run_lines(device: str = "cpu", argv: Sequence[str] | None = None) -> str:
    """What every section opens with: the command, the machine, the speed-relevant settings."""
    return "\n".join(
        [f"Command: `{command_line(argv)}`", "", machine_line(device), environment_line()]
    )


def environment_line() -> str:
    """Environment variables that change CPU speed (threads, spinning, allocator), if set."""
    keys = sorted(
        k
        for k in os.environ
        if k.startswith(("OMP_", "MKL_", "KMP_", "MALLOC_", "DNNL_", "ONEDNN_"))
        or k == "LD_PRELOAD"
    )
    if not keys:
        return "- environment: no OMP_*, MALLOC_* or LD_PRELOAD settings (glibc malloc defaults)"
    return "- environment: " + ", ".join(f"`{k}={os.environ[k]}`" for k in keys)


def publish(
    args: argparse.Namespace,
    section: str,
    markdown: str,
    figure: Callable[[], object] | None = None,
    figure_name: str | None = None,
    default: Path = PAGE,
    caption: str = "",
) -> None:
    """Print a section; on a full run (or with ``--page``) write it, with the figure that
    ``figure()`` draws saved as ``figure_name.png`` beside the page and shown under it with
    ``caption`` as its text."""
    print(markdown)
    page = output_page(args, default)
    if page is None:
        return
    page.parent.mkdir(parents=True, exist_ok=True)
    if figure is not None:
        path = save_figure(figure(), figure_name or section, page)
        markdown = markdown.rstrip("\n") + f"\n\n![{caption or section}]({path.name})\n"
    write_section(section, markdown, page)


@dataclass
class Panel:
    """One plot: lines ``(label, xs, ys, matplotlib format)``, optionally with a dict of
    ``Axes.plot`` keywords last (e.g. ``color``, ``alpha``); grey dotted reference lines at
    ``(y, label)`` and ``(x, label)``; x on a log-2 axis ticked at the lines' x values unless
    ``log2_x`` is off. A line with no points is left out, legend included."""

    title: str
    xlabel: str
    ylabel: str
    lines: list[tuple] = field(default_factory=list)
    references: list[tuple[float, str]] = field(default_factory=list)
    x_references: list[tuple[float, str]] = field(default_factory=list)
    log2_x: bool = True
    log_y: bool = False
    xlim: tuple[float, float] | None = None
    ylim: tuple[float, float] | None = None


def draw(panels: Sequence[Panel], width: float = 5.0, height: float = 4.0) -> object:
    """The panels side by side, as one matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), height), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for label, xs, ys, fmt, *style in panel.lines:
            if len(xs):
                ax.plot(xs, ys, fmt, label=label, **(style[0] if style else {}))
        for y, label in panel.references:
            ax.axhline(y, color="grey", lw=1, ls=":", label=label or None)
        for x, label in panel.x_references:
            ax.axvline(x, color="grey", lw=1, ls=":", label=label or None)
        if panel.log2_x:
            ticks = sorted({x for line in panel.lines for x in line[1]})
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        if panel.log_y:
            ax.set_yscale("log")
        if panel.xlim:
            ax.set_xlim(*panel.xlim)
        if panel.ylim:
            ax.set_ylim(*panel.ylim)
        ax.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
