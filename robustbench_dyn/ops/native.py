"""Build, load and choose the compiled operators of ``csrc/``.

The sources are compiled just-in-time with ninja through ``torch.utils.cpp_extension`` into
``<cache>/ops/<key>/``, where the key hashes the sources, the torch and CUDA versions, the CUDA
architectures, the target CPU (``-march=native`` unless ``$DYNROBUST_CPU_ARCH`` names another) and
(for ``native``) the instruction set of the CPU it is built on.
A built library is loaded directly the next time, without calling the compiler.

Which implementation runs is decided once per process and device type (:func:`backend_for`):
``DYNROBUST_OPS=native`` requires the compiled kernels (an error if they cannot be built),
``DYNROBUST_OPS=reference`` uses the pure-PyTorch reference, and unset (or ``auto``) tries the
compiled kernels and falls back to the reference with one warning naming the cause.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import re
import sys
import threading
import warnings
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Optional

import torch

from robustbench_dyn.errors import DynrobustError

try:
    import fcntl  # builds are locked with flock (POSIX)
except ImportError:  # Windows: the package imports, the native build says why it cannot run
    fcntl = None

ENV_BACKEND = "DYNROBUST_OPS"
ENV_CACHE = "DYNROBUST_CACHE_DIR"
ENV_CPU_ARCH = "DYNROBUST_CPU_ARCH"
BACKENDS = ("native", "reference")

CPU_SOURCES = ("ops/dynamic_filter.cpp", "ops/ddf.cpp", "ops/involution.cpp", "ops/cpu/dynamic_filter_kernel.cpp")
CUDA_SOURCES = ("ops/cuda/dynamic_filter_kernel.cu",)
CUDA_HEADERS = ("ops/cuda/dynamic_filter_kernels.cuh",)
HEADERS = ("ops/dynamic_filter.h",)
# -ffp-contract=fast: multiply-adds become FMAs (the default for GNU C++, not for the -std=c++17
# that cpp_extension passes).
# -march comes from cpu_arch().
CPU_FLAGS = ("-O3", "-ffp-contract=fast", "-fopenmp")
# Architectures compiled when no GPU is visible to pick them from (a compile check, or a build
# for another machine): Ampere, Hopper. TORCH_CUDA_ARCH_LIST overrides.
DEFAULT_CUDA_ARCHS = "8.0;9.0"


class OpsBuildError(DynrobustError):
    """The compiled operators could not be built or loaded; ``log`` holds the compiler's output."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(message)
        self.log = log


def source_dir() -> Path:
    """The folder holding ``csrc/``'s sources (a checkout's ``csrc/`` or the installed package data)."""
    return Path(str(files("robustbench_dyn._csrc")))


def cache_dir() -> Path:
    """Root of the build cache: ``$DYNROBUST_CACHE_DIR``, else ``$XDG_CACHE_HOME/dynrobust``, else ``~/.cache/dynrobust``."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "dynrobust"


def cpu_arch() -> str:
    """The ``-march`` the CPU kernels are compiled for: ``$DYNROBUST_CPU_ARCH`` (for instance
    ``x86-64-v3`` for every AVX2 node of a cluster), else ``native``, this machine's CPU."""
    value = os.environ.get(ENV_CPU_ARCH, "").strip() or "native"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", value):
        raise DynrobustError(f"{ENV_CPU_ARCH}={os.environ[ENV_CPU_ARCH]!r}: not a -march name "
                             "(such as native, x86-64-v3, znver3 or armv8.2-a)")
    return value


def cpu_flags() -> list[str]:
    """The compiler flags of the CPU code."""
    return [CPU_FLAGS[0], f"-march={cpu_arch()}", *CPU_FLAGS[1:]]


