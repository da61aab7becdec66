"""``dynrobust ops``: which implementation of the DDF and involution operators runs, and building them."""

from __future__ import annotations

import json
import os

import click
import torch

from robustbench_dyn.ops import native


@click.group("ops")
def ops_group():
    """The compiled DDF and involution operators (csrc/): status and ahead-of-time builds."""


def _toolchain() -> dict:
    cpp_extension = native._cpp_extension()

    return {
        "ninja": cpp_extension.is_ninja_available(),
        "cuda_home": cpp_extension.CUDA_HOME,
        "cuda_home_problem": native.cuda_home_problem() if cpp_extension.CUDA_HOME else None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }


@ops_group.command("info")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def info_command(fmt):
    """Say which backend runs for CPU and CUDA tensors and why (may build the kernels, once)."""
    from robustbench_dyn import ops

    info = ops.backend_info()
    report = {
        "requested": native.requested_backend(),
        "cpu": {"backend": info.name, "reason": info.reason},
        "cuda": ({"backend": info.cuda, "reason": info.cuda_reason} if info.cuda else None),
        "library": str(native.loaded_library()) if native.loaded_library() else None,
        "cache_dir": str(native.cache_dir()),
        "sources": str(native.source_dir()),
        "cuda_archs": native.cuda_archs() if torch.version.cuda else None,
        "cpu_arch": native.cpu_arch(),
        "cpu_vector_bytes": int(torch.ops.dynrobust.cpu_vector_bytes()) if native.loaded_library() else None,
        **_toolchain(),
    }
    if fmt == "json":
        click.echo(json.dumps(report, indent=2))
        return
    rows = [
        ("requested", f"{report['requested']} (set {native.ENV_BACKEND}=native|reference to force one)"),
        ("cpu tensors", f"{info.name}: {info.reason}"),
        ("cuda tensors", f"{info.cuda}: {info.cuda_reason}" if info.cuda else "no GPU visible"),
        ("library", report["library"] or "-"),
        ("CPU target", f"-march={report['cpu_arch']} (set {native.ENV_CPU_ARCH} to build for another CPU)"
         + (f"; vectors of {report['cpu_vector_bytes']} bytes" if report["cpu_vector_bytes"] else "")),
        ("build cache", report["cache_dir"]),
        ("sources", report["sources"]),
        ("torch", f"{report['torch']} (CUDA {report['torch_cuda'] or 'none'})"),
        ("CUDA toolkit", (f"{report['cuda_home']}, unusable: {report['cuda_home_problem']}"
                          if report["cuda_home_problem"] else report["cuda_home"] or "not found")),
        ("ninja", "yes" if report["ninja"] else "no (pip install ninja)"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name:<{width}}  {value}")


@ops_group.command("build")
@click.option("--cuda", is_flag=True, help="Also compile the CUDA kernels (needs nvcc and a CUDA build of torch; "
              "no GPU needed: without one, TORCH_CUDA_ARCH_LIST or " + native.DEFAULT_CUDA_ARCHS + " is targeted).")
@click.option("--verbose", is_flag=True, help="Show every compiler command.")
def build_command(cuda, verbose):
    """Build the native ops ahead of time into the cache; compiler errors are shown in full."""
    try:
        library = native.build(with_cuda=cuda, verbose=verbose)
    except native.OpsBuildError as exc:
        if exc.log:
            click.echo(exc.log, err=True)
        raise
    click.echo(f"built {'CPU + CUDA' if cuda else 'CPU'} ops: {library}")
    if cuda:
        click.echo(f"CUDA architectures: {native.cuda_archs()}")
    if os.environ.get(native.ENV_BACKEND, "").lower() == "reference":
        click.echo(f"note: {native.ENV_BACKEND}=reference is set, so the reference still runs", err=True)
