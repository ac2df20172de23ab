"""Patch Gradient Descent: Algorithm 2 (Z-filling) and Algorithm 1 (one training iteration).

Read this module beside the paper. Symbols: B images per batch, a grid of m × n patches
(``grid.rows × grid.cols``), D latent channels, k patches per inner iteration, ζ inner
iterations, ε inner iterations per optimizer step. Pure PyTorch: a training framework plugs in
through :class:`StepHooks` (backward, optimizer step, mixed precision, gradient sync).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batchnorm import batch_statistics, keep_modes
from .errors import ConfigError
from .grid import PatchGrid
from .head import read_head
from .patches import PatchProvider, as_patches, extents_of
from .sampler import PatchSampler, SamplePlan, visit_budget

FillNorm = Literal["batch", "running"]

#: Old names of :class:`InnerLoopConfig` fields, accepted with a warning for one release.
DEPRECATED_LOOP_NAMES = {
    "patches_per_step": "patches_per_iteration",
    "inner_steps": "inner_iterations",
}


def check_fill_norm(norm: str) -> None:
    """Raise :class:`ConfigError` unless ``norm`` is a :data:`FillNorm`."""
    if norm not in ("batch", "running"):
        raise ConfigError(f"fill_norm must be 'batch' or 'running', got {norm!r}")


# --------------------------------------------------------------------------------------------
# Configuration of the inner loop
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InnerLoopConfig:
    """How one outer step (one batch) is split into inner iterations.

    Give the patches per inner iteration either as a count (``patches_per_iteration``, k) or as a
    fraction of the grid (``sampling_fraction``, k = ceil(fraction · m·n)); the paper's best
    PANDA setting is 10 %.

    Args:
        patches_per_iteration: k, patches re-encoded with gradients per image per inner iteration.
        sampling_fraction: k as a fraction of the grid, in (0, 1]; used when k is not given.
        max_visit_fraction: cap on the fraction of an image's patches visited per outer step.
        inner_iterations: ζ; by default just enough to visit the capped set once:
            ``ceil(ceil(max_visit_fraction · m·n) / k)``.
        accumulation: ε, inner iterations whose gradients are averaged into one optimizer step;
            by default ε = ζ (one step per batch: exact gradient descent, see :func:`train_step`).
        patches_per_step, inner_steps: deprecated names of ``patches_per_iteration`` and
            ``inner_iterations`` (a warning; configs written with them still load).
    """

    patches_per_iteration: int | None = None
    sampling_fraction: float | None = 0.1
    max_visit_fraction: float = 1.0
    inner_iterations: int | None = None
    accumulation: int | None = None
    patches_per_step: int | None = None  # deprecated: patches_per_iteration
    inner_steps: int | None = None  # deprecated: inner_iterations

    def __post_init__(self) -> None:
        for old, new in DEPRECATED_LOOP_NAMES.items():
            value = getattr(self, old)
            if value is None:
                continue
            warnings.warn(
                f"InnerLoopConfig({old}=...) is deprecated; use {new}", FutureWarning, stacklevel=3
            )
            if getattr(self, new) is not None and getattr(self, new) != value:
                raise ConfigError(f"give {new} or its deprecated name {old}, not both")
            object.__setattr__(self, new, value)
            object.__setattr__(self, old, None)

    def resolve(self, num_patches: int, num_candidates: int | None = None) -> ResolvedLoop:
        """Fill in the defaults for a grid of ``num_patches`` and check every value.

        ``num_candidates``, the most candidate positions any image of the batch has (e.g. its
        tissue patches), sizes the default ζ so one walk visits them once; k stays relative to
        the grid, so memory per inner iteration does not depend on the batch. A given ε larger
        than such a shortened ζ is lowered to it.
        """
        n = num_patches
        f = self.sampling_fraction
        if f is not None and not 0.0 < f <= 1.0:  # checked even when k is given, never ignored
            raise ConfigError(f"sampling_fraction must be in (0, 1], got {f}")
        if self.patches_per_iteration is not None:
            k = self.patches_per_iteration
            if not 1 <= k <= n:
                raise ConfigError(
                    f"patches_per_iteration (k={k}) must be between 1 and the grid's {n} patches"
                )
        elif f is not None:
            k = max(1, math.ceil(f * n - 1e-9))
        else:
            raise ConfigError("give patches_per_iteration or sampling_fraction")
        cap = self.max_visit_fraction
        if not 0.0 < cap <= 1.0:
            raise ConfigError(f"max_visit_fraction must be in (0, 1], got {cap}")
        zeta = self.inner_iterations
        if zeta is None:
            visits = visit_budget(n if num_candidates is None else num_candidates, cap)
            zeta = max(1, math.ceil(visits / k))
        elif zeta < 1:
            raise ConfigError(f"inner_iterations (ζ={zeta}) must be at least 1")
        eps = zeta if self.accumulation is None else self.accumulation
        if eps < 1:
            raise ConfigError(f"accumulation (ε={eps}) must be at least 1")
        if num_candidates is not None and self.inner_iterations is None:
            eps = min(eps, zeta)
        if eps > zeta:
            raise ConfigError(f"accumulation (ε={eps}) is larger than inner_iterations (ζ={zeta})")
        return ResolvedLoop(
            patches_per_iteration=k, inner_iterations=zeta, accumulation=eps, max_visit_fraction=cap
        )


@dataclass(frozen=True)
class ResolvedLoop:
    """An :class:`InnerLoopConfig` with every value fixed for one grid."""

    patches_per_iteration: int
    inner_iterations: int
    accumulation: int
    max_visit_fraction: float

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps per outer step: ceil(ζ / ε), never zero."""
        return len(accumulation_groups(self.inner_iterations, self.accumulation))

    def __getattr__(self, name: str) -> int:
        return deprecated_alias(self, name, DEPRECATED_LOOP_NAMES)


