"""Run by tests/test_flags.py in a fresh process: import each experiment in turn and try 0, -1 and NaN on every
numeric flag it defines (its own and the shared ones it imports), parsed as its command line parses them
(`cli.parse_flags`), in-process; print what happened as JSON.

    python tests/flag_walk.py attacks prune ...

Each experiment's modules are imported afresh (the shared flag modules define their flags again), and the flags
they defined are deleted afterwards, so experiments that define the same flag name can be walked in one process.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import sys

from absl import flags

from mwjax.core import cli

VALUES = ("0", "-1", "nan")
# string flags holding numbers, tried with values that must be refused
SPECS = {"attack": ("scale_super_weight:nan", "scale_super_weight:inf", "zero_top_k:0", "retain_top_k:-1"),
         "sparsities": ("nan", "1.0", "-0.5", "0:4")}
# flags an experiment takes only together: each is tried with its companions set to a value in range
COMPANIONS = {("super_weight", "layer"): ("--row=0", "--col=0"), ("super_weight", "row"): ("--layer=0", "--col=0"),
              ("super_weight", "col"): ("--layer=0", "--row=0")}


def describe(parser) -> dict:
    """A numeric flag's parser as {"kind", "finite", "lower", "upper", "above", "list"}; None for a flag that is not
    numeric."""
    if isinstance(parser, cli.NumberListParser):
        return describe(parser.item) | {"list": True}
    if isinstance(parser, flags.IntegerParser | flags.FloatParser):
        return {"kind": "int" if isinstance(parser, flags.IntegerParser) else "float",
                "finite": isinstance(parser, cli.FiniteFloatParser), "lower": parser.lower_bound,
                "upper": parser.upper_bound, "above": getattr(parser, "above", None), "list": False}
    return None


def names(flag: str) -> list[str]:
    """The flag's name and, for an alias (DEFINE_alias), the flag it stands for (which absl's messages name)."""
    help_text = flags.FLAGS[flag].help or ""
    return [flag] + ([help_text.removeprefix("Alias for --").rstrip(".")] if help_text.startswith("Alias for --")
                     else [])


def try_value(program: str, flag: str, value: str, companions: tuple[str, ...] = ()) -> dict:
    """Parse `--flag=value` (with the flags it needs beside it) as the experiment's command line does:
    {"status", "stderr"}."""
    flags.FLAGS.unparse_flags()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            cli.parse_flags([program, f"--{flag}={value}", *companions])
            status = 0
        except SystemExit as e:
            status = e.code
    return {"status": status, "stderr": err.getvalue()}


def walk(experiment: str) -> list[dict]:
    package = importlib.import_module("mwjax.experiments")
    for name in [m for m in sys.modules if m.startswith("mwjax.experiments.")]:
        del sys.modules[name]  # and the package's attribute, or `from mwjax.experiments import common` finds it
        if name.count(".") == 2 and hasattr(package, name.rpartition(".")[2]):
            delattr(package, name.rpartition(".")[2])
    before = set(flags.FLAGS)
    importlib.import_module(f"mwjax.experiments.{experiment}")
    defined = sorted(set(flags.FLAGS) - before)
    out = []
    program = f"experiments.{experiment}"
    for flag in defined:
        declared = describe(flags.FLAGS[flag].parser)
        if declared is not None:
            out.append({"flag": flag, "names": names(flag), **declared,
                        "results": {v: try_value(program, flag, v, COMPANIONS.get((experiment, flag), ()))
                                    for v in VALUES}})
        elif flag in SPECS:
            out.append({"flag": flag, "names": names(flag), "kind": "spec",
                        "results": {v: try_value(program, flag, v) for v in SPECS[flag]}})
    flags.FLAGS.unparse_flags()
    for flag in defined:
        delattr(flags.FLAGS, flag)
    return out


if __name__ == "__main__":
    print(json.dumps({experiment: walk(experiment) for experiment in sys.argv[1:]}))
