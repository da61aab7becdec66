"""Fake (meta) and autograd registrations of the compiled ops, so they work under ``torch.compile``
and ``torch.autograd``. Called once, right after the library is loaded."""

from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format

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
    # The kernels give their outputs the layout x's strides suggest (at::Tensor::suggest_memory_format,
    # also for x sliced out of a channels_last tensor, which is contiguous in neither layout); this is
    # the same rule, from its Python twin.
    if x.dim() == 4 and suggest_memory_format(x) == torch.channels_last:
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


# Second derivatives. Both ops are linear in each input (DDF 'mul' in x, channel filter and spatial
# filter; 'add' in x and in the combined filter; involution in x and kernel), so the backward ops are
# differentiated with the ops themselves. With f the forward, B the backward op and gg the incoming
# gradients of its outputs, for involution (grad_x = B_x(go, k), grad_k = B_k(go, x)):
#     d/d go = f(gg_x, k) + f(x, gg_k),   d/d x = B_x(go, gg_k),   d/d k = B_k(go, gg_x),
# since <gg_x, B_x(go, k)> = <f(gg_x, k), go> and <gg_k, B_k(go, x)> = <f(x, gg_k), go>. DDF 'mul'
# has a term per pair of its three factors; 'add' is involution's case with the filter cf + sf (its
# grad_cf and grad_sf depend on neither filter). Each call is the op itself, so third derivatives
# follow too.
def _add(total, term):
    """total + term, where a None total is zero."""
    return term if total is None else total + term


def _ddf_backward_setup(ctx, inputs, output):
    grad_out, x, channel_filter, spatial_filter, kernel_size, dilation, stride, combine, head = inputs
    ctx.save_for_backward(grad_out, x, channel_filter, spatial_filter)
    ctx.args = (kernel_size, dilation, stride, combine, head)


def _ddf_double_backward(ctx, gg_x, gg_cf, gg_sf):
    go, x, cf, sf = ctx.saved_tensors
    args = ctx.args
    f = lambda x_, cf_, sf_: torch.ops.dynrobust.ddf(x_, cf_, sf_, *args)  # noqa: E731
    b = lambda x_, cf_, sf_: torch.ops.dynrobust.ddf_backward(go, x_, cf_, sf_, *args)  # noqa: E731
    d_go = d_x = d_cf = d_sf = None
    if gg_x is not None:
        _, d_cf, d_sf = b(gg_x, cf, sf)
        d_go = f(gg_x, cf, sf)
    if args[3] == "add":
        if gg_cf is not None or gg_sf is not None:
            gcf = gg_cf if gg_cf is not None else torch.zeros_like(cf)
            gsf = gg_sf if gg_sf is not None else torch.zeros_like(sf)
            d_go = _add(d_go, f(x, gcf, gsf))
            d_x = b(x, gcf, gsf)[0]
    else:
        if gg_cf is not None:
            d_go = _add(d_go, f(x, gg_cf, sf))
            gx, _, gsf = b(x, gg_cf, sf)
            d_x, d_sf = _add(d_x, gx), _add(d_sf, gsf)
        if gg_sf is not None:
            d_go = _add(d_go, f(x, cf, gg_sf))
            gx, gcf, _ = b(x, cf, gg_sf)
            d_x, d_cf = _add(d_x, gx), _add(d_cf, gcf)
    return d_go, d_x, d_cf, d_sf, None, None, None, None, None


def _involution_backward_setup(ctx, inputs, output):
    grad_out, x, kernel, kernel_size, dilation, stride = inputs
    ctx.save_for_backward(grad_out, x, kernel)
    ctx.args = (kernel_size, dilation, stride)


def _involution_double_backward(ctx, gg_x, gg_kernel):
    go, x, kernel = ctx.saved_tensors
    d_go = d_x = d_kernel = None
    if gg_x is not None:
        d_go = torch.ops.dynrobust.involution(gg_x, kernel, *ctx.args)
        d_kernel = torch.ops.dynrobust.involution_backward(go, gg_x, kernel, *ctx.args)[1]
    if gg_kernel is not None:
        d_go = _add(d_go, torch.ops.dynrobust.involution(x, gg_kernel, *ctx.args))
        d_x = torch.ops.dynrobust.involution_backward(go, x, gg_kernel, *ctx.args)[0]
    return d_go, d_x, d_kernel, None, None, None


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
    torch.library.register_autograd("dynrobust::ddf_backward", _ddf_double_backward, setup_context=_ddf_backward_setup)
    torch.library.register_autograd("dynrobust::involution_backward", _involution_double_backward,
                                    setup_context=_involution_backward_setup)
    _REGISTERED = True
