"""Activation probes: typed `nnx.Intermediate` collections, switched on by a `ProbeConfig`.

Every model takes `probes=ProbeConfig(...)`; the probed blocks `sow` into one `nnx.Intermediate`
subclass per probe point, read back with `nnx.capture`:

    logits, hidden = nnx.capture(model, probes.HiddenState)(tokens, probes=ProbeConfig(points=("hidden",)))

`capture` below does that under `jax.jit` and returns a `ProbeResult`: one field per point, each
{layer: `Stats`}, e.g. `result.hidden[12].full`.
Reductions run inside the graph, so an 8B model at 4096 tokens need not ship [seq, d_ff] tensors
per layer to the host: with `full=False, top_k=3, median=True` each point returns
`top_values` / `top_indices` [..., 3] (largest |x| over the feature axis, values keep their sign)
and `median` [...] (median |x|). With `scope="sequence"` the reductions run over all tokens and
features of each sequence instead ([batch, k] / [batch]), and `top_positions` says which token
each top value sits at.

A stacked model (`mwjax.nn.stack`) records inside its scan over the layers and sows each point
once for all of them (`LayerStacked`); `capture` returns the same result as for the unrolled model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from mwjax.core.compiled import jit_model


class Probe(nnx.Intermediate):
    """Base class of mwjax's probe collections."""


class HiddenState(Probe):
    """Residual stream after decoder layer l: HF `output_hidden_states[l + 1]`."""


class AttentionInput(Probe):
    """Output of `input_layernorm` (the attention block's input; OLMo 2, without a pre-norm: the layer's input)."""


class MLPInput(Probe):
    """Output of the norm before the FFN (`post_attention_layernorm` in Llama): the FFN's input x (OLMo 2, without
    a pre-norm: the residual stream after the attention's residual add)."""


class AttentionOutput(Probe):
    """Output of `o_proj`, before the residual add."""


class AttentionResidual(Probe):
    """Residual stream after the attention block's residual add, before the FFN: House of Cards' ĥ_l in
    Eq. (1), `h_{l-1} + ATTN(LN(h_{l-1}))` (Gemma 2 / 3, OLMo 2: with the post-attention norm). No HF output
    holds it."""


class AttentionProbs(Probe):
    """Attention probabilities [batch, heads, q, k] (HF `output_attentions`)."""


class IntermediateState(Probe):
    """The paper's intermediate state `act(x W_gate) * (x W_up)`: the input of `down_proj` [b, t, d_ff].

    Mixtral: every expert's, routed or not, [b, t, num_experts, d_ff].
    """


class GateActivation(Probe):
    """act(x W_gate) [b, t, d_ff]: the gate factor of the intermediate state (Mixtral: per expert,
    [b, t, E, d_ff])."""


class UpProjOutput(Probe):
    """x W_up [b, t, d_ff]: the intermediate state before the gate multiplies it (Mixtral: per expert)."""


class DownProjOutput(Probe):
    """Output of `down_proj` [b, t, d_model] (the FFN output of a dense model; in Gemma 2 / 3 and OLMo 2 before
    `post_feedforward_layernorm`). Mixtral: every expert's, before the routing weights, [b, t, E, d_model]."""


class RouterProbs(Probe):
    """Mixture-of-experts router probabilities [b, t, num_experts], float32: the softmax of the router
    logits over all experts (HF's `router_logits`, softmaxed), before top-k selection."""


