"""The project's one progress bar (tqdm on stderr, shown only to a person watching a terminal),
and the one way summaries write how long something took.

Every long loop (building ImageNet-C, evaluating, ...) goes through :func:`progress_bar`, so that
``--quiet``, logs and captured output behave the same everywhere: no bar when stderr is not a
terminal (a log file, a pipe, a test), and none when the caller says ``enabled=False``.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(iterable=None, *, total=None, desc=None, unit="it", enabled=True) -> tqdm:
    """Return a tqdm bar over ``iterable`` (or a manual one counting to ``total``), written to stderr.

    The bar is drawn only when ``enabled`` is true and stderr is a terminal; otherwise the same
    object is returned, disabled, so callers never branch on whether it shows. ``unit`` names what
    is counted (``"img"``, ``"batch"``); rates are shown in ``unit``/s.
    """
    stream = sys.stderr
    shown = bool(enabled) and hasattr(stream, "isatty") and stream.isatty()
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=stream,
        disable=not shown,
        dynamic_ncols=True,
        # a bar left behind would be mistaken for output when the command prints its summary
        leave=False,
    )


def format_duration(seconds: float) -> str:
    """Return a duration in seconds as text for people: ``"8.4 s"``, ``"3 min 05 s"``, ``"2 h 07 min"``."""
    if seconds < 59.95:  # so that 59.97 does not read "60.0 s"
        return f"{seconds:.1f} s"
    whole = int(round(seconds))
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"
