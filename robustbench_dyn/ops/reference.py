"""Pure-PyTorch reference implementations of the dynamic operators: the test oracle and the fallback.

Both are written tap by tap: for each of the k*k kernel taps, a shifted (and strided) view of the
zero-padded input is multiplied by that tap's filter and accumulated. Peak extra memory is a few
tensors of the output's size, not the k*k-times larger ``unfold`` the official naive versions
build (3.6 GB for the DDF paper's 2x256x200x300 shape with k=3... and 12x that at k=7).

Semantics follow the authors' ops (see ``reference/official_implementations.md`` of the project):
tap (i, j) of output (y, x) reads input (y*s + (i - (k-1)/2)*d, x*s + (j - (k-1)/2)*d), zero outside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _shifted_views(x: torch.Tensor, kernel_size: int, dilation: int, stride: int, out_h: int, out_w: int):
    """Yield (tap index, view of x for that tap) with shape (..., out_h, out_w), zero-padded."""
    pad = (kernel_size - 1) // 2 * dilation
    xp = F.pad(x, (pad, pad, pad, pad))
    span_h = (out_h - 1) * stride + 1
    span_w = (out_w - 1) * stride + 1
    for i in range(kernel_size):
        for j in range(kernel_size):
            yield i * kernel_size + j, xp[..., i * dilation: i * dilation + span_h: stride,
                                          j * dilation: j * dilation + span_w: stride]


def ddf_reference(x: torch.Tensor, channel_filter: torch.Tensor, spatial_filter: torch.Tensor,
                  kernel_size: int, dilation: int = 1, stride: int = 1, combine: str = "mul",
                  head: int = 1) -> torch.Tensor:
    """Decoupled dynamic filter (DDF, Zhou et al. CVPR 2021), pure PyTorch.

    ``x`` (B, C, H, W); ``channel_filter`` (B, C, k, k); ``spatial_filter`` (B, head*k*k, H//s, W//s).
    Returns (B, C, H//s, W//s) in ``x``'s dtype:
    ``out[b,c,y,x] = sum_t x[b,c,tap_t(y,x)] * comb(channel_filter[b,c,t], spatial_filter[b,h(c)*k*k+t,y,x])``
    with comb = product (``'mul'``) or sum (``'add'``) and h(c) the head of channel c
    (``head`` contiguous channel groups).
    """
    b, c, h, w = x.shape
    k = kernel_size
    out_h, out_w = spatial_filter.shape[-2:]
    cph = c // head
    xs = x.reshape(b, head, cph, h, w)
    cf = channel_filter.reshape(b, head, cph, k * k, 1, 1)
    sf = spatial_filter.reshape(b, head, 1, k * k, out_h, out_w)
    out = x.new_zeros((b, head, cph, out_h, out_w))
    for t, view in _shifted_views(xs, k, dilation, stride, out_h, out_w):
        if combine == "mul":
            out.add_(view * cf[:, :, :, t] * sf[:, :, :, t])
        else:
            out.add_(view * (cf[:, :, :, t] + sf[:, :, :, t]))
    return out.reshape(b, c, out_h, out_w)


def involution_reference(x: torch.Tensor, kernel: torch.Tensor, kernel_size: int, dilation: int = 1,
                         stride: int = 1) -> torch.Tensor:
    """Involution (Li et al. CVPR 2021), pure PyTorch.

    ``x`` (B, C, H, W); ``kernel`` (B, G, k*k, H', W') with H' = ceil(H / s) (padding
    (k-1)//2 * dilation), shared by the C/G contiguous channels of each group.
    Returns (B, C, H', W'): ``out[b, g*C/G + m, y, x] = sum_t kernel[b,g,t,y,x] * x[b, g*C/G + m, tap_t(y,x)]``.
    """
    b, c, h, w = x.shape
    g = kernel.shape[1]
    out_h, out_w = kernel.shape[-2:]
    xs = x.reshape(b, g, c // g, h, w)
    ker = kernel.unsqueeze(2)  # (B, G, 1, k*k, H', W')
    out = x.new_zeros((b, g, c // g, out_h, out_w))
    for t, view in _shifted_views(xs, kernel_size, dilation, stride, out_h, out_w):
        out.addcmul_(view, ker[:, :, :, t])
    return out.reshape(b, c, out_h, out_w)
