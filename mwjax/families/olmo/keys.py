"""OLMo's key table: llama's (`mwjax.families.llama.keys`).

OLMo's and OLMo 2's modules carry llama's names. OLMo has no norm weights at all (its LayerNorms have no
parameters); OLMo 2's `post_attention_layernorm` / `post_feedforward_layernorm` and its QK-norm
(`self_attn.q_norm` / `k_norm`, over the whole projection) match the shared norm rules.
"""

from __future__ import annotations

from mwjax.families.llama.keys import KEYMAP

__all__ = ["KEYMAP"]
