"""Patch samplers: which patches each image re-encodes with gradients in each inner iteration.

A sampler turns one outer step into a *plan*: a list of ζ index tensors, one per inner
iteration, each of shape ``(B, k_j)`` holding flat grid positions (``row * cols + col``) and
``-1`` where an image takes no patch in that slot. Within one tensor an image's positions are
distinct. Plug in another sampler (for example one that favours tissue over background) by
implementing :class:`PatchSampler`.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

SamplePlan = list[Tensor]


@runtime_checkable
class PatchSampler(Protocol):
    """What the training step asks of a sampler."""

    def plan(
        self,
        batch_size: int,
        num_patches: int,
        patches_per_iteration: int,
        inner_iterations: int,
        max_visit_fraction: float,
        candidates: Tensor | None = None,
    ) -> SamplePlan:
        """Return ``inner_iterations`` tensors of shape ``(batch_size, k_j)``, ``k_j <= k``.

        ``candidates`` is an optional ``(batch_size, num_patches)`` boolean mask of the positions
        an image may visit (for example its tissue patches); ``None`` allows every position.
        """
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def visit_budget(num_candidates: int, max_visit_fraction: float) -> int:
    """Distinct patches an image may visit in one outer step: ``ceil(fraction · candidates)``."""
    return math.ceil(max_visit_fraction * num_candidates - 1e-9)


class RandomPatchSampler:
    """Uniform sampling without replacement, independently per image (the paper's sampler).

    Each outer step, every image draws a random subset of ``ceil(max_visit_fraction · N)`` of its
    N candidate positions (its *visit set*) and walks through it in a random order, ``k`` at a
    time. A walk takes ``ceil(visit set / k)`` inner iterations of balanced size (9 patches with
    k = 4 give 3, 3, 3, not 4, 4, 1, so no iteration is a lone patch that BatchNorm cannot
    normalise). When the plan has more inner iterations than one walk, the walk starts again over
    the same visit set in a fresh order, so no more than the cap is ever visited. An iteration
    never holds the same position twice; with a 100 % cap and ``ceil(N / k)`` inner iterations
    every patch is visited exactly once.

    Args:
        seed: seed of the sampler's own random generator; its state is part of
            :meth:`state_dict`, so a resumed run draws the same patches as an uninterrupted one.
    """

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def plan(
        self,
        batch_size: int,
        num_patches: int,
        patches_per_iteration: int,
        inner_iterations: int,
        max_visit_fraction: float,
        candidates: Tensor | None = None,
    ) -> SamplePlan:
        b, n, k = batch_size, num_patches, patches_per_iteration
        if candidates is None:
            allowed = torch.ones(b, n, dtype=torch.bool)
        else:
            allowed = candidates.to(device="cpu", dtype=torch.bool)
            if allowed.shape != (b, n):
                raise ValueError(f"candidates must have shape {(b, n)}, got {tuple(allowed.shape)}")
        budget = torch.tensor(
            [visit_budget(int(c), max_visit_fraction) for c in allowed.sum(1)], dtype=torch.long
        )
        # Random order with the candidates first: the first `budget` entries are the visit set.
        keys = torch.rand(b, n, generator=self.generator) + (~allowed).float() * 2.0
        order = keys.argsort(dim=1)
        slot = torch.arange(n).expand(b, n)
        in_visit_set = slot < budget[:, None]
        longest = int(budget.max()) if b else 0
        steps_per_walk = max(1, math.ceil(longest / k))
        bounds = [t * longest // steps_per_walk for t in range(steps_per_walk + 1)]

        plan: SamplePlan = []
        walk = order
        for j in range(inner_iterations):
            t = j % steps_per_walk
            if t == 0 and j > 0:  # a new walk over the same visit set, in a fresh order
                keys = torch.rand(b, n, generator=self.generator).masked_fill(~in_visit_set, 2.0)
                walk = order.gather(1, keys.argsort(dim=1))
            start, end = bounds[t], bounds[t + 1]
            cols, positions = slot[:, start:end], walk[:, start:end]
            plan.append(positions.masked_fill(cols >= budget[:, None], -1))
        return plan

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
