"""Log-likelihoods of continuations given contexts, each context computed once for all its continuations.

    scores = score_continuations(model, [(context_tokens, continuation_tokens), ...], batch_size=16)
    # -> [(sum log p(continuation | context), whether every continuation token is the argmax), ...]

Multiple-choice tasks score several continuations of one context (ARC: 4 answers, PIQA: 2 solutions). Each
context is packed once into a row, followed by the continuations of it (each but its last token, which is
only a target), and a per-query attention mask lets every continuation see the context and itself only
(HF's custom 4-D attention masks; `CausalLM.hidden_states` takes [b, t, t]). Positions restart after
the context for every continuation, so each continuation is computed exactly as in its own sequence
`context + continuation`: the same keys and positions, in float32 up to summation order. The logits are
formed only where a continuation token is predicted, not at every position of every row (the
unembedding is a large share of a small model's time: SmolLM2's 49,152-token vocabulary).

Rows run longest first (as lm-eval sorts), a fixed number per batch, padded to a few bucketed widths, so
XLA compiles a handful of programs. A row holds at most as many continuations as its context has tokens
(its scored positions then fit its width) and, on a model with sliding-window layers, is no longer than
the window: the window counts row indices, which agree with positions only in a row the window cannot cut.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mwjax.compiled import jit_model
from mwjax.config import SLIDING_ATTENTION
from mwjax.eval.generate import DEFAULT_BUCKETS, bucket
from mwjax.progress import progress

CONTEXT, PADDING = 0, -1  # segment ids of a row's context and padding; continuation k (from 1) is segment k


@jit_model
def _score(model, tokens, positions, segments, picks, targets):
    """One forward of packed rows. tokens, positions, segments [b, w]; picks [b, p]: the row indices whose
    next-token distribution is scored; targets [b, p]: the token scored there.

    Returns log p(target) [b, p] (float32) and whether each target is the argmax there [b, p].
    """
    keys, queries = segments[:, None, :], segments[:, :, None]
    visible = (keys != PADDING) & ((keys == CONTEXT) | (keys == queries))  # [b, w, w]: on top of causality
    hidden, _ = model.hidden_states(tokens, positions=positions, attention_mask=visible)
    logits = model.unembed(jnp.take_along_axis(hidden, picks[..., None], axis=1))  # [b, p, vocab]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], jnp.argmax(logits, axis=-1) == targets


@dataclasses.dataclass
class Row:
    """One context and some of its continuations, packed: what `_score` reads of one batch row."""

    context_length: int
    tokens: list[int]
    positions: list[int]
    segments: list[int]
    picks: list[int] = dataclasses.field(default_factory=list)
    targets: list[int] = dataclasses.field(default_factory=list)
    requests: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)  # (request, first pick, count)

    @classmethod
    def of_context(cls, context: Sequence[int]) -> Row:
        return cls(len(context), list(context), list(range(len(context))), [CONTEXT] * len(context))

    def fits(self, continuation: Sequence[int], limit: int) -> bool:
        """Whether the continuation joins this row: a row takes its first continuation always (the request
        alone), further ones while the row stays within `limit` tokens and its context's length."""
        if not self.requests:
            return True
        return (len(self.tokens) + len(continuation) - 1 <= limit
                and len(self.requests) < self.context_length)

    def add(self, request: int, continuation: Sequence[int]) -> None:
        """Continuation token j is predicted at the context's last token (j = 0) or at token j - 1 of its own
        segment, whose position is the context length + j - 1, as in `context + continuation` alone."""
        c, start = self.context_length, len(self.tokens)
        self.requests.append((request, len(self.picks), len(continuation)))
        self.picks += [c - 1, *range(start, start + len(continuation) - 1)]
        self.targets += continuation
        self.tokens += continuation[:-1]
        self.positions += range(c, c + len(continuation) - 1)
        self.segments += [len(self.requests)] * (len(continuation) - 1)


