"""Faults: a diverging run stops in one line and never writes a non-finite model; a bad file
costs only itself; a bad checkpoint path is one line; an interrupted write leaves nothing."""

from __future__ import annotations

import csv
import json
import signal

import pytest
import torch

from app_helpers import TINY, fit_in_subprocess, run_dir, trainer_config
from images import tiny_ultramnist_args
from patchgd import PatchGDClassifier
from patchgd.app.task import PatchGDTask, nonfinite_as_wrong
from patchgd.cli import main
from patchgd.errors import DivergedError

ONE_EPOCH = ["fit", "--config", str(TINY), "--trainer.max_epochs", "1"]
ONE_EPOCH += ["--model.warmup_epochs", "0.4"]


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("patchgd")]


def test_a_diverging_learning_rate_stops_the_run_in_one_line_naming_the_step(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(TINY), "--trainer.max_epochs", "2"]
    assert main([*args, "--model.warmup_epochs", "0", "--model.lr", "1e30"]) == 2
    err = _error_lines(capsys)
    assert len(err) == 1, err
    assert "training diverged: non-finite gradients at epoch 0, batch" in err[0]
    assert "lower model.lr (now 1e+30)" in err[0]
    for path in tmp_path.rglob("*.ckpt"):  # whatever was written before is finite
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(v.isfinite().all() for v in state.values() if v.is_floating_point()), path


def _task() -> PatchGDTask:
    classifier = PatchGDClassifier(
        "test_resnet", 3, 64, 32, in_chans=1, latent_dim=8, fill_chunk=4, seed=0
    )
    return PatchGDTask(classifier)


def test_a_checkpoint_with_non_finite_values_is_refused_naming_the_tensor():
    task = _task()
    state = task.state_dict()
    name = next(k for k in state if k.endswith("running_var"))
    state[name] = torch.full_like(state[name], float("inf"))
    with pytest.raises(DivergedError, match=f"{name} holds non-finite values"):
        task.on_save_checkpoint({"state_dict": state})
    task.on_save_checkpoint({"state_dict": task.state_dict()})  # a finite one is written


def test_a_finite_step_passes_and_a_nan_gradient_is_refused():
    task = _task()
    for p in task.classifier.parameters():
        p.grad = torch.ones_like(p)
    task._refuse_nonfinite_gradients(batch_idx=3)
    next(task.classifier.parameters()).grad[0] = float("nan")
    with pytest.raises(DivergedError, match="non-finite gradients at epoch 0, batch 3"):
        task._refuse_nonfinite_gradients(batch_idx=3)


def test_non_finite_logits_score_as_wrong_never_as_class_0():
    logits = torch.tensor([[float("nan"), 0.0, 0.0], [0.0, float("inf"), 0.0], [3.0, 1.0, 0.0]])
    targets = torch.tensor([0, 1, 0])
    scored = nonfinite_as_wrong(logits, targets)
    assert scored.argmax(dim=1).tolist() == [1, 2, 0]  # the first two wrong, the third kept
    assert torch.equal(scored[2], logits[2])
    assert torch.equal(nonfinite_as_wrong(logits[2:], targets[2:]), logits[2:])  # untouched


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("batch_size", [1, 2])
def test_predict_with_a_truncated_image_predicts_the_others_and_lists_it(
    batch_size, tmp_path, monkeypatch
):
    """Decoding fails only when the batch is read, inside a DataLoader worker; with batch 1 the
    bad image's batch holds no readable image at all."""
    monkeypatch.chdir(tmp_path)
    assert main(ONE_EPOCH) == 0
    assert main(tiny_ultramnist_args("imgs")) == 0
    good = [f"imgs/val/{i:06d}.png" for i in range(5)]
    whole = (tmp_path / good[0]).read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])  # the header still reads
    inputs = [*good[:2], "truncated.png", *good[2:]]
    run = run_dir(tmp_path)
    args = ["predict", "--config", str(run / "config.yaml")]
    args += ["--ckpt_path", str(run / "checkpoints" / "last.ckpt")]
    args += ["--data", "patchgd.app.datamodules.PredictImagesDataModule"]
    args += ["--data.inputs", f"[{', '.join(inputs)}]", "--data.target_size", "64"]
    args += ["--data.keep_gray", "true", "--data.num_workers", "2"]
    assert main([*args, "--data.batch_size", str(batch_size)]) == 0
    out = run_dir(tmp_path, 1)
    assert [row["image"] for row in _rows(out / "predictions.csv")] == good
    skipped = _rows(out / "skipped.csv")
    assert [row["image"] for row in skipped] == ["truncated.png"]
    assert "truncated.png" in skipped[0]["reason"]


