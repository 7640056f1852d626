"""Gemma's key table: llama's (`mwjax.families.llama.keys`).

Gemma's modules carry llama's names; the extra norms of Gemma 2 / 3 (`pre_feedforward_layernorm`,
`post_feedforward_layernorm`) and Gemma 3's QK-norm (`self_attn.q_norm` / `k_norm`) match the shared norm rules.
"""

from __future__ import annotations

from mwjax.families.llama.keys import KEYMAP

__all__ = ["KEYMAP"]
