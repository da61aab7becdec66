"""The DDF and involution operators: native kernels against the pure-PyTorch reference, the
reference against an independent unfold computation, gradients, registration, errors, backends.

The native CPU kernels are built (once per machine) by the first test that needs them; CUDA tests
run wherever a GPU is present and skip otherwise.
"""

import errno
import hashlib
import itertools
import json
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from robustbench_dyn import ops
from robustbench_dyn.cli import app
from robustbench_dyn.errors import DynrobustError
from robustbench_dyn.ops import native
from robustbench_dyn.ops.reference import ddf_reference, involution_reference

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.fixture(scope="module")
def built():
    """The native ops, built and loaded (with CUDA when a GPU is present)."""
    return native.build(with_cuda=native._cuda_build_wanted())


def _ddf_inputs(b, c, h, w, k, stride, head, dtype=torch.float64, device="cpu", channels_last=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=gen, dtype=dtype)
    cf = torch.randn(b, c, k, k, generator=gen, dtype=dtype)
    sf = torch.randn(b, head * k * k, h // stride, w // stride, generator=gen, dtype=dtype)
    if channels_last:
        x, sf = x.contiguous(memory_format=torch.channels_last), sf.contiguous(memory_format=torch.channels_last)
    return [t.to(device) for t in (x, cf, sf)]


def _involution_inputs(b, c, h, w, k, stride, groups, dtype=torch.float64, device="cpu", channels_last=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=gen, dtype=dtype)
    kernel = torch.randn(b, groups, k * k, (h - 1) // stride + 1, (w - 1) // stride + 1, generator=gen, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return [x.to(device), kernel.to(device)]


def _grads(out, inputs, seed=1):
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype).to(out.device)
    return torch.autograd.grad(out, inputs, grad_out)


def _max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def _scaled_diff(got, want):
    """The largest |got - want| over want's largest magnitude, or over 1 where that is smaller."""
    return _max_diff(got, want) / max(1.0, want.abs().max().item())


# ------------------------------------------------------------------ the reference is right


def test_ddf_reference_equals_unfold_formula():
    # An independent computation: unfold gathers every tap, then the filter is built explicitly.
    b, c, h, w, k, d, s, head = 2, 6, 9, 11, 3, 2, 2, 3
    x, cf, sf = _ddf_inputs(b, c, h, w, k, s, head)
    oh, ow = h // s, w // s
    taps = F.unfold(x, k, dilation=d, padding=(k - 1) // 2 * d, stride=s)
    taps = taps.view(b, c, k * k, (h - 1) // s + 1, (w - 1) // s + 1)[..., :oh, :ow]
    spatial = sf.view(b, head, 1, k * k, oh, ow).expand(b, head, c // head, k * k, oh, ow).reshape(b, c, k * k, oh, ow)
    channel = cf.view(b, c, k * k, 1, 1)
    for combine, weight in (("mul", channel * spatial), ("add", channel + spatial)):
        expected = (taps * weight).sum(2)
        assert _max_diff(ddf_reference(x, cf, sf, k, d, s, combine, head), expected) < 1e-12


def test_involution_reference_equals_unfold_formula():
    b, c, h, w, k, d, s, g = 2, 8, 9, 10, 3, 2, 2, 2
    x, kernel = _involution_inputs(b, c, h, w, k, s, g)
    oh, ow = kernel.shape[-2:]
    taps = F.unfold(x, k, dilation=d, padding=(k - 1) // 2 * d, stride=s).view(b, g, c // g, k * k, oh, ow)
    expected = (taps * kernel.unsqueeze(2)).sum(3).view(b, c, oh, ow)
    assert _max_diff(involution_reference(x, kernel, k, d, s), expected) < 1e-12


def test_ddf_with_a_constant_filter_is_a_depthwise_convolution():
    # mul with an all-ones spatial filter = depthwise conv with the channel filter (zero padding).
    x, cf, _ = _ddf_inputs(2, 4, 8, 8, 5, 1, 1)
    sf = torch.ones(2, 25, 8, 8, dtype=torch.float64)
    expected = torch.cat([F.conv2d(x[i:i + 1], cf[i].unsqueeze(1), padding=2, groups=4) for i in range(2)])
    assert _max_diff(ops.ddf(x, cf, sf, 5), expected) < 1e-12


# ------------------------------------------------------------------ native == reference

DDF_CASES = list(itertools.product([1, 3, 5, 7], [1, 2], [1, 2], ["mul", "add"], [1, 2], [False, True]))


@pytest.mark.parametrize("k,dilation,stride,combine,head,channels_last", DDF_CASES)
def test_ddf_native_matches_reference_forward_and_backward(built, k, dilation, stride, combine, head, channels_last):
    x, cf, sf = _ddf_inputs(2, 4, 9, 10, k, stride, head, channels_last=channels_last)  # odd height
    inputs = [t.requires_grad_() for t in (x, cf, sf)]
    out = torch.ops.dynrobust.ddf(*inputs, k, dilation, stride, combine, head)
    ref = ddf_reference(*inputs, k, dilation, stride, combine, head)
    assert out.shape == ref.shape == (2, 4, 9 // stride, 10 // stride)
    assert _max_diff(out, ref) < 1e-12
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for got, want in zip(_grads(out, inputs), _grads(ref, inputs)):
        assert got.shape == want.shape
        assert _max_diff(got, want) < 1e-12


INVOLUTION_CASES = list(itertools.product([1, 3, 7], [1, 2], [1, 2], [1, 2, 4], [False, True]))


@pytest.mark.parametrize("k,dilation,stride,groups,channels_last", INVOLUTION_CASES)
def test_involution_native_matches_reference_forward_and_backward(built, k, dilation, stride, groups, channels_last):
    x, kernel = _involution_inputs(2, 8, 9, 10, k, stride, groups, channels_last=channels_last)
    inputs = [x.requires_grad_(), kernel.requires_grad_()]
    out = torch.ops.dynrobust.involution(*inputs, k, dilation, stride)
    ref = involution_reference(*inputs, k, dilation, stride)
    assert out.shape == ref.shape == (2, 8, 5 if stride == 2 else 9, 5 if stride == 2 else 10)
    assert _max_diff(out, ref) < 1e-12
    for got, want in zip(_grads(out, inputs), _grads(ref, inputs)):
        assert _max_diff(got, want) < 1e-12


@pytest.mark.parametrize("channels,head", [(128, 1), (128, 2), (192, 4), (96, 3), (72, 9)])
def test_channel_blocks_of_the_nhwc_kernels(built, channels, head):
    # 64-channel blocks with 64, 16 or 8 channels per spatial weight (templated paths), the generic
    # path (96 / 3 = 32 per head crosses no block, 72 / 9 = 8) and a partial last block.
    x, cf, sf = _ddf_inputs(2, channels, 7, 6, 3, 1, head, channels_last=True)
    inputs = [t.requires_grad_() for t in (x, cf, sf)]
    out = ops.ddf(*inputs, 3, head=head)
    ref = ddf_reference(*inputs, 3, 1, 1, "mul", head)
    assert _max_diff(out, ref) < 1e-12
    for got, want in zip(_grads(out, inputs), _grads(ref, inputs)):
        assert _max_diff(got, want) < 1e-12
    xi, kernel = _involution_inputs(2, channels, 7, 6, 3, 2, channels // 16 if channels % 16 == 0 else head,
                                    channels_last=True)
    inputs = [xi.requires_grad_(), kernel.requires_grad_()]
    out = ops.involution(*inputs, 3, 1, 2)
    ref = involution_reference(*inputs, 3, 1, 2)
    assert _max_diff(out, ref) < 1e-12
    for got, want in zip(_grads(out, inputs), _grads(ref, inputs)):
        assert _max_diff(got, want) < 1e-12


FAST_PATH_CASES = [
    # (channels, head, groups): with 8 float64 lanes (AVX-512), DDF shares one weight per 4-vector
    # block (head 1), has 2 vectors per head (48 / 3 = 16) or 3 (24 / 1 = 24 in 1-vector blocks);
    # involution has one group per vector (C / 8) or per two (C / 16). With 4 lanes (AVX2) or 2
    # (the narrow build below) the same cases split into other blocks.
    (24, 1, 3), (48, 3, 6), (64, 2, 4), (32, 1, 2),
]


@pytest.mark.parametrize("channels,head,groups", FAST_PATH_CASES)
@pytest.mark.parametrize("k,stride,dilation", [(3, 1, 1), (3, 2, 1), (5, 1, 2), (7, 1, 1), (7, 2, 2)])
def test_nhwc_fast_path_at_borders_and_every_width(built, channels, head, groups, k, stride, dilation):
    # Widths 1 to 19: maps with no interior pixel, one, and many, and rows of one 8-pixel tile of
    # grad_x's transposed weights or two and a rest; the border tables and the shared offsets must
    # agree with the reference to the last bit of float64.
    for width in (1, 2, 5, 12, 19):
        x, cf, sf = _ddf_inputs(2, channels, 9, width, k, stride, head, channels_last=True, seed=width)
        if sf.shape[-1] == 0:
            continue
        for combine in ("mul", "add"):
            inputs = [t.clone().requires_grad_() for t in (x, cf, sf)]
            out = ops.ddf(*inputs, k, dilation, stride, combine, head)
            ref = ddf_reference(*inputs, k, dilation, stride, combine, head)
            assert _max_diff(out, ref) < 1e-12
            for got, want in zip(_grads(out, inputs), _grads(ref, inputs)):
                assert _max_diff(got, want) < 1e-12
        xi, kernel = _involution_inputs(2, channels, 9, width, k, stride, groups, channels_last=True, seed=width)
        inputs = [xi.requires_grad_(), kernel.requires_grad_()]
        out = ops.involution(*inputs, k, dilation, stride)
        ref = involution_reference(*inputs, k, dilation, stride)
        assert _max_diff(out, ref) < 1e-12
        for got, want in zip(_grads(out, inputs), _grads(ref, inputs)):
            assert _max_diff(got, want) < 1e-12


@pytest.mark.parametrize("stride,dilation", [(2, 1), (2, 3), (3, 1), (3, 2), (3, 3), (4, 2)])
def test_ddf_strided_grad_x_gathers_every_tap(built, stride, dilation):
    # DDF's grad_x at strides over 1 gathers, per input pixel, the taps that reach it: every
    # (s / gcd(s, d))-th kernel row and column from the first whose output pixel lies inside, so
    # coprime and common-factor strides and dilations, k = 1 (where some rows get no tap at all) and
    # maps smaller than the kernel's reach must all match the reference.
    for k, (height, width) in itertools.product((1, 3, 5), ((9, 7), (4, 3), (12, 8))):
        if height < stride or width < stride:
            continue
        for head, combine in ((1, "mul"), (2, "add")):
            x, cf, sf = _ddf_inputs(2, 32, height, width, k, stride, head, channels_last=True, seed=k + width)
            inputs = [t.requires_grad_() for t in (x, cf, sf)]
            out = ops.ddf(*inputs, k, dilation, stride, combine, head)
            ref = ddf_reference(*inputs, k, dilation, stride, combine, head)
            assert _max_diff(out, ref) < 1e-12
            for got, want in zip(_grads(out, inputs), _grads(ref, inputs)):
                assert _max_diff(got, want) < 1e-12


def test_float32_fast_path_matches_float64_reference(built):
    # RedNet's 16 channels per group and DDF's one head, with a 7x7 involution (with 16 float32
    # lanes, three 16-tap chunks of the filter gradient and a short last one; with 8, six and one).
    def check(op, inputs):
        out = op(*inputs)
        wide = [t.detach().double().requires_grad_() for t in inputs]
        ref = op(*wide)
        assert _max_diff(out, ref) < 1e-4
        grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        got = torch.autograd.grad(out, inputs, grad_out.float())
        want = torch.autograd.grad(ref, wide, grad_out)
        for g, w in zip(got, want):
            assert _scaled_diff(g, w) < 1e-3

    x, cf, sf = _ddf_inputs(2, 80, 11, 10, 3, 1, 1, dtype=torch.float32, channels_last=True)
    check(lambda *t: ops.ddf(*t, 3) if t[0].dtype == torch.float32 else ddf_reference(*t, 3, 1, 1, "mul", 1),
          [t.requires_grad_() for t in (x, cf, sf)])
    # 37 pixels a row: two 16-pixel tiles of grad_x's transposed weights and a rest (or 4 of 8)
    x, kernel = _involution_inputs(2, 64, 11, 37, 7, 1, 4, dtype=torch.float32, channels_last=True)
    check(lambda *t: ops.involution(*t, 7) if t[0].dtype == torch.float32 else involution_reference(*t, 7),
          [x.requires_grad_(), kernel.requires_grad_()])
    # 8 channels per group: the filter gradient's pixel lanes with channels that are not a multiple
    # of 16 lanes (with AVX-512 the forward and grad_x take the generic loops)
    x, kernel = _involution_inputs(2, 24, 9, 21, 3, 1, 3, dtype=torch.float32, channels_last=True)
    check(lambda *t: ops.involution(*t, 3) if t[0].dtype == torch.float32 else involution_reference(*t, 3),
          [x.requires_grad_(), kernel.requires_grad_()])


@pytest.mark.parametrize("k,stride,dilation", [(1, 1, 1), (3, 1, 1), (3, 2, 1), (5, 1, 2), (7, 1, 1)])
def test_ddf_filter_gradients_in_float32_on_the_fast_path(built, k, stride, dilation):
    # Both filter gradients come from one pass per pixel (pairs of inner neighbours, single pixels at
    # the borders and at a row's odd end), in chunks of taps whose size depends on the lanes
    # (float32 here, float64 in the tests above). The channel filter's gradient sums over all pixels
    # of an image, in pieces of at least 64 pixels: 2 images of 23 x 21 pixels cross both.
    for channels, head, width in ((32, 1, 21), (48, 2, 6), (16, 2, 2)):
        for combine in ("mul", "add"):
            inputs = [t.requires_grad_() for t in _ddf_inputs(2, channels, 23, width, k, stride, head,
                                                               dtype=torch.float32, channels_last=True, seed=k)]
            got, want = _grads_and_reference(lambda *t: ops.ddf(*t, k, dilation, stride, combine, head),
                                             lambda *t: ddf_reference(*t, k, dilation, stride, combine, head),
                                             inputs, grad_seed=3)
            for g, w in zip(got, want):
                assert _scaled_diff(g, w) < 1e-5


@pytest.mark.parametrize("k,stride,dilation,height", [(1, 2, 1, 70), (3, 2, 1, 67), (7, 2, 2, 75), (3, 3, 1, 80)])
def test_strided_grad_x_gathered(built, k, stride, dilation, height, monkeypatch):
    # At strides over 1 each input pixel gathers grad_out over the taps that reach it (every
    # s / gcd(s, d)-th kernel row and column), involution's weights from a ring of transposed rows of
    # the kernel, one slot per output row a pixel can reach: 67 to 80 rows cycle the ring
    # many times, and dilation 2 at stride 2 reaches every kernel row. k = 1 at stride 2 leaves rows
    # and columns no tap reads, whose gradient must be stored as 0. With deterministic algorithms
    # on, torch fills fresh tensors with NaN, so a value nobody stored shows.
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", True)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for width in (9, 16):
            x, cf, sf = _ddf_inputs(2, 16, height, width, k, stride, 2, channels_last=True, seed=height)
            inputs = [t.requires_grad_() for t in (x, cf, sf)]
            out = ops.ddf(*inputs, k, dilation, stride, "mul", 2)
            ref = ddf_reference(*inputs, k, dilation, stride, "mul", 2)
            for got, want in zip(_grads(out, inputs), _grads(ref, inputs)):
                assert _max_diff(got, want) < 1e-12
            xi, kernel = _involution_inputs(2, 16, height, width, k, stride, 2, channels_last=True, seed=height)
            inputs = [xi.requires_grad_(), kernel.requires_grad_()]
            out = ops.involution(*inputs, k, dilation, stride)
            ref = involution_reference(*inputs, k, dilation, stride)
            for got, want in zip(_grads(out, inputs), _grads(ref, inputs)):
                assert _max_diff(got, want) < 1e-12
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


@pytest.mark.parametrize("k,stride,dilation,height,width", [(7, 2, 1, 23, 29), (7, 3, 1, 20, 26), (3, 2, 2, 17, 40),
                                                           (7, 2, 1, 14, 14), (5, 2, 1, 7, 7)])
def test_strided_involution_filter_gradient_in_pixel_lanes(built, k, stride, dilation, height, width):
    # At strides over 1 the involution's filter gradient reads the input rows transposed in `stride`
    # phases (columns x * s + dx of consecutive output pixels x in one phase), where an output row
    # fills more than half a vector: 15, 9 and 20 pixels (blocks and a part), 7 (one part) here;
    # 4 pixels take the channel lanes in float32 on AVX2. 16 and 8 channels per group, float32 on
    # the vector path with a float64 reference, and float64 against it exactly.
    for channels, groups in ((32, 2), (24, 3)):
        x, kernel = _involution_inputs(2, channels, height, width, k, stride, groups, channels_last=True, seed=width)
        ref = involution_reference(x.requires_grad_(), kernel.requires_grad_(), k, dilation, stride)
        want = _grads(ref, [x, kernel])
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-4)):
            inputs = [x.detach().to(dtype).requires_grad_(), kernel.detach().to(dtype).requires_grad_()]
            out = ops.involution(*inputs, k, dilation, stride)
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            got = torch.autograd.grad(out, inputs, grad_out.to(dtype))
            for g, w in zip(got, want):
                assert _scaled_diff(g.double(), w) < tol


def test_tap_lane_filter_gradient_for_any_group_size(built):
    # The 7x7 involution's filter gradient on rows of up to 32 pixels puts a kernel row's 7 taps in
    # the lanes, so any number of channels per group works (3, 5 and 16 here); its last vector of a
    # row spills into the next row, the pixel's last row must not. Width 33 takes the other kernels.
    # Output rows go in pairs within a task and an image: heights 7 and 5 leave each image's last row
    # unpaired, 4 and 2 none, 1 every row; 3 threads split 2 x 5 rows into tasks of 4, 4 and 2 rows
    # (the second starts at image 0's last row and ends inside image 1).
    cases = ((15, 5, 7, 28, 1), (10, 2, 4, 6, 1), (48, 3, 7, 1, 1), (16, 2, 2, 9, 1), (16, 1, 1, 12, 1),
             (32, 2, 5, 10, 3), (48, 3, 7, 33, 1))
    threads = torch.get_num_threads()
    for channels, groups, height, width, tasks in cases:
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-4)):
            torch.set_num_threads(tasks)
            x, kernel = _involution_inputs(2, channels, height, width, 7, 1, groups, dtype=dtype, channels_last=True,
                                           seed=width)
            inputs = [x.requires_grad_(), kernel.requires_grad_()]
            wide = [t.detach().double().requires_grad_() for t in inputs]
            out = ops.involution(*inputs, 7)
            ref = involution_reference(*wide, 7)
            assert _max_diff(out, ref) < tol
            grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
            try:
                got = torch.autograd.grad(out, inputs, grad_out.to(dtype))
            finally:
                torch.set_num_threads(threads)
            want = torch.autograd.grad(ref, wide, grad_out)
            for g, w in zip(got, want):
                assert _scaled_diff(g, w) < tol


def _grads_and_reference(native, reference, inputs, grad_seed, threads=None):
    """The gradients of native(*inputs) for the inputs (in their dtype), computed on `threads`
    threads, and those of reference(*inputs as float64), for one float64 grad_out."""
    wide = [t.detach().double().requires_grad_() for t in inputs]
    out, ref = native(*inputs), reference(*wide)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        got = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    finally:
        torch.set_num_threads(previous)
    return got, torch.autograd.grad(ref, wide, grad_out)


def _involution_grads_and_reference(batch, channels, groups, height, width, k, dilation, dtype, seed, grad_seed,
                                    threads=None):
    """_grads_and_reference for the stride-1 involution on channels_last inputs."""
    x, kernel = _involution_inputs(batch, channels, height, width, k, 1, groups, dtype=dtype, channels_last=True,
                                   seed=seed)
    return _grads_and_reference(lambda *t: ops.involution(*t, k, dilation),
                                lambda *t: involution_reference(*t, k, dilation),
                                [x.requires_grad_(), kernel.requires_grad_()], grad_seed, threads)


def _grad_x_bands(channels, groups, k, value_bytes, budget=16 * 1024):
    """The kernel rows per sweep of the stride-1 grad_x (grad_x_rows_per_sweep in the CPU kernel)."""
    return min(max(budget // (k * (groups * 64 + channels * value_bytes)), 1), k)


def test_grad_x_in_bands_of_kernel_rows(built):
    # At stride 1, grad_x sweeps each input row once per band of kernel rows, with as many rows per
    # band as keep what a pixel reads (k weights per group and k pixels of grad_out per kernel row)
    # within a 16 KB budget; the first band stores, the others add. Under that budget, 32 channels
    # in 2 groups make one band at k = 7 in float32 and bands of 6, 1 in float64; 64 channels in 4
    # groups 4, 3 and 3, 3, 1, and at k = 5 one band and 4, 1; 128 channels in 8 groups one band at
    # k = 3, and 2, 2, 2, 1 and single rows at k = 7. Heights of 1 and 4 leave some
    # bands with no kernel row inside the image (the first then stores zeros). Rows longer than a
    # vector (12 pixels; also 5 and 7 in float64 on AVX2) read the weights in place in the kernel
    # tensor, shorter ones from a ring of its rows transposed. At 128 channels, k = 7, 50 pixels
    # wide, the filter rows a pixel reaches (7 x 392 x 50 values) outgrow the 512 KB under which
    # they are read in place: they come from the ring, prefetched.
    cases = ((32, 2, 7, 1), (64, 4, 7, 1), (64, 4, 7, 2), (64, 4, 5, 1), (128, 8, 3, 1), (128, 8, 7, 1))
    assert [_grad_x_bands(c, g, k, 4) for c, g, k, _ in cases] == [7, 4, 4, 5, 3, 2]
    assert [_grad_x_bands(c, g, k, 8) for c, g, k, _ in cases] == [6, 3, 3, 4, 3, 1]
    assert 7 * 8 * 49 * 50 * 4 > 512 * 1024
    for channels, groups, k, dilation in cases:
        sizes = ((9, 7), (1, 5), (4, 12)) + (((9, 50),) if channels == 128 and k == 7 else ())
        for height, width in sizes:
            for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-4)):
                got, want = _involution_grads_and_reference(1, channels, groups, height, width, k, dilation, dtype,
                                                            seed=height + k, grad_seed=k)
                for g, w in zip(got, want):
                    assert _scaled_diff(g, w) < tol, (channels, k, dilation, height, dtype)


def test_grad_x_by_output_rows(built):
    # Where the ring of transposed filter rows outgrows 512 KB and each band is a single kernel row,
    # the stride-1 grad_x goes by output rows: each filter row is transposed once and swept into
    # every input row of the task that its kernel rows reach, the sweep from the smallest output row
    # storing and the others adding. 256 channels in 16 groups at k = 7 (30 pixels wide) and 512 in
    # 32 at k = 3 (160 wide) take that path in float32 and float64. Tasks of 3 threads over 2 x 9
    # rows start and end inside images; 2 rows are fewer than the kernel's reach; dilation 3 at
    # k = 3 leaves input rows 1, 2 (and the last two) with a single kernel row inside.
    cases = ((256, 16, 7, 1, 30), (256, 16, 7, 2, 30), (512, 32, 3, 3, 160))
    for channels, groups, k, _, width in cases:
        for value_bytes in (4, 8):
            assert _grad_x_bands(channels, groups, k, value_bytes) == 1
            assert k * groups * k * k * width * value_bytes > 512 * 1024
    for channels, groups, k, dilation, width in cases:
        for height, tasks in ((9, 1), (9, 3), (2, 1)):
            for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-4)):
                got, want = _involution_grads_and_reference(2, channels, groups, height, width, k, dilation, dtype,
                                                            seed=height + k, grad_seed=k, threads=tasks)
                assert _scaled_diff(got[0], want[0]) < tol, (channels, k, dilation, height, tasks, dtype)
    # DDF takes the same path with 16 heads over 512 channels on 400-pixel rows (its channel weights
    # passed through): 3 x 144 x 400 weights outgrow 512 KB, and a band is one kernel row
    assert _grad_x_bands(512, 16, 3, 4) == 1 and 3 * 144 * 400 * 4 > 512 * 1024
    for combine in ("mul", "add"):
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-4)):
            inputs = [t.requires_grad_()
                      for t in _ddf_inputs(2, 512, 5, 400, 3, 1, 16, dtype=dtype, channels_last=True)]
            got, want = _grads_and_reference(lambda *t: ops.ddf(*t, 3, 1, 1, combine, 16),
                                             lambda *t: ddf_reference(*t, 3, 1, 1, combine, 16), inputs, grad_seed=3)
            assert _scaled_diff(got[0], want[0]) < tol, (combine, dtype)


