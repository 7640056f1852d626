"""Run `experiments.macdrop` and SIGKILL it at a chosen point, as a preemption or the OOM killer would:

    python tests/kill_at.py save:4 -- --config=smollm2_135m ...   # inside the save of checkpoint 4, after its
                                                                  # data is written, before orbax commits it
    python tests/kill_at.py step:3 -- ...     # as the 3rd optimizer step of this process starts
    python tests/kill_at.py export -- ...     # while the finished run exports its HF PEFT adapter
"""

import os
import signal
import sys


def die(*_args, **_kwargs):
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    kind, _, arg = point.partition(":")
    if kind == "save":
        from orbax.checkpoint._src.handlers import composite_checkpoint_handler as composite

        handler = composite.CompositeCheckpointHandler
        finalize = handler.finalize

        def finalize_then_die(self, directory):
            finalize(self, directory)
            if directory.name.split(".")[0] == arg:  # the temporary directory of step `arg`
                die()

        handler.finalize = finalize_then_die
    elif kind == "step":
        from mwjax import train

        stack_step, calls = train.stack_step, []

        def stack_step_or_die(*args, **kwargs):
            calls.append(1)
            if len(calls) == int(arg):
                die()
            return stack_step(*args, **kwargs)

        train.stack_step = stack_step_or_die
    elif kind == "export":
        from mwjax import peft

        peft.export_peft = die
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    point, separator, *args = sys.argv[1:]
    assert separator == "--", "usage: kill_at.py POINT -- ARGS"
    arm(point)
    from absl import app

    from mwjax.experiments import macdrop

    sys.argv = macdrop.resolve_config_argv(["experiments.macdrop", *args])  # as its __main__ block does
    app.run(macdrop.main)
