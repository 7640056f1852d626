"""How a super weight acts (The Super Weight, Figure 2 II / III, Figures 4 and 11).

Figure 4, the super activation carried through the layers: the super weight `down_proj.weight[row, col]` of
layer l makes the hidden state's channel `row` huge at one token (the super activation); the skip connections
carry it, at nearly the same magnitude, through every later layer. `super_activation_traces` reads that
channel at that token after every decoder layer, for the model and for the model with its super weights
pruned (Llama-7B: the pruned curve lies ~75% lower).

Figure 2 III / Figure 11, stopword likelihoods: the super activation suppresses stopwords in the output
distribution, so pruning the super weight raises their probability and lowers that of the other tokens.
`stopword_shift` averages the next-token distributions of two models over a corpus' chunks and compares the
mass on stopword tokens (`mwjax.data.stopwords`) with the mass on the rest. The reference code (`analyze.py`,
`plot_token_probs`) averages the distribution at the last position of 500 LAMBADA prompts and compares the original
model's top-100 tokens; here every position of the evaluated chunks counts (the text is the caller's: no hub
dataset needed), and a token is a stopword when its text, stripped of the word-start marker and lowercased, is in
the list, word pieces inside a word included.

Figures 3 and 10 (max |down_proj input| and |output| per layer, spiking at the super weight's layer) are the
detection's own signal, `massive.down_proj_spikes`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mwjax.core.compiled import jit_model
from mwjax.core.progress import track
from mwjax.data import stopwords
from mwjax.instrument import probes
from mwjax.research import attacks
from mwjax.research.massive import SuperWeight, check_super_weight

# ------------------------------------------------------------------------------------------- Figure 4


@dataclasses.dataclass(frozen=True)
class SuperActivationTrace:
    """The hidden state (HF `hidden_states[l + 1]`) at channel `row` and token `position` after every decoder
    layer l, in the model (`original`) and with its super weights pruned (`pruned`), float64 [L], signed.

    layer: the layer of the super weight that writes this channel most (the largest |output spike|; the earliest
      when none has one), where the super activation appears.
    """

    layer: int
    row: int
    position: int
    original: np.ndarray  # [L]
    pruned: np.ndarray  # [L]

    @property
    def drop(self) -> float:
        """1 - |pruned| / |original| right after `layer` (Figure 4: ~0.75 for Llama-7B)."""
        return float(1.0 - abs(self.pruned[self.layer]) / abs(self.original[self.layer]))

    @property
    def mean_drop(self) -> float:
        """1 - sum |pruned| / sum |original| over the layers from `layer` on: the drop of the whole carried curve."""
        return float(1.0 - np.abs(self.pruned[self.layer:]).sum() / np.abs(self.original[self.layer:]).sum())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the fields, `drop` and `mean_drop`.

        Returns:
          A dict of plain Python values (the curves as lists).
        """
        return {"layer": self.layer, "row": self.row, "position": self.position,
                "original": self.original.tolist(), "pruned": self.pruned.tolist(), "drop": self.drop,
                "mean_drop": self.mean_drop}


def super_activation_traces(model: nnx.Module, tokens, sws: SuperWeight | Sequence[SuperWeight],
                            attacked: nnx.Module | None = None) -> tuple[SuperActivationTrace, ...]:
    """Figure 4: per decoder layer, the hidden state at each super activation's channel and token, with the super
    weights there and pruned.

    One trace per distinct (row, position) of `sws` (Llama-3-8B's three rows give three). A channel that several
    layers write at one token (SmolLM2's 507 at layers 2, 9, 11, 28 and 29) gets one trace, from the layer whose
    output spike is largest (11), or the earliest when no spike was measured. A super weight without a position
    (`massive.super_weight_at`: -1) takes the token where |hidden state| at its row is largest after its layer.

    Args:
      model: an mwjax causal LM with dense FFNs.
      tokens: int [1, seq] token ids (the detection prompt, where the positions were found).
      sws: the super weight(s), attacked jointly.
      attacked: the model compared with `model`; None: `sws` pruned (`attacks.scale_super_weight(model, sws, 0)`).

    Returns:
      The `SuperActivationTrace`s.
    """
    sws = [sws] if isinstance(sws, SuperWeight) else list(sws)
    if not sws:
        raise ValueError("super_activation_traces needs at least one super weight")
    for sw in sws:
        check_super_weight(model.config, sw)
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2 or tokens.shape[0] != 1:
        raise ValueError(f"tokens must be one sequence [1, seq], got shape {tokens.shape}")
    if attacked is None:
        attacked = attacks.scale_super_weight(model, sws, 0.0)
    config = probes.ProbeConfig(points=("hidden",))
    original, pruned = (np.asarray(probes.record(m, tokens, config).stack("hidden")[:, 0], np.float64)
                        for m in (model, attacked))  # [L, seq, d_model]
    owner: dict[tuple[int, int], SuperWeight] = {}  # (row, position) -> the super weight whose trace it is
    for sw in sws:
        position = sw.position if sw.position >= 0 else int(np.argmax(np.abs(original[sw.layer, :, sw.row])))
        if not position < tokens.shape[1]:
            raise ValueError(f"super weight {sw.label}: position {position} lies past the {tokens.shape[1]} tokens")
        held = owner.setdefault((sw.row, position), sw)
        if _strength(sw) > _strength(held):
            owner[(sw.row, position)] = sw
    return tuple(SuperActivationTrace(sw.layer, row, position, original[:, position, row], pruned[:, position, row])
                 for (row, position), sw in owner.items())