def test_grad_x_streamed(built):
    # grad_x over 2 MB that is stored once per input pixel (the stride-1 sweep with a single band of
    # kernel rows, and the gather at strides over 1) goes out by non-temporal stores, each task
    # ending with a store fence. 2 x 128 x 48 x 48 is 2.25 MiB in float32 (and 4.5 in float64); DDF
    # at k = 3 and involution at k = 3 (8 groups) sweep it in one band; at stride 2 (k = 3 and 7) it
    # is gathered. Tasks of 3 threads start and end inside images.
    assert 2 * 128 * 48 * 48 * 4 > 2 << 20
    assert _grad_x_bands(128, 1, 3, 8) == 3 and _grad_x_bands(128, 8, 3, 8) == 3
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-4)):
        for stride, threads in ((1, 1), (1, 3), (2, 3)):
            for combine in ("mul", "add"):
                inputs = [t.requires_grad_()
                          for t in _ddf_inputs(2, 128, 48, 48, 3, stride, 1, dtype=dtype, channels_last=True, seed=5)]
                got, want = _grads_and_reference(lambda *t: ops.ddf(*t, 3, 1, stride, combine, 1),
                                                 lambda *t: ddf_reference(*t, 3, 1, stride, combine, 1), inputs,
                                                 grad_seed=stride, threads=threads)
                assert _scaled_diff(got[0], want[0]) < tol, ("ddf", stride, threads, combine, dtype)
            k = 3 if stride == 1 else 7
            inputs = [t.requires_grad_() for t in _involution_inputs(2, 128, 48, 48, k, stride, 8, dtype=dtype,
                                                                       channels_last=True, seed=6)]
            got, want = _grads_and_reference(lambda *t: ops.involution(*t, k, 1, stride),
                                             lambda *t: involution_reference(*t, k, 1, stride), inputs,
                                             grad_seed=k, threads=threads)
            assert _scaled_diff(got[0], want[0]) < tol, ("involution", stride, threads, dtype)


