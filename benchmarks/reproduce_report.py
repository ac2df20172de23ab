"""The reproduction study's report: its section of ``docs/reproduction.md`` (tables, targets,
plot) from the runs' results. ``reproduce.py`` runs the study and calls :func:`report`; the
protocol's settings come from ``_study`` and the configs, never from numbers written here."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from _report import markdown_table, run_lines, save_figure, write_section
from _study import (
    ARGS,
    FROZEN_ENCODER_LR,
    INVESTIGATIONS,
    LABELS,
    METHODS,
    Protocol,
    backbone_name,
    patchgd_loop,
    patchgd_setting,
)

from patchgd.planner import parse_size


def _stats(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pct(values: Sequence[float]) -> str:
    mean, sd = _stats([100 * v for v in values])
    return f"{mean:.1f} ± {sd:.1f} (n={len(values)})" if len(values) > 1 else f"{mean:.1f}"


def _mib(nbytes: float | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.0f}"


def _group(results: dict[str, dict], group: str, method: str, budget: str) -> list[dict]:
    return [
        r
        for r in results.values()
        if r["run"]["group"] == group
        and r["run"]["method"] == method
        and r["run"]["budget"] == budget
    ]


def _main_seed0(results: dict[str, dict], method: str, budget: str) -> list[dict]:
    """The main study's seed-0 run of ``method`` at ``budget``: the one-seed tables' baseline."""
    return [r for r in _group(results, "main", method, budget) if r["run"]["seed"] == 0]


def _cells(rs: Sequence[dict]) -> list[str]:
    """Batch, input size, test and best-validation accuracy of a set of runs (seeds)."""
    return [
        ", ".join(sorted({str(r["batch"]) for r in rs})),
        ", ".join(sorted({str(r["input_size"]) for r in rs})),
        _pct([r["test_acc"] for r in rs]),
        _pct([r["val_acc"] for r in rs]),
    ]


def _main_rows(results: dict[str, dict], p: Protocol) -> list[list[object]]:
    rows = []
    for budget in (p.tight, p.loose):
        for method in METHODS:
            rs = _group(results, "main", method, budget)
            if not rs:
                continue
            rows.append(
                [
                    LABELS[method],
                    budget,
                    *_cells(rs),
                    f"{statistics.fmean(r['test_qwk'] for r in rs):.3f}",
                    _mib(max((r["measured_peak_bytes"] or 0) for r in rs) or None),
                    f"{statistics.fmean(r['seconds_per_epoch'] for r in rs):.0f}",
                ]
            )
    return rows


def _targets(
    results: dict[str, dict], p: Protocol, group: str = "main", stability: bool = True
) -> list[str]:
    """The issue's targets met or missed, on the runs of ``group`` (``stability``: also the
    loss from the loose budget to the tight one)."""

    def accs(method: str, budget: str) -> list[float]:
        return [100 * r["test_acc"] for r in _group(results, group, method, budget)]

    lines = []
    patch = accs("patchgd", p.tight)
    gds = {m: accs(m, p.tight) for m in ("gd", "gd_downscaled") if accs(m, p.tight)}
    if patch and gds:
        best = max(gds, key=lambda m: statistics.fmean(gds[m]))
        (pm, ps), (gm, gs) = _stats(patch), _stats(gds[best])
        margin = pm - gm
        met = margin >= 7 and margin > ps + gs
        lines.append(
            f"- PatchGD − best GD ({LABELS[best]}) at {p.tight}: **{margin:+.1f} points** "
            f"(PatchGD {pm:.1f} ± {ps:.1f}, {LABELS[best]} {gm:.1f} ± {gs:.1f}); target ≥ +7 "
            f"and beyond the spread ({ps + gs:.1f}): **{'met' if met else 'missed'}**."
        )
    loose = accs("patchgd", p.loose) if stability else []
    if patch and loose:
        drop = statistics.fmean(loose) - statistics.fmean(patch)
        lines.append(
            f"- PatchGD from {p.loose} to {p.tight}: **{drop:+.1f} points lost** "
            f"(target ≤ 3): **{'met' if drop <= 3 else 'missed'}**."
        )
    return lines


def _plot(results: dict[str, dict], p: Protocol) -> object:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    budgets = [p.tight, p.loose]
    for method in METHODS:
        xs, ys, es = [], [], []
        for budget in budgets:
            rs = _group(results, "main", method, budget)
            if rs:
                mean, sd = _stats([100 * r["test_acc"] for r in rs])
                xs.append(parse_size(budget) / 2**20)
                ys.append(mean)
                es.append(sd)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=4, label=LABELS[method])
    ax.axhline(10, color="grey", linestyle=":", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks([parse_size(b) / 2**20 for b in budgets], budgets)
    ax.minorticks_off()
    ax.set_xlabel("memory budget (MiB, emulated on the CPU)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("UltraMNIST 512 px, CPU scale: accuracy against budget")
    ax.legend(fontsize=8)
    return fig


def _time_line(results: dict[str, dict], extra: dict) -> str:
    study = sum(r["run"]["group"] not in INVESTIGATIONS for r in results.values())
    line = f"- study time: {extra['study_seconds'] / 60:.0f} min, {study} training runs"
    if extra["investigation_seconds"]:
        minutes = extra["investigation_seconds"] / 60
        line += f"; investigations: {minutes:.0f} min more, {len(results) - study} runs"
    return line


def report(results: dict[str, dict], p: Protocol, extra: dict, page: Path, argv: Sequence[str]):
    """Write the generated section of the page (tables, targets, plot)."""
    train, val, test = p.per_class
    groups = {r["run"]["group"] for r in results.values()}
    parts = [
        run_lines("cpu", argv),
        _time_line(results, extra),
        "",
        "### Protocol (as run)",
        markdown_table(
            ["setting", "value"],
            [
                ["backbone", f"`{backbone_name()}`, 1 channel"],
                ["images", f"{p.canvas} px; {10 * train} train, {10 * val} val, {10 * test} test"],
                ["epochs", p.epochs],
                ["largest batch", p.max_batch],
                ["budgets", f"tight {p.tight}, loose {p.loose}"],
                ["seeds (main)", ", ".join(map(str, p.seeds))],
                [
                    "PatchGD",
                    patchgd_setting(p),
                ],
                [
                    "digit pretraining",
                    f"{p.pretrain_steps} steps of {p.pretrain_batch}; "
                    f"val digit accuracy {100 * extra['pretrain']['val_digit_accuracy']:.1f} %",
                ],
            ],
        ),
        "",
        "### Targets",
        *_targets(results, p),
        "",
        "### Tables 1 and 2: methods under the same budget (test accuracy %, mean ± sd)",
        markdown_table(
            [
                "method",
                "budget",
                "batch",
                "input px",
                "test acc %",
                "best val acc %",
                "test QWK",
                "peak MiB",
                "s/epoch",
            ],
            _main_rows(results, p),
        ),
        "",
        "![accuracy against budget](reproduction.png)",
        "",
    ]
    rows = []
    for label, group, method in (
        ("PatchGD from the digit-pretrained backbone", "main", "patchgd"),
        ("PatchGD from the downscaled-GD backbone (the recipe)", "recipe", "patchgd"),
    ):
        rs = _group(results, group, method, p.tight)
        if rs:
            rows.append([label, _pct([r["test_acc"] for r in rs])])
    parts += [
        "### The low-memory recipe at the tight budget",
        markdown_table(["start", "test acc %"], rows),
        "",
    ]
    rows = []
    for method in ("gd_extended", "patchgd"):
        paper = _group(results, "head", method, p.tight)
        linear = _main_seed0(results, method, p.tight)
        if paper:
            rows.append(
                [
                    LABELS[method],
                    _pct([r["test_acc"] for r in paper]),
                    _pct([r["val_acc"] for r in paper]),
                    _pct([r["test_acc"] for r in linear]) if linear else "n/a",
                ]
            )
    if "head" in groups:
        parts += [
            "### Head: the paper's 4-layer head against a linear head (tight budget, seed 0)",
            markdown_table(
                [
                    "method",
                    "paper's head, test acc %",
                    "its best val acc %",
                    "linear head, test acc %",
                ],
                rows,
            ),
            "",
        ]
    rows = []
    for budget in (p.tight, p.loose):
        for label, group in (
            ("running statistics (this protocol)", "main"),
            ("batch statistics of each fill chunk (`fill_norm: batch`)", "bn"),
        ):
            rs = _group(results, group, "patchgd", budget)
            if rs:
                rows.append(
                    [
                        budget,
                        label,
                        len(rs),
                        _pct([r["test_acc"] for r in rs]),
                        _pct([r["val_acc"] for r in rs]),
                    ]
                )
    if "bn" in groups:
        parts += [
            "### BatchNorm in the Z-fill: PatchGD",
            markdown_table(
                ["budget", "fill normalises with", "seeds", "test acc %", "best val acc %"], rows
            ),
            "",
        ]
    rows = []
    for method in ("gd", "gd_downscaled", "patchgd"):
        frozen_runs = _group(results, "frozen", method, p.tight)
        for label, rs in (
            ("trained (this protocol)", _group(results, "main", method, p.tight)),
            ("frozen", frozen_runs),
            (
                f"frozen, encoder learning rate {FROZEN_ENCODER_LR:g}",
                _group(results, "frozen_lr", method, p.tight),
            ),
        ):
            if rs and frozen_runs:
                rows.append([LABELS[method], label, *_cells(rs)])
    if "frozen" in groups:
        parts += [
            f"### The backbone's BatchNorm trained or frozen (`freeze_bn`), {p.tight}",
            markdown_table(
                [
                    "method",
                    "backbone BatchNorm",
                    "batch",
                    "input px",
                    "test acc %",
                    "best val acc %",
                ],
                rows,
            ),
            *_targets(results, p, group="frozen", stability=False),
            "",
        ]
    rows = []
    for method in ("gd", "patchgd"):
        main0 = _main_seed0(results, method, p.tight)
        for epochs, rs in (
            (p.epochs, main0),
            (2 * p.epochs, _group(results, "schedule", method, p.tight)),
        ):
            if rs:
                rows.append(
                    [
                        LABELS[method],
                        epochs,
                        _pct([r["test_acc"] for r in rs]),
                        _pct([r["val_acc"] for r in rs]),
                    ]
                )
    if "schedule" in groups:
        parts += [
            "### Schedule: twice the epochs (tight budget, seed 0)",
            markdown_table(["method", "epochs", "test acc %", "best val acc %"], rows),
            "",
        ]
    rows = []
    for method in METHODS:
        scratch = _group(results, "scratch", method, p.tight)
        pre = _main_seed0(results, method, p.tight)
        if scratch:
            rows.append(
                [
                    LABELS[method],
                    _pct([r["test_acc"] for r in scratch]),
                    _pct([r["test_acc"] for r in pre]) if pre else "n/a",
                ]
            )
    if "scratch" in groups:
        parts += [
            "### Initialisation: random against digit-pretrained (tight budget, seed 0)",
            markdown_table(["method", "random init, test acc %", "digit-pretrained"], rows),
            "",
        ]
    rows = []
    for r in sorted(
        (r for r in results.values() if r["run"]["group"] == "table4"),
        key=lambda r: (
            r["run"]["overrides"][f"{ARGS}.loop"]["sampling_fraction"],
            -r["run"]["overrides"][f"{ARGS}.loop"]["max_visit_fraction"],
        ),
    ):
        loop = r["run"]["overrides"][f"{ARGS}.loop"]
        rows.append(
            [
                f"{100 * loop['sampling_fraction']:.0f}",
                f"{100 * loop['max_visit_fraction']:.0f}",
                r["batch"],
                f"{100 * r['test_acc']:.1f}",
                f"{r['test_qwk']:.3f}",
                f"{r['seconds_per_epoch']:.0f}",
            ]
        )
    parts += [
        f"### Table 4: sampling (patch {p.ablation_patch}, {p.loose}, seed 0, "
        "batch statistics in the fill)",
        markdown_table(
            ["sampling %", "max visited %", "batch", "test acc %", "test QWK", "s/epoch"], rows
        ),
        "",
    ]
    rows = []
    base = _main_seed0(results, "patchgd", p.loose)
    for r in base + [r for r in results.values() if r["run"]["group"] == "table5"]:
        loop = patchgd_loop(p, loop=r["run"]["overrides"].get(f"{ARGS}.loop"))
        eps = loop.accumulation
        eps = f"{eps} (= ζ)" if eps == loop.inner_iterations else eps
        rows.append(
            [eps, r["batch"], f"{100 * r['test_acc']:.1f}", f"{r['seconds_per_epoch']:.0f}"]
        )
    parts += [
        f"### Table 5: gradient accumulation ε (patch {p.patch}, "
        f"ζ = {patchgd_loop(p).inner_iterations}, {p.loose}, seed 0)",
        markdown_table(["ε", "batch", "test acc %", "s/epoch"], rows),
        "",
        f"### Table 3's latency column: inference at {p.canvas} px, batch {p.latency_batch}",
        markdown_table(
            ["method", "params (M)", "images/s (median)", "throughput / GD's"],
            [
                [
                    r["method"],
                    f"{r['params_m']:.2f}",
                    f"{r['images_per_s']:.1f}",
                    f"{r['vs_gd']:.2f}×",
                ]
                for r in extra["latency"]
            ],
        ),
    ]
    write_section("reproduction", "\n".join(parts), page)
    save_figure(_plot(results, p), "reproduction", page)
