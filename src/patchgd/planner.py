"""Turning a memory budget into a training configuration, by measured trial steps.

The paper met its 4/16/24 GB budgets by picking batch sizes by hand. :func:`plan_patchgd` does it
by measurement. Each candidate configuration is built and trained for two real steps (Adam,
random images); the second, steady-state step runs under :func:`patchgd.memory.measure`, and a
candidate counts only if the weights, the batch, Adam's state and that step's peak fit the
budget. The search order follows what matters most:

1. the largest batch B (more images per step is what GD cannot afford);
2. with k patches per inner iteration and the Z-fill chunk as configured, both halved only when
   even one image does not fit. The chunk is never enlarged past the default, which is sized
   for speed (see :func:`patchgd.model.default_fill_chunk`).

With ``lazy=True`` the trial steps take random patches on demand, as a run whose images are read
patch by patch from disk does: no image is in memory, so only the weights count as static.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, cast

import torch
from torch import Tensor

from .algorithm import deprecated_alias
from .errors import ConfigError
from .memory import MemoryReport, live_training_bytes, measure
from .model import Classifier, PatchGDClassifier
from .patches import RandomPatches

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int) -> int:
    """``"4GB"`` → 4·10⁹ bytes, ``"4GiB"`` → 4·2³⁰; a plain number is bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(
            f"memory size {text!r}: expected a number and a unit such as 4GB or 512MiB"
        )
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class MemoryPlan:
    """A configuration that fits the budget, with the measured memory of one training step.

    PatchGD's plan (:func:`plan_patchgd`) sets ``patches_per_iteration`` and ``fill_chunk``; a
    GD baseline's (:func:`plan_gd`) sets ``input_size`` for downscaled GD and ``micro_batch``
    for gradient accumulation.
    """

    method: str
    batch_size: int
    budget_bytes: int
    static_bytes: int  # weights, the batch and the optimizer state, live before the step
    step_memory: MemoryReport  # the trial step's own peak, above ``static_bytes``
    patches_per_iteration: int | None = None
    fill_chunk: int | None = None
    input_size: int | None = None
    micro_batch: int | None = None  # images per forward pass, when gradients accumulate

    @property
    def peak_bytes(self) -> int:
        return self.static_bytes + self.step_memory.tensor_bytes

    def __str__(self) -> str:
        parts = [f"batch {self.batch_size}"]
        if self.patches_per_iteration is not None:
            parts.append(f"k = {self.patches_per_iteration} patches per inner iteration")
        if self.fill_chunk is not None:
            parts.append(f"fill chunk {self.fill_chunk}")
        if self.input_size is not None:
            parts.append(f"input {self.input_size} px")
        if self.micro_batch is not None:
            parts.append(f"micro-batches of {self.micro_batch}")
        return (
            f"{self.method}: {', '.join(parts)}: peak {self.peak_bytes / 2**20:.1f} MiB of "
            f"{self.budget_bytes / 2**20:.1f} MiB budget "
            f"({100 * self.peak_bytes / self.budget_bytes:.0f} %)"
        )

    def __getattr__(self, name: str) -> Any:
        return deprecated_alias(
            self, name, {"patches_per_step": "patches_per_iteration", "step": "step_memory"}
        )


#: Deprecated names of :class:`MemoryPlan` (PatchGD's and the baselines' plans were two types).
Plan = BaselinePlan = MemoryPlan


def measure_training_step(
    model: Any, images: Any, targets: Tensor, device: str | torch.device = "cpu"
) -> tuple[int, MemoryReport]:
    """The memory of a steady-state Adam training step: (bytes live before it, its report).

    A first step creates Adam's state only at its very end, after the activations' peak; from
    the second step on, the state is live throughout. So the state is created first, by one
    optimizer step on zero gradients (no update: Adam's step is 0 / (0 + eps) = 0), and the
    measured step is a steady one. Live before it: the weights, the batch (when ``images`` is a
    tensor; a lazy provider holds no pixels) and the optimizer state. The peak of the step is
    their sum plus ``report.tensor_bytes``.
    """
    device = torch.device(device)
    model = model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates the state without moving the weights
    model.zero_grad(set_to_none=True)
    _, report = measure(lambda: model.training_step(images, targets, optimizer), device)
    model.zero_grad(set_to_none=True)
    return live_training_bytes(model, images, optimizer), report


