"""ModelConfig.from_hf_config: every family's layout, both transformers config formats, clear refusals."""

import dataclasses

import numpy as np
import pytest
import transformers
from hf_reference import TINY_CONFIGS, torch

from mwjax.families.hf_config import read_hf_config, write_hf_config
from mwjax.nn.config import FULL_ATTENTION, SLIDING_ATTENTION, ConfigError, ModelConfig, RopeConfig
from mwjax.nn.rope import inv_frequencies


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_round_trip_through_hf_dict(name):
    cls_name, kwargs = TINY_CONFIGS[name]
    hf = getattr(transformers, cls_name)(**kwargs).to_dict()
    config = read_hf_config(hf)
    assert read_hf_config(write_hf_config(config)) == config
    assert ModelConfig.from_dict(config.to_dict()) == config
    # transformers reads what we write back as the same architecture
    again = transformers.AutoConfig.for_model(**write_hf_config(config))
    assert read_hf_config(again.to_dict()) == config


def test_family_specifics():
    qwen = read_hf_config(transformers.Qwen2Config(**TINY_CONFIGS["qwen2_bias"][1]).to_dict())
    assert (qwen.qkv_bias, qwen.o_bias, qwen.sliding_window) == (True, False, None)
    qwen_sw = read_hf_config(transformers.Qwen2Config(**TINY_CONFIGS["qwen2_sliding"][1]).to_dict())
    assert qwen_sw.layer_types == (FULL_ATTENTION, SLIDING_ATTENTION, SLIDING_ATTENTION)
    mistral = read_hf_config(transformers.MistralConfig(**TINY_CONFIGS["mistral_sliding"][1]).to_dict())
    assert mistral.sliding_window == 48 and set(mistral.layer_types) == {SLIDING_ATTENTION}
    llama = read_hf_config(transformers.LlamaConfig(**TINY_CONFIGS["llama_bias_headdim"][1]).to_dict())
    assert (llama.qkv_bias, llama.o_bias, llama.mlp_bias, llama.head_dim) == (True, True, True, 24)
    assert llama.layer_label(11) == "layer 12 (HF layers[11])"


def test_legacy_transformers4_layout():
    hf = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
              num_attention_heads=2, rope_theta=500000.0,
              rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192))
    config = read_hf_config(hf)
    assert config.rope == RopeConfig(theta=500000.0, type="llama3", factor=8.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0, original_max_position_embeddings=8192)
    assert config.num_key_value_heads == 2 and config.head_dim == 4


@pytest.mark.parametrize("rope", [
    dict(rope_type="default", rope_theta=10000.0),
    dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
    dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=8192),
])
@pytest.mark.torch
def test_inverse_frequencies_match_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, rope_parameters=rope)
    config = read_hf_config(hf.to_dict())
    if rope["rope_type"] == "default":
        inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 128, 2, dtype=torch.int64).float() / 128))
    else:
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, "cpu")
    np.testing.assert_allclose(inv_frequencies(config.rope, config.head_dim), inv_freq.numpy(), rtol=1e-6)


@pytest.mark.parametrize("change, message", [
    (dict(model_type="bert"), "unsupported model_type 'bert'"),
    (dict(hidden_act="quick_gelu"), "hidden_act 'quick_gelu' is not implemented"),
    (dict(rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=2.0)), "rope type 'dynamic'"),
    (dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)),
     "partial_rotary_factor=0.5"),
    (dict(num_key_value_heads=3), "must be a multiple of num_key_value_heads"),
])
def test_unsupported_options_are_named(change, message):
    hf = transformers.LlamaConfig(**TINY_CONFIGS["llama_gqa"][1]).to_dict() | change
    with pytest.raises(ConfigError, match=message):
        read_hf_config(hf)


def test_layer_types_must_match_layers():
    config = read_hf_config(transformers.LlamaConfig(**TINY_CONFIGS["llama_gqa"][1]).to_dict())
    with pytest.raises(ConfigError, match="layer_types has 1 entries"):
        dataclasses.replace(config, layer_types=(FULL_ATTENTION,))
