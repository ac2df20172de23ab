"""The command line and the README's commands."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from images import tiny_ultramnist_args
from patchgd.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme)
    assert len(commands) >= 2
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci_lines, "README's test command and .ci/run differ"
    assert commands[0].endswith("patchgd demo")


def test_demo_runs_end_to_end_prints_the_table_and_writes_its_outputs(capsys, tmp_path):
    args = [
        "demo",
        "--backbone",
        "test_resnet",
        "--canvas-size",
        "64",
        "--object-size",
        "8",
        "--patch-size",
        "32",
        "--per-class-train",
        "2",
        "--per-class-val",
        "1",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--latent-dim",
        "8",
        "--out",
        str(tmp_path / "demo"),
    ]
    assert main([*args, "--memory-budget", "12MiB"]) == 0
    out = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(out) if line.startswith("method"))
    assert out[header].split()[-5:] == ["peak", "MiB", "budget", "MiB", "s/epoch"]
    rows = out[header + 1 : header + 5]
    assert [r[:16].strip() for r in rows] == [
        "PatchGD",
        "GD",
        "GD, checkpointed",
        "GD, downscaled",
    ]
    assert out[header + 5] == "chance accuracy: 0.250"

    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["chance"] == 0.25 and summary["budget_mib"] == 12.0
    methods = {m["method"]: m for m in summary["methods"]}
    assert methods["PatchGD"]["fits"]
    for row in summary["methods"]:
        if row["fits"]:  # each method trained within the budget it was planned for, as measured
            assert 0 < row["peak_mib"] <= 12.0, row["method"]
            assert len(row["val_curve"]) == 2 and row["val_acc"] == row["val_curve"][-1]
            assert {"batch", "input_px", "s_per_epoch"} <= row.keys()
        else:
            assert "too small" in row["note"]
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 0


def test_data_ultramnist_writes_pngs_and_labels(tmp_path, capsys):
    out = tmp_path / "um"
    assert main(tiny_ultramnist_args(out, per_class=2)) == 0
    with open(out / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 40
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert all((out / r["image_id"]).is_file() for r in rows)


def test_bad_option_gives_one_line_error(tmp_path, capsys):
    assert main(["demo", "--patch-size", "1024", "--canvas-size", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "patch_size=1024 is larger than the image" in err[0]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("patchgd ")


def test_data_prepare_and_stats_on_a_generated_set(tmp_path, capsys):
    import json

    import numpy as np
    from PIL import Image

    um = tmp_path / "um"
    main(tiny_ultramnist_args(str(um)))
    capsys.readouterr()
    assert (
        main(
            [
                "data",
                "stats",
                "--csv",
                str(um / "labels.csv"),
                "--size",
                "64",
                "--split",
                "train",
                "--keep-gray",
                "--quiet",
            ]
        )
        == 0
    )
    stats = json.loads(capsys.readouterr().out)
    with open(um / "labels.csv", newline="") as fh:
        train = [r["image_id"] for r in csv.DictReader(fh) if r["split"] == "train"]
    pixels = np.concatenate([np.asarray(Image.open(um / i)).ravel() / 255 for i in train])
    assert stats["mean"] == pytest.approx([pixels.mean()], abs=1e-6)
    assert stats["std"] == pytest.approx([pixels.std()], abs=1e-6)

    out = tmp_path / "prepared"
    assert (
        main(
            [
                "data",
                "prepare",
                "--csv",
                str(um / "labels.csv"),
                "--size",
                "32",
                "--out",
                str(out),
                "--keep-gray",
                "--quiet",
            ]
        )
        == 0
    )
    with open(out / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 30
    assert all(Image.open(out / r["image_id"]).size == (32, 32) for r in rows)


def test_data_commands_report_a_missing_csv_in_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.csv"
    assert main(["data", "stats", "--csv", str(missing), "--size", "64", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0]
