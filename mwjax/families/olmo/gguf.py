"""GGUF hooks of OLMo and OLMo 2: llama.cpp's architectures `olmo` and `olmo2`.

llama.cpp's converter (`OlmoModel`) permutes the rows of OLMo's Q and K weights per head as it does Llama's (not
their biases, which it leaves as they are), writes `olmo.attention.layer_norm_epsilon` = 1e-5 (what HF
hard-codes) and `clip_qkv` as `olmo.attention.clamp_kqv`; OLMo's LayerNorms have no tensors. OLMo 2 files
(`Olmo2Model`) hold HF's tensors as they are (llama.cpp rotates OLMo 2 in HF's half-split order); llama.cpp
writes OLMo 3 as arch `olmo2` too, with a sliding window: refused, OLMo 3 is not implemented.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from mwjax.families.llama.gguf import unpermute
from mwjax.families.olmo.hf import OLMO_LAYER_NORM_EPS
from mwjax.families.record import GGUFFile, GGUFHooks
from mwjax.nn.config import ConfigError


def read_olmo_gguf(file: GGUFFile, shared: Mapping[str, Any]) -> dict[str, Any]:
    """HF `OlmoConfig` keys of an `olmo` file beyond the shared ones.

    Args:
      file: the GGUF file (metadata `olmo.*`, tensor names).
      shared: the HF config keys read for every architecture (unused).

    Returns:
      `attention_bias` (from the presence of `blk.0.attn_q.bias`) and `clip_qkv` (`olmo.attention.clamp_kqv`,
      a float32 written back as the shortest decimal that is that float32, e.g. 8.0 or 0.8; None without it);
      `ConfigError` for a LayerNorm epsilon other than HF's hard-coded 1e-5.
    """
    eps = file.field("attention.layer_norm_epsilon")
    if eps is not None and not math.isclose(float(eps), OLMO_LAYER_NORM_EPS, rel_tol=1e-6):
        raise ConfigError(f"olmo: attention.layer_norm_epsilon={eps} is not implemented (HF's OlmoLayerNorm "
                          f"hard-codes {OLMO_LAYER_NORM_EPS})")
    clamp = file.field("attention.clamp_kqv")
    return {"attention_bias": file.has_tensor("blk.0.attn_q.bias"),
            "clip_qkv": None if clamp is None else float(str(np.float32(clamp)))}


def undo_olmo_qk_permutation(file: GGUFFile, hf_key: str, w: np.ndarray) -> np.ndarray:
    """HF's `q_proj` / `k_proj` weight from llama.cpp's row-permuted one (biases and other tensors as they are:
    llama.cpp's OLMo converter permutes the weights only).

    Args:
      file: the GGUF file (`attention.head_count`, `attention.head_count_kv`).
      hf_key: the tensor's HF name, e.g. "model.layers.0.self_attn.q_proj.weight".
      w: the dequantized tensor, HF layout: [heads * head_dim, d_model] for a Q / K weight.

    Returns:
      `w` with the rows of every head back in HF's order.
    """
    heads = int(file.field("attention.head_count"))
    if hf_key.endswith("self_attn.q_proj.weight"):
        return unpermute(w, heads)
    if hf_key.endswith("self_attn.k_proj.weight"):
        return unpermute(w, int(file.field("attention.head_count_kv", heads)))
    return w


def read_olmo2_gguf(file: GGUFFile, shared: Mapping[str, Any]) -> dict[str, Any]:
    """HF `Olmo2Config` keys of an `olmo2` file beyond the shared ones.

    Args:
      file: the GGUF file (metadata `olmo2.*`, tensor names).
      shared: the HF config keys read for every architecture (unused).

    Returns:
      `attention_bias` (from the presence of `blk.0.attn_q.bias`); `ConfigError` for a file with a sliding
      window (OLMo 3, which llama.cpp writes as arch `olmo2`).
    """
    if file.field("attention.sliding_window"):
        raise ConfigError("olmo2: this GGUF has a sliding window (attention.sliding_window): it is OLMo 3 "
                          "(HF model_type 'olmo3'), which mwjax does not implement")
    return {"attention_bias": file.has_tensor("blk.0.attn_q.bias")}


OLMO_GGUF = GGUFHooks(architecture="olmo", model_type="olmo", config=read_olmo_gguf, tensor=undo_olmo_qk_permutation)
OLMO2_GGUF = GGUFHooks(architecture="olmo2", model_type="olmo2", config=read_olmo2_gguf)
