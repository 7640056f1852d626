"""An lm-evaluation-harness backend for mwjax models (zero-shot accuracy, House of Cards Tables 1, 2, 7, 8).

    from mwjax.eval.lm_eval import MwjaxLM
    lm_eval.simple_evaluate(model=MwjaxLM(model, tokenizer, add_bos_token=False), tasks=["arc_easy"])

From the shell, `mwjax-lm-eval --model mwjax --model_args pretrained=PATH,...` (lm-eval's command line
with the backend registered); that path loads checkpoints, adapters and attacks, one layer up, in
`mwjax.experiments.lm_eval_model`.

The scoring follows lm-eval's own HF backend request by request: `TemplateLM` splits context and
continuation the same way, a request is `(context + continuation)[-(max_length + 1):]`, the
continuation's log-probabilities are summed and `is_greedy` says whether every continuation token is
the argmax. Requests that share a context (the choices of a multiple-choice question) or most of one
(WinoGrande, few-shot prompts) compute what they share once (`mwjax.eval.continuations`), and they are packed
densely into batch rows of one width, the call's cheapest, so a call compiles one program and its batches are
nearly free of padding.

Generation requests longer than the model's window lose their left end, as the HF backend does; with
`truncation="middle"` a prompt over `max_prompt_length` tokens loses its middle instead, as LongBench
does (`middle_truncate`; House of Cards Table 9 ran LongBench so at 7,500 tokens).

bos: lm-eval up to 0.4.9.1 added no bos for HF models, later versions follow the tokenizer's default;
massive activations sit on the first token, so `add_bos_token` makes the choice explicit (None =
the tokenizer's default, as current lm-eval).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from flax import nnx
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

from mwjax.converters import tokens
from mwjax.core.progress import progress
from mwjax.eval import continuations
from mwjax.eval.decoding import DEFAULT_BUCKETS, bucket, generate

TRUNCATIONS = ("left", "middle")


def middle_truncate(tokenizer, text: str, max_length: int) -> str:
    """LongBench's prompt truncation (THUDM/LongBench pred.py): keep both ends of a long text, drop its middle.

    A text of more than `max_length` tokens becomes its first and its last max_length // 2 tokens, each half
    decoded without special tokens and the two texts joined. The instructions at both ends of a LongBench prompt
    survive; the middle of the long context goes.

    Args:
      tokenizer: an HF tokenizer; the text is tokenized as it does by default, its special tokens included.
      text: the prompt.
      max_length: the most tokens kept (House of Cards Table 9: 7500).

    Returns:
      `text` itself when it is short enough, else the joined text of its two ends.
    """
    ids = tokenizer.encode(text)
    if len(ids) <= max_length:
        return text
    half = max_length // 2
    return (tokenizer.decode(ids[:half], skip_special_tokens=True)
            + tokenizer.decode(ids[-half:], skip_special_tokens=True))


def describe(request, index: int) -> str:
    """How an error names an lm-eval request: its position, task, document and (shortened) arguments.

    Args:
      request: an lm-eval `Instance` (its `args`, and `task_name` / `doc_id` when set).
      index: its position in the call's requests.

    Returns:
      e.g. "request 3 (task arc_easy, doc 1) ['Question: ...', ' yes']"; strings over 60 characters keep their end.
    """
    where = f"request {index}"
    if getattr(request, "task_name", None) is not None:
        where += f" (task {request.task_name}, doc {request.doc_id})"
    text = ", ".join(repr(a if not isinstance(a, str) or len(a) <= 60 else "..." + a[-57:]) for a in request.args)
    return f"{where} [{text}]"


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """A generate_until request's generation kwargs, checked (`generation_options`)."""

    until: tuple[str, ...]
    max_gen_toks: int
    temperature: float  # 0: greedy (do_sample false)
    top_k: int | None
    top_p: float | None