def _cpu_signature() -> str:
    # -march=native code must not be reused on a CPU with fewer instructions: key on the CPU flags.
    flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def cuda_archs() -> str:
    """The CUDA architectures a CUDA build targets: ``TORCH_CUDA_ARCH_LIST``, else those of the
    visible GPUs, else :data:`DEFAULT_CUDA_ARCHS`."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return DEFAULT_CUDA_ARCHS


def build_key(with_cuda: bool) -> str:
    """Hex digest naming a build: sources, torch/CUDA versions, architectures and CPU."""
    digest = hashlib.sha256()
    root = source_dir()
    for rel in CPU_SOURCES + HEADERS + (CUDA_SOURCES + CUDA_HEADERS if with_cuda else ()):
        digest.update(rel.encode())
        digest.update((root / rel).read_bytes())
    digest.update(f"torch={torch.__version__}|cuda={torch.version.cuda}|with_cuda={with_cuda}".encode())
    if with_cuda:
        digest.update(cuda_archs().encode())
    digest.update(" ".join(cpu_flags()).encode())
    # -march=native code depends on this CPU; code for a named target only on the target, so one
    # build serves every machine of the cluster that shares the cache
    digest.update((_cpu_signature() if cpu_arch() == "native" else platform.machine()).encode())
    digest.update(sys.platform.encode())
    return digest.hexdigest()[:20]


def library_name(with_cuda: bool) -> str:
    return f"dynrobust_ops_{'cuda' if with_cuda else 'cpu'}_{build_key(with_cuda)}"


@contextlib.contextmanager
def _environment(**values: Optional[str]):
    """Set environment variables for the duration of the block and restore them afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is not None:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _cpp_extension():
    """torch.utils.cpp_extension, imported without its "No CUDA runtime is found" log line on
    machines without a GPU (a warning about nothing the user did, on every command)."""
    import logging

    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def cuda_home_problem() -> str | None:
    """Why the CUDA toolkit that torch found cannot build the kernels, or None when it can."""
    cuda_home = _cpp_extension().CUDA_HOME
    if cuda_home is None:
        return "no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH) to build the CUDA kernels"
    if not (Path(cuda_home) / "include" / "cuda_runtime.h").exists():
        # e.g. nvcc linked into /usr/local/bin makes torch guess CUDA_HOME=/usr/local
        return (f"CUDA_HOME={cuda_home} has no include/cuda_runtime.h: set CUDA_HOME "
                "to the CUDA toolkit's folder (e.g. /usr/local/cuda)")
    return None


def _check_toolchain(with_cuda: bool):
    cpp_extension = _cpp_extension()

    if not cpp_extension.is_ninja_available():
        raise OpsBuildError("ninja is not installed (pip install ninja); it builds the native ops")
    if with_cuda:
        problem = cuda_home_problem()
        if problem:
            raise OpsBuildError(problem)
        if torch.version.cuda is None:
            raise OpsBuildError(f"this torch ({torch.__version__}) is a CPU-only build; it cannot build CUDA kernels")


_LOADED: dict[bool, Path] = {}
_LOCK = threading.Lock()


def build(with_cuda: bool = False, verbose: bool = False, quiet: bool = False) -> Path:
    """Build (if needed) and load the native ops; return the shared library's path.

    ``with_cuda`` adds the CUDA kernels (needs nvcc and a CUDA build of torch, not a GPU).
    Raises :class:`OpsBuildError` with the compiler's full output if the build fails.
    """
    with _LOCK:
        if with_cuda in _LOADED:
            return _LOADED[with_cuda]
        if not with_cuda and True in _LOADED:  # the CUDA build holds the CPU kernels too
            return _LOADED[True]
        if _LOADED:  # the other flavour is loaded: both register the same op names
            other = loaded_library()
            raise OpsBuildError(f"the native ops are already loaded from {other} in this process; "
                                f"a {'CUDA' if with_cuda else 'CPU-only'} build needs a new process")
        name = library_name(with_cuda)
        folder = cache_dir() / "ops" / name
        library = folder / f"{name}.so"
        if not _intact(library):
            _check_toolchain(with_cuda)
            with _build_lock(folder, quiet):
                if not _intact(library):  # another process may have built it while this one waited
                    _build_into(name, folder, with_cuda, verbose, quiet)
        try:
            torch.ops.load_library(str(library))
        except (OSError, RuntimeError) as exc:
            raise OpsBuildError(f"cannot load {library}: {exc}") from exc
        from robustbench_dyn.ops import _registrations

        _registrations.register()
        _LOADED[with_cuda] = library
        return library


