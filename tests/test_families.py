"""Gemma 1/2/3, Mixtral, Phi-3, OLMo and OLMo 2 against HF transformers in float32 on tiny random configs:
logits, probes, KV-cache decoding, save_hf round trips, Mixtral expert masks and checkpoint
layouts, and tests showing that each family-specific feature changes the logits."""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from hf_reference import (
    FAMILY_CONFIGS,
    FFN_PARTS,
    SEQ_LEN,
    assert_logits_close,
    capture_hf,
    hf_logits,
    our_logits,
    random_tokens,
    torch,
)
from hf_reference import assert_close_to_scale as assert_close

from mwjax import converters, masks, massive, models, probes
from mwjax.converters import checkpoint
from mwjax.converters.sources import SafetensorsSource
from mwjax.experiments.probe import format_table, probe_first_token, summary
from mwjax.nn.cache import KVCache
from mwjax.nn.config import ConfigError, RopeConfig


def load(path):
    return converters.load(path, tokenizer=False)[0]


def nnx_params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("name", sorted(FAMILY_CONFIGS))
def test_logits_match_hf(name, hf_checkpoint):
    hf, path = hf_checkpoint(name)
    tokens = random_tokens(SEQ_LEN, hf.config.vocab_size)
    err, scale = assert_logits_close(our_logits(load(path), tokens), hf_logits(hf, tokens))
    print(f"{name}: max abs logit diff {err:.2e} (logit scale {scale:.2f})")


def test_longrope_short_sequence_uses_short_factors(hf_checkpoint):
    """At most original_max_position_embeddings (64) tokens, longrope uses the short factors."""
    hf, path = hf_checkpoint("phi3_longrope")
    model = load(path)
    tokens = random_tokens(64, hf.config.vocab_size, seed=7)
    assert_logits_close(our_logits(model, tokens), hf_logits(hf, tokens))
    always_long = dataclasses.replace(model.config.rope, short_factor=model.config.rope.long_factor)
    altered = converters.build_from_source(dataclasses.replace(model.config, rope=always_long),
                                           SafetensorsSource(path), progress=False)
    with pytest.raises(AssertionError):
        assert_logits_close(our_logits(altered, tokens), hf_logits(hf, tokens))


def test_padding_mask_matches_hf(hf_checkpoint):
    hf, path = hf_checkpoint("gemma2")
    tokens = random_tokens(96, hf.config.vocab_size, batch=2, seed=1)
    mask = np.ones_like(tokens)
    mask[0, 70:] = 0
    ours = np.asarray(models.forward(load(path), jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    valid = mask.astype(bool)
    assert_logits_close(ours[valid], hf_logits(hf, tokens, mask)[valid])


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "mixtral", "olmo2"])
def test_bfloat16_forward_close_to_hf_bfloat16(name, hf_checkpoint):
    """Same dtype handling as HF (embedding scale cast to bf16, norms in f32, f32 routing weights; OLMo 2: RoPE
    in f32, norm weights multiplied in f32): our
    bf16 logits are closer to HF's bf16 ones than those are to HF's float32 ones."""
    hf, path = hf_checkpoint(name)
    hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    hf_bf16.config._attn_implementation = "eager"
    tokens = random_tokens(128, hf.config.vocab_size)
    ours = models.forward(converters.load(path, dtype=jnp.bfloat16, tokenizer=False)[0], jnp.asarray(tokens))
    assert ours.dtype == jnp.bfloat16
    with torch.no_grad():
        ref = hf_bf16(torch.from_numpy(tokens).long()).logits.float().numpy()
    err, scale = assert_logits_close(np.asarray(ours.astype(jnp.float32)), ref, rel=3e-2)
    assert err < np.abs(ref - hf_logits(hf, tokens)).max()
    print(f"{name} bfloat16: max abs logit diff {err:.2e} (logit scale {scale:.2f})")


