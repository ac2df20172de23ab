"""The memory probe: exact on known allocations, monotone in input size, repeatable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchgd import GDClassifier, HeadConfig, InnerLoopConfig, PatchGDClassifier
from patchgd.memory import measure

MiB = 2**20


def test_counts_a_kept_allocation_exactly_and_a_temporary_one_at_its_peak():
    kept, report = measure(lambda: torch.empty(10 * MiB, dtype=torch.uint8))
    assert report.tensor_bytes == 10 * MiB and kept.numel() == 10 * MiB

    def temporary() -> float:
        big = torch.ones(4 * MiB // 4)  # 4 MiB of float32, freed before returning
        return float(big.sum())

    _, report = measure(temporary)
    assert 4 * MiB <= report.tensor_bytes < 4 * MiB + 4096


def test_views_and_in_place_results_of_older_tensors_allocate_nothing():
    x = torch.zeros(MiB)  # 4 MiB, live before the call
    weight = torch.randn(1024, 1024)

    def no_new_memory():
        views = (x.view(2, -1).t(), x[:10], x.unfold(0, 16, 16), x.add_(1), weight.t())
        return len(views)

    assert measure(no_new_memory)[1].tensor_bytes == 0
    # A linear layer allocates only its output, however its weight is viewed internally.
    inputs = torch.randn(1, 1024)
    _, report = measure(lambda: torch.nn.functional.linear(inputs, weight))
    assert report.tensor_bytes == 1024 * 4
    # A new tensor and its views count once; a contiguous copy of a view counts again.
    _, report = measure(lambda: torch.ones(MiB // 4).view(2, -1).t().contiguous())
    assert report.tensor_bytes == 2 * MiB


def test_an_adam_step_costs_its_gradients_and_state_not_the_weights_again():
    torch.manual_seed(0)
    model = torch.nn.Linear(512, 512)
    optimizer = torch.optim.Adam(model.parameters(), foreach=False)
    params = sum(p.numel() * 4 for p in model.parameters())

    def step():
        model(torch.randn(1, 512)).sum().backward()
        optimizer.step()

    _, report = measure(step)
    # Gradients, exp_avg and exp_avg_sq: 3× the parameters. Adam's denominator takes two
    # weight-sized temporaries (sqrt, then the division) at the peak: 5×. Counting the updated
    # weights (what addcdiv_ returns) again would make it 6×.
    assert 4.9 * params <= report.tensor_bytes < 5.1 * params


def _gd_step(size: int):
    torch.manual_seed(0)
    model = GDClassifier("test_resnet", 3, size).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    images, targets = torch.randn(2, 3, size, size), torch.tensor([0, 2])
    return lambda: model.training_step(images, targets, opt)


def test_a_larger_input_needs_more_and_the_same_step_needs_the_same():
    _, small = measure(_gd_step(64))
    _, large = measure(_gd_step(128))
    # 4× the pixels: activations grow ~4×, the 1.5 MB of parameter gradients does not
    assert large.tensor_bytes > 2 * small.tensor_bytes
    step = _gd_step(96)
    _, first = measure(step)
    _, second = measure(step)
    assert first.tensor_bytes == second.tensor_bytes > 0


def test_patchgd_needs_far_less_than_gd_on_the_same_image():
    torch.manual_seed(0)
    images, targets = torch.randn(2, 3, 256, 256), torch.tensor([0, 2])
    patchgd = PatchGDClassifier(
        "test_resnet",
        3,
        256,
        32,
        latent_dim=16,
        head=HeadConfig(width=16),
        fill_chunk=16,
        loop=InnerLoopConfig(patches_per_iteration=1),
    ).train()
    opt = torch.optim.SGD(patchgd.parameters(), lr=0.1)
    _, patch_report = measure(lambda: patchgd.training_step(images, targets, opt))
    _, gd_report = measure(_gd_step(256))
    assert patch_report.tensor_bytes < 0.25 * gd_report.tensor_bytes


def test_rss_peak_covers_memory_outside_torch():
    _, report = measure(lambda: np.ones(50 * MiB // 8).sum())
    if report.rss_bytes is None:
        pytest.skip("this kernel does not allow resetting the peak RSS")
    assert report.rss_bytes >= 50 * MiB
    assert "peak tensors" in str(report)


def test_the_memory_of_a_process_tree_counts_its_children():
    import os
    import subprocess
    import sys
    import time

    from patchgd.memory import process_tree_pss

    alone = process_tree_pss(os.getpid())
    if alone is None:
        pytest.skip("no /proc/<pid>/smaps_rollup here")
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; b = b\"x\" * (200 << 20); print(1, flush=True); "
         "time.sleep(30)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"1"
        time.sleep(0.1)
        with_child = process_tree_pss(os.getpid())
        assert with_child is not None and with_child - alone > 150 << 20  # its 200 MiB buffer
    finally:
        child.kill()
        child.wait()