def pack(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], limit: int) -> list[Row]:
    """Rows of (context, continuation) token pairs, each context once per row, longest row first. Every
    context and continuation needs a token; a row with more than one continuation stays within `limit` tokens."""
    by_context: dict[tuple[int, ...], list[Row]] = {}
    for i, (context, continuation) in enumerate(pairs):
        if not context or not continuation:
            raise ValueError(f"request {i}: context and continuation need a token each, got {len(context)} "
                             f"and {len(continuation)} (lm-eval puts the prefix token before an empty context)")
        rows = by_context.setdefault(tuple(context), [])
        if not rows or not rows[-1].fits(continuation, limit):
            rows.append(Row.of_context(context))
        rows[-1].add(i, list(continuation))
    return sorted((row for rows in by_context.values() for row in rows), key=lambda row: -len(row.tokens))


def row_limit(config, max_length: int) -> int:
    """The longest row: the model's window, and a sliding window's length where the model has one (index
    distances in a packed row exceed position distances; a row no longer than the window is never cut)."""
    if SLIDING_ATTENTION in config.layer_types and config.sliding_window:
        return min(max_length, config.sliding_window)
    return max_length


def score_rows(graphdef, state, rows: Sequence[Row], n_requests: int, *, batch_size: int,
               buckets: Sequence[int] = DEFAULT_BUCKETS, max_length: int,
               on_result: Callable[[int, tuple[float, bool]], None] | None = None,
               desc: str = "loglikelihood", show_progress: bool = True) -> list[tuple[float, bool]]:
    """(sum log p, is_greedy) of every request in `rows` (from `pack`), in request order; `on_result(i, result)`
    as each comes (lm-eval's cache hook). Batches of `batch_size` rows, `bucket`ed width and scored positions."""
    results: list[tuple[float, bool] | None] = [None] * n_requests
    with progress(n_requests, desc, enabled=show_progress) as bar:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            width = bucket(len(batch[0].tokens), buckets, max_length)
            scored = bucket(max(len(row.picks) for row in batch), buckets, width)
            arrays = {name: np.zeros((batch_size, size), np.int32) for name, size in
                      (("tokens", width), ("positions", width), ("segments", width), ("picks", scored),
                       ("targets", scored))}
            arrays["segments"][:] = PADDING
            for r, row in enumerate(batch):
                for name, array in arrays.items():
                    values = getattr(row, name)
                    array[r, :len(values)] = values
            logp, greedy = (np.asarray(x) for x in _score.on_state(graphdef, state, *map(jnp.asarray, (
                arrays["tokens"], arrays["positions"], arrays["segments"], arrays["picks"], arrays["targets"]))))
            for r, row in enumerate(batch):
                for i, first, count in row.requests:
                    picked = slice(first, first + count)
                    results[i] = (float(logp[r, picked].astype(np.float64).sum()), bool(greedy[r, picked].all()))
                    if on_result is not None:
                        on_result(i, results[i])
                bar.update(len(row.requests))
    return results


def score_continuations(model: nnx.Module, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                        batch_size: int = 16, buckets: Sequence[int] = DEFAULT_BUCKETS,
                        max_length: int | None = None, show_progress: bool = True) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), is_greedy) of each (context, continuation) token pair (HF: the
    continuation's summed log-softmax, as lm-eval's `loglikelihood`). Pairs must fit `max_length` + 1 tokens
    (default: the model's `max_position_embeddings`)."""
    max_length = int(max_length or model.config.max_position_embeddings)
    for i, (context, continuation) in enumerate(pairs):
        if len(context) + len(continuation) > max_length + 1:
            raise ValueError(f"pair {i}: context + continuation is {len(context) + len(continuation)} tokens, "
                             f"over max_length + 1 = {max_length + 1}: truncate the context on the left first")
    rows = pack(pairs, row_limit(model.config, max_length))
    return score_rows(*nnx.split(model), rows, len(pairs), batch_size=batch_size, buckets=buckets,
                      max_length=max_length, show_progress=show_progress)