@pytest.mark.parametrize("name", ["gemma3", "mixtral", "phi3_longrope", "olmo_clip", "olmo2"])
def test_orbax_round_trip_keeps_family_config(name, tiny_checkpoint, tmp_path):
    path = tiny_checkpoint(name)
    model = load(path)
    checkpoint.save(model, tmp_path / "ckpt")
    restored = checkpoint.restore(tmp_path / "ckpt")
    assert restored.config == model.config
    tokens = random_tokens(64)
    np.testing.assert_array_equal(our_logits(restored, tokens), our_logits(model, tokens))


# ------------------------------------------------------------------------------------------ probes

DENSE_POINTS = ("hidden", "intermediate", "down_proj_output", "attn_output", "attn_input", "mlp_input", "attn_probs")


def assert_probe_close(stats, ref, what):
    np.testing.assert_allclose(stats.full, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(), err_msg=what)


@pytest.mark.parametrize("name, mlp_input_norm", [
    ("gemma2", "pre_feedforward_layernorm"),
    ("gemma3", "pre_feedforward_layernorm"),
    ("phi3", "post_attention_layernorm"),
    ("olmo_clip", "post_attention_layernorm"),
    ("olmo2", None),  # post-norm layers: the attention and the FFN read the residual stream (capture_hf)
])
def test_dense_probes_match_hf_hooks(name, mlp_input_norm, hf_checkpoint):
    hf, path = hf_checkpoint(name)
    tokens = random_tokens(64, hf.config.vocab_size, seed=2)
    captured, hf_out = capture_hf(hf, tokens, mlp_input_norm=mlp_input_norm, output_attentions=True)
    _, result = probes.capture(load(path), jnp.asarray(tokens), probes.ProbeConfig(points=DENSE_POINTS))
    for i in range(hf.config.num_hidden_layers):
        for point in DENSE_POINTS:
            ref = hf_out.attentions[i] if point == "attn_probs" else captured[(point, i)]
            assert_probe_close(result.point(point)[i], ref.numpy(), f"{name} {point} layer {i}")


@pytest.mark.parametrize("name, mlp_input_norm", [("llama_gqa", "post_attention_layernorm"),
                                                  ("gemma2", "pre_feedforward_layernorm"), ("olmo2", None)])
def test_residual_and_ffn_factor_probes_match_hf_hooks(name, mlp_input_norm, hf_checkpoint):
    """House of Cards Figure 3(a)'s further states: ĥ_l (after the attention's residual add; Gemma 2: with its
    post-attention norm), act(x W_gate) and x W_up, whose product is the intermediate state."""
    hf, path = hf_checkpoint(name)
    tokens = random_tokens(32, hf.config.vocab_size, seed=3)
    captured, _ = capture_hf(hf, tokens, FFN_PARTS + ("intermediate",), mlp_input_norm=mlp_input_norm)
    _, result = probes.capture(load(path), jnp.asarray(tokens),
                               probes.ProbeConfig(points=FFN_PARTS + ("intermediate",)))
    for i in range(hf.config.num_hidden_layers):
        for point in FFN_PARTS:
            assert_probe_close(result.point(point)[i], captured[(point, i)].numpy(), f"{name} {point} layer {i}")
        product = result.gate_activation[i].full * result.up_proj_output[i].full
        np.testing.assert_array_equal(product, result.intermediate[i].full)


