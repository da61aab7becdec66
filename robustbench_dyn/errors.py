"""Errors that mean the user asked for something impossible (as opposed to a bug).

The CLI turns any :class:`DynrobustError` into one line on stderr and a non-zero exit code;
everything else is a bug and keeps its traceback.
"""


class DynrobustError(Exception):
    """A user's mistake: bad path, unknown name, wrong layout, nonsense option."""


class BadImageError(DynrobustError):
    """A file that cannot be decoded as an image (truncated, empty, not an image, too small)."""

    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
