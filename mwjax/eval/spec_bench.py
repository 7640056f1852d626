"""Spec-Bench (Xia et al., 2024): the prompts of House of Cards' generation tasks (Section 4.2, Table 3), and
the assistant's answers to them.

Spec-Bench's `question.jsonl` holds 480 questions, 80 per subtask: MT-bench (two turns; its rows carry MT-bench's
own eight categories), WMT14 DE-EN translation, CNN/DM summarization, Natural Questions QA, GSM8K math
reasoning and NQ retrieval-augmented generation. One JSON object a line:
    {"question_id": 81, "category": "writing", "turns": ["...", "..."], "reference": ["..."]}
`reference` (optional) is a reference answer per turn, given to the judge when present.
Answers come turn by turn as FastChat's `gen_model_answer` (Spec-Bench's generator) makes them: the
conversation so far through the assistant's chat template, greedy by default, each answer fed back before
the next user turn.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mwjax.core import lazy

if TYPE_CHECKING:
    from flax import nnx

decoding = lazy.module("mwjax.eval.decoding")  # jax on first use: the settings here serve flags without it

# Spec-Bench's questions as its repository publishes them (the default of --questions=hub)
PAPER_JUDGE = "prometheus-eval/prometheus-7b-v2.0"  # Table 3's judge: Prometheus-2-7B, a Mistral-7B fine-tune
HUB_URL = "https://raw.githubusercontent.com/hemingkx/Spec-Bench/main/data/spec_bench/question.jsonl"
MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
SUBTASKS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
# House of Cards Table 3's columns: MT-bench judged per turn, the other subtasks on their single turn
COLUMNS = {"mt_1": "MT-1", "mt_2": "MT-2", "translation": "translation", "summarization": "summarization",
           "qa": "QA", "math_reasoning": "math reasoning", "rag": "RAG"}


@dataclasses.dataclass(frozen=True)
class Question:
    """One Spec-Bench question: its id, category (an MT-bench category or a subtask), user turns, references."""

    question_id: int | str
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] | None = None  # a reference answer per turn (MT-bench: math / reasoning / coding)

    @property
    def subtask(self) -> str:
        """The question's subtask: "mt_bench" for MT-bench's categories, else the category itself."""
        return "mt_bench" if self.category in MT_BENCH_CATEGORIES else self.category

    def column(self, turn: int) -> str:
        """The Table 3 column of this question's `turn` (0-based).

        Args:
          turn: the turn's 0-based index.

        Returns:
          A key of COLUMNS: "mt_1" / "mt_2" for MT-bench's turns, else the subtask.
        """
        return f"mt_{turn + 1}" if self.subtask == "mt_bench" else self.subtask


def parse_question(line: str, where: str) -> Question:
    """One line of question.jsonl, checked (ValueError naming `where` for a malformed one).

    Args:
      line: the JSON object text.
      where: "path:line", named in errors.

    Returns:
      The `Question` (a string `reference` becomes a one-element tuple).
    """
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in ("question_id", "category", "turns") if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing} (a Spec-Bench question has question_id, category, "
                         "turns)")
    category, turns = row["category"], row["turns"]
    if category not in MT_BENCH_CATEGORIES and category not in SUBTASKS[1:]:
        raise ValueError(f"{where}: unknown category {category!r}; Spec-Bench's are MT-bench's "
                         f"{MT_BENCH_CATEGORIES} and {SUBTASKS[1:]}")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
        raise ValueError(f"{where}: 'turns' must be a non-empty list of non-empty strings")
    reference = row.get("reference")
    if isinstance(reference, str):
        reference = [reference]
    if reference is not None and (not isinstance(reference, list) or not all(isinstance(r, str) for r in reference)):
        raise ValueError(f"{where}: 'reference' must be a string or a list of strings (one per turn)")
    return Question(row["question_id"], category, tuple(turns), tuple(reference) if reference else None)


def read_questions(source: str | Path = "hub", *, per_subtask: int | None = None,
                   subtasks: Sequence[str] = SUBTASKS) -> list[Question]:
    """Spec-Bench's questions from a local question.jsonl or from Spec-Bench's repository.

    Args:
      source: a question.jsonl path, or "hub" to download HUB_URL.
      per_subtask: keep the first this many of each subtask; None for all (80).
      subtasks: the subtasks kept (some of SUBTASKS); each must have a question.

    Returns:
      The chosen questions, in the file's order.
    """
    unknown = sorted(set(subtasks) - set(SUBTASKS))
    if unknown:
        raise ValueError(f"unknown Spec-Bench subtask(s) {unknown}; choose from {SUBTASKS}")
    if str(source) == "hub":
        name = HUB_URL
        try:
            with urllib.request.urlopen(HUB_URL, timeout=60) as response:
                text = response.read().decode("utf-8")
        except OSError as e:
            raise OSError(f"cannot download Spec-Bench's questions from {HUB_URL} ({e}); download question.jsonl "
                          "where the network reaches GitHub and pass its path") from None
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no Spec-Bench question file at {path} (a question.jsonl, or 'hub')")
        name, text = str(path), path.read_text(encoding="utf-8")
    questions = [parse_question(line, f"{name}:{n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    ids = [q.question_id for q in questions]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name}: repeated question_id(s) {sorted({i for i in ids if ids.count(i) > 1}, key=str)}")
    chosen, counts = [], dict.fromkeys(subtasks, 0)
    for q in questions:
        if q.subtask in counts and (per_subtask is None or counts[q.subtask] < per_subtask):
            counts[q.subtask] += 1
            chosen.append(q)
    empty = [s for s, n in counts.items() if n == 0]
    if empty:
        raise ValueError(f"{name} has no questions of subtask(s) {empty}")
    return chosen


def chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """A conversation through the tokenizer's chat template, ready for the assistant's next turn.

    Args:
      tokenizer: the assistant's HF tokenizer; it must have a chat template (ValueError otherwise).
      messages: the chat messages so far ({"role", "content"}), ending with the user's turn.

    Returns:
      The prompt's token ids (the template writes its own bos).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer {tokenizer.name_or_path!r} has no chat template; pass --tokenizer=<a "
                         "tokenizer with one> (e.g. the instruct model's)")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids  # the template writes its own bos


