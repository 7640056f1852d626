"""Paths into a module graph or a pytree: ('model', 'layers', 0, 'mlp') <-> 'model.layers.0.mlp'."""

from __future__ import annotations


def dotted(path) -> str:
    """('model', 'layers', 0, 'mlp') -> 'model.layers.0.mlp' (jax key paths, nnx paths or plain tuples)."""
    return ".".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path)
