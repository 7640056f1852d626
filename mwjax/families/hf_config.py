"""HF `config.json` <-> `ModelConfig`: the keys every family shares are read here, a family's own keys, defaults
and RoPE peculiarities by its `Family` record (looked up in the registry, `mwjax.families`), and a key neither
understands is refused unless it is known to be informational (`INFORMATIONAL_HF_KEYS`).

Both transformers layouts are read: 4.x (`rope_theta` / `rope_scaling`) and 5.x (`rope_parameters`); anything
mwjax does not compute exactly as HF does is refused by name (`ConfigError`). The readers' helpers (`read_rope`,
`rope_from_params`) live in `mwjax.families.hf_readers`, so that every family parses RoPE the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mwjax import families as registry
from mwjax.families.hf_readers import read_rope
from mwjax.families.record import Family
from mwjax.nn.config import (
    FULL_ATTENTION,
    SLIDING_ATTENTION,
    SUPPORTED_ACTIVATIONS,
    ConfigError,
    ModelConfig,
    int_or_tuple,
)

# HF config keys the shared reader understands for every family (a family's own: `Family.hf_keys`).
SHARED_HF_KEYS = frozenset({
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "max_position_embeddings",
    "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
    "layer_types", "bos_token_id", "eos_token_id", "pad_token_id", "use_bidirectional_attention",
})
# Keys that never change a forward pass in inference: bookkeeping, token ids, initialisation, dropout,
# generation defaults, output switches (transformers' `PretrainedConfig` base attributes, 4.x and 5.x).
INFORMATIONAL_HF_KEYS = frozenset({
    "architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
    "auto_map", "tokenizer_class", "prefix", "id2label", "label2id", "num_labels", "problem_type",
    "finetuning_task", "task_specific_params", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "tie_encoder_decoder", "chunk_size_feed_forward", "pruned_heads",
    "torchscript", "use_bfloat16", "tf_legacy_loss", "return_dict", "output_attentions", "output_hidden_states",
    "use_cache", "cache_implementation", "attn_implementation", "_attn_implementation",
    "_attn_implementation_autoset", "initializer_range", "pretraining_tp",  # pretraining_tp: same math, sliced
    "attention_dropout", "hidden_dropout", "embd_pdrop", "resid_pdrop",  # dropout: training only
    "sep_token_id", "decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
})
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# HF config keys read as numbers: checked for type before any arithmetic, so a corrupt value is named.
_INT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window", "max_window_layers",
             "sliding_window_pattern", "num_local_experts", "num_experts", "num_experts_per_tok",
             "original_max_position_embeddings")
_FLOAT_KEYS = ("rms_norm_eps", "rope_theta", "rope_local_base_freq", "partial_rotary_factor", "query_pre_attn_scalar",
               "attn_logit_softcapping", "final_logit_softcapping", "clip_qkv")


def _check_numbers(hf: Mapping[str, Any]) -> None:
    """The numeric keys of a HF config have numeric values, integral where they count something, and
    the sizes that divide others are positive (before anything divides by them)."""
    for key in _INT_KEYS + _FLOAT_KEYS:
        value = hf.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}={value!r} must be a number")
        if key in _INT_KEYS and not float(value).is_integer():
            raise ConfigError(f"{key}={value!r} must be an integer")
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
        if hf.get(key) is not None and hf[key] <= 0:
            raise ConfigError(f"{key}={hf[key]!r} must be positive")


def read_hf_config(hf: Mapping[str, Any]) -> ModelConfig:
    """Build a `ModelConfig` from a HF `config.json` dict (HF `AutoConfig` -> mwjax).

    The shared keys are read here, the family's own through its `Family.read_hf`.

    Args:
      hf: the parsed `config.json` (transformers 4.x or 5.x layout).

    Returns:
      The `ModelConfig`; `ConfigError` naming what is unsupported or out of range.
    """
    _check_numbers(hf)
    try:
        return _read(hf)
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError) as e:  # a malformed nested value
        raise ConfigError(f"malformed {hf.get('model_type')} config ({type(e).__name__}: {e})") from e


def _read(hf: Mapping[str, Any]) -> ModelConfig:
    model_type = hf.get("model_type")
    _refuse_multimodal(hf)
    fam = registry.get(model_type) if isinstance(model_type, str) else None
    if fam is None:
        raise ConfigError(
            f"unknown or unsupported model_type {model_type!r} "
            f"(architectures={hf.get('architectures')}); mwjax supports "
            f"{sorted(f.model_type for f in registry.families())}"
        )
    missing = [k for k in _REQUIRED_KEYS if hf.get(k) is None]
    if missing:
        raise ConfigError(f"{model_type} config lacks required keys {missing}")
    refuse_unknown_keys(fam, hf)
    if hf.get("use_bidirectional_attention"):
        raise ConfigError(f"{model_type}: use_bidirectional_attention=True (an encoder variant) is not implemented")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    layers = int(hf["num_hidden_layers"])
    if fam.read_rope is not None:
        rope, sliding_rope = fam.read_rope(hf)
    else:
        rope, sliding_rope = read_rope(model_type, hf, fam.rope_theta), None
    fields: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        hidden_act=hf.get("hidden_act", fam.hidden_act),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=rope,
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", fam.tie_word_embeddings)),
        sliding_window=hf.get("sliding_window"),
        layer_types=hf.get("layer_types"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=int_or_tuple(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
        sliding_rope=sliding_rope,
    )
    fields |= fam.read_hf(hf, fields)
    if fields["hidden_act"] not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(f"{model_type}: hidden_act {fields['hidden_act']!r} is not implemented; "
                          f"supported: {SUPPORTED_ACTIVATIONS}")
    fields["sliding_window"], fields["layer_types"] = _layer_layout(
        model_type, fields["sliding_window"], fields["layer_types"], layers)
    return ModelConfig(**fields)


def write_hf_config(config: ModelConfig) -> dict[str, Any]:
    """The HF `config.json` dict (legacy `rope_theta` / `rope_scaling` keys, read by transformers 4 and 5).

    The shared keys are written here, the family's own through its `Family.write_hf`.

    Args:
      config: the model's config.

    Returns:
      The JSON-ready dict, `architectures` included.
    """
    hf: dict[str, Any] = {
        "architectures": [registry.family(config.model_type).architecture],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": config.hidden_act,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope.theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }
    if (scaling := config.rope.to_hf_scaling()) is not None:
        hf["rope_scaling"] = scaling
    if config.rope.partial_rotary_factor != 1.0:
        hf["partial_rotary_factor"] = config.rope.partial_rotary_factor
    return registry.family(config.model_type).write_hf(config, hf)


def _refuse_multimodal(hf: Mapping[str, Any]) -> None:
    """Gemma 3 4B+ checkpoints (model_type "gemma3") are image-text models: name what is missing."""
    if hf.get("model_type") == "gemma3" or hf.get("vision_config") is not None:
        parts = [p for p in ("vision_config", "text_config") if hf.get(p) is not None]
        raise ConfigError(
            f"model_type {hf.get('model_type')!r} (architectures={hf.get('architectures')}, with {parts}) is a "
            "multimodal image-text checkpoint: its vision tower (SigLIP) and image-token projector are not "
            "implemented. mwjax reads the text-only Gemma 3 (model_type 'gemma3_text', Gemma3ForCausalLM), "
            "e.g. gemma-3-1b / gemma-3-270m, or a GGUF of the text model"
        )


def refuse_unknown_keys(fam: Family, hf: Mapping[str, Any]) -> None:
    """Refuse HF config keys that neither the shared reader nor the family understands, nor are informational.

    An unread key may change the computation, so it is an error (`ConfigError`), not a warning. A key set to
    null asks for nothing and passes.

    Args:
      fam: the family's record (its `hf_keys` and `ignored_hf_keys`).
      hf: the HF config dict.
    """
    known = SHARED_HF_KEYS | INFORMATIONAL_HF_KEYS | fam.hf_keys | fam.ignored_hf_keys
    unknown = sorted(k for k, v in hf.items() if k not in known and v is not None)
    if unknown:
        raise ConfigError(
            f"mwjax does not implement {', '.join(map(repr, unknown))} for {fam.model_type}: a HF config key that "
            "mwjax does not read may change the computation, so it is refused, not ignored. If it does not "
            f"change the math, add it to `ignored_hf_keys` of the {fam.model_type} record "
            f"({fam.package}) or to `INFORMATIONAL_HF_KEYS` (mwjax/families/hf_config.py); otherwise "
            "implement it"
        )


def _layer_layout(model_type: str, window, types, layers: int) -> tuple[int | None, tuple[str, ...]]:
    """(sliding_window, layer_types) from what the family's reader made of them: without layer types,
    every layer slides when there is a window (Mistral, Mixtral, Phi-3); HF maps sliding layers without
    a window to full attention."""
    if types is None:
        types = [SLIDING_ATTENTION if window else FULL_ATTENTION] * layers
    types = tuple(types)
    unknown = set(types) - {FULL_ATTENTION, SLIDING_ATTENTION}
    if unknown:
        raise ConfigError(f"{model_type}: layer_types {sorted(unknown)} are not implemented")
    if window is None and SLIDING_ATTENTION in types:
        types = (FULL_ATTENTION,) * layers
    return (int(window) if window else None), types
