"""The model registry: ``@register_model``, ``create_model``, ``list_models``, ``model_config``.

A family file defines thin builders and decorates each one with :func:`register_model`;
registration happens when the file is imported (``robustbench_dyn.models`` imports every family).
Each registered name carries a :class:`ModelConfig`: eval preprocessing, number of classes and the
paper's reference numbers, read from the packaged ``reference/paper_tables.csv``.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import fnmatch
import functools
import inspect
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from robustbench_dyn.errors import DynrobustError
from robustbench_dyn.models.checkpoint import load_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocessing:
    """Eval preprocessing: Resize(``resize``, ``interpolation``) of the short side, CenterCrop(``crop``),
    then (x - mean) / std on RGB values in [0, 1].

    The default is torchvision's ImageNet eval transform (Resize 256 bilinear, CenterCrop 224);
    ``resize = crop / crop_pct`` in timm's terms (224 / 0.875 = 256).
    """

    resize: int = 256
    crop: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, not {self.interpolation!r}")
        if not 0 < self.crop <= self.resize:
            raise ValueError(f"need 0 < crop <= resize, got crop={self.crop}, resize={self.resize}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need 3 entries (RGB), std > 0")


@dataclass(frozen=True)
class PaperRow:
    """One row of ``reference/paper_tables.csv``: a model as a paper reports it.

    ``params_m`` in millions of parameters, ``gmacs`` in 10^9 multiply-accumulates at 224x224
    (the papers call them FLOPs), ``top1`` ImageNet-1k top-1 accuracy in %.
    """

    model: str
    variant: str
    params_m: float
    gmacs: float
    top1: float
    source: str


@dataclass(frozen=True)
class ModelConfig:
    """Everything the rest of dynrobust needs to know about a registered model.

    ``params_m``, ``gmacs``, ``top1`` and ``source`` come from the first row of the paper tables
    that names the model (the tables list the main comparison, Table 1 of each paper, first);
    ``paper_rows`` holds every row naming it (ablation variants included). All four are None for
    a model no paper table names.
    """

    name: str
    family: str
    num_classes: int = 1000
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    params_m: Optional[float] = None
    gmacs: Optional[float] = None
    top1: Optional[float] = None
    source: Optional[str] = None
    paper_rows: tuple[PaperRow, ...] = ()


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., torch.nn.Module]
    config: ModelConfig


_REGISTRY: dict[str, _Entry] = {}


@functools.lru_cache(maxsize=None)
def _paper_table() -> tuple[PaperRow, ...]:
    text = files("robustbench_dyn.reference").joinpath("paper_tables.csv").read_text(encoding="utf-8")
    return tuple(
        PaperRow(
            model=row["model"],
            variant=row["variant"],
            params_m=float(row["params_m"]),
            gmacs=float(row["gmacs"]),
            top1=float(row["top1"]),
            source=row["source"],
        )
        for row in csv.DictReader(text.splitlines())
    )


def register_model(
    fn: Optional[Callable[..., torch.nn.Module]] = None,
    *,
    family: Optional[str] = None,
    num_classes: int = 1000,
    preprocessing: Preprocessing = Preprocessing(),
    paper_name: Optional[str] = None,
):
    """Register a model builder under its function name; usable bare or with settings.

    ``@register_model`` or ``@register_model(family="ddf", preprocessing=Preprocessing(interpolation="bicubic"))``.
    ``family`` defaults to the defining module's name (``resnet`` for ``models/resnet.py``);
    ``paper_name`` is the model's name in the paper tables when it differs from the builder's.
    The builder takes keyword arguments only (``num_classes`` at least) and returns the module;
    :func:`create_model` validates user keyword arguments against its signature.
    Returns the builder unchanged.
    """

    def decorate(builder):
        name = builder.__name__
        if name in _REGISTRY:
            raise RuntimeError(f"model {name!r} registered twice ({_REGISTRY[name].builder.__module__} and {builder.__module__})")
        rows = tuple(row for row in _paper_table() if row.model == (paper_name or name))
        first = rows[0] if rows else None
        config = ModelConfig(
            name=name,
            family=family or builder.__module__.rsplit(".", 1)[-1],
            num_classes=num_classes,
            preprocessing=preprocessing,
            params_m=first.params_m if first else None,
            gmacs=first.gmacs if first else None,
            top1=first.top1 if first else None,
            source=first.source if first else None,
            paper_rows=rows,
        )
        _REGISTRY[name] = _Entry(builder=builder, config=config)
        return builder

    return decorate if fn is None else decorate(fn)


def list_models(pattern: Optional[str] = None) -> list[str]:
    """Registered model names, sorted; ``pattern`` is an fnmatch pattern such as ``"resnet*"``."""
    names = sorted(_REGISTRY)
    return names if pattern is None else [name for name in names if fnmatch.fnmatchcase(name, pattern)]


def _entry(name: str) -> _Entry:
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(str(name).lower(), list(_REGISTRY), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise DynrobustError(f"unknown model {name!r}{hint} (`dynrobust models` lists all {len(_REGISTRY)})")


def model_config(name: str) -> ModelConfig:
    """The :class:`ModelConfig` of a registered model (num_classes as registered)."""
    return _entry(name).config


def create_model(name: str, weights: Union[str, Path, None] = None, **kwargs) -> torch.nn.Module:
    """Build a registered model, load ``weights`` (a checkpoint file, strictly) if given, and return it
    in eval mode, with its :class:`ModelConfig` as ``model.dynrobust_config``.

    ``kwargs`` go to the builder (e.g. ``num_classes``); one it does not accept is a DynrobustError.
    Nothing is downloaded: without ``weights`` the model is randomly initialised.
    """
    entry = _entry(name)
    signature = inspect.signature(entry.builder)
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    if not accepts_any:
        accepted = [p.name for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise DynrobustError(
                f"model {name!r} does not take {', '.join(map(repr, unknown))}; "
                f"it takes {', '.join(accepted) if accepted else 'no options'}"
            )
    model = entry.builder(**kwargs)
    config = entry.config
    if "num_classes" in kwargs and kwargs["num_classes"] != config.num_classes:
        config = dataclasses.replace(config, num_classes=int(kwargs["num_classes"]))
    model.dynrobust_config = config
    if weights is not None:
        load_weights(model, weights, strict=True)
    return model.eval()
