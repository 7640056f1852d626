"""float32 parity with HF transformers for the llama-like family on tiny random configs."""

import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import (
    FAMILY_CONFIGS,
    SEQ_LEN,
    TINY_CONFIGS,
    assert_logits_close,
    capture_hf,
    hf_logits,
    random_tokens,
    torch,
)

from mwjax import converters, models, probes

CASES = sorted(set(TINY_CONFIGS) - set(FAMILY_CONFIGS))  # the other families: test_families.py


@pytest.mark.parametrize("name", CASES)
def test_logits_match_hf(name, hf_checkpoint):
    hf, path = hf_checkpoint(name)
    model, _ = converters.load(path, dtype=jnp.float32, tokenizer=False)
    tokens = random_tokens(SEQ_LEN, hf.config.vocab_size)
    err, scale = assert_logits_close(models.forward(model, jnp.asarray(tokens)), hf_logits(hf, tokens))
    print(f"{name}: max abs logit diff {err:.2e} (logit scale {scale:.2f})")


@pytest.mark.parametrize("name", ["llama_gqa", "mistral_sliding"])
def test_padding_mask_matches_hf(name, hf_checkpoint):
    hf, path = hf_checkpoint(name)
    model, _ = converters.load(path, tokenizer=False)
    tokens = random_tokens(96, hf.config.vocab_size, batch=2, seed=1)
    mask = np.ones_like(tokens)
    mask[0, 70:] = 0  # right padding in the first row
    ours = np.asarray(models.forward(model, jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    ref = hf_logits(hf, tokens, mask)
    valid = mask.astype(bool)
    assert_logits_close(ours[valid], ref[valid])


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_sliding"])
def test_probes_match_hf_hooks(name, hf_checkpoint):
    hf, path = hf_checkpoint(name)
    model, _ = converters.load(path, tokenizer=False)
    tokens = random_tokens(64, hf.config.vocab_size, seed=2)
    captured, hf_out = capture_hf(hf, tokens, output_attentions=True)
    points = ("hidden", "intermediate", "down_proj_output", "attn_output", "attn_input", "mlp_input", "attn_probs")
    config = probes.ProbeConfig(points=points, top_k=3, median=True)
    _, result = probes.capture(model, jnp.asarray(tokens), config)
    for i in range(hf.config.num_hidden_layers):
        for point in points:
            ref = (hf_out.attentions[i] if point == "attn_probs" else captured[(point, i)]).numpy()
            stats = result.point(point)[i]
            np.testing.assert_allclose(stats.full, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(),
                                       err_msg=f"{point} layer {i}")
            top = torch.from_numpy(ref).abs().topk(3, dim=-1)
            if point != "attn_probs":  # masked probabilities are exact zeros: ties order arbitrarily
                np.testing.assert_array_equal(stats.top_indices, top.indices.numpy(), err_msg=f"{point} top-k {i}")
            np.testing.assert_allclose(np.abs(stats.top_values), top.values.numpy(), rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(stats.median, np.median(np.abs(ref), axis=-1), rtol=1e-4, atol=1e-6)


def test_probe_layers_and_reductions_only(tiny_checkpoint):
    path = tiny_checkpoint("llama_gqa")
    model, _ = converters.load(path, tokenizer=False)
    config = probes.ProbeConfig(points=("intermediate",), layers=(1,), full=False, top_k=2)
    logits, result = probes.capture(model, jnp.asarray(random_tokens(16)), config)
    assert [p for p in probes.POINTS if result.point(p)] == ["intermediate"] and list(result.intermediate) == [1]
    recorded = result.intermediate[1]
    assert {f for f in ("full", "top_values", "top_indices", "top_positions", "median")
            if getattr(recorded, f) is not None} == {"top_values", "top_indices"}
    np.testing.assert_allclose(logits, models.forward(model, jnp.asarray(random_tokens(16))), rtol=1e-6)
    stacked = result.stack("intermediate", "top_indices")
    assert stacked.shape == (1, 1, 16, 2)


def test_probe_config_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown probe points"):
        probes.ProbeConfig(points=("hiddne",))
    with pytest.raises(ValueError, match="records nothing"):
        probes.ProbeConfig(full=False)


def test_bfloat16_forward_close_to_float32(tiny_checkpoint):
    path = tiny_checkpoint("llama_gqa")
    f32, _ = converters.load(path, dtype=jnp.float32, tokenizer=False)
    bf16, _ = converters.load(path, dtype=jnp.bfloat16, tokenizer=False)
    assert bf16.model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    tokens = jnp.asarray(random_tokens(64))
    ours = models.forward(bf16, tokens)
    assert ours.dtype == jnp.bfloat16
    assert_logits_close(ours.astype(jnp.float32), models.forward(f32, tokens), rel=5e-2)


@pytest.mark.parametrize("name, change", [
    ("mistral_sliding", dict(sliding_window=None, layer_types=())),
    ("qwen2_sliding", dict(sliding_window=None, layer_types=())),
    ("llama3_rope_scaling", dict(rope=None)),
])
def test_parity_tests_are_sensitive(name, change, hf_checkpoint):
    """The features these configs exercise change the logits well beyond the tolerance."""
    import dataclasses

    from mwjax.converters.sources import SafetensorsSource
    from mwjax.nn.config import RopeConfig

    hf, path = hf_checkpoint(name)
    model, _ = converters.load(path, tokenizer=False)
    if change.get("rope", 1) is None:
        change = dict(rope=RopeConfig(theta=model.config.rope.theta))
    altered = converters.build_from_source(dataclasses.replace(model.config, **change), SafetensorsSource(path))
    tokens = random_tokens(SEQ_LEN, hf.config.vocab_size)
    with pytest.raises(AssertionError):
        assert_logits_close(models.forward(altered, jnp.asarray(tokens)), hf_logits(hf, tokens))
