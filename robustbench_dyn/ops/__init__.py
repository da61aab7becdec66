"""The dynamic operators: DDF and involution.

``ddf`` and ``involution`` validate their inputs and run either the compiled kernels of
``csrc/`` (built just-in-time, see :mod:`robustbench_dyn.ops.build`) or the pure-PyTorch reference
(:mod:`robustbench_dyn.ops.reference`). Which one runs is decided once per process, see
:func:`backend_info`; falling back to the reference is never silent.
"""

from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass
from typing import Optional, Union

import torch

from robustbench_dyn.ops.native import OpsBuildError, backend_for
from robustbench_dyn.ops.reference import ddf_reference, involution_reference

__all__ = ["ddf", "involution", "ddf_reference", "involution_reference", "ddf_macs", "involution_macs",
           "count_macs", "backend_info", "record_backends", "BackendInfo", "OpsBuildError"]

# Active MAC counters (see count_macs): the dynamic ops are invisible to torch.utils.flop_counter.
_MAC_COUNTERS: list = []

COMBINES = ("mul", "add")


def _integer(value) -> Optional[int]:
    """value as an int if it is an integer (int, numpy or 0-d integer tensor: whatever supports
    ``operator.index``) and not a bool, else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _check_common(name: str, x: torch.Tensor, kernel_size: int, dilation: int, stride: int):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{name}: x must be a 4-D tensor (B, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{name}: x has no pixels ({x.shape[2]}x{x.shape[3]})")
    k = _integer(kernel_size)
    if k is None or k < 1 or k % 2 == 0:
        raise ValueError(f"{name}: kernel_size must be a positive odd integer, got {kernel_size!r}")
    for what, value in (("dilation", dilation), ("stride", stride)):
        v = _integer(value)
        if v is None or v < 1:
            raise ValueError(f"{name}: {what} must be a positive integer, got {value!r}")


def _geometry(x: torch.Tensor, kernel_size, dilation, stride) -> tuple[int, int, int]:
    """kernel_size, dilation, stride as ints (checked by _check_common), the dilation clamped to
    max(H, W): from there on every tap but the centre lies outside the image for every pixel, so the
    result is the same, and the reference's padding (and the kernels' reach) stays small."""
    return int(kernel_size), min(int(dilation), max(x.shape[2], x.shape[3])), int(stride)


def _check_same(name: str, tensors: dict[str, torch.Tensor]):
    ref_name, ref = next(iter(tensors.items()))
    for other_name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: {other_name} must be a tensor, got {type(t).__name__}")
        if t.device != ref.device:
            raise ValueError(f"{name}: {ref_name} is on {ref.device} but {other_name} is on {t.device}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: {other_name} must be floating point, got {t.dtype}")


def _common_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # Under autocast the filters may come out of a layer in another precision than x: compute in
    # the widest of them, as an elementwise torch op would.
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _use_native(device_type: str) -> bool:
    # Decided once per process (it may compile the kernels); torch.compile runs it while tracing
    # and keeps the answer as a constant (marked below).
    return backend_for(device_type).name == "native"


# What torch.compiler.assume_constant_result does, without importing torch._dynamo (1.3 s) at
# import time; tests/test_ops.py's torch.compile test fails if a torch release changes this.
_use_native._dynamo_marked_constant = True


_BACKEND_RECORDERS: list = []


@contextlib.contextmanager
def record_backends():
    """Record which backend the dynamic ops called inside the block ran on, per device type.

    Yields a dict that fills as ops run, e.g. ``{'cpu': 'native'}``; it stays empty for a model
    without DDF or involution. (Under ``torch.compile`` only the call that traces is seen.)
    """
    seen: dict[str, str] = {}
    _BACKEND_RECORDERS.append(seen)
    try:
        yield seen
    finally:
        _BACKEND_RECORDERS.remove(seen)


def _run_native(device_type: str) -> bool:
    native = _use_native(device_type)
    for seen in _BACKEND_RECORDERS:
        seen[device_type] = "native" if native else "reference"
    return native


def check_ddf_args(x, channel_filter, spatial_filter, kernel_size, dilation, stride, combine, head):
    """Raise ValueError with a clear message unless the DDF arguments are consistent."""
    _check_common("ddf", x, kernel_size, dilation, stride)
    _check_same("ddf", {"x": x, "channel_filter": channel_filter, "spatial_filter": spatial_filter})
    b, c, h, w = x.shape
    k, stride = int(kernel_size), int(stride)
    if combine not in COMBINES:
        raise ValueError(f"ddf: combine must be one of {COMBINES}, got {combine!r}")
    if _integer(head) is None or head < 1 or c % head:
        raise ValueError(f"ddf: head must be a positive divisor of the {c} channels, got {head!r}")
    head = int(head)
    if h // stride < 1 or w // stride < 1:
        raise ValueError(f"ddf: input {h}x{w} is smaller than the stride {stride}")
    want_cf = (b, c, k, k)
    if tuple(channel_filter.shape) != want_cf:
        raise ValueError(f"ddf: channel_filter must have shape (B, C, k, k) = {want_cf}, "
                         f"got {tuple(channel_filter.shape)}")
    want_sf = (b, head * k * k, h // stride, w // stride)
    if tuple(spatial_filter.shape) != want_sf:
        raise ValueError(f"ddf: spatial_filter must have shape (B, head*k*k, H//stride, W//stride) = "
                         f"{want_sf}, got {tuple(spatial_filter.shape)}")


def check_involution_args(x, kernel, kernel_size, dilation, stride):
    """Raise ValueError with a clear message unless the involution arguments are consistent."""
    _check_common("involution", x, kernel_size, dilation, stride)
    b, c, h, w = x.shape
    kernel_size, stride = int(kernel_size), int(stride)
    _check_same("involution", {"x": x, "kernel": kernel})
    if kernel.dim() != 5:
        raise ValueError(f"involution: kernel must be a 5-D tensor (B, G, k*k, H', W'), got {tuple(kernel.shape)}")
    g = kernel.shape[1]
    if g < 1 or c % g:
        raise ValueError(f"involution: the kernel's {g} groups must divide the {c} channels")
    out_h, out_w = (h - 1) // stride + 1, (w - 1) // stride + 1
    want = (b, g, kernel_size * kernel_size, out_h, out_w)
    if tuple(kernel.shape) != want:
        raise ValueError(f"involution: kernel must have shape (B, G, k*k, ceil(H/stride), ceil(W/stride)) = "
                         f"{want}, got {tuple(kernel.shape)}")


def ddf(x: torch.Tensor, channel_filter: torch.Tensor, spatial_filter: torch.Tensor, kernel_size: int,
        dilation: int = 1, stride: int = 1, combine: str = "mul", head: int = 1) -> torch.Tensor:
    """Decoupled dynamic filter: ``x`` (B, C, H, W) filtered per pixel and channel.

    ``channel_filter`` (B, C, k, k), ``spatial_filter`` (B, head*k*k, H//stride, W//stride);
    the filter at (c, y, x) is channel_filter[c] * spatial_filter[head(c), :, y, x] (``'mul'``)
    or their sum (``'add'``). Returns (B, C, H//stride, W//stride), zero padding outside the image.
    """
    check_ddf_args(x, channel_filter, spatial_filter, kernel_size, dilation, stride, combine, head)
    kernel_size, dilation, stride = _geometry(x, kernel_size, dilation, stride)
    head = int(head)
    if _MAC_COUNTERS:
        _count(ddf_macs(spatial_filter.shape[0], x.shape[1], *spatial_filter.shape[-2:], kernel_size))
    dtype = _common_dtype(x, channel_filter, spatial_filter)
    x, channel_filter, spatial_filter = x.to(dtype), channel_filter.to(dtype), spatial_filter.to(dtype)
    if _run_native(x.device.type):
        return torch.ops.dynrobust.ddf(x, channel_filter, spatial_filter, kernel_size, dilation, stride, combine, head)
    return ddf_reference(x, channel_filter, spatial_filter, kernel_size, dilation, stride, combine, head)


def involution(x: torch.Tensor, kernel: torch.Tensor, kernel_size: int, dilation: int = 1,
               stride: int = 1) -> torch.Tensor:
    """Involution: ``x`` (B, C, H, W) filtered by a per-pixel kernel (B, G, k*k, H', W') shared by
    the C/G contiguous channels of each group. Padding (k-1)//2 * dilation, so H' = ceil(H / stride).
    Returns (B, C, H', W').
    """
    check_involution_args(x, kernel, kernel_size, dilation, stride)
    kernel_size, dilation, stride = _geometry(x, kernel_size, dilation, stride)
    if _MAC_COUNTERS:
        _count(involution_macs(x.shape[0], x.shape[1], *kernel.shape[-2:], kernel_size))
    dtype = _common_dtype(x, kernel)
    x, kernel = x.to(dtype), kernel.to(dtype)
    if _run_native(x.device.type):
        return torch.ops.dynrobust.involution(x, kernel, kernel_size, dilation, stride)
    return involution_reference(x, kernel, kernel_size, dilation, stride)


@dataclass(frozen=True)
class BackendInfo:
    """Which implementation of the ops runs in this process and why.

    ``name`` is 'native' or 'reference' for CPU tensors (the default device), ``reason`` why;
    ``cuda`` and ``cuda_reason`` the same for CUDA tensors (None without a GPU).
    """

    name: str
    reason: str
    cuda: Optional[str] = None
    cuda_reason: Optional[str] = None

    def for_device(self, device: Union[str, torch.device]) -> str:
        """'native' or 'reference' for tensors on ``device``."""
        return self.cuda if torch.device(device).type == "cuda" and self.cuda else self.name


def backend_info() -> BackendInfo:
    """The ops backend of this process for CPU and (when a GPU is present) CUDA tensors.

    Decides it if no op has run yet, which may compile the native kernels (once per machine).
    """
    cpu = backend_for("cpu")
    cuda = backend_for("cuda") if torch.cuda.is_available() else None
    return BackendInfo(cpu.name, cpu.reason, cuda and cuda.name, cuda and cuda.reason)


def ddf_macs(batch: int, channels: int, out_h: int, out_w: int, kernel_size: int) -> int:
    """Multiply-accumulates of one DDF call: combining the two filters (one multiply or add per
    tap) and applying the result (one MAC per tap), so 2 * B * C * H' * W' * k^2.

    The DDF paper (Sec. 4.1) counts the same work as 3nck^2 FLOPs (combine 1, apply 2).
    """
    return 2 * batch * channels * out_h * out_w * kernel_size * kernel_size


def involution_macs(batch: int, channels: int, out_h: int, out_w: int, kernel_size: int) -> int:
    """Multiply-accumulates of one involution call: one per tap per output element,
    B * C * H' * W' * k^2 (kernel generation is ordinary convolutions, counted elsewhere)."""
    return batch * channels * out_h * out_w * kernel_size * kernel_size


def _count(macs: int):
    for counter in _MAC_COUNTERS:
        counter[0] += macs


@contextlib.contextmanager
def count_macs():
    """Count the multiply-accumulates of the dynamic ops called inside the block.

    Yields a one-element list whose item is the running total (an int, in MACs)::

        with count_macs() as macs:
            model(x)
        print(macs[0])
    """
    counter = [0]
    _MAC_COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _MAC_COUNTERS.remove(counter)
