"""The HF fast tokenizer of a GGUF file, built from its metadata without torch.

transformers' own GGUF path (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`) reads the file
with a reader that imports torch; this module reads the same `tokenizer.*` metadata (parsed by
`gguf_file`) and builds the same tokenizer with `tokenizers` and transformers' tokenizer
classes. The tests compare the two token for token on both real embedded models.

Vocabulary kinds (`tokenizer.ggml.model`):
- `gpt2`: byte-level BPE with merges (SmolLM2, Qwen2, Llama 3). Tokens outside the byte alphabet
  are respelled in it; the pre-tokenizer regex follows `tokenizer.ggml.pre` where the merges were
  learned on a split other than GPT-2's.
- `llama`: SentencePiece BPE (Llama 2, Mistral, Gemma, Phi-3). GGUF stores scores, not merges;
  the merges are recovered from the vocabulary (ranked by score; Gemma: by position in the file,
  since Gemma's scores do not follow its merge order). Gemma files spell whitespace-only tokens
  with real spaces, which Gemma's tokenizer looks up as U+2581. Phi-3 prepends the space in a
  normalizer instead of the pre-tokenizer.
Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added
tokens, so they are never cut into pieces.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import gguf

from mwjax.converters.errors import CheckpointError, UnsupportedCheckpointError

# Pre-tokenizer splits of byte-level vocabularies whose merges were learned on another split than
# GPT-2's (the others use ByteLevel's own GPT-2 regex). Names are llama.cpp's `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {  # "olmo" (OLMo 1.7) is GPT-2's; "dbrx" (cl100k-based: DBRX, OLMo 2) llama3's in llama.cpp
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_CONTROL, _USER_DEFINED = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)
_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                "pad_token": "padding_token_id"}


@dataclasses.dataclass(frozen=True)
class GGUFVocab:
    """The `tokenizer.*` metadata of a GGUF file, checked for consistency."""

    path: str
    arch: str  # general.architecture
    model: str  # tokenizer.ggml.model: gpt2 | llama
    pre: str | None  # tokenizer.ggml.pre
    tokens: list[str]  # [vocab]
    token_types: list[int] | None  # [vocab], gguf.TokenType
    scores: list[float] | None  # [vocab]
    merges: list[tuple[str, str]] | None  # BPE merges, best first
    special_ids: dict[str, int]  # "bos_token" | "eos_token" | "unk_token" | "pad_token" -> id
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def read_vocab(fields: dict[str, Any], path: str | os.PathLike) -> GGUFVocab:
    """The tokenizer metadata among a GGUF file's `fields`, checked for consistency.

    Args:
      fields: the file's metadata (`gguf_file.GGUFFile.fields`), key -> decoded value.
      path: the file, named in the errors.

    Returns:
      The `GGUFVocab`; a CheckpointError naming the file and field if it is unusable (UnsupportedCheckpointError
      for a `tokenizer.ggml.model` other than gpt2 / llama).
    """
    path = str(path)

    def value(key: str, kind: type, default: Any = None) -> Any:
        """The field's value, checked to be of `kind` (list: any list; int never accepts a bool)."""
        v = fields.get(key)
        if v is None:
            return default
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise CheckpointError(f"{path}: GGUF metadata field {key!r} should be a {kind.__name__}, "
                                  f"not {type(v).__name__}")
        return v

    arch = value("general.architecture", str, "")
    model = value("tokenizer.ggml.model", str)
    if model is None:
        raise CheckpointError(f"{path}: GGUF metadata has no tokenizer (tokenizer.ggml.model is missing); "
                              "load the model alone with load(path, tokenizer=False) or pass a tokenizer directory")
    if model not in ("gpt2", "llama"):
        raise UnsupportedCheckpointError(f"{path}: GGUF tokenizer kind tokenizer.ggml.model={model!r} is not "
                                         "supported; mwjax builds 'gpt2' (byte-level BPE) and 'llama' (SentencePiece)")
    tokens = value("tokenizer.ggml.tokens", list)
    if not tokens or not all(isinstance(t, str) for t in tokens):
        raise CheckpointError(f"{path}: GGUF metadata field 'tokenizer.ggml.tokens' must be a non-empty list of "
                              "strings")
    if len(set(tokens)) != len(tokens) and model == "gpt2":
        raise CheckpointError(f"{path}: 'tokenizer.ggml.tokens' lists {len(tokens) - len(set(tokens))} tokens twice")
    n = len(tokens)
    per_token = {}
    for key, kind in (("token_type", int), ("scores", float | int)):
        seq = value(f"tokenizer.ggml.{key}", list)
        if seq is not None and (len(seq) != n or not all(isinstance(x, kind) for x in seq)):
            raise CheckpointError(f"{path}: GGUF metadata field 'tokenizer.ggml.{key}' has {len(seq)} entries for "
                                  f"{n} tokens (or entries of the wrong type)")
        per_token[key] = seq
    merges = value("tokenizer.ggml.merges", list)
    if merges is not None:
        merges = [_merge(m, i, path) for i, m in enumerate(merges)]
    elif model == "gpt2":
        raise CheckpointError(f"{path}: byte-level BPE vocabulary without 'tokenizer.ggml.merges'")
    elif per_token["scores"] is None and arch not in _RANK_BY_POSITION:
        raise CheckpointError(f"{path}: SentencePiece vocabulary with neither 'tokenizer.ggml.scores' nor merges")
    special_ids = {}
    for name, key in _SPECIAL_IDS.items():
        token_id = value(f"tokenizer.ggml.{key}", int)
        if token_id is None:
            continue
        if not 0 <= token_id < n:
            raise CheckpointError(f"{path}: GGUF metadata field 'tokenizer.ggml.{key}' = {token_id} is outside the "
                                  f"vocabulary of {n} tokens")
        special_ids[name] = token_id
    return GGUFVocab(
        path=path, arch=arch, model=model, pre=value("tokenizer.ggml.pre", str), tokens=tokens,
        token_types=per_token["token_type"], scores=per_token["scores"], merges=merges, special_ids=special_ids,
        # llama.cpp adds bos to a SentencePiece vocabulary whose file does not say otherwise
        add_bos=value("tokenizer.ggml.add_bos_token", bool, model == "llama"),
        add_eos=value("tokenizer.ggml.add_eos_token", bool, False),
        chat_template=value("tokenizer.chat_template", str),
    )


