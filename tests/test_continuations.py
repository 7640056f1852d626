"""Continuations packed after their shared context score as each (context + continuation) alone."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from hf_reference import TINY_CONFIGS, assert_close_to_scale

from mwjax import models
from mwjax.eval import continuations
from mwjax.families.hf_config import read_hf_config


def tiny_model(name: str):
    """A random model of one of the tiny configs, its weights scaled up so that attention is far from uniform
    (a continuation seeing a token it should not changes its scores)."""
    cls_name, kwargs = TINY_CONFIGS[name]
    model = models.build(read_hf_config(getattr(transformers, cls_name)(**kwargs).to_dict()), seed=0)
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x * 4.0, state))


def alone(model, pairs):
    """(sum log p, is_greedy) of each pair from one forward of `context + continuation`, right-padded."""
    width = max(len(c) + len(x) for c, x in pairs)
    tokens = np.zeros((len(pairs), width), np.int32)
    for i, (c, x) in enumerate(pairs):
        tokens[i, :len(c) + len(x)] = [*c, *x]
    logp = np.asarray(jax.nn.log_softmax(models.forward(model, jnp.asarray(tokens)), axis=-1), np.float64)
    out = []
    for i, (c, x) in enumerate(pairs):
        at = np.arange(len(c) - 1, len(c) + len(x) - 1)  # the positions that predict the continuation
        out.append((logp[i, at, x].sum(), bool((logp[i, at].argmax(-1) == x).all())))
    return out


def requests(rng, vocab, contexts, choices):
    pairs = []
    for n in contexts:
        context = rng.integers(0, vocab, n).tolist()
        for _ in range(choices):
            pairs.append((context, rng.integers(0, vocab, rng.integers(1, 7)).tolist()))
    return pairs


def assert_same(got, ref):
    assert_close_to_scale([g[0] for g in got], [r[0] for r in ref], 1e-5, what="summed log p")
    assert [g[1] for g in got] == [r[1] for r in ref]


def test_shared_contexts_score_as_each_request_alone():
    model = tiny_model("llama_gqa")
    rng = np.random.default_rng(0)
    pairs = requests(rng, 160, contexts=(1, 2, 5, 13, 30), choices=4)
    pairs += [pairs[9], (pairs[9][0][:-1], pairs[9][1])]  # a repeated request; a context that is a prefix of one
    greedy = int(np.argmax(models.forward(model, jnp.asarray([[5, 9, 2]]))[0, -1]))
    pairs.append(([5, 9, 2], [greedy]))  # the model's own argmax: is_greedy
    got = continuations.score_continuations(model, pairs, batch_size=4, show_progress=False)
    ref = alone(model, pairs)
    assert_same(got, ref)
    assert got[-1][1]
    assert len(continuations.pack(pairs, 64, 1024)) == 6  # one per context (a 4-token prefix joins one) and [5, 9, 2]
    rows, _, _ = continuations.layout(pairs, limit=1024, batch_size=4, max_length=1024,
                                      key_cost=continuations.key_cost(model.config))
    assert max(len(row) for row in rows) > 1  # groups shared rows in the run above


def test_layout_weighs_padding_against_wider_rows():
    """Six 40-token requests, at most 4 rows a batch: rows of 48 (the longest rounded up) take one request each,
    2 batches of 3 rows (288 slots, 48 of them padding); rows of 80 take two, one batch of 3 rows (240 slots, no
    padding). The attention's cost per key decides between fewer slots and narrower rows."""
    pairs = [([i] * 39, [i, i]) for i in range(1, 7)]
    cheapest = lambda cost: continuations.layout(pairs, limit=1024, batch_size=4, max_length=1024, key_cost=cost)
    rows, width, per_batch = cheapest(0.0)
    assert (width, per_batch, [len(row) for row in rows]) == (80, 3, [2, 2, 2])
    rows, width, per_batch = cheapest(0.1)  # 288 x (1 + 4.8) < 240 x (1 + 8)
    assert (width, per_batch, len(rows)) == (48, 3, 6)
    assert continuations.layout(pairs, limit=1024, batch_size=4, max_length=50, key_cost=0.0)[1] == 48  # no wider


