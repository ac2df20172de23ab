"""Faults in training: a diverging run stops in one line and never writes a non-finite model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from patchgd import PatchGDClassifier
from patchgd.app.task import PatchGDTask, nonfinite_as_wrong
from patchgd.cli import main
from patchgd.errors import DivergedError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "ultramnist" / "patchgd_tiny.yaml"


def test_a_diverging_learning_rate_stops_the_run_in_one_line_naming_the_step(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(TINY), "--trainer.max_epochs", "2"]
    assert main([*args, "--model.warmup_epochs", "0", "--model.lr", "1e30"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("patchgd")]
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