def test_float32_large_channels_and_odd_sizes(built):
    # Channel counts beyond one 64-channel block of the NHWC kernel, not a multiple of it.
    for channels_last in (False, True):
        x, cf, sf = _ddf_inputs(1, 150, 13, 7, 3, 2, 3, dtype=torch.float32, channels_last=channels_last)
        out = ops.ddf(x, cf, sf, 3, dilation=1, stride=2, combine="mul", head=3)
        assert _max_diff(out, ddf_reference(x.double(), cf.double(), sf.double(), 3, 1, 2, "mul", 3)) < 1e-4
        x, kernel = _involution_inputs(1, 144, 13, 7, 7, 1, 9, dtype=torch.float32, channels_last=channels_last)
        out = ops.involution(x, kernel, 7)
        assert _max_diff(out, involution_reference(x.double(), kernel.double(), 7)) < 1e-4


def test_non_contiguous_inputs(built):
    x, cf, sf = _ddf_inputs(2, 4, 9, 20, 3, 1, 1)
    x = x[:, :, :, ::2]  # a strided view, 9 x 10
    sf = sf[:, :, :, ::2]
    cf = cf.transpose(2, 3)  # a transposed view
    assert not x.is_contiguous() and not cf.is_contiguous()
    assert _max_diff(ops.ddf(x, cf, sf, 3), ddf_reference(x, cf, sf, 3)) < 1e-12
    xi, kernel = _involution_inputs(2, 8, 9, 10, 3, 1, 2)
    kernel = kernel.transpose(3, 4).contiguous().transpose(3, 4)
    assert _max_diff(ops.involution(xi, kernel, 3), involution_reference(xi, kernel, 3)) < 1e-12


