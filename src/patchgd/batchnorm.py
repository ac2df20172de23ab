"""Train/eval modes and BatchNorm statistics: kept, switched to batch statistics, recalibrated.

:func:`batch_statistics` is the one mechanism by which BatchNorm normalises with batch
statistics without touching its running statistics: the Z-fill uses it
(:func:`patchgd.algorithm.fill_mode`), and so does recalibration.

Recalibration sets BatchNorm's running statistics to the current weights before evaluation.

In training, BatchNorm normalises with each batch's statistics and keeps an exponential moving
average of them (momentum 0.1) for eval mode. The average mixes statistics computed under
earlier weights. From random initialisation the weights move fast, the average lags, and in eval
mode every layer normalises with stale statistics. When the evidence is a small part of the
image (a few small objects on a large canvas), the stale offsets outweigh it and eval-mode
accuracy can fall to chance while the training loss falls: on FineDetail, GD at full resolution
scored 0.25 in eval mode and 0.97 after recalibration (``docs/finedetail.md``).

The remedy, known as precise BatchNorm (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021;
``torch.optim.swa_utils.update_bn`` does the same with averaged batch statistics), is to run a
few training batches through the model with the current weights and set every running mean and
variance to the statistics of all the inputs each layer saw. :class:`Recalibration` computes
them exactly (not as an average of per-batch statistics), so the result does not depend on how
the inputs were chunked. :meth:`patchgd.model.Classifier.recalibrate_batchnorm` applies it to a
whole classifier.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class _Moments:
    """Count, mean and sum of squared deviations per channel, merged batch by batch (Chan)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, x: Tensor) -> None:
        dims = [0, *range(2, x.dim())]
        n = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x.detach().float(), dim=dims, correction=0)
        mean, m2 = mean.double(), var.double() * n
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total


class Recalibration:
    """Exact statistics of every input the given BatchNorm layers see, written back on exit.

    While active, each layer still normalises with batch statistics (as in training), and a
    forward pre-hook accumulates the mean and variance of its input. On exit each layer that
    saw at least two values per channel gets ``running_mean`` = their mean and ``running_var``
    = their unbiased variance (PyTorch's convention); layers that saw nothing keep theirs.
    """

    def __init__(self, layers: list[_BatchNorm]) -> None:
        self.moments = {layer: _Moments() for layer in layers}

    @contextmanager
    def active(self) -> Iterator[None]:
        handles = [
            layer.register_forward_pre_hook(lambda m, args: self.moments[m].add(args[0]))
            for layer in self.moments
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        self._write()

    def _write(self) -> None:
        for layer, moments in self.moments.items():
            if moments.mean is None or moments.m2 is None or moments.count < 2:
                continue
            assert layer.running_mean is not None and layer.running_var is not None
            layer.running_mean.copy_(moments.mean)
            layer.running_var.copy_(moments.m2 / (moments.count - 1))


@contextmanager
def keep_modes(module: nn.Module) -> Iterator[None]:
    """Restore the train/eval mode of ``module`` and of each submodule on exit."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def trainable_batchnorms(module: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``module`` in training mode that keep running statistics.

    Layers in eval mode are frozen (``freeze_bn``, or frozen by the user): recalibration
    leaves them alone, as training does.
    """
    return [
        m
        for m in module.modules()
        if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
    ]


@contextmanager
def batch_statistics(module: nn.Module) -> Iterator[list[_BatchNorm]]:
    """Inside: ``module`` in eval mode (dropout off) except its trainable BatchNorm layers,
    which normalise with batch statistics and leave their running statistics untouched.

    Layers in eval mode on entry (frozen) keep normalising with their running statistics. Every
    mode is restored on exit. Yields the layers switched to batch statistics.
    """
    layers = trainable_batchnorms(module)
    with keep_modes(module):
        module.eval()
        for layer in layers:
            # In train mode without tracking, BatchNorm normalises with batch statistics and
            # leaves running_mean, running_var and num_batches_tracked untouched.
            layer.train()
            layer.track_running_stats = False
        try:
            yield layers
        finally:
            for layer in layers:
                layer.track_running_stats = True


@contextmanager
def recalibrating(module: nn.Module) -> Iterator[list[_BatchNorm]]:
    """Recalibrate ``module``'s trainable BatchNorm layers from the forward passes inside.

    Inside, as under :func:`batch_statistics` and without gradients; on exit the running
    statistics are set from everything the layers saw (:class:`Recalibration`) and every mode
    is restored. Yields the layers being recalibrated.
    """
    with batch_statistics(module) as layers, torch.no_grad(), Recalibration(layers).active():
        yield layers


__all__ = [
    "Recalibration",
    "batch_statistics",
    "keep_modes",
    "recalibrating",
    "trainable_batchnorms",
]