@struct.dataclass
class Stats:
    """What one probe point recorded at one layer, as its `ProbeConfig` asked (what it did not ask for is None).

    full: the whole tensor (e.g. [b, t, d_model] for `hidden`).
    top_values / top_indices: [..., k] the k largest |x| over the feature axis (values keep their sign) and
      their features; scope="sequence": over tokens and features, [b, k], with `top_positions` [b, k].
    median: [...] the median |x| over the feature axis ([b] with scope="sequence").
    A module called several times (decoding steps) recorded each call: a leading axis over the calls.
    """

    full: jax.Array | None = None
    top_values: jax.Array | None = None
    top_indices: jax.Array | None = None
    top_positions: jax.Array | None = None
    median: jax.Array | None = None

    def get(self, stat: str) -> jax.Array:
        """The statistic named `stat`; a ValueError naming the config option when it was not recorded.

        Args:
          stat: a field above: "full", "top_values", "top_indices", "top_positions" or "median".

        Returns:
          Its array.
        """
        value = getattr(self, stat)
        if value is None:
            raise ValueError(f"probe statistic {stat!r} was not recorded: ask ProbeConfig for it (full=True, "
                             "top_k > 0, median=True, scope='sequence' for top_positions)")
        return value


def _point(probe: type[Probe]):
    return dataclasses.field(default_factory=dict, metadata={"probe": probe})


@struct.dataclass
class ProbeResult:
    """Everything a probed forward pass recorded: one field per probe point, each {layer (0-based): Stats} in
    ascending layer order ({} where the point was not probed): `result.hidden[12].full`,
    `result.intermediate[1].top_values`. A pytree."""

    hidden: dict[int, Stats] = _point(HiddenState)
    attn_input: dict[int, Stats] = _point(AttentionInput)
    mlp_input: dict[int, Stats] = _point(MLPInput)
    attn_output: dict[int, Stats] = _point(AttentionOutput)
    attn_residual: dict[int, Stats] = _point(AttentionResidual)
    attn_probs: dict[int, Stats] = _point(AttentionProbs)
    gate_activation: dict[int, Stats] = _point(GateActivation)
    up_proj_output: dict[int, Stats] = _point(UpProjOutput)
    intermediate: dict[int, Stats] = _point(IntermediateState)
    down_proj_output: dict[int, Stats] = _point(DownProjOutput)
    router_probs: dict[int, Stats] = _point(RouterProbs)

    def point(self, name: str) -> dict[int, Stats]:
        """{layer: Stats} of the point named `name`, for code that loops over points.

        Args:
          name: a probe point (a key of POINTS, e.g. "hidden"); any other name raises ValueError.

        Returns:
          {layer (0-based): Stats}, {} where the point was not probed.
        """
        if name not in POINTS:
            raise ValueError(f"unknown probe point {name!r}; choose from {sorted(POINTS)}")
        return getattr(self, name)

    def stack(self, point: str, stat: str = "full") -> jax.Array:
        """One statistic of one point for all probed layers, stacked.

        Args:
          point: a probe point (a key of POINTS); ValueError when it was not recorded.
          stat: the Stats field to stack (ValueError when it was not recorded).

        Returns:
          [number of probed layers, ...], in ascending layer order.
        """
        layers = self.point(point)
        if not layers:
            raise ValueError(f"probe point {point!r} was not recorded: add it to ProbeConfig.points")
        return jnp.stack([stats.get(stat) for stats in layers.values()])


