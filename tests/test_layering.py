"""Imports point down the layers of mwjax (DESIGN.md), and no module imports itself round a cycle.

Every import counts: module level or inside a function (lazy), `from . import x`, and `importlib.import_module`
/ `__import__` with a literal name. A module may import its own layer and the layers below it.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = (  # bottom to top
    "mwjax.core",
    "mwjax.instrument",
    "mwjax.nn",
    "mwjax.families",
    "mwjax.converters",
    "mwjax.data",
    "mwjax.adapters",
    "mwjax.research",
    "mwjax.finetune",
    "mwjax.eval",
    "mwjax.experiments",
)
TOP = "mwjax"  # the package itself: the flat research API, resolved on first use, may name any layer


def module_name(path: Path, root: Path) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def modules(root: Path, package: str = "mwjax") -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}


def imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The mwjax modules `path` imports anywhere in its code, each the most specific known module named."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import name`: the module pkg.name where there is one, else pkg itself
            names |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(
                node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__"):
                names.add(node.args[0].value)
    found = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)
    return found


def layer_of(module: str) -> int:
    if module == TOP:
        return len(LAYERS)
    return next(i for i, name in enumerate(LAYERS) if module == name or module.startswith(name + "."))


def check(root: Path) -> tuple[list[str], list[list[str]]]:
    """(upward imports, import cycles) of the mwjax tree under `root`."""
    mods = modules(root)
    graph = {m: imports(p, m, set(mods)) for m, p in mods.items()}
    upward = sorted(f"{m} (layer {LAYERS[layer_of(m)] if m != TOP else TOP}) imports {t}" for m, targets in
                    graph.items() for t in targets if layer_of(t) > layer_of(m))
    return upward, cycles(graph)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected group of more than one module (Tarjan), as a sorted list."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_belongs_to_a_layer():
    assert [m for m in modules(ROOT) if m != TOP and not any(m == n or m.startswith(n + ".") for n in LAYERS)] == []


def test_imports_point_down_and_never_round_a_cycle():
    upward, loops = check(ROOT)
    assert not upward, "\n".join(upward)
    assert not loops, "\n".join(" -> ".join(c) for c in loops)


def test_the_check_sees_a_planted_upward_import_and_a_cycle(tmp_path):
    """The checker itself: lazy, relative and importlib imports are read, upward ones and cycles reported."""
    files = {
        "mwjax/__init__.py": "",
        "mwjax/core/__init__.py": "",
        "mwjax/core/a.py": "def f():\n    from mwjax.research import attacks  # lazy and upward\n",
        "mwjax/core/b.py": "from . import c\n",
        "mwjax/core/c.py": "import importlib\nimportlib.import_module('mwjax.core.b')\n",
        "mwjax/research/__init__.py": "",
        "mwjax/research/attacks.py": "from mwjax.core import a\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    upward, loops = check(tmp_path)
    assert upward == ["mwjax.core.a (layer mwjax.core) imports mwjax.research.attacks"]
    assert ["mwjax.core.b", "mwjax.core.c"] in loops
    assert ["mwjax.core.a", "mwjax.research.attacks"] in loops
