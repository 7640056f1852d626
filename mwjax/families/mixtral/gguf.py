"""Mixtral's GGUF hooks: llama's (`mwjax.families.llama.gguf`).

llama.cpp writes Mixtral as architecture `llama` with `llama.expert_count` / `llama.expert_used_count`;
llama's hooks read those into `num_local_experts` / `num_experts_per_tok` (model_type "mixtral") and undo
the Q/K row permutation. Each expert projection of a layer is one stacked tensor (`ffn_gate_exps`
[E, d_ff, d] = HF `block_sparse_moe.experts.w1`, ...), read by the GGUF rules of Mixtral's key table.
"""

from __future__ import annotations

from mwjax.families.llama.gguf import LLAMA_GGUF

__all__ = ["LLAMA_GGUF"]
