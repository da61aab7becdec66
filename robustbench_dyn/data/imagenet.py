"""ImageNet class indices and ImageNet-C folder layouts.

Labels: a class folder named by its wnid maps to that wnid's index among the 1000 ILSVRC-2012
classes in sorted order (the order of every ImageNet classifier's logits). A tree holding only some
classes is a subset and keeps the 1000-way indices.

ImageNet-C comes in two layouts (hendrycks/robustness; the official tars unpack to the second):
``<root>/<corruption>/<severity>/<wnid>/<file>`` and ``<root>/<category>/<corruption>/<severity>/...``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from robustbench_dyn.corruptions import CORRUPTION_NAMES
from robustbench_dyn.data.build_imagenet_c import list_source_images, select_class_balanced
from robustbench_dyn.errors import DynrobustError


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple:
    """The 1000 ILSVRC-2012 wnids in sorted order: position = class index of the logits."""
    text = resources.files("robustbench_dyn.reference").joinpath("imagenet_wnids.txt").read_text()
    wnids = tuple(text.split())
    assert len(wnids) == 1000 and list(wnids) == sorted(wnids)
    return wnids


@lru_cache(maxsize=1)
def _wnid_index() -> dict:
    return {wnid: i for i, wnid in enumerate(imagenet_wnids())}


@dataclass(frozen=True)
class LabelledImage:
    """One image of an evaluation cell: its id ``"<wnid>/<file>"``, path and class index (0..999)."""

    image_id: str
    path: Path
    label: int


def labelled_images(folder, limit: int | None = None) -> list:
    """The images of a class-folder dataset with their ImageNet labels, sorted by image id.

    ``limit`` keeps that many, class-balanced and deterministic (round-robin over sorted classes).
    Raises DynrobustError for a folder that is not a class-folder dataset or holds folders that are
    not ImageNet wnids.
    """
    sources = list_source_images(folder)
    check_wnid_folders(folder, sources)
    index = _wnid_index()
    chosen = select_class_balanced(sources, limit)
    return [LabelledImage(s.image_id, s.path, index[s.wnid]) for s in chosen]


def check_wnid_folders(folder, sources) -> None:
    """Raise DynrobustError unless every class folder of ``sources`` (images of ``folder``, from
    ``list_source_images``) is named by an ImageNet wnid: the labels are read from those names."""
    index = _wnid_index()
    unknown = sorted({s.wnid for s in sources if s.wnid not in index})
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise DynrobustError(
            f"{folder}: class folders must be named by ImageNet wnids (e.g. n01440764); found {shown}"
        )


def locate_imagenet_c(root, corruptions, severities) -> dict:
    """Find the folder of every (corruption, severity) cell under an ImageNet-C ``root``.

    Accepts both layouts (flat, or nested under category folders). Returns {(corruption, severity):
    Path}. Raises one DynrobustError naming everything missing, or saying the folder is not
    ImageNet-C at all.
    """
    root = Path(root)
    if not root.exists():
        raise DynrobustError(f"ImageNet-C folder {root} does not exist")
    if not root.is_dir():
        raise DynrobustError(f"ImageNet-C path {root} is not a folder")
    sources = {}  # corruption -> every folder of that name, flat or nested
    children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for child in children:
        if child.name in CORRUPTION_NAMES:
            sources.setdefault(child.name, []).append(child)
            continue
        for grandchild in sorted(child.iterdir()):  # nested layout: <root>/<category>/<corruption>
            if grandchild.is_dir() and grandchild.name in CORRUPTION_NAMES:
                sources.setdefault(grandchild.name, []).append(grandchild)
    twice = {c: sources[c] for c in corruptions if len(sources.get(c, ())) > 1}
    if twice:
        corruption, folders = next(iter(twice.items()))
        more = f" (and {len(twice) - 1} more corruption(s) likewise)" if len(twice) > 1 else ""
        raise DynrobustError(
            f"{root} holds {corruption} twice: {', '.join(str(f) for f in folders)}{more}; "
            "keep one, or give the folder of one of them as --imagenet-c"
        )
    found = {name: folders[0] for name, folders in sources.items()}
    if not found:
        raise DynrobustError(
            f"{root} is not an ImageNet-C folder: expected <root>/<corruption>/<severity>/<wnid>/<image> "
            "(or <root>/<category>/<corruption>/...), with corruption folders such as gaussian_noise"
        )
    missing, cells = [], {}
    for corruption in corruptions:
        if corruption not in found:
            missing.append(corruption)
            continue
        for severity in severities:
            folder = found[corruption] / str(severity)
            if folder.is_dir():
                cells[(corruption, severity)] = folder
            else:
                missing.append(f"{corruption}/{severity}")
    if missing:
        shown = ", ".join(missing[:12]) + (f" and {len(missing) - 12} more" if len(missing) > 12 else "")
        raise DynrobustError(
            f"{root} lacks {shown}; choose what to evaluate with --corruptions and --severities"
        )
    return cells
