"""Direct assessment (a 1-5 Likert score with feedback) by an LLM judge that mwjax runs, through the
`prometheus-eval` package's own absolute-grading prompts, rubrics, output parser and retry loop (House of
Cards Section 4.2 / Table 3 grade with Prometheus-2-7B, `prometheus-eval/prometheus-7b-v2.0`).

prometheus-eval drives a model through `completions(inputs, **params, use_tqdm=)`; `MwjaxJudgeLM` is that
interface over an mwjax model, so `prometheus_eval.utils.batch_completions_with_retries` itself generates,
parses (`prometheus_eval.parser.parse_output`) and re-generates the unparseable outputs, up to
`max_retries` times. Its judge samples (PROMETHEUS_PARAMS, what it passes when the caller gives none):
a retry is a fresh sample, where a greedy judge would repeat itself.

    pip install --no-deps prometheus-eval==0.1.20 fastchat==0.1.0

(--no-deps: only its prompts, parser and retry loop are imported; its litellm client, never used,
would pull in a huggingface-hub older than transformers 5 wants.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jinja2

from mwjax.core import lazy

if TYPE_CHECKING:
    from flax import nnx

decoding = lazy.module("mwjax.eval.decoding")  # jax on first use: the settings here serve flags without it

try:
    from fastchat.conversation import get_conv_template  # prometheus-eval's dependency: its vLLM prompt format
    from prometheus_eval.prompts import ABS_SYSTEM_PROMPT, get_prompt_template, load_rubric
    from prometheus_eval.utils import batch_completions_with_retries
except ImportError as e:  # an optional extra: the rest of mwjax runs without it
    raise ImportError(f"LLM-judged generation tasks need prometheus-eval ({e}): "
                      "pip install --no-deps prometheus-eval==0.1.20 fastchat==0.1.0") from None

# The sampling of prometheus-eval's judge: batch_completions_with_retries' parameters when the caller passes
# none (vLLM SamplingParams names), and its retry budget (tests/test_generation_tasks.py checks both).
PROMETHEUS_PARAMS = {"max_tokens": 1024, "repetition_penalty": 1.03, "best_of": 1, "temperature": 1.0, "top_p": 0.9}
MAX_RETRIES = 10
RUBRICS = ("helpfulness", "harmlessness", "honesty", "factual_validity", "reasoning")  # load_rubric's criteria
# How the judge's messages become its prompt: "prometheus" as prometheus-eval's vLLM path (FastChat's mistral
# conversation, "[INST] system\nuser [/INST]", for Prometheus-2's Mistral base); "chat_template" through the
# judge tokenizer's own chat template (other judges).
PROMPT_FORMATS = ("prometheus", "chat_template")
FAILED = "Failed to generate feedback"  # prometheus-eval's feedback for an output it never parsed


@dataclasses.dataclass(frozen=True)
class Item:
    """One response to grade: the instruction it answers, and a reference answer (a score-5 example) if any."""
    instruction: str
    response: str
    reference: str | None = None


@dataclasses.dataclass(frozen=True)
class Judgement:
    """The judge's verdict on one `Item`: its parsed feedback, its 1-5 score (None if never parsed), every output."""

    feedback: str  # the judge's whole parsed output (as prometheus-eval returns it), or FAILED
    score: int | None  # 1-5, None when no attempt parsed
    outputs: tuple[str, ...]  # every generation, the first pass then each retry

    @property
    def retries(self) -> int:
        """How many times the item was re-generated (outputs after the first pass)."""
        return len(self.outputs) - 1


def judge_messages(item: Item, rubric: str) -> list[dict[str, str]]:
    """The system and user turns prometheus-eval's `PrometheusEval.absolute_grade` sends for one item.

    The absolute template with a reference answer when there is one, without otherwise.

    Args:
      item: the response to grade, its instruction and reference.
      rubric: the rubric text (a `load_rubric` result or the caller's own).

    Returns:
      [{"role": "system", ...}, {"role": "user", ...}] chat messages.
    """
    template = get_prompt_template("absolute", include_reference=item.reference is not None)
    content = template.format(instruction=item.instruction, response=item.response, rubric=rubric,
                              reference_answer=item.reference)
    return [{"role": "system", "content": ABS_SYSTEM_PROMPT}, {"role": "user", "content": content}]


