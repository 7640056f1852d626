"""Log-likelihoods of continuations given contexts, each context computed once for all its continuations.

    scores = score_continuations(model, [(context_tokens, continuation_tokens), ...], batch_size=16)
    # -> [(sum log p(continuation | context), whether every continuation token is the argmax), ...]

Multiple-choice tasks score several continuations of one context (ARC: 4 answers, PIQA: 2 solutions). Each
context is packed once into a group, followed by the continuations of it (each but its last token, which is
only a target), and a per-query attention mask lets every continuation see the context and itself only
(HF's custom 4-D attention masks; `CausalLM.hidden_states` takes [b, t, t]). Positions restart after
the context for every continuation, so each continuation is computed exactly as in its own sequence
`context + continuation`: the same keys and positions, in float32 up to summation order. The logits are
formed only where a continuation token is predicted, not at every position of every row (the
unembedding is a large share of a small model's time: SmolLM2's 49,152-token vocabulary).

Groups are packed densely into batch rows (several groups to a row, none seeing another), all rows of a call
as wide as the bucket of its longest group: batches are nearly free of padding, and the call compiles one
program. Groups are formed longest first (as lm-eval sorts). A group holds at most as many continuations as
its context has tokens (its scored positions then fit in it) and, on a model with sliding-window layers, is
no longer than the window: the window counts row indices, which agree with positions only in a group the
window cannot cut.
"""

from __future__ import annotations

import bisect
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

PICKS_MULTIPLE = 128  # scored positions per batch are padded to a multiple of this
CONTEXT = 0  # segment id of a group's context; continuation k (from 1) is segment k. Padding is group 0


@jit_model
def _score(model, tokens, positions, groups, segments, picks, targets):
    """One forward of packed rows. tokens, positions, groups, segments [b, w]; picks [p]: flat indices into the
    b * w row positions whose next-token distribution is scored; targets [p]: the token scored there.

    Returns log p(target) [p] (float32) and whether each target is the argmax there [p].
    """
    same_group = groups[:, None, :] == groups[:, :, None]  # [b, w (queries), w (keys)]
    keys, queries = segments[:, None, :], segments[:, :, None]
    visible = same_group & ((keys == CONTEXT) | (keys == queries))  # on top of causality
    hidden, _ = model.hidden_states(tokens, positions=positions, attention_mask=visible)
    logits = model.unembed(hidden.reshape(-1, hidden.shape[-1])[picks])  # [p, vocab]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0], jnp.argmax(logits, axis=-1) == targets


@dataclasses.dataclass
class Group:
    """One context and some of its continuations, packed (indices from the group's first token): a share of
    a batch row that `_score` reads."""

    context_length: int
    tokens: list[int]
    positions: list[int]
    segments: list[int]
    picks: list[int] = dataclasses.field(default_factory=list)
    targets: list[int] = dataclasses.field(default_factory=list)
    requests: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)  # (request, first pick, count)

    @classmethod
    def of_context(cls, context: Sequence[int]) -> Group:
        return cls(len(context), list(context), list(range(len(context))), [CONTEXT] * len(context))

    def fits(self, continuation: Sequence[int], limit: int) -> bool:
        """Whether the continuation joins this group: a group takes its first continuation always (the request
        alone), further ones while the group stays within `limit` tokens and its context's length."""
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


def pack(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], limit: int) -> list[Group]:
    """Groups of (context, continuation) token pairs, each context once per group, longest group first. Every
    context and continuation needs a token; a group with more than one continuation stays within `limit` tokens."""
    by_context: dict[tuple[int, ...], list[Group]] = {}
    for i, (context, continuation) in enumerate(pairs):
        if not context or not continuation:
            raise ValueError(f"request {i}: context and continuation need a token each, got {len(context)} "
                             f"and {len(continuation)} (lm-eval puts the prefix token before an empty context)")
        groups = by_context.setdefault(tuple(context), [])
        if not groups or not groups[-1].fits(continuation, limit):
            groups.append(Group.of_context(context))
        groups[-1].add(i, list(continuation))
    return sorted((group for groups in by_context.values() for group in groups), key=lambda g: -len(g.tokens))


def row_limit(config, max_length: int) -> int:
    """The longest group: the model's window, and a sliding window's length where the model has one (index
    distances in a group exceed position distances; a group no longer than the window is never cut)."""
    if SLIDING_ATTENTION in config.layer_types and config.sliding_window:
        return min(max_length, config.sliding_window)
    return max_length


