"""The ``dynrobust`` command line: a click group; each subcommand lives in its own module.

Exit codes are decided here, in one place: 0 success, 1 a user error (one line on stderr, no
traceback), 2 a usage error (click's), 130 interrupted.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

# Large CPU tensors on transparent huge pages (PyTorch reads this once, at its first allocation, so
# it is set before any command imports torch). glibc hands allocations over 32 MB back to the system
# when they are freed, so every forward pass page-faults its large activations in afresh: RedNet's
# involution kernels are 78 MB per stage-1 layer at batch 32. Measured with `dynrobust profile -b 32
# --channels-last` on 2 CPU cores (benchmarks/RESULTS.md): rednet50 16-21% faster, rednet26 15-26%,
# resnet50 about 5%. THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import click

from robustbench_dyn import __version__
from robustbench_dyn.errors import DynrobustError

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="dynrobust")
def app():
    """dynrobust: is this convolution robust?

    Corrupt images the ImageNet-C way, evaluate models on ImageNet-C, and compare robustness.
    """


def _register_commands():
    # imported here so that `dynrobust --help` stays fast and each command module stays independent
    from robustbench_dyn.cli import corrupt, demo

    app.add_command(corrupt.corrupt_command)
    app.add_command(demo.demo_command)
    from robustbench_dyn.cli import metrics
    app.add_command(metrics.metrics_command)

    from robustbench_dyn.cli import eval as eval_module

    app.add_command(eval_module.eval_command)

    from robustbench_dyn.cli import ops as ops_module

    app.add_command(ops_module.ops_group)

    from robustbench_dyn.cli import features, report, spectrum

    app.add_command(spectrum.spectrum_command)
    app.add_command(report.report_command)
    app.add_command(features.features_command)

    from robustbench_dyn.cli import models, profile

    app.add_command(models.models_command)
    app.add_command(profile.profile_command)


_register_commands()

# glibc's M_TRIM_THRESHOLD and M_MMAP_MAX (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_MALLOC_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Make glibc serve every block from its heap and keep freed memory for reuse; True if it did.

    glibc maps blocks over 32 MB (its largest mmap threshold) afresh on each allocation and unmaps
    them when freed, so a forward pass at batch 32 page-faults its large activations in again and
    the kernel zeroes every page. Kept in the heap, the next pass reuses them: `dynrobust profile
    -b 32 --channels-last` on 2 CPU cores ran 15-33% faster (resnet50, rednet50, binet50_dcca,
    ddf_resnet50; benchmarks/RESULTS.md), for a peak resident memory 30-50% higher. Left alone
    when the environment already sets one of glibc's malloc variables (MALLOC_MMAP_MAX_=65536
    restores glibc's default) or GLIBC_TUNABLES names a malloc tunable, and off glibc.
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _MALLOC_SETTINGS) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def main(argv=None):
    """Console-script entry point: run the app and turn user errors into one line and exit 1."""
    keep_freed_memory()
    try:
        code = app.main(args=argv, prog_name="dynrobust", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except DynrobustError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USER_ERROR)
    sys.exit(code if isinstance(code, int) else 0)
