"""Flags and helpers shared by the experiment CLIs (defined once, so experiments can import each other)."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags

from mwjax import converters
from mwjax.converters import embedded
from mwjax.core import atomic, lazy, run_lock
from mwjax.data import corpora

# jax and what needs it load after the flags are parsed (--help and a refused flag answer without them)
jnp = lazy.module("jax.numpy")
peft = lazy.module("mwjax.adapters.peft")
likelihood = lazy.module("mwjax.eval.likelihood")
attacks = lazy.module("mwjax.research.attacks")

FLAGS = flags.FLAGS
flags.DEFINE_string("model", embedded.PREFIX + embedded.DEFAULT,
                    "HF dir, .gguf file, orbax dir, embedded:<name> or hub id")
flags.DEFINE_string("tokenizer", None, "tokenizer to use instead of the checkpoint's own: a HF dir, .gguf file or "
                    "embedded:<name>; 'none' loads the model alone (experiments that need only the bos id)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute and parameter dtype")
flags.DEFINE_string("first_token", None, "token id or token string to feed instead of bos")
flags.DEFINE_string("output_dir", None, "where to write JSON results and figures")
flags.DEFINE_enum("format", "png", ["png", "pdf", "svg"], "file format of the figures")
flags.DEFINE_string("adapter", None, "LoRA/DoRA adapter to merge into the model on load: an HF PEFT directory or "
                    "experiments.macdrop's adapter/ (orbax)")


def quiet_logs() -> None:
    """Keep JAX's backend probing (no TPU here, ...) out of the experiment's output."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("jax").setLevel(logging.WARNING)


def load_model(merge_adapter: bool = True):
    """Load --model in --dtype, with --adapter merged in so attacks see the fine-tuned weights.

    Args:
      merge_adapter: merge --adapter into the weights (`peft.merge`); False leaves it to the caller to attach.

    Returns:
      (model, tokenizer): the mwjax model and its tokenizer (per --tokenizer; None when that is 'none').
    """
    quiet_logs()
    model, tokenizer = converters.load(FLAGS.model, dtype=jnp.dtype(FLAGS.dtype), tokenizer=tokenizer_flag())
    if FLAGS.adapter and merge_adapter:
        model = peft.merge(peft.load_adapters(model, FLAGS.adapter))
    return model, tokenizer


def tokenizer_flag() -> bool | str:
    """--tokenizer as `converters.load`'s tokenizer argument: True (the checkpoint's own), False or a path."""
    if FLAGS.tokenizer is None:
        return True
    return False if FLAGS.tokenizer.lower() == "none" else FLAGS.tokenizer


def needs_tokenizer(experiment: str, why: str) -> None:
    """Refuse --tokenizer=none before anything loads, for an experiment that tokenizes text.

    Args:
      experiment: the command line's name, for the message.
      why: what it tokenizes (e.g. "--prompt and --stats_corpus").

    Raises:
      SystemExit naming the flag.
    """
    if tokenizer_flag() is False:
        raise SystemExit(f"experiments.{experiment} tokenizes {why}: drop --tokenizer=none (or give a tokenizer)")


def define_attack_flag(before: str) -> None:
    """Define --attack for an experiment that measures an attacked model (checked as the command line is parsed).

    `apply_attack` applies it.

    Args:
      before: what the attack precedes (e.g. "evaluation"), for --help.
    """
    flags.DEFINE_string("attack", None, f"attack applied before {before}, e.g. zero_top_k:5 or "
                        "massive_activations:zero (mwjax.research.attacks.from_spec)")
    check_flag("attack", lambda spec: attacks.parse_spec(spec))


def apply_attack(model, tokenizer):
    """The model with --attack applied (massive / super weights found on `model`), or the model itself.

    Args:
      model: the loaded mwjax model.
      tokenizer: its tokenizer (`attacks.from_spec` uses it to find the weights, with --first_token).

    Returns:
      The attacked model (`attacks.from_spec`), or `model` when --attack is not given.
    """
    if not FLAGS.attack:
        return model
    return attacks.from_spec(model, tokenizer, FLAGS.attack, first_token=first_token_flag())


