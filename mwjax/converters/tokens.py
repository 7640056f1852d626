"""Tokens meeting a model: which token starts a sequence (the bos token, unless the caller says otherwise), and
whether a tokenizer's ids (or given ids) fit its embedding table."""

from __future__ import annotations

import numpy as np

from mwjax.nn.config import ModelConfig


def first_token_id(tokenizer, config: ModelConfig, first_token: int | str | None = None) -> int:
    """The id of the token to feed alone at position 0 (House of Cards feeds the bos token).

    Args:
      tokenizer: an HF tokenizer, or None.
      config: the model's config (`vocab_size`, `bos_token_id`).
      first_token: an explicit id, or a token string looked up in the tokenizer; None for the
        tokenizer's bos token, then the config's `bos_token_id`.

    Returns:
      The token id; ValueError when it is outside the vocabulary, unknown, or there is no bos token.
    """
    if isinstance(first_token, int):
        if not 0 <= first_token < config.vocab_size:
            raise ValueError(f"first_token={first_token} is outside the vocabulary [0, {config.vocab_size})")
        return first_token
    if isinstance(first_token, str):
        if tokenizer is None:
            raise ValueError(f"first_token={first_token!r} is a string but there is no tokenizer; pass a token id")
        token_id = tokenizer.convert_tokens_to_ids(first_token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"first_token={first_token!r} is not a token of this tokenizer")
        return int(token_id)
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is None:
        bos = config.bos_token_id
    if bos is None:
        raise ValueError(
            "this tokenizer/config defines no bos token, so there is no default first token; pass "
            "first_token=<token id or token string> (e.g. the model's document-start or eos token)"
        )
    return int(bos)


class VocabularyError(ValueError):
    """A tokenizer can emit ids that the model's embedding table does not have."""


def check_ids(ids, vocab_size: int, what: str = "the text") -> None:
    """Every token id in `ids` indexes the model's embedding table [0, vocab_size); ValueError naming the id otherwise.

    An id past the table would read garbage (or NaN) logits, silently.

    Args:
      ids: int token ids, any shape.
      vocab_size: rows of the model's embedding table (`config.vocab_size`).
      what: what the ids are, for the message.
    """
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids.max() if ids.max() >= vocab_size else ids.min())
        raise ValueError(f"{what}: token id {bad} is outside the model's vocabulary [0, {vocab_size}) "
                         "(config.vocab_size): ids from another tokenizer?")


def emitted_ids(tokenizer) -> int:
    """How many ids `tokenizer` can emit: its largest id + 1, added tokens included.

    Args:
      tokenizer: an HF tokenizer (its `get_vocab()`), or anything with a `len()`.

    Returns:
      The number of ids.
    """
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else None
    return max(vocab.values()) + 1 if vocab else len(tokenizer)


def check_vocabulary(tokenizer, vocab_size: int, *, model: str, tokenizer_name: str) -> None:
    """Refuse a tokenizer that can emit an id >= `vocab_size` (the model's `config.vocab_size`): such an id
    reads past the embedding table (NaN or garbage logits, silently). A tokenizer smaller than the table is
    fine (models pad their vocabulary).

    Args:
      tokenizer: an HF tokenizer.
      vocab_size: rows of the model's embedding table.
      model: what the message calls the model (its path).
      tokenizer_name: what the message calls the tokenizer (its path).

    Raises:
      VocabularyError naming both, the sizes and the first id past the table.
    """
    n = emitted_ids(tokenizer)
    if n <= vocab_size:
        return
    try:
        example = f" (id {vocab_size} is {tokenizer.convert_ids_to_tokens(vocab_size)!r})"
    except Exception:  # a tokenizer with a hole at that id
        example = ""
    raise VocabularyError(
        f"the tokenizer {tokenizer_name} emits ids up to {n - 1} ({n} ids), but the model {model} has "
        f"config.vocab_size={vocab_size}: every id >= {vocab_size}{example} would read past its embedding table "
        "(NaN or garbage results). Use the model's own tokenizer or one of its vocabulary")
