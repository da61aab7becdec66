"""The path parameter every command uses: a ``pathlib.Path``, never an empty string.

``Path("")`` is ``Path(".")``: an empty ``--out`` or ``--imagenet-c`` (an unset shell variable,
say) would silently mean the current folder.
"""

from __future__ import annotations

from pathlib import Path

import click


class NonEmptyPath(click.Path):
    """``click.Path`` that refuses an empty string (a usage error)."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("an empty path; give a file or folder name (use . for the current folder)", param, ctx)
        return super().convert(value, param, ctx)


PATH = NonEmptyPath(path_type=Path)
