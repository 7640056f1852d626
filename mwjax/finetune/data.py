"""Instruction data for fine-tuning, as LLaMA-Factory (the paper's trainer) prepares it.

    train, val = data.build(data.DataConfig(source="llamafactory/alpaca_gpt4_en", template="llama3"), tokenizer)
    loader = data.BatchLoader(train, batch_size=64, seq_len=1024, seed=42, pad_id=tokenizer.pad_token_id)
    for batch in loader.epoch(0): ...        # int32 [local_batch, seq_len]: tokens, labels, attention_mask, ...

Rows are alpaca records {instruction, input, output} from the hub (`datasets.load_dataset`), a local
JSON / JSONL file, or the embedded generator of synthetic tasks with checkable answers (`synthetic`,
for machines without the hub). The user turn is `instruction + "\\n" + input` (empty parts dropped);
prompt tokens get label IGNORE, the response and the template's end-of-turn token are learned
(LLaMA-Factory's supervised processor). Long examples are cut by LLaMA-Factory's `infer_max_len`.
The templates follow LLaMA-Factory v0.9.0 (`src/llamafactory/data/template.py` at dfff411e, the
paper's era; `_pieces` gives each one's definition).

Batching is deterministic: the order of epoch e is a permutation seeded by (seed, e), the same on
every host, and host h of H reads rows [h B/H, (h+1) B/H) of every global batch of B rows. So
`epoch(e, start_step)` reproduces an uninterrupted run's batches exactly after a resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import string
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

IGNORE = -100  # label without loss (HF / LLaMA-Factory IGNORE_INDEX); equals mwjax.train.IGNORE
TEMPLATES = ("llama3", "mistral", "gemma", "phi", "tokenizer", "plain")
EFFICIENT_EOS = ("gemma",)  # LLaMA-Factory templates with `efficient_eos=True` (`_efficient_eos`)
COLUMNS = ("instruction", "input", "output")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to train on (LLaMA-Factory's data arguments in comments)."""

    source: str = "synthetic"  # dataset: "synthetic", a hub dataset name, or a .json / .jsonl file
    template: str = "tokenizer"  # template: llama3 | mistral | gemma | phi | tokenizer (its chat template) | plain
    cutoff_len: int = 1024  # cutoff_len: prompt + response tokens per example
    val_size: float = 0.05  # val_size: a fraction (< 1) or a number of examples (>= 1)
    seed: int = 42  # shuffling of the examples before the split
    num_synthetic: int = 2000  # examples the synthetic source generates
    packing: bool = False  # packing: several examples per row
    max_examples: int | None = None  # max_samples: cap on the examples read

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(f"unknown chat template {self.template!r}; choose from {TEMPLATES}")
        if self.cutoff_len < 2:
            raise ValueError(f"cutoff_len must be >= 2 tokens, got {self.cutoff_len}")
        if not 0 <= self.val_size < math.inf or (self.val_size >= 1 and self.val_size != int(self.val_size)):
            raise ValueError(f"val_size is a fraction in [0, 1) or a whole number of examples, got {self.val_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.num_synthetic < 1:
            raise ValueError(f"num_synthetic must be >= 1, got {self.num_synthetic}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"max_examples must be >= 1, got {self.max_examples}")


class Encoded(NamedTuple):
    """One tokenised example: its token ids and their labels, of equal length."""

    input_ids: list[int]  # prompt + response tokens
    labels: list[int]  # IGNORE on the prompt, the token itself on the response


# ------------------------------------------------------------------------------------------ sources


def load_examples(cfg: DataConfig) -> list[dict]:
    """The alpaca records of `cfg.source` (at most `max_examples`), in the source's order; every record
    checked, a bad one named by file and line (JSONL) or index (JSON list).

    Args:
      cfg: source ("synthetic", a hub dataset name or a .json / .jsonl file), max_examples, and for synthetic
        data num_synthetic and seed.

    Returns:
      Records {instruction, input, output} as strings (missing / null ones ""), plus "system" where a record
      has one.
    """
    if cfg.source == "synthetic":
        located = [(f"synthetic example {i}", row) for i, row in enumerate(synthetic_examples(cfg.num_synthetic,
                                                                                               cfg.seed))]
    elif cfg.source.endswith((".json", ".jsonl")):
        located = _read_json(Path(cfg.source))
    else:
        located = [(f"{cfg.source} row {i}", row) for i, row in enumerate(_read_hub(cfg.source))]
    if not located:
        raise ValueError(f"{cfg.source} holds no records")
    located = located[: cfg.max_examples] if cfg.max_examples else located
    for where, row in located:
        if not isinstance(row, dict):
            raise ValueError(f"{where}: a record is a JSON object (alpaca format: instruction, input, output), got "
                             f"{type(row).__name__}")
        missing = [c for c in ("instruction", "output") if c not in row]
        if missing:
            raise ValueError(f"{where}: the record has no {missing[0]!r} column (alpaca format: instruction, input, "
                             "output)")
        wrong = [c for c in (*COLUMNS, "system") if not isinstance(row.get(c), str | int | float | None)]
        if wrong:
            raise ValueError(f"{where}: {wrong[0]!r} is a {type(row[wrong[0]]).__name__}, not text")
    text = lambda value: "" if value is None else str(value)  # a number is text (an answer of 0 is "0")
    return [{c: text(row.get(c)) for c in COLUMNS} | ({"system": text(row["system"])} if text(row.get("system"))
                                                     else {})
            for _, row in located]


def _read_json(path: Path) -> list[tuple[str, object]]:
    """(where, record) of a JSON list or a JSONL file; a syntax error names the file, line and column."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    if path.suffix == ".jsonl":
        return [(f"{path}, line {n}", _parse(line, path, n))
                for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows = _parse(text, path)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of alpaca records, got {type(rows).__name__} (one record "
                         "per line goes in a .jsonl file)")
    return [(f"{path}, record {i}", row) for i, row in enumerate(rows)]


def _parse(text: str, path: Path, line: int = 1):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {line + e.lineno - 1} column {e.colno}: not JSON ({e.msg})") from None


def _read_hub(name: str) -> list[dict]:
    import datasets

    try:
        return list(datasets.load_dataset(name, split="train"))
    except Exception as e:  # offline, unknown name, gated
        raise RuntimeError(f"cannot load dataset {name!r} from the hub ({type(e).__name__}: {e}); on a machine "
                           "without the hub pass a local .json/.jsonl file of alpaca records, or 'synthetic'") from e


# ---------------------------------------------------------------------------------- synthetic tasks

_WORDS = ("apple", "river", "garden", "window", "planet", "silver", "orange", "pencil", "castle", "forest",
          "rocket", "yellow", "basket", "candle", "dragon", "mirror", "turtle", "violin", "winter", "summer",
          "bridge", "cookie", "button", "jungle", "ladder", "marble", "needle", "pepper", "rabbit", "saddle",
          "tiger", "cloud", "stone", "bread", "chair", "light", "music", "ocean", "paper", "smile")


def _task(rng: random.Random) -> tuple[str, str, str, str]:
    """(kind, instruction, input, answer) of one random task."""
    kind = rng.choice(("add", "subtract", "reverse", "upper", "length", "sort", "next_letter"))
    word = rng.choice(_WORDS)
    if kind == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return kind, f"What is {a} + {b}?", "", str(a + b)
    if kind == "subtract":
        a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
        return kind, f"What is {a} - {b}?", "", str(a - b)
    if kind == "reverse":
        return kind, "Reverse the letters of this word.", word, word[::-1]
    if kind == "upper":
        return kind, "Write this word in capital letters.", word, word.upper()
    if kind == "length":
        return kind, "How many letters does this word have?", word, str(len(word))
    if kind == "sort":
        nums = rng.sample(range(100), 4)
        return kind, "Sort these numbers from smallest to largest.", ", ".join(map(str, nums)), ", ".join(
            map(str, sorted(nums)))
    letter = rng.choice(string.ascii_lowercase[:-1])
    return kind, f"Which letter comes right after '{letter}' in the alphabet?", "", chr(ord(letter) + 1)


def synthetic_examples(n: int, seed: int = 0) -> list[dict]:
    """n alpaca records of short tasks whose answers `check_answer` can verify.

    Args:
      n: how many records.
      seed: seeds the tasks (the same seed, the same records).

    Returns:
      Records {instruction, input, output, task} (task: the task's kind, e.g. "add", "reverse").
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        kind, instruction, inp, answer = _task(rng)
        rows.append({"instruction": instruction, "input": inp, "output": answer, "task": kind})
    return rows


def check_answer(example: dict, text: str) -> bool:
    """Whether generated `text` answers a synthetic task: its first line, without surrounding spaces and final
    punctuation, equals the reference (case-sensitive, as the capital-letters task needs).

    Args:
      example: the task's record (`synthetic_examples`); its "output" is the reference.
      text: the model's generated response.

    Returns:
      True when the answer is right.
    """
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line.strip().rstrip(".!").strip().strip("'\"") == example["output"]


# ----------------------------------------------------------------------------------------- encoding


def infer_max_len(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """How much of a prompt and a response to keep, under LLaMA-Factory's rule: a target that fits in half the
    budget is kept whole and the source cut; else a source that fits in half is kept and the target cut;
    else both are cut in proportion to their lengths. Both keep their beginning.

    Args:
      source_len: prompt tokens.
      target_len: response tokens.
      cutoff_len: the token budget of the example.

    Returns:
      (source tokens kept, target tokens kept).
    """
    if target_len * 2 < cutoff_len:
        max_target = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target = cutoff_len - source_len
    else:
        max_target = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target = min(max_target, target_len)
    return min(max(cutoff_len - new_target, 0), source_len), new_target


def _user_turn(example: dict) -> str:
    return "\n".join(part for part in (example["instruction"], example.get("input", "")) if part)


def _special(tokenizer, token: str, template: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"template {template!r} needs the special token {token!r}, which this tokenizer lacks; "
                         "use template='tokenizer' (its own chat template) or 'plain'")
    return int(token_id)


def _bos(tokenizer) -> list[int]:
    """LLaMA-Factory's `{"bos_token"}` slot: the tokenizer's bos, nothing where it has none."""
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _pieces(example: dict, tokenizer, template: str) -> tuple[list[int], list[int]]:
    r"""(prompt ids, response ids) of one record under `template`.

    gemma (LLaMA-Factory v0.9.0 `_register_template(name="gemma")`): prefix bos; format_user
      "<start_of_turn>user\n{q}<end_of_turn>\n<start_of_turn>model\n"; no format_system, so the default
      "{{content}}" puts a system prompt right after bos with no turn markers; default_system ""; format_assistant
      "{a}" with no eos slot because `efficient_eos=True`: the tokenizer's eos (Gemma's `<eos>`, not
      `<end_of_turn>`) is appended after truncation (`_efficient_eos`). "<end_of_turn>\n" is only the separator
      before a later turn, which alpaca records do not have. (v0.9.2 on end the response with "<end_of_turn>\n".)
    phi (`name="phi"`): prefix bos; format_user "<|user|>\n{q}<|end|>\n<|assistant|>\n"; format_system
      "<|system|>\n{s}<|end|>\n"; default_system ""; stop_words ["<|end|>"] with `replace_eos=True`, so the
      response is "{a}" + <|end|> (the eos it replaced), no newline after it ("\n" is the separator before a
      later turn). (v0.9.2 on: "{a}<|end|>\n".)
    As LLaMA-Factory's `_convert_elements_to_ids` does, each slot string is encoded whole (special tokens in it
    included) and system and user slots apart: SentencePiece tokenizers may encode pieces differently.
    """
    text = lambda s: tokenizer.encode(s, add_special_tokens=False)
    q, a = _user_turn(example), example["output"]
    if template == "llama3":
        bos, start, end, eot = (_special(tokenizer, t, template) for t in
                                ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
        system = [start, *text("system"), end, *text("\n\n" + example["system"]), eot] if example.get("system") else []
        prompt = [bos, *system, start, *text("user"), end, *text("\n\n" + q), eot, start, *text("assistant"), end,
                  *text("\n\n")]
        return prompt, [*text(a), eot]
    if template == "mistral":
        bos, eos = _special(tokenizer, "<s>", template), _special(tokenizer, "</s>", template)
        return [bos, *text(f"[INST] {q} [/INST]")], [*text(a), eos]
    if template == "gemma":
        for token in ("<start_of_turn>", "<end_of_turn>"):
            _special(tokenizer, token, template)
        system = text(example["system"]) if example.get("system") else []
        user = text(f"<start_of_turn>user\n{q}<end_of_turn>\n<start_of_turn>model\n")
        return [*_bos(tokenizer), *system, *user], text(a)
    if template == "phi":
        end = _special(tokenizer, "<|end|>", template)
        for token in ("<|user|>", "<|assistant|>", *(("<|system|>",) if example.get("system") else ())):
            _special(tokenizer, token, template)
        system = text(f"<|system|>\n{example['system']}<|end|>\n") if example.get("system") else []
        return [*_bos(tokenizer), *system, *text(f"<|user|>\n{q}<|end|>\n<|assistant|>\n")], [*text(a), end]
    if template == "plain":
        if tokenizer.eos_token_id is None:
            raise ValueError("template 'plain' ends each response with the eos token; this tokenizer has none")
        return [*_bos(tokenizer), *text(q + "\n")], [*text(a), tokenizer.eos_token_id]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("template='tokenizer' but this tokenizer has no chat template; use 'plain' (prompt, "
                         "newline, response, eos) or one of LLaMA-Factory's: 'llama3', 'mistral', 'gemma', 'phi'")
    messages = ([{"role": "system", "content": example["system"]}] if example.get("system") else []) + [
        {"role": "user", "content": q}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": a}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("this tokenizer's chat template does not render the prompt as a prefix of the whole "
                         "conversation, so the response cannot be told apart; use 'plain' or one of LLaMA-Factory's "
                         "templates: 'llama3', 'mistral', 'gemma', 'phi'")
    return text(prompt), text(full[len(prompt):])


def _efficient_eos(tokenizer, template: str) -> list[int]:
    """The tokens LLaMA-Factory's supervised processor appends after truncation: the tokenizer's eos under an
    `efficient_eos` template (gemma), learned and kept out of the cut; [] under the others."""
    if template not in EFFICIENT_EOS:
        return []
    if tokenizer.eos_token_id is None:
        raise ValueError(f"template {template!r} ends each response with the tokenizer's eos token; this tokenizer "
                         "has none")
    return [tokenizer.eos_token_id]


def encode(example: dict, tokenizer, cfg: DataConfig) -> Encoded:
    """One record -> token ids and labels (prompt masked), cut to cfg.cutoff_len (`infer_max_len`; an
    efficient-eos template's eos is reserved out of the budget and appended after the cut, as LLaMA-Factory's
    `_encode_supervised_example` does).

    Args:
      example: an alpaca record (`load_examples`).
      tokenizer: the model's HF tokenizer.
      cfg: template and cutoff_len.

    Returns:
      The `Encoded` example: labels IGNORE on the prompt, the token ids on the response.
    """
    source, target = _pieces(example, tokenizer, cfg.template)
    eos = _efficient_eos(tokenizer, cfg.template)
    keep_source, keep_target = infer_max_len(len(source), len(target), cfg.cutoff_len - len(eos))
    source, target = source[:keep_source], target[:keep_target] + eos
    # LLaMA-Factory labels the first prompt token with eos under efficient_eos; the label at position 0 is never
    # predicted (the logits at t predict labels[t + 1]), so IGNORE there is the same loss
    return Encoded(source + target, [IGNORE] * len(source) + target)


def validation_size(val_size: float, n: int) -> int:
    """Validation examples out of n as LLaMA-Factory's `train_test_split(test_size=val_size)` takes them: a
    whole number as is, a fraction rounded up (datasets' ceil: alpaca_gpt4_en's 52002 rows at 0.05 -> 2601).

    Args:
      val_size: a fraction (< 1) or a number of examples (>= 1), as `DataConfig.val_size`.
      n: the examples in all.

    Returns:
      The number of validation examples.
    """
    return int(val_size) if val_size >= 1 else math.ceil(val_size * n)


def build(cfg: DataConfig, tokenizer, rows: list[dict] | None = None) -> tuple[list[Encoded], list[Encoded]]:
    """Train and validation examples: read, shuffled by cfg.seed, split, encoded; records with nothing to learn
    (an empty response cut away) are dropped.

    Args:
      cfg: what to read and how to encode and split it.
      tokenizer: the model's HF tokenizer.
      rows: records already read by `load_examples(cfg)`; None reads them.

    Returns:
      (train, validation) lists of `Encoded`; the validation set is the first `validation_size` shuffled records.
    """
    rows = load_examples(cfg) if rows is None else rows
    order = np.random.default_rng(cfg.seed).permutation(len(rows))
    n_val = validation_size(cfg.val_size, len(rows))
    if n_val >= len(rows):
        raise ValueError(f"val_size={cfg.val_size} leaves no training data out of {len(rows)} examples")
    encoded = [encode(rows[i], tokenizer, cfg) for i in order]
    useful = lambda items: [e for e in items if any(label != IGNORE for label in e.labels)]
    return useful(encoded[n_val:]), useful(encoded[:n_val])


# ----------------------------------------------------------------------------------------- batching


class BatchLoader:
    """Fixed-shape int32 batches of encoded examples for one host (module doc for the order).

    Without packing a row holds one example (cut to seq_len, padded). With packing, examples are laid
    one after another into rows once, in the given order (each keeps its own positions from 0 and its
    own segment id 1, 2, ...; padding is segment 0), and the rows are what each epoch permutes.

    Args:
      examples: the encoded examples (`build`).
      batch_size: rows per micro-batch over all hosts; this host yields batch_size / process_count of them.
      seq_len: tokens per row.
      seed: with the epoch, seeds each epoch's permutation of the rows.
      pad_id: the token of padding positions.
      packing: several examples per row (LLaMA-Factory's `packing`).
      process_index: this host's index; None (with process_count) asks jax.
      process_count: the number of hosts; None (with process_index) asks jax.
      drop_last: leave out the last, incomplete batch of an epoch (else it is padded with empty rows).
    """

    KEYS = ("tokens", "labels", "attention_mask", "positions", "segment_ids")

    def __init__(self, examples: list[Encoded], batch_size: int, seq_len: int, *, seed: int = 0, pad_id: int = 0,
                 packing: bool = False, process_index: int | None = None, process_count: int | None = None,
                 drop_last: bool = True):
        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        if batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} rows cannot be split evenly over {process_count} hosts")
        self.local_batch, self.offset = batch_size // process_count, process_index * (batch_size // process_count)
        self.batch_size, self.seq_len, self.seed, self.pad_id, self.drop_last = (
            batch_size, seq_len, seed, pad_id, drop_last)
        # examples per row; the arrays are built batch by batch (a whole dataset of rows would take GBs)
        self.rows = _pack(examples, seq_len) if packing else [[e] for e in examples]
        if len(self) == 0:
            raise ValueError(f"{len(examples)} examples make {len(self.rows)} rows: fewer than one batch of "
                             f"{batch_size}; lower the batch size or add data")

    def __len__(self) -> int:
        return len(self.rows) // self.batch_size if self.drop_last else math.ceil(len(self.rows) / self.batch_size)

    def _row(self, group: list[Encoded]) -> dict[str, np.ndarray]:
        row = {k: np.zeros(self.seq_len, np.int32) for k in self.KEYS}
        row["tokens"][:] = self.pad_id
        row["labels"][:] = IGNORE
        at = 0
        for segment, example in enumerate(group, start=1):
            n = min(len(example.input_ids), self.seq_len - at)
            span = slice(at, at + n)
            row["tokens"][span] = example.input_ids[:n]
            row["labels"][span] = example.labels[:n]
            row["labels"][at] = IGNORE  # never predict an example's first token from the previous one
            row["attention_mask"][span] = 1
            row["positions"][span] = np.arange(n)
            row["segment_ids"][span] = segment
            at += n
        return row

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """This host's batches of epoch `epoch`, from batch `start_step` on.

        Args:
          epoch: the epoch (0-based); it seeds the order, so a resumed run gets the same batches.
          start_step: the first batch of the epoch to yield.

        Yields:
          Dicts of int32 [local_batch, seq_len] arrays: tokens, labels, attention_mask, positions, segment_ids.
        """
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        for step in range(start_step, len(self)):
            chosen = order[step * self.batch_size:(step + 1) * self.batch_size][self.offset:][: self.local_batch]
            rows = [self._row(self.rows[i]) for i in chosen] + [self._row([])] * (self.local_batch - len(chosen))
            yield {k: np.stack([r[k] for r in rows]) for k in self.KEYS}


def _pack(examples: list[Encoded], seq_len: int) -> list[list[Encoded]]:
    """Examples laid greedily into rows of seq_len tokens, in order (an over-long one fills a row alone)."""
    rows, current, used = [], [], 0
    for example in examples:
        n = min(len(example.input_ids), seq_len)
        if current and used + n > seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(example)
        used += n
    if current:
        rows.append(current)
    return rows
