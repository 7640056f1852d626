"""MacDrop fine-tuning (House of Cards §3, Algorithm 1): find the massive weights, train LoRA/DoRA
while the pretrained massive rows are dropped on a curriculum, save the adapter.

    python -m experiments.macdrop --config=smollm2_135m                 # CPU minutes, embedded data
    python -m experiments.macdrop --config=llama3_8b:dora_macdrop --config.train.epochs=1

Bare config names are files under mwjax/experiments/configs/ (`name:arg` passes `arg` to its
get_config); `--config.<field>=value` overrides any field. Every setting, the data file and the
output directory are checked before the model is touched. Written under `output_dir` (default
runs/<config name>): config.json, massive_weights.json, metrics.jsonl, checkpoints/ (orbax),
adapter/ (orbax, `mwjax.adapters.peft.load_adapters`), adapter_peft/ (HF PEFT `PeftModel.from_pretrained`)
and, last, results.json.

Re-running into the same output_dir with the same config resumes from the latest checkpoint (or,
when results.json is there, reports the finished run). A different config is refused with the
fields that differ, unless `--config.resume=True` (continue with the new config, e.g. a lower
learning rate after a divergence; the old config is kept as config.step<N>.json) or
`--config.overwrite_output_dir=True` (delete what the earlier run wrote and start afresh).

One run per output_dir: process 0 holds the directory's lock (`mwjax.core.run_lock`, `.<name>.lock` beside it) for
the run's life; a second run on it is refused with the first one's pid, host and start time, and the lock of
a run that died is taken over with a warning. adapter/ and adapter_peft/ are written directory-atomically.

The run itself is `mwjax.finetune.job.run` (what `experiments.report` calls too): this command line parses the
config and calls it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from ml_collections import ConfigDict, config_flags

from mwjax.core import cli, lazy, run_lock
from mwjax.experiments.configs import base as base_config

# the run (and jax with it) loads after the flags are parsed: --help answers without it
job = lazy.module("mwjax.finetune.job")
distributed = lazy.module("mwjax.core.distributed")
massive = lazy.module("mwjax.research.massive")

CONFIG_DIR = Path(__file__).parent / "configs"
_CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/configs/<name>.py[:arg], or a bare <name>")


def config_fields(config: ConfigDict, prefix: str = "") -> list[str]:
    """'train.learning_rate = 0.0001' for every field of `config`, dotted, in order.

    Args:
      config: an ml_collections `ConfigDict` (nested ones are walked).
      prefix: prepended to each field's name (the dotted path of `config` itself).

    Returns:
      One "name = repr(value)" line per leaf field.
    """
    lines = []
    for key, value in config.items():
        if isinstance(value, ConfigDict):
            lines += config_fields(value, f"{prefix}{key}.")
        else:
            lines.append(f"{prefix}{key} = {value!r}")
    return lines


# --help shows every field a run takes, with the defaults of mwjax/experiments/configs/base.py
__doc__ += ("\nConfig fields (--config.<field>=value) and their defaults in mwjax/experiments/configs/base.py:\n  "
            + "\n  ".join(config_fields(base_config.get_config())))


def resolve_config_argv(argv: list[str]) -> list[str]:
    """`--config=llama3_8b[:arg]` -> `--config=<this package>/configs/llama3_8b.py[:arg]`.

    A --config that holds a "/" or ".py" is left as is; SystemExit naming the known configs when no file has the
    bare name.

    Args:
      argv: the command line (`sys.argv`), before absl parses it.

    Returns:
      The command line with a bare config name resolved to its file.
    """
    out = []
    for arg in argv:
        if arg.startswith("--config=") and "/" not in arg and ".py" not in arg:
            name, sep, rest = arg.removeprefix("--config=").partition(":")
            path = CONFIG_DIR / f"{name}.py"
            if not path.is_file():
                known = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))
                raise SystemExit(f"no config named {name!r}; known configs: {', '.join(known)}")
            arg = f"--config={path}{sep}{rest}"
        out.append(arg)
    return out


def main(argv):
    """Check --config, run the MacDrop fine-tuning (`mwjax.finetune.job.run`) and print its summary.

    Args:
      argv: the command line as absl passes it (flags already parsed); unused.
    """
    del argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("jax", "absl", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        job.plan(_CONFIG.value)  # a bad field is a usage error (exit status 2) naming it, before anything starts
    except ValueError as e:
        cli.usage_error("experiments.macdrop", str(e))
    try:
        with distributed.explain_collective_timeouts():
            summary = job.run(_CONFIG.value)
    except run_lock.DirectoryLockedError as e:  # another run holds output_dir: its pid and start time, no traceback
        raise SystemExit(f"experiments.macdrop: {e}") from None
    if distributed.is_lead() and "eval_losses" in summary:
        final = summary["eval_losses"][-1][1] if summary["eval_losses"] else None
        print(f"massive weights: {massive.MassiveWeights.from_dict(summary['massive_weights']).label}")
        print(f"validation loss: before {summary['eval_loss_before']} -> after {final}")
        print(f"adapter: {summary['adapter']} (orbax), {summary['adapter_peft']} (HF PEFT)")


if __name__ == "__main__":
    sys.argv = resolve_config_argv(sys.argv)
    cli.run(main)