def _build_into(name: str, folder: Path, with_cuda: bool, verbose: bool, quiet: bool):
    """Compile library ``name`` into ``folder`` and write its digest; the caller holds the build lock."""
    library = folder / f"{name}.so"
    try:
        # a library without a matching digest was cut short (a link killed midway, a full disk, a
        # partial copy): loading it can crash the process (SIGBUS), and ninja would take it for up
        # to date. cpp_extension's own lock file, left by a build killed midway, made torch before
        # 2.14 wait for it forever; no other build is running now (the caller holds the lock).
        library.unlink(missing_ok=True)
        (folder / "lock").unlink(missing_ok=True)
    except OSError as exc:
        raise _cache_error(folder, exc) from None
    if not quiet:
        print(f"dynrobust: compiling the native ops{' with CUDA' if with_cuda else ''} into {folder} "
              "(once per source, torch version and machine; about a minute)", file=sys.stderr, flush=True)
    _compile(name, folder, with_cuda, verbose)
    _write_digest(library)


@contextlib.contextmanager
def _build_lock(folder: Path, quiet: bool):
    """Create ``folder`` and hold an exclusive lock on building into it, across processes.

    Several processes started at once on a fresh cache (one per GPU, a test run with workers)
    would otherwise delete and link the same library under each other (in the test of this, the
    second of two processes died of a segmentation fault). The lock is the kernel's
    (``flock``), so a build that is killed releases it.
    """
    if fcntl is None:
        raise OpsBuildError("building the native ops needs a POSIX system (Linux, macOS): "
                            f"{platform.system()} has no flock to serialise builds")
    lock_file = folder.parent / f"{folder.name}.lock"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise _cache_error(folder, exc) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not quiet:
                print(f"dynrobust: waiting for another process that is compiling the native ops into {folder}",
                      file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:  # a file system without locks
        os.close(fd)
        raise _cache_error(folder, exc) from None
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


def _digest_file(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _sha256(library: Path) -> str:
    return hashlib.sha256(library.read_bytes()).hexdigest()


def _intact(library: Path) -> bool:
    """True if ``library`` exists and matches the digest written when it was built."""
    try:
        return _digest_file(library).read_text().strip() == _sha256(library)
    except OSError:
        return False


def _write_digest(library: Path):
    temporary = _digest_file(library).with_suffix(f".{os.getpid()}.tmp")
    try:
        temporary.write_text(_sha256(library) + "\n")
        temporary.replace(_digest_file(library))
    except OSError as exc:
        raise _cache_error(library.parent, exc) from None


def _cache_error(folder: Path, exc: OSError) -> OpsBuildError:
    return OpsBuildError(f"cannot write the ops cache {folder}: {exc.strerror or exc}; set {ENV_CACHE} to a "
                         "writable folder")


def loaded_library() -> Optional[Path]:
    """The native ops library loaded in this process, or None."""
    return next(iter(_LOADED.values()), None)


def _compile(name: str, folder: Path, with_cuda: bool, verbose: bool):
    cpp_extension = _cpp_extension()

    root = source_dir()
    sources = [str(root / rel) for rel in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    # the C++ standard is left to cpp_extension (it matches the installed torch's headers)
    cflags = cpu_flags()
    cuda_flags = ["-O3"] if with_cuda else None
    if with_cuda:
        cflags.append("-DDYNROBUST_WITH_CUDA")
        cuda_flags.append("-DDYNROBUST_WITH_CUDA")
    arch = cuda_archs() if with_cuda else None
    try:
        with _environment(TORCH_CUDA_ARCH_LIST=arch):
            cpp_extension.load(name=name, sources=sources, extra_cflags=cflags, extra_cuda_cflags=cuda_flags,
                               extra_ldflags=["-fopenmp"], extra_include_paths=[str(root)],
                               build_directory=str(folder), with_cuda=with_cuda, is_python_module=False,
                               verbose=verbose)
    except (RuntimeError, OSError, ImportError, ValueError) as exc:
        log = str(exc)
        errors = [line.strip() for line in log.splitlines() if "error" in line.lower() and "Error building" not in line]
        first = errors[0] if errors else (log.splitlines()[0] if log else type(exc).__name__)
        raise OpsBuildError(f"building the native ops failed: {first} (run `dynrobust ops build"
                            f"{' --cuda' if with_cuda else ''}` for the full compiler output)", log) from exc
    # cpp_extension.load also loads the library; keep the path for the next process.
    if not (folder / f"{name}.so").exists():
        raise OpsBuildError(f"the build finished but {folder / (name + '.so')} is missing")


# ------------------------------------------------------------------------------------ choosing


@dataclass(frozen=True)
class DeviceBackend:
    """The implementation used for tensors of one device type and why."""

    device: str
    name: str  # 'native' or 'reference'
    reason: str


def requested_backend() -> str:
    """``native``, ``reference`` or ``auto``, from ``$DYNROBUST_OPS``; an error for anything else."""
    value = os.environ.get(ENV_BACKEND, "").strip().lower() or "auto"
    if value not in BACKENDS + ("auto",):
        raise DynrobustError(f"{ENV_BACKEND}={os.environ[ENV_BACKEND]!r}: must be 'native', 'reference' or unset")
    return value


_CHOSEN: dict[str, DeviceBackend] = {}


def backend_for(device_type: str) -> DeviceBackend:
    """Decide (once per process) which implementation runs for tensors on ``device_type``."""
    if device_type in _CHOSEN:
        return _CHOSEN[device_type]
    requested = requested_backend()
    if requested == "reference":
        choice = DeviceBackend(device_type, "reference", f"{ENV_BACKEND}=reference")
    elif device_type == "meta":
        # shapes only, nothing is computed (e.g. counting MACs): not a fallback worth a warning
        choice = DeviceBackend(device_type, "reference", "meta tensors carry no data")
        _CHOSEN[device_type] = choice
        return choice
    elif device_type not in ("cpu", "cuda"):
        if requested == "native":
            raise DynrobustError(f"{ENV_BACKEND}=native: there are no native kernels for {device_type} tensors")
        choice = DeviceBackend(device_type, "reference", f"no native kernels for {device_type} tensors")
    else:
        try:
            if device_type == "cuda":
                build(with_cuda=True)
            elif _cuda_build_wanted():
                try:
                    build(with_cuda=True)
                except OpsBuildError as cuda_exc:
                    warnings.warn(f"dynrobust ops: the CUDA kernels did not build ({cuda_exc}); "
                                  "building the CPU kernels only", RuntimeWarning, stacklevel=3)
                    build(with_cuda=False)
            else:
                build(with_cuda=False)
            choice = DeviceBackend(device_type, "native",
                                   f"{ENV_BACKEND}=native" if requested == "native" else "compiled kernels loaded")
        except OpsBuildError as exc:
            if requested == "native":
                raise
            choice = DeviceBackend(device_type, "reference", f"native ops unavailable: {exc}")
    if choice.name == "reference" and requested == "auto":
        warnings.warn(f"dynrobust ops: using the slow pure-PyTorch reference for {device_type} tensors "
                      f"because {choice.reason.removeprefix('native ops unavailable: ')}; "
                      f"set {ENV_BACKEND}=reference to silence this", RuntimeWarning, stacklevel=3)
    _CHOSEN[device_type] = choice
    return choice


def _cuda_build_wanted() -> bool:
    # A process with a GPU builds one library with both backends (the op names can be registered once).
    if not (torch.cuda.is_available() and torch.version.cuda is not None):
        return False
    return _cpp_extension().CUDA_HOME is not None
