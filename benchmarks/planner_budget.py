"""The memory planner against its budget: at least 10 (method, backbone, size, budget) cases.

For each case the planner (:mod:`patchgd.planner`) picks a configuration by measured trial steps.
That configuration is then trained for ``--check-steps`` full steps (every inner iteration, from
a fresh model and a fresh Adam) under :func:`patchgd.memory.measure`, and the whole run's peak
(weights + batch + every tensor the steps create, Adam's state included) is compared with the
budget. The planner must never exceed the budget and should use at least 70 % of it.

    python benchmarks/planner_budget.py           # 10 cases between 1 and 8 GB; docs/benchmarks.md
    python benchmarks/planner_budget.py --quick   # 3 small cases in MiB: a smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

from patchgd import (  # noqa: E402
    DownscaledGDClassifier,
    GDClassifier,
    HeadConfig,
    InnerLoopConfig,
    PatchGDClassifier,
)
from patchgd.memory import live_training_bytes, measure  # noqa: E402
from patchgd.planner import parse_size, plan_classifier  # noqa: E402

SECTION = FIGURE = "planner"
NUM_CLASSES = 10


@dataclass(frozen=True)
class Case:
    method: str  # "PatchGD", "GD" or "downscaled GD"
    backbone: str
    size: int
    budget: str
    patch: int = 128
    k: int = 4
    batch_limit: int = 512  # the largest batch the planner may pick (downscaled GD: the batch)


FULL = [
    Case("PatchGD", "mobilenetv2_100", 512, "1GB"),
    Case("PatchGD", "mobilenetv2_100", 512, "2GB"),
    Case("PatchGD", "resnet18", 512, "1GB"),
    Case("PatchGD", "resnet18", 512, "2GB"),
    Case("PatchGD", "resnet50", 512, "4GB"),
    Case("GD", "resnet18", 1024, "2GB"),
    Case("GD", "mobilenetv2_100", 1024, "4GB"),
    Case("GD", "resnet18", 1024, "8GB"),
    Case("GD", "resnet50", 1024, "8GB"),
    Case("downscaled GD", "resnet50", 2048, "4GB", batch_limit=4),
]
QUICK = [
    Case("PatchGD", "mobilenetv2_100", 128, "160MiB", patch=32),
    Case("GD", "mobilenetv2_100", 128, "160MiB"),
    Case("downscaled GD", "mobilenetv2_100", 256, "160MiB", batch_limit=4),
]


def build(case: Case, input_size: int | None = None) -> Any:
    torch.manual_seed(0)
    if case.method == "PatchGD":
        return PatchGDClassifier(
            case.backbone,
            NUM_CLASSES,
            case.size,
            case.patch,
            head=HeadConfig(),
            loop=InnerLoopConfig(patches_per_iteration=case.k),
        )
    if case.method == "GD":
        return GDClassifier(case.backbone, NUM_CLASSES, case.size)
    return DownscaledGDClassifier(case.backbone, NUM_CLASSES, case.size, input_size or case.size)


def run_case(case: Case, device: torch.device, check_steps: int) -> dict[str, Any]:
    """Plan the case, then train the plan for ``check_steps`` full steps under the probe."""
    start = time.perf_counter()
    model, plan = plan_classifier(
        build(case),
        case.budget,
        case.batch_limit,
        rebuild=lambda size: build(case, size),
        device=device,
    )
    plan_seconds = time.perf_counter() - start
    model = model.to(device).train()
    batch = plan.batch_size
    images = torch.randn(batch, 3, case.size, case.size, device=device)
    targets = torch.arange(batch, device=device) % NUM_CLASSES
    optimizer = torch.optim.Adam(model.parameters())

    def train() -> None:
        for _ in range(check_steps):
            model.training_step(images, targets, optimizer)

    _, report = measure(train, device)
    peak = live_training_bytes(model, images) + report.tensor_bytes
    budget = parse_size(case.budget)
    loop = getattr(model, "loop", None)
    return {
        "case": case,
        "plan": plan,
        "config": (
            f"patch {case.patch}, batch {batch}, k {loop.patches_per_iteration}, "
            f"ζ {loop.inner_iterations}, fill chunk {model.chunk_for(device)}"
            if case.method == "PatchGD"
            else f"batch {batch}"
            + (f", input {model.input_size[0]} px" if case.method == "downscaled GD" else "")
        ),
        "budget": budget,
        "predicted": plan.predicted_peak_bytes,
        "measured": peak,
        "plan_seconds": plan_seconds,
    }


def report(results: list[dict[str, Any]], args: argparse.Namespace, figure: str | None) -> str:
    rows, misses = [], []
    for r in results:
        c = r["case"]
        use = r["measured"] / r["budget"]
        ok = r["measured"] <= r["budget"] and use >= 0.70
        if not ok:
            misses.append(r)
        rows.append(
            [
                c.method,
                c.backbone,
                c.size,
                c.budget,
                r["config"],
                f"{r['predicted'] / 2**20:,.0f}",
                f"{r['measured'] / 2**20:,.0f}",
                f"{100 * use:.0f} %" if ok else f"**{100 * use:.0f} %**",
                f"{r['plan_seconds']:.0f}",
            ]
        )
    over = [r for r in results if r["measured"] > r["budget"]]
    low = [r for r in results if r["measured"] <= r["budget"] and r["measured"] < 0.7 * r["budget"]]
    lines = [
        "## The memory planner against its budget",
        "",
        "`benchmarks/planner_budget.py` plans each case with `patchgd.planner.plan_classifier` "
        "(the same call as `patchgd fit --memory-budget`): the largest batch up to the limit "
        f"(PatchGD, GD; limit {results[0]['case'].batch_limit}) or the largest input size "
        "(downscaled GD, at its batch), by measured trial steps. The chosen configuration is "
        f"then trained for {args.check_steps} full steps from a fresh model and optimizer under "
        "`patchgd.memory.measure`: **measured** is weights + batch + the peak of every tensor "
        "those steps create (activations, gradients, Adam's state), all inner iterations "
        "included. PatchGD: k = 4, ζ covers the grid once, ε = ζ, the paper's head; "
        "3 channels, 10 classes, random init. Budgets in GB are 10⁹ bytes; the table is in MiB.",
        "",
        f"`{command_line()}`",
        "",
        machine_line(args.device),
        "",
        markdown_table(
            [
                "method",
                "backbone",
                "image px",
                "budget",
                "plan",
                "predicted MiB",
                "measured MiB",
                "used",
                "planning s",
            ],
            rows,
        ),
        "",
        f"Target: never over the budget, and at least 70 % of it used, in every case. "
        f"Over budget: {len(over)} of {len(results)} cases; under 70 %: {len(low)}.",
    ]
    for r in over:
        lines.append(
            f"- **missed**: {r['case']} measured {r['measured'] / r['budget']:.3f}× the budget"
        )
    for r in low:
        lines.append(f"- **missed**: {r['case']} used {100 * r['measured'] / r['budget']:.0f} %")
    if not misses:
        lines.append("- **met** in every case.")
    if figure:
        lines += ["", f"![measured peak against budget]({figure})"]
    return "\n".join(lines)


def plot(results: list[dict[str, Any]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = {"PatchGD": "o", "GD": "s", "downscaled GD": "^"}
    for method, marker in markers.items():
        chosen = [r for r in results if r["case"].method == method]
        if chosen:
            ax.scatter(
                [r["budget"] / 2**30 for r in chosen],
                [r["measured"] / 2**30 for r in chosen],
                marker=marker,
                label=method,
            )
    top = max(r["budget"] for r in results) / 2**30 * 1.1
    ax.plot([0, top], [0, top], "k-", lw=1, label="budget")
    ax.plot([0, top], [0, 0.7 * top], "k:", lw=1, label="70 % of budget")
    ax.set_xlabel("budget (GiB)")
    ax.set_ylabel("measured peak (GiB)")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.legend()
    ax.set_title("Planned configurations: measured peak against budget")
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_options(parser)
    parser.add_argument("--check-steps", type=int, default=2, help="full steps run per plan")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = []
    for case in QUICK if args.quick else FULL:
        start = time.perf_counter()
        results.append(run_case(case, device, args.check_steps))
        r = results[-1]
        print(
            f"{case.method} {case.backbone} {case.size}px {case.budget}: {r['config']}, "
            f"measured {r['measured'] / 2**20:.0f} MiB ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    page = output_page(args)
    markdown = report(results, args, f"{FIGURE}.png" if page else None)
    print(markdown)
    if page is not None:
        page.parent.mkdir(parents=True, exist_ok=True)
        save_figure(plot(results), FIGURE, page)
        write_section(SECTION, markdown, page)
    over = any(r["measured"] > r["budget"] for r in results)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
