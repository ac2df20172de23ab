"""BatchNorm recalibration: exact statistics of what each layer saw, nothing else touched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from patchgd import GDClassifier, HeadConfig, PatchGDClassifier
from patchgd.batchnorm import recalibrating
from reference import reference_patch


def _inputs_of(layers: list[nn.Module], run) -> dict[nn.Module, Tensor]:
    """Every input each layer receives while ``run()`` executes, concatenated over calls."""
    seen: dict[nn.Module, list[Tensor]] = {layer: [] for layer in layers}
    handles = [
        layer.register_forward_pre_hook(lambda m, args: seen[m].append(args[0].detach().clone()))
        for layer in layers
    ]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {layer: torch.cat(xs) for layer, xs in seen.items()}


def _stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and unbiased variance, in float64: the slow obvious reference."""
    flat = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(dim=1), flat.var(dim=1, unbiased=True)


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(6, 4, 3, stride=2),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.LazyLinear(5),
        nn.BatchNorm1d(5),
    )


def test_running_statistics_become_the_exact_statistics_of_every_input_seen():
    torch.manual_seed(0)
    net = _net()
    net(torch.randn(4, 2, 8, 8))  # materialise the lazy layer; running stats now arbitrary
    bns = [m for m in net.modules() if isinstance(m, _BatchNorm)]
    # Batches of different sizes, shifted so that a mean of per-batch variances would be wrong.
    batches = [torch.randn(n, 2, 8, 8) * s + o for n, s, o in ((3, 1.0, 0.0), (5, 2.0, 3.0))]
    weights = copy.deepcopy(net.state_dict())
    net.train()
    with recalibrating(net) as layers:
        assert layers == bns
        for x in batches:
            net(x)
    # The reference replays the same passes: batch statistics, dropout off.
    reference = copy.deepcopy(net).eval()
    for bn in [m for m in reference.modules() if isinstance(m, _BatchNorm)]:
        bn.train()
        bn.track_running_stats = False
    seen = _inputs_of(list(reference), lambda: [reference(x) for x in batches])
    twins = [m for m in reference if isinstance(m, _BatchNorm)]
    for bn, twin in zip(bns, twins, strict=True):
        mean, var = _stats(seen[twin])
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
    # Only the running statistics changed; the modes are restored.
    assert net.training and all(m.training for m in net.modules())
    for name, value in net.state_dict().items():
        if "running" not in name:
            torch.testing.assert_close(value, weights[name], rtol=0, atol=0)
    assert all(p.grad is None for p in net.parameters())


def test_frozen_layers_and_layers_that_saw_nothing_keep_their_statistics():
    torch.manual_seed(0)
    net = _net()
    net(torch.randn(4, 2, 8, 8))
    frozen, unused = net[1], nn.BatchNorm2d(3)
    net.add_module("unused", unused)
    before = {m: (m.running_mean.clone(), m.running_var.clone()) for m in (frozen, unused)}
    net.train()
    frozen.eval()  # as freeze_bn leaves it
    with recalibrating(net) as layers:
        assert frozen not in layers
        net[:-1](torch.randn(3, 2, 8, 8))  # the last layer, BatchNorm1d, sees nothing
    assert not frozen.training
    for m, (mean, var) in before.items():
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)


def test_an_error_inside_leaves_the_statistics_and_modes_as_they_were():
    torch.manual_seed(0)
    net = _net()
    net(torch.randn(4, 2, 8, 8))
    before = copy.deepcopy(net.state_dict())
    net.train()
    with pytest.raises(RuntimeError), recalibrating(net):
        net(torch.randn(3, 2, 8, 8))
        raise RuntimeError("a bad batch")
    assert all(m.training for m in net.modules())
    assert all(m.track_running_stats for m in net.modules() if hasattr(m, "track_running_stats"))
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_gd_classifier_eval_mode_matches_its_training_normalisation_after_recalibration():
    """One batch through a model whose only BatchNorm follows the stem: after recalibration on
    that batch, eval mode normalises exactly as train mode did (up to n/(n-1))."""
    torch.manual_seed(0)
    model = GDClassifier("test_resnet", 3, 32, in_chans=1)
    images = torch.randn(6, 1, 32, 32) * 3 + 1
    model.recalibrate_batchnorm([images[:2], images[2:]])
    stem_bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    stem = _inputs_of([stem_bn], lambda: model.eval()(images))[stem_bn]
    mean, var = _stats(stem)
    torch.testing.assert_close(stem_bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stem_bn.running_var.double(), var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [3, 100])
def test_patchgd_encoder_statistics_cover_every_patch_and_the_head_sees_inference_z(chunk):
    torch.manual_seed(0)
    model = PatchGDClassifier(
        "test_resnet",
        3,
        (48, 40),
        16,
        stride=12,
        latent_dim=8,
        in_chans=1,
        head=HeadConfig(width=8, stride1_layers=1, stride2_layers=1, dropout=0.3, norm="batch"),
        fill_chunk=chunk,
    )
    batches = [torch.randn(2, 1, 48, 40), torch.randn(3, 1, 48, 40) + 0.5]
    model.recalibrate_batchnorm(batches)
    assert model.training  # modes restored
    model.eval()
    # The encoder's first BatchNorm: the statistics of its input over every patch of every
    # image, whatever the chunk (patches cut out one by one, the slow way).
    first_bn = next(m for m in model.encoder.modules() if isinstance(m, nn.BatchNorm2d))
    grid = model.grid
    patches = torch.cat(
        [
            reference_patch(x, grid, r, c)
            for x in batches
            for r in range(grid.rows)
            for c in range(grid.cols)
        ]
    )
    seen = _inputs_of([first_bn], lambda: model.encoder(patches))[first_bn]
    mean, var = _stats(seen)
    torch.testing.assert_close(first_bn.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first_bn.running_var.double(), var, rtol=1e-5, atol=1e-5)
    # The head's first BatchNorm: the statistics of its input when the head reads the Z that
    # inference fills (later layers see inputs normalised by batch statistics, as in training).
    head_bn = next(m for m in model.head.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        zs = [model.fill_z(x) for x in batches]
    seen = _inputs_of([head_bn], lambda: [model.head(z) for z in zs])[head_bn]
    mean, var = _stats(seen)
    torch.testing.assert_close(head_bn.running_mean.double(), mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(head_bn.running_var.double(), var, rtol=1e-4, atol=1e-5)
