"""Model cost and speed: parameters, multiply-accumulates (MACs), latency and peak memory.

``torch.utils.flop_counter`` counts the convolutions and matrix products (grouped, per-sample
convolutions included); the dynamic ops (:mod:`robustbench_dyn.ops`) are invisible to it and are
counted with their own formulas (:func:`robustbench_dyn.ops.ddf_macs`,
:func:`robustbench_dyn.ops.involution_macs`). A module can add work the counter cannot see (the
element-wise products of ODConv's attentions) by defining ``uncounted_macs(inputs, output) -> int``;
:func:`model_macs` calls it from a forward hook. The papers' "FLOPs" are multiply-accumulates, so
these numbers compare with them directly.

:func:`model_costs` measures parameters and MACs of registered models on the meta device (shapes
only, no memory, no arithmetic) and caches them, keyed by the model code and torch version, so
that ``dynrobust models`` adds well under a second to the CLI's start-up once the cache is warm.
:func:`profile_model` times real forward passes (``dynrobust profile``).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import platform
import statistics
import time
import warnings
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from robustbench_dyn import ops
from robustbench_dyn.errors import DynrobustError

UNCOUNTED_MACS = "uncounted_macs"  # the method a module defines to report MACs the flop counter misses
MIN_IMAGE_SIZE = 32  # every zoo model downsamples 32x; smaller inputs vanish before the classifier
COST_CACHE_VERSION = 1


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (learnable tensors' elements; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def _model_device(model: torch.nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@torch.no_grad()
def macs_by_kind(model: torch.nn.Module, image_size: int = 224,
                 device: Union[str, torch.device, None] = None) -> dict[str, int]:
    """The multiply-accumulates of one forward pass on one ``image_size`` x ``image_size`` RGB image,
    by who counted them: ``counted`` (torch's flop counter: convolutions, linear layers, matrix
    products; FLOPs / 2), ``dynamic_ops`` (:mod:`robustbench_dyn.ops` calls, by their formulas) and
    ``uncounted`` (what modules report through ``uncounted_macs``).

    ``device`` defaults to the model's (a model on the meta device is counted without arithmetic).
    """
    device = torch.device(device) if device is not None else _model_device(model)
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    extra = [0]

    def hook(module, inputs, output):
        extra[0] += int(getattr(module, UNCOUNTED_MACS)(inputs, output))

    handles = [m.register_forward_hook(hook) for m in model.modules() if callable(getattr(m, UNCOUNTED_MACS, None))]
    try:
        with FlopCounterMode(display=False) as flops, ops.count_macs() as dynamic:
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return {"counted": flops.get_total_flops() // 2, "dynamic_ops": dynamic[0], "uncounted": extra[0]}


def model_macs(model: torch.nn.Module, image_size: int = 224, device: Union[str, torch.device, None] = None) -> int:
    """Multiply-accumulates of one forward pass on one ``image_size`` x ``image_size`` RGB image.

    Convolutions, linear layers and matrix products as torch's flop counter sees them (FLOPs / 2),
    plus the dynamic ops by formula, plus what modules report through ``uncounted_macs``
    (see :func:`macs_by_kind`). Normalisation, activations, pooling and softmax are not counted,
    as in the papers. ``device`` defaults to the model's.
    """
    return sum(macs_by_kind(model, image_size, device).values())


# ----------------------------------------------------------------------------- costs of the zoo


@dataclass(frozen=True)
class ModelCost:
    """A registered model's size and compute, measured on the meta device: ``params`` (count),
    ``macs`` (per image at ``image_size`` x ``image_size``, all kinds), ``dynamic_op_macs`` (the
    part done by :mod:`robustbench_dyn.ops`; 0 for a model that does not use them)."""

    name: str
    params: int
    macs: int
    dynamic_op_macs: int
    image_size: int = 224

    @property
    def uses_dynamic_ops(self) -> bool:
        return self.dynamic_op_macs > 0


def build_on_meta(name: str, **kwargs) -> torch.nn.Module:
    """A registered model built on the meta device (shapes only; nothing allocated or initialised)."""
    from robustbench_dyn.models import create_model

    with torch.device("meta"):
        return create_model(name, **kwargs)


def measure_cost(name: str, image_size: int = 224) -> ModelCost:
    """Parameters and MACs of a registered model, measured now on the meta device (no cache)."""
    model = build_on_meta(name)
    kinds = macs_by_kind(model, image_size)
    return ModelCost(name, count_parameters(model), sum(kinds.values()), kinds["dynamic_ops"], image_size)


def cost_cache_file() -> Path:
    """Where :func:`model_costs` keeps measured costs: ``model_costs.json`` in the ops' cache folder
    (``$DYNROBUST_CACHE_DIR``, ``$XDG_CACHE_HOME/dynrobust`` or ``~/.cache/dynrobust``)."""
    from robustbench_dyn.ops.native import cache_dir

    return cache_dir() / "model_costs.json"


def _code_key(name: str) -> str:
    """What a cached cost depends on: torch's version, the model code (every file of the models
    package, since families build on each other, and the builder's own file for a model registered
    elsewhere), the ops and this counter. Any change to them makes the entry stale."""
    import inspect

    from robustbench_dyn.models.registry import _entry

    package = Path(__file__).resolve().parent
    files = {Path(__file__).resolve(), *(package / "models").glob("*.py"), *(package / "ops").glob("*.py")}
    source = inspect.getsourcefile(_entry(name).builder)
    if source:
        files.add(Path(source).resolve())
    digest = hashlib.sha256(f"{COST_CACHE_VERSION}|{torch.__version__}|{name}".encode())
    for path in sorted(files):
        digest.update(path.name.encode())
        digest.update(path.read_bytes() if path.is_file() else b"-")
    return digest.hexdigest()[:32]


def _read_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # absent, unreadable or corrupt: measured again and rewritten
    return cache if isinstance(cache, dict) else {}


def _cached(entry, code: str, name: str, image_size: int) -> Optional[ModelCost]:
    if not isinstance(entry, dict) or entry.get("code") != code:
        return None
    try:
        return ModelCost(name, int(entry["params"]), int(entry["macs"]), int(entry["dynamic_op_macs"]), image_size)
    except (KeyError, TypeError, ValueError):
        return None


def model_costs(names: Iterable[str], image_size: int = 224, use_cache: bool = True,
                on_measure: Optional[Callable[[int], None]] = None) -> list[ModelCost]:
    """:class:`ModelCost` of each registered model in ``names``, in order.

    With ``use_cache``, costs are read from and written to :func:`cost_cache_file`, each entry keyed
    by a hash of the code it depends on; a stale or missing entry is measured again (on the meta
    device, 0.1-2 s per model). ``on_measure(n)`` is called once before measuring when n > 0 models
    need it. A cache that cannot be read or written costs time, never a wrong number (a warning says
    so when it cannot be written).
    """
    names = list(names)
    path = cost_cache_file() if use_cache else None
    cache = _read_cache(path) if path is not None else {}
    found: dict[str, ModelCost] = {}
    codes = {}
    if use_cache:
        for name in names:
            codes[name] = _code_key(name)
            hit = _cached(cache.get(f"{name}@{image_size}"), codes[name], name, image_size)
            if hit is not None:
                found[name] = hit
    missing = [name for name in dict.fromkeys(names) if name not in found]
    if missing and on_measure is not None:
        on_measure(len(missing))
    for name in missing:
        cost = found[name] = measure_cost(name, image_size)
        if use_cache:
            cache[f"{name}@{image_size}"] = {"code": codes[name], "params": cost.params, "macs": cost.macs,
                                             "dynamic_op_macs": cost.dynamic_op_macs}
    if missing and path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
            os.replace(tmp, path)
        except OSError as error:
            warnings.warn(f"cannot write the model cost cache {path} ({error.strerror or error}); "
                          "costs will be measured again next time", RuntimeWarning, stacklevel=2)
    return [found[name] for name in names]


# ----------------------------------------------------------------------------- speed and memory


@dataclass(frozen=True)
class ProfileResult:
    """One model's measured cost on one device.

    Latency in milliseconds per forward pass of ``batch_size`` images (median, min and max over
    ``runs`` timed passes after ``warmup`` untimed ones); ``images_per_s`` = batch_size / median.
    ``macs`` per image. ``peak_memory_bytes`` and ``memory_method`` say what was measured:
    CUDA, the allocator's peak (torch.cuda.max_memory_allocated) during one forward pass minus what
    was allocated before it (weights and input); CPU, the peak of live tensor storage allocated during
    one forward pass, tracked per tensor (library scratch outside tensors, such as oneDNN workspaces,
    is not seen, nor is memory the allocator keeps cached).
    """

    model: str
    weights: Optional[str]
    device: str
    device_name: str
    batch_size: int
    image_size: int
    amp: Optional[str]
    channels_last: bool
    threads: Optional[int]
    params: int
    macs: int
    warmup: int
    runs: int
    latency_ms_median: float
    latency_ms_min: float
    latency_ms_max: float
    images_per_s: float
    peak_memory_bytes: int
    memory_method: str
    ops_backend: str
    torch_version: str

    def to_dict(self) -> dict:
        return asdict(self)


def check_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a torch.device; DynrobustError for anything else or a
    CUDA device this machine does not have."""
    text = str(device).strip().lower()
    if text not in ("cpu", "cuda") and not (text.startswith("cuda:") and text[5:].isdigit()):
        raise DynrobustError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DynrobustError(f"--device {text}: torch sees no CUDA GPU on this machine "
                                 f"(torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'})")
        index = int(text[5:]) if ":" in text else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise DynrobustError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    return torch.device("cpu")


