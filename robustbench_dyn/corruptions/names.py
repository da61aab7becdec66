"""The 19 ImageNet-C corruptions, their categories, the groups users can name, and severities.

Order and categories follow Hendrycks & Dietterich 2019 (ImageNet-C): the 15 "standard" corruptions
that mCE averages, then the 4 "extra" (held-out) ones.
"""

from __future__ import annotations

import difflib
import operator
from dataclasses import dataclass
from typing import Iterable

from robustbench_dyn.errors import DynrobustError

SEVERITIES = (1, 2, 3, 4, 5)
CATEGORIES = ("noise", "blur", "weather", "digital")


@dataclass(frozen=True)
class CorruptionInfo:
    """A corruption's name, its category (noise, blur, weather, digital) and whether mCE counts it."""

    name: str
    category: str
    standard: bool


CORRUPTIONS = (
    CorruptionInfo("gaussian_noise", "noise", True),
    CorruptionInfo("shot_noise", "noise", True),
    CorruptionInfo("impulse_noise", "noise", True),
    CorruptionInfo("defocus_blur", "blur", True),
    CorruptionInfo("glass_blur", "blur", True),
    CorruptionInfo("motion_blur", "blur", True),
    CorruptionInfo("zoom_blur", "blur", True),
    CorruptionInfo("snow", "weather", True),
    CorruptionInfo("frost", "weather", True),
    CorruptionInfo("fog", "weather", True),
    CorruptionInfo("brightness", "weather", True),
    CorruptionInfo("contrast", "digital", True),
    CorruptionInfo("elastic_transform", "digital", True),
    CorruptionInfo("pixelate", "digital", True),
    CorruptionInfo("jpeg_compression", "digital", True),
    CorruptionInfo("speckle_noise", "noise", False),
    CorruptionInfo("gaussian_blur", "blur", False),
    CorruptionInfo("spatter", "weather", False),
    CorruptionInfo("saturate", "digital", False),
)

CORRUPTION_NAMES = tuple(c.name for c in CORRUPTIONS)
STANDARD = tuple(c.name for c in CORRUPTIONS if c.standard)
EXTRA = tuple(c.name for c in CORRUPTIONS if not c.standard)
CATEGORY_OF = {c.name: c.category for c in CORRUPTIONS}

GROUPS = {
    **{cat: tuple(c.name for c in CORRUPTIONS if c.category == cat) for cat in CATEGORIES},
    "standard": STANDARD,
    "extra": EXTRA,
    "all": CORRUPTION_NAMES,
}


def _unknown(word: str) -> DynrobustError:
    choices = list(CORRUPTION_NAMES) + list(GROUPS)
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return DynrobustError(
        f"unknown corruption or group {word!r}.{hint} Corruptions: {', '.join(CORRUPTION_NAMES)}; "
        f"groups: {', '.join(GROUPS)}."
    )


def check_corruption(name: str) -> str:
    """Return ``name`` if it is one of the 19 corruptions, else raise a DynrobustError with suggestions."""
    if name not in CATEGORY_OF:
        raise _unknown(str(name))
    return name


def resolve_corruptions(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """Expand corruption names and group names into corruption names, in ImageNet-C order.

    ``spec`` is a comma-separated string (``"noise,fog"``) or an iterable of words; ``None`` or
    ``"all"`` gives all 19. Unknown words raise a DynrobustError listing the valid ones.
    """
    if spec is None:
        return CORRUPTION_NAMES
    words = spec.split(",") if isinstance(spec, str) else list(spec)
    words = [w.strip() for w in words if w and w.strip()]
    if not words:
        raise DynrobustError("no corruption given: name corruptions or groups, e.g. 'noise,fog'")
    chosen = set()
    for word in words:
        if word in GROUPS:
            chosen.update(GROUPS[word])
        elif word in CATEGORY_OF:
            chosen.add(word)
        else:
            raise _unknown(word)
    return tuple(n for n in CORRUPTION_NAMES if n in chosen)


def check_severity(severity) -> int:
    """Return ``severity`` as an int in 1..5, else raise a DynrobustError."""
    if isinstance(severity, bool) or not hasattr(severity, "__index__"):
        raise DynrobustError(f"severity must be an integer from 1 to 5, got {severity!r}")
    value = operator.index(severity)
    if value not in SEVERITIES:
        raise DynrobustError(f"severity must be an integer from 1 to 5, got {severity!r}")
    return value


def parse_severities(spec: str | Iterable[int] | None) -> tuple[int, ...]:
    """Parse ``"1-5"``, ``"2,4"``, ``"3"`` (or an iterable of ints) into sorted unique severities."""
    if spec is None:
        return SEVERITIES
    if not isinstance(spec, str):
        return tuple(sorted({check_severity(s) for s in spec}))
    found = set()
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(p) for p in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                values = range(lo, hi + 1)
            else:
                values = [int(part)]
        except ValueError:
            raise DynrobustError(
                f"cannot read severities {spec!r}: use a range like 1-5 or a list like 1,3,5"
            ) from None
        found.update(check_severity(v) for v in values)
    if not found:
        raise DynrobustError(f"no severity in {spec!r}: use a range like 1-5 or a list like 1,3,5")
    return tuple(sorted(found))