def deprecated_alias(obj: object, name: str, aliases: dict[str, str]) -> Any:
    """``obj``'s attribute ``aliases[name]``, with a warning (a ``__getattr__`` for old names)."""
    if name not in aliases:
        raise AttributeError(f"{type(obj).__name__!r} object has no attribute {name!r}")
    warnings.warn(
        f"{type(obj).__name__}.{name} is deprecated; use {aliases[name]}",
        FutureWarning,
        stacklevel=3,
    )
    return getattr(obj, aliases[name])


def accumulation_groups(inner_iterations: int, accumulation: int) -> list[range]:
    """Inner iterations grouped per optimizer step: every ε, plus the remainder (if any).

    ``accumulation_groups(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]``.
    """
    return [
        range(s, min(s + accumulation, inner_iterations))
        for s in range(0, inner_iterations, accumulation)
    ]


# --------------------------------------------------------------------------------------------
# Algorithm 2: filling Z
# --------------------------------------------------------------------------------------------
@contextmanager
def fill_mode(encoder: nn.Module, norm: FillNorm = "running") -> Iterator[None]:
    """Put ``encoder`` in the state Z-filling needs, and restore it afterwards.

    Dropout is off, so Z is a deterministic function of the weights. BatchNorm never updates its
    running statistics during a fill: the fill is not a training step, and it would otherwise
    count every patch of every image ζ-fold into the statistics. How it normalises:

    - ``"running"`` (default): the running statistics (plain eval mode), the normalisation
      evaluation and inference use, so the head trains on the Z that inference fills. Measured
      against ``"batch"``: higher test accuracy on FineDetail from random initialisation in
      every seed, as good from pretrained weights, and a faster fill (docs/reproduction.md).
    - ``"batch"``: batch statistics of the fill chunk, the normalisation the re-encoded
      patches get in the inner iterations; an embedding then depends on the chunk it shares.

    Under ``"batch"`` only BatchNorm layers in training mode are switched to batch statistics:
    a layer the user froze (put in eval mode) keeps its running statistics, in the fill as in
    the inner iterations. An encoder in eval mode (validation, inference) uses running statistics
    everywhere.
    """
    check_fill_norm(norm)
    if norm == "batch":
        with batch_statistics(encoder):
            yield
        return
    with keep_modes(encoder):
        encoder.eval()
        yield


def fill_mask(skip: Tensor | None, candidates: Tensor | None) -> Tensor | None:
    """The ``(B, rows·cols)`` boolean mask, on the CPU, of the patches :func:`fill_z` encodes:
    the ``candidates`` (every patch without them) less the ``skip`` ones; ``None``: every patch.
    """
    encode = None if candidates is None else candidates.to(device="cpu", dtype=torch.bool)
    if skip is not None:
        skip = skip.to(device="cpu", dtype=torch.bool)
        encode = ~skip if encode is None else encode & ~skip
    return encode


