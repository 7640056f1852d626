"""One docstring style for the public API (Google style, as in `nn.layers.WrappedLinear`).

Every public function, method and class of `mwjax` has a docstring. A function that takes arguments
(besides self / cls) names each of them under `Args:` (one `name: ...` line each, shapes and the paper's
symbol where they apply) and says what it gives under `Returns:` (or `Yields:`) when it returns a value.
Read from the source, so a name's docstring is checked without importing jax.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mwjax"


def _returns_value(fn: ast.FunctionDef) -> bool:
    """True when `fn`'s own body (not a nested function's) returns a value."""
    todo = list(fn.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
            continue
        if isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None):
            return True
        todo.extend(ast.iter_child_nodes(node))
    return False


def _yields(fn: ast.FunctionDef) -> bool:
    todo = list(fn.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
            continue
        if isinstance(node, ast.Yield | ast.YieldFrom):
            return True
        todo.extend(ast.iter_child_nodes(node))
    return False


def _section(doc: str, title: str) -> list[str] | None:
    """The lines of section `title` ("Args:") up to the next blank line, or None when it is absent."""
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == title:
            body = []
            for item in lines[i + 1:]:
                if not item.strip():
                    break
                body.append(item)
            return body
    return None


def _problems(fn: ast.FunctionDef, where: str) -> list[str]:
    doc = ast.get_docstring(fn)
    if not doc:
        return [f"{where}: no docstring"]
    args = fn.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs if a.arg not in ("self", "cls")]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    if not names:
        return []
    problems = []
    section = _section(doc, "Args:")
    if section is None:
        problems.append(f"{where}: no 'Args:' section")
    else:
        listed = {line.strip().split(":")[0].lstrip("*") for line in section if ":" in line}
        missing = [n for n in names if n not in listed]
        if missing:
            problems.append(f"{where}: 'Args:' does not name {missing}")
    if _yields(fn):
        if "Yields:" not in doc.splitlines() and "Yields:" not in [s.strip() for s in doc.splitlines()]:
            problems.append(f"{where}: no 'Yields:' section")
    elif _returns_value(fn) and "Returns:" not in [s.strip() for s in doc.splitlines()]:
        problems.append(f"{where}: no 'Returns:' section")
    return problems


def _public(body, prefix=""):
    for node in body:
        if node.name.startswith("_") if hasattr(node, "name") else True:
            continue
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            is_property = any(isinstance(d, ast.Name) and d.id in ("property", "cached_property")
                              for d in node.decorator_list)
            yield prefix + node.name, node, is_property
        elif isinstance(node, ast.ClassDef):
            yield prefix + node.name, node, False
            yield from _public(node.body, prefix + node.name + ".")


def docstring_problems(path: Path) -> list[str]:
    """Every departure from the style in one module, as 'file:line name: what'."""
    tree = ast.parse(path.read_text())
    rel = path.relative_to(PACKAGE.parent) if path.is_relative_to(PACKAGE.parent) else path.name
    problems = []
    for name, node, is_property in _public(tree.body):
        where = f"{rel}:{node.lineno} {name}"
        if isinstance(node, ast.ClassDef) or is_property:
            if not ast.get_docstring(node):
                problems.append(f"{where}: no docstring")
        else:
            problems.extend(_problems(node, where))
    return problems


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PACKAGE)) for p in MODULES])
def test_public_names_are_documented_in_one_style(path):
    problems = docstring_problems(path)
    assert not problems, "\n".join(problems)


def test_the_style_check_catches_a_missing_argument(tmp_path):
    bad = tmp_path / "planted.py"
    bad.write_text('def f(x, y):\n    """Sum.\n\n    Args:\n      x: a number.\n\n    Returns:\n      x + y.\n'
                   '    """\n    return x + y\n\n\ndef g(x):\n    """No sections."""\n    return x\n')
    problems = docstring_problems(bad)
    assert any("does not name ['y']" in p for p in problems), problems
    assert any("g: no 'Args:'" in p for p in problems), problems
