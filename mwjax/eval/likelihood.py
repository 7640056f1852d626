"""Perplexity with the protocol of the massive-activations code (used by House of Cards Table 1).

The token stream is cut into consecutive non-overlapping chunks of `seqlen` tokens (a trailing
remainder is dropped), at most `max_chunks` of them; each chunk is scored on its own, every token
but the first predicted from the ones before it, and

    PPL = exp( mean over chunks of the mean next-token NLL within the chunk ),

which equals that code's `exp(sum(loss_i * seqlen) / (n * seqlen))`. `add_bos=True` departs from
it on purpose: each chunk is preceded by the bos token and all `seqlen` chunk tokens are scored
(massive activations sit on the first token, so what occupies position 0 matters).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mwjax.converters.tokens import check_ids
from mwjax.core.compiled import jit_model
from mwjax.core.progress import track


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """What `perplexity` measured: the perplexity, its mean NLL, the NLL of each chunk and the counts."""

    perplexity: float
    mean_nll: float  # mean over chunks of the per-token NLL (nats)
    chunk_nll: tuple[float, ...]  # per chunk, mean per-token NLL
    num_chunks: int
    seqlen: int
    tokens_scored: int

    def to_dict(self):
        """The fields as a dict (`dataclasses.asdict`), for JSON.

        Returns:
          {field name: value}.
        """
        return dataclasses.asdict(self)


def chunk_tokens(token_ids, seqlen: int, max_chunks: int | None = None) -> np.ndarray:
    """Consecutive non-overlapping chunks of a 1-D token stream; a trailing remainder is dropped.

    Args:
      token_ids: the token stream (flattened), int [n].
      seqlen: tokens per chunk (an integer >= 1).
      max_chunks: keep at most this many chunks (an integer >= 1); None for all.

    Returns:
      int32 [num_chunks, seqlen] (ValueError when not even one chunk fits).
    """
    if isinstance(seqlen, bool) or not isinstance(seqlen, int | np.integer) or seqlen < 1:
        raise ValueError(f"seqlen={seqlen!r}: a chunk needs an integer length >= 1")
    if max_chunks is not None and (isinstance(max_chunks, bool) or not isinstance(max_chunks, int | np.integer)
                                   or max_chunks < 1):
        raise ValueError(f"max_chunks={max_chunks!r}: write an integer >= 1, or None for every chunk")
    ids = np.asarray(token_ids, np.int32).reshape(-1)
    n = len(ids) // seqlen
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one chunk of seqlen={seqlen}")
    return ids[: n * seqlen].reshape(n, seqlen)


def sequence_nll(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Mean NLL per sequence of `targets` under `logits` (float32 log-softmax).

    Args:
      logits: [b, t, vocab], already aligned with the targets (position i predicts targets[:, i]).
      targets: int [b, t] token ids.
      weights: [b, t] per-token weights (e.g. a 0/1 mask), giving a weighted mean; None for a plain mean.

    Returns:
      float32 [b] mean NLL (nats).
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    if weights is None:
        return nll.mean(axis=-1)
    return (nll * weights).sum(-1) / jnp.maximum(weights.sum(-1), 1)


@jit_model
def _chunk_nll(model, chunks, bos, model_kwargs):
    if bos is None:
        logits = model(chunks, **model_kwargs)
        return sequence_nll(logits[:, :-1], chunks[:, 1:])
    inputs = jnp.concatenate([jnp.full((chunks.shape[0], 1), bos, chunks.dtype), chunks], axis=1)
    logits = model(inputs, **model_kwargs)
    return sequence_nll(logits[:, :-1], chunks)


def perplexity(model: nnx.Module, token_ids, seqlen: int = 4096, *, max_chunks: int | None = None,
               batch_size: int = 1, add_bos: bool = False, bos_id: int | None = None, progress: bool = True,
               **model_kwargs) -> PerplexityResult:
    """Perplexity of `model` on a token stream (protocol in the module doc), jitted and batched.

    Args:
      model: an mwjax causal LM (HF `LlamaForCausalLM` equivalent).
      token_ids: int [n] token stream (e.g. a `corpora.Corpus`'s token_ids).
      seqlen: tokens per chunk (House of Cards Table 1 uses 4096).
      max_chunks: score at most this many chunks; None for all.
      batch_size: chunks per forward call (the last batch is padded to keep one compiled shape).
      add_bos: put the bos token before every chunk and score all `seqlen` chunk tokens (module doc).
      bos_id: the bos token for add_bos; None for the model config's bos_token_id.
      progress: show a progress bar.
      model_kwargs: passed to every forward call, traced (ffn_masks=, edits=).

    Returns:
      A `PerplexityResult` (perplexity, per-chunk NLL, counts).
    """
    chunks = chunk_tokens(token_ids, seqlen, max_chunks)
    check_ids(chunks, model.config.vocab_size)
    bos = None
    if add_bos:
        bos = bos_id if bos_id is not None else model.config.bos_token_id
        if bos is None:
            raise ValueError("add_bos=True but the model config has no bos_token_id; pass bos_id=")
    split = nnx.split(model)  # once for all batches
    nlls = []
    starts = range(0, len(chunks), batch_size)
    for start in track(starts, len(starts), f"perplexity ({len(chunks)}x{seqlen})", enabled=progress):
        batch = chunks[start:start + batch_size]
        pad = batch_size - len(batch)  # keep one compiled shape: pad the last batch, drop its results
        padded = np.concatenate([batch, np.repeat(batch[-1:], pad, 0)]) if pad else batch
        nll = _chunk_nll.on_state(*split, jnp.asarray(padded), bos, model_kwargs)
        nlls.extend(np.asarray(nll[: len(batch)], np.float64).tolist())
    mean = float(np.mean(nlls))
    return PerplexityResult(perplexity=float(np.exp(mean)), mean_nll=mean, chunk_nll=tuple(nlls),
                            num_chunks=len(chunks), seqlen=seqlen,
                            tokens_scored=len(chunks) * (seqlen if add_bos else seqlen - 1))