def answer(model: nnx.Module, tokenizer, questions: Sequence[Question], max_new_tokens: int = 1024, *,
           batch_size: int = 8, temperature: float = 0.0, seed: int = 0) -> list[list[str]]:
    """The assistant's answer to every turn of every question.

    Turn t of all the questions that have one is answered in one batched run, each conversation carrying its
    earlier turns and answers.

    Args:
      model: the assistant, an mwjax causal LM.
      tokenizer: its HF tokenizer, with a chat template.
      questions: the questions to answer.
      max_new_tokens: new tokens per answer at most.
      batch_size: prompts per generation batch (`decoding.generate_many`).
      temperature: sampling temperature; 0 (the default) is greedy, as Spec-Bench's baseline.
      seed: the sampling seed (each turn samples with a seed of its own).

    Returns:
      The decoded, stripped answers, [question][turn].
    """
    answers: list[list[str]] = [[] for _ in questions]
    eos = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else None
    for turn in range(max(len(q.turns) for q in questions)):
        active = [i for i, q in enumerate(questions) if turn < len(q.turns)]
        prompts = []
        for i in active:
            history = []
            for user, assistant in zip(questions[i].turns[:turn], answers[i], strict=True):
                history += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
            prompts.append(chat_ids(tokenizer, history + [{"role": "user", "content": questions[i].turns[turn]}]))
        new = decoding.generate_many(model, prompts, max_new_tokens, batch_size=batch_size, temperature=temperature,
                                     seed=seed + 1_000_003 * turn, eos_ids=eos, pad_id=tokenizer.pad_token_id or 0,
                                     desc=f"answering turn {turn + 1}")
        for i, tokens in zip(active, new, strict=True):
            answers[i].append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return answers


def instruction(question: Question, answers: Sequence[str], turn: int) -> str:
    """What the judge reads as the instruction of `turn`.

    The user's turn alone for the first; for MT-bench's second, the conversation before it too (its second turns
    refer to the first answer: "Rewrite your previous response ..."). House of Cards does not say how it showed
    MT-2 to the judge.

    Args:
      question: the question.
      answers: the assistant's answers to its turns.
      turn: the 0-based turn judged.

    Returns:
      The instruction text ("User: ...", "Assistant: ..." lines before the turn after the first).
    """
    if turn == 0:
        return question.turns[0]
    lines = []
    for user, assistant in zip(question.turns[:turn], answers[:turn], strict=True):
        lines += [f"User: {user}", f"Assistant: {assistant}"]
    return "\n\n".join(lines + [f"User: {question.turns[turn]}"])


def reference(question: Question, turn: int) -> str | None:
    """The reference answer of `turn`, handed to the judge.

    Args:
      question: the question.
      turn: the 0-based turn.

    Returns:
      The reference text, or None when the question has none for that turn.
    """
    return question.reference[turn] if question.reference and turn < len(question.reference) else None


def table3(questions: Sequence[Question], scores: Sequence[Sequence[int | None]]) -> dict:
    """House of Cards Table 3 from per-turn judge scores.

    Args:
      questions: the questions judged.
      scores: 1-5 scores, [question][turn]; None for a judgement never parsed (left out of the means).

    Returns:
      {column: mean score over the parsed judgements} (COLUMNS' keys, those with scores) and "avg": the mean of
      the column means (the paper's Avg.; None when no column has a score).
    """
    by_column: dict[str, list[int]] = {}
    for question, turn_scores in zip(questions, scores, strict=True):
        for turn, score in enumerate(turn_scores):
            column = by_column.setdefault(question.column(turn), [])
            if score is not None:
                column.append(score)
    means = {c: sum(v) / len(v) for c in COLUMNS if (v := by_column.get(c))}
    return means | {"avg": sum(means.values()) / len(means) if means else None}


TABLE3_HEADER = list(COLUMNS.values()) + ["Avg."]


def table3_row(scores: dict) -> list:
    """`table3`'s scores as Table 3's cells: the mean per column ("-" where not run), Avg.

    Args:
      scores: a `table3` result.

    Returns:
      One cell per TABLE3_HEADER entry.
    """
    return [scores.get(c, "-") for c in COLUMNS] + [scores["avg"] if scores["avg"] is not None else "-"]
