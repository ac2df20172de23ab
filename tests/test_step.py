"""Algorithm 1: gradients against the full-image reference, sampling, and the step schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from patchgd import (
    ConfigError,
    HeadConfig,
    InnerLoopConfig,
    PatchGDClassifier,
    PatchGrid,
    RandomPatchSampler,
    StepHooks,
    accumulation_groups,
    train_step,
)
from patchgd.algorithm import first_visits, infer
from patchgd.head import LatentHead
from reference import TinyEncoder, reference_z


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _max_rel_error(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    assert got.keys() == expected.keys()
    return max(
        ((got[n] - expected[n]).norm() / expected[n].norm().clamp_min(1e-30)).item()
        for n in expected
    )


@pytest.mark.parametrize(
    ("backbone", "image", "patch", "stride", "k"),
    [
        ("test_efficientnet_gn", 96, 32, 32, 1),  # CNN, 3×3 grid, one patch per iteration
        ("test_efficientnet_gn", 80, 32, 24, 4),  # CNN, overlap + padding, ζ = ceil(9 / 4) = 3
        ("test_vit", 64, 32, 32, 3),  # ViT, 2×2 grid, uneven last iteration
    ],
)
def test_accumulated_gradients_equal_the_full_image_gradient(backbone, image, patch, stride, k):
    """ε = ζ, full coverage, no BatchNorm/dropout in the encoder: head gradient exact,
    encoder gradient = full-image gradient / ε (the paper's scaling)."""
    torch.manual_seed(1)
    model = (
        PatchGDClassifier(
            backbone,
            5,
            image,
            patch,
            stride=stride,
            latent_dim=8,
            pad_value=0.3,
            head=HeadConfig(width=16, dropout=0.0, norm="batch"),
            loop=InnerLoopConfig(patches_per_iteration=k, max_visit_fraction=1.0),
        )
        .double()
        .train()
    )
    images = torch.randn(3, 3, image, image, dtype=torch.float64)
    targets = torch.tensor([0, 3, 4])
    eps = model.loop.accumulation
    assert eps == model.loop.inner_iterations == math.ceil(model.grid.num_patches / k) > 1

    # The slow, obvious reference: every patch encoded with gradients, head on the full Z.
    model.zero_grad()
    F.cross_entropy(model.head(reference_z(model.encoder, images, model.grid)), targets).backward()
    expected_head, expected_encoder = _grads(model.head), _grads(model.encoder)

    captured: dict[str, dict[str, torch.Tensor]] = {}
    hooks = StepHooks(
        optimizer_step=lambda: captured.update(
            head=_grads(model.head), encoder=_grads(model.encoder)
        )
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result = model.training_step(images, targets, opt, hooks=hooks)

    assert result.optimizer_steps == 1
    visited = torch.cat([p.flatten() for p in result.plan])
    assert sorted(visited.tolist()) == sorted(list(range(model.grid.num_patches)) * 3)
    assert _max_rel_error(captured["head"], expected_head) < 1e-5
    scaled = {n: g * eps for n, g in captured["encoder"].items()}
    assert _max_rel_error(scaled, expected_encoder) < 1e-5
    # Unscaled, the encoder gradient is off by exactly the factor 1/ε.
    assert _max_rel_error(captured["encoder"], expected_encoder) == pytest.approx(1 - 1 / eps)


def test_patches_not_sampled_in_an_iteration_get_no_gradient_from_it():
    grid = PatchGrid((64, 96), 16)  # 4 × 6 grid, no overlap
    encoder, head = TinyEncoder(latent_dim=8), LatentHead(8, 4, grid.shape, width=8, dropout=0.0)
    images = torch.randn(2, 3, 64, 96, requires_grad=True)
    per_iteration: list[torch.Tensor] = []

    def backward(loss: torch.Tensor) -> None:
        loss.backward()
        per_iteration.append(images.grad.detach().clone())
        images.grad = None

    result = train_step(
        encoder,
        head,
        grid,
        images,
        torch.tensor([1, 2]),
        torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=0.01),
        InnerLoopConfig(patches_per_iteration=5, accumulation=2),
        RandomPatchSampler(3),
        hooks=StepHooks(backward=backward),
    )
    assert len(per_iteration) == len(result.plan) == 5
    for grad, positions in zip(per_iteration, result.plan, strict=True):
        for b in range(2):
            sampled = set(positions[b].tolist()) - {-1}
            for flat in range(grid.num_patches):
                top, left, bottom, right = grid.box(*grid.position(flat))
                block = grad[b, :, top:bottom, left:right].abs().sum().item()
                if flat in sampled:
                    assert block > 0, f"sampled patch {flat} of image {b} got no gradient"
                else:
                    assert block == 0, f"patch {flat} of image {b} was not sampled but got gradient"


@pytest.mark.parametrize("inner_iterations", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("cap", [0.3, 1.0])
def test_optimizer_steps_per_outer_step_are_ceil_zeta_over_epsilon(inner_iterations, fraction, cap):
    grid = PatchGrid(40, 8)  # 5 × 5 = 25 patches
    encoder, head = TinyEncoder(latent_dim=4), LatentHead(4, 3, grid.shape, width=4, norm="none")
    opt = torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=0.01)
    images, targets = torch.randn(2, 3, 40, 40), torch.tensor([0, 2])
    for eps in range(1, inner_iterations + 1):
        calls: list[int] = []
        loop = InnerLoopConfig(
            sampling_fraction=fraction,
            max_visit_fraction=cap,
            inner_iterations=inner_iterations,
            accumulation=eps,
        )
        hooks = StepHooks(optimizer_step=lambda calls=calls: calls.append(1))
        result = train_step(
            encoder, head, grid, images, targets, opt, loop, RandomPatchSampler(0), hooks=hooks
        )
        assert len(calls) == result.optimizer_steps == math.ceil(inner_iterations / eps) >= 1
        assert len(result.losses) == inner_iterations
        assert loop.resolve(grid.num_patches).optimizer_steps == len(calls)


def test_the_old_names_of_k_and_zeta_still_work_for_one_release_with_a_warning():
    with pytest.warns(
        FutureWarning, match="patches_per_step=...\\) is deprecated; use patches_per_it"
    ):
        loop = InnerLoopConfig(patches_per_step=3, inner_steps=2)
    assert loop == InnerLoopConfig(patches_per_iteration=3, inner_iterations=2)
    resolved = loop.resolve(16)
    with pytest.warns(FutureWarning, match="ResolvedLoop.inner_steps is deprecated"):
        assert resolved.inner_steps == 2
    with pytest.raises(ConfigError, match="patches_per_iteration or its deprecated name"):
        InnerLoopConfig(patches_per_iteration=2, patches_per_step=3)
    with pytest.raises(AttributeError, match="no attribute 'zeta'"):
        resolved.zeta  # noqa: B018


def test_accumulation_groups_cover_every_inner_iteration_once():
    for zeta in range(1, 12):
        for eps in range(1, zeta + 1):
            groups = accumulation_groups(zeta, eps)
            assert [j for g in groups for j in g] == list(range(zeta))
            assert all(len(g) == eps for g in groups[:-1]) and 1 <= len(groups[-1]) <= eps


def test_each_step_averages_its_group_including_the_remainder():
    """ζ = 3, ε = 2: groups of 2 and 1; each group's gradient is the mean of its iterations."""
    grid = PatchGrid(32, 16)
    encoder, head = (
        TinyEncoder(latent_dim=4).double(),
        LatentHead(4, 3, grid.shape, width=4, norm="none", dropout=0.0).double(),
    )
    scales: list[float] = []

    def backward(loss: torch.Tensor) -> None:
        scales.append(loss.item())
        loss.backward()

    losses = train_step(
        encoder,
        head,
        grid,
        torch.randn(2, 3, 32, 32, dtype=torch.float64),
        torch.tensor([0, 1]),
        torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=0.0),
        InnerLoopConfig(patches_per_iteration=1, inner_iterations=3, accumulation=2),
        RandomPatchSampler(0),
        hooks=StepHooks(backward=backward),
    ).losses
    assert scales == pytest.approx([losses[0] / 2, losses[1] / 2, losses[2] / 1])


