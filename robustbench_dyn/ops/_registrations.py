"""Fake (meta) and autograd registrations of the compiled ops, so they work under ``torch.compile``
and ``torch.autograd``. Called once, right after the library is loaded."""

from __future__ import annotations

import torch

_REGISTERED = False


def _ddf_fake(x, channel_filter, spatial_filter, kernel_size, dilation, stride, combine, head):
    torch._check(spatial_filter.shape[1] == head * kernel_size * kernel_size)
    return torch.empty((x.shape[0], x.shape[1], spatial_filter.shape[2], spatial_filter.shape[3]), dtype=x.dtype,
                       device=x.device, memory_format=_memory_format(x))


def _ddf_backward_fake(grad_out, x, channel_filter, spatial_filter, kernel_size, dilation, stride, combine, head):
    return (torch.empty_like(x, memory_format=_memory_format(x)), torch.empty_like(channel_filter,
            memory_format=torch.contiguous_format), torch.empty_like(spatial_filter, memory_format=_memory_format(x)))


def _involution_fake(x, kernel, kernel_size, dilation, stride):
    return torch.empty((x.shape[0], x.shape[1], kernel.shape[3], kernel.shape[4]), dtype=x.dtype, device=x.device,
                       memory_format=_memory_format(x))


def _involution_backward_fake(grad_out, x, kernel, kernel_size, dilation, stride):
    # the kernel's gradient is computed as a (B, G*k*k, H', W') spatial filter in x's layout, then viewed
    b, g, taps, out_h, out_w = kernel.shape
    grad_kernel = torch.empty((b, g * taps, out_h, out_w), dtype=kernel.dtype, device=kernel.device,
                              memory_format=_memory_format(x))
    return torch.empty_like(x, memory_format=_memory_format(x)), grad_kernel.view(kernel.shape)


def _memory_format(x):
    # The kernels give their outputs x's layout (see csrc/ops/cpu/dynamic_filter_kernel.cpp).
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _ddf_setup(ctx, inputs, output):
    x, channel_filter, spatial_filter, kernel_size, dilation, stride, combine, head = inputs
    ctx.save_for_backward(x, channel_filter, spatial_filter)
    ctx.args = (kernel_size, dilation, stride, combine, head)


def _ddf_backward(ctx, grad_out):
    x, channel_filter, spatial_filter = ctx.saved_tensors
    grad_x, grad_cf, grad_sf = torch.ops.dynrobust.ddf_backward(grad_out, x, channel_filter, spatial_filter, *ctx.args)
    return grad_x, grad_cf, grad_sf, None, None, None, None, None


def _involution_setup(ctx, inputs, output):
    x, kernel, kernel_size, dilation, stride = inputs
    ctx.save_for_backward(x, kernel)
    ctx.args = (kernel_size, dilation, stride)


def _involution_backward(ctx, grad_out):
    x, kernel = ctx.saved_tensors
    grad_x, grad_kernel = torch.ops.dynrobust.involution_backward(grad_out, x, kernel, *ctx.args)
    return grad_x, grad_kernel, None, None, None


def register():
    """Register fake kernels and autograd formulas for the ``dynrobust`` ops (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    torch.library.register_fake("dynrobust::ddf")(_ddf_fake)
    torch.library.register_fake("dynrobust::ddf_backward")(_ddf_backward_fake)
    torch.library.register_fake("dynrobust::involution")(_involution_fake)
    torch.library.register_fake("dynrobust::involution_backward")(_involution_backward_fake)
    torch.library.register_autograd("dynrobust::ddf", _ddf_backward, setup_context=_ddf_setup)
    torch.library.register_autograd("dynrobust::involution", _involution_backward, setup_context=_involution_setup)
    _REGISTERED = True
