"""Which token starts a sequence: the bos token, unless the caller says otherwise."""

from __future__ import annotations

from mwjax.config import ModelConfig


def first_token_id(tokenizer, config: ModelConfig, first_token: int | str | None = None) -> int:
    """The id of the token to feed alone at position 0 (House of Cards feeds the bos token).

    first_token: an explicit id, or a token string looked up in the tokenizer; default the
    tokenizer's bos token, then the config's `bos_token_id`.
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
