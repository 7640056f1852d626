"""Evaluation texts, tokenized exactly as the massive-activations perplexity protocol does.

    wikitext2  `wikitext` / `wikitext-2-raw-v1`, test split, texts joined with "\\n\\n",
               tokenized WITHOUT special tokens (no bos anywhere)
    c4         `NeelNanda/c4-10k`, train[:5000], joined with " ", default tokenization
               (bos only at the very start), first 100 chunks
    pg19       `emozilla/pg19`, validation[:5], joined with " ", default tokenization, first 100 chunks

These read the Hugging Face hub through `datasets`. For machines without it: `text_file(path)`,
and `python_docs`, the English prose of Python's own reference documentation
(`pydoc_data.topics`, shipped with every CPython), as an always-available embedded corpus.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A tokenized evaluation text: its name, int32 token stream [n], and the protocol's chunk cap (None = all)."""

    name: str
    token_ids: np.ndarray  # int32 [n]
    max_chunks: int | None  # as the protocol prescribes (None = all)


def _tokenize(tokenizer, text: str, add_special_tokens: bool) -> np.ndarray:
    return np.asarray(tokenizer(text, add_special_tokens=add_special_tokens).input_ids, np.int32)


def _load_dataset(*args, **kwargs):
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # offline / unknown dataset: datasets raises several kinds
        raise RuntimeError(
            f"could not load dataset {args} {kwargs} ({type(e).__name__}: {e}); without the hub use "
            "corpora.text_file(path, tokenizer) or corpora.python_docs(tokenizer)"
        ) from e


def wikitext2(tokenizer) -> Corpus:
    """WikiText-2 (raw) test split, texts joined with "\\n\\n", tokenized without special tokens, every chunk.

    Args:
      tokenizer: an HF tokenizer (called with `add_special_tokens=False`).

    Returns:
      The `Corpus` "wikitext2" (max_chunks None).
    """
    data = _load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    return Corpus("wikitext2", _tokenize(tokenizer, "\n\n".join(data["text"]), add_special_tokens=False), None)


def c4(tokenizer) -> Corpus:
    """`NeelNanda/c4-10k` train[:5000], joined with " ", default tokenization (bos only at the start).

    Args:
      tokenizer: an HF tokenizer (called with `add_special_tokens=True`).

    Returns:
      The `Corpus` "c4", capped at its first 100 chunks.
    """
    data = _load_dataset("NeelNanda/c4-10k", split="train[:5000]")
    return Corpus("c4", _tokenize(tokenizer, " ".join(data["text"]), add_special_tokens=True), 100)


def pg19(tokenizer) -> Corpus:
    """`emozilla/pg19` validation[:5], joined with " ", default tokenization (bos only at the start).

    Args:
      tokenizer: an HF tokenizer (called with `add_special_tokens=True`).

    Returns:
      The `Corpus` "pg19", capped at its first 100 chunks.
    """
    data = _load_dataset("emozilla/pg19", split="validation[:5]")
    return Corpus("pg19", _tokenize(tokenizer, " ".join(data["text"]), add_special_tokens=True), 100)


def text_file(path: str | os.PathLike, tokenizer, add_special_tokens: bool = False,
              max_chunks: int | None = None) -> Corpus:
    """A UTF-8 text file as a corpus (for machines without the hub), named after the file.

    Args:
      path: the text file.
      tokenizer: an HF tokenizer.
      add_special_tokens: passed to the tokenizer (False: no bos, as for wikitext2).
      max_chunks: the chunk cap recorded in the corpus; None for all.

    Returns:
      A `Corpus` of the whole file's tokens.
    """
    text = Path(path).read_text(encoding="utf-8")
    return Corpus(Path(path).name, _tokenize(tokenizer, text, add_special_tokens), max_chunks)


def python_docs(tokenizer, max_chunks: int | None = None) -> Corpus:
    """Python's reference documentation topics (English prose, ~800 KB), joined with "\\n\\n".

    Read from `pydoc_data.topics` (shipped with every CPython) and tokenized without special tokens.

    Args:
      tokenizer: an HF tokenizer.
      max_chunks: the chunk cap recorded in the corpus; None for all.

    Returns:
      The `Corpus` "python_docs".
    """
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    return Corpus("python_docs", _tokenize(tokenizer, text, add_special_tokens=False), max_chunks)


LOADERS = {"wikitext2": wikitext2, "c4": c4, "pg19": pg19, "python_docs": python_docs}


def calibration_chunks(corpus: Corpus, sequences: int, seqlen: int, bos_id: int | None = None) -> np.ndarray:
    """The LAST chunks of a corpus, for statistics kept apart from an evaluation that reads it from its start.

    Used for calibration statistics (massive-activation means). Each chunk begins with `bos_id` when given (as
    the reference's tokenized sequences do: the first token's massive activation depends on which token it is).

    Args:
      corpus: the `Corpus` to take the chunks from.
      sequences: how many chunks.
      seqlen: tokens per chunk, the bos included when `bos_id` is given.
      bos_id: token put first in every chunk (then seqlen - 1 corpus tokens follow); None for none.

    Returns:
      int32 [sequences, seqlen].

    Raises:
      ValueError: when the corpus is too short (or seqlen leaves no room for corpus tokens).
    """
    ids = np.asarray(corpus.token_ids, np.int32).reshape(-1)
    body = seqlen - (bos_id is not None)
    if len(ids) < sequences * body or body < 1:
        raise ValueError(f"{corpus.name} has {len(ids)} tokens, fewer than {sequences} calibration sequences of "
                         f"{seqlen}")
    chunks = ids[len(ids) - sequences * body:].reshape(sequences, body)
    return chunks if bos_id is None else np.concatenate([np.full((sequences, 1), bos_id, np.int32), chunks], 1)


def check_name(name: str) -> None:
    """Raise ValueError unless `name` is a known corpus or an existing file (checked before a model loads).

    Args:
      name: a key of `LOADERS` or a text file path.
    """
    if name not in LOADERS and not Path(name).is_file():
        raise ValueError(f"unknown corpus {name!r}: choose from {sorted(LOADERS)} or give a text file path")


def load(name: str, tokenizer) -> Corpus:
    """A corpus by name (LOADERS), or a path to a UTF-8 text file.

    Args:
      name: a key of `LOADERS` ("wikitext2", "c4", "pg19", "python_docs") or a text file path.
      tokenizer: an HF tokenizer.

    Returns:
      The `Corpus` (ValueError for an unknown name).
    """
    check_name(name)
    return LOADERS[name](tokenizer) if name in LOADERS else text_file(name, tokenizer)
