"""The random sampler: without replacement, per image, capped, reproducible."""

from __future__ import annotations

import math

import pytest
import torch

from patchgd import InnerLoopConfig, RandomPatchSampler


def _plan(
    n: int,
    fraction: float,
    cap: float,
    batch: int = 4,
    inner_iterations: int | None = None,
    seed: int = 0,
    candidates: torch.Tensor | None = None,
):
    loop = InnerLoopConfig(
        sampling_fraction=fraction, max_visit_fraction=cap, inner_iterations=inner_iterations
    ).resolve(n)
    plan = RandomPatchSampler(seed).plan(
        batch,
        n,
        loop.patches_per_iteration,
        loop.inner_iterations,
        loop.max_visit_fraction,
        candidates,
    )
    return loop, plan


@pytest.mark.parametrize("n", [1, 4, 16, 25, 196])
@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 1.0])
def test_full_cap_visits_every_patch_exactly_once_per_image(n, fraction):
    loop, plan = _plan(n, fraction, 1.0)
    assert len(plan) == loop.inner_iterations == math.ceil(n / loop.patches_per_iteration)
    for b in range(4):
        visited = [p for step in plan for p in step[b].tolist() if p >= 0]
        assert sorted(visited) == list(range(n))
    assert all(step.shape[1] <= loop.patches_per_iteration for step in plan)


@pytest.mark.parametrize(
    ("n", "fraction", "cap"), [(25, 0.1, 0.5), (196, 0.1, 0.3), (10, 0.2, 0.7)]
)
def test_cap_limits_distinct_patches_and_images_draw_independently(n, fraction, cap):
    loop, plan = _plan(n, fraction, cap, batch=6)
    budget = math.ceil(cap * n)
    sets = []
    for b in range(6):
        visited = [p for step in plan for p in step[b].tolist() if p >= 0]
        assert len(visited) == len(set(visited)) == budget
        sets.append(frozenset(visited))
    assert len(set(sets)) > 1, "every image drew the same patches"


def test_more_inner_iterations_than_one_walk_revisit_only_the_visit_set():
    loop, plan = _plan(
        20, 0.25, 0.5, batch=3, inner_iterations=7
    )  # k = 5, visit set 10, 2 per walk
    assert len(plan) == 7
    for b in range(3):
        first_walk = {p for step in plan[:2] for p in step[b].tolist()}
        assert len(first_walk) == 10
        for step in plan:
            row = step[b].tolist()
            assert len(row) == len(set(row)), "a position twice in one inner iteration"
            assert set(row) <= first_walk


def test_candidate_mask_restricts_positions_and_pads_short_images():
    n = 16
    candidates = torch.zeros(3, n, dtype=torch.bool)
    candidates[0, :] = True
    candidates[1, [1, 5, 9]] = True  # only three tissue patches
    # image 2 has none: it is never visited
    loop, plan = _plan(n, 0.25, 1.0, batch=3, candidates=candidates)
    for b in range(3):
        visited = [p for step in plan for p in step[b].tolist() if p >= 0]
        assert sorted(visited) == torch.nonzero(candidates[b]).flatten().tolist()


def test_same_seed_same_plan_and_state_dict_resumes_the_stream():
    a, b = RandomPatchSampler(7), RandomPatchSampler(7)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.plan(2, 30, 4, 8, 1.0), b.plan(2, 30, 4, 8, 1.0), strict=True)
    )
    state = a.state_dict()
    continued = a.plan(2, 30, 4, 8, 1.0)
    resumed = RandomPatchSampler(123)
    resumed.load_state_dict(state)
    assert all(
        torch.equal(x, y) for x, y in zip(continued, resumed.plan(2, 30, 4, 8, 1.0), strict=True)
    )
    different = RandomPatchSampler(8).plan(2, 30, 4, 8, 1.0)
    assert not all(torch.equal(x, y) for x, y in zip(continued, different, strict=True))


def test_walks_are_split_into_balanced_iterations():
    loop, plan = _plan(9, 4 / 9, 1.0, batch=2)
    assert loop.patches_per_iteration == 4 and loop.inner_iterations == 3
    assert [step.shape[1] for step in plan] == [3, 3, 3]
