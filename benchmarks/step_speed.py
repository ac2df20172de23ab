"""PatchGD's training step against a straightforward Algorithm 1, in images per second.

The reference is Algorithm 1 as the paper states it, written out here in plain PyTorch: the
Z-fill image by image (every patch of one image in one encoder call, as the authors' code
fills), then ζ inner iterations that each re-encode k patches per image (one random permutation
of the grid per batch, shared by its images) with gradients, write them into a detached Z, run
the head and step the optimizer every ε iterations. ``patchgd`` runs the same step through
``PatchGDClassifier.training_step``, at its defaults (patches channels-last on the CPU), with
the patches as the images come (``channels_last=False``, as the reference), with the fast path
(bf16 autocast over the whole step, and over the fill only) and with its encoder compiled
(``compile_encoder``; the compile's own time is reported apart). All start from the same
weights, on the same random batch, with Adam; repeats are interleaved and the tables give
medians.

The configuration is that of the authors' UltraMNIST code: ResNet50, 512 px images, D = 256,
1/8 of the grid per inner iteration, ζ = ε = every patch once, batch 4, 6 classes, the paper's
head; the patch size varies (32 px, the authors' grid of 16 × 16, up to 256 px, the paper's
UltraMNIST setting). The fill chunk's default has its own benchmark, ``fill_chunk.py``.

    python benchmarks/step_speed.py           # resnet50 and mobilenetv3_small_050: ~35 min
    python benchmarks/step_speed.py --quick   # a smoke run (tests), without torch.compile
    python benchmarks/step_speed.py --device cuda --backbones resnet50 --batch 16
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from _report import Panel, add_common_options, draw, markdown_table, publish, run_lines
from _timing import interleaved, num, progress
from torch import Tensor, nn

from patchgd import InnerLoopConfig, PatchGDClassifier, StepHooks

SECTION, FIGURE = "step-speed", "step_speed"
CLASSES, LATENT, FRACTION, LR = 6, 256, 1 / 8, 1e-3
METHODS = (
    "straightforward", "patchgd", "contiguous", "bf16 fill", "bf16 fill, CL", "bf16 step",
    "compiled",
)  # fmt: skip
LABELS = {
    "straightforward": "straightforward",
    "patchgd": "patchgd",
    "contiguous": "patchgd, contiguous",
    "bf16 fill": "patchgd, bf16 fill",
    "bf16 fill, CL": "patchgd, bf16 fill, channels-last weights",
    "bf16 step": "patchgd, bf16 step",
    "compiled": "patchgd, compiled encoder",
}


# --------------------------------------------------------------------------------------------
# The reference: Algorithm 1 as the paper states it
# --------------------------------------------------------------------------------------------
def straightforward_step(
    encoder: nn.Module,
    head: nn.Module,
    images: Tensor,
    targets: Tensor,
    optimizer: torch.optim.Optimizer,
    patch: int,
    k: int,
    inner: int,
    generator: torch.Generator,
) -> None:
    """One outer step: per-image fill, then ``inner`` iterations of ``k`` patches, ε = ζ."""
    b, c = images.shape[:2]
    m = images.shape[-1] // patch
    tiles = images.unfold(2, patch, patch).unfold(3, patch, patch)  # (B, C, m, m, p, p)
    tiles = tiles.permute(0, 2, 3, 1, 4, 5).reshape(b, m * m, c, patch, patch)
    with torch.no_grad():
        z = torch.stack([encoder(tiles[i]).T.reshape(-1, m, m) for i in range(b)])
    optimizer.zero_grad(set_to_none=True)
    order = torch.randperm(m * m, generator=generator).to(images.device)
    for j in range(inner):
        pos = order[j * k : (j + 1) * k]
        emb = encoder(tiles[:, pos].reshape(-1, c, patch, patch)).view(b, len(pos), -1)
        z_j = z.clone()
        z_j[:, :, pos // m, pos % m] = emb.permute(0, 2, 1)
        (F.cross_entropy(head(z_j), targets) / inner).backward()
        z = z_j.detach()
    optimizer.step()


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------
@dataclass
class Row:
    backbone: str
    patch: int
    image: int
    k: int
    inner: int
    chunk: int
    seconds: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METHODS})
    compile_s: float | None = None  # the compiled model's first step, compile included

    def rate(self, method: str, batch: int) -> float:
        times = self.seconds[method]
        return batch / statistics.median(times) if times else float("nan")


def bf16(device: torch.device) -> Callable[[], object]:
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def measure_row(backbone: str, patch: int, args: argparse.Namespace, device: torch.device) -> Row:
    torch.manual_seed(0)
    loop = InnerLoopConfig(sampling_fraction=FRACTION, max_visit_fraction=1.0)
    model = PatchGDClassifier(
        backbone, CLASSES, args.image, patch, latent_dim=LATENT, loop=loop
    ).to(device)
    reference = copy.deepcopy(model)  # the same weights for the straightforward loop,
    reference.channels_last = False  # whose patches keep the images' layout, as a user's would
    contiguous = copy.deepcopy(model)
    contiguous.channels_last = False  # the layout the images come in, as the reference
    last = copy.deepcopy(model)
    last.channels_last, last.fill_dtype = True, torch.bfloat16
    last.encoder.to(memory_format=torch.channels_last)
    row = Row(
        backbone, patch, args.image, model.loop.patches_per_iteration, model.loop.inner_iterations,
        model.chunk_for(),
    )  # fmt: skip
    images = torch.randn(args.batch, 3, args.image, args.image, device=device)
    targets = torch.arange(args.batch, device=device) % CLASSES
    generator = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=LR)
    contiguous_opt = torch.optim.Adam(contiguous.parameters(), lr=LR)
    last_opt = torch.optim.Adam(last.parameters(), lr=LR)
    if args.compile:
        # Each row compiles from nothing: dynamo's in-memory cache keeps guards for every model
        # compiled before (8 per code object, then it runs eager) and inductor's disk cache
        # would make the compile look cheaper than a user's first run.
        torch._dynamo.reset()
        torch._inductor.config.force_disable_caches = True
        compiled = PatchGDClassifier(
            backbone, CLASSES, args.image, patch, latent_dim=LATENT, loop=loop,
            compile_encoder=True,
        ).to(device)  # fmt: skip
        compiled.load_state_dict(model.state_dict())
        compiled_opt = torch.optim.Adam(compiled.parameters(), lr=LR)
        start = time.perf_counter()
        compiled.train().training_step(images, targets, compiled_opt)
        row.compile_s = time.perf_counter() - start

    def patchgd(autocast: Callable[[], object] = nullcontext, fill_dtype=None) -> None:
        model.fill_dtype = fill_dtype
        model.training_step(images, targets, opt, hooks=StepHooks(autocast=autocast))

    calls: dict[str, Callable[[], None]] = {
        "straightforward": lambda: straightforward_step(
            reference.encoder,
            reference.head,
            images,
            targets,
            ref_opt,
            patch,
            row.k,
            row.inner,
            generator,
        ),  # fmt: skip
        "patchgd": patchgd,
        "contiguous": lambda: contiguous.training_step(images, targets, contiguous_opt),
        "bf16 fill": lambda: patchgd(fill_dtype=torch.bfloat16),
        "bf16 fill, CL": lambda: last.training_step(images, targets, last_opt),
        "bf16 step": lambda: patchgd(bf16(device)),
    }
    if args.compile:
        calls["compiled"] = lambda: compiled.training_step(images, targets, compiled_opt)
    model.train(), reference.train(), contiguous.train(), last.train()

    def show(r: int, seconds: dict[str, list[float]]) -> None:
        progress(
            f"{backbone} patch {patch} repeat {r + 1}/{args.repeats}: "
            + ", ".join(f"{m} {seconds[m][-1]:.2f} s" for m in seconds)
        )

    row.seconds.update(interleaved(calls, args.repeats, device, show))
    return row


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def report(rows: list[Row], args) -> None:
    methods = METHODS if args.compile else METHODS[:-1]
    steps = [
        [
            f"`{r.backbone}`",
            r.patch,
            f"{r.image // r.patch}²",
            f"{r.k} × {r.inner}",
            r.chunk,
            num(r.rate("straightforward", args.batch)),
            *(
                f"{num(r.rate(m, args.batch))} ({r.rate(m, args.batch) / r.rate('straightforward', args.batch):.2f}×)"  # noqa: E501
                for m in methods[1:]
            ),
            *([f"{r.compile_s:.0f}"] if args.compile else []),
        ]  # fmt: skip
        for r in rows
    ]
    table = markdown_table(
        [
            "backbone",
            "patch px",
            "grid",
            "k × ζ",
            "fill chunk",
            *(LABELS[m] for m in methods),
            *(["first compiled step, s"] if args.compile else []),
        ],  # fmt: skip
        steps,
    )
    text = "\n".join(
        [
            run_lines(args.device),
            "",
            f"### One training step, images per second ({args.image} px, batch {args.batch}, "
            f"D = {LATENT}, k = 1/8 of the grid, ζ = ε = every patch once, Adam, the paper's "
            f"head; median of {args.repeats} interleaved repeats)",
            "",
            "In brackets: the ratio to the straightforward loop, measured side by side.",
            "",
            table,
        ]
    )
    panels = []
    for backbone in sorted({r.backbone for r in rows}):
        title = f"{backbone}, {args.image} px, batch {args.batch}, {args.device}"
        panel = Panel(title, "patch px", "images / s")
        mine = [r for r in rows if r.backbone == backbone]
        for m in methods:
            rates = [r.rate(m, args.batch) for r in mine]
            panel.lines.append((LABELS[m], [r.patch for r in mine], rates, "o-"))
        panels.append(panel)
    publish(args, SECTION, text, lambda: draw(panels, 5, 3.6), FIGURE, caption="images per second")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_options(parser)
    parser.add_argument("--backbones", nargs="+", help="timm names (default resnet50 and a small)")
    parser.add_argument("--patches", type=int, nargs="+", help="patch sides (default 32–256)")
    parser.add_argument("--image", type=int, help="image side (default 512)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, help="timed steps per method (default 5)")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    parser.add_argument(
        "--compile",
        type=lambda v: v.lower() in ("1", "true", "yes"),
        help="also time compile_encoder=True (default: true, false with --quick)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    args.compile = not quick if args.compile is None else args.compile
    args.backbones = args.backbones or (
        ["test_resnet"] if quick else ["resnet50", "mobilenetv3_small_050"]
    )
    args.patches = args.patches or ([16, 32] if quick else [32, 64, 128, 256])
    args.image = args.image or (64 if quick else 512)
    args.repeats = args.repeats or (1 if quick else 5)
    device = torch.device(args.device)
    rows = [
        measure_row(backbone, patch, args, device)
        for backbone in args.backbones
        for patch in args.patches
    ]
    report(rows, args)


if __name__ == "__main__":
    main()
