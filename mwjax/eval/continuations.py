"""Log-likelihoods of continuations given contexts, each context computed once for all its continuations.

    scores = score_continuations(model, [(context_tokens, continuation_tokens), ...], batch_size=16)
    # -> [(sum log p(continuation | context), whether every continuation token is the argmax), ...]

Multiple-choice tasks score several continuations of one context (ARC: 4 answers, PIQA: 2 solutions), and
WinoGrande's two contexts, or few-shot prompts, share their beginning. Requests that share so much are one
group: a prefix tree of their inputs (context + continuation but its last token) laid out depth first, each
shared prefix once, and an attention mask lets every token see only the tokens it continues (HF's custom
4-D attention masks; `CausalLM.hidden_states` takes [b, t, t]). Positions are depths in the tree, so each
request is computed exactly as its own sequence `context + continuation`: the same keys and positions, in
float32 up to summation order. The logits are formed only where a continuation token is predicted, not at
every position of every row (the unembedding is a large share of a small model's time: SmolLM2's 49,152-token
vocabulary).

Groups are packed densely into batch rows (several to a row, none seeing another), every row of a call as wide
as one width, the call's cheapest (`layout`): batches are nearly free of padding, and the call compiles one program.
Groups run longest first (as lm-eval sorts). On a model with sliding-window layers a group of several requests
is no longer than the window: the window counts row indices, which agree with positions only in a group the
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

from mwjax.core.compiled import jit_model
from mwjax.core.progress import progress
from mwjax.nn.config import SLIDING_ATTENTION

PICKS_MULTIPLE = 128  # scored positions per batch are padded to a multiple of this
WIDTH_STEPS = 8  # row widths a call weighs (`layout`)


@jit_model
def _score(model, tokens, positions, ends, picks, targets):
    """One forward of packed rows. tokens, positions, ends [b, w]: a row holds prefix trees laid out depth
    first, and token j is seen by the tokens from j up to ends[j] (its subtree: the tokens that continue it);
    picks [p]: flat indices into the b * w row positions whose next-token distribution is scored; targets [p]:
    the token scored there.

    Returns log p(target) [p] (float32) and whether each target is the argmax there [p].
    """
    queries = jnp.arange(tokens.shape[1])[None, :, None]
    visible = queries < ends[:, None, :]  # [b, w (queries), w (keys)], on top of causality
    hidden, _ = model.hidden_states(tokens, positions=positions, attention_mask=visible)
    logits = model.unembed(hidden.reshape(-1, hidden.shape[-1])[picks])  # [p, vocab]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0], jnp.argmax(logits, axis=-1) == targets


@dataclasses.dataclass
class Group:
    """Requests whose inputs (context + continuation without its last token) share prefixes, as one prefix tree
    laid out depth first: each shared prefix once, then what follows it. Indices from the group's first token."""

    tokens: list[int] = dataclasses.field(default_factory=list)
    positions: list[int] = dataclasses.field(default_factory=list)  # depth in the tree: the position alone
    ends: list[int] = dataclasses.field(default_factory=list)  # the index after each token's subtree
    picks: list[int] = dataclasses.field(default_factory=list)
    targets: list[int] = dataclasses.field(default_factory=list)
    requests: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)  # (request, first pick, count)
    path: list[int] = dataclasses.field(default_factory=list)  # indices of the last input's tokens, by depth

    def add(self, request: int, inputs: Sequence[int], shared: int, continuation: Sequence[int]) -> None:
        """Add a request to the tree: the tokens after the prefix it shares with the group's last input.

        Args:
          request: the request's index in the call's pairs.
          inputs: its input tokens (context + continuation but its last token), after the group's last input in
            sorted order.
          shared: how many first tokens of `inputs` repeat the group's last input (0 for a group's first request).
          continuation: its continuation tokens; token k is predicted at input token len(inputs) - len(continuation)
            + k.
        """
        start, new = len(self.tokens), len(inputs) - shared
        for index in self.path[shared:]:  # the last input's subtrees end here
            self.ends[index] = start
        del self.path[shared:]
        self.path += range(start, start + new)
        self.tokens += inputs[shared:]
        self.positions += range(shared, len(inputs))
        self.ends += [-1] * new  # open until an input leaves their subtree
        self.requests.append((request, len(self.picks), len(continuation)))
        self.picks += self.path[len(inputs) - len(continuation):]
        self.targets += continuation

    def close(self) -> Group:
        """End the subtrees still open at the group's last token; returns the group itself."""
        self.ends = [len(self.tokens) if end < 0 else end for end in self.ends]
        self.path = []
        return self


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The requests' inputs (context + continuation but its last token) in sorted order, each with the number
    of tokens it shares with the one before it: what every `pack` of a call's candidate widths starts from."""

    tokens: list[list[int]]  # by request
    order: list[int]  # requests, their inputs sorted
    shared: list[int]  # along `order`

    @classmethod
    def of(cls, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> Inputs:
        """The `Inputs` of (context, continuation) token pairs; every context and continuation needs a token
        (ValueError naming the request otherwise).

        Args:
          pairs: (context tokens, continuation tokens) per request.

        Returns:
          The inputs, sorted, with the tokens each shares with the one before it.
        """
        for i, (context, continuation) in enumerate(pairs):
            if not context or not continuation:
                raise ValueError(f"request {i}: context and continuation need a token each, got {len(context)} "
                                 f"and {len(continuation)} (lm-eval puts the prefix token before an empty context)")
        tokens = [[*context, *continuation[:-1]] for context, continuation in pairs]
        order = sorted(range(len(pairs)), key=tokens.__getitem__)
        shared = [0] + [common_prefix(tokens[a], tokens[b]) for a, b in zip(order, order[1:], strict=False)]
        return cls(tokens, order, shared)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many first tokens a and b share (bisected over slices, which compare in C).

    Args:
      a: a token sequence.
      b: another.

    Returns:
      The length of their common prefix.
    """
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def group_sizes(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], inputs: Inputs, cap: int
                ) -> tuple[list[int], list[int]]:
    """Where the groups start along `inputs.order`, and their token counts.

    A request joins the group of the input before it when it shares its whole context or half of its input with it
    (the choices of a question; WinoGrande's sentences up to the blank; few-shot examples) and the group stays
    within `cap` tokens.

    Args:
      pairs: (context tokens, continuation tokens) per request.
      inputs: the pairs' `Inputs`.
      cap: the most tokens a group of several requests holds.

    Returns:
      (the index along `inputs.order` where each group starts, each group's token count).
    """
    starts: list[int] = []
    sizes: list[int] = []
    for k, (i, shared) in enumerate(zip(inputs.order, inputs.shared, strict=True)):
        length = len(inputs.tokens[i])
        if sizes and shared >= min(len(pairs[i][0]), length / 2) and sizes[-1] + length - shared <= cap:
            sizes[-1] += length - shared
        else:
            starts.append(k)
            sizes.append(length)
    return starts, sizes


def pack(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], width: int, limit: int,
         inputs: Inputs | None = None) -> list[Group]:
    """Prefix-tree groups of the (context, continuation) token pairs (`group_sizes`), longest first.

    A group stays within `width` and `limit` tokens, and a request longer than that is a group alone.

    Args:
      pairs: (context tokens, continuation tokens) per request.
      width: the row width.
      limit: the longest group (`row_limit`).
      inputs: the pairs' `Inputs`, when the caller has them (it packs at several widths); None builds them.

    Returns:
      The closed `Group`s, the most tokens first.
    """
    inputs = inputs or Inputs.of(pairs)
    starts = set(group_sizes(pairs, inputs, min(width, limit))[0])
    groups: list[Group] = []
    for k, (i, shared) in enumerate(zip(inputs.order, inputs.shared, strict=True)):
        if k in starts:
            groups.append(Group())
            shared = 0
        groups[-1].add(i, inputs.tokens[i], shared, list(pairs[i][1]))
    return sorted((group.close() for group in groups), key=lambda group: -len(group.tokens))


def row_limit(config, max_length: int) -> int:
    """The longest group: the model's window, and a sliding window's length where the model has one (index
    distances in a group exceed position distances; a group no longer than the window is never cut).

    Args:
      config: the model's `ModelConfig` (`layer_types`, `sliding_window`).
      max_length: the model's window.

    Returns:
      The most tokens a group may hold.
    """
    if SLIDING_ATTENTION in config.layer_types and config.sliding_window:
        return min(max_length, config.sliding_window)
    return max_length


def fill_rows(sizes: Sequence[int], width: int) -> list[list[int]]:
    """Groups into rows of at most `width` tokens, each into the fullest row it fits (best fit decreasing).

    The rows come out nearly full, so little of a batch is padding. ValueError when a group is wider than a row.

    Args:
      sizes: the groups' token counts, longest first.
      width: the row width.

    Returns:
      Each row's groups, as indices into `sizes`.
    """
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, row), sorted
    for group, n in enumerate(sizes):
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


def key_cost(config) -> float:
    """What one key costs a query in attention (scores and weighted values: 4 h d_head FLOPs), over what the
    query's token costs in the layer's matmuls (2 x their weights): how much each token of a wider row pays.

    Args:
      config: the model's `ModelConfig` (heads, head_dim, hidden, intermediate and expert sizes).

    Returns:
      The ratio, per key.
    """
    q, kv = (n * config.head_dim for n in (config.num_attention_heads, config.num_key_value_heads))
    ffn = 3 * config.intermediate_size * (config.num_experts_per_tok or 1)
    return 2 * q / (config.hidden_size * (2 * q + 2 * kv + ffn))


def layout(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, limit: int, batch_size: int, max_length: int,
           key_cost: float) -> tuple[list[list[Group]], int, int]:
    """The call's rows, their width and the rows in each batch.

    Of the widths from the longest input's (rounded up to a multiple of 16) to twice that (at most `max_length`),
    in about WIDTH_STEPS steps, the one whose batches cost the least: slots x (1 + key_cost x width), padding
    included (batches hold as many rows each, at most batch_size).

    Args:
      pairs: (context tokens, continuation tokens) per request.
      limit: the longest group (`row_limit`).
      batch_size: the most rows per batch.
      max_length: the model's window: the widest row.
      key_cost: the attention cost of a key relative to a token's matmuls (`key_cost`).

    Returns:
      (rows, each a list of `Group`s; the row width; rows per batch).
    """
    inputs = Inputs.of(pairs)
    longest = max(map(len, inputs.tokens))
    first = min(-(-longest // 16) * 16, max_length)
    step = 16 * -(-first // (16 * WIDTH_STEPS))
    best = None
    for width in range(first, min(2 * first, max_length) + 1, step):  # group sizes alone: the groups once, below
        rows = fill_rows(sorted(group_sizes(pairs, inputs, min(width, limit))[1], reverse=True), width)
        batches = -(-len(rows) // batch_size)
        per_batch = -(-len(rows) // batches)
        cost = batches * per_batch * width * (1 + key_cost * width)
        if best is None or cost < best[0]:
            best = cost, rows, width, per_batch
    _, rows, width, per_batch = best
    groups = pack(pairs, width, limit, inputs)  # sorted as the sizes were (both sorts are stable)
    return [[groups[g] for g in row] for row in rows], width, per_batch


def balanced_batches(rows: Sequence[Sequence[Group]], per_batch: int) -> list[list[Sequence[Group]]]:
    """The rows in batches of at most `per_batch`, their scored positions spread evenly.

    Every batch of a call pads its scored positions to its fullest batch's, so the rows with the most picks go
    first, each into the batch with the fewest picks that has room. Sorted longest first, the rows would leave the
    long contexts with one pick per answer (BoolQ) in the first batches and the short multiple-choice trees in the
    last.

    Args:
      rows: the rows from `layout`, each a list of `Group`s.
      per_batch: the most rows per batch.

    Returns:
      ceil(len(rows) / per_batch) batches, each a list of rows.
    """
    batches: list[list[Sequence[Group]]] = [[] for _ in range(-(-len(rows) // per_batch))]
    picks = [0] * len(batches)
    for row, count in sorted(((row, sum(len(group.picks) for group in row)) for row in rows), key=lambda x: -x[1]):
        at = min((b for b in range(len(batches)) if len(batches[b]) < per_batch), key=picks.__getitem__)
        batches[at].append(row)
        picks[at] += count
    return batches


def _batch_arrays(rows: Sequence[Sequence[Group]], batch_size: int, width: int, n_picks: int
                  ) -> tuple[dict[str, np.ndarray], list[tuple[int, int, int]]]:
    """`_score`'s inputs for one batch of rows (a padding token is seen by itself only; padded picks score
    position 0), and (request, first flat pick, count) of every request in it."""
    arrays = {name: np.zeros((batch_size, width), np.int32) for name in ("tokens", "positions")}
    arrays["ends"] = np.broadcast_to(np.arange(1, width + 1, dtype=np.int32), (batch_size, width)).copy()
    picks, targets, requests = np.zeros(n_picks, np.int32), np.zeros(n_picks, np.int32), []
    p = 0
    for r, row in enumerate(rows):
        start = 0
        for group in row:
            span = slice(start, start + len(group.tokens))
            arrays["tokens"][r, span] = group.tokens
            arrays["positions"][r, span] = group.positions
            arrays["ends"][r, span] = start + np.asarray(group.ends)
            count = len(group.picks)
            picks[p:p + count] = r * width + start + np.asarray(group.picks)
            targets[p:p + count] = group.targets
            requests += [(i, p + first, n) for i, first, n in group.requests]
            start, p = span.stop, p + count
    return arrays | {"picks": picks, "targets": targets}, requests


def score_pairs(graphdef, state, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, config,
                batch_size: int, max_length: int, on_result: Callable[[int, tuple[float, bool]], None] | None = None,
                desc: str = "loglikelihood", show_progress: bool = True) -> list[tuple[float, bool]]:
    """(sum log p, is_greedy) of every (context, continuation) token pair, in order.

    The pairs' prefix-tree groups (`pack`) fill rows of one width (`layout`); batches of as many rows each, at
    most `batch_size`, share one number of scored positions, so the whole call is one compiled program.

    Args:
      graphdef: the model's graph definition (`nnx.split(model)`).
      state: the model's state (`nnx.split(model)`).
      pairs: (context tokens, continuation tokens) per request; each input (context + continuation but its last
        token) at most `max_length` tokens.
      config: the model's `ModelConfig` (its window and attention cost).
      batch_size: the most rows per forward pass.
      max_length: the model's window: the widest row.
      on_result: called as `on_result(i, result)` as each request's result comes (lm-eval's cache hook).
      desc: the progress bar's label.
      show_progress: show the progress bar.

    Returns:
      One (sum of the continuation's log-probabilities, whether every continuation token is the argmax) per pair.
    """
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    if not pairs:
        return results
    rows, width, per_batch = layout(pairs, limit=row_limit(config, max_length), batch_size=batch_size,
                                    max_length=max_length, key_cost=key_cost(config))
    batches = balanced_batches(rows, per_batch)
    most = max(sum(len(group.picks) for row in batch for group in row) for batch in batches)
    n_picks = -(-most // PICKS_MULTIPLE) * PICKS_MULTIPLE  # the call's one program fixes it: no bucket needed
    with progress(len(pairs), desc, enabled=show_progress) as bar:
        for batch in batches:
            arrays, requests = _batch_arrays(batch, per_batch, width, n_picks)
            logp, greedy = (np.asarray(x) for x in _score.on_state(graphdef, state, *map(jnp.asarray, (
                arrays["tokens"], arrays["positions"], arrays["ends"], arrays["picks"], arrays["targets"]))))
            for i, first, count in requests:
                picked = slice(first, first + count)
                results[i] = (float(logp[picked].astype(np.float64).sum()), bool(greedy[picked].all()))
                if on_result is not None:
                    on_result(i, results[i])
            bar.update(len(requests))
    return results


def score_continuations(model: nnx.Module, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                        batch_size: int = 16, max_length: int | None = None,
                        show_progress: bool = True) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), is_greedy) of each (context, continuation) token pair (HF: the
    continuation's summed log-softmax, as lm-eval's `loglikelihood`).

    Args:
      model: an mwjax causal LM.
      pairs: (context tokens, continuation tokens) per request, each non-empty; a pair holds at most
        `max_length` + 1 tokens (ValueError otherwise: truncate the context on the left first).
      batch_size: the most rows per forward pass.
      max_length: the model's window (default: its `max_position_embeddings`).
      show_progress: show a progress bar.

    Returns:
      One (sum of the continuation's log-probabilities, whether every continuation token is the argmax) per pair.
    """
    max_length = int(max_length or model.config.max_position_embeddings)
    for i, (context, continuation) in enumerate(pairs):
        if len(context) + len(continuation) > max_length + 1:
            raise ValueError(f"pair {i}: context + continuation is {len(context) + len(continuation)} tokens, "
                             f"over max_length + 1 = {max_length + 1}: truncate the context on the left first")
    return score_pairs(*nnx.split(model), pairs, config=model.config, batch_size=batch_size, max_length=max_length,
                       show_progress=show_progress)