def test_z_carries_the_newest_embedding_of_each_patch_into_later_iterations():
    """ε = 1: weights change every iteration, so Z must hold, per position, the embedding from
    the last iteration that re-encoded it (and the fill's value where none did)."""
    grid = PatchGrid(48, 16)  # 3 × 3
    encoder = TinyEncoder(latent_dim=4).double()
    head = LatentHead(4, 3, grid.shape, width=16, norm="none", dropout=0.0).double()
    calls: list[torch.Tensor] = []
    encoder.register_forward_hook(lambda m, args, out: calls.append(out.detach().clone()))
    seen_z: list[torch.Tensor] = []
    head.register_forward_pre_hook(lambda m, args: seen_z.append(args[0].detach().clone()))
    images = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    result = train_step(
        encoder,
        head,
        grid,
        images,
        torch.tensor([0, 2]),
        torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=0.5),
        InnerLoopConfig(patches_per_iteration=2, inner_iterations=5, accumulation=1),
        RandomPatchSampler(1),
        fill_chunk=1000,
    )
    fill, per_iteration = calls[0], calls[1:]
    # The fill skips the patches the first inner iteration re-encodes; Z holds zeros there until
    # that iteration writes them.
    first = first_visits(result.plan, 9)
    visited_first = int((result.plan[0] >= 0).sum())
    assert first is not None and int(first.sum()) == visited_first > 0
    assert fill.shape[0] == 18 - visited_first
    filled = torch.zeros(18, 4, dtype=fill.dtype)
    filled[~first.flatten()] = fill
    filled = filled.view(2, 3, 3, 4).permute(0, 3, 1, 2)  # (B, D, rows, cols)
    expected = filled.clone()
    for j, (positions, emb, z) in enumerate(zip(result.plan, per_iteration, seen_z, strict=True)):
        image_idx, slot = (positions >= 0).nonzero(as_tuple=True)
        pos = positions[image_idx, slot]
        expected[image_idx, :, pos // 3, pos % 3] = emb
        torch.testing.assert_close(z, expected, rtol=0, atol=0, msg=f"inner iteration {j}")
        if j > 0:  # the weights have moved: a stale fill value would be a different number
            assert not torch.allclose(emb, filled[image_idx, :, pos // 3, pos % 3])


def test_default_inner_iterations_follow_the_candidates_and_visit_each_once():
    grid = PatchGrid(64, 16)  # 16 patches
    encoder, head = TinyEncoder(latent_dim=4), LatentHead(4, 3, grid.shape, width=8, norm="none")
    candidates = torch.zeros(3, 16, dtype=torch.bool)
    candidates[0, [0, 1, 2, 3, 4]] = True
    candidates[1, [7, 9]] = True  # image 2 has no candidate at all
    steps = []
    result = train_step(
        encoder,
        head,
        grid,
        torch.randn(3, 3, 64, 64),
        torch.tensor([0, 1, 2]),
        torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=0.1),
        InnerLoopConfig(patches_per_iteration=2),
        RandomPatchSampler(0),
        candidates=candidates,
        hooks=StepHooks(optimizer_step=lambda: steps.append(1)),
    )
    assert len(result.plan) == 3 and len(steps) == 1  # ζ = ceil(5 / 2), ε = ζ
    for b in range(3):
        visited = [p for step in result.plan for p in step[b].tolist() if p >= 0]
        assert sorted(visited) == candidates[b].nonzero().flatten().tolist()


def test_with_candidates_the_gradient_is_that_of_candidates_over_a_background_z():
    """ε = ζ, every candidate visited once, no BatchNorm: the step's head gradient equals that
    of a model whose Z holds the encoded candidates (with gradients) and, elsewhere, the
    encoder's output on a blank patch (a constant); the encoder's is that divided by ε."""
    torch.manual_seed(0)
    grid = PatchGrid(64, 16, pad_value=0.5)  # 16 patches
    encoder = TinyEncoder(latent_dim=4).double()
    head = LatentHead(4, 3, grid.shape, width=8, norm="none", dropout=0.0).double()
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    targets = torch.tensor([0, 2])
    candidates = torch.zeros(2, 16, dtype=torch.bool)
    candidates[0, [0, 5, 6, 10]] = True
    candidates[1, [3, 15]] = True

    # Reference: Z built patch by patch, background from one blank patch, detached.
    with torch.no_grad():
        blank = encoder(torch.full((1, 3, 16, 16), 0.5, dtype=torch.float64))[0]
    patches = grid.extract(images).reshape(2, 16, 3, 16, 16)
    rows = [
        [encoder(patches[b, i : i + 1])[0] if candidates[b, i] else blank for i in range(16)]
        for b in range(2)
    ]
    z = torch.stack([torch.stack(r) for r in rows]).view(2, 4, 4, 4).permute(0, 3, 1, 2)
    F.cross_entropy(head(z), targets).backward()
    expected_head, expected_encoder = _grads(head), _grads(encoder)
    head.zero_grad()
    encoder.zero_grad()

    captured: dict[str, dict[str, torch.Tensor]] = {}
    result = train_step(
        encoder,
        head,
        grid,
        images,
        targets,
        torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=0.1),
        InnerLoopConfig(patches_per_iteration=1, max_visit_fraction=1.0),
        RandomPatchSampler(0),
        candidates=candidates,
        hooks=StepHooks(
            optimizer_step=lambda: captured.update(head=_grads(head), encoder=_grads(encoder))
        ),
    )
    eps = len(result.plan)
    assert eps == 4 and result.optimizer_steps == 1
    assert _max_rel_error(captured["head"], expected_head) < 1e-10
    scaled = {n: g * eps for n, g in captured["encoder"].items()}
    assert _max_rel_error(scaled, expected_encoder) < 1e-10


@pytest.mark.parametrize("pool", ["avg", "attention"])
def test_with_candidates_a_pooling_head_never_reads_the_background(pool):
    """The background embedding (the encoder on a blank patch of ``pad_value``) fills Z
    outside the candidates; a pooling head masks it out, so changing it changes nothing:
    not the losses, not the gradients, not the inference logits."""
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    candidates = torch.zeros(2, 16, dtype=torch.bool)
    candidates[0, [0, 5, 6, 10]] = True
    candidates[1, [3, 15]] = True
    runs = []
    for pad_value in (0.0, 3.0):
        torch.manual_seed(0)
        grid = PatchGrid(64, 16, pad_value=pad_value)
        encoder = TinyEncoder(latent_dim=4).double()
        # No convolutions on Z: a 3×3 convolution would carry the background into its
        # neighbours, which the mask keeps (tested in test_head.py).
        head = LatentHead(4, 3, grid.shape, stride1_layers=0, stride2_layers=0, pool=pool)
        head = head.double()
        captured: dict[str, dict[str, torch.Tensor]] = {}
        result = train_step(
            encoder,
            head,
            grid,
            images,
            torch.tensor([0, 2]),
            torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=0.1),
            InnerLoopConfig(patches_per_iteration=1, max_visit_fraction=1.0),
            RandomPatchSampler(0),
            candidates=candidates,
            hooks=StepHooks(
                optimizer_step=lambda c=captured, e=encoder, h=head: c.update(
                    head=_grads(h), encoder=_grads(e)
                )
            ),
        )
        logits = infer(encoder, head, grid, images, candidates=candidates)
        blank = encoder(torch.full((1, 3, 16, 16), pad_value, dtype=torch.float64))
        runs.append((result.losses, captured, logits, blank))
    (losses0, grads0, logits0, blank0), (losses1, grads1, logits1, blank1) = runs
    assert not torch.allclose(blank0, blank1)  # the background embedding did change
    assert losses0 == pytest.approx(losses1, rel=1e-12)
    assert _max_rel_error(grads1["head"], grads0["head"]) < 1e-10
    assert _max_rel_error(grads1["encoder"], grads0["encoder"]) < 1e-10
    torch.testing.assert_close(logits1, logits0)


