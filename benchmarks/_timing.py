"""What the speed benchmarks share: timing a call, timing calls interleaved, timing a module's
forward calls, the number format, and the options of the scripts that time PatchGD against GD."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
from torch import nn

K = TypeVar("K")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call, with the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved(
    calls: Mapping[K, Callable[[], object]],
    repeats: int,
    device: torch.device,
    after_repeat: Callable[[int, dict[K, list[float]]], None] | None = None,
) -> dict[K, list[float]]:
    """Seconds of each call, ``repeats`` times each, after one untimed warm-up call each.

    Repeats are interleaved, in the calls' order and then reversed, so a drift of the machine
    (heat, another process) falls on every call alike. ``after_repeat(r, seconds)`` runs after
    repeat r (e.g. to report progress).
    """
    for call in calls.values():  # warm-up: allocator, oneDNN primitives, optimizer state
        call()
    seconds: dict[K, list[float]] = {key: [] for key in calls}
    order = list(calls)
    for r in range(repeats):
        for key in order if r % 2 == 0 else reversed(order):
            seconds[key].append(timed(calls[key], device))
        if after_repeat is not None:
            after_repeat(r, seconds)
    return seconds


class ForwardClock:
    """Sums the time inside a module's forward calls, apart for calls with and without autograd.

    For PatchGD's encoder the calls without autograd are the Z-fill and those with it are the
    inner iterations' re-encoding. On CUDA the hooks record events instead of synchronizing, so
    the timed step is not slowed; read :meth:`take` only after it has been synchronized.
    """

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[bool, object, object]] = []
        self._start: tuple[bool, object] = (False, None)
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _now(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _pre(self, module: nn.Module, args: object) -> None:
        self._start = (torch.is_grad_enabled(), self._now())

    def _post(self, module: nn.Module, args: object, output: object) -> None:
        grad, start = self._start
        self.spans.append((grad, start, self._now()))

    def take(self) -> tuple[float, float]:
        """Seconds inside forward ``(without autograd, with autograd)`` since the last call."""
        totals = [0.0, 0.0]
        for grad, a, b in self.spans:
            if self.cuda:
                totals[grad] += a.elapsed_time(b) / 1000  # type: ignore[attr-defined]
            else:
                totals[grad] += b - a  # type: ignore[operator]
        self.spans.clear()
        return totals[0], totals[1]


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def num(x: float | None) -> str:
    """About three significant digits, without scientific notation for the usual ranges."""
    if x is None:
        return "–"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def add_speed_options(
    parser: argparse.ArgumentParser, batch: int, repeats: int, quick_repeats: int
) -> None:
    """The options of the scripts that time PatchGD against GD model by model."""
    parser.add_argument("--backbone", nargs="+", help="timm names (default resnet50)")
    parser.add_argument("--sizes", type=int, nargs="+", help="image sides in px")
    parser.add_argument("--patch-size", type=int, help="patch side (default 256; quick 128)")
    parser.add_argument("--batch", type=int, default=batch, help=f"images (default {batch})")
    parser.add_argument(
        "--repeats",
        type=int,
        help=f"timed calls per model (default {repeats}; --quick {quick_repeats})",
    )
    parser.add_argument(
        "--fill-chunk",
        type=int,
        help="patches per encoder call in the Z-fill (default: the library's for the device)",
    )
    parser.add_argument("--latent-dim", type=int, default=256)
    parser.add_argument(
        "--channels-last", action="store_true", help="both models and the batch in channels-last"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's; quick: 1, steady on a busy machine)",
    )


def speed_defaults(
    args: argparse.Namespace, sizes: list[int], repeats: int, quick_repeats: int
) -> argparse.Namespace:
    """Fill in what :func:`add_speed_options` left unset; ``--quick``: MobileNetV2, 256 and
    512 px, 128 px patches, one thread."""
    quick = args.quick
    args.backbone = args.backbone or (["mobilenetv2_100"] if quick else ["resnet50"])
    args.sizes = sorted(args.sizes or ([256, 512] if quick else sizes))
    args.patch_size = args.patch_size or (128 if quick else 256)
    args.threads = args.threads or (1 if quick else None)
    args.repeats = args.repeats or (quick_repeats if quick else repeats)
    return args
