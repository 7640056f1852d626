"""Phi-3 (HF `Phi3ForCausalLM`): the llama architecture with fused projections in its checkpoints.

HF keeps q, k and v in one `self_attn.qkv_proj` ([q | k | v] rows) and W_gate, W_up in one
`mlp.gate_up_proj` ([gate | up] rows). The converters split them into the llama modules
`self_attn.{q,k,v}_proj` and `mlp.{gate,up}_proj` (`keys.FUSED_MODULES`; `save_hf` fuses them back), so
masks, attacks and probes address "row i of W_up" as `mlp.up_proj.kernel[:, i]` in Phi-3 too.
Phi-3's `up * act(gate)` equals llama's `act(gate) * up` exactly (float products commute).

RoPE: `longrope` (the 128k models' "su" scaling: short / long per-frequency factors, switched by
sequence length, and a cos / sin factor) and `partial_rotary_factor` are handled by
`mwjax.nn.config.RopeConfig`; a `sliding_window` applies to every layer, as in Mistral.
"""

from __future__ import annotations

from mwjax.families.llama.model import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    """HF `Phi3ForCausalLM` (computation identical to `LlamaForCausalLM` once the fused weights are split)."""
