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
from typing import Any

import torch
from _report import Panel, add_common_options, draw, markdown_table, publish, run_lines

from patchgd import (
    DownscaledGDClassifier,
    GDClassifier,
    HeadConfig,
    InnerLoopConfig,
    PatchGDClassifier,
)
from patchgd.memory import live_training_bytes, measure
from patchgd.planner import parse_size, plan_classifier

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


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
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
        run_lines(args.device),
        "",
        f"Settings: batch limit {results[0]['case'].batch_limit}, {args.check_steps} full "
        "steps checked per plan.",
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
    return "\n".join(lines)


def plot(results: list[dict[str, Any]]) -> Any:
    title = "Planned configurations: measured peak against budget"
    panel = Panel(title, "budget (GiB)", "measured peak (GiB)", log2_x=False)
    for method, marker in {"PatchGD": "o", "GD": "s", "downscaled GD": "^"}.items():
        chosen = [r for r in results if r["case"].method == method]
        budgets = [r["budget"] / 2**30 for r in chosen]
        panel.lines.append((method, budgets, [r["measured"] / 2**30 for r in chosen], marker))
    top = max(r["budget"] for r in results) / 2**30 * 1.1
    panel.lines += [("budget", [0, top], [0, top], "k-")]
    panel.lines += [("70 % of budget", [0, top], [0, 0.7 * top], "k:")]
    panel.xlim = panel.ylim = (0, top)
    return draw([panel], 6.5, 4.5)


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
    caption = "measured peak against budget"
    publish(args, SECTION, report(results, args), lambda: plot(results), FIGURE, caption=caption)
    over = any(r["measured"] > r["budget"] for r in results)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
