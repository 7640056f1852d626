"""Phi-3 (HF `Phi3ForCausalLM`): the llama architecture with fused projections in its checkpoints.

HF keeps q, k and v in one `self_attn.qkv_proj` ([q | k | v] rows) and W_gate, W_up in one
`mlp.gate_up_proj` ([gate | up] rows). The converters split them into the llama modules
`self_attn.{q,k,v}_proj` and `mlp.{gate,up}_proj` (and `save_hf` fuses them back), so masks,
attacks and probes address "row i of W_up" as `mlp.up_proj.kernel[:, i]` in Phi-3 too.
Phi-3's `up * act(gate)` equals llama's `act(gate) * up` exactly (float products commute).

RoPE: `longrope` (the 128k models' "su" scaling: short / long per-frequency factors, switched by
sequence length, and a cos / sin factor) and `partial_rotary_factor` are handled by
`mwjax.nn.config.RopeConfig`; a `sliding_window` applies to every layer, as in Mistral.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mwjax.families.family import Family, register
from mwjax.families.hf_config import read_rope
from mwjax.families.llama.model import LlamaForCausalLM
from mwjax.nn.config import ModelConfig, RopeConfig

# HF fused module (relative to a decoder layer) -> the mwjax modules it holds, in the order of its output rows
# (HF `Phi3Attention.qkv_proj`: [q | k | v]; `Phi3MLP.gate_up_proj`: [gate | up], split by `chunk(2)`). The
# converters' key map and PEFT export / import read this one table.
FUSED_MODULES: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


class Phi3ForCausalLM(LlamaForCausalLM):
    """HF `Phi3ForCausalLM` (computation identical to `LlamaForCausalLM` once the fused weights are split)."""


# ------------------------------------------------------------------ family record (`mwjax.families.family`)


def read_phi3_hf(hf: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """HF `Phi3Config`: no biases (hard-coded in its modules)."""
    return dict(qkv_bias=False, o_bias=False, mlp_bias=False)


def write_phi3_hf(config: ModelConfig, hf: dict[str, Any]) -> dict[str, Any]:
    hf = hf | {"sliding_window": config.sliding_window}
    if config.rope.original_max_position_embeddings is not None:
        hf["original_max_position_embeddings"] = config.rope.original_max_position_embeddings
    return hf


def read_phi3_rope(hf: Mapping[str, Any]) -> tuple[RopeConfig, None]:
    """Phi-3's RoPE: `partial_rotary_factor` < 1 allowed; Phi3Config renames "su" and "yarn" scaling to
    longrope (transformers 5.23)."""
    return read_rope("phi3", hf, PHI3.rope_theta, partial_rotary=True,
                     aliases={"su": "longrope", "yarn": "longrope"}), None


PHI3 = register(Family(
    model_type="phi3", architecture="Phi3ForCausalLM", model_class=Phi3ForCausalLM,
    read_hf=read_phi3_hf, write_hf=write_phi3_hf, read_rope=read_phi3_rope,
    hf_keys=frozenset({"sliding_window", "original_max_position_embeddings"}),
    ignored_hf_keys=frozenset({"attention_bias"}),  # Phi-3 configs say false; its modules have no bias
    fused_modules=FUSED_MODULES, gguf_architecture="phi3",
))
