"""Phi-3's key table: HF's fused projections split into llama's modules (and fused again by `save_hf`).

HF keeps q, k and v in one `self_attn.qkv_proj` ([q | k | v] rows) and W_gate, W_up in one `mlp.gate_up_proj`
([gate | up] rows, split by `chunk(2)`); mwjax keeps llama's `self_attn.{q,k,v}_proj` and `mlp.{gate,up}_proj`.
"""

from __future__ import annotations

from mwjax.families.keymap import EMBED_AND_NORMS, IGNORED, KeyMap, Rule, fused_rules

# HF fused module (relative to a decoder layer) -> the mwjax modules it holds, in the order of its output rows
# (HF `Phi3Attention.qkv_proj`: [q | k | v]; `Phi3MLP.gate_up_proj`: [gate | up]). The key table and PEFT
# export / import (through the record's `fused_modules`) read this one table.
FUSED_MODULES: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}

KEYMAP = KeyMap(
    "phi3",
    [
        *EMBED_AND_NORMS,
        *fused_rules(FUSED_MODULES),  # qkv_proj, gate_up_proj
        Rule("model.layers.{i}.self_attn.o_proj.kernel", "model.layers.{i}.self_attn.o_proj.weight", transpose=True),
        Rule("model.layers.{i}.mlp.down_proj.kernel", "model.layers.{i}.mlp.down_proj.weight", transpose=True),
    ],
    ignored_hf=IGNORED,
)
