"""Paths into a module graph or a pytree: ('model', 'layers', 0, 'mlp') <-> 'model.layers.0.mlp', and the node a
path names, read or replaced (the one helper every wrapper of a layer uses: adapters, pruning)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Path = str | Sequence[str | int]  # 'model.layers.0.mlp' or ('model', 'layers', 0, 'mlp')


def dotted(path) -> str:
    """('model', 'layers', 0, 'mlp') -> 'model.layers.0.mlp'.

    Args:
      path: a jax key path (`DictKey`, `SequenceKey`, `GetAttrKey` entries), an nnx path or a plain tuple.

    Returns:
      The dotted string.
    """
    return ".".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path)


def parts(path: Path) -> tuple[str | int, ...]:
    """'model.layers.0.mlp' -> ('model', 'layers', 0, 'mlp'): digits index a list, anything else is an attribute.

    Args:
      path: a dotted string, or a sequence of parts (returned as a tuple).

    Returns:
      The tuple of parts (ints for list indices).
    """
    if isinstance(path, str):
        return tuple(int(p) if p.isdigit() else p for p in path.split("."))
    return tuple(path)


def get(root: Any, path: Path) -> Any:
    """The node at `path` below `root` (nnx modules, lists of them).

    Args:
      root: the module (or list) to start from, e.g. a model.
      path: dotted or tuple path (`parts`), e.g. 'model.layers.0.mlp'.

    Returns:
      The node there.
    """
    node = root
    for part in parts(path):
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def replace(root: Any, path: Path, value: Any) -> None:
    """Put `value` at `path` below `root`, in place (an nnx module's attribute or a list's item).

    Args:
      root: the module (or list) to start from, e.g. a model.
      path: dotted or tuple path (`parts`) of the node to replace.
      value: the new node (e.g. a wrapper of the old one).
    """
    *parents, last = parts(path)
    parent = get(root, parents)
    if isinstance(last, int):
        parent[last] = value
    else:
        setattr(parent, last, value)