def test_mixtral_router_and_expert_probes_match_hf(hf_checkpoint):
    """router_probs = softmax of HF's router logits; intermediate / down_proj_output hold every expert's
    state, computed here in torch from HF's fused expert weights; the layer outputs agree."""
    hf, path = hf_checkpoint("mixtral")
    tokens = random_tokens(64, hf.config.vocab_size, seed=2)
    captured, hf_out = capture_hf(hf, tokens, output_router_logits=True)
    points = ("router_probs", "intermediate", "down_proj_output", "hidden", "mlp_input", "attn_output",
              "gate_activation", "up_proj_output")
    _, result = probes.capture(load(path), jnp.asarray(tokens), probes.ProbeConfig(points=points, top_k=3))
    num_experts, f = hf.config.num_local_experts, hf.config.intermediate_size
    for i, layer in enumerate(hf.model.layers):
        router = torch.softmax(hf_out.router_logits[i].float(), dim=-1).reshape(1, 64, num_experts)
        assert result.router_probs[i].full.shape == (1, 64, num_experts)
        assert_probe_close(result.router_probs[i], router.numpy(), f"router layer {i}")
        x = captured[("mlp_input", i)]  # [1, t, d]
        experts = layer.mlp.experts
        with torch.no_grad():
            gate, up = experts.gate_up_proj[:, :f], experts.gate_up_proj[:, f:]  # [E, d_ff, d]
            gates = torch.stack([torch.nn.functional.silu(x @ gate[e].T) for e in range(num_experts)], dim=2)
            ups = torch.stack([x @ up[e].T for e in range(num_experts)], dim=2)
            h = gates * ups  # [1, t, E, d_ff]
            out = torch.stack([h[:, :, e] @ experts.down_proj[e].T for e in range(num_experts)], dim=2)
        assert result.intermediate[i].full.shape == (1, 64, num_experts, f)
        assert_probe_close(result.intermediate[i], h.numpy(), f"intermediate layer {i}")
        assert_probe_close(result.gate_activation[i], gates.numpy(), f"gate_activation layer {i}")
        assert_probe_close(result.up_proj_output[i], ups.numpy(), f"up_proj_output layer {i}")
        np.testing.assert_array_equal(result.intermediate[i].top_indices, h.abs().topk(3).indices.numpy())
        assert_probe_close(result.down_proj_output[i], out.numpy(), f"down_proj_output layer {i}")
        for point in ("hidden", "attn_output"):
            assert_probe_close(result.point(point)[i], captured[(point, i)].numpy(), f"{point} layer {i}")


def test_first_token_router_probs_match_hf(hf_checkpoint, tiny_checkpoint):
    """House of Cards Figure 5's data: per layer, the router's softmax over experts for bos alone; a dense
    model has no router and says so."""
    hf, path = hf_checkpoint("mixtral")
    with torch.no_grad():
        logits = hf(torch.tensor([[1]]), output_router_logits=True).router_logits  # per layer [1, E]
    ref = np.stack([torch.softmax(x.float(), dim=-1)[0].numpy() for x in logits])  # [L, E]
    probs = massive.first_token_router_probs(load(path), 1)
    assert probs.shape == (hf.config.num_hidden_layers, hf.config.num_local_experts)
    np.testing.assert_allclose(probs, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="dense FFN and no router"):
        massive.first_token_router_probs(load(tiny_checkpoint("llama_gqa")), 1)


# ------------------------------------------------------------------------------------------ cache


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "mixtral", "olmo_clip", "olmo2"])
def test_incremental_decoding_equals_full_forward(name, tiny_checkpoint):
    path = tiny_checkpoint(name)
    model = load(path)
    tokens = jnp.asarray(random_tokens(100, batch=2, seed=3))  # longer than the sliding windows
    full = models.forward(model, tokens)
    cache = KVCache.init(model.config, batch=2, max_len=112)
    step = jax.jit(lambda m, toks, c: m(toks, cache=c))
    logits, cache = step(model, tokens[:, :70], cache)
    pieces = [logits]
    for i in range(70, 100):
        logits, cache = step(model, tokens[:, i:i + 1], cache)
        pieces.append(logits)
    assert_logits_close(jnp.concatenate(pieces, axis=1), full, rel=1e-5)


# ------------------------------------------------------------------------------------------ save_hf