def render(messages: list[dict[str, str]], tokenizer, prompt_format: str = "prometheus") -> list[int]:
    """The judge's prompt token ids for `messages` (see PROMPT_FORMATS).

    Args:
      messages: the chat messages (`judge_messages`).
      tokenizer: the judge's HF tokenizer.
      prompt_format: "prometheus" (FastChat's mistral conversation, as prometheus-eval's vLLM path) or
        "chat_template" (the tokenizer's own template; the system text leads the user turn when the template
        has no system role).

    Returns:
      The prompt's token ids.
    """
    if prompt_format == "prometheus":
        conv = get_conv_template("mistral")  # as PrometheusEval._get_conversation_prompt
        for message in messages:
            if message["role"] == "system":
                conv.set_system_message(message["content"])
            else:
                conv.append_message(conv.roles[0], message["content"])
        conv.append_message(conv.roles[1], None)
        return tokenizer(conv.get_prompt().strip()).input_ids  # vLLM strips the prompt and adds bos
    if prompt_format != "chat_template":
        raise ValueError(f"unknown judge prompt format {prompt_format!r}; choose from {PROMPT_FORMATS}")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except jinja2.exceptions.TemplateError:  # a template without a system role: the system text leads the user turn
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        users = [m | {"content": f"{system}\n\n{m['content']}"} if m["role"] == "user" else m
                 for m in messages if m["role"] != "system"]
        text = tokenizer.apply_chat_template(users, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


@dataclasses.dataclass(frozen=True)
class Request:
    """What prometheus-eval hands back to `completions`: the item's index (to count its attempts) and prompt."""
    index: int
    ids: list[int]


class MwjaxJudgeLM:
    """prometheus-eval's model interface over an mwjax model, keeping every output per item.

    `completions` generates for a list of `Request`s with the vLLM-named sampling parameters prometheus-eval
    passes.

    Args:
      model: the judge, an mwjax causal LM.
      tokenizer: its HF tokenizer (eos ends an output, pad pads the prompts, decode gives the text).
      batch_size: prompts per generation batch (`decoding.generate_many`).
      seed: the sampling seed; each pass (the first, then each retry) samples with a seed of its own.
    """

    def __init__(self, model: nnx.Module, tokenizer, *, batch_size: int = 8, seed: int = 0):
        self.model, self.tokenizer, self.batch_size, self.seed = model, tokenizer, batch_size, seed
        self.outputs: dict[int, list[str]] = {}
        self.passes = 0

    def completions(self, requests: Sequence[Request], *, max_tokens: int, temperature: float = 1.0,
                    top_p: float = 1.0, repetition_penalty: float = 1.0, best_of: int = 1, use_tqdm: bool = True,
                    **unknown) -> list[str]:
        """One sampled output per request (prometheus-eval's `completions`), recorded under the request's index.

        Args:
          requests: the prompts to complete, with their item indices.
          max_tokens: new tokens per output (vLLM `max_tokens`).
          temperature: sampling temperature (0: greedy).
          top_p: nucleus sampling threshold (1.0: none).
          repetition_penalty: as HF / vLLM `repetition_penalty` (1.0: none).
          best_of: must be 1 (one sample per prompt).
          use_tqdm: accepted for prometheus-eval's interface; the progress bar shows regardless.
          unknown: any other sampling parameter; refused (ValueError).

        Returns:
          The decoded outputs (special tokens skipped, as vLLM's `.text`), one per request.
        """
        if unknown or best_of != 1:
            raise ValueError(f"the mwjax judge samples one output per prompt with max_tokens, temperature, top_p and "
                             f"repetition_penalty; got best_of={best_of} and {sorted(unknown)}")
        eos = self.tokenizer.eos_token_id
        new = decoding.generate_many(self.model, [r.ids for r in requests], max_tokens, batch_size=self.batch_size,
                                     temperature=temperature, top_p=top_p if top_p < 1.0 else None,
                                     repetition_penalty=repetition_penalty, seed=self.seed + 1_000_003 * self.passes,
                                     eos_ids=None if eos is None else (eos,), pad_id=self.tokenizer.pad_token_id or 0,
                                     desc="judging" if not self.passes else f"judging, retry {self.passes}")
        self.passes += 1
        texts = [self.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in new]  # as vLLM's .text
        for request, text in zip(requests, texts, strict=True):
            self.outputs.setdefault(request.index, []).append(text)
        return texts


def grade(model: nnx.Module, tokenizer, items: Sequence[Item], *, rubric: str = "helpfulness",
          params: dict | None = None, max_retries: int = MAX_RETRIES, prompt_format: str = "prometheus",
          batch_size: int = 8, seed: int = 0) -> list[Judgement]:
    """Grade every item with the judge `model` (prometheus-eval's absolute grading).

    One pass over all items, then up to `max_retries` passes over those whose output did not parse.

    Args:
      model: the judge, an mwjax causal LM (House of Cards: Prometheus-2-7B).
      tokenizer: the judge's HF tokenizer.
      items: the responses to grade.
      rubric: one of RUBRICS (prometheus-eval's `load_rubric`) or a rubric text.
      params: changes to PROMETHEUS_PARAMS (e.g. {"temperature": 0.0}: greedy, whose retries repeat).
      max_retries: re-generation passes at most for the outputs that did not parse.
      prompt_format: one of PROMPT_FORMATS (`render`).
      batch_size: prompts per generation batch.
      seed: the sampling seed of the first pass.

    Returns:
      One `Judgement` per item, in order.
    """
    rubric_text = load_rubric(rubric, "absolute") if rubric in RUBRICS else rubric
    lm = MwjaxJudgeLM(model, tokenizer, batch_size=batch_size, seed=seed)
    requests = [Request(i, render(judge_messages(item, rubric_text), tokenizer, prompt_format))
                for i, item in enumerate(items)]
    feedbacks, scores = batch_completions_with_retries(lm, requests, mode="absolute", max_retries=max_retries,
                                                       params=PROMETHEUS_PARAMS | (params or {}))
    return [Judgement(feedback, score, tuple(lm.outputs[i]))
            for i, (feedback, score) in enumerate(zip(feedbacks, scores, strict=True))]
