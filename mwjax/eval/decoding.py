"""Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p, repetition penalty), one
compiled program.

Prompts of different lengths are left-padded; positions count real tokens only (as HF `generate`
derives them from the attention mask), so a padded prompt continues exactly as it would alone.
`generate_many` runs any number of prompts in fixed-size batches of a few bucketed widths.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mwjax.converters.tokens import check_ids
from mwjax.core.compiled import jit_model
from mwjax.core.progress import progress
from mwjax.nn.cache import KVCache

# prompt widths (padded lengths) of `generate_many`: ~1.5x steps, little padding, a handful of programs per run
DEFAULT_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


def bucket(length: int, buckets: Sequence[int], cap: int) -> int:
    """The smallest bucket >= length (or length rounded up to a multiple of the largest bucket), <= cap.

    Args:
      length: the prompt length to fit.
      buckets: ascending widths (e.g. `DEFAULT_BUCKETS`).
      cap: the largest width returned.

    Returns:
      The padded width.
    """
    for b in buckets:
        if b >= length:
            return min(b, cap)
    step = buckets[-1]
    return min(-(-length // step) * step, cap)


def _penalize(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """HF's RepetitionPenaltyLogitsProcessor (vLLM's repetition_penalty): the logit of every token already in
    the prompt or the output is divided by `penalty` where positive, multiplied where negative.
    logits [b, vocab] float32, seen [b, vocab] bool."""
    if penalty == 1.0:
        return logits
    return jnp.where(seen, jnp.where(logits > 0, logits / penalty, logits * penalty), logits)


def _sample(logits: jax.Array, key, temperature: float, top_k: int | None, top_p: float | None) -> jax.Array:
    """Next tokens [b] from logits [b, vocab] (float32)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        drop_sorted = cumulative - jax.nn.softmax(sorted_logits, axis=-1) >= top_p  # keep the smallest nucleus
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@jit_model(static_argnums=(0, 1, 2, 3, 4, 5))
def _generate(model, max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos_ids, tokens, prompt_mask, key,
              model_kwargs):
    b, p = tokens.shape
    total = p + max_new_tokens
    mask = jnp.concatenate([prompt_mask, jnp.ones((b, max_new_tokens), prompt_mask.dtype)], axis=1)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
    cache = KVCache.init(model.config, b, total, dtype=model.dtype)
    logits, cache = model(tokens, positions=positions, attention_mask=mask, cache=cache, **model_kwargs)
    rows = jnp.arange(b)[:, None]
    vocab = logits.shape[-1]
    # tokens seen so far [b, vocab] (the real prompt tokens, not the padding), for the repetition penalty
    seen = jnp.zeros((b, vocab), jnp.int32).at[rows, tokens].max(prompt_mask) > 0
    pick = lambda logits, seen, key: _sample(_penalize(logits.astype(jnp.float32), seen, repetition_penalty), key,
                                             temperature, top_k, top_p)
    key, sub = jax.random.split(key)
    first = pick(logits[:, -1], seen, sub)
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

    def step(carry, _):
        token, pos, cache, done, seen, key = carry
        logits, cache = model(token[:, None], positions=pos[:, None], attention_mask=mask, cache=cache,
                              **model_kwargs)
        seen = seen.at[rows[:, 0], token].set(True)
        key, sub = jax.random.split(key)
        nxt = pick(logits[:, -1], seen, sub)
        return (nxt, pos + 1, cache, done | jnp.isin(token, eos), seen, key), (token, done)

    init = (first, positions[:, -1] + 1, cache, jnp.zeros((b,), bool), seen, key)
    _, (out, finished) = jax.lax.scan(step, init, None, length=max_new_tokens)
    return out.T, finished.T  # [b, max_new_tokens]; finished[i, j]: eos emitted before step j


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float = 1.0, seed: int = 0, eos_ids: Sequence[int] | None = None, pad_id: int = 0,
             width: int | None = None, **model_kwargs) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to `max_new_tokens`; returns the new tokens.

    The HF `generate` equivalent, one compiled program with a KV cache. Generation of a row stops after it
    emits one of `eos_ids`, which is kept at the end of its output.

    Args:
      model: an mwjax causal LM.
      prompts: token ids per prompt, each non-empty (e.g. starting with the bos token); left-padded together.
      max_new_tokens: tokens generated per prompt (>= 1).
      temperature: sampling temperature; 0 is greedy decoding.
      top_k: sample among the k most likely tokens only; None for no limit.
      top_p: nucleus sampling: sample among the smallest set of tokens of probability >= top_p; None for all.
      repetition_penalty: > 1 lowers the tokens already in the prompt or the output before the choice
        (HF `generate(repetition_penalty=)`, vLLM SamplingParams'), greedy or not; 1 for none.
      seed: the sampling PRNG seed.
      eos_ids: tokens that end a row; None for the config's eos token(s).
      pad_id: the token id of the left padding (masked out).
      width: left-pad the prompts to at least that many tokens (one compiled program for a range of prompt
        lengths); None for the longest prompt.
      model_kwargs: passed to every forward step, traced (ffn_masks=, edits=).

    Returns:
      The new token ids per prompt, up to and including the eos token.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. the bos token)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        check_ids(p, model.config.vocab_size, f"prompt {i}")
    if eos_ids is None:
        eos = model.config.eos_token_id
        eos_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    width = max(max(len(p) for p in prompts), width or 0)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    prompt_mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
        prompt_mask[i, width - len(p):] = 1
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    out, finished = _generate(model, max_new_tokens, float(temperature), top_k, top_p, float(repetition_penalty),
                              tuple(eos_ids),
                              jnp.asarray(tokens), jnp.asarray(prompt_mask), jax.random.key(seed),
                              model_kwargs)
    out, finished = np.asarray(out), np.asarray(finished)
    return [row[~done].tolist() for row, done in zip(out, finished, strict=True)]


