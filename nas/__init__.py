"""compact-nas: search, distill and export compact models. `nas.load(folder)` loads an exported model."""

from __future__ import annotations


def load(folder, format=None, **kwargs):
    """Load an exported model folder; format: flax (default) | onnx | int8 | stablehlo.
    Returns a callable `LoadedModel` (x -> logits)."""
    from nas.export import load as _load  # imported when used: `import nas` must not load JAX and ONNX

    return _load(folder, format, **kwargs)
