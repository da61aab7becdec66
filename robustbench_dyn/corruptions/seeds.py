"""Canonical seeds: the random state of a corrupted image depends only on what the image is."""

from __future__ import annotations

import hashlib

from robustbench_dyn.corruptions.names import check_corruption, check_severity

_DOMAIN = b"dynrobust.corruption.v1"


def canonical_seed(image_id, corruption: str, severity: int) -> int:
    """Return a 63-bit seed from (image id, corruption, severity), stable across runs and machines.

    The seed never depends on the order images are visited, the worker or the rank, so any subset,
    shard or resumed run reproduces the same pixels. ``image_id`` is any string or int naming the
    image (e.g. ``"n01440764/ILSVRC2012_val_00000293.JPEG"``); it is hashed with BLAKE2b.
    """
    check_corruption(corruption)
    severity = check_severity(severity)
    key = b"\x1f".join((_DOMAIN, str(image_id).encode("utf-8"), corruption.encode(), b"%d" % severity))
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