# the probe points by name: ProbeResult's fields, each with the Intermediate collection its modules sow into
POINTS: dict[str, type[Probe]] = {f.name: f.metadata["probe"] for f in dataclasses.fields(ProbeResult)}


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """Which points to record, at which layers (None = all, 0-based), and in what form."""

    points: tuple[str, ...] = ("hidden", "intermediate")
    layers: tuple[int, ...] | None = None
    full: bool = True  # the whole tensor
    top_k: int = 0  # > 0: the top-k |x| over the last axis, with indices
    median: bool = False  # median |x| over the last axis
    scope: str = "token"  # "token": reduce over features; "sequence": over tokens and features

    def __post_init__(self):
        object.__setattr__(self, "points", tuple(self.points))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))
        unknown = [p for p in self.points if p not in POINTS]
        if unknown:
            raise ValueError(f"unknown probe points {unknown}; choose from {sorted(POINTS)}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (self.full or self.top_k or self.median):
            raise ValueError("ProbeConfig records nothing: set full=True, top_k > 0 or median=True")
        if self.scope not in ("token", "sequence"):
            raise ValueError(f"scope must be 'token' or 'sequence', got {self.scope!r}")

    @property
    def types(self) -> tuple[type[Probe], ...]:
        """The Probe collections (`nnx.Intermediate` subclasses) of `points`, in order: what `nnx.capture` takes."""
        return tuple(POINTS[p] for p in self.points)

    def wants(self, point: str, layer: int | None) -> bool:
        """Whether `point` is recorded at `layer`.

        Args:
          point: a probe point name.
          layer: the 0-based layer; None: at some layer (`mwjax.nn.stack`'s scan, whose template layer has no
            index of its own, records every layer and keeps the wanted ones).

        Returns:
          True when the point is recorded there.
        """
        if point not in self.points:
            return False
        return self.layers is None or (bool(self.layers) if layer is None else layer in self.layers)

    def layers_of(self, num_layers: int) -> tuple[int, ...]:
        """The layers recorded in a model of `num_layers` layers, ascending.

        Args:
          num_layers: the model's decoder layers.

        Returns:
          The 0-based layers: all when `layers` is None, else those of `layers` below num_layers.
        """
        return tuple(layer for layer in range(num_layers) if self.layers is None or layer in self.layers)


def reduce(x: jax.Array, config: ProbeConfig) -> dict[str, jax.Array]:
    """The statistics of `config` over the last axis of x (or, scope="sequence", over all but the first).

    Args:
      x: the probed value, e.g. [b, t, d_model] or [b, t, d_ff].
      config: which statistics (full, top_k, median) and over what scope.

    Returns:
      {stat: array}, the `Stats` fields the config asks for: "full" (x), "top_values" / "top_indices" [..., k],
        "median" [...]; scope="sequence": [b, k] / [b], and "top_positions" [b, k] (the flat index over the axes
        between the first and the last: the token for x [b, t, features]).
    """
    out = {}
    if config.full:
        out["full"] = x
    if config.top_k or config.median:
        flat = x if config.scope == "token" else x.reshape(x.shape[0], -1)
        mag = jnp.abs(flat.astype(jnp.float32))
        if config.top_k:
            _, idx = jax.lax.top_k(mag, min(config.top_k, flat.shape[-1]))
            out["top_values"] = jnp.take_along_axis(flat, idx, axis=-1)
            if config.scope == "token":
                out["top_indices"] = idx
            else:  # flat index over [seq, features] -> (position, feature)
                out["top_positions"], out["top_indices"] = jnp.divmod(idx, x.shape[-1])
        if config.median:
            out["median"] = jnp.median(mag, axis=-1)
    return out


def sow(module: nnx.Module, point: str, layer: int | None, value: jax.Array, config: ProbeConfig | None) -> None:
    """Record `value` at `point` of `layer` if the config asks for it (a no-op otherwise).

    Args:
      module: the module that sows (`nnx.Module.sow` into the point's Probe collection).
      point: the probe point name (a key of POINTS).
      layer: the 0-based layer; None: the layer a stacked layers' scan runs.
      value: the tensor, reduced by `reduce` before it is sown.
      config: the forward pass's ProbeConfig; None records nothing.
    """
    if config is not None and config.wants(point, layer):
        module.sow(POINTS[point], point, reduce(value, config))


def sow_layers(module: nnx.Module, point: str, layers: tuple[int, ...], stats: dict[str, jax.Array]) -> None:
    """Record the stats of `point` at `layers` at once (a stacked layers' scan), as one `LayerStacked`.

    Args:
      module: the module that sows (the `mwjax.nn.stack.LayerStack`).
      point: the probe point name (a key of POINTS).
      layers: the 0-based layers the slots hold, ascending.
      stats: {stat: [len(layers), ...]}, slot s holding layer `layers[s]`.
    """
    module.sow(POINTS[point], point, LayerStacked(stats, layers))


@struct.dataclass
class LayerStacked:
    """What one point recorded in a scan over stacked layers (`mwjax.nn.stack`): `stats` {stat: [n, ...]},
    whose slot s holds layer `layers[s]` (n = len(layers)). `collect` gives each layer its slice."""

    stats: dict[str, jax.Array]
    layers: tuple[int, ...] = struct.field(pytree_node=False)

    def per_layer(self) -> dict[int, dict[str, jax.Array]]:
        """{layer: {stat: value}}: slot s of every stat, given to layer `layers[s]`."""
        return {layer: {stat: x[slot] for stat, x in self.stats.items()} for slot, layer in enumerate(self.layers)}


def capture(model: nnx.Module, tokens: jax.Array, config: ProbeConfig, **model_kwargs) -> tuple[jax.Array, ProbeResult]:
    """Run `model(tokens, probes=config, **model_kwargs)` jitted; return the logits and what the probes recorded.

    The compiled program returns what the modules sowed, regrouped by `collect` after it: a stacked model's
    records leave it stacked over the layers, so slicing them per layer adds nothing per layer to compile.

    Args:
      model: an mwjax causal LM (HF `*ForCausalLM` equivalent), unrolled or stacked.
      tokens: int32 [b, t] token ids.
      config: which points, layers and statistics to record (static: a new config compiles anew).
      model_kwargs: positions, attention_mask, ffn_masks, edits (arrays / pytrees, traced).

    Returns:
      (logits [b, t, vocab], ProbeResult).
    """
    logits, states = _capture(model, config, tokens, model_kwargs, True)
    return logits, collect(states)


def record(model: nnx.Module, tokens: jax.Array, config: ProbeConfig, **model_kwargs) -> ProbeResult:
    """`capture` without the logits: the ProbeResult alone.

    The compiled program returns the records alone, so XLA drops what none of them depends on (the unembedding,
    and in an unrolled model every layer after the last probed one): probing layer 12 of 30 costs 12 layers, not
    the whole model.

    Args:
      model: an mwjax causal LM, unrolled or stacked.
      tokens: int32 [b, t] token ids.
      config: which points, layers and statistics to record.
      model_kwargs: positions, attention_mask, ffn_masks, edits (arrays / pytrees, traced).

    Returns:
      The ProbeResult.
    """
    return collect(_capture(model, config, tokens, model_kwargs, False)[1])


@jit_model(static_argnums=(0, 3))
def _capture(model, config, tokens, model_kwargs, logits: bool):
    out, *states = nnx.capture(model, *config.types)(tokens, probes=config, **model_kwargs)
    return (out if logits else None), states


def collect(states: Sequence[nnx.State]) -> ProbeResult:
    """Regroup captured States (nested by module path) into a ProbeResult.

    A layer's modules sow under `model.layers[i]` (the layer is the integer after "layers" in the path); a
    stacked layers' scan sows `LayerStacked` values (every recorded layer) under `model.layers` itself.

    Args:
      states: the States `nnx.capture` returned, one per Probe collection.

    Returns:
      The ProbeResult, each point's layers ascending; a module that sowed once per call (decoding steps) gets
        Stats stacked over the calls.
    """
    result: dict[str, dict[int, Stats]] = {}
    for state in states:
        for path, value in nnx.to_flat_state(state):
            point = path[-1]
            sown = value.get_value() if hasattr(value, "get_value") else value.value
            calls = [call.per_layer() if isinstance(call, LayerStacked) else {int(path[path.index("layers") + 1]): call}
                     for call in sown]  # one {layer: {stat: x}} per call
            for layer in calls[0]:
                stats = [Stats(**call[layer]) for call in calls]
                result.setdefault(point, {})[layer] = stats[0] if len(stats) == 1 else _stack_calls(stats)
    return ProbeResult(**{p: dict(sorted(layers.items())) for p, layers in result.items()})


def _stack_calls(calls: list[Stats]) -> Stats:
    """A module called several times (e.g. per decoding step) sowed once per call: stacked over the calls."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *calls)
