"""The demo's training loop: the learning-rate schedule every method follows, and PatchGD's ε."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from patchgd.demo import DemoConfig, decay_schedule, patchgd_model, run_demo, train_epoch


class _Recorder:
    """A classifier stand-in that records the learning rate each training step sees."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def train(self) -> None:
        pass

    def training_step(self, x, y, optimizer, keys=None):
        self.lrs.append(optimizer.param_groups[0]["lr"])
        return SimpleNamespace(loss=1.0)


def test_learning_rate_falls_linearly_to_zero_once_per_batch_across_epochs():
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    loader = DataLoader(TensorDataset(torch.zeros(6, 1), torch.zeros(6)), batch_size=2)
    epochs, batches = 2, 3
    schedule = decay_schedule(optimizer, epochs * batches)
    model = _Recorder()
    for _ in range(epochs):
        train_epoch(model, optimizer, loader, schedule)
    # Batch i of the run trains at 0.5 · (1 - i / 6): the peak first, a sixth of it last.
    assert model.lrs == pytest.approx([0.5 * (1 - i / 6) for i in range(6)])
    assert optimizer.param_groups[0]["lr"] == 0.0  # nothing would train after the run


def test_without_a_schedule_the_learning_rate_stays():
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    loader = DataLoader(TensorDataset(torch.zeros(4, 1), torch.zeros(4)), batch_size=2)
    model = _Recorder()
    train_epoch(model, optimizer, loader)
    assert model.lrs == [0.5, 0.5]


@pytest.mark.parametrize(("accumulation", "steps"), [(1, 4), (None, 1)])
def test_patchgd_takes_one_optimizer_step_per_accumulation_group(accumulation, steps):
    cfg = DemoConfig(
        backbone="test_resnet", canvas_size=128, patch_size=32, latent_dim=8,
        accumulation=accumulation,
    )  # fmt: skip
    loop = patchgd_model(cfg).loop
    # 16 patches, k = 2 (1/8), half of them visited: ζ = 4 inner iterations.
    assert (loop.inner_iterations, loop.optimizer_steps) == (4, steps)


@pytest.mark.parametrize("fill_norm", ["running", "batch"])
def test_validating_only_after_the_last_epoch_trains_the_same_models(fill_norm, tmp_path):
    # The budget study skips the demo's per-epoch validation; every model it scores must be the
    # one the demo would have trained. PatchGD with running statistics reads what recalibration
    # writes, so this holds only because the skipped epochs still recalibrate it.
    cfg = DemoConfig(
        backbone="test_resnet", canvas_size=64, patch_size=32, latent_dim=8, per_class_train=2,
        per_class_val=1, calibration_images=4, epochs=3, batch_size=2, memory_budget="12MiB",
        objects=1, textured=1, fill_norm=fill_norm, out=str(tmp_path),
    )  # fmt: skip
    every, every_models, _ = run_demo(cfg, log=False)
    last, last_models, _ = run_demo(replace(cfg, val_each_epoch=False), log=False)
    assert [r.method for r in every] == [r.method for r in last]
    fitted = [(a, b) for a, b in zip(every, last, strict=True) if a.fits]
    assert {a.method for a, _ in fitted} >= {"PatchGD", "GD, downscaled"}
    for a, b in fitted:
        assert (len(a.val_curve), len(b.val_curve), b.epochs) == (3, 1, 3)
        assert a.val_acc == b.val_acc and a.train_loss == b.train_loss, a.method
        mine, theirs = every_models[a.method].state_dict(), last_models[a.method].state_dict()
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=a.method)
