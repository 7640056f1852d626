"""Paths into a module graph or a pytree: ('model', 'layers', 0, 'mlp') <-> 'model.layers.0.mlp', and the node a
path names, read or replaced (the one helper every wrapper of a layer uses: adapters, pruning)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Path = str | Sequence[str | int]  # 'model.layers.0.mlp' or ('model', 'layers', 0, 'mlp')


def dotted(path) -> str:
    """('model', 'layers', 0, 'mlp') -> 'model.layers.0.mlp' (jax key paths, nnx paths or plain tuples)."""
    return ".".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path)


def parts(path: Path) -> tuple[str | int, ...]:
    """'model.layers.0.mlp' -> ('model', 'layers', 0, 'mlp'): digits index a list, anything else is an attribute."""
    if isinstance(path, str):
        return tuple(int(p) if p.isdigit() else p for p in path.split("."))
    return tuple(path)


def get(root: Any, path: Path) -> Any:
    """The node at `path` below `root` (nnx modules, lists of them)."""
    node = root
    for part in parts(path):
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def replace(root: Any, path: Path, value: Any) -> None:
    """Put `value` at `path` below `root`, in place (an nnx module's attribute or a list's item)."""
    *parents, last = parts(path)
    parent = get(root, parents)
    if isinstance(last, int):
        parent[last] = value
    else:
        setattr(parent, last, value)
