"""Attention sinks and the position of the bos token (House of Cards §2.2, Figure 2 and Appendix C).

Take a prompt without bos and place the bos token at the start, in the middle or at the end of it,
or leave it out. For each of the four sequences, record

- the hidden state h_l after decoder layer l (HF `output_hidden_states[l + 1]`), whose magnitudes
  |h_l| over tokens x feature dimensions the paper's top row draws as the Massive Activations 3D plot;
- the attention probabilities (after softmax) of the next layer l + 1, averaged over the heads
  (HF `output_attentions[l + 1].mean(1)`), the paper's bottom row.

The paper takes the middle layer, after massive activations have appeared: Figure 2 shows Mistral-7B's
h_16 and its layer-17 attention (1-based), i.e. HF layers[15] and layers[16] of 32. `default_layer`
takes that middle layer (L/2 - 1, 0-based), or the layer where the bos token's massive intermediate
state appears if that lies deeper, so the hidden state always holds the massive activations.

"Middle" follows the paper's Mistral example, where bos goes after the first sentence ("Summer is
warm. <bos> Winter is cold."): by default after the first delimiter token that has words on both sides
of it, else after half of the prompt's tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mwjax.core.layer_index import check_layer, layer_label
from mwjax.instrument import probes
from mwjax.research import massive

PLACEMENTS = ("absent", "start", "middle", "end")  # the paper's four columns, in its order
DELIMITERS = frozenset(".,;:!?\n")


@dataclasses.dataclass(frozen=True)
class BosPlacement:
    """One column of the figure: the token ids fed, where bos sits (None: absent), and what the layers hold.

    magnitudes: |h_layer| [seq, d_model] float32; attention: head-averaged probabilities of layer + 1
    [seq (query), seq (key)], rows sum to 1, zero above the diagonal.
    """

    placement: str
    token_ids: tuple[int, ...]
    bos_position: int | None
    magnitudes: np.ndarray
    attention: np.ndarray

    @property
    def max_dims(self) -> np.ndarray:
        """[seq] the feature dimension of each token's largest |h|."""
        return np.argmax(self.magnitudes, axis=-1)

    @property
    def massive_positions(self) -> list[int]:
        """The tokens holding massive activations: largest |h| > 100 and >= 1000x the sequence's median |h|
        (Sun et al.'s criterion, `mwjax.research.massive.is_massive`)."""
        median = float(np.median(self.magnitudes))
        return [int(t) for t in np.flatnonzero(massive.is_massive(self.magnitudes.max(-1), median))]

    @property
    def attention_received(self) -> np.ndarray:
        """[seq] the attention each token receives from the later tokens, averaged over them: how much of a sink
        it is (its attention to itself left out, so the first token's trivial 1 and the last token's own
        attention do not count); NaN for the last token, which no later token sees."""
        later = np.tril(self.attention, k=-1).sum(axis=0)  # from queries q > k
        count = np.arange(len(self.token_ids) - 1, -1, -1)
        return np.where(count > 0, later / np.maximum(count, 1), np.nan)

    @property
    def top_sink(self) -> int:
        """The position receiving the most attention from the later tokens (`attention_received`)."""
        return int(np.nanargmax(self.attention_received)) if len(self.token_ids) > 1 else 0

    def summary(self, top_k: int = 3) -> dict[str, Any]:
        """JSON-ready: per token the top-k |h| with their dims and the median |h|; the attention matrix.

        Args:
          top_k: how many of each token's largest |h| to keep.

        Returns:
          A dict of plain Python values (lists; NaN of `attention_received` as None).
        """
        order = np.argsort(-self.magnitudes, axis=-1)[:, :top_k]
        return {
            "placement": self.placement,
            "token_ids": list(self.token_ids),
            "bos_position": self.bos_position,
            "massive_positions": self.massive_positions,
            "hidden_top_values": np.take_along_axis(self.magnitudes, order, axis=-1).tolist(),
            "hidden_top_dims": order.tolist(),
            "hidden_median": np.median(self.magnitudes, axis=-1).tolist(),
            "attention": self.attention.tolist(),
            "attention_received": [None if np.isnan(a) else float(a) for a in self.attention_received],
        }


@dataclasses.dataclass(frozen=True)
class AttentionSinks:
    """The four placements (PLACEMENTS order) probed at one layer: h after `layer`, attention of `layer` + 1."""

    layer: int
    bos_id: int
    placements: tuple[BosPlacement, ...]

    @property
    def attention_layer(self) -> int:
        """`layer` + 1: the 0-based layer whose attention probabilities are recorded."""
        return self.layer + 1

    def __getitem__(self, placement: str) -> BosPlacement:
        for p in self.placements:
            if p.placement == placement:
                return p
        raise KeyError(f"no placement {placement!r}; have {[p.placement for p in self.placements]}")

    def to_dict(self, top_k: int = 3) -> dict[str, Any]:
        """JSON-ready: the layers (with their labels), bos id and every placement's `BosPlacement.summary`.

        Args:
          top_k: how many of each token's largest |h| the summaries keep.

        Returns:
          A dict of plain Python values.
        """
        return {"layer": self.layer, "layer_label": layer_label(self.layer),
                "attention_layer": self.attention_layer, "attention_layer_label": layer_label(self.attention_layer),
                "bos_id": self.bos_id, "placements": [p.summary(top_k) for p in self.placements]}


