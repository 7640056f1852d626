"""Phi-3 (HF `Phi3ForCausalLM`): the llama architecture with fused projections in its checkpoints.

HF keeps q, k and v in one `self_attn.qkv_proj` ([q | k | v] rows) and W_gate, W_up in one
`mlp.gate_up_proj` ([gate | up] rows). The converters split them into the llama modules
`self_attn.{q,k,v}_proj` and `mlp.{gate,up}_proj` (and `save_hf` fuses them back), so masks,
attacks and probes address "row i of W_up" as `mlp.up_proj.kernel[:, i]` in Phi-3 too.
Phi-3's `up * act(gate)` equals llama's `act(gate) * up` exactly (float products commute).

RoPE: `longrope` (the 128k models' "su" scaling: short / long per-frequency factors, switched by
sequence length, and a cos / sin factor) and `partial_rotary_factor` are handled by
`mwjax.config.RopeConfig`; a `sliding_window` applies to every layer, as in Mistral.
"""

from __future__ import annotations

from mwjax.models.llama import LlamaForCausalLM

# HF fused module (relative to a decoder layer) -> the mwjax modules it holds, in the order of its output rows
# (HF `Phi3Attention.qkv_proj`: [q | k | v]; `Phi3MLP.gate_up_proj`: [gate | up], split by `chunk(2)`). The
# converters' key map and PEFT export / import read this one table.
FUSED_MODULES: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


class Phi3ForCausalLM(LlamaForCausalLM):
    """HF `Phi3ForCausalLM` (computation identical to `LlamaForCausalLM` once the fused weights are split)."""