@pytest.mark.parametrize("command", ["fit", "predict"])
def test_a_bad_checkpoint_path_is_one_line_naming_it(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(ONE_EPOCH) == 0
    run = run_dir(tmp_path)
    whole = (run / "checkpoints" / "last.ckpt").read_bytes()
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "truncated.ckpt").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "folder.ckpt").mkdir()
    capsys.readouterr()
    for bad in ("empty.ckpt", "truncated.ckpt", "folder.ckpt", "missing.ckpt"):
        args = [command, "--config", str(run / "config.yaml"), "--ckpt_path", bad]
        assert main(args) == 2, bad
        err = _error_lines(capsys)
        assert len(err) == 1, err
        assert f"--ckpt_path {bad}: not a readable checkpoint (" in err[0]


def test_a_kill_during_a_checkpoint_write_leaves_the_old_file_and_resume_removes_the_temp(
    tmp_path,
):
    kill = trainer_config(tmp_path, "plugins", "app_helpers.KillDuringCheckpointWrite", epoch=1)
    died = fit_in_subprocess(tmp_path, "--config", str(kill))
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    folder = run_dir(tmp_path) / "checkpoints"
    assert len(list(folder.glob(".*.ckpt.*.tmp"))) == 1  # half a checkpoint, left by the kill
    last = folder / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0  # the old file, whole
    resumed = fit_in_subprocess(tmp_path, "--ckpt_path", str(last))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not list(folder.glob(".*.tmp"))
    assert torch.load(last, weights_only=True)["epoch"] == 2  # resumed in the same folder
    assert not run_dir(tmp_path, 1).exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data.init_args.batch_size", "-1"], "batch_size must be >= 1"),
        (
            ["--model.classifier.init_args.in_chans", "3"],
            "the data gives 1-channel images but model.classifier was built for in_chans=3",
        ),
        (
            ["--data.init_args.channels", "3"],
            "the data gives 3-channel images but model.classifier was built for in_chans=1",
        ),
        (["--model.weight_decay", "-0.1"], "model.weight_decay must be 0 or more"),
        (["--model.encoder_lr", "-0.001"], "model.encoder_lr must be 0 or more"),
        (["--model.classifier.init_args.latent_dim", "0"], "latent_dim must be at least 1"),
        (
            ["--model.classifier", "patchgd.GDExtendedClassifier"]
            + ["--model.classifier.init_args.latent_dim", "0"],
            "latent_dim must be at least 1",
        ),
        (
            ["--model.classifier.init_args.loop", "{sampling_fraction: 1.5}"],
            "sampling_fraction must be in (0, 1], got 1.5",
        ),
        (["--trainer.max_epochs", "-1"], "set trainer.max_epochs (or max_steps) to 1 or more"),
        (["--trainer.limit_train_batches", "0"], "keep trainer.limit_train_batches above 0"),
        (["--data.init_args.std", "[0]"], "data.init_args.std must be above 0"),
        (
            ["--data.init_args.mean", "[0.5, 0.5, 0.5]"],
            "data.init_args.mean has 3 values but the model takes 1-channel images",
        ),
    ],
)
def test_options_refused_while_the_run_is_built_are_one_line_and_mark_the_run_failed(
    args, message, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(TINY), *args]) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and message in err[0], err
    assert not list(tmp_path.rglob("*.ckpt"))
    for folder in (tmp_path / "runs" / "lightning_logs").glob("version_*"):
        status = json.loads((folder / "summary.json").read_text())["status"]
        assert status["state"] == "failed" and message in status["error"]


def test_a_checkpoint_that_lightning_did_not_write_or_a_binary_config_is_one_line(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    torch.save({"a": 1}, tmp_path / "dict.ckpt")
    assert main(["validate", "--config", str(TINY), "--ckpt_path", "dict.ckpt"]) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and "--ckpt_path dict.ckpt: not a Lightning checkpoint" in err[0], err
    assert main(["fit", "--config", str(TINY), "--config", "dict.ckpt"]) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and "--config dict.ckpt: not a text (YAML) file" in err[0], err


def test_an_output_path_the_file_system_refuses_is_one_line_naming_it(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("")
    args = ["data", "ultramnist", "--out", "a_file", "--size", "32", "--per-class", "1"]
    assert main([*args, "--quiet"]) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and "a_file" in err[0], err
    assert (tmp_path / "a_file").read_text() == ""  # left as it was


def test_evaluating_without_a_checkpoint_warns_that_the_weights_are_untrained(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="validate without --ckpt_path: the model has its"):
        assert main(["validate", "--config", str(TINY)]) == 0


def test_sigterm_marks_the_run_interrupted_and_exits_non_zero(tmp_path):
    term = trainer_config(tmp_path, "callbacks", "app_helpers.TermAt", epoch=1, batch=1)
    stopped = fit_in_subprocess(tmp_path, "--config", str(term))
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert "patchgd: error: stopped by SIGTERM" in stopped.stderr
    status = json.loads((run_dir(tmp_path) / "summary.json").read_text())["status"]
    assert status["state"] == "interrupted" and status["epoch"] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "--epochs must be at least 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--lr", "-0.001"], "--lr must be above 0, got -0.001"),
    ],
)
def test_demo_options_out_of_range_are_one_line_before_any_work(args, message, tmp_path, capsys):
    assert main(["demo", *args, "--out", str(tmp_path / "demo")]) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "demo").exists()


