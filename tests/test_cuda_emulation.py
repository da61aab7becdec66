"""The CUDA kernels, run without a GPU: tests/cuda_emulation/emulate.cpp compiles
csrc/ops/cuda/dynamic_filter_kernels.cuh (the kernels and the host code that sizes and launches them,
which the CUDA build compiles with nvcc) as plain C++, and runs every block of a launch as 256 fibers
that share its __shared__ memory and meet at __syncthreads() and at warp shuffles. Its results are
compared with the pure-PyTorch reference, so a wrong index, grid-stride loop, launch size, block
reduction or missing barrier in the CUDA code fails here, on CI, and not first on a user's GPU. (The device's own float16 arithmetic and
speed are tested only where a GPU is present: the CUDA tests of test_ops.py.)
"""

import os

import pytest
import torch

from robustbench_dyn.ops import native
from robustbench_dyn.ops.reference import ddf_reference, involution_reference

HERE = os.path.dirname(os.path.abspath(__file__))
MUL, ADD, SPATIAL_ONLY = 0, 1, 2  # dynrobust::Combine


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """The emulation, compiled into a fresh folder (about half a minute)."""
    if not native._cpp_extension().is_ninja_available():
        pytest.fail("ninja is missing: scripts/setup installs it")
    root = native.source_dir()
    return native._cpp_extension().load(
        name="dynrobust_cuda_emulation",
        sources=[os.path.join(HERE, "cuda_emulation", "emulate.cpp"), str(root / "ops" / "dynamic_filter.cpp")],
        extra_include_paths=[str(root)], extra_cflags=["-O1"],
        build_directory=str(tmp_path_factory.mktemp("cuda_emulation")), verbose=False)


