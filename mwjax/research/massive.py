"""Finding massive weights (House of Cards), super weights (The Super Weight) and the
per-layer activation statistics behind both (Massive Activations).

Massive weights (House of Cards, Algorithm 1 step 1):

Feed one token (the bos token) alone at position 0 and look at every layer's FFN intermediate
state `act(x W_gate) * (x W_up)` (the input of `down_proj`). In most LLMs one early layer's
intermediate state holds a few values that are orders of magnitude larger than the rest; the
rows of W_gate / W_up behind the top-k of them are the top-k massive weights.

Which layer (`origin_layer`): Algorithm 1 takes "the layer where the massive intermediate state
appears" (Table 6: "selected based on the magnitudes of intermediate state"), so by default the
earliest layer whose intermediate state meets the massive-activation criterion of Sun et al. (the
largest |value| exceeds 100 and 1000x the median |value|). When no layer meets it, the layer with
the largest intermediate |value| is taken and the result says so (`meets_criterion=False`,
`selected_by`). The rule "hidden_jump" (the layer after which the hidden state's largest |value|
rises the most) is kept as an option: it agrees on Llama / Mistral / SmolLM2 but not where post-FFN
norms damp the hidden state (Gemma 2/3). `layer=` overrides both.

Super weights (Yu et al.): run a prompt, and per layer take the largest |input| of `down_proj`
(its channel is the super weight's column, an intermediate dimension) and the largest |output|
(its channel is the row, a hidden dimension). A layer where both exceed a spike threshold
(default 50) holds super weights `down_proj.weight[row, col]` (HF layout): the argmax row, and every
other row whose own contribution weight[row, col] x input spike is at least SUPER_RATIO (0.5) of the
largest output (Llama-3-8B has three, rows 788, 1384, 4062 at column 2427). Requiring the weight's
own contribution, not just a large output, keeps a massive-activation token whose whole down_proj
output is large (SmolLM2's bos: ~280 channels above 50 at layer 12) from yielding hundreds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mwjax.converters.tokens import first_token_id
from mwjax.core.layer_index import check_layer, layer_label
from mwjax.core.progress import track
from mwjax.instrument import masks, probes
from mwjax.research.defaults import DEFAULT_PROMPT, LATE_FRACTION, LAYER_RULES, SPIKE_THRESHOLD, SUPER_RATIO

MASSIVE_MIN = 100.0  # |x| above this ...
MASSIVE_RATIO = 1000.0  # ... and this many times the median |x|


def is_massive(largest, median):
    """Sun et al.'s massive-activation criterion: |x| > MASSIVE_MIN and >= MASSIVE_RATIO x the median |x|.

    Args:
      largest: the largest value(s) of a state (signed; its magnitude is taken), a scalar or an array.
      median: the median |x| of the same state(s), broadcastable against `largest`.

    Returns:
      bool (numpy), elementwise.
    """
    largest, median = np.abs(largest), np.asarray(median)
    return (largest > MASSIVE_MIN) & (largest >= MASSIVE_RATIO * median)


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
    selected_by: str = ""  # how `layer` was chosen (origin_layer's reason, or "given")

    @property
    def paper_layer(self) -> int:
        """The layer as the papers number it (from 1)."""
        return self.layer + 1

    @property
    def label(self) -> str:
        """'layer 12 (HF layers[11])': `layer` as the messages name it (`layer_label`)."""
        return layer_label(self.layer)

    def top(self, k: int) -> tuple[int, ...]:
        """The first k of `indices` (the top-k massive rows).

        Args:
          k: how many, 1..len(indices) (ValueError otherwise).

        Returns:
          The k intermediate dimensions, largest |value| first.
        """
        if not 1 <= k <= len(self.indices):
            raise ValueError(f"k={k}: this result holds the top {len(self.indices)} massive weights")
        return self.indices[:k]

    def row_mask(self, d_model: int, k: int | None = None, value: float = 0.0) -> masks.FFNMasks:
        """`ffn_masks` that multiply the top-k rows by `value` (0 = top-k zeroing).

        Args:
          d_model: hidden size (the length of a PyTorch row of W_gate / W_up).
          k: how many rows, 1..len(indices); None (or 0) for all of them.
          value: the factor of those rows.

        Returns:
          {layer: RowMask} for `model(..., ffn_masks=)`.
        """
        rows = self.top(k or len(self.indices))
        return {self.layer: masks.row_mask(rows, value, d_model, expert=self.expert)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the fields and `paper_layer`.

        Returns:
          A dict of plain Python values.
        """
        return dataclasses.asdict(self) | {"paper_layer": self.paper_layer}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MassiveWeights:
        """The inverse of `to_dict` (keys that are not fields, such as `paper_layer`, ignored).

        Args:
          d: a dict as `to_dict` writes it (e.g. read back from JSON).

        Returns:
          The MassiveWeights.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in fields}
        return cls(**(d | {"indices": tuple(d["indices"]), "values": tuple(d["values"])}))


@dataclasses.dataclass(frozen=True)
class Magnitudes:
    """Per layer, the top-k and the median |value| of one state (House of Cards Figure 3(b, c), the thesis'
    Figure 4.4), numpy float64."""

    top: np.ndarray  # [L, k], largest first
    median: np.ndarray  # [L]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready.

        Returns:
          {"top": [L][k], "median": [L]} as lists.
        """
        return {"top": self.top.tolist(), "median": self.median.tolist()}