def generation_options(gen_kwargs: dict, default_max: int, where: str) -> GenerationOptions:
    """lm-eval's generation kwargs as GenerationOptions, checked.

    `until` must be a string or a list of strings, max_gen_toks an integer >= 1, temperature finite and >= 0,
    top_k >= 1, top_p in (0, 1], do_sample a bool; a ValueError naming the request and the option otherwise.
    Options the backend does not know are left to lm-eval (ignored).

    Args:
      gen_kwargs: a generate_until request's generation kwargs (its second argument).
      default_max: max_gen_toks when the kwargs give none (the backend's `max_gen_toks`).
      where: the request, as errors name it (`describe`).

    Returns:
      The `GenerationOptions`; temperature is 0 (greedy) unless do_sample is true.
    """
    kwargs = dict(gen_kwargs)
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else until
    if not isinstance(until, list | tuple) or not all(isinstance(u, str) and u for u in until):
        raise ValueError(f"{where}: generation option until={kwargs.get('until')!r} must be a non-empty string or a "
                         "list of them (an empty stop string would end every generation before it starts)")

    def number(name: str, kind, default, ok, rule: str):
        value = kwargs.get(name, default)
        if value is None:
            return None
        try:
            value = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: generation option {name}={kwargs[name]!r} is not a number") from None
        if not ok(value):
            raise ValueError(f"{where}: generation option {name}={value!r} must be {rule}")
        return value

    max_gen = number("max_gen_toks", int, default_max, lambda v: v >= 1, "an integer >= 1")
    temperature = number("temperature", float, 0.0, lambda v: math.isfinite(v) and v >= 0, "finite and >= 0")
    top_k = number("top_k", int, None, lambda v: v >= 1, "an integer >= 1")
    top_p = number("top_p", float, None, lambda v: 0 < v <= 1, "in (0, 1]")
    sample = kwargs.get("do_sample", False)
    if not isinstance(sample, bool):
        raise ValueError(f"{where}: generation option do_sample={sample!r} must be true or false")
    return GenerationOptions(tuple(until), max_gen, temperature if sample else 0.0, top_k, top_p)