def fill_rows(groups: Sequence[Group], width: int) -> list[list[Group]]:
    """Groups (longest first) into rows of at most `width` tokens, each into the fullest row it fits (best fit
    decreasing): the rows come out nearly full, so little of a batch is padding."""
    rows: list[list[Group]] = []
    room: list[tuple[int, int]] = []  # (tokens left, row), sorted
    for group in groups:
        n = len(group.tokens)
        if n > width:
            raise ValueError(f"a group of {n} tokens does not fit rows of {width}")
        at = bisect.bisect_left(room, (n, -1))
        if at == len(room):
            rows.append([group])
            left, row = width - n, len(rows) - 1
        else:
            left, row = room.pop(at)
            rows[row].append(group)
            left -= n
        if left:
            bisect.insort(room, (left, row))
    return rows


def _batch_arrays(rows: Sequence[Sequence[Group]], batch_size: int, width: int, n_picks: int
                  ) -> tuple[dict[str, np.ndarray], list[tuple[int, int, int]]]:
    """`_score`'s inputs for one batch of rows (padding: group 0, and scored picks of position 0), and
    (request, first flat pick, count) of every request in it."""
    arrays = {name: np.zeros((batch_size, width), np.int32) for name in ("tokens", "positions", "groups", "segments")}
    picks, targets, requests = np.zeros(n_picks, np.int32), np.zeros(n_picks, np.int32), []
    p = 0
    for r, row in enumerate(rows):
        start = 0
        for g, group in enumerate(row, 1):
            span = slice(start, start + len(group.tokens))
            arrays["tokens"][r, span] = group.tokens
            arrays["positions"][r, span] = group.positions
            arrays["segments"][r, span] = group.segments
            arrays["groups"][r, span] = g
            count = len(group.picks)
            picks[p:p + count] = r * width + start + np.asarray(group.picks)
            targets[p:p + count] = group.targets
            requests += [(i, p + first, n) for i, first, n in group.requests]
            start, p = span.stop, p + count
    return arrays | {"picks": picks, "targets": targets}, requests


def score_rows(graphdef, state, groups: Sequence[Group], n_requests: int, *, batch_size: int,
               buckets: Sequence[int] = DEFAULT_BUCKETS, max_length: int,
               on_result: Callable[[int, tuple[float, bool]], None] | None = None,
               desc: str = "loglikelihood", show_progress: bool = True) -> list[tuple[float, bool]]:
    """(sum log p, is_greedy) of every request in `groups` (from `pack`), in request order; `on_result(i, result)`
    as each comes (lm-eval's cache hook).

    The groups fill rows as wide as the longest group's bucket; batches of at most `batch_size` rows (as many
    in each) share one number of scored positions, so the whole call is one compiled program.
    """
    results: list[tuple[float, bool] | None] = [None] * n_requests
    if not groups:
        return results
    width = bucket(max(len(group.tokens) for group in groups), buckets, max_length)
    rows = fill_rows(groups, width)
    per_batch = -(-len(rows) // -(-len(rows) // batch_size))  # as few batches as batch_size allows, evened out
    batches = [rows[start:start + per_batch] for start in range(0, len(rows), per_batch)]
    most = max(sum(len(group.picks) for row in batch for group in row) for batch in batches)
    n_picks = -(-most // PICKS_MULTIPLE) * PICKS_MULTIPLE  # the call's one program fixes it: no bucket needed
    with progress(n_requests, desc, enabled=show_progress) as bar:
        for batch in batches:
            arrays, requests = _batch_arrays(batch, per_batch, width, n_picks)
            logp, greedy = (np.asarray(x) for x in _score.on_state(graphdef, state, *map(jnp.asarray, (
                arrays["tokens"], arrays["positions"], arrays["groups"], arrays["segments"], arrays["picks"],
                arrays["targets"]))))
            for i, first, count in requests:
                picked = slice(first, first + count)
                results[i] = (float(logp[picked].astype(np.float64).sum()), bool(greedy[picked].all()))
                if on_result is not None:
                    on_result(i, results[i])
            bar.update(len(requests))
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
    groups = pack(pairs, row_limit(model.config, max_length))
    return score_rows(*nnx.split(model), groups, len(pairs), batch_size=batch_size, buckets=buckets,
                      max_length=max_length, show_progress=show_progress)
