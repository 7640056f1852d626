"""Mixtral (HF `MixtralForCausalLM`): Mistral's attention with a sparse mixture-of-experts FFN.

Names. HF transformers 5 calls the MoE block `model.layers[i].mlp` with the router `mlp.gate` and
all experts fused in `mlp.experts.gate_up_proj` [E, 2 d_ff, d] / `mlp.experts.down_proj`
[E, d, d_ff]; Hub checkpoints use `block_sparse_moe.gate` and per-expert `block_sparse_moe.experts.{e}.
{w1,w2,w3}`. mwjax keeps the transformers-5 block names with one llama-style MLP per expert:

    mwjax                                    Hub checkpoint                          transformers 5
    mlp.gate.kernel [d, E]                   block_sparse_moe.gate.weight [E, d]     mlp.gate.weight
    mlp.experts[e].gate_proj.kernel [d, f]   block_sparse_moe.experts.{e}.w1.weight  mlp.experts.gate_up_proj[e, :f]
    mlp.experts[e].up_proj.kernel   [d, f]   block_sparse_moe.experts.{e}.w3.weight  mlp.experts.gate_up_proj[e, f:]
    mlp.experts[e].down_proj.kernel [f, d]   block_sparse_moe.experts.{e}.w2.weight  mlp.experts.down_proj[e]

(f = d_ff = intermediate_size), so "row i of expert e's W_gate / W_up" is
`mlp.experts[e].{gate,up}_proj.kernel[:, i]`, exactly as in a dense model, and a
`RowMask(expert=e)` reaches that expert only.

Routing (HF `MixtralTopKRouter`): router logits in the compute dtype, softmax in float32, the
top-k probabilities renormalised to sum to 1; the expert outputs are weighted by them and summed
in expert order.

Cost. On TPU and GPU only the chosen experts run (`routed_experts`): the (token, expert) pairs are sorted
by expert and each projection is one `jax.lax.ragged_dot` over the experts' weights stacked at call time,
as HF's dispatch loop computes them (LoRA / DoRA adapters on the experts and FFN row masks included).
Every expert runs on every token instead (`all_experts`: the unselected ones weighted 0, which is exact;
num_local_experts / num_experts_per_tok times the FFN cost, 4x for Mixtral-8x7B) on CPU, where jax
lowers a ragged matmul as a dense one per group (costlier still), when a probe or an activation edit
asks for a layer's "intermediate" / "down_proj_output" states (every expert's: what finding the massive
weights of the expert the router picks for bos needs; a [b, t, E, d_ff] state while probed), or when
adapters sit on some experts only. `model.set_attributes(dispatch="routed" | "all_experts")` forces a
path (the probes' need still wins).

Probes of the MoE block (layer i):
- "router_probs":     [b, t, E] float32, softmax of the router logits (House of Cards, Figure 5)
- "intermediate":     [b, t, E, d_ff], each expert's act(x W_gate) * (x W_up), routed or not
- "gate_activation" / "up_proj_output": [b, t, E, d_ff], each expert's two factors of it
- "down_proj_output": [b, t, E, d], each expert's down_proj output before the routing weights
An activation edit at "intermediate" / "down_proj_output" applies to every expert's [b, t, .] state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mwjax.families.llama.model import DecoderLayer, LlamaForCausalLM
from mwjax.instrument import masks
from mwjax.nn.base import Taps
from mwjax.nn.blocks import MLP, RoutedFFN
from mwjax.nn.config import ModelConfig
from mwjax.nn.layers import Linear

DISPATCH = ("auto", "routed", "all_experts")


class MixtralSparseMoeBlock(RoutedFFN):
    """HF `MixtralSparseMoeBlock`: a top-k router (`gate`) over `experts` (one gated MLP each)."""

    def __init__(self, config: ModelConfig, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layer_idx = layer_idx
        self.top_k = config.num_experts_per_tok
        self.gate = Linear(config.hidden_size, config.num_local_experts, axes=("embed", "experts"), use_bias=False,
                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.experts = nnx.List([MLP(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                 for _ in range(config.num_local_experts)])
        # DISPATCH: "auto" routes (`routed_experts`) on TPU / GPU, runs every expert on CPU, where jax lowers a
        # ragged matmul as one dense matmul per group (k times the all-experts cost);
        # `model.set_attributes(dispatch="routed")` forces the routed path everywhere
        self.dispatch = "auto"

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """HF `MixtralTopKRouter`: the router's probabilities and each token's top-k experts.

        Args:
          x: [b, t, d_model] the FFN input (after `post_attention_layernorm`).

        Returns:
          (router probabilities [b, t, E] float32, top-k weights [b, t, k] float32 summing to 1, their experts
          [b, t, k] int32), the k choices of a token in ascending expert order (the order HF adds them in).
        """
        probs = jax.nn.softmax(self.gate(x).astype(jnp.float32), axis=-1)
        top, chosen = jax.lax.top_k(probs, self.top_k)  # [b, t, k]
        top = top / jnp.sum(top, axis=-1, keepdims=True)
        order = jnp.argsort(chosen, axis=-1)
        return probs, jnp.take_along_axis(top, order, axis=-1), jnp.take_along_axis(chosen, order, axis=-1)

    def __call__(self, x: jax.Array, row_mask: masks.RowMask | None, taps: Taps) -> jax.Array:
        i = self.layer_idx
        probs, top, chosen = self.route(x)
        taps.record(self, "router_probs", i, probs)
        expert_masks = [row_mask if row_mask is not None and row_mask.expert == e else None
                        for e in range(len(self.experts))]
        if self.dispatch not in DISPATCH:
            raise ValueError(f"unknown MoE dispatch {self.dispatch!r}; choose from {DISPATCH}")
        routed = self.dispatch == "routed" or (self.dispatch == "auto" and jax.default_backend() != "cpu")
        every_expert = ("gate_activation", "up_proj_output", "intermediate", "down_proj_output")  # probed or edited
        if not routed or any(taps.touches(point, i) for point in every_expert):
            return self.all_experts(x, top, chosen, expert_masks, taps)
        for name in ("gate_proj", "up_proj", "down_proj"):
            if len({type(getattr(expert, name)) for expert in self.experts}) > 1:  # adapters on some experts only
                return self.all_experts(x, top, chosen, expert_masks, taps)
        return self.routed_experts(x, top, chosen, expert_masks)

    def routed_experts(self, x: jax.Array, top: jax.Array, chosen: jax.Array, expert_masks) -> jax.Array:
        """Only the chosen experts run (HF's dispatch loop).

        The b t k (token, expert) pairs are sorted by expert, each projection one ragged matmul over the experts'
        stacked weights (`Linear.grouped`).

        Args:
          x: [b, t, d_model] the FFN input.
          top: [b, t, k] float32 routing weights (`route`).
          chosen: [b, t, k] int32 experts (`route`), ascending per token.
          expert_masks: [E] the FFN row mask of each expert (on its W_gate / W_up rows), None for the unmasked.

        Returns:
          [b, t, d_model] the block's output, the weighted expert outputs summed in expert order.
        """
        b, t, d = x.shape
        k = self.top_k
        experts = chosen.reshape(-1)  # [b t k]
        order = jnp.argsort(experts, stable=True)  # pairs grouped by expert
        groups = experts[order]
        sizes = jnp.bincount(experts, length=len(self.experts)).astype(jnp.int32)
        xs = x.reshape(b * t, d)[order // k]  # [b t k, d], sorted
        grouped = lambda name, h, column_masks: type(getattr(self.experts[0], name)).grouped(
            [getattr(expert, name) for expert in self.experts], h, sizes, groups, column_masks)
        h = self.experts[0].act(grouped("gate_proj", xs, expert_masks)) * grouped("up_proj", xs, expert_masks)
        out = grouped("down_proj", h, [None] * len(self.experts))  # [b t k, d]
        weighted = (out * top.reshape(-1)[order][:, None]).astype(x.dtype)  # as HF: weight, then cast
        pairs = jnp.zeros_like(weighted).at[order].set(weighted).reshape(b, t, k, d)  # back to token order
        y = pairs[:, :, 0]
        for j in range(1, k):  # in ascending expert order, as HF's index_add_ loop
            y = y + pairs[:, :, j]
        return y

    def all_experts(self, x: jax.Array, top: jax.Array, chosen: jax.Array, expert_masks, taps: Taps) -> jax.Array:
        """Every expert on every token, the unselected ones weighted 0 (exact).

        What probes of every expert's intermediate state / down_proj output and activation edits there need;
        records "gate_activation", "up_proj_output", "intermediate" and "down_proj_output" [b, t, E, .].

        Args:
          x: [b, t, d_model] the FFN input.
          top: [b, t, k] float32 routing weights (`route`).
          chosen: [b, t, k] int32 experts (`route`).
          expert_masks: [E] the FFN row mask of each expert (on its W_gate / W_up rows), None for the unmasked.
          taps: the forward's probes and activation edits.

        Returns:
          [b, t, d_model] the block's output.
        """
        i = self.layer_idx
        weights = jnp.sum(jax.nn.one_hot(chosen, len(self.experts), dtype=top.dtype) * top[..., None], axis=-2)
        gates, ups = zip(*(expert.gate_and_up(x, m) for expert, m in zip(self.experts, expert_masks, strict=True)),
                         strict=True)  # [b, t, d_ff] each
        taps.record(self, "gate_activation", i, jnp.stack(gates, axis=2))
        taps.record(self, "up_proj_output", i, jnp.stack(ups, axis=2))
        hs = [taps.edit("intermediate", i, gate * up) for gate, up in zip(gates, ups, strict=True)]
        taps.record(self, "intermediate", i, jnp.stack(hs, axis=2))
        outs = [taps.edit("down_proj_output", i, expert.down_proj(h))  # [b, t, d] each
                for expert, h in zip(self.experts, hs, strict=True)]
        taps.record(self, "down_proj_output", i, jnp.stack(outs, axis=2))
        y = jnp.zeros_like(x)
        for e, out in enumerate(outs):  # in expert order, as HF's index_add_ loop
            y = y + (out * weights[..., e, None]).astype(x.dtype)
        return y


class MixtralForCausalLM(LlamaForCausalLM):
    """HF `MixtralForCausalLM`."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs):
        if config.num_local_experts is None:
            raise ValueError("a Mixtral config needs num_local_experts and num_experts_per_tok")
        self.init_model(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                        layer=functools.partial(DecoderLayer, mlp_cls=MixtralSparseMoeBlock))

    def validate_masks(self, ffn_masks: masks.FFNMasks) -> None:
        """Check FFN row masks against the config (`masks.validate`), each naming one of the E experts.

        Args:
          ffn_masks: {layer: RowMask} with `RowMask.expert` set; a ValueError names the first bad one.
        """
        cfg = self.config
        masks.validate(ffn_masks, num_layers=cfg.num_hidden_layers, d_ff=cfg.intermediate_size,
                       d_model=cfg.hidden_size, num_experts=cfg.num_local_experts)
