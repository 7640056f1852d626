"""Imports deferred to first use, so that a command line answers --help (and refuses a bad flag) before jax,
flax and matplotlib load: ~5 s of a 2-core CPU's start-up that a flag error or a help page does not need.

`module(name)` stands for `import name` in a module's globals; `exports(package, table)` gives a package the
names of its submodules (`from mwjax.eval import perplexity`) without importing them with the package.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Mapping
from pathlib import Path


class _Deferred(types.ModuleType):
    """The module `__name__`, imported on the first attribute read (then every read is the module's own)."""

    def __init__(self, name: str, before: Callable[[], object] | None) -> None:
        super().__init__(name)
        self._before = before

    def __getattr__(self, attr: str):
        return getattr(self._module(), attr)

    def __dir__(self) -> list[str]:
        return dir(self._module())

    def __repr__(self) -> str:
        return f"<deferred module {self.__name__!r}>"

    def _module(self) -> types.ModuleType:
        if self.__name__ not in sys.modules and self._before is not None:
            self._before()
        return importlib.import_module(self.__name__)


def module(name: str, before: Callable[[], object] | None = None) -> types.ModuleType:
    """`import name`, deferred: the module itself if already imported, else a stand-in that imports it on first
    use. Write `massive = lazy.module("mwjax.research.massive")` where `from mwjax.research import massive` was.

    Args:
      name: dotted module name.
      before: called once before the import (e.g. choosing matplotlib's backend before pyplot loads).

    Returns:
      the module, or a `types.ModuleType` whose attribute reads are the module's.
    """
    return sys.modules.get(name) or _Deferred(name, before)


def exports(package: str, table: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """A package's `__getattr__` and `__dir__` (PEP 562) for names that live in its submodules.

    A submodule never shares a name with an export: importing `package.x` binds `x` on the package, which would
    shadow an exported function `x` for whoever imports after it (a clash is a ValueError).

    Args:
      package: the package's `__name__`.
      table: exported name -> submodule (relative to the package) that defines it under the same name.

    Returns:
      (__getattr__, __dir__) to assign in the package's `__init__`.
    """
    clash = [name for name in table for d in sys.modules[package].__path__
             if (Path(d) / f"{name}.py").exists() or (Path(d) / name).is_dir()]
    if clash:
        raise ValueError(f"{package}: exports {clash} are also submodule names")

    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{table[name]}"), name)
        setattr(sys.modules[package], name, value)  # later reads skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__
