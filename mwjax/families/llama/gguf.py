"""GGUF hooks of the llama-like family: llama.cpp's architectures `llama` (Llama, Mistral, Mixtral) and `qwen2`.

llama.cpp writes Llama, Mistral and Mixtral files as one architecture, `llama`; the metadata tells them apart
(a sliding window: Mistral; experts: Mixtral). Its converter permutes the rows of Q and K (the two RoPE halves
of every head interleaved, for its own RoPE kernel); `undo_qk_permutation` puts them back. Qwen2 files hold
HF's tensors as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mwjax.families.record import GGUFFile, GGUFHooks


def read_llama_gguf(file: GGUFFile, shared: Mapping[str, Any]) -> dict[str, Any]:
    """HF config keys of an arch-`llama` file beyond the shared ones.

    Args:
      file: the GGUF file (metadata `llama.*`, tensor names).
      shared: the HF config keys read for every architecture.

    Returns:
      `attention_bias` (from the presence of `blk.0.attn_q.bias`); with `llama.attention.sliding_window`,
      model_type "mistral" and `sliding_window`; with `llama.expert_count`, model_type "mixtral" and
      `num_local_experts` / `num_experts_per_tok` (HF `MixtralConfig`).
    """
    out: dict[str, Any] = {"attention_bias": file.has_tensor("blk.0.attn_q.bias")}
    window = file.field("attention.sliding_window")
    if window:
        out |= {"model_type": "mistral", "sliding_window": int(window)}
    if file.field("expert_count"):
        out |= {"model_type": "mixtral", "num_local_experts": int(file.field("expert_count")),
                "num_experts_per_tok": int(file.field("expert_used_count"))}
    return out


def undo_qk_permutation(file: GGUFFile, hf_key: str, w: np.ndarray) -> np.ndarray:
    """HF's `q_proj` / `k_proj` weight or bias from llama.cpp's row-permuted one (other tensors as they are).

    Args:
      file: the GGUF file (`attention.head_count`, `attention.head_count_kv`).
      hf_key: the tensor's HF name, e.g. "model.layers.0.self_attn.q_proj.weight".
      w: the dequantized tensor, HF layout: [heads * head_dim, d_model] (weight) or [heads * head_dim] (bias).

    Returns:
      `w` with the rows of every head back in HF's order.
    """
    heads = file.field("attention.head_count")
    if hf_key.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return unpermute(w, int(heads))
    if hf_key.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return unpermute(w, int(file.field("attention.head_count_kv", heads)))
    return w


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: per head, rows (2, d/2) interleaved back to (d/2, 2) halves.

    Args:
      w: a Q or K weight [n_head * head_dim, d_model] or bias [n_head * head_dim], llama.cpp's row order.
      n_head: heads of the projection (query heads for Q, key-value heads for K).

    Returns:
      `w` in HF's row order, same shape.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_qwen2_gguf(file: GGUFFile, shared: Mapping[str, Any]) -> dict[str, Any]:
    """HF config keys of a `qwen2` file beyond the shared ones: none (HF's Qwen2 hard-codes its biases).

    Args:
      file: the GGUF file (unused).
      shared: the HF config keys read for every architecture (unused).

    Returns:
      An empty dict.
    """
    return {}


LLAMA_GGUF = GGUFHooks(architecture="llama", model_type="llama", config=read_llama_gguf,
                       tensor=undo_qk_permutation)
QWEN2_GGUF = GGUFHooks(architecture="qwen2", model_type="qwen2", config=read_qwen2_gguf)
