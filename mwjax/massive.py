"""Finding massive weights (House of Cards, Algorithm 1 step 1).

Feed one token (the bos token) alone at position 0 and look at every layer's FFN intermediate
state `act(x W_gate) * (x W_up)` (the input of `down_proj`). In most LLMs one early layer's
intermediate state holds a few values that are orders of magnitude larger than the rest; the
rows of W_gate / W_up behind the top-k of them are the top-k massive weights.

Which layer: the one whose output makes the hidden state's largest magnitude jump the most,
    layer = argmax_l ( max|h_l| - max|h_{l-1}| ),   h_{-1} = the token's embedding,
which is where massive activations originate. The result records whether that layer's
intermediate state also meets the massive-activation criterion of Sun et al. (the largest |value|
exceeds 100 and 1000x the median |value|); `layer=` overrides the rule.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mwjax import masks, probes
from mwjax.tokens import first_token_id

MASSIVE_MIN = 100.0  # |x| above this ...
MASSIVE_RATIO = 1000.0  # ... and this many times the median |x|


@dataclasses.dataclass(frozen=True)
class MassiveWeights:
    """The top-k massive weights: rows `indices` of W_gate and W_up at `layer` (0-based, HF numbering).

    indices: intermediate dimensions (= PyTorch rows of W_gate / W_up), largest |value| first
    values:  the intermediate state's values there (signed)
    median:  median |value| of that intermediate state
    expert:  Mixtral: the expert the router chose for the token at `layer` (None for dense models)
    """

    layer: int
    indices: tuple[int, ...]
    values: tuple[float, ...]
    median: float
    token_id: int
    expert: int | None = None
    meets_criterion: bool = True

    @property
    def paper_layer(self) -> int:
        """The layer as the papers number it (from 1)."""
        return self.layer + 1

    @property
    def label(self) -> str:
        return f"layer {self.paper_layer} (HF layers[{self.layer}])"

    def top(self, k: int) -> tuple[int, ...]:
        if not 1 <= k <= len(self.indices):
            raise ValueError(f"k={k}: this result holds the top {len(self.indices)} massive weights")
        return self.indices[:k]

    def row_mask(self, d_model: int, k: int | None = None, value: float = 0.0) -> masks.FFNMasks:
        """`ffn_masks` that multiply the top-k rows by `value` (0 = top-k zeroing)."""
        rows = self.top(k or len(self.indices))
        return {self.layer: masks.row_mask(rows, value, d_model, expert=self.expert)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"paper_layer": self.paper_layer}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MassiveWeights:
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in fields}
        return cls(**(d | {"indices": tuple(d["indices"]), "values": tuple(d["values"])}))


def first_token_profile(model: nnx.Module, token_id: int, top_k: int) -> dict[str, Any]:
    """One token alone at position 0: per layer top-k / median of |hidden| and |intermediate|.

    Returns numpy arrays: hidden_top [L, top_k], intermediate_top / intermediate_idx [L, top_k],
    hidden_median / intermediate_median [L], and embed_max (max |embedding|).
    """
    config = probes.ProbeConfig(points=("hidden", "intermediate"), full=False, top_k=top_k, median=True)
    tokens = jnp.array([[token_id]], jnp.int32)
    _, result = probes.capture(model, tokens, config)
    pick = lambda point, stat: np.asarray(probes.stack(result, point, stat)[:, 0, 0], np.float64)
    return {
        "hidden_top": pick("hidden", "top_values"),
        "hidden_median": pick("hidden", "median"),
        "intermediate_top": pick("intermediate", "top_values"),
        "intermediate_idx": np.asarray(probes.stack(result, "intermediate", "top_indices")[:, 0, 0]),
        "intermediate_median": pick("intermediate", "median"),
        "embed_max": float(jnp.max(jnp.abs(model.embed(tokens).astype(jnp.float32)))),
    }


def origin_layer(profile: dict[str, Any]) -> int:
    """The layer after which the hidden state's largest |value| grew the most."""
    top = np.abs(profile["hidden_top"][:, 0])
    previous = np.concatenate([[profile["embed_max"]], top[:-1]])
    return int(np.argmax(top - previous))


def find_massive_weights(model: nnx.Module, tokenizer=None, k: int = 5, layer: int | None = None,
                         first_token: int | str | None = None) -> MassiveWeights:
    """The top-k massive weights of `model` (House of Cards §2.3).

    tokenizer: supplies the bos token (or pass `first_token=` an id / token string).
    layer: 0-based layer to take them from; default: where massive activations originate (module doc).
    """
    config = model.config
    if not 1 <= k <= config.intermediate_size:
        raise ValueError(f"k={k} must lie in [1, d_ff={config.intermediate_size}]")
    if layer is not None and not 0 <= layer < config.num_hidden_layers:
        raise ValueError(f"layer={layer} is out of range: the model has layers 0..{config.num_hidden_layers - 1}")
    token_id = first_token_id(tokenizer, config, first_token)
    profile = first_token_profile(model, token_id, top_k=k)
    if layer is None:
        layer = origin_layer(profile)
    top = profile["intermediate_top"][layer]
    median = float(profile["intermediate_median"][layer])
    largest = float(np.abs(top[0]))
    return MassiveWeights(
        layer=layer,
        indices=tuple(int(i) for i in profile["intermediate_idx"][layer]),
        values=tuple(float(v) for v in top),
        median=median,
        token_id=token_id,
        meets_criterion=largest > MASSIVE_MIN and largest >= MASSIVE_RATIO * median,
    )