def test_half_precision_inputs_on_cpu_are_computed_in_float32(built):
    for dtype in (torch.bfloat16, torch.float16):
        x, cf, sf = _ddf_inputs(1, 8, 6, 6, 3, 1, 1, dtype=dtype)
        out = ops.ddf(x, cf, sf, 3)
        assert out.dtype == dtype
        expected = ddf_reference(x.double(), cf.double(), sf.double(), 3)
        # float32 arithmetic, one rounding to the half type at the end: within half an ulp or so
        ulp = torch.finfo(dtype).eps * expected.abs()
        assert ((out.double() - expected).abs() <= ulp + 1e-6).all()


def test_mixed_dtypes_promote_like_torch(built):
    x, cf, sf = _ddf_inputs(1, 4, 6, 6, 3, 1, 1, dtype=torch.float32)
    out = ops.ddf(x, cf.double(), sf, 3)
    assert out.dtype == torch.float64
    assert _max_diff(out, ddf_reference(x.double(), cf.double(), sf.double(), 3)) < 1e-12


# ------------------------------------------------------------------ gradients and registration


@pytest.mark.parametrize("combine,stride,dilation,head", [("mul", 1, 1, 1), ("add", 2, 2, 2), ("mul", 2, 1, 2)])
def test_ddf_gradcheck(built, combine, stride, dilation, head):
    inputs = [t.requires_grad_() for t in _ddf_inputs(1, 4, 7, 6, 3, stride, head)]
    assert torch.autograd.gradcheck(lambda *t: ops.ddf(*t, 3, dilation, stride, combine, head), inputs)


