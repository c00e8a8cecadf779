"""User-facing errors: one line that names the file/key and what is allowed."""

from __future__ import annotations


class NasError(Exception):
    """A user error (bad config, bad key, missing file). The CLI prints it on one line and exits 2."""


class SpaceError(NasError):
    """A search-space declaration or architecture key is invalid."""


def where(source: str | None, path: str) -> str:
    """Format 'file: key.path' for error messages."""
    return f"{source}: {path}" if source else path