def test_phi3_fused_projections_split_and_fuse(hf_checkpoint, tmp_path):
    hf, path = hf_checkpoint("phi3")
    model = load(path)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    qkv = np.concatenate([attn.q_proj.kernel[...], attn.k_proj.kernel[...], attn.v_proj.kernel[...]], axis=1).T
    np.testing.assert_array_equal(qkv, hf.model.layers[1].self_attn.qkv_proj.weight.detach().numpy())
    assert attn.q_proj.kernel.shape == (64, 64) and attn.k_proj.kernel.shape == (64, 32)
    gate_up = hf.model.layers[1].mlp.gate_up_proj.weight.detach().numpy()  # [2 d_ff, d]: gate rows, then up
    np.testing.assert_array_equal(mlp.gate_proj.kernel[...].T, gate_up[:96])
    np.testing.assert_array_equal(mlp.up_proj.kernel[...].T, gate_up[96:])
    converters.save_hf(model, tmp_path)
    assert "model.layers.0.self_attn.qkv_proj.weight" in SafetensorsSource(tmp_path).keys()


# ------------------------------------------------------------------------------------------ Mixtral

EXPERT, LAYER, ROWS = 2, 1, [7, 3, 50, 91, 12]


def test_mixtral_expert_row_mask_matches_hf_with_rows_zeroed(hf_checkpoint):
    hf, path = hf_checkpoint("mixtral")
    model = load(path)
    tokens = random_tokens(SEQ_LEN, hf.config.vocab_size)
    mask = {LAYER: masks.zero_rows(ROWS, hf.config.hidden_size, expert=EXPERT)}
    ours = models.forward(model, jnp.asarray(tokens), ffn_masks=mask)
    edited = type(hf)(hf.config).eval()
    edited.load_state_dict(hf.state_dict())
    f = hf.config.intermediate_size
    with torch.no_grad():
        gate_up = edited.model.layers[LAYER].mlp.experts.gate_up_proj
        gate_up[EXPERT, ROWS] = 0.0  # W_gate rows
        gate_up[EXPERT, [f + r for r in ROWS]] = 0.0  # W_up rows
    assert_logits_close(ours, hf_logits(edited, tokens))
    with pytest.raises(AssertionError):  # it matters, and only for that expert
        assert_logits_close(ours, hf_logits(hf, tokens))
    other = {LAYER: masks.zero_rows(ROWS, hf.config.hidden_size, expert=EXPERT + 1)}
    with pytest.raises(AssertionError):
        assert_logits_close(models.forward(model, jnp.asarray(tokens), ffn_masks=other), ours)


def test_mixtral_masks_must_name_an_expert(tiny_checkpoint):
    path = tiny_checkpoint("mixtral")
    model = load(path)
    tokens = jnp.asarray(random_tokens(8))
    with pytest.raises(ValueError, match="say which expert="):
        model(tokens, ffn_masks={0: masks.zero_rows([1], 64)})
    with pytest.raises(ValueError, match="expert 4 out of range"):
        model(tokens, ffn_masks={0: masks.zero_rows([1], 64, expert=4)})


def test_mixtral_routed_experts_match_hf(hf_checkpoint):
    hf, path = hf_checkpoint("mixtral")
    model = load(path)
    model.set_attributes(dispatch="routed")
    tokens = random_tokens(64, hf.config.vocab_size, batch=2, seed=2)
    assert_logits_close(our_logits(model, tokens), hf_logits(hf, tokens))


