"""Imports point downward: launch -> mwjax.experiments -> mwjax.converters -> the rest of mwjax."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "mwjax"
LAYERS = ("mwjax.experiments", "mwjax.converters", "mwjax")  # top to bottom


def layer_of(module: str) -> int:
    return next(i for i, name in enumerate(LAYERS) if module == name or module.startswith(name + "."))


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name == "mwjax" or name.startswith("mwjax.")}


def test_no_import_runs_upward():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        own = layer_of(module)
        upward += [f"{module} imports {name}" for name in imported(path) if layer_of(name) < own]
    assert not upward, "\n".join(upward)