def fill_z(
    encoder: nn.Module,
    images: Tensor | PatchProvider,
    grid: PatchGrid,
    chunk: int = 256,
    norm: FillNorm | None = "running",
    skip: Tensor | None = None,
    dtype: torch.dtype | None = None,
    candidates: Tensor | None = None,
) -> Tensor:
    """Algorithm 2: encode every patch of every image, without gradients, into Z.

    Patches of all images are encoded together in chunks of at most ``chunk`` patches, so memory
    is bounded by the chunk, not by the image. Chunks are balanced (sizes differ by at most one),
    so no chunk is a lone patch that batch statistics cannot normalise.

    Args:
        encoder: maps ``(n, C, p, p)`` patches to ``(n, D)`` embeddings.
        images: a ``(B, C, H, W)`` batch of the size ``grid`` was built for, or a
            :class:`~patchgd.patches.PatchProvider` (e.g. images read lazily from disk).
        grid: the patch geometry.
        chunk: largest number of patches encoded at once (the fill's memory knob).
        norm: how BatchNorm normalises during the fill; see :func:`fill_mode`. ``None``
            leaves the encoder's modes as the caller set them (BatchNorm recalibration).
        skip: optional ``(B, rows·cols)`` boolean mask of patches not to encode, whose entries
            of Z are left zero: patches the caller overwrites before Z is read. At least one
            patch must be encoded.
        dtype: run the encoder under autocast to this dtype (``torch.bfloat16``) and store Z
            in float32; ``None`` runs it as the caller's context says.
        candidates: optional ``(B, rows·cols)`` boolean mask of the patches worth encoding (e.g.
            tissue). Only these are encoded; every other entry of an image's Z is its
            *background embedding*, the encoder's output on one blank patch of the image's
            padding colour (:meth:`~patchgd.patches.PatchProvider.blank`). The blank patches
            are encoded with the first chunk (so under ``"batch"`` norm they are normalised
            as a background patch of a full fill would be), which makes that call B patches
            larger.

    Returns:
        Z of shape ``(B, D, rows, cols)``; ``Z[b, :, r, c]`` encodes patch ``(r, c)`` of image b.
    """
    patches = as_patches(images, grid)
    b, n = patches.batch_size, grid.num_patches
    if candidates is not None and tuple(candidates.shape) != (b, n):
        raise ConfigError(f"candidates must have shape {(b, n)}, got {tuple(candidates.shape)}")
    encode = fill_mask(skip, candidates)
    wanted = None if encode is None else encode.flatten().nonzero().squeeze(1)
    blanks = None if candidates is None else patches.blank(torch.arange(b))
    # One autocast region for the whole fill: the weights are cast once, not once per chunk.
    cast = (
        nullcontext()
        if dtype is None
        else torch.autocast(next(encoder.parameters()).device.type, dtype=dtype)
    )
    z_flat: Tensor | None = None
    modes = nullcontext() if norm is None else fill_mode(encoder, norm)
    with torch.no_grad(), modes, cast:
        parts = patches.chunks(chunk, wanted)
        if blanks is not None and not len(wanted):  # no candidate anywhere: Z is background
            parts = iter([(wanted, blanks[:0])])
        for ids, part in parts:
            first_with_blanks = z_flat is None and blanks is not None
            emb = encoder(torch.cat([blanks, part]) if first_with_blanks else part)
            if dtype is not None:
                emb = emb.float()
            if first_with_blanks:  # every entry starts as its image's background
                background, emb = emb[:b], emb[b:]
                z_flat = background.repeat_interleave(n, dim=0)
            elif z_flat is None:
                make = emb.new_empty if skip is None else emb.new_zeros
                z_flat = make(b * n, emb.shape[1])
            z_flat[ids.to(emb.device)] = emb
    if z_flat is None:
        raise ConfigError("fill_z: skip leaves no patch to encode")
    return z_flat.view(b, grid.rows, grid.cols, -1).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# Algorithm 1: one training iteration