class _LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of tensor storage created while active and still alive; keeps the peak.

    Storage is keyed by its data pointer; an output aliasing an already-counted storage (a view, an
    in-place result) adds a reference, not bytes; storage that existed before (weights, the input)
    is never counted. A storage is released when the last tensor seen referring to it is freed.
    """

    def __init__(self, existing: set[int]):
        super().__init__()
        self.existing = existing
        self.live: dict[int, list[int]] = {}  # data_ptr -> [nbytes, references]
        self.current = 0
        self.peak = 0

    def _release(self, key: int):
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if key == 0 or size == 0 or key in self.existing:
                continue
            entry = self.live.get(key)
            if entry is None:
                self.live[key] = [size, 1]
                self.current += size
                self.peak = max(self.peak, self.current)
            else:
                entry[1] += 1
            weakref.finalize(tensor, self._release, key)
        return out


@torch.no_grad()
def to_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its 4-D parameters and buffers in channels_last memory format, in place.

    ``model.to(memory_format=torch.channels_last)`` refuses models holding 5-D parameters, such as
    ODConv's stacked kernels (kernel_num, out, in, k, k); those stay as they are.
    """
    for module in model.modules():
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            if tensor.dim() == 4:
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return model


def _out_of_memory(error: BaseException) -> bool:
    """True if ``error`` is torch failing to allocate memory (CUDA's OutOfMemoryError, or the CPU
    allocator's RuntimeError "can't allocate memory")."""
    text = str(error)
    return (isinstance(error, torch.cuda.OutOfMemoryError) or "can't allocate memory" in text
            or "out of memory" in text.lower())


