"""The planner: its plan, run again, stays under its budget; impossible budgets say their need."""

from __future__ import annotations

import pytest
import torch

from patchgd import ConfigError, HeadConfig, InnerLoopConfig, PatchGDClassifier
from patchgd.app.callbacks import planned_config
from patchgd.cli import main
from patchgd.memory import measure, optimizer_state_bytes
from patchgd.planner import parse_size, plan_patchgd

KWARGS = dict(
    backbone="test_resnet",
    num_classes=3,
    image_size=128,
    patch_size=32,
    latent_dim=16,
    head=HeadConfig(width=16),
    loop=InnerLoopConfig(patches_per_iteration=4),
)


@pytest.mark.parametrize("budget_mib", [10, 24])
def test_the_planned_configuration_runs_under_its_budget(budget_mib):
    budget = budget_mib * 2**20
    plan = plan_patchgd(KWARGS, budget)
    assert plan.peak_bytes <= budget and plan.batch_size >= 2
    # Run the plan again, from scratch: weights + batch + the step's own peak.
    loop = InnerLoopConfig(patches_per_iteration=plan.patches_per_iteration)
    model = PatchGDClassifier(**{**KWARGS, "loop": loop, "fill_chunk": plan.fill_chunk}).train()
    images = torch.randn(plan.batch_size, 3, 128, 128)
    targets = torch.arange(plan.batch_size) % 3
    optimizer = torch.optim.Adam(model.parameters())
    model.training_step(images, targets, optimizer)  # the second step is the steady one
    _, report = measure(lambda: model.training_step(images, targets, optimizer))
    static = sum(p.numel() * 4 for p in model.parameters()) + images.numel() * 4
    static += optimizer_state_bytes(optimizer)
    assert static + report.tensor_bytes <= budget
    # The trials ran at most two of the ζ = 4 inner iterations; the full step peaks the same.
    assert static + report.tensor_bytes == pytest.approx(plan.peak_bytes, rel=0.02)
    # One more image would not have fitted (the search found the largest batch).
    bigger = plan_patchgd(KWARGS, budget, max_batch=plan.batch_size + 1)
    assert bigger.batch_size == plan.batch_size


def test_a_larger_budget_buys_a_larger_batch():
    assert plan_patchgd(KWARGS, "24MiB").batch_size > plan_patchgd(KWARGS, "10MiB").batch_size


def test_an_impossible_budget_says_what_the_smallest_configuration_needs():
    with pytest.raises(
        ConfigError,
        match=r"memory budget 1\.0 MiB is too small: the smallest "
        r"configuration \(batch 2, k 1, fill chunk 2\) needs",
    ):
        plan_patchgd(KWARGS, "1MiB")


def test_parse_size_units():
    assert parse_size("4GB") == 4 * 10**9 and parse_size("4GiB") == 4 * 2**30
    assert parse_size("512 MiB") == 512 * 2**20 and parse_size("1.5KB") == 1500
    with pytest.raises(ConfigError, match="memory size '4 gigs'"):
        parse_size("4 gigs")


PLAN = [
    "plan",
    "--backbone",
    "test_resnet",
    "--image-size",
    "128",
    "--patch-size",
    "32",
    "--latent-dim",
    "16",
    "--sampling-fraction",
    "0.25",
    "--num-classes",
    "3",
]


