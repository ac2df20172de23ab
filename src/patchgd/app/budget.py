"""``--memory-budget`` for the Lightning commands: plan before training, cap, then check.

Before ``fit`` the planner (:mod:`patchgd.planner`) measures trial steps of the configured model
and picks the largest batch up to ``data.batch_size`` (for PatchGD also k and the fill chunk; for
downscaled GD the largest input size). The plan is applied to the model and the data module and
written into the run's config, so the saved ``config.yaml`` reruns exactly what was trained.
On CUDA the process is also capped at the budget, so a run cannot silently exceed it. The first
training step is measured again and its peak is reported beside the plan's.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from ..baselines import DownscaledGDClassifier
from ..errors import ConfigError
from ..model import Classifier, PatchGDClassifier
from ..planner import parse_size, plan_gd, plan_patchgd


@dataclass(frozen=True)
class RunPlan:
    """What the planner chose for a run and the config values that say so."""

    budget_bytes: int
    predicted_peak_bytes: int
    description: str
    config_changes: dict[str, Any]  # dotted config key → planned value


def plan_run(
    classifier: Classifier,
    classifier_args: dict[str, Any],
    datamodule: Any,
    budget: int | str,
    device: torch.device,
    log: Callable[[str], None] | None = None,
) -> tuple[Classifier, RunPlan]:
    """Plan ``classifier`` under ``budget``; returns the (possibly rebuilt) classifier.

    ``datamodule.batch_size`` is both the upper bound of the batch and where the planned batch
    goes. ``classifier_args`` (the config's ``init_args``) rebuild downscaled GD at other input
    sizes.
    """
    budget = parse_size(budget)
    wanted = getattr(datamodule, "batch_size", None)
    if not isinstance(wanted, int):
        raise ConfigError("--memory-budget needs a data module with a batch_size")
    if isinstance(classifier, PatchGDClassifier):
        lazy = getattr(datamodule, "mode", "resize") == "lazy"
        plan = plan_patchgd(classifier, budget, device=device, max_batch=wanted, lazy=lazy, log=log)
        loop = replace(classifier.loop_config, patches_per_step=plan.patches_per_step)
        classifier.configure_loop(loop, fill_chunk=plan.fill_chunk)
        changes = {
            "data.init_args.batch_size": plan.batch_size,
            "model.classifier.init_args.loop": asdict(loop),
            "model.classifier.init_args.fill_chunk": plan.fill_chunk,
        }
        batch = plan.batch_size
        peak, text = plan.peak_bytes, str(plan)
    else:
        size = _source_side(classifier)
        in_chans = _in_chans(classifier)
        if isinstance(classifier, DownscaledGDClassifier):
            cls = type(classifier)
            base = plan_gd(
                lambda s: cls(**{**classifier_args, "input_size": s}),
                size,
                budget,
                in_chans=in_chans,
                device=device,
                downscale=True,
                batch=wanted,
                log=log,
            )
            if base.input_size != classifier.image_size[0]:
                resized = cls(**{**classifier_args, "input_size": base.input_size})
                # CNN weights do not depend on the input size: keep the ones already initialised,
                # so the run equals one configured with this input_size from the start.
                # Size-dependent weights (position embeddings) keep their new initialisation.
                with contextlib.suppress(RuntimeError):
                    resized.load_state_dict(classifier.state_dict())
                classifier = resized
            changes = {"model.classifier.init_args.input_size": base.input_size}
            batch = wanted
        else:
            base = plan_gd(
                lambda: copy.deepcopy(classifier),
                size,
                budget,
                in_chans=in_chans,
                device=device,
                max_batch=wanted,
                log=log,
            )
            changes = {"data.init_args.batch_size": base.batch_size}
            batch = base.batch_size
        peak, text = base.peak_bytes, str(base)
    datamodule.batch_size = batch
    return classifier, RunPlan(budget, peak, text, changes)


def _source_side(classifier: Classifier) -> int:
    size = getattr(classifier, "source_size", None) or classifier.image_size
    if size[0] != size[1]:
        raise ConfigError(f"--memory-budget plans square images; the model takes {size}")
    return int(size[0])


def _in_chans(classifier: Classifier) -> int:
    for module in classifier.modules():
        if isinstance(module, torch.nn.Conv2d):
            return module.in_channels
    raise ConfigError(f"cannot tell the input channels of {type(classifier).__name__}")


def cap_cuda_memory(budget: int, device: torch.device) -> float | None:
    """Cap this process's CUDA allocations on ``device`` at ``budget`` bytes; the fraction set.

    A no-op (``None``) off CUDA. The cap makes an allocation beyond the budget fail with an
    out-of-memory error instead of quietly using more of the card.
    """
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    if budget > total:
        raise ConfigError(
            f"--memory-budget {budget / 2**30:.2f} GiB is more than {device}'s "
            f"{total / 2**30:.2f} GiB"
        )
    fraction = budget / total
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction
