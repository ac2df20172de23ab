"""Strided convolutions that avoid a oneDNN bf16 defect on a side of one position.

oneDNN's bf16 backward-weights kernels for strided convolutions (CPUs with AVX512-BF16 or
AMX, where PyTorch's bf16 convolutions run on them) leave unwritten the weights of a side along
which the input has one position: their gradient is whatever that memory held, NaN or 1e29, and
bf16-mixed training turns NaN within a step or two. Small latent grids reduced by the head's
stride-2 layers, and backbones on small patches, meet that case.

Along such a side, with "same" padding (``2·padding = dilation·(kernel − 1)``), the input has
one window whatever the stride, so stride 1 gives the same single output. :class:`StrideSafeConv2d`
takes stride 1 there: the same function and parameters, a kernel without the defect.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F


class StrideSafeConv2d(nn.Conv2d):
    """``nn.Conv2d`` that takes stride 1 along a side of one position with "same" padding."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        stride = self._stride_for(input.shape[-2:])
        if stride == self.stride:
            return super()._conv_forward(input, weight, bias)
        return F.conv2d(input, weight, bias, stride, self.padding, self.dilation, self.groups)

    def _stride_for(self, sides: tuple[int, ...]) -> tuple[int, ...]:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return self.stride
        return tuple(
            1 if side == 1 and 2 * pad == dil * (k - 1) else s
            for side, s, pad, dil, k in zip(
                sides, self.stride, self.padding, self.dilation, self.kernel_size, strict=True
            )
        )


def use_stride_safe_convolutions(module: nn.Module) -> nn.Module:
    """Make every strided ``nn.Conv2d`` in ``module`` a :class:`StrideSafeConv2d`, in place.

    Only modules whose type is exactly ``nn.Conv2d`` change (subclasses with their own forward,
    such as timm's ``Conv2dSame``, are left alone); parameters and state dicts are untouched.
    """
    for child in module.modules():
        if type(child) is nn.Conv2d and child.stride != (1, 1):
            child.__class__ = StrideSafeConv2d
    return module