def test_plan_command_prints_the_plan(capsys):
    # The command builds the paper's head (256 channels): about 45 MiB for one batch of 2.
    assert main([*PLAN, "--memory-budget", "64MiB"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("plan: PatchGD: batch ") and "of 64.0 MiB budget" in out[-1]
    assert main([*PLAN, "--memory-budget", "1MiB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is too small: the smallest configuration" in err[0]


def test_gd_baselines_get_their_largest_batch_or_resolution_and_patchgd_a_larger_batch():
    from patchgd import DownscaledGDClassifier, GDClassifier
    from patchgd.planner import plan_gd

    budget = 24 * 2**20
    gd = plan_gd(lambda: GDClassifier("test_resnet", 3, 128), 128, budget)
    assert gd.peak_bytes <= budget and gd.batch_size >= 1
    down = plan_gd(
        lambda size: DownscaledGDClassifier("test_resnet", 3, 128, input_size=size),
        128,
        budget,
        downscale=True,
    )
    assert down.peak_bytes <= budget and down.input_size % 32 == 0 and down.input_size <= 128
    # The paper's point in miniature: at the same budget PatchGD keeps a larger batch.
    assert plan_patchgd(KWARGS, budget).batch_size > gd.batch_size


def test_gd_whose_head_cannot_train_on_one_image_is_planned_from_two():
    """GD-extended on a small image: its head's BatchNorm sees a 1×1 grid, so a batch of one is
    invalid (not too big); the search must go on from two instead of calling the budget small."""
    from patchgd import GDExtendedClassifier
    from patchgd.planner import plan_gd

    build = lambda: GDExtendedClassifier("test_resnet", 3, 64, latent_dim=16)  # noqa: E731
    with pytest.raises(ConfigError, match="batch of 1"):
        build().train()(torch.rand(1, 3, 64, 64))
    plan = plan_gd(build, 64, 64 * 2**20, max_batch=4)
    assert 2 <= plan.batch_size <= 4 and plan.peak_bytes <= 64 * 2**20


def test_patchgd_whose_encoder_cannot_train_on_one_image_is_planned_from_two():
    """A linear head has no norm, but one patch per inner iteration through the encoder's
    BatchNorm cannot train: a batch of one is invalid, and the plan starts from two."""
    kwargs = {**KWARGS, "head": HeadConfig(stride1_layers=0, stride2_layers=0, dropout=0.0)}
    kwargs["loop"] = InnerLoopConfig(patches_per_iteration=1)
    plan = plan_patchgd(kwargs, 64 * 2**20, max_batch=4)
    assert 2 <= plan.batch_size <= 4 and plan.patches_per_iteration == 1


def test_gd_with_accumulation_gets_the_largest_micro_batch_beside_the_whole_batch():
    """Accumulation keeps the whole batch in memory while micro-batches go through: the plan
    must count it, and the planned step, run again from scratch, must stay under the budget."""
    from patchgd import GDClassifier
    from patchgd.memory import live_training_bytes
    from patchgd.planner import plan_classifier, plan_gd

    budget, batch, side = 24 * 2**20, 24, 128
    plain = plan_gd(lambda: GDClassifier("test_resnet", 3, side), side, budget)
    assert plain.batch_size < batch  # the whole batch at once does not fit
    accumulating = GDClassifier("test_resnet", 3, side, micro_batch=1)
    model, plan = plan_classifier(accumulating, budget, batch)
    micro = model.micro_batch
    assert plan.batch_size == batch and 1 <= micro <= plain.batch_size
    assert plan.classifier_args == {"micro_batch": micro} and not plan.batch_planned
    assert planned_config(plan) == {"model.classifier.init_args.micro_batch": micro}
    assert plan.predicted_peak_bytes <= budget

    def peak(m: int) -> int:
        fresh = GDClassifier("test_resnet", 3, side, micro_batch=m).train()
        images, targets = torch.randn(batch, 3, side, side), torch.arange(batch) % 3
        optimizer = torch.optim.Adam(fresh.parameters())
        fresh.training_step(images, targets, optimizer)  # the second step is the steady one
        _, report = measure(lambda: fresh.training_step(images, targets, optimizer))
        return live_training_bytes(fresh, images, optimizer) + report.tensor_bytes

    assert peak(micro) <= budget
    assert micro == batch or peak(micro + 1) > budget  # the largest micro-batch that fits


def test_the_plan_never_exceeds_the_batch_asked_for():
    """A head whose BatchNorm sees a single cell needs two images: with at most one allowed the
    plan is refused in one line, never silently raised to two."""
    from patchgd import GDExtendedClassifier
    from patchgd.planner import plan_gd

    assert PatchGDClassifier(**KWARGS).head.out_shape == (1, 1)  # the head needs two images
    with pytest.raises(ConfigError, match="a batch of at most 1 cannot train this model"):
        plan_patchgd(KWARGS, 64 * 2**20, max_batch=1)
    with pytest.raises(ConfigError, match="the largest batch must be at least 1, got 0"):
        plan_patchgd(KWARGS, 64 * 2**20, max_batch=0)
    build = lambda: GDExtendedClassifier("test_resnet", 3, 64, latent_dim=16)  # noqa: E731
    with pytest.raises(ConfigError, match="a batch of at most 1 cannot train GD"):
        plan_gd(build, 64, 64 * 2**20, max_batch=1)
    linear = {**KWARGS, "head": HeadConfig(stride1_layers=0, stride2_layers=0, dropout=0.0)}
    assert plan_patchgd(linear, 64 * 2**20, max_batch=1).batch_size == 1  # one image trains


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--max-batch", "0"], "the largest batch must be at least 1, got 0"),
        (["--device", "cuda"], "--device cuda: CUDA is not available on this machine"),
        (["--device", "gpu"], "--device gpu: "),
    ],
)
def test_plan_command_refuses_bad_options_in_one_line(option, message, capsys):
    assert main([*PLAN, "--memory-budget", "64MiB", *option]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