def middle_position(token_texts: Sequence[str]) -> int:
    """Where the middle bos goes: after the first delimiter token with tokens on both sides, else after half.

    Args:
      token_texts: the prompt's tokens as text, one string per token (without bos).

    Returns:
      The index in the prompt's tokens at which bos is inserted.
    """
    for i, text in enumerate(token_texts[:-1]):
        if i > 0 and text.strip() and set(text.strip()) <= DELIMITERS:
            return i + 1
    return len(token_texts) // 2


def place_bos(token_ids: Sequence[int], bos_id: int, placement: str, middle: int | None = None
              ) -> tuple[list[int], int | None]:
    """The prompt with bos placed as `placement` says.

    Args:
      token_ids: the prompt's token ids, without bos (holding it is a ValueError).
      bos_id: the bos token id.
      placement: one of PLACEMENTS: "absent", "start", "middle" or "end".
      middle: the index of the middle bos, 0..len(token_ids) (e.g. `middle_position`); None: half of the prompt.

    Returns:
      (the token ids as a list, the bos position or None when absent).
    """
    ids = list(token_ids)
    if bos_id in ids:
        raise ValueError(f"the prompt's tokens already hold the bos token (id {bos_id}): pass them without it")
    position = {"absent": None, "start": 0, "end": len(ids),
                "middle": len(ids) // 2 if middle is None else middle}.get(placement, -1)
    if position == -1:
        raise ValueError(f"unknown bos placement {placement!r}; choose from {PLACEMENTS}")
    if position is not None and not 0 <= position <= len(ids):
        raise ValueError(f"middle={middle} lies outside the prompt's {len(ids)} tokens")
    if position is not None:
        ids.insert(position, bos_id)
    return ids, position


def default_layer(model: nnx.Module, bos_id: int) -> int:
    """The paper's middle layer (h_{L/2}, 1-based: HF layers[L/2 - 1]) or, if deeper, the layer where the bos
    token's massive intermediate state appears (`mwjax.research.massive.origin_layer`); at most L - 2, so that a next
    layer exists.

    Args:
      model: an mwjax causal LM with at least 2 layers.
      bos_id: the bos token id (fed alone to find the massive intermediate state).

    Returns:
      The 0-based layer.
    """
    num_layers = model.config.num_hidden_layers
    if num_layers < 2:
        raise ValueError("attention sinks need a layer after the probed one: the model has a single layer")
    origin, _ = massive.origin_layer(massive.first_token_profile(model, bos_id, top_k=1))
    return min(max(num_layers // 2 - 1, origin), num_layers - 2)


def bos_placements(model: nnx.Module, token_ids: Sequence[int], bos_id: int, layer: int, *,
                   middle: int | None = None, placements: Sequence[str] = PLACEMENTS) -> AttentionSinks:
    """Probe the prompt with bos placed each way: |h| after `layer` and the head-averaged attention
    probabilities of `layer` + 1 (module doc).

    The attention probabilities come from the `attn_probs` probe (the eager attention path).

    Args:
      model: an mwjax causal LM.
      token_ids: the prompt's token ids, without bos.
      bos_id: the bos token id.
      layer: 0-based layer whose output hidden state is recorded (`default_layer`); layer + 1 must exist.
      middle: the index of the middle bos (`middle_position`); None: half of the prompt.
      placements: which of PLACEMENTS to run, in order.

    Returns:
      The `AttentionSinks`, one `BosPlacement` per placement.
    """
    check_layer(model.config, layer, what=f"layer={layer}")
    check_layer(model.config, layer + 1, what=f"the attention layer after layer={layer}")
    config = probes.ProbeConfig(points=("hidden", "attn_probs"), layers=(layer, layer + 1))
    out = []
    for placement in placements:
        ids, position = place_bos(token_ids, bos_id, placement, middle)
        result = probes.record(model, jnp.asarray([ids], jnp.int32), config)
        hidden = np.abs(np.asarray(result.hidden[layer].full[0], np.float32))  # [seq, d]
        attention = np.asarray(result.attn_probs[layer + 1].full[0], np.float32).mean(0)  # [seq, seq]
        out.append(BosPlacement(placement, tuple(ids), position, hidden, attention))
    return AttentionSinks(layer=layer, bos_id=bos_id, placements=tuple(out))