# --------------------------------------------------------------------------------------------
@dataclass
class StepHooks:
    """Where a training framework plugs into :func:`train_step`; every field has a plain default.

    Attributes:
        backward: runs the backward pass of a (scaled) loss, e.g. a GradScaler's or Lightning's
            ``manual_backward``. Default: ``loss.backward()``.
        optimizer_step: applies and clears the accumulated gradients, e.g. with a scaler or a
            learning-rate scheduler that advances per optimizer step. Default:
            ``optimizer.step(); optimizer.zero_grad(set_to_none=True)``.
        autocast: context for forward passes (mixed precision). Default: none.
        grad_sync: ``grad_sync(sync)`` is the context around one inner iteration; ``sync`` is
            True only for the last iteration before an optimizer step, so a DDP wrapper can skip
            all-reducing gradients that are still accumulating (``no_sync``). Default: none.

    With plain DDP, wrap the encoder and the head each in ``DistributedDataParallel`` and pass
    the wrapped modules to :func:`train_step`: the step calls them directly, so a wrapper around
    a parent module would never see the forward passes. ``grad_sync`` then enters both
    wrappers' ``no_sync()`` when ``sync`` is False.
    """

    backward: Callable[[Tensor], None] = Tensor.backward
    optimizer_step: Callable[[], None] | None = None
    autocast: Callable[[], AbstractContextManager[object]] = nullcontext
    grad_sync: Callable[[bool], AbstractContextManager[object]] = field(
        default=lambda sync: nullcontext()
    )


@dataclass
class StepResult:
    """What one outer step did.

    Attributes:
        losses: the unscaled loss of each inner iteration (head on the partly updated Z).
        logits: detached logits of the last inner iteration, for training metrics.
        optimizer_steps: how many times the optimizer stepped (ceil(ζ / ε)).
        plan: the sampled positions, one ``(B, k_j)`` tensor per inner iteration (-1 = none).
        z: Z after the step, detached: the fill's embeddings, and the newest embedding of every
            patch the step re-encoded (what :class:`~patchgd.latent_cache.LatentCache` keeps).
        patches_encoded: image patches the encoder read, in the fill and the inner iterations
            (blank patches aside); ``None`` for models that do not read patches.
    """

    losses: list[float]
    logits: Tensor
    optimizer_steps: int
    plan: SamplePlan
    z: Tensor | None = None
    patches_encoded: int | None = None

    @property
    def loss(self) -> float:
        """Mean loss over the inner iterations."""
        return sum(self.losses) / len(self.losses)


