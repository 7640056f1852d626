"""`python -m converters.<name>` (e.g. `converters.to_orbax`): an alias of `mwjax.converters`.

The converters live in `mwjax/converters/`; this package only points its module search path there.
In code, import `mwjax.converters`.
"""

from mwjax.converters import __path__  # noqa: F401
