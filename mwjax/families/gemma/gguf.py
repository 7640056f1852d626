"""GGUF hooks of Gemma: llama.cpp's architectures `gemma`, `gemma2` and `gemma3` (the text model).

llama.cpp's converter stores every RMSNorm weight as `1 + w` (Gemma's norm multiplies by `1 + w`;
transformers' GGUF loader subtracts 1 too), and leaves out what its own Gemma code hard-codes; that is
filled in as llama.cpp does: Gemma 2 / 3 scale queries by head_dim ** -0.5 (27B: (hidden_size / heads) ** -0.5),
the soft-caps are 50 / 30 (Gemma 2), Gemma 3's sliding layers use RoPE base 10 000 and every sixth layer is global.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mwjax.families.gemma.hf import GEMMA3_LOCAL_THETA
from mwjax.families.record import GGUFFile, GGUFHooks

# Layer count of the 27B Gemma 2 / 3, whose query scale llama.cpp takes from hidden_size / heads.
GEMMA2_27B_LAYERS = 46
GEMMA3_27B_LAYERS = 62


def read_gemma_gguf(file: GGUFFile, shared: Mapping[str, Any]) -> dict[str, Any]:
    """HF config keys of a `gemma` file beyond the shared ones: the gelu-tanh activation.

    Args:
      file: the GGUF file (unused: the keys are fixed).
      shared: the HF config keys read for every architecture (unused).

    Returns:
      `hidden_act` (GemmaConfig's) and `hidden_activation` (transformers 4's), both "gelu_pytorch_tanh".
    """
    return {"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh"}


def read_gemma2_gguf(file: GGUFFile, shared: Mapping[str, Any]) -> dict[str, Any]:
    """HF `Gemma2Config` keys of a `gemma2` file: activation, query scale, sliding window and the soft-caps.

    Args:
      file: the GGUF file (metadata `gemma2.*`).
      shared: the HF config keys read for every architecture (`num_hidden_layers`, `hidden_size`,
        `num_attention_heads`, `head_dim`).

    Returns:
      `hidden_act`, `hidden_activation`, `query_pre_attn_scalar`, `sliding_window`, `attn_logit_softcapping`
      (`gemma2.attn_logit_softcapping`, default 50) and `final_logit_softcapping` (default 30).
    """
    return _sandwich(file, shared, layers_27b=GEMMA2_27B_LAYERS) | {
        "final_logit_softcapping": file.field("final_logit_softcapping", 30.0),
        "attn_logit_softcapping": file.field("attn_logit_softcapping", 50.0),
    }


def read_gemma3_gguf(file: GGUFFile, shared: Mapping[str, Any]) -> dict[str, Any]:
    """HF `Gemma3TextConfig` keys of a `gemma3` file.

    Args:
      file: the GGUF file (metadata `gemma3.*`).
      shared: the HF config keys read for every architecture (`num_hidden_layers`, `hidden_size`,
        `num_attention_heads`, `head_dim`).

    Returns:
      Activation, `query_pre_attn_scalar`, `sliding_window`, `final_logit_softcapping` (None by default), the
      sliding layers' RoPE base `rope_local_base_freq` (`gemma3.rope.freq_base_swa`, default 10 000) and which
      layers slide (`gemma3.attention.sliding_window_pattern`: a period as `sliding_window_pattern`, or one flag
      per layer as `layer_types`).
    """
    extra = _sandwich(file, shared, layers_27b=GEMMA3_27B_LAYERS) | {
        "final_logit_softcapping": file.field("final_logit_softcapping", None),
        "rope_local_base_freq": float(file.field("rope.freq_base_swa", GEMMA3_LOCAL_THETA)),
    }
    pattern = file.field("attention.sliding_window_pattern")
    if isinstance(pattern, list):  # one flag per layer: True = sliding
        extra["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
    elif pattern:
        extra["sliding_window_pattern"] = int(pattern)
    return extra


def _sandwich(file: GGUFFile, shared: Mapping[str, Any], *, layers_27b: int) -> dict[str, Any]:
    """What Gemma 2 and 3 files share: the activation, `query_pre_attn_scalar` (from `attention.scale`, else
    llama.cpp's default: head_dim, or hidden_size / heads for the 27B) and the sliding window."""
    extra = read_gemma_gguf(file, shared)
    scale = file.field("attention.scale")
    if scale:  # HF keeps query_pre_attn_scalar an int where it is one
        scalar = float(scale) ** -2
        extra["query_pre_attn_scalar"] = round(scalar) if abs(scalar - round(scalar)) < 1e-3 else scalar
    elif shared["num_hidden_layers"] == layers_27b:
        extra["query_pre_attn_scalar"] = shared["hidden_size"] // shared["num_attention_heads"]
    else:
        extra["query_pre_attn_scalar"] = shared["head_dim"]
    extra["sliding_window"] = file.field("attention.sliding_window")
    return extra


def undo_norm_plus_one(file: GGUFFile, hf_key: str, w: np.ndarray) -> np.ndarray:
    """HF's RMSNorm weight w from llama.cpp's `1 + w` (every `*norm.weight`, QK-norm included).

    Args:
      file: the GGUF file (unused).
      hf_key: the tensor's HF name, e.g. "model.layers.0.input_layernorm.weight".
      w: the dequantized float32 tensor: [d_model] or [head_dim] for a norm.

    Returns:
      `w - 1` for a norm weight; any other tensor as it is.
    """
    return w - np.float32(1.0) if hf_key.endswith("norm.weight") else w


GEMMA_GGUF = GGUFHooks(architecture="gemma", model_type="gemma", config=read_gemma_gguf, tensor=undo_norm_plus_one)
GEMMA2_GGUF = GGUFHooks(architecture="gemma2", model_type="gemma2", config=read_gemma2_gguf,
                        tensor=undo_norm_plus_one)
GEMMA3_GGUF = GGUFHooks(architecture="gemma3", model_type="gemma3_text", config=read_gemma3_gguf,
                        tensor=undo_norm_plus_one)