def test_predict_inputs_that_are_not_images_are_named_not_dropped_silently(tmp_path, caplog):
    import logging

    from PIL import Image

    from patchgd.app.datamodules import expand_inputs

    folder = tmp_path / "slides"
    folder.mkdir()
    Image.new("L", (8, 8)).save(folder / "good.png")
    (folder / "dir.png").mkdir()
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (tmp_path / "empty").mkdir()
    with caplog.at_level(logging.WARNING, logger="patchgd.data"):
        found = expand_inputs([str(folder), str(tmp_path / "empty")])
    assert found == [str(folder / "good.png")]
    warned = caplog.text
    for name in ("dir.png", "loop.png", "empty"):
        assert name in warned, name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", "--config", "empty.yaml"], "--config empty.yaml: the file is empty"),
        (
            ["plan", "--memory-budget", "1GB", "--backbone", "test_resnet", "--patch-size", "32"]
            + ["--image-size", "-64"],
            "image_size must be at least 1 px a side, got -64×-64",
        ),
        (
            ["data", "ultramnist", "--out", "um", "--size", "32", "--mnist-idx", "nowhere"],
            "nowhere: no such file or folder",
        ),
    ],
)
def test_command_line_inputs_that_cannot_work_are_one_line_naming_them(
    args, message, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.yaml").write_text("\n")
    assert main(args) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and message in err[0], err


def test_runs_go_under_the_default_root_dir_the_user_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*ONE_EPOCH, "--trainer.default_root_dir", "elsewhere"]) == 0
    run = tmp_path / "elsewhere" / "lightning_logs" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    assert json.loads((run / "summary.json").read_text())["fit"]["epochs"] == 1
    assert (tmp_path / "elsewhere" / "tensorboard").is_dir()
    assert not (tmp_path / "runs").exists()
    # The run's config.yaml names its folder for the loggers; a root given now still wins.
    args = ["validate", "--config", str(run / "config.yaml")]
    args += ["--ckpt_path", str(run / "checkpoints" / "last.ckpt")]
    assert main([*args, "--trainer.default_root_dir", "again"]) == 0
    assert (tmp_path / "again" / "lightning_logs" / "version_0" / "summary.json").is_file()
    assert not (tmp_path / "elsewhere" / "lightning_logs" / "version_1").exists()


def test_a_truncated_image_met_in_training_with_workers_is_one_line_naming_it(
    tmp_path, monkeypatch, capsys
):
    """PyTorch re-raises a worker's error with the worker's whole traceback as its message;
    the user still gets the one line of the original error."""
    monkeypatch.chdir(tmp_path)
    assert main(tiny_ultramnist_args("imgs", per_class=2)) == 0
    bad = tmp_path / "imgs" / "train" / "000003.png"
    whole = bad.read_bytes()
    bad.write_bytes(whole[: len(whole) // 2])
    args = [*ONE_EPOCH, "--data", "patchgd.app.datamodules.ImageFolderDataModule"]
    args += ["--data.csv", "imgs/labels.csv", "--data.target_size", "64"]
    args += ["--data.fill", "[0, 0, 0]", "--data.num_workers", "2", "--data.batch_size", "2"]
    capsys.readouterr()
    assert main([*args, "--model.classifier.init_args.in_chans", "3"]) == 2
    err = _error_lines(capsys)
    assert len(err) == 1, err
    assert f"cannot decode {bad}" in err[0] and "Traceback" not in err[0]


def test_the_fault_catalogue_lists_real_tests():
    import ast
    import re

    root = TINY.parents[2]
    catalogue = (root / "docs" / "faults.md").read_text()
    named = set(re.findall(r"`(tests/\w+\.py)::(\w+)`", catalogue))
    defined = {}
    for path in {p for p, _ in named} | {"tests/test_faults.py"}:
        tree = ast.parse((root / path).read_text())
        defined[path] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    missing = sorted(f"{p}::{t}" for p, t in named if t not in defined[p])
    assert not missing, f"docs/faults.md names tests that do not exist: {missing}"
    tests = {t for t in defined["tests/test_faults.py"] if t.startswith("test_")}
    tests.discard("test_the_fault_catalogue_lists_real_tests")
    unlisted = sorted(tests - {t for p, t in named if p == "tests/test_faults.py"})
    assert not unlisted, f"tests/test_faults.py tests missing from docs/faults.md: {unlisted}"


def test_an_interrupted_run_is_marked_interrupted_in_its_summary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    interrupt = trainer_config(tmp_path, "callbacks", "app_helpers.InterruptAt", epoch=1, batch=2)
    args = ["fit", "--config", str(TINY), "--config", str(interrupt)]
    with pytest.raises(SystemExit):  # Lightning shuts down gracefully, then exits 1
        main([*args, "--trainer.max_epochs", "2", "--model.warmup_epochs", "0.4"])
    status = json.loads((run_dir(tmp_path) / "summary.json").read_text())["status"]
    assert status["state"] == "interrupted" and status["epoch"] == 1
    last = run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0