def _measure_step(
    model: Any,
    batch: int,
    in_chans: int,
    size: tuple[int, int],
    device: torch.device,
    lazy: bool = False,
) -> tuple[int, MemoryReport]:
    """:func:`measure_training_step` on random images (or random patches, ``lazy``)."""
    if lazy:
        images: Any = RandomPatches(batch, model.grid, in_chans, device)
    else:
        images = torch.randn(batch, in_chans, *size, device=device)
    targets = torch.arange(batch, device=device) % model.num_classes
    return measure_training_step(model, images, targets, device)


def plan_patchgd(
    model: PatchGDClassifier | dict[str, Any],
    budget: int | str,
    *,
    device: str | torch.device = "cpu",
    max_batch: int = 64,
    lazy: bool = False,
    log: Callable[[str], None] | None = None,
) -> MemoryPlan:
    """The largest batch whose measured training step fits ``budget`` (k and chunk if need be).

    Args:
        model: the model to plan for (left unchanged: trials run on a copy), or
            :class:`~patchgd.PatchGDClassifier` arguments. Its k (``patches_per_iteration`` or the
            sampling fraction) is the starting k, its fill chunk on ``device`` the chunk.
        budget: bytes, or a size such as ``"4GB"``.
        device: where the trial steps run (the device the plan is for).
        max_batch: the largest batch tried.
        lazy: the images are read patch by patch from disk, never held whole in memory.
        log: receives one line per trial.
    """
    budget = parse_size(budget)
    device = torch.device(device)
    base = PatchGDClassifier(**model) if isinstance(model, dict) else model
    work = copy.deepcopy(base)  # trial steps change weights and statistics: never the user's
    in_chans = base.in_chans
    k, n = base.loop.patches_per_iteration, base.grid.num_patches
    chunk = min(base.chunk_for(device), n)

    refusals: list[str] = []

    def trial(batch: int, k: int, chunk: int) -> MemoryPlan:
        # Every inner iteration repeats the first one's footprint: two of them (one optimizer
        # step after them, or one after each) peak as high as all ζ, in a fraction of the time.
        loop = replace(base.loop_config, patches_per_iteration=k)
        resolved = loop.resolve(base.grid.num_patches)
        zeta = min(resolved.inner_iterations, 2)
        loop = replace(loop, inner_iterations=zeta, accumulation=min(resolved.accumulation, zeta))
        work.configure_loop(loop, fill_chunk=chunk)
        static, report = _measure_step(
            work, batch, in_chans, base.grid.image_size, device, lazy=lazy
        )
        return MemoryPlan("PatchGD", batch, budget, static, report, k, chunk)

    def fits(batch: int, k: int, chunk: int) -> MemoryPlan | None:
        try:
            result = trial(batch, k, chunk)
        except ConfigError as err:  # e.g. BatchNorm cannot train on one image: not a candidate
            refusals.append(str(err))
            return None
        if log:
            peak = result.peak_bytes / 2**20
            log(f"  tried batch {batch}, k {k}, fill chunk {chunk}: {peak:.1f} MiB")
        return result if result.peak_bytes <= budget else None

    start = 2 if _needs_two_images(base) else 1
    if max_batch < start:  # the batch asked for is a ceiling the plan never exceeds
        raise ConfigError(
            f"a batch of at most {max_batch} cannot train this model: BatchNorm in its head "
            "cannot train on one image whose grid reduces to a single cell; allow a batch of 2"
            if max_batch >= 1
            else f"the largest batch must be at least 1, got {max_batch}"
        )
    refused = len(refusals)
    best = fits(start, k, chunk)
    if best is None and start == 1 and len(refusals) > refused and max_batch >= 2:
        # One image cannot train (e.g. one patch through the encoder's BatchNorm): not memory.
        start = 2
        best = fits(start, k, chunk)
    while best is None and (k > 1 or chunk > 2):  # shrink the step until one batch fits
        k, chunk = max(1, k // 2), max(2, chunk // 2)
        best = fits(start, k, chunk)
    if best is None:
        try:
            smallest = trial(start, k, chunk).peak_bytes / 2**20
        except ConfigError:
            raise ConfigError(f"no configuration can train: {refusals[-1]}") from None
        raise ConfigError(
            f"memory budget {budget / 2**20:.1f} MiB is too small: the smallest configuration "
            f"(batch {start}, k {k}, fill chunk {chunk}) needs {smallest:.1f} MiB"
        )
    return _largest(lambda batch: fits(batch, k, chunk), start, max_batch) or best


def _needs_two_images(model: PatchGDClassifier) -> bool:
    """BatchNorm in the head cannot train on one image whose grid reduces to a single cell."""
    return model.head.norm == "batch" and model.head.out_shape == (1, 1)


def _largest(fits: Callable[[int], Any | None], low: int, limit: int) -> Any | None:
    """The largest ``x`` in ``[low, limit]`` with ``fits(x)``, assuming monotone need."""
    best = fits(low)
    if best is None:
        return None
    high = None
    x = low
    while high is None and x < limit:
        x = min(2 * x, limit)
        trial = fits(x)
        if trial is None:
            high = x
        else:
            low, best = x, trial
    while high is not None and high - low > 1:
        mid = (low + high) // 2
        trial = fits(mid)
        if trial is None:
            high = mid
        else:
            low, best = mid, trial
    return best


def plan_gd(
    build: Callable[[], torch.nn.Module],
    image_size: int,
    budget: int | str,
    *,
    in_chans: int = 3,
    device: str | torch.device = "cpu",
    max_batch: int = 64,
    downscale: bool = False,
    batch: int = 2,
    accumulate: bool = False,
    log: Callable[[str], None] | None = None,
) -> MemoryPlan:
    """The largest batch of full images a GD model fits (``downscale=False``), or, for downscaled
    GD, the largest input side (multiples of 32) that fits with a batch of ``batch``, or, with
    ``accumulate``, the largest micro-batch that fits a step on a whole batch of ``batch``.

    Accumulation is planned with the whole batch in memory, as the data loader hands it over:
    the step forwards micro-batches, but the batch's pixels are live throughout.

    ``build()`` returns a fresh model: ``GDClassifier`` / ``GDExtendedClassifier`` for full
    images, or for ``downscale=True`` a callable ``build(size)`` returning the model for inputs
    of ``size`` px (e.g. ``lambda s: DownscaledGDClassifier(name, c, image_size, input_size=s)``).
    """
    budget = parse_size(budget)
    device = torch.device(device)
    if max_batch < 1 or batch < 1:
        raise ConfigError(f"the largest batch must be at least 1, got {min(max_batch, batch)}")
    name = "GD, accumulated" if accumulate else "downscaled GD" if downscale else "GD"
    invalid: set[int] = set()

    def run(
        model: torch.nn.Module, batch: int, size: int, micro: int | None = None
    ) -> MemoryPlan | None:
        if micro is not None:
            model.micro_batch = micro
        try:  # the images are always full size; downscaled GD resizes them itself
            static, report = _measure_step(model, batch, in_chans, (image_size, image_size), device)
        except ConfigError:  # e.g. BatchNorm in the head cannot train on one image
            invalid.add(micro or batch)
            return None
        plan = MemoryPlan(
            name, batch, budget, static, report,
            input_size=size if downscale else None, micro_batch=micro,
        )  # fmt: skip
        if log:
            log(
                f"  tried {name} batch {batch}"
                + (f", input {size} px" if downscale else "")
                + (f", micro-batch {micro}" if micro is not None else "")
                + f": {plan.peak_bytes / 2**20:.1f} MiB"
            )
        return plan if plan.peak_bytes <= budget else None

    Trial = Callable[[int], MemoryPlan | None]

    def from_smallest(fits: Trial, limit: int) -> MemoryPlan | None:
        best = _largest(fits, 1, limit)
        if best is None and 1 in invalid and limit >= 2:
            # One image cannot train this model (not a memory limit): search from two.
            best = _largest(fits, 2, limit)
        return best

    if accumulate:
        best = from_smallest(lambda m: run(build(), batch, image_size, m), batch)
    elif downscale:
        best = _largest(lambda m: run(build(32 * m), batch, 32 * m), 1, max(1, image_size // 32))
    else:
        best = from_smallest(lambda b: run(build(), b, image_size), max_batch)
    if best is None and 1 in invalid and not downscale and (batch if accumulate else max_batch) < 2:
        raise ConfigError(
            f"a batch of at most 1 cannot train {name}: one image cannot train it (BatchNorm "
            "over a single value); allow a batch of 2"
        )
    if best is None:
        raise ConfigError(
            f"memory budget {budget / 2**20:.1f} MiB is too small for {name} at "
            f"{image_size} px even with the smallest batch" + (" and input" if downscale else "")
        )
    return best


@dataclass(frozen=True)
class ClassifierPlan:
    """What :func:`plan_classifier` chose.

    ``classifier_args`` are the planned constructor arguments of the classifier (e.g. ``loop``,
    ``fill_chunk``, ``input_size``, ``micro_batch``); ``batch_planned`` says whether the batch
    size was chosen or kept as asked. The application maps them onto its config keys.
    """

    budget_bytes: int
    batch_size: int
    predicted_peak_bytes: int
    description: str
    classifier_args: dict[str, Any]
    batch_planned: bool


def plan_classifier(
    classifier: Classifier,
    budget: int | str,
    batch_size: int,
    *,
    rebuild: Callable[[int], Classifier] | None = None,
    lazy: bool = False,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = None,
) -> tuple[Classifier, ClassifierPlan]:
    """Plan any classifier under ``budget``, with ``batch_size`` as the largest batch wanted.

    PatchGD: the largest batch, then k and fill chunk (:func:`plan_patchgd`); ``classifier`` is
    reconfigured in place. GD and GD-extended: the largest batch. GD with gradient accumulation
    (``micro_batch`` set): the batch stays ``batch_size`` and the micro-batch becomes the
    largest that fits, set in place. Downscaled GD: the largest
    input size at ``batch_size``, built by ``rebuild(size)``; the returned classifier is then a
    new one, with the given one's weights where their shapes allow. ``lazy``: PatchGD's images are
    read patch by patch from disk.
    """
    budget = parse_size(budget)
    device = torch.device(device)
    if classifier.reads_patches:  # PatchGD: the batch, then k and the fill chunk
        patchgd = cast(PatchGDClassifier, classifier)  # the one model that reads patches
        plan = plan_patchgd(
            patchgd, budget, device=device, max_batch=batch_size, lazy=lazy, log=log
        )
        loop = replace(patchgd.loop_config, patches_per_iteration=plan.patches_per_iteration)
        patchgd.configure_loop(loop, fill_chunk=plan.fill_chunk)
        args: dict[str, Any] = {"loop": asdict(loop), "fill_chunk": plan.fill_chunk}
        batch, batch_planned = plan.batch_size, True
        peak, text = plan.peak_bytes, str(plan)
    else:
        size = _source_side(classifier)
        in_chans = classifier.in_chans
        if classifier.plans_input_size:
            if rebuild is None:
                raise ConfigError("planning downscaled GD needs rebuild(input_size)")
            base = plan_gd(
                rebuild,
                size,
                budget,
                in_chans=in_chans,
                device=device,
                downscale=True,
                batch=batch_size,
                log=log,
            )
            if base.input_size != classifier.input_size[0]:
                resized = rebuild(base.input_size)
                # CNN weights do not depend on the input size: keep the ones already initialised,
                # so the run equals one configured with this input_size from the start.
                # Size-dependent weights (position embeddings) keep their new initialisation.
                with contextlib.suppress(RuntimeError):
                    resized.load_state_dict(classifier.state_dict())
                classifier = resized
            args, batch, batch_planned = {"input_size": base.input_size}, batch_size, False
        else:
            accumulate = classifier.micro_batch is not None
            base = plan_gd(
                lambda: copy.deepcopy(classifier),
                size,
                budget,
                in_chans=in_chans,
                device=device,
                max_batch=batch_size,
                batch=batch_size,
                accumulate=accumulate,
                log=log,
            )
            batch = base.batch_size
            if base.micro_batch is not None:
                classifier.micro_batch = base.micro_batch
                args, batch_planned = {"micro_batch": base.micro_batch}, False
            else:
                args, batch_planned = {}, True
        peak, text = base.peak_bytes, str(base)
    return classifier, ClassifierPlan(budget, batch, peak, text, args, batch_planned)


def _source_side(classifier: Classifier) -> int:
    size = classifier.image_size
    if size[0] != size[1]:
        raise ConfigError(f"the memory planner plans square images; the model takes {size}")
    return int(size[0])


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
            f"memory budget {budget / 2**30:.2f} GiB is more than {device}'s "
            f"{total / 2**30:.2f} GiB"
        )
    fraction = budget / total
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction
