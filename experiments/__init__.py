"""`python -m experiments.<name>`, the documented command lines: an alias of `mwjax.experiments`.

The experiments live in `mwjax/experiments/`; this package only points its module search path there,
so `python -m experiments.macdrop --config=llama3_8b` runs `mwjax/experiments/macdrop.py`. In code,
import `mwjax.experiments.<name>`.
"""

from mwjax.experiments import __path__  # noqa: F401
