"""What the speed benchmarks share: timing a call, timing calls interleaved, timing a module's
forward calls, and the report's environment line and number format."""

from __future__ import annotations

import os
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


def environment_line() -> str:
    """Environment variables that change CPU speed (threads, spinning, allocator), if set."""
    keys = sorted(
        k
        for k in os.environ
        if k.startswith(("OMP_", "MKL_", "KMP_", "MALLOC_", "DNNL_", "ONEDNN_"))
        or k == "LD_PRELOAD"
    )
    if not keys:
        return "- environment: no OMP_*, MALLOC_* or LD_PRELOAD settings (glibc malloc defaults)"
    return "- environment: " + ", ".join(f"`{k}={os.environ[k]}`" for k in keys)


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
