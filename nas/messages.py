"""One-line summaries of multi-line messages, for CSV cells, progress lines and metrics.json.

Two behaviours under two names: a Python traceback ends with the exception, so a trial's error
keeps its `last_line`; an exporter's or runtime's message starts with what went wrong, so it
keeps its `first_line`.
"""

from __future__ import annotations

LIMIT = 300  # characters kept


def _lines(text: object) -> list[str]:
    return [line.strip() for line in str(text or "").strip().splitlines() if line.strip()]


def first_line(text: object, limit: int = LIMIT) -> str:
    """The first non-blank line of `text`, cut to `limit` characters ('' for none)."""
    lines = _lines(text)
    return lines[0][:limit] if lines else ""


def last_line(text: object, limit: int = LIMIT) -> str:
    """The last non-blank line of `text` (a traceback's exception), cut to `limit` characters ('' for none)."""
    lines = _lines(text)
    return lines[-1][:limit] if lines else ""