def first_token_flag():
    """--first_token as an int when it is one, else the token string (or None)."""
    first = FLAGS.first_token
    return int(first) if first is not None and first.lstrip("-").isdigit() else first


def check_flag(name: str, check: Callable[[Any], object]) -> None:
    """Check --name as the command line is parsed, before any model loads.

    A list flag is checked item by item; an unset flag (None) is not checked.

    Args:
      name: the flag's name, without the dashes.
      check: called on the value; raises ValueError (or FileNotFoundError) with the message absl prints.
    """

    def validator(value) -> bool:
        try:
            for item in value if isinstance(value, list) else [] if value is None else [value]:
                check(item)
        except (ValueError, FileNotFoundError) as e:
            raise flags.ValidationError(str(e)) from None
        return True

    flags.register_validator(name, validator)


MANIFEST = ".mwjax-outputs.json"  # in an output directory: experiment -> the files its last run published
_STAGED: dict[Path, tuple[Path, str, contextlib.ExitStack]] = {}  # staging -> (output directory, experiment, lock)


def output_dir(default: str, name: str | None = None) -> Path:
    """--output_dir (or `default`) as `stage` prepares it, before the model loads: the staging directory the
    run writes its files into; `publish` swaps them in at the end.

    Args:
      default: the output directory when --output_dir is not given.
      name: the experiment, under which `publish` records its files (default: the last part of `default`).

    Returns:
      The staging directory (`stage`).
    """
    return stage(Path(FLAGS.output_dir or default), name or Path(default).name)


def stage(directory: Path, name: str) -> Path:
    """Hold `directory` for this run and return a staging directory beside it, checked writable, for the run's files.

    The hold is `mwjax.core.run_lock`'s: one run per output directory; a second run is refused naming the first.
    `publish` swaps the staging directory in whole (`mwjax.core.atomic`), so a killed or failed run leaves the
    previous results, never a mix of two runs' files. SystemExit with the reason when the directory is held, cannot
    be written, or is (or holds) the current directory.

    Args:
      directory: the output directory.
      name: the experiment, under which `publish` records its files in the directory's manifest.

    Returns:
      The staging directory.
    """
    final = directory.absolute()
    if final == Path.cwd() or final in Path.cwd().parents:
        raise SystemExit(f"output directory {directory} holds the current directory; results replace their "
                         "directory as a whole: choose a directory of their own (e.g. outputs/<experiment>)")
    lock = contextlib.ExitStack()
    try:
        lock.enter_context(run_lock.hold(final, what=f"experiments.{name} run"))
        staging = atomic.begin(final, replaces=None)
        lock.callback(atomic.abort, staging)  # not published (an error): no staging directory left
        with tempfile.TemporaryFile(dir=staging):
            pass
    except run_lock.DirectoryLockedError as e:
        lock.close()
        raise SystemExit(str(e)) from None
    except OSError as e:
        lock.close()
        raise SystemExit(f"cannot write to the output directory {directory}: {e}") from None
    atexit.register(lock.close)  # released when the process ends, if the run never publishes
    _STAGED[staging] = (final, name, lock)
    return staging


def publish(out: Path) -> Path:
    """Swap a staging directory in as its output directory, atomically; then release the directory.

    The files this experiment's previous run published there go, other experiments' files stay (the output
    directory's `.mwjax-outputs.json` manifest records which experiment wrote what).

    Args:
      out: the staging directory, from `stage` (or `output_dir`).

    Returns:
      The output directory.
    """
    final, name, lock = _STAGED.pop(out)
    with lock:
        try:
            manifest = json.loads((final / MANIFEST).read_text())
            manifest = manifest if isinstance(manifest, dict) else {}
        except (OSError, ValueError):
            manifest = {}
        previous = set(manifest.get(name, []))
        manifest[name] = sorted(p.name for p in out.iterdir())
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
        return atomic.commit(out, final, carry=lambda entry: entry not in previous and entry != MANIFEST)


def final_path(out: Path) -> Path:
    """Where a staging directory from `stage` is published (any other path: itself).

    Args:
      out: a staging directory, or any other path.

    Returns:
      The output directory `out` will be published to, or `out` itself.
    """
    return _STAGED[out][0] if out in _STAGED else out


