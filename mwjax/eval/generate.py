"""Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p), one compiled program.

Prompts of different lengths are left-padded; positions count real tokens only (as HF `generate`
derives them from the attention mask), so a padded prompt continues exactly as it would alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mwjax.compiled import jit_model
from mwjax.models.cache import KVCache


def _sample(logits: jax.Array, key, temperature: float, top_k: int | None, top_p: float | None) -> jax.Array:
    """Next tokens [b] from logits [b, vocab]."""
    logits = logits.astype(jnp.float32)
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


@jit_model(static_argnums=(0, 1, 2, 3, 4))
def _generate(model, max_new_tokens, temperature, top_k, top_p, eos_ids, tokens, prompt_mask, key, model_kwargs):
    b, p = tokens.shape
    total = p + max_new_tokens
    mask = jnp.concatenate([prompt_mask, jnp.ones((b, max_new_tokens), prompt_mask.dtype)], axis=1)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
    cache = KVCache.init(model.config, b, total, dtype=model.dtype)
    logits, cache = model(tokens, positions=positions, attention_mask=mask, cache=cache, **model_kwargs)
    key, sub = jax.random.split(key)
    first = _sample(logits[:, -1], sub, temperature, top_k, top_p)
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

    def step(carry, _):
        token, pos, cache, done, key = carry
        logits, cache = model(token[:, None], positions=pos[:, None], attention_mask=mask, cache=cache,
                              **model_kwargs)
        key, sub = jax.random.split(key)
        nxt = _sample(logits[:, -1], sub, temperature, top_k, top_p)
        return (nxt, pos + 1, cache, done | jnp.isin(token, eos), key), (token, done)

    init = (first, positions[:, -1] + 1, cache, jnp.zeros((b,), bool), key)
    _, (out, finished) = jax.lax.scan(step, init, None, length=max_new_tokens)
    return out.T, finished.T  # [b, max_new_tokens]; finished[i, j]: eos emitted before step j


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_ids: Sequence[int] | None = None, pad_id: int = 0, width: int | None = None,
             **model_kwargs) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to `max_new_tokens`; returns the new tokens.

    temperature 0 is greedy decoding. Generation of a row stops after it emits one of `eos_ids`
    (default: the config's eos token), which is kept at the end of its output. `width` left-pads
    the prompts to at least that many tokens (one compiled program for a range of prompt lengths).
    model_kwargs (ffn_masks=, edits=) apply to every step.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. the bos token)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if eos_ids is None:
        eos = model.config.eos_token_id
        eos_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    width = max(max(len(p) for p in prompts), width or 0)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    prompt_mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
        prompt_mask[i, width - len(p):] = 1
    out, finished = _generate(model, max_new_tokens, float(temperature), top_k, top_p, tuple(eos_ids),
                              jnp.asarray(tokens), jnp.asarray(prompt_mask), jax.random.key(seed), model_kwargs)
    out, finished = np.asarray(out), np.asarray(finished)
    return [row[~done].tolist() for row, done in zip(out, finished, strict=True)]


def generate_text(model: nnx.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32, *,
                  chat: bool = False, **kwargs) -> list[str]:
    """`generate` on text; `chat=True` wraps each prompt as one user turn of the tokenizer's chat template."""
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