def generate_many(model: nnx.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, batch_size: int = 8,
                  buckets: Sequence[int] = DEFAULT_BUCKETS, seed: int = 0, desc: str = "generate",
                  **kwargs) -> list[list[int]]:
    """`generate` over any number of prompts, answered in the given order.

    Runs longest first in batches of exactly `batch_size` (the last one filled with copies), each left-padded
    to a bucketed width, so XLA compiles a program per bucket rather than one per prompt length.

    Args:
      model: an mwjax causal LM.
      prompts: token ids per prompt.
      max_new_tokens: tokens generated per prompt.
      batch_size: prompts per compiled batch.
      buckets: the ascending prompt widths (`bucket`); lengths past the largest round up to its multiples.
      seed: batch j samples with seed `seed + j`.
      desc: the progress bar's label.
      kwargs: the other keyword arguments of `generate` (temperature, top_k, eos_ids, model_kwargs, ...).

    Returns:
      The new token ids per prompt, in the order of `prompts`.
    """
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int] | None] = [None] * len(prompts)
    cap = max(buckets[-1], max((len(p) for p in prompts), default=0))
    with progress(len(prompts), desc) as bar:
        for j, start in enumerate(range(0, len(order), batch_size)):
            batch = order[start:start + batch_size]
            rows = [prompts[i] for i in batch]
            rows += [rows[-1]] * (batch_size - len(rows))  # fixed batch: one program
            new = generate(model, rows, max_new_tokens, seed=seed + j, width=bucket(len(rows[0]), buckets, cap),
                           **kwargs)
            for i, tokens in zip(batch, new, strict=False):
                out[i] = tokens
            bar.update(len(batch))
    return out


def generate_text(model: nnx.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32, *,
                  chat: bool = False, **kwargs) -> list[str]:
    """`generate` on text; `chat=True` wraps each prompt as one user turn of the tokenizer's chat template.

    Args:
      model: an mwjax causal LM.
      tokenizer: its HF tokenizer (its eos token ends a row unless `eos_ids` is given; its pad token pads).
      prompts: the prompt texts.
      max_new_tokens: tokens generated per prompt.
      chat: apply the chat template (with the generation prompt) instead of the plain tokenization.
      kwargs: the other keyword arguments of `generate` (temperature, top_k, eos_ids, model_kwargs, ...).

    Returns:
      The decoded continuations (special tokens skipped), one per prompt.
    """
    if chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=False) for p in prompts]
        ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    else:
        ids = [tokenizer(p).input_ids for p in prompts]
    if kwargs.get("eos_ids") is None and tokenizer.eos_token_id is not None:
        kwargs["eos_ids"] = (tokenizer.eos_token_id,)
    outputs = generate(model, ids, max_new_tokens, pad_id=tokenizer.pad_token_id or 0, **kwargs)
    return [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