@dataclasses.dataclass(frozen=True)
class StateTop:
    """Per layer, one state's top-k values (signed, float64), their feature dims and its median |value|."""

    values: np.ndarray  # [L, k], largest |value| first
    indices: np.ndarray  # int [L, k]
    median: np.ndarray  # [L]

    @property
    def magnitudes(self) -> Magnitudes:
        """The same statistics as `Magnitudes` (|values| and the median |value|)."""
        return Magnitudes(np.abs(self.values), self.median)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready.

        Returns:
          {"values": [L][k], "indices": [L][k], "median": [L]} as lists.
        """
        return {"values": self.values.tolist(), "indices": self.indices.tolist(), "median": self.median.tolist()}


@dataclasses.dataclass(frozen=True)
class FirstTokenProfile:
    """One token alone at position 0, per layer (`first_token_profile`): the hidden state after each layer
    (HF `hidden_states[l + 1]`, the paper's h_l) and the FFN intermediate state act(x W_gate) * (x W_up).

    Mixture of experts: `expert` [L] is the router's first choice for the token and `router_prob` [L] its
    probability; `intermediate` is that expert's state.
    """

    hidden: StateTop
    intermediate: StateTop
    embed_max: float  # max |embedding| of the token (h_0)
    expert: np.ndarray | None = None  # int [L]
    router_prob: np.ndarray | None = None  # [L]

    @property
    def num_layers(self) -> int:
        """L, the number of decoder layers profiled."""
        return len(self.hidden.median)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; `expert` and `router_prob` only for a mixture of experts.

        Returns:
          A dict of plain Python values.
        """
        out = {"hidden": self.hidden.to_dict(), "intermediate": self.intermediate.to_dict(),
               "embed_max": self.embed_max}
        if self.expert is not None:
            out |= {"expert": self.expert.tolist(), "router_prob": self.router_prob.tolist()}
        return out


def first_token_profile(model: nnx.Module, token_id: int, top_k: int) -> FirstTokenProfile:
    """One token alone at position 0: per layer the top-k values and median |x| of the hidden and intermediate
    states.

    Args:
      model: an mwjax causal LM.
      token_id: the token fed (House of Cards: bos).
      top_k: how many of the largest |values| to keep per layer and state.

    Returns:
      A `FirstTokenProfile` (for a mixture of experts, the intermediate state of the router's first choice).
    """
    moe = model.config.num_local_experts is not None
    points = ("hidden", "intermediate") + (("router_probs",) if moe else ())
    config = probes.ProbeConfig(points=points, full=False, top_k=top_k, median=True)
    tokens = jnp.array([[token_id]], jnp.int32)
    result = probes.record(model, tokens, config)
    pick = lambda point, stat: np.asarray(result.stack(point, stat)[:, 0, 0])  # [L, ...] (MoE: [L, E, ...])

    def state(point: str, expert: np.ndarray | None = None) -> StateTop:
        values, indices, median = (pick(point, s) for s in ("top_values", "top_indices", "median"))
        if expert is not None:  # the routed expert's state
            layers = np.arange(len(expert))
            values, indices, median = values[layers, expert], indices[layers, expert], median[layers, expert]
        return StateTop(values.astype(np.float64), indices, median.astype(np.float64))

    expert = pick("router_probs", "top_indices")[:, 0] if moe else None
    return FirstTokenProfile(
        hidden=state("hidden"), intermediate=state("intermediate", expert),
        embed_max=float(jnp.max(jnp.abs(model.embed(tokens).astype(jnp.float32)))), expert=expert,
        router_prob=pick("router_probs", "top_values")[:, 0].astype(np.float64) if moe else None)


def first_token_router_probs(model: nnx.Module, token_id: int) -> np.ndarray:
    """House of Cards Figure 5: the router's probability of every expert for one token (bos) alone at position
    0, per layer.

    Args:
      model: a mixture-of-experts mwjax causal LM (e.g. Mixtral); a dense one is a ValueError.
      token_id: the token fed.

    Returns:
      float64 [L, E]: softmax of HF's `router_logits`, before the top-k choice.
    """
    if model.config.num_local_experts is None:
        raise ValueError(f"this {model.config.model_type} model has a dense FFN and no router: router probabilities "
                         "exist only for a mixture of experts (a config with num_local_experts, e.g. Mixtral)")
    config = probes.ProbeConfig(points=("router_probs",))
    result = probes.record(model, jnp.array([[token_id]], jnp.int32), config)
    return np.asarray(result.stack("router_probs")[:, 0, 0], np.float64)


def hidden_jumps(profile: FirstTokenProfile) -> np.ndarray:
    """How much each layer raised the hidden state's largest |value| (layer 0: over the embedding).

    Args:
      profile: a `first_token_profile`.

    Returns:
      float64 [L] rises (negative where a layer lowered it).
    """
    top = np.abs(profile.hidden.values[:, 0])
    return top - np.concatenate([[profile.embed_max], top[:-1]])


def origin_layer(profile: FirstTokenProfile, rule: str = "intermediate") -> tuple[int, str]:
    """The layer of the massive weights from a `first_token_profile` (module doc).

    Args:
      profile: a `first_token_profile` of the bos token.
      rule: one of LAYER_RULES: "intermediate" (the earliest layer whose intermediate state is massive, else the
        largest intermediate |x|) or "hidden_jump" (the largest rise of the hidden state's max |x|).

    Returns:
      (0-based layer, why it was chosen).
    """
    if rule not in LAYER_RULES:
        raise ValueError(f"unknown layer rule {rule!r}; choose from {LAYER_RULES}")
    if rule == "hidden_jump":
        return int(np.argmax(hidden_jumps(profile))), "largest rise of the hidden state's max |x|"
    top = np.abs(profile.intermediate.values[:, 0])
    massive = is_massive(top, profile.intermediate.median)
    if massive.any():
        return int(np.argmax(massive)), ("earliest layer whose intermediate state is massive (|x| > 100, >= 1000x "
                                         "median)")
    return int(np.argmax(top)), "no layer's intermediate state is massive: the largest intermediate |x| instead"


def find_massive_weights(model: nnx.Module, tokenizer=None, k: int = 5, layer: int | None = None,
                         first_token: int | str | None = None, layer_rule: str = "intermediate") -> MassiveWeights:
    """The top-k massive weights of `model` (House of Cards §2.3, Algorithm 1 line 1).

    Mixture of experts: the rows belong to the expert the router ranks first for the token at that
    layer (Mixtral's bos goes to one expert; House of Cards attacks only that one), in `.expert`.

    Args:
      model: an mwjax causal LM.
      tokenizer: an HF tokenizer; supplies the bos token (or pass `first_token=`).
      k: how many rows, 1..d_ff.
      layer: 0-based layer to take them from; default: chosen by `layer_rule` (module doc, `origin_layer`).
      first_token: the token fed alone, an id or a token string; None: the tokenizer's bos, then the config's.
      layer_rule: one of LAYER_RULES (`origin_layer`), used when `layer` is None.

    Returns:
      The `MassiveWeights`: rows of W_gate / W_up, largest intermediate |value| first.
    """
    config = model.config
    if not 1 <= k <= config.intermediate_size:
        raise ValueError(f"k={k} must lie in [1, d_ff={config.intermediate_size}]")
    if layer is not None:
        check_layer(config, layer, what=f"layer={layer}")
    token_id = first_token_id(tokenizer, config, first_token)
    profile = first_token_profile(model, token_id, top_k=k)
    layer, selected_by = origin_layer(profile, layer_rule) if layer is None else (layer, "given")
    top = profile.intermediate.values[layer]
    median = float(profile.intermediate.median[layer])
    return MassiveWeights(
        layer=layer,
        indices=tuple(int(i) for i in profile.intermediate.indices[layer]),
        values=tuple(float(v) for v in top),
        median=median,
        token_id=token_id,
        expert=None if profile.expert is None else int(profile.expert[layer]),
        meets_criterion=bool(is_massive(top[0], median)),
        selected_by=selected_by,
    )


# ------------------------------------------------------------------------------------------- super weights


@dataclasses.dataclass(frozen=True)
class SuperWeight:
    """A super-weight candidate: HF `model.layers[layer].mlp.down_proj.weight[row, col]`.

    row: output channel (hidden dimension, where the super activation lives)
    col: input channel (intermediate dimension)
    weight: the weight's value; input_value / output_value: the spikes that located it (signed),
    at token `position` of the prompt.
    """

    layer: int
    row: int
    col: int
    weight: float
    input_value: float
    output_value: float
    position: int

    @property
    def label(self) -> str:
        """'layers[2].mlp.down_proj.weight[3968, 7003]': the weight's HF address."""
        return f"layers[{self.layer}].mlp.down_proj.weight[{self.row}, {self.col}]"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready.

        Returns:
          The fields as a dict.
        """
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Spike:
    """Per layer, the largest |value| of one state over a sequence: the value (signed, float64), its channel
    and its token position."""

    value: np.ndarray  # [L]
    channel: np.ndarray  # int [L]
    position: np.ndarray  # int [L]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready.

        Returns:
          {"value": [L], "channel": [L], "position": [L]} as lists.
        """
        return {"value": self.value.tolist(), "channel": self.channel.tolist(), "position": self.position.tolist()}


@dataclasses.dataclass(frozen=True)
class DownProjSpikes:
    """The Super Weight's detection signal (its Figures 3 and 10): per layer, the spike of down_proj's input (the
    intermediate state; its channel is a super weight's column) and of its output (the channel is the row)."""

    input: Spike
    output: Spike

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready.

        Returns:
          {"input": `Spike.to_dict`, "output": `Spike.to_dict`}.
        """
        return {"input": self.input.to_dict(), "output": self.output.to_dict()}


def prompt_tokens(tokenizer, prompt: str = DEFAULT_PROMPT) -> jnp.ndarray:
    """The detection prompt as the super-weight detection feeds it: the tokenizer's defaults (bos where it adds one).

    Args:
      tokenizer: an HF tokenizer; None is a ValueError.
      prompt: the text (the Super Weight reference code's prompt by default).

    Returns:
      int32 [1, seq] token ids.
    """
    if tokenizer is None:
        raise ValueError("super-weight detection needs a tokenizer to encode the prompt, or tokens=[1, seq]")
    return jnp.asarray([tokenizer(prompt).input_ids], jnp.int32)


def _check_dense(model: nnx.Module) -> None:
    if model.config.num_local_experts is not None:
        raise ValueError("super-weight detection follows the paper's dense FFN (one down_proj per layer); this "
                         "model routes between experts, whose down_proj inputs are probed per expert instead")


def down_proj_spikes(model: nnx.Module, tokens: jnp.ndarray) -> DownProjSpikes:
    """Per layer, the largest |down_proj input| and |output| over the sequence (the first batch row only): the
    detection signal of `find_super_weights` and what The Super Weight's Figures 3 (Llama-7B) and 10 (OLMo-7B)
    plot, both spiking at the super weight's layer.

    Args:
      model: an mwjax causal LM with dense FFNs (a mixture of experts is a ValueError).
      tokens: int [batch, seq] token ids (only row 0 is read).

    Returns:
      The `DownProjSpikes` (signed value, channel and position of each spike, per layer).
    """
    _check_dense(model)
    config = probes.ProbeConfig(points=("intermediate", "down_proj_output"), full=False, top_k=1, scope="sequence")
    result = probes.record(model, tokens, config)
    pick = lambda point, stat: np.asarray(result.stack(point, stat)[:, 0, 0])  # [L]
    spike = lambda point: Spike(pick(point, "top_values").astype(np.float64), pick(point, "top_indices"),
                                pick(point, "top_positions"))
    return DownProjSpikes(input=spike("intermediate"), output=spike("down_proj_output"))


def find_super_weights(model: nnx.Module, tokenizer=None, prompt: str = DEFAULT_PROMPT, *,
                       tokens: jnp.ndarray | None = None, threshold: float = SPIKE_THRESHOLD,
                       ratio: float = SUPER_RATIO) -> list[SuperWeight]:
    """The super weights of every layer whose down_proj input and output both spike above `threshold`
    (module doc), the argmax row of each layer first.

    Args:
      model: an mwjax causal LM with dense FFNs (a mixture of experts is a ValueError).
      tokenizer: an HF tokenizer; encodes `prompt` with its defaults (bos included where it adds one).
      prompt: the detection prompt (the Super Weight reference code's).
      tokens: int [1, seq] token ids to use instead of `prompt`.
      threshold: the spike threshold on |down_proj input| and |output|.
      ratio: a further row counts when its own contribution |weight x input spike| is at least this fraction of
        the largest |output|.

    Returns:
      The `SuperWeight`s, by layer; [] when no layer spikes.
    """
    spikes = down_proj_spikes(model, prompt_tokens(tokenizer, prompt) if tokens is None else tokens)
    return super_weights_from_spikes(model, spikes, threshold=threshold, ratio=ratio)


def super_weights_from_spikes(model: nnx.Module, spikes: DownProjSpikes, *, threshold: float = SPIKE_THRESHOLD,
                              ratio: float = SUPER_RATIO) -> list[SuperWeight]:
    """The super weights that `spikes` point at (the rule of `find_super_weights`, module doc): for a caller that
    keeps the per-layer signal too (Figures 3 / 10) without a second forward pass.

    Args:
      model: the mwjax causal LM `spikes` were measured on (its down_proj kernels give the weights).
      spikes: per-layer down_proj spikes (`down_proj_spikes`).
      threshold: the spike threshold on |down_proj input| and |output|.
      ratio: a further row counts when its own contribution |weight x input spike| is at least this fraction of
        the largest |output|.

    Returns:
      The `SuperWeight`s, by layer; [] when no layer spikes.
    """
    found = []
    for layer in range(model.config.num_hidden_layers):
        x, y = spikes.input.value[layer], spikes.output.value[layer]
        if abs(x) > threshold and abs(y) > threshold:
            top, col = int(spikes.output.channel[layer]), int(spikes.input.channel[layer])
            weights = np.asarray(down_proj_kernel(model, layer)[col], np.float64)  # [d_model]: weight[:, col]
            contribution = np.abs(weights * x)
            rows = [top] + [int(r) for r in np.argsort(-contribution)
                            if r != top and contribution[r] >= ratio * abs(y)]
            found += [SuperWeight(layer=layer, row=row, col=col, weight=float(weights[row]), input_value=float(x),
                                  output_value=float(y), position=int(spikes.output.position[layer]))
                      for row in rows]
    return found


@dataclasses.dataclass(frozen=True)
class IterativeDetection:
    """What `find_super_weights_iteratively` found: the super weights in detection order, and the spikes left in
    the late layers (`late_from` on), which it reports but never takes (SmolLM2's last three layers).

    rounds: the scans run (one more than the super weights found when it stopped on its own).
    """

    super_weights: tuple[SuperWeight, ...]
    late_spikes: tuple[SuperWeight, ...]  # the argmax (row, col) of each late spiking layer after the last round
    late_from: int
    rounds: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready.

        Returns:
          {"super_weights": [...], "late_spikes": [...], "late_from", "rounds"}.
        """
        return {"super_weights": [sw.to_dict() for sw in self.super_weights],
                "late_spikes": [sw.to_dict() for sw in self.late_spikes], "late_from": self.late_from,
                "rounds": self.rounds}


def _pruned(model: nnx.Module, sws) -> nnx.Module:
    """A copy of `model` whose down_proj weights at `sws` are zero (other arrays shared), for the next scan."""
    out = nnx.clone(model)
    for sw in sws:
        kernel = out.model.layers[sw.layer].mlp.down_proj.kernel
        kernel[...] = kernel[...].at[sw.col, sw.row].set(0)  # weight[row, col] = kernel[col, row]
    return out


def find_super_weights_iteratively(model: nnx.Module, tokenizer=None, prompt: str = DEFAULT_PROMPT, *,
                                   tokens: jnp.ndarray | None = None, threshold: float = SPIKE_THRESHOLD,
                                   late_fraction: float = LATE_FRACTION, max_rounds: int = 32) -> IterativeDetection:
    """The Super Weight's detection as its Section 3.1 runs it: scan, take the super weight of the earliest layer
    whose down_proj input and output both spike above `threshold` (the argmax row and column), prune it, scan
    again, until no layer before the late ones spikes. One weight a round, so several rows of one column (Phi-3,
    Llama-3-8B) come one after the other, and a spike that only the first super weight caused (its super
    activation carried on) disappears once it is pruned instead of being taken too.

    Args:
      model: an mwjax causal LM with dense FFNs.
      tokenizer: an HF tokenizer for `prompt` (or `tokens`).
      prompt: the detection prompt (the reference code's).
      tokens: int [1, seq] token ids instead of `prompt`.
      threshold: the spike threshold on |down_proj input| and |output| (the reference's 50).
      late_fraction: the last ceil(late_fraction x L) layers are late: their spikes are reported, never taken
        (LATE_FRACTION: 1/8, module doc of `research.defaults`).
      max_rounds: stop after this many scans (the paper's models have at most six super weights).

    Returns:
      The `IterativeDetection`.
    """
    tokens = prompt_tokens(tokenizer, prompt) if tokens is None else tokens
    if not 0 <= late_fraction < 1:
        raise ValueError(f"late_fraction={late_fraction}: a fraction of the layers in [0, 1)")
    layers = model.config.num_hidden_layers
    late_from = layers - int(np.ceil(late_fraction * layers))
    found: list[SuperWeight] = []
    rounds = 0
    while rounds < max_rounds:
        rounds += 1
        spikes = down_proj_spikes(_pruned(model, found), tokens)
        spiking = [(layer, _argmax_weight(model, spikes, layer)) for layer in range(layers)
                   if abs(spikes.input.value[layer]) > threshold and abs(spikes.output.value[layer]) > threshold]
        early = [sw for layer, sw in spiking if layer < late_from]
        coordinates = {(sw.layer, sw.row, sw.col) for sw in found}
        if not early or (early[0].layer, early[0].row, early[0].col) in coordinates:  # none left, or a zero weight
            break
        found.append(early[0])
    return IterativeDetection(tuple(found), tuple(sw for layer, sw in spiking if layer >= late_from), late_from,
                              rounds)


def _argmax_weight(model: nnx.Module, spikes: DownProjSpikes, layer: int) -> SuperWeight:
    """The weight the spikes of `layer` point at: row = the output spike's channel, col = the input's."""
    row, col = int(spikes.output.channel[layer]), int(spikes.input.channel[layer])
    return SuperWeight(layer=layer, row=row, col=col, weight=float(down_proj_kernel(model, layer)[col, row]),
                       input_value=float(spikes.input.value[layer]), output_value=float(spikes.output.value[layer]),
                       position=int(spikes.output.position[layer]))


def down_proj_kernel(model: nnx.Module, layer: int) -> jnp.ndarray:
    """down_proj kernel of a dense FFN; an out-of-range `layer` is a ValueError.

    Args:
      model: an mwjax causal LM with dense FFNs.
      layer: 0-based decoder layer.

    Returns:
      The kernel [d_ff, d_model] (HF `down_proj.weight.T`).
    """
    check_layer(model.config, layer)
    return model.model.layers[layer].mlp.down_proj.kernel[...]


def check_super_weight(config, sw: SuperWeight) -> None:
    """`sw`'s layer, row and col address a weight of the model (an index past the weight would be clamped by jax:
    another weight read or edited, silently); ValueError naming the weight and the ranges otherwise.

    Args:
      config: the model's config (`num_hidden_layers`, `hidden_size`, `intermediate_size`).
      sw: the super weight to check.
    """
    check_layer(config, sw.layer)
    d_model, d_ff = config.hidden_size, config.intermediate_size
    if not (0 <= sw.row < d_model and 0 <= sw.col < d_ff):
        raise ValueError(f"super weight {sw.label}: down_proj.weight is [{d_model}, {d_ff}] (HF [out, in]): row must "
                         f"lie in [0, {d_model}) and col in [0, {d_ff})")


def super_weight_at(model: nnx.Module, layer: int, row: int, col: int) -> SuperWeight:
    """The weight HF `model.layers[layer].mlp.down_proj.weight[row, col]` as a SuperWeight, its coordinates
    checked (`check_super_weight`).

    Args:
      model: an mwjax causal LM with dense FFNs.
      layer: 0-based decoder layer.
      row: output channel (hidden dimension).
      col: input channel (intermediate dimension).

    Returns:
      The `SuperWeight`, its weight read from the model; no spikes (input / output values NaN, position -1).
    """
    sw = SuperWeight(layer, row, col, float("nan"), float("nan"), float("nan"), -1)
    check_super_weight(model.config, sw)
    return dataclasses.replace(sw, weight=float(down_proj_kernel(model, layer)[col, row]))


# ------------------------------------------------------------------------------------------- statistics


def activation_stats(model: nnx.Module, tokens, *, top_k: int = 3, batch_size: int = 8,
                     points: tuple[str, ...] = ("hidden", "intermediate"),
                     progress: bool = True) -> dict[str, Magnitudes]:
    """Per layer, the top-k and median |value| of each point over each whole sequence, averaged over sequences.

    This is what House of Cards' Figure 3 and the Massive Activations thesis' Figure 4.4 plot. For a mixture
    of experts the intermediate statistics run over every expert's state, routed or not.

    Args:
      model: an mwjax causal LM.
      tokens: int [num_sequences, seq] (e.g. 100 chunks of a corpus).
      top_k: how many of the largest |values| per layer.
      batch_size: sequences per forward pass.
      points: the probe points to measure, e.g. "hidden" (h_l) and "intermediate" (the input of down_proj).
      progress: show a progress bar over the batches.

    Returns:
      {point: `Magnitudes`} (top [L, top_k], median [L], float64).
    """
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [num_sequences, seq], got shape {tokens.shape}")
    config = probes.ProbeConfig(points=points, full=False, top_k=top_k, median=True, scope="sequence")
    sums = {p: {"top": 0.0, "median": 0.0} for p in points}
    starts = range(0, len(tokens), batch_size)
    for start in track(starts, len(starts), "activation stats", enabled=progress):
        result = probes.record(model, jnp.asarray(tokens[start:start + batch_size]), config)
        for p in points:
            sums[p]["top"] = sums[p]["top"] + np.abs(np.asarray(result.stack(p, "top_values"))).sum(1)
            sums[p]["median"] = sums[p]["median"] + np.asarray(result.stack(p, "median")).sum(1)
    n = len(tokens)
    return {p: Magnitudes(np.asarray(s["top"], np.float64) / n, np.asarray(s["median"], np.float64) / n)
            for p, s in sums.items()}


# ------------------------------------------------------------------------------------------- massive activations


@dataclasses.dataclass(frozen=True)
class MassiveActivations:
    """Massive activations of the hidden state after `layer` on a sample of sequences (Sun et al.).

    An entry is massive when |x| > threshold = max(100, 1000 x the median |x| of its sequence's hidden
    state) (the thesis' criterion, with the median averaged over the sample). dims: the feature dims
    holding them, largest first; positions: the token positions where they occurred.
    """

    layer: int
    dims: tuple[int, ...]
    positions: tuple[int, ...]
    threshold: float
    median: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready.

        Returns:
          The fields as a dict.
        """
        return dataclasses.asdict(self)


def hidden_states(model: nnx.Module, tokens, layer: int, batch_size: int = 8) -> np.ndarray:
    """The hidden state after `layer` (HF `hidden_states[layer + 1]`), batch by batch with progress, on the host
    for the statistics that follow (`massive_activations_in`, `attacks.activation_means`) to share one pass over
    the model.

    Args:
      model: an mwjax causal LM.
      tokens: int [num_sequences, seq] token ids.
      layer: 0-based decoder layer.
      batch_size: sequences per forward pass.

    Returns:
      float32 [num_sequences, seq, d_model] numpy array.
    """
    tokens = np.asarray(tokens, np.int32)
    config = probes.ProbeConfig(points=("hidden",), layers=(layer,))
    values = []
    starts = range(0, len(tokens), batch_size)
    for start in track(starts, len(starts), f"hidden states after layer {layer}: batches"):
        result = probes.record(model, jnp.asarray(tokens[start:start + batch_size]), config)
        values.append(np.asarray(result.hidden[layer].full, np.float32))
    return np.concatenate(values)


def find_massive_activations(model: nnx.Module, tokens, layer: int, *, min_abs: float = MASSIVE_MIN,
                             ratio: float = MASSIVE_RATIO, batch_size: int = 8) -> MassiveActivations:
    """Locate the massive activations after `layer` (`massive_activations_in` the `hidden_states`).

    Args:
      model: an mwjax causal LM.
      tokens: int [num_sequences, seq] token ids.
      layer: 0-based decoder layer.
      min_abs: the criterion's floor on |x| (100).
      ratio: the criterion's multiple of the median |x| (1000).
      batch_size: sequences per forward pass.

    Returns:
      The `MassiveActivations`.
    """
    return massive_activations_in(hidden_states(model, tokens, layer, batch_size), layer, min_abs=min_abs,
                                  ratio=ratio)


def massive_activations_in(hidden: np.ndarray, layer: int, *, min_abs: float = MASSIVE_MIN,
                           ratio: float = MASSIVE_RATIO) -> MassiveActivations:
    """The massive activations of `hidden`: the (position, dim) entries with |x| > max(min_abs, ratio x the mean
    over sequences of their median |x|).

    Args:
      hidden: [num_sequences, seq, d_model] hidden state after `layer` (`hidden_states`).
      layer: the 0-based layer `hidden` comes after (recorded in the result).
      min_abs: the criterion's floor on |x|.
      ratio: the criterion's multiple of the median |x|.

    Returns:
      The `MassiveActivations`: dims ordered by their largest |x|, the positions where any occurred, the
      threshold and the median.
    """
    mags = np.abs(hidden)  # [n, seq, d]
    median = float(np.mean(np.median(mags.reshape(len(mags), -1), axis=1)))
    threshold = max(min_abs, ratio * median)
    where = np.argwhere(mags > threshold)
    peak = {}
    for _, pos, dim in where:
        peak[int(dim)] = max(peak.get(int(dim), 0.0), float(mags[_, pos, dim]))
    return MassiveActivations(layer=layer, dims=tuple(sorted(peak, key=peak.get, reverse=True)),
                              positions=tuple(sorted({int(p) for p in where[:, 1]})), threshold=threshold,
                              median=median)
