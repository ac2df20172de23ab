"""Every benchmark script runs in its quick mode and writes its section and plot to a page."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "memory_vs_size.py": ("memory", "memory_vs_size.png"),
    "inference_speed.py": ("inference", "inference_speed.png"),
    "train_speed.py": ("training", "train_speed.png"),
    "planner_budget.py": ("planner", "planner.png"),
    "finedetail.py": ("finedetail", "finedetail_residue.png"),
    "patch_size.py": ("patchsize", "finedetail_patch_size.png"),
    "budget_study.py": ("budget-64", "budget_study_64.png"),  # --quick: canvases 64 and 96
    "step_speed.py": ("step-speed", "step_speed.png"),
    "fill_chunk.py": ("fill-chunk", "fill_chunk.png"),
    "tissue_fill.py": ("tissue-fill", "tissue_fill.png"),
    "gigapixel.py": ("gigapixel", "gigapixel_heatmap.png"),  # --quick: 2048 and 2500 px
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_quick_mode_writes_its_section_and_plot(script, tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nkept\n")
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--page", str(page)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    section, figure = SCRIPTS[script]
    # Non-zero: a run failed, or (planner_budget) a plan's measured peak exceeded its budget.
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    text = page.read_text()
    assert "kept" in text  # the rest of the page is left alone
    begin, end = f"<!-- bench:{section} -->", f"<!-- /bench:{section} -->"
    body = text.split(begin)[1].split(end)[0]
    assert "| --- |" in body and "python benchmarks/" in body and "torch " in body
    assert (tmp_path / figure).stat().st_size > 0


def test_reproduction_quick_mode_runs_every_step_and_writes_the_page(tmp_path):
    """The study's smoke mode: every run trains and is tested, and the page gets every table."""
    page = tmp_path / "reproduction.md"
    page.write_text("# Reproduction\n\nkept\n")
    work = tmp_path / "work"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "reproduce.py"), "--quick", "--investigate"]
        + ["--page", str(page), "--work", str(work)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    text = page.read_text()
    assert "kept" in text
    body = text.split("<!-- bench:reproduction -->")[1].split("<!-- /bench:reproduction -->")[0]
    titles = ("Tables 1 and 2", "recipe", "Head", "BatchNorm", "freeze_bn", "Schedule")
    assert "frozen, encoder learning rate" in body
    for title in titles + ("Table 4", "Table 5", "latency"):
        assert title in body
    assert (tmp_path / "reproduction.png").stat().st_size > 0
    results = sorted(work.glob("*/result.json"))
    assert len(results) == 31
    for path in results:
        result = json.loads(path.read_text())
        # Under its budget, measured; tested on a checkpoint chosen by validation accuracy.
        assert result["measured_peak_bytes"] <= result["budget_bytes"]
        assert "best-epoch" in result["best_checkpoint"]
        assert 0.0 <= result["test_acc"] <= 1.0
    # The recipe starts PatchGD from the downscaled-GD run's backbone, not from the digits.
    recipe = json.loads((work / "recipe-patchgd-tight-s0" / "result.json").read_text())
    assert recipe["run"]["init"] == "recipe"
    weights = torch.load(work / "recipe-patchgd-tight-s0.pth")
    source = json.loads((work / "main-gd_downscaled-tight-s0" / "result.json").read_text())
    trained = torch.load(source["best_checkpoint"], weights_only=False)["state_dict"]
    assert weights and all(
        torch.equal(value, trained[f"classifier.backbone.{key}"]) for key, value in weights.items()
    )
    # A second invocation reuses every cached run whose command and config are unchanged, and
    # reruns one whose recorded fingerprint no longer matches.
    stamps = {path: path.stat().st_mtime_ns for path in results}
    stale = work / "table5-eps2" / "result.json"
    outdated = json.loads(stale.read_text()) | {"fingerprint": "outdated"}
    stale.write_text(json.dumps(outdated))
    stamps[stale] = stale.stat().st_mtime_ns
    again = subprocess.run(run.args, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    changed = [path for path in results if path.stat().st_mtime_ns != stamps[path]]
    assert changed == [stale]
    assert json.loads(stale.read_text())["fingerprint"] != "outdated"
    # Without --investigate the study reuses its own runs and leaves the investigations out.
    study_page = tmp_path / "study.md"
    args = [a if a != str(page) else str(study_page) for a in run.args if a != "--investigate"]
    study = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)
    assert study.returncode == 0, study.stdout[-2000:] + study.stderr[-2000:]
    assert [path for path in results if path.stat().st_mtime_ns != stamps[path]] == [stale]
    text = study_page.read_text()
    assert "Table 4" in text and "freeze_bn" not in text and "investigations" not in text
    # --only runs the chosen runs (here cached), prints them, and writes no page.
    only = [a for a in args if a not in ("--page", str(study_page))]
    only += ["--only", "frozenlr-patchgd", "--page", str(tmp_path / "only.md")]
    chosen = subprocess.run(only, capture_output=True, text=True, timeout=600, check=False)
    assert chosen.returncode == 0, chosen.stdout[-2000:] + chosen.stderr[-2000:]
    assert "frozenlr-patchgd-tight-s0" in chosen.stderr and "main-gd-tight" not in chosen.stderr
    assert not (tmp_path / "only.md").exists()
