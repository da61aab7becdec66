"""Checkpoint loading: the one way dynrobust reads a weights file.

A checkpoint is untrusted input: a pickle can run code while it is read. So ``.safetensors``
files are read with safetensors, and everything else with ``torch.load(weights_only=True)``,
always; a file that needs anything beyond tensors and plain containers is refused.

The formats the official implementations release (``reference/official_implementations.md``):

- torchvision: a bare state dict.
- timm (DDF-ResNet): ``{'state_dict': ..., 'state_dict_ema': ...}`` or a bare state dict.
- mmcls (involution / RedNet): ``{'meta': ..., 'state_dict': ...}`` with ``backbone.`` keys and the
  classifier under ``head.fc.``; read as the torchvision names (``backbone.`` dropped, ``head.fc.`` -> ``fc.``).
- ODConv: ``{'epoch', 'state_dict', 'acc', 'best_acc', 'optimizer'}`` with DataParallel ``module.`` keys.
- DeiT-style training scripts: ``{'model': ...}``.

Wrappers are unwrapped in the order ``state_dict``, ``model``, ``state_dict_ema``, ``module``
(``ema=True`` puts ``state_dict_ema`` first). The non-EMA weights come first because that is what
timm's ``validate.py`` evaluates unless told ``--use-ema``. Key prefixes ``module.`` (DataParallel /
DistributedDataParallel) and ``_orig_mod.`` (torch.compile) are dropped when every key carries them.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch

from robustbench_dyn.errors import DynrobustError

PathLike = Union[str, Path]

WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema", "module")
WRAPPER_KEYS_EMA = ("state_dict_ema", "state_dict", "model", "module")
# Prefixes that wrap every key of a model: DataParallel/DDP, then torch.compile's OptimizedModule.
_WHOLE_MODEL_PREFIXES = ("module.", "_orig_mod.")
_SHOWN = 8  # entries of each key list an error message shows before "... and N more"
_SHOWN_PER_KIND = 3  # missing keys, unexpected keys, shape mismatches: each one line of a mismatch message


def _checked_file(path: PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DynrobustError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise DynrobustError(f"checkpoint {path} is a directory, not a weights file")
    if not path.is_file():
        raise DynrobustError(f"checkpoint {path} is not a regular file")
    if path.stat().st_size == 0:
        raise DynrobustError(f"checkpoint {path} is empty (0 bytes)")
    return path


def weights_sha256(path: PathLike) -> str:
    """The SHA-256 of the checkpoint file's bytes, as 64 lower-case hex digits."""
    path = _checked_file(path)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as error:
        raise DynrobustError(f"cannot read checkpoint {path}: {error.strerror or error}") from None
    return digest.hexdigest()


def _is_safetensors(path: Path) -> bool:
    # safetensors layout: 8-byte little-endian header length, then a JSON header starting with '{'.
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DynrobustError(f"checkpoint {path} is not a valid safetensors file ({reason})") from None


def _read_torch(path: Path):
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, KeyError, EOFError ... on bad files
        message = str(error)
        refused = re.search(r"GLOBAL ([\w.]+)", message) or re.search(r"Unsupported class ([\w.]+)", message)
        if refused:
            raise DynrobustError(
                f"checkpoint {path} is not a plain weights file: it holds a Python object "
                f"({refused.group(1)}) that a weights-only load refuses, since unpickling it could run code. "
                "Save only the tensors, e.g. torch.save(model.state_dict(), path), or as .safetensors"
            ) from None
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        detail = next((line for line in lines if "WeightsUnpickler error" not in line and "Weights only" not in line
                       and "weights_only" not in line), lines[0] if lines else type(error).__name__)
        raise DynrobustError(
            f"checkpoint {path} is not a PyTorch or safetensors weights file, or it is truncated/corrupt "
            f"({type(error).__name__}: {detail[:200]})"
        ) from None