def _strength(sw: SuperWeight) -> tuple[float, int]:
    """Ordering of the super weights writing one channel: the largest |output spike| (NaN: none), then the
    earliest layer."""
    spike = abs(sw.output_value)
    return (spike if np.isfinite(spike) else -1.0, -sw.layer)


# ------------------------------------------------------------------------------------------- Figure 2 III / 11


@jit_model
def _probability_sums(model, chunks, weights):
    """sum over sequences (weighted) and positions but the last of softmax(logits) [vocab], float32."""
    logits = model(chunks)[:, :-1].astype(jnp.float32)  # [b, seq - 1, vocab]: the predictions with a target
    return jnp.einsum("b,btv->v", weights, jax.nn.softmax(logits, axis=-1))


def mean_next_token_probs(model: nnx.Module, tokens, *, batch_size: int = 1, progress: bool = True) -> np.ndarray:
    """The next-token distribution averaged over a corpus: softmax of the logits at every position that has a
    target within its sequence (all but the last, as perplexity scores them), averaged over positions and
    sequences.

    Args:
      model: an mwjax causal LM.
      tokens: int [num_sequences, seq] (e.g. `likelihood.chunk_tokens` of a corpus), seq >= 2.
      batch_size: sequences per forward pass (the last batch is padded to keep one compiled shape).
      progress: show a progress bar over the batches.

    Returns:
      float64 [vocab], summing to 1.
    """
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [num_sequences, seq >= 2], got shape {tokens.shape}")
    split = nnx.split(model)
    total = np.zeros(model.config.vocab_size, np.float64)
    starts = range(0, len(tokens), batch_size)
    for start in track(starts, len(starts), "next-token distribution", enabled=progress):
        batch = tokens[start:start + batch_size]
        pad = batch_size - len(batch)
        weights = np.concatenate([np.ones(len(batch)), np.zeros(pad)]).astype(np.float32)
        padded = np.concatenate([batch, np.repeat(batch[-1:], pad, 0)]) if pad else batch
        total += np.asarray(_probability_sums.on_state(*split, jnp.asarray(padded), jnp.asarray(weights)), np.float64)
    return total / (len(tokens) * (tokens.shape[1] - 1))


@dataclasses.dataclass(frozen=True)
class TokenShift:
    """One token's mean next-token probability in the model (`before`) and the attacked model (`after`)."""

    token_id: int
    text: str  # decoded
    stopword: bool
    before: float
    after: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready.

        Returns:
          The fields as a dict.
        """
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class StopwordShift:
    """Figure 2 III / Figure 11: the mean next-token probability mass on stopword tokens and on the other tokens,
    in the model (`*_before`) and the attacked one (`*_after`), and the tokens whose mean probability rose most.

    The paper: pruning the super weight amplifies stopwords (stopword_ratio > 1) and suppresses the rest.
    """

    stopword_before: float
    stopword_after: float
    other_before: float
    other_after: float
    stopword_tokens: int  # how many token ids count as stopwords
    predictions: int  # next-token distributions averaged
    rising: tuple[TokenShift, ...]  # largest rise of mean probability first

    @property
    def stopword_ratio(self) -> float:
        """Stopword mass after / before."""
        return self.stopword_after / self.stopword_before

    @property
    def other_ratio(self) -> float:
        """Non-stopword mass after / before."""
        return self.other_after / self.other_before

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the fields (tokens as dicts) and both ratios.

        Returns:
          A dict of plain Python values.
        """
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rising"} | {
            "stopword_ratio": self.stopword_ratio, "other_ratio": self.other_ratio,
            "rising": [t.to_dict() for t in self.rising]}


def stopword_shift(model: nnx.Module, attacked: nnx.Module, tokens, tokenizer, *,
                   words: Iterable[str] = stopwords.STOPWORDS, top_k: int = 10, batch_size: int = 1,
                   progress: bool = True) -> StopwordShift:
    """Figure 2 III / Figure 11: how the attack moves next-token probability between stopwords and the rest.

    Args:
      model: the mwjax causal LM as it is.
      attacked: the same model attacked (the super weights pruned: `attacks.scale_super_weight(model, sws, 0)`).
      tokens: int [num_sequences, seq] chunks of a corpus (`likelihood.chunk_tokens`).
      tokenizer: an HF tokenizer of the model: which token ids are stopwords (`stopwords.token_ids`) and the
        rising tokens' texts.
      words: the stopwords (`mwjax.data.stopwords.STOPWORDS` by default).
      top_k: how many of the tokens whose mean probability rose most to keep.
      batch_size: sequences per forward pass.
      progress: show progress bars.

    Returns:
      The `StopwordShift`.
    """
    ids = np.asarray(stopwords.token_ids(tokenizer, words), np.int64)
    ids = ids[ids < model.config.vocab_size]
    if not len(ids):
        raise ValueError("no token of this tokenizer decodes to a stopword")
    before, after = (mean_next_token_probs(m, tokens, batch_size=batch_size, progress=progress)
                     for m in (model, attacked))
    is_stop = np.zeros(len(before), bool)
    is_stop[ids] = True
    rising = np.argsort(-(after - before), kind="stable")[:top_k]
    num_sequences, seq = np.shape(tokens)
    return StopwordShift(
        stopword_before=float(before[is_stop].sum()), stopword_after=float(after[is_stop].sum()),
        other_before=float(before[~is_stop].sum()), other_after=float(after[~is_stop].sum()),
        stopword_tokens=len(ids), predictions=num_sequences * (seq - 1),
        rising=tuple(TokenShift(int(i), tokenizer.decode([int(i)]) if i < len(tokenizer) else "", bool(is_stop[i]),
                                float(before[i]), float(after[i])) for i in rising))