def _merge(m, index: int, path: str) -> tuple[str, str]:
    parts = m.split(" ") if isinstance(m, str) else ()
    if len(parts) != 2 or not all(parts):
        raise CheckpointError(f"{path}: entry {index} of 'tokenizer.ggml.merges' ({m!r}) is not two tokens separated "
                              "by one space")
    return parts[0], parts[1]


# ---------------------------------------------------------------------------------------------- building


def build_tokenizer(vocab: GGUFVocab):
    """A `transformers.PreTrainedTokenizerFast` equal to what transformers builds from the same file.

    Args:
      vocab: the file's tokenizer metadata (`read_vocab`).

    Returns:
      The `PreTrainedTokenizerFast` (bos / eos / unk / pad tokens, add_bos / add_eos and chat template set).
    """
    from transformers import PreTrainedTokenizerFast

    backend = _byte_level(vocab) if vocab.model == "gpt2" else _sentencepiece(vocab)
    _add_special_tokens(backend, vocab)
    if vocab.model == "gpt2" and vocab.pre in PRE_TOKENIZER_SPLITS:
        from tokenizers import Regex, pre_tokenizers

        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS[vocab.pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    specials = {name: vocab.tokens[i] for name, i in vocab.special_ids.items()}
    try:
        return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=vocab.chat_template,
                                       add_bos_token=vocab.add_bos, add_eos_token=vocab.add_eos, **specials)
    except Exception as e:  # tokenizers / transformers reject inconsistent special tokens with several kinds
        raise CheckpointError(f"{vocab.path}: the GGUF tokenizer metadata does not make a tokenizer "
                              f"({type(e).__name__}: {e})") from e


