"""mwjax's command lines (`python -m experiments.<name>`, `converters.to_orbax`): numeric flags declared with
their range, and flag errors as usage errors.

Every numeric flag declares its range where it is defined: integers with absl's lower_bound / upper_bound,
floats with `define_float` (finite, optionally strictly above a bound), comma-separated numbers with
`define_numbers`. A value outside it is refused as the command line is parsed, before any model loads, and
`run` (what every command line's __main__ calls) makes that a usage error: the message names the flag, the
exit status is 2. No flags are defined here.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from absl import app, flags

FLAGS = flags.FLAGS
USAGE_ERROR = 2  # the exit status of a command line refused before anything ran (argparse's, getopt's)


class FiniteFloatParser(flags.FloatParser):
    """absl's FloatParser (inclusive bounds) that also refuses NaN / inf and, with `above`, values <= above."""

    def __init__(self, lower_bound: float | None = None, upper_bound: float | None = None,
                 above: float | None = None) -> None:
        super().__init__(lower_bound, upper_bound)
        self.above = above
        if above is not None:
            self.syntactic_help = f"a number > {above:g}" + (f" and <= {upper_bound:g}" if upper_bound is not None
                                                             else "")
        self.syntactic_help = f"{self.syntactic_help} (finite)"

    def is_outside_bounds(self, val: float) -> bool:
        """Whether absl refuses `val`: NaN / inf, outside [lower_bound, upper_bound], or not above `above`.

        Args:
          val: the parsed value.

        Returns:
          True when the value is out of range.
        """
        return (not math.isfinite(val) or super().is_outside_bounds(val)
                or (self.above is not None and not val > self.above))


class NumberListParser(flags.ListParser):
    """A comma-separated list of numbers, each parsed (and range-checked) by `item`."""

    def __init__(self, item: flags.ArgumentParser) -> None:
        super().__init__()
        self.item = item
        self.syntactic_help = f"a comma-separated list, each {item.syntactic_help}"

    def parse(self, argument) -> list:
        """Split `argument` at commas and parse each item with `item`.

        Args:
          argument: the flag's text ("1,2,3"), or a list (a default, whose strings are parsed).

        Returns:
          The list of numbers.
        """
        return [self.item.parse(x) if isinstance(x, str) else x for x in super().parse(argument)]

    def flag_type(self) -> str:
        """The type named in --help: "list of int" / "list of float"."""
        return f"list of {self.item.flag_type()}"


def define_float(name: str, default: float | None, help: str, *, lower_bound: float | None = None,
                 upper_bound: float | None = None, above: float | None = None) -> flags.FlagHolder:
    """A float flag whose value must be finite and lie in [lower_bound, upper_bound] (and > above).

    Args:
      name: the flag's name.
      default: its default value (None: no default).
      help: its help text.
      lower_bound: smallest value allowed (inclusive); None for no bound.
      upper_bound: largest value allowed (inclusive); None for no bound.
      above: values must be strictly greater than this; None for no such bound.

    Returns:
      absl's FlagHolder, owned by the calling module.
    """
    return flags.DEFINE(FiniteFloatParser(lower_bound, upper_bound, above), name, default, help,
                        serializer=flags.ArgumentSerializer(), module_name=_caller())


def define_numbers(name: str, default: list, help: str, kind: type = int, *, lower_bound: float | None = None,
                   upper_bound: float | None = None) -> flags.FlagHolder:
    """A flag holding a comma-separated list of `kind` (int or float; floats finite).

    Args:
      name: the flag's name.
      default: its default list (None: no default).
      help: its help text.
      kind: int or float, the type of each item.
      lower_bound: smallest value of each item (inclusive); None for no bound.
      upper_bound: largest value of each item (inclusive); None for no bound.

    Returns:
      absl's FlagHolder, owned by the calling module.
    """
    item = flags.IntegerParser(lower_bound, upper_bound) if kind is int else FiniteFloatParser(lower_bound, upper_bound)
    return flags.DEFINE(NumberListParser(item), name, default, help, serializer=flags.CsvListSerializer(","),
                        module_name=_caller())


def _caller() -> str:
    """The module that called the define_* helper: it owns the flag (its --help lists it)."""
    name = sys._getframe(2).f_globals["__name__"]
    return sys.argv[0] if name == "__main__" else name  # as absl names the main module's own flags


SHORT_HELP, FULL_HELP = ("--help", "-?", "--helpshort"), ("--helpfull",)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with a bad value as a usage error: its message (naming the flag) on stderr, exit
    status 2, before anything is loaded.

    --help / --helpshort / --helpfull print the help on stdout and exit with status 0 (absl's own help flags
    exit with 1, which scripts and shells read as a failure).

    Args:
      argv: the full command line, `sys.argv` (argv[0] the program).

    Returns:
      The arguments left after the flags are parsed (argv[0] first), as absl's `FLAGS(argv)`.
    """
    for arg in argv[1:]:
        if arg == "--":
            break
        if arg in SHORT_HELP + FULL_HELP:
            app.usage(shorthelp=arg in SHORT_HELP, writeto_stdout=True, exitcode=0)
    try:
        return FLAGS(argv)
    except flags.Error as e:
        usage_error(argv[0], str(e))


def usage_error(program: str, message: str):
    """Print `message` as a command-line error of `program` and exit with status 2.

    Args:
      program: the program's path (argv[0]); its file name prefixes the message.
      message: what is wrong (e.g. absl's flag error, which names the flag).
    """
    sys.stderr.write(f"{Path(program).name}: {message}\nPass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(USAGE_ERROR)


def run(main: Callable[[list[str]], Any]) -> None:
    """`app.run(main)` with `parse_flags`: what every experiment's __main__ calls.

    Args:
      main: the command line's `main(argv)`, called with the arguments left after the flags.
    """
    app.run(main, flags_parser=parse_flags)