class MwjaxLM(TemplateLM):
    """lm-eval `LM` over an mwjax model already in memory (attacks / adapters applied by the caller).

    The counterpart of lm-eval's HF backend (`HFLM`).

    Args:
      model: the mwjax causal LM evaluated.
      tokenizer: its HF tokenizer (required; its vocabulary is checked against the model's).
      batch_size: requests per forward pass (rows per batch).
      max_length: the context window (default: the model's `max_position_embeddings`).
      add_bos_token: prepend bos to every request: True / False, or None for the tokenizer's default.
      max_gen_toks: generate_until's default number of new tokens.
      buckets: the prompt widths generate_until pads to (one compiled program each).
      truncation: how a generation prompt too long is cut: "left" (as HFLM) or "middle" (LongBench).
      max_prompt_length: with truncation="middle", the most prompt tokens kept (`middle_truncate`).
    """

    def __init__(self, model: nnx.Module, tokenizer, *, batch_size: int = 8, max_length: int | None = None,
                 add_bos_token: bool | None = None, max_gen_toks: int = 256,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, truncation: str = "left",
                 max_prompt_length: int | None = None):
        super().__init__()
        if tokenizer is None:
            raise ValueError("MwjaxLM needs the model's tokenizer")
        if truncation not in TRUNCATIONS:
            raise ValueError(f"truncation={truncation!r}: write one of {TRUNCATIONS}")
        if truncation == "middle" and not max_prompt_length:
            raise ValueError("truncation='middle' needs max_prompt_length (LongBench in House of Cards: 7500)")
        tokens.check_vocabulary(tokenizer, model.config.vocab_size, model="being evaluated",
                                tokenizer_name=getattr(tokenizer, "name_or_path", None) or "given")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = int(batch_size)
        self._max_length = int(max_length or model.config.max_position_embeddings)
        self.add_bos_token = add_bos_token
        self._max_gen_toks = int(max_gen_toks)
        self.buckets = tuple(sorted(buckets))  # generate_until's prompt widths (loglikelihood picks its own)
        self.truncation = truncation
        self.max_prompt_length = int(max_prompt_length) if max_prompt_length else None
        # hashes of the chat-templated prompts whose user turn apply_chat_template already cut (LongBench cuts
        # the prompt before the template), so that generate_until does not cut them again
        self._cut_before_template: set[int] = set()
        self._split = nnx.split(model)  # once: every batch of requests runs on it

    # ------------------------------------------------------------------ tokenizer plumbing (as HFLM)

    @property
    def eot_token_id(self) -> int:
        """The tokenizer's eos id: where generation stops."""
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token lm-eval puts before a request with an empty context: bos, or eos when there is none."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        """The context window, in tokens: a request keeps its last max_length + 1 tokens."""
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        """What lm-eval keys its chat-template cache by (HFLM's `tokenizer_name`)."""
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """lm-eval's turns through the tokenizer's chat template (`--apply_chat_template`), as HFLM renders them.

        A template that refuses a system turn gets the history without it. With truncation="middle" the last
        user turn (LongBench's prompt) is cut before the template wraps it, as LongBench's pred.py does.

        Args:
          chat_history: the turns, as {"role": ..., "content": ...} dicts.
          add_generation_prompt: end with the assistant's header; False continues the final message instead.

        Returns:
          The rendered prompt text.
        """
        import jinja2

        if self.truncation == "middle" and chat_history and chat_history[-1]["role"] == "user":
            last = chat_history[-1] | {"content": middle_truncate(self.tokenizer, chat_history[-1]["content"],
                                                                  self.max_prompt_length)}
            chat_history = [*chat_history[:-1], last]

        render = lambda history: self.tokenizer.apply_chat_template(
            history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt)
        try:
            text = render(chat_history)
        except jinja2.exceptions.TemplateError:
            text = render([turn for turn in chat_history if turn["role"] != "system"])
        if self.truncation == "middle":
            self._cut_before_template.add(hash(text))
        return text

    def _prompt(self, context: str) -> str:
        """A generation request's context after the middle truncation (left truncation happens on its tokens)."""
        if self.truncation != "middle" or hash(context) in self._cut_before_template:
            return context
        return middle_truncate(self.tokenizer, context, self.max_prompt_length)

    @property
    def max_gen_toks(self) -> int:
        """New tokens generated per request when its generation kwargs give no max_gen_toks."""
        return self._max_gen_toks

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """Token ids of a string, as lm-eval's `TemplateLM` asks for them.

        Args:
          string: the text.
          add_special_tokens: passed to the tokenizer; None: `add_bos_token` (the tokenizer's default when that is
            None too), False when the text already starts with the bos token.
          left_truncate_len: keep only the last this many tokens; None (or 0) keeps all.
          kwargs: other lm-eval options, ignored.

        Returns:
          The token ids.
        """
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            bos = self.tokenizer.bos_token
            if bos is not None and string.startswith(bos):  # the text already carries its bos
                add_special_tokens = False
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        """The text of token ids.

        Args:
          tokens: the token ids.
          skip_special_tokens: leave special tokens (bos, eos, ...) out of the text.

        Returns:
          The decoded text.
        """
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ scoring

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """lm-eval's, after a check it lacks: an empty context with a continuation of no tokens (an IndexError
        inside lm-eval) is a ValueError naming the request.

        Args:
          requests: lm-eval `Instance`s whose args are (context, continuation).
          disable_tqdm: hide the progress bar.

        Returns:
          One (sum of the continuation's log-probabilities, is_greedy) per request, in order.
        """
        for i, request in enumerate(requests):
            context, continuation = request.args
            if context == "" and not self.tok_encode(continuation, add_special_tokens=False):
                raise ValueError(f"{describe(request, i)}: the context and the continuation are both empty, so there "
                                 "is nothing to score; drop the request or give it a continuation")
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) | None, context_enc, continuation_enc) -> (sum log p, is_greedy).

        A request is `(context_enc + continuation_enc)[-(max_length + 1):]`, its continuation at most all but
        its first token, as in the HF backend. Requests that share a context, or most of one, compute it once
        (`mwjax.eval.continuations`).
        """
        pairs = []
        for i, (strings, context_enc, continuation_enc) in enumerate(requests):
            if not continuation_enc or not context_enc:
                what = "continuation" if not continuation_enc else "context"
                raise ValueError(f"loglikelihood request {i} {list(strings) if strings else ''}: its {what} has no "
                                 f"tokens ({len(context_enc)} context and {len(continuation_enc)} continuation "
                                 "tokens), so there is no log-likelihood to score; drop the request or give it one")
            whole = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1):]
            cut = len(whole) - min(len(continuation_enc), len(whole) - 1)
            pairs.append((whole[:cut], whole[cut:]))

        def cache(i: int, result: tuple[float, bool]) -> None:
            if requests[i][0] is not None:
                self.cache_hook.add_partial("loglikelihood", requests[i][0], result)

        return continuations.score_pairs(*self._split, pairs, config=self.model.config, batch_size=self.batch_size,
                                         max_length=self.max_length, on_result=cache, desc="mwjax loglikelihood",
                                         show_progress=not disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each text: lm-eval's disjoint rolling windows of max_length tokens.

        Args:
          requests: lm-eval `Instance`s whose args are (text,).
          disable_tqdm: hide the progress bar.

        Returns:
          One total log-likelihood per request, in order.
        """
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (logp, _) in zip(owners, scores, strict=True):
            totals[owner] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) continuations, cut at the first stop sequence; batched per generation kwargs.

        A context is cut in the middle first (truncation="middle"), then its tokens on the left to leave room
        for max_gen_toks in max_length (as the HF backend). The eos token's text is a stop sequence too.

        Args:
          requests: lm-eval `Instance`s whose args are (context, generation kwargs); see `generation_options`.
          disable_tqdm: hide the progress bar.

        Returns:
          One generated text per request, in order.
        """
        groups: dict[str, list[int]] = {}
        args = [req.args for req in requests]
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(repr(sorted(gen_kwargs.items())), []).append(i)
        out: list[str | None] = [None] * len(args)
        bar = progress(len(args), "mwjax generate_until", enabled=not disable_tqdm)
        for members in groups.values():
            where = describe(requests[members[0]], members[0])
            options = generation_options(args[members[0]][1], self.max_gen_toks, where)
            until = list(options.until)
            eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_new, temperature, top_k, top_p = options.max_gen_toks, options.temperature, options.top_k, options.top_p
            max_ctx = self.max_length - max_new
            if max_ctx <= 0:
                raise ValueError(f"{where}: max_gen_toks={max_new} leaves no room for context in "
                                 f"max_length={self.max_length}")
            encoded = {i: self.tok_encode(self._prompt(args[i][0]), left_truncate_len=max_ctx) for i in members}
            empty = [i for i in members if not encoded[i]]
            if empty:
                raise ValueError(f"{describe(requests[empty[0]], empty[0])}: the context has no tokens (an empty "
                                 f"context and add_bos_token={self.add_bos_token}), so there is nothing to generate "
                                 "from; give it a context or add_bos_token=True")
            members = sorted(members, key=lambda i: -len(encoded[i]))
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                prompts = [encoded[i] for i in batch]
                prompts += [prompts[-1]] * (self.batch_size - len(prompts))  # fixed batch: one program
                width = bucket(len(prompts[0]), self.buckets, max_ctx)
                new = generate(self.model, prompts, max_new, temperature=temperature, top_k=top_k, top_p=top_p,
                               eos_ids=(self.eot_token_id,), pad_id=self.tokenizer.pad_token_id or 0, width=width)
                for i, generated in zip(batch, new, strict=False):
                    text = self.tok_decode(generated)
                    for stop in until:
                        text = text.split(stop)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", args[i], text)
                bar.update(len(batch))
        bar.close()
        return out