def _byte_level(vocab: GGUFVocab):
    """Byte-level BPE (transformers' GPT2Tokenizer on the file's vocabulary and merges)."""
    from transformers import GPT2Tokenizer

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    respell = lambda t: t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
    table = {respell(t): i for i, t in enumerate(vocab.tokens)}
    _check_merges(vocab, table)
    return GPT2Tokenizer(vocab=table, merges=vocab.merges).backend_tokenizer


# Architectures whose SentencePiece merges follow the order of the tokens in the file, not their scores.
_RANK_BY_POSITION = {"gemma", "gemma2", "gemma3"}


def _sentencepiece(vocab: GGUFVocab):
    """SentencePiece BPE (transformers' LlamaTokenizer / GemmaTokenizer), merges recovered from the vocabulary."""
    from tokenizers import normalizers
    from transformers import GemmaTokenizer, LlamaTokenizer

    tokens = vocab.tokens
    if vocab.arch in _RANK_BY_POSITION:  # whitespace-only tokens are stored with spaces, looked up as U+2581
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    table = {t: i for i, t in enumerate(tokens)}
    merges = vocab.merges
    if merges is None:
        rank = ({t: -i for i, t in enumerate(tokens)} if vocab.arch in _RANK_BY_POSITION
                else dict(zip(tokens, vocab.scores, strict=True)))
        merges = merges_from_vocab(table, rank)
    else:
        _check_merges(vocab, table)
    cls = GemmaTokenizer if vocab.arch in _RANK_BY_POSITION else LlamaTokenizer
    backend = cls(vocab=table, merges=merges).backend_tokenizer
    if vocab.arch == "phi3":  # the prefix space comes from a normalizer, not from Metaspace
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        backend.pre_tokenizer = None
    return backend


def merges_from_vocab(table: dict[str, int], rank: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary, as the SentencePiece -> tokenizers conversion orders them.

    Every split of a token into two tokens, best-ranked token first (ties: shorter left piece, then shorter
    right piece, then the pieces' ids).

    Args:
      table: token -> id of the whole vocabulary.
      rank: token -> rank, higher merged first (the SentencePiece scores, or minus the position for Gemma).

    Returns:
      The merges `(left, right)`, best first.
    """
    candidates = []
    for token, score in rank.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in table and token[i:] in table]
        local.sort(key=lambda m: (table[m[0]], table[m[1]]))
        candidates.extend(local)
    candidates.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in candidates]


def _check_merges(vocab: GGUFVocab, table: dict[str, int]) -> None:
    for i, (left, right) in enumerate(vocab.merges):
        if left not in table or right not in table or left + right not in table:
            raise CheckpointError(f"{vocab.path}: entry {i} of 'tokenizer.ggml.merges' ({left} {right}) names tokens "
                                  "that are not in the vocabulary")


def _add_special_tokens(backend, vocab: GGUFVocab) -> None:
    """Control tokens as special added tokens, user-defined ones as plain added tokens (llama.cpp
    matches both whole). A byte-level 'control' token spelled outside the byte alphabet is a
    llama.cpp mislabel and is skipped, as transformers does."""
    from tokenizers import AddedToken

    types = vocab.token_types or ()
    alphabet = set(_bytes_to_unicode().values()) if vocab.model == "gpt2" else None
    control = [AddedToken(t, normalized=False, special=True) for t, kind in zip(vocab.tokens, types, strict=False)
               if kind == _CONTROL and (alphabet is None or set(t) <= alphabet)]
    if control:
        backend.add_special_tokens(control)
    known = backend.get_vocab()
    user = [AddedToken(t, normalized=False, special=False) for t, kind in zip(vocab.tokens, types, strict=False)
            if kind == _USER_DEFINED and t in known]
    if user:
        backend.add_tokens(user)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves, the
    other 68 bytes to U+0100 onwards, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for shift, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + shift)
    return table