@pytest.mark.parametrize("stride,dilation,channels_last", [(1, 1, False), (2, 2, True)])
def test_involution_gradcheck(built, stride, dilation, channels_last):
    inputs = [t.requires_grad_() for t in _involution_inputs(1, 4, 7, 6, 3, stride, 2, channels_last=channels_last)]
    assert torch.autograd.gradcheck(lambda *t: ops.involution(*t, 3, dilation, stride), inputs)


@pytest.mark.parametrize("combine", ["mul", "add"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_second_derivatives(built, combine, channels_last):
    # The backward ops are differentiable (with the ops themselves): gradgradcheck against finite
    # differences of the native gradients, and the double backward against the reference's.
    inputs = [t.requires_grad_() for t in _ddf_inputs(1, 4, 5, 6, 3, 1, 2, channels_last=channels_last, seed=3)]
    assert torch.autograd.gradgradcheck(lambda *t: ops.ddf(*t, 3, 1, 1, combine, 2), inputs)
    xi, kernel = [t.requires_grad_() for t in _involution_inputs(1, 4, 5, 6, 3, 1, 2, channels_last=channels_last)]
    assert torch.autograd.gradgradcheck(lambda *t: ops.involution(*t, 3, 2), [xi, kernel])
    for native_op, reference_op, args in ((ops.ddf, ddf_reference, (3, 2, 1, combine, 2)),
                                          (ops.involution, involution_reference, (3, 2, 1))):
        tensors = inputs if native_op is ops.ddf else [xi, kernel]
        got, want = [], []
        for f, out in ((native_op, got), (reference_op, want)):
            y = f(*tensors, *args)
            grads = torch.autograd.grad(y.square().sum(), tensors, create_graph=True)
            out.extend(torch.autograd.grad(sum((g * g.detach().sin()).sum() for g in grads), tensors))
        for g, w in zip(got, want):
            assert w.abs().max() > 0 and _max_diff(g, w) < 1e-9 * w.abs().max().item()


@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(built, channels_last):
    x, cf, sf = [t.requires_grad_() for t in _ddf_inputs(2, 4, 7, 8, 3, 2, 2, torch.float32,
                                                         channels_last=channels_last)]
    torch.library.opcheck(torch.ops.dynrobust.ddf.default, (x, cf, sf, 3, 1, 2, "mul", 2))
    torch.library.opcheck(torch.ops.dynrobust.ddf.default, (x, cf, sf, 3, 1, 2, "add", 2))
    xi, kernel = [t.requires_grad_() for t in _involution_inputs(2, 4, 7, 8, 3, 2, 2, torch.float32,
                                                                 channels_last=channels_last)]
    torch.library.opcheck(torch.ops.dynrobust.involution.default, (xi, kernel, 3, 1, 2))


def test_fake_kernels_give_the_layout_of_the_real_ones_for_sliced_inputs(built):
    # A slice of a channels_last tensor is contiguous in neither layout; the kernels take the layout
    # its strides suggest (channels_last), and so must the fake kernels that torch.compile traces.
    for x in (torch.randn(1, 8, 6, 6).contiguous(memory_format=torch.channels_last)[..., :4],
              torch.randn(1, 16, 6, 4).contiguous(memory_format=torch.channels_last)[:, ::2]):
        x.requires_grad_()
        cf, sf = torch.randn(1, 8, 3, 3, requires_grad=True), torch.randn(1, 9, 6, 4, requires_grad=True)
        torch.library.opcheck(torch.ops.dynrobust.ddf.default, (x, cf, sf, 3, 1, 1, "mul", 1))
        kernel = torch.randn(1, 1, 9, 6, 4, requires_grad=True)
        torch.library.opcheck(torch.ops.dynrobust.involution.default, (x, kernel, 3, 1, 1))


def test_torch_compile_fullgraph_matches_eager(built):
    x, kernel = _involution_inputs(2, 8, 8, 8, 3, 1, 2, torch.float32)
    x.requires_grad_()
    compiled = torch.compile(lambda a, b: ops.involution(a, b, 3) * 2, fullgraph=True, backend="aot_eager")
    out = compiled(x, kernel)
    assert _max_diff(out, 2 * involution_reference(x, kernel, 3)) < 1e-5
    (grad,) = torch.autograd.grad(out.sum(), x)
    (expected,) = torch.autograd.grad((2 * involution_reference(x, kernel, 3)).sum(), x)
    assert _max_diff(grad, expected) < 1e-5


# ------------------------------------------------------------------ bad input


def test_bad_arguments_raise_clear_errors():
    x, cf, sf = _ddf_inputs(2, 4, 8, 8, 3, 1, 1)
    with pytest.raises(ValueError, match="kernel_size must be a positive odd"):
        ops.ddf(x, torch.zeros(2, 4, 4, 4, dtype=x.dtype), torch.zeros(2, 16, 8, 8, dtype=x.dtype), 4)
    with pytest.raises(ValueError, match=r"channel_filter must have shape \(B, C, k, k\) = \(2, 4, 3, 3\)"):
        ops.ddf(x, cf[:, :3], sf, 3)
    with pytest.raises(ValueError, match=r"spatial_filter must have shape .* = \(2, 9, 4, 4\)"):
        ops.ddf(x, cf, sf, 3, stride=2)  # sf is 8x8, stride 2 needs 4x4
    with pytest.raises(ValueError, match="head must be a positive divisor"):
        ops.ddf(x, cf, sf, 3, head=3)
    with pytest.raises(ValueError, match="combine must be one of"):
        ops.ddf(x, cf, sf, 3, combine="max")
    with pytest.raises(ValueError, match="x is on cpu but spatial_filter is on meta"):
        ops.ddf(x, cf, sf.to("meta"), 3)
    with pytest.raises(ValueError, match="must be floating point"):
        ops.ddf(x.long(), cf, sf, 3)
    xi, kernel = _involution_inputs(1, 8, 9, 9, 3, 2, 2)
    with pytest.raises(ValueError, match=r"ceil\(H/stride\).* = \(1, 2, 9, 5, 5\)"):
        ops.involution(xi, kernel[..., :4, :4], 3, stride=2)
    with pytest.raises(ValueError, match="groups must divide"):
        ops.involution(xi, torch.zeros(1, 3, 9, 5, 5, dtype=xi.dtype), 3, stride=2)
    with pytest.raises(ValueError, match="dilation must be a positive integer"):
        ops.involution(xi, kernel, 3, dilation=0, stride=2)


def test_integer_arguments_may_be_numpy_or_tensors_but_not_bools(built):
    xi, kernel = _involution_inputs(1, 4, 6, 5, 3, 1, 2)
    expected = involution_reference(xi, kernel, 3)
    assert _max_diff(ops.involution(xi, kernel, np.int64(3), torch.tensor(1), np.int32(1)), expected) < 1e-12
    x, cf, sf = _ddf_inputs(1, 4, 6, 5, 3, 1, 2)
    assert _max_diff(ops.ddf(x, cf, sf, np.int64(3), head=np.int64(2)), ddf_reference(x, cf, sf, 3, head=2)) < 1e-12
    with pytest.raises(ValueError, match="kernel_size must be a positive odd integer, got True"):
        ops.involution(xi, kernel[:, :, :1], True)
    with pytest.raises(ValueError, match="stride must be a positive integer, got 2.0"):
        ops.involution(xi, kernel, 3, stride=2.0)
    with pytest.raises(ValueError, match="head must be a positive divisor"):
        ops.ddf(x, cf, sf[:, :9], 3, head=True)


def test_images_without_pixels_are_rejected_by_both_backends(monkeypatch):
    for backend in ("native", "reference"):
        _fresh_choice(monkeypatch, backend)
        with pytest.raises(ValueError, match=r"x has no pixels \(0x6\)"):
            ops.involution(torch.randn(1, 4, 0, 6), torch.randn(1, 1, 9, 0, 6), 3)
        with pytest.raises(ValueError, match=r"x has no pixels \(5x0\)"):
            ops.ddf(torch.randn(1, 4, 5, 0), torch.randn(1, 4, 3, 3), torch.randn(1, 9, 5, 0), 3)


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_dilation_past_the_image_leaves_the_centre_tap(built, channels_last):
    # From a dilation of max(H, W) on only the centre tap reads inside the image, so the result is
    # x times the centre weight. The ops clamp the dilation there: before, 8192 on a 4x5 image took
    # 51 s and 17 GB in the channels_last backward (buffers padded by the reach), and 2**62
    # overflowed the offsets (a segfault); the kernels called directly clamp too.
    xi, kernel = [t.requires_grad_() for t in _involution_inputs(1, 8, 4, 5, 5, 1, 1, channels_last=channels_last)]
    def centre_only():
        return xi * kernel[:, :, 12].unsqueeze(2).expand(1, 1, 8, 4, 5).reshape(1, 8, 4, 5)

    for dilation in (5, 8192, 2**62):
        out = ops.involution(xi, kernel, 5, dilation)
        assert _max_diff(out, centre_only()) < 1e-12
        assert _max_diff(torch.ops.dynrobust.involution(xi, kernel, 5, dilation, 1), centre_only()) < 1e-12
        got, want = _grads(out, [xi, kernel]), _grads(centre_only(), [xi, kernel])
        assert all(_max_diff(g, w) < 1e-12 for g, w in zip(got, want))
    x, cf, sf = [t.requires_grad_() for t in _ddf_inputs(1, 4, 4, 5, 5, 1, 1, channels_last=channels_last)]
    for dilation in (5, 2**62):
        out = ops.ddf(x, cf, sf, 5, dilation)
        expected = x * cf[:, :, 2, 2, None, None] * sf[:, 12:13]
        assert _max_diff(out, expected) < 1e-12
        got, want = _grads(out, [x, cf, sf]), _grads(expected, [x, cf, sf])
        assert all(_max_diff(g, w) < 1e-12 for g, w in zip(got, want))


def test_native_kernels_check_their_arguments_too(built):
    # Called directly, without the Python wrapper's checks.
    x, cf, sf = _ddf_inputs(2, 4, 8, 8, 3, 1, 1)
    with pytest.raises(RuntimeError, match="kernel_size must be odd"):
        torch.ops.dynrobust.ddf(x, cf, sf, 2, 1, 1, "mul", 1)
    with pytest.raises(RuntimeError, match="output size 8x8 does not fit a 8x8 input at stride 2"):
        torch.ops.dynrobust.ddf(x, cf, sf, 3, 1, 2, "mul", 1)
    with pytest.raises(RuntimeError, match="combine must be 'mul' or 'add'"):
        torch.ops.dynrobust.ddf(x, cf, sf, 3, 1, 1, "max", 1)
    with pytest.raises(RuntimeError, match="channel filter"):
        torch.ops.dynrobust.ddf(x, cf.float(), sf, 3, 1, 1, "mul", 1)


# ------------------------------------------------------------------ backends


def _fresh_choice(monkeypatch, env=None):
    monkeypatch.setattr(native, "_CHOSEN", {})
    if env is None:
        monkeypatch.delenv(native.ENV_BACKEND, raising=False)
    else:
        monkeypatch.setenv(native.ENV_BACKEND, env)


def test_fallback_warns_once_with_the_cause_and_gives_the_same_answer(monkeypatch):
    _fresh_choice(monkeypatch)

    def broken(*args, **kwargs):
        raise native.OpsBuildError("ninja is not installed (pip install ninja)")

    monkeypatch.setattr(native, "build", broken)
    x, cf, sf = _ddf_inputs(1, 4, 6, 6, 3, 1, 1)
    with pytest.warns(RuntimeWarning, match="reference .* because ninja is not installed"):
        out = ops.ddf(x, cf, sf, 3)
    assert torch.equal(out, ddf_reference(x, cf, sf, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        ops.ddf(x, cf, sf, 3)
    assert ops.backend_info().name == "reference"
    assert "ninja is not installed" in ops.backend_info().reason


def test_forcing_native_makes_a_failed_build_an_error(monkeypatch):
    _fresh_choice(monkeypatch, "native")

    def broken(*args, **kwargs):
        raise native.OpsBuildError("building the native ops failed: boom")

    monkeypatch.setattr(native, "build", broken)
    x, cf, sf = _ddf_inputs(1, 4, 6, 6, 3, 1, 1)
    with pytest.raises(native.OpsBuildError, match="boom"):
        ops.ddf(x, cf, sf, 3)


def test_forcing_reference_skips_the_build(monkeypatch):
    _fresh_choice(monkeypatch, "reference")
    monkeypatch.setattr(native, "build", lambda *a, **k: pytest.fail("must not build"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        info = ops.backend_info()
    assert (info.name, info.reason) == ("reference", "DYNROBUST_OPS=reference")


def test_nonsense_backend_is_an_error(monkeypatch):
    _fresh_choice(monkeypatch, "fastest")
    with pytest.raises(DynrobustError, match="DYNROBUST_OPS='fastest': must be 'native', 'reference' or unset"):
        ops.backend_info()


def test_build_key_follows_the_sources(monkeypatch, tmp_path):
    import shutil

    key = native.build_key(False)
    assert key == native.build_key(False)
    copy = tmp_path / "csrc"
    shutil.copytree(native.source_dir(), copy)
    monkeypatch.setattr(native, "source_dir", lambda: copy)
    assert native.build_key(False) == key
    kernel = copy / "ops" / "cpu" / "dynamic_filter_kernel.cpp"
    kernel.write_text(kernel.read_text() + "\n// changed\n")
    assert native.build_key(False) != key
    assert native.build_key(True) != native.build_key(False)
    header = copy / "ops" / "cuda" / "dynamic_filter_kernels.cuh"
    cuda_key = native.build_key(True)
    header.write_text(header.read_text() + "\n// changed\n")
    assert native.build_key(True) != cuda_key


def test_every_kernel_source_is_hashed_and_installed():
    # a source missing from the key would let a stale build serve changed code; one missing from the
    # package data would be absent from a wheel's install
    import fnmatch
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(__file__).resolve().parents[1]
    on_disk = {p.relative_to(root / "csrc").as_posix() for p in (root / "csrc").rglob("*")
               if p.suffix in (".h", ".cpp", ".cu", ".cuh")}
    assert set(native.CPU_SOURCES + native.HEADERS + native.CUDA_SOURCES + native.CUDA_HEADERS) == on_disk
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "robustbench_dyn._csrc"]
    assert all(any(fnmatch.fnmatch(rel, pattern) and rel.count("/") == pattern.count("/") for pattern in patterns)
               for rel in on_disk)


def test_cpu_arch_comes_from_the_environment_and_is_checked(monkeypatch):
    monkeypatch.delenv(native.ENV_CPU_ARCH, raising=False)
    assert native.cpu_arch() == "native"
    assert "-march=native" in native.cpu_flags()
    key = native.build_key(False)
    monkeypatch.setenv(native.ENV_CPU_ARCH, " x86-64-v3 ")
    assert native.cpu_flags() == ["-O3", "-march=x86-64-v3", "-ffp-contract=fast", "-fopenmp"]
    named = native.build_key(False)
    assert named != key
    # a build for a named target serves machines with other CPUs; a native one does not
    monkeypatch.setattr(native, "_cpu_signature", lambda: "x86_64|other CPU|flags: sse2")
    assert native.build_key(False) == named
    monkeypatch.delenv(native.ENV_CPU_ARCH)
    assert native.build_key(False) != key
    monkeypatch.setenv(native.ENV_CPU_ARCH, "native -fplugin=evil.so")
    with pytest.raises(DynrobustError, match="DYNROBUST_CPU_ARCH='native -fplugin=evil.so': not a -march name"):
        native.cpu_flags()


def _expected_vector_bytes() -> int:
    # what the kernels must use: the widest vector registers of the build target (too wide and GCC
    # keeps every vector on the stack, which made the kernels 3-6x slower on an AVX2 machine)
    arch = native.cpu_arch()
    if arch == "x86-64-v2":
        return 16
    assert arch == "native", f"no expectation for {arch}"
    words = set(native._cpu_signature().split())  # ends with /proc/cpuinfo's flags line
    return 64 if "avx512f" in words else 32 if "avx" in words else 16


def test_cpu_vector_width_follows_the_build_target(built):
    assert torch.ops.dynrobust.cpu_vector_bytes() == _expected_vector_bytes()


@pytest.mark.skipif(platform.machine() != "x86_64" or os.environ.get(native.ENV_CPU_ARCH) == "x86-64-v2",
                    reason="the narrow build is an x86-64 target (and this is it)")
def test_a_build_for_16_byte_vectors_passes_the_fast_path_tests(tmp_path):
    # This machine's build runs the NHWC kernels with its own vector width only. A second build for
    # SSE4.2 (x86-64-v2: 16-byte vectors, 4 float / 2 double lanes, as NEON has) runs the fast-path
    # tests again in a fresh process: other tile sizes, partial tiles and block splits.
    env = {**os.environ, native.ENV_CPU_ARCH: "x86-64-v2", native.ENV_CACHE: str(tmp_path),
           native.ENV_BACKEND: "native"}
    selection = ("vector_width or fast_path or tap_lane or strided_grad_x or channel_blocks "
                 "or native_matches_reference or large_channels or non_contiguous")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", __file__,
                             "-k", selection], env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    # the library was built for that target: its vectors are 16 bytes
    assert "PASSED tests/test_ops.py::test_cpu_vector_width_follows_the_build_target" in result.stdout
    assert len(list((tmp_path / "ops").glob("dynrobust_ops_cpu_*/*.so"))) == 1


def test_a_library_cut_short_is_rebuilt_not_loaded(built, tmp_path, monkeypatch):
    # A library whose bytes do not match the digest written after its build (a link killed midway,
    # a partial copy) crashed the process when loaded (SIGBUS); it is deleted and built again.
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path))
    monkeypatch.setattr(native, "_LOADED", {})
    name = native.library_name(False)
    library = tmp_path / "ops" / name / f"{name}.so"
    library.parent.mkdir(parents=True)
    library.write_bytes(built.read_bytes()[:1000])
    native._digest_file(library).write_text(hashlib.sha256(built.read_bytes()).hexdigest())
    (library.parent / "lock").write_text("")  # cpp_extension's lock file, left by a killed build
    compiled, loaded = [], []

    def compile_(name_, folder, with_cuda, verbose):
        assert not library.exists()  # removed first, so that ninja links it again
        assert not (folder / "lock").exists()  # torch before 2.14 would wait for it forever
        compiled.append(name_)
        library.write_bytes(built.read_bytes())

    monkeypatch.setattr(native, "_compile", compile_)
    monkeypatch.setattr(torch.ops, "load_library", lambda path: loaded.append(path))
    assert native.build(quiet=True) == library
    assert compiled == [name] and loaded == [str(library)] and native._intact(library)
    monkeypatch.setattr(native, "_LOADED", {})
    native.build(quiet=True)  # intact now: loaded without compiling
    assert compiled == [name] and loaded == [str(library)] * 2


_RACING_BUILD = """
import sys, time
from pathlib import Path
import torch
from robustbench_dyn.ops import native
role, log, real = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
arrived = log.with_name("second-arrived")

def compile_(name, folder, with_cuda, verbose):  # the compiler's part: the real library copied in
    with log.open("a") as f:
        f.write(f"start {role}\\n")
    if role == "first":  # compile until the second process is inside build() too
        deadline = time.time() + 120
        while not arrived.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
    (folder / f"{name}.so").write_bytes(real.read_bytes())
    with log.open("a") as f:
        f.write(f"end {role}\\n")

native._compile = compile_
if role == "second":
    while not log.exists():  # the first process is compiling
        time.sleep(0.05)
    arrived.touch()
print(native.build())
print(torch.ops.dynrobust.cpu_vector_bytes())
"""


def test_processes_building_at_once_compile_once(built, tmp_path):
    # Two processes on a fresh cache (one per GPU, say): the second waits for the first's build and
    # loads its library, instead of deleting it and linking its own under it.
    env = {**os.environ, native.ENV_CACHE: str(tmp_path / "cache")}
    log = tmp_path / "log" / "compiles"
    log.parent.mkdir()
    runs = [subprocess.Popen([sys.executable, "-c", _RACING_BUILD, role, str(log), str(built)], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for role in ("first", "second")]
    (out1, err1), (out2, err2) = (run.communicate(timeout=300) for run in runs)
    assert [run.returncode for run in runs] == [0, 0], err1[-2000:] + err2[-2000:]
    assert log.read_text() == "start first\nend first\n"
    assert "waiting for another process that is compiling the native ops" in err2
    assert "dynrobust: compiling the native ops into" in err1 and "dynrobust: compiling" not in err2
    library = out1.splitlines()[0]
    assert out2.splitlines()[0] == library and native._intact(Path(library))
    assert out1.splitlines()[1] == out2.splitlines()[1] == str(torch.ops.dynrobust.cpu_vector_bytes())


def test_a_cache_without_file_locks_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path))
    monkeypatch.setattr(native, "_LOADED", {})

    def flock(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(native.fcntl, "flock", flock)
    monkeypatch.setattr(native, "_compile", lambda *args: pytest.fail("compiled without the lock"))
    with pytest.raises(native.OpsBuildError, match=f"cannot write the ops cache {tmp_path}/ops/.*"
                                                   f"{os.strerror(errno.ENOLCK)}; set {native.ENV_CACHE}"):
        native.build(quiet=True)


def test_a_system_without_flock_cannot_build_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path))
    monkeypatch.setattr(native, "_LOADED", {})
    monkeypatch.setattr(native, "fcntl", None)
    monkeypatch.setattr(native, "_compile", lambda *args: pytest.fail("compiled without the lock"))
    with pytest.raises(native.OpsBuildError, match="building the native ops needs a POSIX system"):
        native.build(quiet=True)