def _is_state_dict(obj) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _unwrap(obj, path: Path, ema: bool) -> Mapping:
    order = WRAPPER_KEYS_EMA if ema else WRAPPER_KEYS
    for _ in range(len(order) + 1):
        if _is_state_dict(obj):
            return obj
        if not isinstance(obj, Mapping):
            raise DynrobustError(
                f"checkpoint {path} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)"
            )
        key = next((k for k in order if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            keys = ", ".join(map(str, list(obj)[:_SHOWN])) + (f", ... ({len(obj)} keys)" if len(obj) > _SHOWN else "")
            raise DynrobustError(
                f"checkpoint {path} holds no state dict: expected a mapping of names to tensors "
                f"or one wrapped in {'/'.join(order)}; its keys are: {keys or '(none)'}"
            )
        obj = obj[key]
    raise DynrobustError(f"checkpoint {path}: state dict wrapped too deeply")


def _mmcls_to_torchvision(key: str) -> str:
    # mmcls / mmpretrain: the network is `backbone`; its LinearClsHead `head` names the classifier `fc`.
    if key.startswith("backbone."):
        return key[len("backbone."):]
    if key.startswith("head.fc."):
        return "fc." + key[len("head.fc."):]
    return key


def _normalise_keys(state: Mapping, path: Path) -> dict:
    keys = list(state)
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WHOLE_MODEL_PREFIXES:
            if all(k.startswith(prefix) for k in keys):
                keys = [k[len(prefix):] for k in keys]
                stripped = True
    if any(k.startswith("backbone.") for k in keys):
        keys = [_mmcls_to_torchvision(k) for k in keys]
    if len(set(keys)) != len(keys):
        clashes = sorted({k for k in keys if keys.count(k) > 1})
        raise DynrobustError(f"checkpoint {path}: after dropping prefixes, keys collide: {', '.join(clashes[:_SHOWN])}")
    return dict(zip(keys, state.values()))


def load_state_dict(path: PathLike, *, ema: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict on the CPU, with torchvision-style names.

    Unwraps ``state_dict`` > ``model`` > ``state_dict_ema`` > ``module`` (``ema=True``: ``state_dict_ema``
    first) and drops the ``module.``, ``_orig_mod.`` and mmcls ``backbone.`` prefixes (``head.fc.`` -> ``fc.``).
    A missing, empty, corrupt or unsafe file, or one without a state dict, raises DynrobustError.
    """
    path = _checked_file(path)
    try:
        safetensors = path.suffix == ".safetensors" or _is_safetensors(path)
    except OSError as error:
        raise DynrobustError(f"cannot read checkpoint {path}: {error.strerror or error}") from None
    obj = _read_safetensors(path) if safetensors else _read_torch(path)
    return _normalise_keys(_unwrap(obj, path, ema), path)


@dataclass(frozen=True)
class WeightsMismatch:
    """How a state dict fails to fit a model; false when it fits exactly.

    ``shape_mismatches`` holds ``(key, checkpoint_shape, model_shape)``.
    """

    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()
    shape_mismatches: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.missing_keys or self.unexpected_keys or self.shape_mismatches)

    def describe(self) -> str:
        """One line per kind of mismatch (shape mismatches one per line), each list cut after a few
        entries with the total count."""

        def cut(items):  # the first few, and "... and N more" when there are others
            items = list(items)
            more = len(items) - _SHOWN_PER_KIND
            return items[:_SHOWN_PER_KIND] + ([f"... and {more} more"] if more > 0 else [])

        def listed(items):  # a few, so that each kind stays one readable line
            return ", ".join(cut(items))

        def count(n, word):
            return f"{n} {word}{'' if n == 1 else 'es' if word.endswith('h') else 's'}"

        lines = []
        if self.missing_keys:
            lines.append(f"{count(len(self.missing_keys), 'missing key')} (in the model, not in the checkpoint): "
                         + listed(self.missing_keys))
        if self.unexpected_keys:
            lines.append(f"{count(len(self.unexpected_keys), 'unexpected key')} (in the checkpoint, not in the model): "
                         + listed(self.unexpected_keys))
        if self.shape_mismatches:  # each on a line of its own: two shapes make a long entry
            lines.append(f"{count(len(self.shape_mismatches), 'shape mismatch')} (checkpoint vs model):")
            lines += ["  " + entry for entry in cut(
                f"{k} {list(ckpt)} vs {list(model)}" for k, ckpt, model in self.shape_mismatches)]
        return "\n".join("  " + line for line in lines)


def _compare(model: torch.nn.Module, state: Mapping) -> WeightsMismatch:
    expected = model.state_dict()
    # BatchNorm fills in a missing `num_batches_tracked` itself (old torchvision files lack it); it is a
    # training counter that eval never reads.
    missing = tuple(k for k in expected if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = tuple(k for k in state if k not in expected)
    shapes = tuple(
        (k, tuple(state[k].shape), tuple(expected[k].shape))
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    )
    return WeightsMismatch(missing, unexpected, shapes)


def load_weights(model: torch.nn.Module, path: PathLike, strict: bool = True, *, ema: bool = False) -> WeightsMismatch:
    """Load a checkpoint file into ``model`` in place, read by :func:`load_state_dict`.

    ``strict`` (the default): any missing key, unexpected key or shape mismatch raises DynrobustError
    listing all three, and the model is left untouched. Not strict: the entries that fit are loaded,
    the rest is reported in one warning. Returns the :class:`WeightsMismatch` (empty when strict).
    """
    state = load_state_dict(path, ema=ema)
    mismatch = _compare(model, state)
    config = getattr(model, "dynrobust_config", None)
    name = config.name if config is not None else type(model).__name__
    if mismatch:
        text = mismatch.describe()
        classes = {k: (ckpt[0], own[0]) for k, ckpt, own in mismatch.shape_mismatches}.get("fc.weight")
        if classes and classes[0] != classes[1]:
            text += f"\n  hint: the checkpoint's classifier has {classes[0]} classes, the model's {classes[1]}: "
            text += ("dynrobust evaluates ImageNet's 1000 classes; give a checkpoint trained on ImageNet-1k"
                     if classes[1] == 1000 else f"build the model with num_classes={classes[0]} to match")
        if len(mismatch.missing_keys) == len(model.state_dict()) or not (set(state) & set(model.state_dict())):
            text += "\n  hint: no key matches: is this a checkpoint of another architecture?"
        if strict:
            raise DynrobustError(f"checkpoint {Path(path)} does not fit model {name} (strict loading):\n{text}")
        warnings.warn(f"checkpoint {Path(path)} loaded partially into {name}:\n{text}", stacklevel=2)
    skip = set(mismatch.unexpected_keys) | {k for k, _, _ in mismatch.shape_mismatches}
    try:
        model.load_state_dict({k: v for k, v in state.items() if k not in skip}, strict=False)
    except RuntimeError as error:
        raise DynrobustError(f"checkpoint {Path(path)} cannot be loaded into model {name}: {error}") from None
    return mismatch
