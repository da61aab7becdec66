"""The corruption engine: all 19 ImageNet-C corruptions at 5 severities, seeded per image.

>>> from robustbench_dyn.corruptions import corrupt, canonical_seed
>>> out = corrupt(image, "glass_blur", 3, seed=canonical_seed("img-001", "glass_blur", 3))
"""

from robustbench_dyn.corruptions.engine import as_rgb_uint8, corrupt
from robustbench_dyn.corruptions.names import (
    CATEGORIES,
    CATEGORY_OF,
    CORRUPTION_NAMES,
    CORRUPTIONS,
    EXTRA,
    GROUPS,
    SEVERITIES,
    STANDARD,
    CorruptionInfo,
    check_corruption,
    check_severity,
    parse_severities,
    resolve_corruptions,
)
from robustbench_dyn.corruptions.seeds import canonical_seed

__all__ = [
    "CATEGORIES",
    "CATEGORY_OF",
    "CORRUPTIONS",
    "CORRUPTION_NAMES",
    "EXTRA",
    "GROUPS",
    "SEVERITIES",
    "STANDARD",
    "CorruptionInfo",
    "as_rgb_uint8",
    "canonical_seed",
    "check_corruption",
    "check_severity",
    "corrupt",
    "parse_severities",
    "resolve_corruptions",
]