def test_a_head_of_the_users_own_takes_z_alone_even_with_candidates():
    grid = PatchGrid(64, 16)
    encoder = TinyEncoder(latent_dim=4)
    head = torch.nn.Sequential(
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)
    )
    candidates = torch.zeros(2, 16, dtype=torch.bool)
    candidates[:, [1, 4, 9]] = True
    images = torch.randn(2, 3, 64, 64)
    result = train_step(
        encoder,
        head,
        grid,
        images,
        torch.tensor([0, 1]),
        torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=0.1),
        InnerLoopConfig(patches_per_iteration=1),
        RandomPatchSampler(0),
        candidates=candidates,
    )
    assert result.logits.shape == (2, 3)
    assert infer(encoder, head, grid, images, candidates=candidates).shape == (2, 3)


def test_when_the_first_iteration_visits_every_candidate_the_fill_still_encodes_them():
    """Fewer candidates than k: skipping the first iteration's patches would leave the fill
    the blank patches alone, normalised by themselves; the fill encodes the candidates too."""
    grid = PatchGrid(64, 16)
    encoder = TinyEncoder(latent_dim=4)
    filled: list[int] = []
    encoder.register_forward_hook(
        lambda m, args, out: None if torch.is_grad_enabled() else filled.append(len(args[0]))
    )
    candidates = torch.zeros(2, 16, dtype=torch.bool)
    candidates[:, [1, 4, 9]] = True
    head = LatentHead(4, 3, grid.shape, width=8, norm="none")
    train_step(
        encoder,
        head,
        grid,
        torch.randn(2, 3, 64, 64),
        torch.tensor([0, 1]),
        torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=0.1),
        InnerLoopConfig(patches_per_iteration=4),
        RandomPatchSampler(0),
        candidates=candidates,
    )
    assert filled == [2 + 6]  # two blank patches and the six candidates
    assert first_visits([torch.tensor([[1, 4, 9], [9, 1, 4]])], 16, candidates) is None