def figure(out: Path, name: str) -> Path:
    """Where figure `name` goes: out/name.<--format>.

    Args:
      out: the (staging) output directory.
      name: the figure's file name, without the extension.

    Returns:
      The figure's path.
    """
    return out / f"{name}.{FLAGS.format}"


def model_name() -> str:
    """--model as figure titles show it: a path's last part ("Meta-Llama-3-8B"), embedded:<name> as is."""
    return FLAGS.model if FLAGS.model.startswith(embedded.PREFIX) else Path(FLAGS.model.rstrip("/")).name


def write_json(path: Path, payload) -> Path:
    """Write `payload` as indented JSON, atomically; numpy arrays and scalars become lists / numbers, objects with
    `to_dict` their dict.

    Args:
      path: the file written.
      payload: the JSON-able value.

    Returns:
      `path`.
    """
    atomic.write_text_atomically(path, json.dumps(payload, indent=2, default=_jsonable))
    return path


def _jsonable(x):
    if isinstance(x, np.ndarray | np.generic):
        return x.tolist()
    if hasattr(x, "to_dict"):
        return x.to_dict()
    raise TypeError(f"cannot write {type(x).__name__} as JSON")


def load_corpora(names: list[str], tokenizer, max_chunks: int | None) -> list[corpora.Corpus]:
    """Corpora by name or path, each capped at the smaller of its protocol's cap and `max_chunks`.

    Args:
      names: corpus names (`corpora.LOADERS`) or paths to UTF-8 text files.
      tokenizer: tokenizes the text.
      max_chunks: a further cap on the chunks scored of each corpus (--max_chunks); None for the protocol's own.

    Returns:
      One `corpora.Corpus` per name, in order.
    """
    out = []
    for name in names:
        corpus = corpora.load(name, tokenizer)
        caps = [c for c in (corpus.max_chunks, max_chunks) if c is not None]
        out.append(corpora.Corpus(corpus.name, corpus.token_ids, min(caps) if caps else None))
    return out


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; a "|" inside a cell (|h|, a token such as <|im_start|>) is escaped.

    Args:
      header: the column titles.
      rows: the rows, one value per column; floats are written with 2 decimals.

    Returns:
      The table's text, without a trailing newline.
    """
    fmt = lambda v: (f"{v:.2f}" if isinstance(v, float) else str(v)).replace("|", "\\|")
    lines = ["| " + " | ".join(fmt(v) for v in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def calibration_set(evaluated: list[corpora.Corpus], tokenizer, name: str, sequences: int, seqlen: int,
                    eval_seqlen: int, bos: bool = True) -> np.ndarray:
    """Calibration sequences: the last chunks of corpus `name`, kept apart from the evaluated text.

    SystemExit when they overlap what an evaluated corpus of the same name reads.

    Args:
      evaluated: the corpora evaluated (as `load_corpora` returns them); one named `name` is reused and checked.
      tokenizer: tokenizes the corpus when it is not among `evaluated`; gives the bos id.
      name: the calibration corpus, by name or path.
      sequences: the number of calibration sequences.
      seqlen: tokens per calibration sequence (the bos token included).
      eval_seqlen: tokens per chunk of the evaluation, to know how much of the corpus it reads.
      bos: begin each sequence with the tokenizer's bos token (when it has one).

    Returns:
      int32 [sequences, seqlen] token ids.
    """
    same = next((c for c in evaluated if c.name == Path(name).name), None)
    source = same or load_corpora([name], tokenizer, None)[0]
    bos_id = getattr(tokenizer, "bos_token_id", None) if bos else None
    tokens = corpora.calibration_chunks(source, sequences, seqlen, bos_id)
    print(f"calibration: the last {len(tokens)} x {seqlen} tokens of {source.name}"
          + (f", each after the bos token (id {bos_id})" if bos_id is not None else ""))
    if same is not None:
        read = len(likelihood.chunk_tokens(source.token_ids, eval_seqlen, source.max_chunks)) * eval_seqlen
        if read > len(source.token_ids) - tokens.size:
            raise SystemExit(f"the calibration sequences (the last {tokens.size} tokens of {source.name}) overlap the "
                             f"{read} tokens evaluated: use another calibration corpus, fewer calibration sequences "
                             "or --max_chunks")
    return tokens
