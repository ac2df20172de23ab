"""The demo's training loop: the learning-rate schedule every method follows, and PatchGD's ε."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from patchgd.demo import DemoConfig, decay_schedule, patchgd_model, train_epoch


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