def test_running_statistics_count_exactly_the_inner_iterations():
    """The fill must not touch BatchNorm statistics: only the ζ gradient passes count."""
    model = PatchGDClassifier(
        "test_resnet",
        3,
        64,
        16,
        latent_dim=8,
        head=HeadConfig(width=8),
        loop=InnerLoopConfig(patches_per_iteration=3),  # 16 patches -> ζ = 6
    ).train()
    bn = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for outer in range(1, 3):
        model.training_step(torch.randn(2, 3, 64, 64), torch.tensor([0, 1]), opt)
        assert int(bn.num_batches_tracked) == 6 * outer


class _BadSampler(RandomPatchSampler):
    def __init__(self, mutate):
        super().__init__(0)
        self.mutate = mutate

    def plan(self, *args, **kwargs):
        return self.mutate(super().plan(*args, **kwargs))


def _duplicate_first(plan):
    plan[0][0, 1] = plan[0][0, 0]
    return plan


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda plan: plan[:-1], "the sampler gave 3 inner iterations, expected 4"),
        (lambda plan: [p[:1] for p in plan], r"plan\[0\] has shape \(1, 2\), expected \(2, k\)"),
        (lambda plan: [p + 100 for p in plan], r"plan\[0\] holds positions outside \[-1, 8\)"),
        (_duplicate_first, r"plan\[0\] visits a position twice in one image"),
    ],
)
def test_a_custom_sampler_with_a_bad_plan_is_refused(mutate, message):
    grid = PatchGrid((32, 64), 16)  # 8 patches, k = 2 -> ζ = 4
    encoder, head = TinyEncoder(latent_dim=4), LatentHead(4, 3, grid.shape, width=8, norm="none")
    with pytest.raises(ValueError, match=message):
        train_step(
            encoder,
            head,
            grid,
            torch.randn(2, 3, 32, 64),
            torch.tensor([0, 1]),
            torch.optim.SGD(encoder.parameters(), lr=0.1),
            InnerLoopConfig(patches_per_iteration=2),
            _BadSampler(mutate),
        )