def test_mixtral_routed_experts_equal_all_experts(tiny_checkpoint):
    """The sparse dispatch (only the chosen experts, ragged matmuls) gives the outputs and gradients (base weights,
    adapters, input) of running every expert on every token, with an expert's FFN row mask and DoRA adapters (the
    LoRA path and its rescaling) on the experts. (Without adapters: test_mixtral_routed_experts_match_hf.)"""
    from mwjax import peft
    from mwjax.nn.base import Taps

    model = peft.add_adapters(load(tiny_checkpoint("mixtral")), peft.LoraConfig(rank=4, alpha=8.0, dora=True))
    for layer in peft.adapters(model).values():  # B != 0, so the adapters change the outputs
        layer.lora_b[...] = jax.random.normal(jax.random.key(1), layer.lora_b[...].shape) * 0.1
    block = model.model.layers[LAYER].mlp
    block.dispatch = "routed"  # "auto" runs every expert on CPU
    x = jax.random.normal(jax.random.key(0), (2, 9, 64))
    mask = masks.zero_rows(ROWS, 64, expert=EXPERT)
    routed = lambda block, x: block(x, mask, Taps())
    dense = lambda block, x: block.all_experts(x, *block.route(x)[1:], [mask if e == EXPERT else None
                                                                         for e in range(4)], Taps())

    @jax.jit
    def outputs_and_grads(block, x):
        loss = lambda f: lambda block, x: (lambda y: (jnp.sum(y**2), y))(f(block, x))
        return [nnx.value_and_grad(loss(f), argnums=(0, 1), has_aux=True)(block, x) for f in (routed, dense)]

    ((_, y), (g_block, g_x)), ((_, ref), (ref_block, ref_x)) = outputs_and_grads(block, x)
    assert_close(y, ref, 1e-5, what="outputs")
    assert_close(g_x, ref_x, 1e-5, what="d/dx")
    ref_grads = dict(nnx.to_flat_state(ref_block))
    for path, g in nnx.to_flat_state(g_block):
        assert_close(g[...], ref_grads[path][...], 1e-5, what=str(path))
    assert "ragged_dot" in str(jax.make_jaxpr(lambda x: routed(block, x))(x))  # the sparse path did run
    with pytest.raises(AssertionError):  # the mask reaches the routed expert
        assert_close(jax.jit(lambda block, x: block(x, None, Taps()))(block, x), y, 1e-5)


@pytest.mark.torch
def test_mixtral_transformers5_fused_layout(hf_checkpoint, tmp_path):
    """A checkpoint written from transformers 5's module state (experts.gate_up_proj [E, 2 d_ff, d],
    gate rows first; experts.down_proj [E, d, d_ff]) loads into the same parameters."""
    from safetensors.torch import save_file

    hf, path = hf_checkpoint("mixtral")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert state["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 192, 64)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    hf.config.save_pretrained(tmp_path)
    fused, hub = load(tmp_path), load(path)
    for (p, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(nnx_params(fused)),
                              jax.tree_util.tree_leaves_with_path(nnx_params(hub)), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(p))


# ------------------------------------------------------------------------------------------ sensitivity


@pytest.mark.parametrize("name, change", [
    ("gemma2", dict(attn_logit_softcapping=None)),
    ("gemma2", dict(final_logit_softcapping=None)),
    ("gemma2", dict(sliding_window=4096)),  # a window longer than the sequence: full attention
    ("gemma2", dict(query_pre_attn_scalar=None)),
    ("gemma3", dict(qk_norm=False)),
    ("gemma3", dict(sliding_rope=None)),
    ("gemma3", dict(rope=RopeConfig(theta=1e6))),
    ("gemma3", dict(sliding_window=4096)),
    ("mixtral", dict(num_experts_per_tok=1)),
    ("phi3_longrope", dict(rope=RopeConfig(theta=10000.0))),
    ("phi3_partial_rotary", dict(rope=RopeConfig(theta=10000.0))),
    ("phi3_partial_rotary", dict(sliding_window=4096)),
    ("olmo_clip", dict(clip_qkv=None)),  # the clipping bites
    ("olmo2", dict(qk_norm=False)),
    ("olmo2", dict(rope=RopeConfig(theta=10000.0))),
])
def test_parity_tests_are_sensitive(name, change, hf_checkpoint):
    """Each family-specific feature changes the logits well beyond the tolerance."""
    hf, path = hf_checkpoint(name)
    config = dataclasses.replace(load(path).config, **change)
    altered = converters.build_from_source(config, SafetensorsSource(path), progress=False, allow_unused=True)
    tokens = random_tokens(SEQ_LEN, hf.config.vocab_size)
    with pytest.raises(AssertionError):
        assert_logits_close(our_logits(altered, tokens), hf_logits(hf, tokens))


# ------------------------------------------------------------------------------------------ errors


def test_gemma3_vision_checkpoint_is_refused_by_name(tmp_path):
    config = transformers.Gemma3Config(text_config=dict(FAMILY_CONFIGS["gemma3"][1]))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"'gemma3'.*vision_config.*vision tower \(SigLIP\).*gemma3_text"):
        converters.load(tmp_path)


