"""Convert any checkpoint `converters.load` reads into an mwjax orbax checkpoint (plus its tokenizer).

    python -m converters.to_orbax --src=PATH --dst=DIR [--dtype=bfloat16]

Load the result with `converters.load(DIR)` or `mwjax.checkpoint.restore(DIR, shardings=...)`: a
large model converted once is then restored straight into a mesh on every host.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax.numpy as jnp
from absl import app, flags

from mwjax import checkpoint
from mwjax.converters.loader import TOKENIZER_DIR, load

FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "HF dir, .gguf file, embedded:<name> or hub id", required=True)
flags.DEFINE_string("dst", None, "output directory (must not exist unless --overwrite)", required=True)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "dtype of the stored parameters")
flags.DEFINE_bool("overwrite", False, "replace an existing --dst")


def convert(src: str, dst: str, dtype=jnp.float32, overwrite: bool = False):
    model, tokenizer = load(src, dtype=dtype)
    path = checkpoint.save(model, dst, overwrite=overwrite)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path / TOKENIZER_DIR))
    return path


def main(argv):
    del argv
    if Path(FLAGS.dst).exists() and not FLAGS.overwrite:  # before minutes of loading
        raise SystemExit(f"{FLAGS.dst} exists: pass --overwrite to replace it, or another --dst")
    for name in ("absl", "orbax", "jax"):  # orbax logs ~40 INFO lines per save
        logging.getLogger(name).setLevel(logging.WARNING)
    path = convert(FLAGS.src, FLAGS.dst, jnp.dtype(FLAGS.dtype), FLAGS.overwrite)
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