def _random(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _check(got, want, tol):
    scale = max(1.0, want.abs().max().item())
    assert got.shape == want.shape
    assert (got.double() - want).abs().max().item() < tol * scale


# k, dilation, stride, groups (DDF's heads), batch, channels, height, width. (3, ..., 19, 21) has
# more output pixels than a block has threads, so the NCHW grad_channel_filter's block loop strides;
# (3, ..., 40, 48, 50) more than one chunk of the NHWC one (2048 pixels) and a second, partial tile
# of 32 channels; k = 9 takes the NHWC grad_channel_filter's block per (b, c, tap)
GEOMETRIES = [(3, 1, 1, 1, 2, 8, 9, 10), (5, 2, 2, 2, 2, 8, 9, 11), (7, 1, 2, 1, 1, 4, 12, 9),
              (1, 1, 1, 4, 1, 8, 5, 6), (3, 1, 1, 2, 1, 4, 19, 21), (3, 1, 1, 4, 1, 40, 48, 50),
              (9, 1, 1, 1, 1, 4, 10, 11),
              # C a multiple of 32: the NHWC grad_spatial_filter's warp per pixel and 32 channels, with
              # 64 channels per group (two steps), 16 (two groups per warp, two warps per pixel) and
              # 1 (no shuffles)
              (3, 1, 1, 1, 1, 64, 7, 9), (7, 2, 1, 4, 1, 64, 9, 8), (5, 1, 2, 32, 1, 32, 9, 10)]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("combine", ["mul", "add"])
def test_emulated_cuda_ddf_matches_reference(emulated, geometry, channels_last, combine):
    k, d, s, head, b, c, h, w = geometry
    gen = torch.Generator().manual_seed(GEOMETRIES.index(geometry) * 4 + channels_last * 2 + (combine == "mul"))
    x, cf, sf = _random(gen, b, c, h, w), _random(gen, b, c, k, k), _random(gen, b, head * k * k, h // s, w // s)
    if channels_last:
        x, sf = x.contiguous(memory_format=torch.channels_last), sf.contiguous(memory_format=torch.channels_last)
    mode = MUL if combine == "mul" else ADD
    inputs = [t.clone().requires_grad_() for t in (x, cf, sf)]
    ref = ddf_reference(*inputs, k, d, s, combine, head)
    grad_out = _random(gen, *ref.shape)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)

    out = emulated.forward(x, cf, sf, k, d, s, head, mode)
    _check(out, ref.detach(), 1e-12)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for got, want in zip(emulated.backward(grad_out, x, cf, sf, k, d, s, head, mode), ref_grads):
        _check(got, want, 1e-12)


def _check_involution(emulated, geometry, channels_last, seed, max_blocks=0):
    """The emulated involution forward and backward against the reference's; returns the sizes."""
    k, d, s, groups, b, c, h, w = geometry
    gen = torch.Generator().manual_seed(seed)
    oh, ow = (h - 1) // s + 1, (w - 1) // s + 1  # involution's output size: ceil(H / s)
    x, kernel = _random(gen, b, c, h, w), _random(gen, b, groups, k * k, oh, ow)
    sf = kernel.reshape(b, groups * k * k, oh, ow)
    if channels_last:
        x, sf = x.contiguous(memory_format=torch.channels_last), sf.contiguous(memory_format=torch.channels_last)
    inputs = [x.clone().requires_grad_(), kernel.clone().requires_grad_()]
    ref = involution_reference(*inputs, k, d, s)
    grad_out = _random(gen, *ref.shape)
    ref_x, ref_kernel = torch.autograd.grad(ref, inputs, grad_out)

    _check(emulated.forward(x, None, sf, k, d, s, groups, SPATIAL_ONLY, max_blocks), ref.detach(), 1e-12)
    grad_x, grad_cf, grad_sf = emulated.backward(grad_out, x, None, sf, k, d, s, groups, SPATIAL_ONLY, max_blocks)
    assert grad_cf is None
    _check(grad_x, ref_x, 1e-12)
    _check(grad_sf.reshape(ref_kernel.shape), ref_kernel, 1e-12)
    return min(ref.numel(), x.numel(), sf.numel())


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_emulated_cuda_involution_matches_reference(emulated, geometry, channels_last):
    _check_involution(emulated, geometry, channels_last, 100 + GEOMETRIES.index(geometry) * 2 + channels_last)


# unit roundoff: rounding to the format moves a value by at most this times its size
ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_cuda_low_precision_accumulates_in_float32(emulated, dtype):
    # Computed from the same rounded inputs, the float32-accumulated result differs from the exact one
    # by its final rounding only, element by element; accumulating 49 taps (or 16 channels, or 132
    # pixels) in float16 or bfloat16 would add a rounding per term and break this bound.
    k, d, s, head, b, c, h, w = 7, 1, 1, 1, 1, 16, 11, 12
    gen = torch.Generator().manual_seed(3)
    x, cf, sf = _random(gen, b, c, h, w), _random(gen, b, c, k, k), _random(gen, b, head * k * k, h, w)
    low = [t.to(dtype) for t in (x, cf, sf)]
    exact = [t.double().requires_grad_() for t in low]
    ref = ddf_reference(*exact, k, d, s, "mul", head)
    grad_out = _random(gen, *ref.shape).to(dtype)
    ref_grads = torch.autograd.grad(ref, exact, grad_out.double())
    got = [emulated.forward(*low, k, d, s, head, MUL), *emulated.backward(grad_out, *low, k, d, s, head, MUL)]
    for value, want in zip(got, [ref.detach(), *ref_grads]):
        assert value.dtype == dtype
        # 1e-4: float32's own accumulation error (and float16's subnormal spacing) near zero
        bound = ROUNDOFF[dtype] * want.abs() + 1e-4
        assert ((value.double() - want).abs() <= bound).all()


def test_emulated_cuda_grid_stride_loops(emulated):
    # At most 2 blocks of 256 threads for well over 1024 elements: every thread's grid-stride loop
    # takes 3 or more steps
    for channels_last in (False, True):
        smallest = _check_involution(emulated, (3, 1, 2, 2, 2, 16, 13, 14), channels_last, 5, max_blocks=2)
        assert smallest > 2 * 256 * 2
