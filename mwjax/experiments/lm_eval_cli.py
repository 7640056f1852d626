"""`mwjax-lm-eval`: lm-evaluation-harness' own command line with the `mwjax` backend registered.

    mwjax-lm-eval --model mwjax --model_args pretrained=PATH,attack=zero_top_k:5 --tasks arc_easy,piqa

Every argument is lm-eval's (`lm_eval --help`). A wrapper, because lm-eval (0.4.13) discovers no backends
from installed packages (no entry-point group): the plain `lm_eval` command only knows what its own
modules register. The backend is registered lazily ("module:class"), so listing tasks imports no JAX.
"""

from __future__ import annotations

BACKEND = ("mwjax", "mwjax.experiments.lm_eval_model:MwjaxPretrainedLM")


def register() -> None:
    """Make `--model mwjax` known to lm-eval in this process (idempotent)."""
    from lm_eval.api.registry import model_registry

    name, target = BACKEND
    if name not in model_registry:
        model_registry.register(name, target=target)


def main() -> None:
    """The `mwjax-lm-eval` entry point: register the backend, then run lm-eval's command line on `sys.argv`."""
    from lm_eval.__main__ import cli_evaluate

    register()
    cli_evaluate()


if __name__ == "__main__":
    main()
