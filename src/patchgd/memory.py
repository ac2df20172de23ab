"""One memory probe for a training or inference step, on the CPU and on CUDA.

:func:`measure` runs a callable and reports what it needed:

- ``tensor_bytes``: the peak of tensor memory allocated during the call, above what was live
  before it. On CUDA this is the caching allocator's peak (``torch.cuda.max_memory_allocated``).
  On the CPU, where PyTorch keeps no allocator statistics, a dispatch mode watches every
  tensor an operation creates and counts its storage until the storage is freed. This is
  allocations made in this thread (on the CPU the autograd engine runs backward in the calling
  thread too).
- ``rss_bytes``: the process's peak resident memory during the call (Linux: ``VmHWM`` after
  resetting it through ``/proc/self/clear_refs``), which includes the interpreter, libraries and
  allocator slack; ``None`` where the kernel does not offer the reset.

Memory that was live before the call (weights, optimizer state from earlier steps, the batch)
is not in ``tensor_bytes``; tensors the call creates and keeps (new optimizer state,
gradients) are.
"""

from __future__ import annotations

import resource
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

T = TypeVar("T")

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


@dataclass(frozen=True)
class MemoryReport:
    """What one call needed; see the module docstring for the exact meaning of each figure."""

    tensor_bytes: int
    rss_bytes: int | None
    device: str

    def __str__(self) -> str:
        rss = "n/a" if self.rss_bytes is None else f"{self.rss_bytes / 2**20:.1f} MiB"
        return f"peak tensors {self.tensor_bytes / 2**20:.1f} MiB ({self.device}), peak RSS {rss}"


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of CPU tensor storages created inside the mode while they are alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # An output that shares an input's storage (a view, an in-place result such as the
        # parameter Adam's addcdiv_ returns) allocated nothing: tracked already, or older
        # than the call.
        inputs = {
            t.untyped_storage()._cdata
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.device.type == "cpu"
        }
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                storage = tensor.untyped_storage()
                if storage._cdata not in inputs:
                    self._track(storage)
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata  # the C++ storage: views and in-place results share it
        if key in self._storages:
            return
        size = storage.nbytes()
        self._storages.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        # Storages keep one Python object for their lifetime, so this runs when the memory goes.
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        if key in self._storages:
            self._storages.discard(key)
            self.live -= size


def _reset_peak_rss() -> bool:
    try:
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current resident size
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes; ``None`` off Linux."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss() -> int | None:
    return _status_bytes("VmHWM")  # since the last _reset_peak_rss


def resident_bytes() -> int | None:
    """The process's resident memory now, in bytes (Linux; ``None`` elsewhere)."""
    return _status_bytes("VmRSS")


def process_tree_pss(pid: int) -> int | None:
    """Memory of process ``pid`` and all its descendants (e.g. DataLoader workers) now, in
    bytes: the sum of their proportional set sizes (Linux ``/proc/<pid>/smaps_rollup``), which
    counts pages that forked processes share once, not once per process. ``None`` off Linux."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command's name
        except (OSError, IndexError):
            continue  # the process ended meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, found, todo = 0, False, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            rollup = Path(f"/proc/{current}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in rollup.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
                found = True
    return total if found else None


def lifetime_peak_rss() -> int:
    """The process's peak resident memory since it started, in bytes (``ru_maxrss``, which
    resets never; :func:`measure` gives the peak of one call)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def measure(fn: Callable[[], T], device: str | torch.device = "cpu") -> tuple[T, MemoryReport]:
    """Run ``fn()`` and report its peak memory on ``device`` (``"cpu"`` or a CUDA device)."""
    device = torch.device(device)
    can_reset_rss = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        tensor_bytes = torch.cuda.max_memory_allocated(device) - before
    else:
        with LiveTensorBytes() as tracker:
            result = fn()
        tensor_bytes = tracker.peak
    rss = _peak_rss() if can_reset_rss else None
    return result, MemoryReport(tensor_bytes=tensor_bytes, rss_bytes=rss, device=str(device))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors an optimizer keeps between steps (Adam: two per parameter)."""
    storages = {
        value.untyped_storage()._cdata: value.untyped_storage().nbytes()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    }
    return sum(storages.values())


def live_training_bytes(
    model: torch.nn.Module,
    images: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """Bytes live before a training step: the weights, the batch and the optimizer's state.

    ``images`` counts only as a tensor: a provider of lazily read patches holds no pixels.
    """
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    batch = images.numel() * images.element_size() if isinstance(images, torch.Tensor) else 0
    state = 0 if optimizer is None else optimizer_state_bytes(optimizer)
    return weights + batch + state
