"""Next-token cross-entropy for training, whole or in sequence chunks.

`token_loss` takes logits [b, t, V]; `chunked_token_loss` takes the final hidden states [b, t, d] (after
the final norm: `CausalLM.hidden_states`) and the model's `unembed`, and computes the logits of
`chunk` positions at a time in a `lax.scan`, each chunk rematerialised in the backward pass
(`jax.checkpoint`), so the float32 [b, t, V] logits and their gradient never exist at once: at most
[b, chunk, V]. Both return (sum of the NLL over label tokens, their count): the trainer divides by the
count of the whole step (token-weighted over micro-batches and devices). Labels equal to IGNORE (HF's
-100) carry no loss.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

IGNORE = -100  # label of positions without loss (prompt, padding), as HF / LLaMA-Factory


def _nll(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p(target), count of targets != IGNORE); logits [b, n, V] aligned with targets [b, n]."""
    valid = targets != IGNORE
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)


def token_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Next-token NLL over label tokens (HF `LlamaForCausalLM`'s shifted loss, summed rather than averaged).

    Args:
      logits: [b, t, V]; position t predicts labels[t + 1].
      labels: int [b, t], aligned with the inputs; IGNORE (-100) carries no loss.

    Returns:
      (float32 [] sum of the NLL over label tokens, int [] their count).
    """
    return _nll(logits[:, :-1], labels[:, 1:])


def chunked_token_loss(unembed: Callable[[jax.Array], jax.Array], hidden: jax.Array, labels: jax.Array,
                       chunk: int) -> tuple[jax.Array, jax.Array]:
    """`token_loss(unembed(hidden), labels)` without the [b, t, V] logits: `chunk` positions at a time.

    The last chunk is padded with IGNORE labels when `chunk` does not divide t - 1.

    Args:
      unembed: final hidden [b, c, d] -> logits [b, c, V] (`CausalLM.unembed`: lm_head or the tied
        embedding, and Gemma 2's final soft-capping).
      hidden: final hidden states [b, t, d] (after the final norm).
      labels: int [b, t], aligned with the inputs; IGNORE (-100) carries no loss.
      chunk: positions per chunk (>= 1; `TrainConfig.loss_chunk`).

    Returns:
      (float32 [] sum of the NLL over label tokens, int32 [] their count), as `token_loss`.
    """
    if chunk < 1:
        raise ValueError(f"the loss chunk must be >= 1 positions, got {chunk}")
    h, targets = hidden[:, :-1], labels[:, 1:]
    b, n, d = h.shape
    chunks = -(-n // chunk)
    pad = chunks * chunk - n
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, chunks, chunk, d).swapaxes(0, 1)  # [chunks, b, c, d]
    targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE).reshape(b, chunks, chunk).swapaxes(0, 1)

    @jax.checkpoint  # the backward recomputes each chunk's logits instead of keeping them
    def one(h, targets):
        return _nll(unembed(h), targets)

    def step(carry, xs):
        total, count = one(*xs)
        return (carry[0] + total, carry[1] + count), None

    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    (total, count), _ = jax.lax.scan(step, init, (h, targets))
    return total, count
