"""Learning-rate schedules, as multipliers of the peak rate (for ``LambdaLR``)."""

from __future__ import annotations


def warmup_then_linear_decay(
    step: int, warmup_steps: int, total_steps: int, final_fraction: float
) -> float:
    """The paper's schedule as a multiplier of the peak learning rate.

    Linear warm-up from 0 over ``warmup_steps``, then linear decay to ``final_fraction`` of the
    peak at ``total_steps``; constant at ``final_fraction`` after that.
    """
    if step < warmup_steps:
        return step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 1.0 - (1.0 - final_fraction) * progress


__all__ = ["warmup_then_linear_decay"]