@pytest.mark.parametrize("name, change, message", [
    ("gemma2", dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=2.0)), "gemma2: rope type 'yarn'"),
    ("gemma3", dict(rope_parameters={"full_attention": dict(rope_type="dynamic", rope_theta=1e6, factor=2.0),
                                     "sliding_attention": dict(rope_type="default", rope_theta=1e4)}),
     "gemma3_text: rope type 'dynamic'"),
    ("mixtral", dict(rope_parameters=dict(rope_type="longrope", rope_theta=1e6, partial_rotary_factor=0.5)),
     "mixtral: partial_rotary_factor=0.5"),
    ("phi3", dict(rope_parameters=dict(rope_type="longrope", rope_theta=1e4, short_factor=[1.0] * 8)),
     r"longrope scaling lacks \['long_factor'\]"),
    ("gemma3", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
])
def test_unsupported_variants_are_named(name, change, message, tiny_checkpoint, tmp_path):
    path = tiny_checkpoint(name)
    cfg = json.loads((path / "config.json").read_text()) | change
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message):
        converters.load(tmp_path)


# ------------------------------------------------------------------------------------------ experiments.probe


@pytest.mark.parametrize("name", ["gemma", "gemma2", "gemma3", "mixtral", "phi3", "olmo", "olmo2"])
def test_probe_experiment_on_every_family(name, hf_checkpoint):
    hf, path = hf_checkpoint(name)
    model = load(path)
    rows = probe_first_token(model, token_id=1, top_k=3)
    assert [r["layer"] for r in rows] == list(range(hf.config.num_hidden_layers))
    config = probes.ProbeConfig(points=("intermediate", "router_probs"))
    _, full = probes.capture(model, jnp.asarray([[1]]), config)
    for r in rows:
        h = full.intermediate[r["layer"]].full[0, 0]  # [d_ff], or [E, d_ff] for Mixtral
        if name == "mixtral":  # the expert the router ranks first for the token
            assert r["expert"] == int(np.argmax(full.router_probs[r["layer"]].full[0, 0]))
            h = h[r["expert"]]
        np.testing.assert_allclose(np.abs(r["intermediate"]["top_values"]), np.sort(np.abs(h))[::-1][:3], rtol=1e-6)
    text = summary(massive.first_token_profile(model, 1, top_k=3))
    assert "massive weights' layer" in text and len(format_table(rows).splitlines()) == len(rows) + 1


