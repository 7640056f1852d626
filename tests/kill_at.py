"""Run `experiments.macdrop` and SIGKILL it at a chosen point, as a preemption or the OOM killer would:

    python tests/kill_at.py save:4 -- --config=smollm2_135m ...   # inside the save of checkpoint 4, after its
                                                                  # data is written, before orbax commits it
    python tests/kill_at.py step:3 -- ...     # as the 3rd optimizer step of this process starts
    python tests/kill_at.py export -- ...     # while the finished run exports its HF PEFT adapter

and, in-process, `filesystem_steps`: count the filesystem changes a write makes under a directory and die
at any one of them (every rename, directory made or removed, file opened for writing, safetensors or orbax
save), as a kill at that moment would leave the disk.
"""

import builtins
import contextlib
import io
import os
import shutil
import signal
import sys
from pathlib import Path


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
        from mwjax.finetune import loop  # where fit looks the step's batching up

        stack_step, calls = loop.stack_step, []

        def stack_step_or_die(*args, **kwargs):
            calls.append(1)
            if len(calls) == int(arg):
                die()
            return stack_step(*args, **kwargs)

        loop.stack_step = stack_step_or_die
    elif kind == "export":
        from mwjax import peft

        peft.export_peft = die
    else:
        raise SystemExit(f"unknown kill point {point!r}")


class Killed(BaseException):
    """The simulated kill of `filesystem_steps`: no `except Exception` handler sees it, and nothing the dying
    process still tries (its cleanup) changes the disk."""


def _writes(mode: str) -> bool:
    return any(c in mode for c in "wax+")


@contextlib.contextmanager
def filesystem_steps(root, kill_at: int | None = None):
    """Record, in the list yielded, each filesystem change made under `root` in the block: os.replace / rename /
    mkdir / rmdir / unlink / remove, shutil.rmtree, a file opened for writing, a safetensors save_file and an orbax
    Checkpointer.save (one step each: what they do inside is theirs). With `kill_at=n` the n-th raises `Killed`
    before it runs, and every later change raises it again without running: the disk stays as a SIGKILL at that
    moment leaves it.
    """

    import orbax.checkpoint as ocp
    import safetensors.numpy

    from mwjax.converters import hf_export as save_hf_module

    root = str(Path(root).absolute())
    steps: list[str] = []
    inside, dead = [False], [False]  # inside one step (orbax's threads included): its own changes are not steps

    def under(*paths) -> bool:
        return any(isinstance(p, str | os.PathLike) and os.path.abspath(os.fspath(p)).startswith(root) for p in paths)

    def wrap(owner, name: str, paths=lambda *a, **k: a[:2], counts=lambda *a, **k: True):
        original = getattr(owner, name)

        def step(*args, **kwargs):
            if inside[0] or not counts(*args, **kwargs) or not under(*paths(*args, **kwargs)):
                return original(*args, **kwargs)
            if dead[0]:
                raise Killed
            named = [p for p in paths(*args, **kwargs) if isinstance(p, str | os.PathLike)]
            steps.append(f"{name} {' '.join(os.path.relpath(os.fspath(p), root) for p in named)}")
            if kill_at is not None and len(steps) == kill_at:
                dead[0] = True
                raise Killed
            inside[0] = True
            try:
                return original(*args, **kwargs)
            finally:
                inside[0] = False

        return owner, name, original, step

    opened = lambda file, mode="r", *a, **k: _writes(mode)
    patches = [wrap(os, n) for n in ("replace", "rename", "mkdir", "rmdir", "unlink", "remove")]
    patches += [wrap(shutil, "rmtree", paths=lambda p, *a, **k: (p,)),
                wrap(builtins, "open", paths=lambda f, *a, **k: (f,), counts=opened),
                wrap(io, "open", paths=lambda f, *a, **k: (f,), counts=opened),
                wrap(safetensors.numpy, "save_file", paths=lambda t, f, *a, **k: (f,)),
                wrap(save_hf_module, "save_file", paths=lambda t, f, *a, **k: (f,)),
                wrap(ocp.Checkpointer, "save", paths=lambda self, d, *a, **k: (d,))]
    for owner, name, _, step in patches:
        setattr(owner, name, step)
    try:
        yield steps
    finally:
        for owner, name, original, _ in patches:
            setattr(owner, name, original)


if __name__ == "__main__":
    point, separator, *args = sys.argv[1:]
    assert separator == "--", "usage: kill_at.py POINT -- ARGS"
    arm(point)
    from absl import app

    from mwjax.experiments import macdrop

    sys.argv = macdrop.resolve_config_argv(["experiments.macdrop", *args])  # as its __main__ block does
    app.run(macdrop.main)