def test_a_prefix_tree_shares_every_common_prefix():
    """Contexts that share a beginning (WinoGrande's two sentences up to the blank, few-shot examples) compute
    it once; what follows branches off. Depth-first layout: each token's subtree ends where an input leaves it."""
    model = tiny_model("llama_gqa")
    pairs = [([1, 2, 3, 4], [5, 6]), ([1, 2, 3, 7], [5, 6]), ([1, 2], [9]), ([1, 2, 3, 4], [8])]
    (group,) = continuations.pack(pairs, 64, 1024)
    # sorted inputs: [1, 2] | [1, 2, 3, 4] | [1, 2, 3, 4, 5] | [1, 2, 3, 7, 5]
    assert group.tokens == [1, 2, 3, 4, 5, 7, 5]
    assert group.positions == [0, 1, 2, 3, 4, 3, 4]
    assert group.ends == [7, 7, 7, 5, 5, 7, 7]
    assert_same(continuations.score_continuations(model, pairs, batch_size=2, show_progress=False),
                alone(model, pairs))


def test_groups_fill_rows_densely():
    rng = np.random.default_rng(2)
    pairs = requests(rng, 160, contexts=rng.integers(1, 40, 80), choices=3)
    sizes = [len(group.tokens) for group in continuations.pack(pairs, 64, 1024)]
    rows = continuations.fill_rows(sizes, 64)
    assert sorted(group for row in rows for group in row) == list(range(len(sizes)))  # each group once
    used = [sum(sizes[group] for group in row) for row in rows]
    assert max(used) <= 64
    fewest = -(-sum(used) // 64)
    assert len(rows) <= 11 / 9 * fewest + 6 / 9  # best fit decreasing's bound (as first fit decreasing's)
    with pytest.raises(ValueError, match="a group of 73 tokens does not fit rows of 64"):
        continuations.fill_rows([73], 64)


def test_batches_share_the_scored_positions_evenly():
    """Every batch of a call is padded to its fullest batch's number of scored positions: rows in order (long
    contexts with one pick first, many-choice trees last) would pad the first batch to the last one's count."""
    rows = [[continuations.Group(picks=[0] * n)] for n in (1, 1, 1, 1, 5, 5, 5, 4, 4)]
    batches = continuations.balanced_batches(rows, 4)
    assert len(batches) == 3 and max(len(batch) for batch in batches) <= 4
    assert sorted(map(id, (row for batch in batches for row in batch))) == sorted(map(id, rows))  # each once
    assert max(sum(len(row[0].picks) for row in batch) for batch in batches) == 10  # in order: 19; 27 / 3 = 9


def test_sliding_window_rows_stay_within_the_window():
    """Gemma 3 (sliding window 40 on two of three layers): row indices beyond the window would hide context
    that the request alone sees, so a row holds no more than 40 tokens; a request longer than that runs alone."""
    model = tiny_model("gemma3")
    assert continuations.row_limit(model.config, 1024) == 40
    rng = np.random.default_rng(1)
    pairs = requests(rng, 160, contexts=(30, 38, 45), choices=3)
    got = continuations.score_continuations(model, pairs, batch_size=2, show_progress=False)
    assert_same(got, alone(model, pairs))
    # packed beyond the window, the same requests come out different: the limit is needed
    unlimited = continuations.score_pairs(*nnx.split(model), pairs, config=dataclasses.replace(
        model.config, sliding_window=None), batch_size=2, max_length=1024, show_progress=False)
    with pytest.raises(AssertionError):
        assert_same(unlimited, alone(model, pairs))


def test_no_requests_score_nothing():
    assert continuations.score_continuations(tiny_model("llama_gqa"), [], show_progress=False) == []


def test_empty_context_or_continuation_is_refused():
    with pytest.raises(ValueError, match="request 1: context and continuation need a token each"):
        continuations.pack([([1], [2]), ([1], [])], 16, 16)
