"""Small multiple-choice tasks written from templates, with answers code can check: a local stand-in for
House of Cards' zero-shot suite (ARC, BoolQ, PIQA, WinoGrande) where nothing may be fetched, and the
instruction data fine-tuning learns them from (Table 2 / Table 8 in miniature).

    held_out = synthetic_tasks.questions("held_out", per_task=20, seed=0)
    records = synthetic_tasks.instruction_records(synthetic_tasks.questions("train", per_task=200, seed=0))
    accuracy = synthetic_tasks.accuracy(model, tokenizer, held_out)

Tasks (every question has 4 choices, one right; chance is 25%). The question is a cloze: the choices are
scored as answers, not listed (a 135M model copies a listed option rather than answering):
  addition      "What is 23 + 45?"                                a, b in [10, 89]; distractors: 3 of sum +-1, +2, +-10
  capitals      "What is the capital of Peru?"                    CAPITALS (a fixed list); distractors: 3 other capitals
  smallest      "Which number is the smallest: 41, 7, 88, 23?"    4 distinct numbers in [1, 99]
  alphabetical  "Which word comes first in alphabetical order: river, apple, stone, cloud?"  4 distinct WORDS

The answer of each question is computed from its facts (`solve`), never stored by hand. A question's
`key` is the fact it asks about (the pair of addends, the country, the set of numbers or words); a key
belongs to the train or the held-out split by a hash of (key, seed), so the splits never share a fact:
a fine-tuned model is scored on countries, sums and sets it never saw (it can only have learned the
format and the skill). Everything is deterministic in `seed`.

Scoring (`accuracy`) is lm-eval's `acc`: each choice is the response of the instruction in the same
format fine-tuning trains on (`mwjax.finetune.data.encode`, the "plain" template by default: bos, question,
newline, answer, eos; short, so a CPU scores hundreds of questions in seconds), its log-likelihood
summed (`MwjaxLM._loglikelihood_tokens`), and the most likely choice is the model's answer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Callable, Sequence

import numpy as np

from mwjax.finetune import data

# (country, capital): countries whose capital is not their own name, most with single-word capitals
CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Hungary", "Budapest"),
    ("Greece", "Athens"), ("Turkey", "Ankara"), ("Ireland", "Dublin"), ("Canada", "Ottawa"),
    ("Australia", "Canberra"), ("Argentina", "Buenos Aires"), ("Colombia", "Bogota"), ("Venezuela", "Caracas"),
    ("Cuba", "Havana"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"),
    ("Philippines", "Manila"), ("India", "New Delhi"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Syria", "Damascus"), ("Lebanon", "Beirut"), ("Ethiopia", "Addis Ababa"), ("Nigeria", "Abuja"),
    ("Ghana", "Accra"), ("Morocco", "Rabat"), ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"),
    ("Switzerland", "Bern"), ("Czechia", "Prague"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"),
    ("Ukraine", "Kyiv"), ("Scotland", "Edinburgh"), ("England", "London"), ("Iceland", "Reykjavik"),
    ("Afghanistan", "Kabul"), ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"), ("Nepal", "Kathmandu"),
    ("South Korea", "Seoul"), ("North Korea", "Pyongyang"), ("Taiwan", "Taipei"), ("Malaysia", "Kuala Lumpur"),
    ("New Zealand", "Wellington"), ("Uruguay", "Montevideo"), ("Paraguay", "Asuncion"), ("Bolivia", "La Paz"),
    ("Ecuador", "Quito"), ("Jamaica", "Kingston"), ("Tunisia", "Tunis"), ("Algeria", "Algiers"),
    ("Sudan", "Khartoum"), ("Uganda", "Kampala"), ("Zimbabwe", "Harare"),
)
WORDS = ("apple", "river", "garden", "window", "planet", "silver", "orange", "pencil", "castle", "forest",
         "rocket", "yellow", "basket", "candle", "dragon", "mirror", "turtle", "violin", "winter", "summer",
         "bridge", "cookie", "button", "jungle", "ladder", "marble", "needle", "pepper", "rabbit", "saddle",
         "tiger", "cloud", "stone", "bread", "chair", "light", "music", "ocean", "paper", "smile")
TASKS = ("addition", "capitals", "smallest", "alphabetical")
SPLITS = ("train", "held_out")
HELD_OUT_FRACTION = 0.3  # of the keys (facts) of every task
NUM_CHOICES = 4


@dataclasses.dataclass(frozen=True)
class Question:
    """One multiple-choice question: its task, the fact it asks about (`key`), prompt, choices, right choice."""

    task: str
    key: tuple  # the fact asked about: the split is decided on it
    prompt: str
    choices: tuple[str, ...]
    answer: int  # index of the right choice

    def to_dict(self) -> dict:
        """The fields as a dict (`dataclasses.asdict`), for JSON.

        Returns:
          {field name: value}.
        """
        return dataclasses.asdict(self)


def split_of(task: str, key: tuple, seed: int) -> str:
    """'train' or 'held_out' for a fact, by a stable hash of (task, key, seed) (not Python's salted hash).

    Args:
      task: one of TASKS.
      key: the fact (a `Question.key`).
      seed: the split's seed.

    Returns:
      "held_out" for a HELD_OUT_FRACTION of the facts, else "train".
    """
    digest = hashlib.sha256(repr((task, key, seed)).encode()).digest()
    return "held_out" if int.from_bytes(digest[:8], "big") / 2**64 < HELD_OUT_FRACTION else "train"


def solve(task: str, key: tuple) -> str:
    """The right answer of a question from its facts alone.

    Args:
      task: one of TASKS.
      key: the fact (a `Question.key`): the addends, (country,), or the sorted numbers / words.

    Returns:
      The answer's text.
    """
    if task == "addition":
        return str(key[0] + key[1])
    if task == "capitals":
        return dict(CAPITALS)[key[0]]
    if task == "smallest":
        return str(min(key))
    if task == "alphabetical":
        return min(key)
    raise ValueError(f"unknown synthetic task {task!r}; choose from {TASKS}")


def _draw(task: str, rng: random.Random) -> tuple[tuple, list[str], Callable[[list[str]], str]]:
    """(key, choices with the answer first, prompt of a choice order) of one random question."""
    if task == "addition":
        a, b = rng.randint(10, 89), rng.randint(10, 89)
        wrong = rng.sample([d for d in (a + b - 10, a + b - 1, a + b + 1, a + b + 10, a + b + 2) if d > 0], 3)
        return (a, b), [str(a + b), *map(str, wrong)], lambda c: f"What is {a} + {b}?"
    if task == "capitals":
        country, capital = rng.choice(CAPITALS)
        wrong = rng.sample([c for _, c in CAPITALS if c != capital], 3)
        return (country,), [capital, *wrong], lambda c: f"What is the capital of {country}?"
    if task == "smallest":
        nums = rng.sample(range(1, 100), NUM_CHOICES)
        key = tuple(sorted(nums))
        choices = [str(key[0]), *(str(n) for n in nums if n != key[0])]
        return key, choices, lambda c: f"Which number is the smallest: {', '.join(c)}?"
    if task == "alphabetical":
        words = rng.sample(WORDS, NUM_CHOICES)
        key = tuple(sorted(words))
        return key, [key[0], *(w for w in words if w != key[0])], lambda c: (
            f"Which word comes first in alphabetical order: {', '.join(c)}?")
    raise ValueError(f"unknown synthetic task {task!r}; choose from {TASKS}")


def questions(split: str, per_task: int, seed: int = 0, tasks: Sequence[str] = TASKS) -> list[Question]:
    """Questions of each task whose facts fall in `split` (module doc), in a seeded order, the choices shuffled.

    Args:
      split: "train" or "held_out".
      per_task: questions per task, each fact at most once (a task with fewer facts in the split, e.g. capitals,
        gives fewer).
      seed: decides the split of the facts and the draws.
      tasks: the tasks (some of TASKS).

    Returns:
      The questions, task by task.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    out = []
    for task in tasks:
        rng = random.Random(f"{seed}/{split}/{task}")
        seen: set[tuple] = set()
        for _ in range(per_task * 50):  # enough draws to fill the split of every task but the smallest
            if len(seen) == per_task:
                break
            key, choices, prompt = _draw(task, rng)
            if key in seen or split_of(task, key, seed) != split:
                continue
            seen.add(key)
            order = rng.sample(range(NUM_CHOICES), NUM_CHOICES)
            shown = tuple(choices[i] for i in order)
            out.append(Question(task, key, prompt(list(shown)), shown, order.index(0)))
        if not seen:
            raise ValueError(f"no {task} question falls in split {split!r}")
    return out


def instruction_records(items: Sequence[Question]) -> list[dict]:
    """Alpaca records (`finetune.data`) that teach the questions: instruction = the question, output = the answer.

    Args:
      items: the questions.

    Returns:
      [{"instruction", "input": "", "output"}] one per question.
    """
    return [{"instruction": q.prompt, "input": "", "output": q.choices[q.answer]} for q in items]


def accuracy(model, tokenizer, items: Sequence[Question], *, template: str = "plain", batch_size: int = 32,
             lm=None) -> dict[str, float]:
    """Accuracy (lm-eval `acc`: the choice of largest summed log-likelihood as the response).

    Args:
      model: an mwjax causal LM.
      tokenizer: its HF tokenizer.
      items: the questions.
      template: the `finetune.data` template each choice is encoded in (one of `data.TEMPLATES`).
      batch_size: the `MwjaxLM` batch size when `lm` is None.
      lm: an `MwjaxLM` over `model` to reuse (its compiled scorer); None for a new one.

    Returns:
      {task: accuracy} plus "mean" (over all questions), as fractions in [0, 1].
    """
    from mwjax.eval.lm_eval import MwjaxLM

    cfg = data.DataConfig(template=template, cutoff_len=10_000)
    requests = []
    for q in items:
        for choice in q.choices:
            enc = data.encode({"instruction": q.prompt, "input": "", "output": choice}, tokenizer, cfg)
            n_prompt = sum(label == data.IGNORE for label in enc.labels)
            requests.append((None, enc.input_ids[:n_prompt], enc.input_ids[n_prompt:]))
    lm = lm or MwjaxLM(model, tokenizer, batch_size=batch_size)
    logp = np.array([ll for ll, _ in lm._loglikelihood_tokens(requests, disable_tqdm=True)])
    picked = logp.reshape(len(items), NUM_CHOICES).argmax(-1)
    right = np.array([p == q.answer for p, q in zip(picked, items, strict=True)])
    tasks = [q.task for q in items]
    scores = {t: float(right[[x == t for x in tasks]].mean()) for t in dict.fromkeys(tasks)}
    return scores | {"mean": float(right.mean())}
