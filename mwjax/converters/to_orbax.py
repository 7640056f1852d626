"""Convert any checkpoint `converters.load` reads into an mwjax orbax checkpoint (plus its tokenizer).

    python -m converters.to_orbax --src=PATH --dst=DIR [--dtype=bfloat16]

Load the result with `converters.load(DIR)` or `mwjax.converters.checkpoint.restore(DIR, shardings=...)`: a
large model converted once is then restored straight into a mesh on every host.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from absl import flags

from mwjax.core import atomic, cli, lazy

# jax, orbax and the loader load after the flags are parsed: --help answers without them
jnp = lazy.module("jax.numpy")
checkpoint = lazy.module("mwjax.converters.checkpoint")
loader = lazy.module("mwjax.converters.loader")

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined when it runs (a library import defines no global flags: `--dtype` is
    the experiments' too, and both may be imported in one process)."""
    flags.DEFINE_string("src", None, "HF dir, .gguf file, embedded:<name> or hub id", required=True)
    flags.DEFINE_string("dst", None, "output directory (must not exist unless --overwrite)", required=True)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "dtype of the stored parameters")
    flags.DEFINE_bool("overwrite", False, "replace an existing --dst")


def convert(src: str, dst: str | os.PathLike, dtype="float32", overwrite: bool = False) -> Path:
    """Load `src` and write it to `dst` as an mwjax orbax checkpoint with its tokenizer in `dst/tokenizer`.

    The checkpoint and the tokenizer are written as one directory-atomic output (`mwjax.core.atomic`): a kill leaves
    the previous `dst` or the new one, never a new model beside an old tokenizer or none.

    Args:
      src: anything `converters.load` reads.
      dst: the output directory; it must not exist unless `overwrite` (then it must hold an orbax checkpoint).
      dtype: the stored parameters' dtype.
      overwrite: replace an existing checkpoint at `dst`.

    Returns:
      The absolute path of `dst`.
    """
    dst = atomic.recover(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists: pass overwrite=True (--overwrite) to replace it, or another dst")
    orbax_files = (checkpoint.METADATA_ITEM, checkpoint.STATE_ITEM)  # an mwjax orbax checkpoint
    atomic.check_replaceable(dst, orbax_files, "an mwjax orbax checkpoint")  # before minutes of loading
    model, tokenizer = loader.load(src, dtype=jnp.dtype(dtype))
    with atomic.atomic_directory(dst, replaces=orbax_files, what="an mwjax orbax checkpoint",
                                 create=False) as staging:
        checkpoint.save(model, staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging / loader.TOKENIZER_DIR))
    return dst


def main(argv):
    """Convert --src to an orbax checkpoint at --dst and print its path (exits when --dst exists and may not go).

    Args:
      argv: the command line as absl passes it (flags already parsed; unused).
    """
    del argv
    if Path(FLAGS.dst).exists() and not FLAGS.overwrite:  # before minutes of loading
        raise SystemExit(f"{FLAGS.dst} exists: pass --overwrite to replace it, or another --dst")
    for name in ("absl", "orbax", "jax"):  # orbax logs ~40 INFO lines per save
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        path = convert(FLAGS.src, FLAGS.dst, FLAGS.dtype, FLAGS.overwrite)
    except FileExistsError as e:  # --dst holds something else than a checkpoint: refused before loading
        raise SystemExit(str(e)) from None
    print(f"wrote {path}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