def train_step(
    encoder: nn.Module,
    head: nn.Module,
    grid: PatchGrid,
    images: Tensor | PatchProvider,
    targets: Tensor,
    optimizer: torch.optim.Optimizer,
    loop: InnerLoopConfig | ResolvedLoop,
    sampler: PatchSampler,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    fill_chunk: int = 256,
    fill_norm: FillNorm = "running",
    fill_dtype: torch.dtype | None = None,
    candidates: Tensor | None = None,
    hooks: StepHooks | None = None,
    z: Tensor | None = None,
) -> StepResult:
    """Algorithm 1: one PatchGD iteration on a batch, with ceil(ζ/ε) optimizer steps.

    1. Fill Z for every image with the current encoder, without gradients (Algorithm 2);
       with ``candidates``, only candidate patches are encoded and the rest of Z holds each
       image's background embedding (:func:`fill_z`), and only candidates are sampled.
    2. For each inner iteration j = 1..ζ: sample k patches per image; re-encode them with
       gradients; write them into a detached copy of Z, so the graph spans only these k·B
       patches; run the head on all of Z (with ``candidates``, a pooling
       :class:`~patchgd.head.LatentHead` reads only the candidate positions); back-propagate
       the loss scaled by 1/|group|.
       Then keep the new embeddings in Z (detached) for the following iterations.
    3. After every ε inner iterations, and after the last one, step the optimizer. The loss of
       each iteration is divided by the size of its group (ε, or the remainder ζ mod ε for the
       last group), so every step applies the mean gradient of its iterations.

    Scaling (tested): with a backbone free of BatchNorm and dropout, ε = ζ and every patch visited
    once, the accumulated head gradient equals the full-image gradient exactly and the encoder
    gradient equals the full-image gradient divided by ε, as in the paper's Algorithm 1 (each
    patch contributes through one inner iteration, each of which is divided by ε).

    The optimizer's gradients are cleared on entry. Set the modules' train/eval modes before
    calling (normally ``train()``); BatchNorm during the fill follows ``fill_norm``, its
    precision ``fill_dtype`` (see :func:`fill_z`). A given ``z`` (``(B, D, rows, cols)``, e.g.
    the Z a previous step on these images left, :attr:`StepResult.z`) replaces step 1: the step
    starts from a copy of it and fills nothing.
    """
    hooks = hooks or StepHooks()
    step = hooks.optimizer_step or plain_optimizer_step(optimizer)
    patches = as_patches(images, grid)
    batch = patches.batch_size
    if targets.shape[0] != batch:
        raise ConfigError(f"got {batch} images but {targets.shape[0]} targets")
    if isinstance(loop, InnerLoopConfig):
        most = None if candidates is None else int(candidates.sum(dim=1).max())
        loop = loop.resolve(grid.num_patches, most)
    n = grid.num_patches
    plan = sampler.plan(
        batch,
        n,
        loop.patches_per_iteration,
        loop.inner_iterations,
        loop.max_visit_fraction,
        candidates,
    )
    check_plan(plan, batch, n, loop)

    optimizer.zero_grad(set_to_none=True)
    encoded = sum(int((p >= 0).sum()) for p in plan)
    if z is not None:  # Z reuse: the caller's Z, never written in place
        if z.shape[0] != batch or z.shape[2:] != grid.shape:
            raise ConfigError(
                f"z has shape {tuple(z.shape)}, expected (B={batch}, D, {grid.shape})"
            )
        z = z.detach().clone()
    else:
        skip = first_visits(plan, n, candidates)
        filled = fill_mask(skip, candidates)
        encoded += batch * n if filled is None else int(filled.sum())
        with hooks.autocast():  # Algorithm 2, less what the first inner iteration re-encodes
            z = fill_z(encoder, patches, grid, fill_chunk, fill_norm, skip, fill_dtype, candidates)

    valid = valid_positions(candidates, grid, z.device)
    extent = extents_of(patches)
    losses: list[Tensor] = []
    out = torch.empty(0)
    for group in accumulation_groups(loop.inner_iterations, loop.accumulation):
        for j in group:
            image_idx, slot = (plan[j] >= 0).nonzero(as_tuple=True)
            pos = plan[j][image_idx, slot]
            # Index Z on its own device; the provider moves indices wherever its pixels live.
            zi, zr, zc = (t.to(z.device) for t in (image_idx, pos // grid.cols, pos % grid.cols))
            with hooks.grad_sync(j == group[-1]):
                with hooks.autocast():
                    z_j = z.clone()  # Z holds no graph; the copy gets one
                    if pos.numel():  # an image without candidates may have nothing to visit
                        emb = _encode(encoder, patches.gather(image_idx, pos))
                        z_j[zi, :, zr, zc] = emb.to(z_j.dtype)  # the graph: active patches only
                    out = read_head(head, z_j, valid, extent)
                    loss = loss_fn(out, targets)
                hooks.backward(loss / len(group))
            if pos.numel():
                z[zi, :, zr, zc] = emb.detach().to(z.dtype)
            losses.append(loss.detach())
        step()
        # Autocast keeps each weight's low-precision copy until its region ends. A framework
        # that wraps the whole outer step in one region (Lightning's mixed precision) would
        # otherwise run the next inner iterations on the weights from before this step.
        torch.clear_autocast_cache()
    return StepResult(
        losses=torch.stack(losses).float().tolist(),  # one host sync per outer step
        logits=out.detach(),
        optimizer_steps=loop.optimizer_steps,
        plan=plan,
        z=z,
        patches_encoded=encoded,
    )


def first_visits(
    plan: SamplePlan, num_patches: int, candidates: Tensor | None = None
) -> Tensor | None:
    """The ``(B, num_patches)`` mask of the patches the first inner iteration re-encodes.

    The fill need not encode them: the first iteration writes their new embeddings into Z before
    the head reads it. ``None`` when that would leave the fill nothing to encode (the first
    iteration visits every patch, or every candidate); the fill then encodes all, as Algorithm 2
    states, so its chunks never hold the blank patches alone.
    """
    first = plan[0]
    mask = torch.zeros(first.shape[0], num_patches, dtype=torch.bool, device=first.device)
    image_idx, slot = (first >= 0).nonzero(as_tuple=True)
    mask[image_idx, first[image_idx, slot]] = True
    left = ~mask if candidates is None else candidates.to(mask.device, torch.bool) & ~mask
    return mask if bool(left.any()) else None


def check_plan(plan: SamplePlan, batch: int, num_patches: int, loop: ResolvedLoop) -> None:
    """Raise :class:`ValueError` unless ``plan`` is a valid plan for this batch and loop.

    Valid: ``inner_iterations`` tensors of shape ``(batch, k_j)`` with ``k_j <= k``, positions in
    ``[-1, num_patches)``, and no position twice in one image's row.
    """
    if len(plan) != loop.inner_iterations:
        raise ValueError(
            f"the sampler gave {len(plan)} inner iterations, expected {loop.inner_iterations}"
        )
    for j, positions in enumerate(plan):
        if positions.dim() != 2 or positions.shape[0] != batch:
            raise ValueError(f"plan[{j}] has shape {tuple(positions.shape)}, expected ({batch}, k)")
        if positions.shape[1] > loop.patches_per_iteration:
            raise ValueError(
                f"plan[{j}] has {positions.shape[1]} > k={loop.patches_per_iteration} slots"
            )
        if positions.numel() and (positions.min() < -1 or positions.max() >= num_patches):
            raise ValueError(f"plan[{j}] holds positions outside [-1, {num_patches})")
        ordered = positions.sort(dim=1).values
        if ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any():
            raise ValueError(f"plan[{j}] visits a position twice in one image")


@torch.no_grad()
def infer(
    encoder: nn.Module,
    head: nn.Module,
    grid: PatchGrid,
    images: Tensor | PatchProvider,
    fill_chunk: int = 256,
    fill_dtype: torch.dtype | None = None,
    candidates: Tensor | None = None,
) -> Tensor:
    """Inference logits: fill Z and run the head once, both in eval mode.

    The modules are put in eval mode for the call (running BatchNorm statistics, no dropout)
    and restored afterwards, so calling it mid-training changes nothing. ``candidates`` as in
    :func:`fill_z`: pass the mask the model trained with.
    """
    patches = as_patches(images, grid)
    with keep_modes(encoder), keep_modes(head):
        encoder.eval()
        head.eval()
        z = fill_z(
            encoder, patches, grid, fill_chunk, "running", dtype=fill_dtype, candidates=candidates
        )
        valid = valid_positions(candidates, grid, z.device)
        return read_head(head, z, valid, extents_of(patches))


def valid_positions(
    candidates: Tensor | None, grid: PatchGrid, device: torch.device
) -> Tensor | None:
    """``candidates`` ``(B, rows·cols)`` as the head's validity mask ``(B, rows, cols)``."""
    if candidates is None:
        return None
    return candidates.to(device=device, dtype=torch.bool).reshape(-1, *grid.shape)


def gd_train_step(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    hooks: StepHooks | None = None,
    micro_batch: int | None = None,
) -> StepResult:
    """Plain gradient descent: forward the batch, backward, one optimizer step.

    With ``micro_batch``, the batch goes through in slices of at most that many images, each
    loss weighted by its share of the batch, so that with a mean-reduced ``loss_fn`` the
    accumulated gradient and the reported loss are the whole batch's (gradient accumulation).
    """
    hooks = hooks or StepHooks()
    optimizer.zero_grad(set_to_none=True)
    size = len(images)
    step = micro_batch or size
    slices = list(zip(images.split(step), targets.split(step), strict=True))
    total, logits = 0.0, []
    for i, (part, part_targets) in enumerate(slices):
        with hooks.grad_sync(i == len(slices) - 1):
            with hooks.autocast():
                out = model(part)
                loss = loss_fn(out, part_targets) * (len(part) / size)
            hooks.backward(loss)
        total += float(loss.detach())
        logits.append(out.detach())
    (hooks.optimizer_step or plain_optimizer_step(optimizer))()
    torch.clear_autocast_cache()  # an enclosing autocast region would keep the old weights' copies
    return StepResult(losses=[total], logits=torch.cat(logits), optimizer_steps=1, plan=[])


def plain_optimizer_step(optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """The default optimizer step: ``optimizer.step()`` then ``zero_grad(set_to_none=True)``."""

    def step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _encode(encoder: nn.Module, patches: Tensor) -> Tensor:
    try:
        return encoder(patches)
    except ValueError as err:
        if "more than 1 value per channel" not in str(err):
            raise
        raise ConfigError(
            f"the encoder's BatchNorm cannot train on {patches.shape[0]} patch(es) in one inner "
            "iteration; raise patches_per_iteration or the batch size, or use fill_norm='running' "
            "with the BatchNorm layers frozen (eval mode)"
        ) from err
