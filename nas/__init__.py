"""compact-nas: search, distill and export compact models. `nas.load(folder)` loads an exported model."""

from __future__ import annotations


def load(folder):
    """Load an exported model folder; returns a callable `LoadedModel` (x -> logits)."""
    from nas.export import load as _load

    return _load(folder)
