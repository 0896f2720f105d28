"""The one exception type that reaches users as a single line."""

from __future__ import annotations


class StageError(Exception):
    """A problem the user can fix. Entry points print it as one line and exit with status 1."""
