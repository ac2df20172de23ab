"""Every benchmark script runs in its quick mode and writes its section and plot to a page."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "memory_vs_size.py": ("memory", "memory_vs_size.png"),
    "inference_speed.py": ("inference", "inference_speed.png"),
    "train_speed.py": ("training", "train_speed.png"),
    "planner_budget.py": ("planner", "planner.png"),
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