def _first_line(error: BaseException) -> str:
    # torch's CPU allocator message starts with "[enforce fail at alloc_cpu.cpp:127] err == 0. "
    return str(error).splitlines()[0].split("] err == 0. ")[-1]


def _memory_of(device: torch.device) -> str:
    return f"{torch.cuda.get_device_name(device)} memory" if device.type == "cuda" else "memory (RAM)"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def profile_model(
    name: str,
    weights: Union[str, Path, None] = None,
    device: str = "cpu",
    batch_size: int = 1,
    amp: bool = False,
    image_size: int = 224,
    warmup: int = 3,
    runs: int = 10,
    channels_last: bool = False,
) -> ProfileResult:
    """Time ``runs`` forward passes of a registered model on random input after ``warmup`` untimed
    ones, and measure its peak memory in one more pass. Returns a :class:`ProfileResult`.

    ``amp``: autocast to float16 on CUDA, bfloat16 on CPU (as ``dynrobust eval --amp``).
    Bad options (device, batch size, image size, runs) raise DynrobustError before anything is built.
    """
    from robustbench_dyn.models import create_model, model_config

    if not isinstance(batch_size, int) or batch_size < 1:
        raise DynrobustError(f"--batch-size must be at least 1, got {batch_size}")
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise DynrobustError(f"--image-size must be at least {MIN_IMAGE_SIZE} pixels, got {image_size}")
    if not isinstance(runs, int) or runs < 1:
        raise DynrobustError(f"--runs must be at least 1, got {runs}")
    if not isinstance(warmup, int) or warmup < 0:
        raise DynrobustError(f"--warmup must be 0 or more, got {warmup}")
    model_config(name)  # an unknown name fails here, before any device work
    dev = check_device(device)
    if amp and dev.type == "cpu" and not torch.backends.mkldnn.is_available():
        raise DynrobustError("--amp on CPU needs bfloat16 autocast (oneDNN), which this torch build lacks")
    amp_dtype = (torch.float16 if dev.type == "cuda" else torch.bfloat16) if amp else None

    cost = model_costs([name], image_size)[0]
    torch.manual_seed(0)
    model = create_model(name, weights=weights).to(dev)
    shape = f"{batch_size} x 3 x {image_size} x {image_size}"
    try:
        x = torch.randn(batch_size, 3, image_size, image_size, device=dev)
    except RuntimeError as error:  # torch.cuda.OutOfMemoryError included
        if not _out_of_memory(error):
            raise
        gib = batch_size * 3 * image_size**2 * 4 / 2**30
        raise DynrobustError(f"the input batch ({shape} float32, {gib:,.1f} GiB) does not fit in "
                             f"{_memory_of(dev)}; try a smaller --batch-size or --image-size") from None
    if channels_last:
        model = to_channels_last(model)
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device_type=dev.type, dtype=amp_dtype or torch.float32, enabled=amp)

    def forward():
        with torch.inference_mode(), autocast:
            return model(x)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    try:
        for _ in range(warmup):
            forward()
        sync()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            forward()
            sync()
            times.append((time.perf_counter() - start) * 1000.0)

        gc.collect()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            before = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            forward()
            sync()
            peak = torch.cuda.max_memory_allocated(dev) - before
            method = ("CUDA allocator peak during one forward pass minus memory allocated before it "
                      "(weights, input): torch.cuda.max_memory_allocated")
        else:
            existing = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers(), x)}
            tracker = _LiveTensorBytes(existing)
            with tracker:
                forward()
            peak = tracker.peak
            method = ("peak live tensor storage allocated during one forward pass, tracked per tensor "
                      "(weights and input excluded; library scratch outside tensors not seen)")
    except RuntimeError as error:  # torch.cuda.OutOfMemoryError included
        if _out_of_memory(error):
            raise DynrobustError(f"{name} on a {shape} input does not fit in {_memory_of(dev)} "
                                 f"({_first_line(error)}); try a smaller --batch-size or --image-size") from None
        if amp and dev.type == "cpu" and "BFloat16" in str(error):
            raise DynrobustError(f"--amp on CPU: {name} has an operation without bfloat16 support "
                                 f"({str(error).splitlines()[0]}); run without --amp") from None
        raise

    median = statistics.median(times)
    backend = ops.backend_info().for_device(dev) if cost.uses_dynamic_ops else "-"
    return ProfileResult(
        model=name,
        weights=None if weights is None else str(weights),
        device=str(dev),
        device_name=_device_name(dev),
        batch_size=batch_size,
        image_size=image_size,
        amp=None if amp_dtype is None else str(amp_dtype).replace("torch.", ""),
        channels_last=channels_last,
        threads=torch.get_num_threads() if dev.type == "cpu" else None,
        params=cost.params,
        macs=cost.macs,
        warmup=warmup,
        runs=runs,
        latency_ms_median=median,
        latency_ms_min=min(times),
        latency_ms_max=max(times),
        images_per_s=batch_size / (median / 1000.0),
        peak_memory_bytes=int(peak),
        memory_method=method,
        ops_backend=backend,
        torch_version=torch.__version__,
    )