def test_an_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(native.ENV_CACHE, str(blocker))
    monkeypatch.setattr(native, "_LOADED", {})
    with pytest.raises(native.OpsBuildError, match=f"cannot write the ops cache {blocker}/ops/.*"
                                                   f"set {native.ENV_CACHE} to a writable folder"):
        native.build(quiet=True)
    result = subprocess.run([sys.executable, "-m", "robustbench_dyn", "ops", "info"], capture_output=True, text=True,
                            env={**os.environ, native.ENV_CACHE: str(blocker)}, timeout=300)
    assert "Traceback" not in result.stderr and "cannot write the ops cache" in result.stdout + result.stderr


def test_environment_is_restored(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    monkeypatch.delenv("DYNROBUST_TEST_UNSET", raising=False)
    with native._environment(TORCH_CUDA_ARCH_LIST="7.5", DYNROBUST_TEST_UNSET="1"):
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == "7.5" and os.environ["DYNROBUST_TEST_UNSET"] == "1"
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.6"
    assert "DYNROBUST_TEST_UNSET" not in os.environ


# ------------------------------------------------------------------ MAC counting


def test_count_macs_uses_the_formulas_and_nests():
    x, cf, sf = _ddf_inputs(2, 4, 8, 6, 3, 2, 1)
    xi, kernel = _involution_inputs(1, 8, 7, 7, 7, 1, 2)
    with ops.count_macs() as outer:
        ops.ddf(x, cf, sf, 3, stride=2)
        with ops.count_macs() as inner:
            ops.involution(xi, kernel, 7)
    # DDF: combine + apply per tap and output element; involution: apply only.
    assert inner[0] == 1 * 8 * 7 * 7 * 49
    assert outer[0] == 2 * (2 * 4 * 4 * 3 * 9) + inner[0]
    assert ops.ddf_macs(2, 4, 4, 3, 3) == 2 * 2 * 4 * 4 * 3 * 9


# ------------------------------------------------------------------ CLI


def test_cli_ops_info_and_build(built):
    runner = CliRunner()
    result = runner.invoke(app, ["ops", "info", "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["cpu"]["backend"] == ops.backend_info().name
    assert report["cpu_arch"] == native.cpu_arch()
    assert report["cpu_vector_bytes"] == _expected_vector_bytes()
    result = runner.invoke(app, ["ops", "build"])
    assert result.exit_code == 0, result.output
    assert str(built) in result.output


def test_ops_info_says_when_the_cuda_toolkit_torch_found_cannot_build(built, tmp_path, monkeypatch):
    # nvcc linked into /usr/local/bin makes torch guess CUDA_HOME=/usr/local, which has no headers
    cpp_extension = native._cpp_extension()
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    runner = CliRunner()
    result = runner.invoke(app, ["ops", "info"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("CUDA toolkit"))
    assert f"{tmp_path}, unusable: CUDA_HOME={tmp_path} has no include/cuda_runtime.h" in row
    with pytest.raises(native.OpsBuildError, match="has no include/cuda_runtime.h"):
        native._check_toolchain(with_cuda=True)
    # with the header there, the same folder is reported as it is
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime.h").write_text("")
    result = runner.invoke(app, ["ops", "info", "--format", "json"])
    report = json.loads(result.output[result.output.index("{"):])
    assert report["cuda_home"] == str(tmp_path) and report["cuda_home_problem"] is None
    result = runner.invoke(app, ["ops", "info"])
    row = next(line for line in result.output.splitlines() if line.startswith("CUDA toolkit"))
    assert row.split(None, 2)[2] == str(tmp_path)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    result = runner.invoke(app, ["ops", "info"])
    row = next(line for line in result.output.splitlines() if line.startswith("CUDA toolkit"))
    assert row.split(None, 2)[2] == "not found"


def test_cli_ops_build_failure_shows_the_full_log():
    # a subprocess, to see exactly what a user sees: the log in full, one error line, exit 1
    result = subprocess.run([sys.executable, "-c", "import sys; from robustbench_dyn.ops import native\n"
                             "def broken(*a, **k):\n"
                             "    raise native.OpsBuildError('building the native ops failed: oops', log='FULL LOG\\nline 2')\n"
                             "native.build = broken\n"
                             "from robustbench_dyn.cli import main\nmain(['ops', 'build'])"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "FULL LOG\nline 2" in result.stderr
    assert "error: building the native ops failed: oops" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ CUDA


@CUDA
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("combine", ["mul", "add"])
def test_cuda_ddf_matches_reference(built, dtype, tol, channels_last, combine):
    for k, d, s, head in [(3, 1, 1, 1), (5, 2, 2, 2), (7, 1, 2, 1)]:
        x, cf, sf = _ddf_inputs(2, 32, 13, 14, k, s, head, dtype=torch.float64, channels_last=channels_last)
        ref_inputs = [t.requires_grad_() for t in (x, cf, sf)]
        ref = ddf_reference(*ref_inputs, k, d, s, combine, head)
        cuda_inputs = [t.detach().to("cuda", dtype).requires_grad_() for t in (x, cf, sf)]
        out = ops.ddf(*cuda_inputs, k, d, s, combine, head)
        assert out.dtype == dtype and out.is_cuda
        scale = ref.abs().max().item()
        assert _max_diff(out.cpu(), ref) < tol * scale
        for got, want in zip(_grads(out, cuda_inputs), _grads(ref, ref_inputs)):
            assert _scaled_diff(got.cpu(), want) < tol


@CUDA
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_involution_matches_reference(built, dtype, tol, channels_last):
    for k, d, s, groups in [(3, 1, 1, 2), (7, 1, 2, 4), (7, 2, 1, 1)]:
        x, kernel = _involution_inputs(2, 64, 13, 14, k, s, groups, channels_last=channels_last)
        ref_inputs = [x.requires_grad_(), kernel.requires_grad_()]
        ref = involution_reference(*ref_inputs, k, d, s)
        cuda_inputs = [t.detach().to("cuda", dtype).requires_grad_() for t in ref_inputs]
        out = ops.involution(*cuda_inputs, k, d, s)
        assert _max_diff(out.cpu(), ref) < tol * ref.abs().max().item()
        for got, want in zip(_grads(out, cuda_inputs), _grads(ref, ref_inputs)):
            assert _scaled_diff(got.cpu(), want) < tol


@CUDA
def test_cuda_gradcheck_and_opcheck(built):
    inputs = [t.cuda().requires_grad_() for t in _ddf_inputs(1, 4, 7, 6, 3, 2, 2)]
    assert torch.autograd.gradcheck(lambda *t: ops.ddf(*t, 3, 1, 2, "mul", 2), inputs)
    xi, kernel = [t.cuda().requires_grad_() for t in _involution_inputs(1, 4, 7, 6, 3, 2, 2)]
    assert torch.autograd.gradcheck(lambda *t: ops.involution(*t, 3, 1, 2), (xi, kernel))
    torch.library.opcheck(torch.ops.dynrobust.ddf.default, (*[t.float() for t in inputs], 3, 1, 2, "add", 2))
    torch.library.opcheck(torch.ops.dynrobust.involution.default, (xi.float(), kernel.float(), 3, 1, 2))