def test_probe_cli_on_a_mixtral_checkpoint(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("mixtral")
    out = subprocess.run([sys.executable, "-m", "experiments.probe", f"--model={path}", "--tokenizer=none",
                          f"--output_dir={tmp_path}"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "expert" in out.stdout and "hidden state max |x|" in out.stdout
    layers = json.loads((tmp_path / "probe.json").read_text())["layers"]
    assert all(0 <= row["expert"] < 4 for row in layers)


# ------------------------------------------------------------------------------------------ OLMo


def test_olmo_reads_what_hf_hard_codes(hf_checkpoint):
    """OLMo: LayerNorms without parameters (eps 1e-5 whatever the config says: OlmoConfig has no eps key),
    clip_qkv; OLMo 2: QK-norm over the whole projection. Both write back what transformers reads as the same."""
    from mwjax.families.hf_config import read_hf_config, write_hf_config

    hf, path = hf_checkpoint("olmo_clip")
    config = load(path).config
    assert (config.clip_qkv, config.rms_norm_eps, config.qkv_bias, config.o_bias, config.qk_norm) == (
        0.8, 1e-5, True, True, False)
    assert read_hf_config(hf.config.to_dict() | {"rms_norm_eps": 0.1}) == config  # HF's OlmoLayerNorm ignores it
    written = write_hf_config(config)
    assert "rms_norm_eps" not in written and written["clip_qkv"] == 0.8
    assert not [p for p in nnx_params(load(path))["model"]["layers"][0] if "norm" in p]  # no norm weights
    hf2, path2 = hf_checkpoint("olmo2")
    model = load(path2)
    assert (model.config.qk_norm, model.config.qk_norm_scope, model.config.rms_norm_eps) == (True, "all_heads", 1e-6)
    attn = model.model.layers[0].self_attn
    assert attn.q_norm.scale.shape == (64,) and attn.k_norm.scale.shape == (32,)  # heads * head_dim, kv heads * ..
    np.testing.assert_array_equal(attn.k_norm.scale[...], hf2.model.layers[0].self_attn.k_norm.weight.detach())
    with pytest.raises(ConfigError, match="clip_qkv"):
        read_hf_config(hf.config.to_dict() | {"clip_qkv": "8"})


@pytest.mark.parametrize("name, casts", [
    ("olmo", dict(rope_in_float32=False)),
    ("olmo2", dict(rope_in_float32=False)),
    ("olmo2", dict(scale_in_float32=False)),
])
def test_olmo_bfloat16_casts_are_hfs(name, casts, hf_checkpoint):
    """In bfloat16 the first layer's attention output equals HF's bit for bit (but for a rare last-bit tie of
    accumulation order): RoPE rotates in float32 (HF's OLMo rotary embedding hands float32 cos / sin to
    `apply_rotary_pos_emb`), and OLMo 2's RMSNorms (QK-norm included) multiply by their weight before casting
    back. With Llama's order for either (`casts`) most of it differs. (Later layers add XLA's and torch's
    different matmul roundings, which the logits comparison above bounds.)"""
    hf, path = hf_checkpoint(name)
    hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    hf_bf16.config._attn_implementation = "eager"
    tokens = random_tokens(64, hf.config.vocab_size, seed=2)
    captured, _ = capture_hf(hf_bf16, tokens, ("attn_output",))
    ref = captured[("attn_output", 0)].float().numpy()

    def agreement(model):
        config = probes.ProbeConfig(points=("attn_output",), layers=(0,))
        _, result = probes.capture(model, jnp.asarray(tokens), config)
        return float(np.mean(np.asarray(result.attn_output[0].full.astype(jnp.float32)) == ref))

    model = converters.load(path, dtype=jnp.bfloat16, tokenizer=False)[0]
    same = agreement(model)
    model.set_attributes(**casts)
    other = agreement(model)
    print(f"{name}: {same:.1%} of the bf16 attention output equal to HF's; {other:.1%} with {casts}")
    assert same > 0.98 and other < 0.8


def test_olmo_clip_qkv_clamps_a_good_part_of_the_projections(hf_checkpoint):
    """The tiny clip_qkv (0.8) is small enough to bite: HF clamps several per cent of q, k and v."""
    hf, _ = hf_checkpoint("olmo_clip")
    outputs = []
    handles = [getattr(layer.self_attn, p).register_forward_hook(lambda m, args, out: outputs.append(out.clone()))
               for layer in hf.model.layers for p in ("q_proj", "k_proj", "v_proj")]
    try:
        hf_logits(hf, random_tokens(SEQ_LEN, hf.config.vocab_size))
    finally:
        for h in handles:
            h.remove()
    clamped = np.mean([float((out.abs() > 0.8).float().mean()) for out in outputs])
    print(f"olmo_clip: {clamped:.1%} of q, k, v clamped")
    assert clamped > 0.05
