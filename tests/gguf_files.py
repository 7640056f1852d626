"""Write tiny GGUF files from tiny HF models the way llama.cpp's `convert_hf_to_gguf.py` does.

Conventions reproduced (each is one a reader has to undo): Gemma RMSNorm weights stored as
`1 + w`; arch `llama` (also Mixtral) Q/K rows permuted per head, arch `olmo` its Q/K weights' rows (not the
biases: llama.cpp's `OlmoModel`), with its LayerNorm epsilon and `clip_qkv` as `clamp_kqv`; Mixtral's
experts stacked per projection (`ffn_gate_exps` [E, d_ff, d] ...); Phi-3's fused `qkv_proj` / `gate_up_proj` kept as
they are and its longrope factors written as tensors; names from the `gguf` package's map; no
`output.weight` when embeddings are tied. The tests compare what mwjax reads with the source HF
model and with transformers' own GGUF loader on the same file.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

ARCH = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3", "mixtral": "llama"}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` of Q / K rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_checkpoint_tensors(hf_model) -> dict[str, np.ndarray]:
    """The model's tensors under Hub-checkpoint names (what llama.cpp reads), float32 numpy."""
    cfg = hf_model.config
    tensors = {}
    for name, t in hf_model.state_dict().items():
        t = t.detach().float().numpy()
        if ".mlp.experts.gate_up_proj" in name:  # transformers 5 fused experts -> llama.cpp's stacks
            prefix = name.replace("mlp.experts.gate_up_proj", "block_sparse_moe.experts")
            f = cfg.intermediate_size
            tensors[f"{prefix}.w1.weight"], tensors[f"{prefix}.w3.weight"] = t[:, :f], t[:, f:]
        elif ".mlp.experts.down_proj" in name:
            tensors[name.replace("mlp.experts.down_proj", "block_sparse_moe.experts.w2.weight")] = t
        elif cfg.model_type == "mixtral" and ".mlp.gate.weight" in name:
            tensors[name.replace("mlp.gate", "block_sparse_moe.gate")] = t
        else:
            tensors[name] = t
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors


def write_gguf(hf_model, path: Path, quantize: bool = False, extra=None) -> Path:
    """A GGUF of `hf_model` (float32; `quantize=True`: 2-D weights as Q8_0; `extra(writer)` adds metadata)."""
    return write_gguf_tensors(hf_checkpoint_tensors(hf_model), hf_model.config, path, quantize, extra)


def write_gguf_tensors(tensors: dict[str, np.ndarray], cfg, path: Path, quantize: bool = False, extra=None) -> Path:
    """A GGUF of HF-named float tensors and a transformers config object (no torch needed)."""
    arch = ARCH.get(cfg.model_type, cfg.model_type)
    writer = gguf.GGUFWriter(str(path), arch)
    _metadata(writer, cfg, arch)
    if extra is not None:
        extra(writer)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    for name, t in tensors.items():
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            t = t + np.float32(1.0)
        if arch == "llama" and name.endswith("q_proj.weight"):
            t = _permute(t, cfg.num_attention_heads)
        if arch == "llama" and name.endswith("k_proj.weight"):
            t = _permute(t, cfg.num_key_value_heads)
        if arch == "olmo" and name.endswith("q_proj.weight"):
            t = _permute(t, cfg.num_attention_heads)
        if arch == "olmo" and name.endswith("k_proj.weight"):
            t = _permute(t, cfg.num_key_value_heads)
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, f"no GGUF name for {name}"
        if quantize and t.ndim >= 2 and t.shape[-1] % 32 == 0:
            writer.add_tensor(gguf_name, gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(t, np.float32))
    rope = cfg.rope_parameters
    if cfg.model_type == "phi3" and rope.get("rope_type") == "longrope":
        writer.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], np.float32))
        writer.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _metadata(writer: gguf.GGUFWriter, cfg, arch: str) -> None:
    writer.add_name(f"tiny {cfg.model_type}")
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    if arch == "olmo":  # OlmoConfig has no epsilon: llama.cpp writes HF's hard-coded one
        writer.add_layer_norm_eps(1e-5)
        if cfg.clip_qkv is not None:
            writer.add_clamp_kqv(cfg.clip_qkv)
    else:
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.bos_token_id is not None:  # OLMo's configs have none
        writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    if cfg.pad_token_id is not None:
        writer.add_pad_token_id(cfg.pad_token_id)
    rope = cfg.rope_parameters
    if cfg.model_type == "gemma3_text":
        rope = rope["full_attention"]
        writer.add_rope_freq_base_swa(cfg.rope_parameters["sliding_attention"]["rope_theta"])
    writer.add_rope_freq_base(rope["rope_theta"])
    if arch.startswith("gemma"):
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    if arch in ("gemma2", "gemma3"):
        writer.add_sliding_window(cfg.sliding_window)
        if cfg.final_logit_softcapping is not None:
            writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
    if arch == "phi3":
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
        if cfg.sliding_window:
            writer.add_sliding_window(cfg.sliding_window)
        if rope.get("rope_type") == "longrope":
            original = cfg.original_max_position_embeddings
            writer.add_rope_scaling_orig_ctx_len(original)
            factor = cfg.max_position_embeddings / original
            writer.add_rope_scaling_attn_factors(float(np.sqrt(1 + np.log(factor) / np.log(original))))
    if cfg.model_type == "mixtral":
        writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
        writer.add_expert_count(cfg.num_local_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
