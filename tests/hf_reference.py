"""The PyTorch / HF side of the parity tests, in one module: the tiny configs of every family, random HF
models built from them, HF logits and hidden states (`capture_hf`), and the scale-relative comparisons.

torch is the reference side only: a test that compares with it calls `needs_torch()` (or uses a fixture that
does, such as conftest's `hf_checkpoint`, or carries `@pytest.mark.torch`) and is skipped, with that reason,
on a machine without it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from unittest import mock

import gguf
import numpy as np
import pytest
import transformers

try:
    import torch
except ImportError:  # the torch-free part of the suite still runs
    torch = None
else:
    torch.set_num_threads(2)


def needs_torch() -> None:
    """Skip the calling test or fixture where torch (the PyTorch reference) is not installed."""
    if torch is None:
        pytest.skip("needs torch, the PyTorch reference (pip install torch==2.13.0 on CPU)")



# Tiny configs of the llama-like family; each exercises one thing the real models rely on.
BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=1024, rms_norm_eps=1e-5, initializer_range=0.1)
TINY_CONFIGS = {
    "llama_mha": ("LlamaConfig", dict(BASE, num_key_value_heads=4)),
    "llama_gqa": ("LlamaConfig", dict(BASE, num_key_value_heads=2)),
    "llama_mqa_tied": ("LlamaConfig", dict(BASE, num_key_value_heads=1, tie_word_embeddings=True)),
    "llama3_rope_scaling": ("LlamaConfig", dict(
        BASE, num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64))),
    "llama_bias_headdim": ("LlamaConfig", dict(BASE, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                                               head_dim=24)),
    "mistral_sliding": ("MistralConfig", dict(BASE, num_key_value_heads=2, sliding_window=48)),
    "qwen2_bias": ("Qwen2Config", dict(BASE, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2_sliding": ("Qwen2Config", dict(BASE, num_key_value_heads=2, use_sliding_window=True,
                                          sliding_window=40, max_window_layers=1)),
}
# The other families of House of Cards. Gemma: head_dim independent of hidden_size / heads; the
# soft-caps are small enough to bend these tiny models' scores and logits (the real ones: 50 / 30).
_OLMO_BASE = {k: v for k, v in BASE.items() if k != "rms_norm_eps"} | dict(pad_token_id=0, eos_token_id=2)
_LONGROPE = dict(rope_type="longrope", short_factor=[1.0 + 0.1 * i for i in range(8)],
                 long_factor=[1.0 + 0.9 * i for i in range(8)])
FAMILY_CONFIGS = {
    "gemma": ("GemmaConfig", dict(BASE, num_key_value_heads=1, head_dim=24)),
    "gemma2": ("Gemma2Config", dict(BASE, num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20,
                                    sliding_window=48, attn_logit_softcapping=2.0, final_logit_softcapping=1.5)),
    "gemma3": ("Gemma3TextConfig", dict(
        BASE, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=20, sliding_window=40,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": dict(rope_type="linear", factor=4.0, rope_theta=1e6),
                         "sliding_attention": dict(rope_type="default", rope_theta=1e4)})),
    # as released: query_pre_attn_scalar = head_dim = 256, soft-caps 50 / 30 (what GGUF files imply)
    "gemma2_released": ("Gemma2Config", dict(BASE, num_key_value_heads=2, head_dim=256, sliding_window=48)),
    "gemma3_released": ("Gemma3TextConfig", dict(BASE, num_hidden_layers=6, num_key_value_heads=1, head_dim=256,
                                                  sliding_window=40)),  # layer 5 global, RoPE bases 1e6 / 1e4
    "mixtral": ("MixtralConfig", dict(BASE, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    "phi3": ("Phi3Config", dict(BASE, num_key_value_heads=2, pad_token_id=0, eos_token_id=2, bos_token_id=1)),
    "phi3_longrope": ("Phi3Config", dict(BASE, num_key_value_heads=2, pad_token_id=0, eos_token_id=2,
                                         bos_token_id=1, original_max_position_embeddings=64, rope_scaling=_LONGROPE)),
    "phi3_partial_rotary": ("Phi3Config", dict(BASE, num_key_value_heads=2, pad_token_id=0, eos_token_id=2,
                                               bos_token_id=1, partial_rotary_factor=0.5, sliding_window=40)),
    # OLMo: no rms_norm_eps (its LayerNorms hard-code 1e-5); clip_qkv 0.8 clamps a good part of these q / k / v
    # (about unit scale after the norm with initializer_range 0.1)
    "olmo": ("OlmoConfig", dict(_OLMO_BASE, num_key_value_heads=4, tie_word_embeddings=True)),
    "olmo_clip": ("OlmoConfig", dict(_OLMO_BASE, num_key_value_heads=2, clip_qkv=0.8, attention_bias=True)),
    "olmo2": ("Olmo2Config", dict(BASE, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=500000.0,
                                  pad_token_id=0, eos_token_id=2)),
}
TINY_CONFIGS |= FAMILY_CONFIGS
SEQ_LEN = 256

def make_hf_model(name: str, seed: int = 0):
    """A randomly initialised HF model (float32, eager attention) for one of TINY_CONFIGS."""
    needs_torch()
    cls_name, kwargs = TINY_CONFIGS[name]
    config = getattr(transformers, cls_name)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # non-trivial norm weights and biases, so a mix-up cannot hide
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def random_tokens(n: int = SEQ_LEN, vocab: int = 160, batch: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, n)).astype(np.int32)


def hf_logits(model, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    needs_torch()
    with torch.no_grad():
        mask = None if attention_mask is None else torch.from_numpy(attention_mask)
        return model(torch.from_numpy(tokens).long(), attention_mask=mask).logits.float().numpy()


# Tolerances are relative to the tensor's own scale: float32 rounding grows with the magnitudes
# summed, so an element far below the tensor's scale carries the scale's absolute error, not its own.
WORST_RATIO: dict[str, float] = {}  # test id -> worst |got - ref| / tolerance seen (printed at the end)


def assert_close_to_scale(got, ref, scale_tol: float, rtol: float = 0.0, what: str = ""):
    """|got - ref| <= scale_tol * max|ref| + rtol * |ref|, elementwise; records the margin."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    scale = float(np.max(np.abs(ref)))
    tolerance = scale_tol * scale + rtol * np.abs(ref) + np.finfo(np.float32).tiny
    ratio = float(np.max(np.abs(got - ref) / tolerance))
    if ratio <= 1.0:  # comparisons meant to fail (the sensitivity tests) say nothing about noise
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        WORST_RATIO[test] = max(WORST_RATIO.get(test, 0.0), ratio)
    assert ratio <= 1.0, (f"{what}: max |got - ref| is {ratio:.2f}x the tolerance ({scale_tol:g} x scale "
                          f"{scale:.3e} + {rtol:g} x |ref|)")
    return float(np.max(np.abs(got - ref))), scale


def assert_logits_close(ours, ref, rel: float = 1e-4):
    """max |ours - ref| <= rel * max |ref| (the logit scale); returns (max error, scale)."""
    return assert_close_to_scale(ours, ref, rel, what="logits")


def our_logits(model, tokens: np.ndarray) -> np.ndarray:
    """An mwjax model's float32 logits of `tokens` [b, t] (jitted, as `mwjax.families.forward`)."""
    import jax.numpy as jnp

    from mwjax import models

    return np.asarray(models.forward(model, jnp.asarray(tokens)), np.float32)


def loss_torch(model, tokens: np.ndarray):
    """HF's mean next-token cross-entropy of `tokens` [1, seq] (a torch scalar, for .backward())."""
    logits = model(torch.from_numpy(tokens).long()).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, torch.from_numpy(tokens[0, 1:]).long())


def loss_ours(model, tokens: np.ndarray, **kw):
    """The same loss of an mwjax model (differentiable in JAX); kw go to the model (ffn_masks, ...)."""
    import jax
    import jax.numpy as jnp

    logits = model(jnp.asarray(tokens), **kw)[0, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, jnp.asarray(tokens[0, 1:, None]), axis=-1).mean()


# the probe points of mwjax.probes that a forward hook on an HF decoder layer can see
HF_POINTS = ("hidden", "attn_input", "attn_output", "mlp_input", "intermediate", "down_proj_output")
FFN_PARTS = ("attn_residual", "gate_activation", "up_proj_output")  # also seen by hooks (dense, unfused FFNs)


def capture_hf(hf, tokens: np.ndarray, points=HF_POINTS, *, mlp_input_norm: str = "post_attention_layernorm",
               **forward_kwargs):
    """(captured, output): HF's values of `points` at every decoder layer, captured[(point, layer)] a detached
    tensor as mwjax.probes names them, and the model's output for `tokens` [batch, seq] (forward_kwargs such
    as output_attentions=True passed on). hidden: the layer's output; attn_input: input_layernorm's output (a
    layer without one, OLMo 2's: the layer's input); attn_output: o_proj's output; mlp_input: the output of
    `mlp_input_norm` (Gemma 2/3: pre_feedforward_layernorm; None, OLMo 2: no norm before the FFN, the mlp's
    input); intermediate / down_proj_output: down_proj's input / output (dense FFNs only); FFN_PARTS:
    attn_residual: the input of `mlp_input_norm` (None: of the mlp), gate_activation / up_proj_output: the outputs
    of mlp.act_fn / mlp.up_proj (dense FFNs with separate gate and up projections)."""
    needs_torch()
    captured, handles = {}, []
    first_input = lambda args, out: args[0]  # noqa: E731

    def hook(module, point, i, take=lambda args, out: out[0] if isinstance(out, tuple) else out):
        def record(m, args, out):  # returns None: the output is left as it is
            captured[(point, i)] = take(args, out).detach()
        handles.append(module.register_forward_hook(record))

    for i, layer in enumerate(hf.model.layers):
        down_proj = getattr(layer.mlp, "down_proj", None)
        dense = isinstance(down_proj, torch.nn.Linear)
        up_proj = getattr(layer.mlp, "up_proj", None)
        attn_norm = getattr(layer, "input_layernorm", None)
        mlp_norm = None if mlp_input_norm is None else getattr(layer, mlp_input_norm)
        modules = {"hidden": (layer,), "attn_output": (layer.self_attn.o_proj,),
                   "down_proj_output": (down_proj,) if dense else (),
                   "up_proj_output": (up_proj,) if up_proj is not None else (),
                   "gate_activation": (layer.mlp.act_fn,) if up_proj is not None else ()}
        for point in points:
            if point == "intermediate" and dense:
                hook(down_proj, point, i, take=first_input)
            if point == "attn_input":
                hook(*((layer, point, i, first_input) if attn_norm is None else (attn_norm, point, i)))
            if point == "mlp_input":
                hook(*((layer.mlp, point, i, first_input) if mlp_norm is None else (mlp_norm, point, i)))
            if point == "attn_residual":
                hook(layer.mlp if mlp_norm is None else mlp_norm, point, i, take=first_input)
            for module in modules.get(point, ()):
                hook(module, point, i)
    try:
        with torch.no_grad():
            output = hf(torch.from_numpy(np.asarray(tokens)).long(), **forward_kwargs)
    finally:
        for h in handles:
            h.remove()
    return captured, output


def tiny_tokenizer():
    """A character-level fast tokenizer (ids < 29, so it fits every tiny config's vocabulary), bos <s>."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {chr(97 + i): 3 + i for i in range(26)}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


# a text of ~300 tokens for the real-model parity tests
LIGHTHOUSE = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk. He wound the clockwork, "
    "trimmed the wick and polished the great lens until it shone. Ships passing the rocky headland "
    "counted on that beam, and in forty years he had never once let it go dark. One winter a storm tore "
    "the shutters from the windows and flooded the oil store, yet he carried the last dry cans up two "
    "hundred steps in the dark and kept the light burning until morning. "
) * 3


_GGUF_READER = gguf.GGUFReader  # the class itself, whatever `gguf_parsed_once` puts in its place


@functools.lru_cache(maxsize=4)
def _gguf_reader(path: str, mtime_ns: int, size: int) -> gguf.GGUFReader:
    return _GGUF_READER(path, "r")


@contextlib.contextmanager
def gguf_parsed_once():
    """Within this context transformers' GGUF loads (`from_pretrained(..., gguf_file=...)`: model, tokenizer,
    PEFT) take `gguf.GGUFReader`s parsed once per session and unchanged file: transformers parses a file
    twice per model load (config, then weights), 3 s for SmolLM2 and 15 s for Gemma 3 each time. The reference
    still reads the file with `gguf`'s own reader; only repeated parsing of the same bytes is skipped."""
    def reader(path, mode="r"):
        if mode != "r":
            return _GGUF_READER(path, mode)
        stat = os.stat(path)
        return _gguf_reader(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)

    with mock.patch.object(gguf, "GGUFReader", reader):
        yield


def gguf_with_transformers(source: str, path, tokenizer=None):
    """(mwjax model, tokenizer, transformers' own GGUF load of the same file), float32: the reference of
    the real-model tests. `source`: what `converters.load` reads (a path or `embedded:NAME`); `tokenizer`:
    the one `converters.load` would build, when a session fixture has it already (Gemma-3's takes ~25 s)."""
    import jax.numpy as jnp

    from mwjax import converters

    needs_torch()
    ours, built = converters.load(source, dtype=jnp.float32, tokenizer=tokenizer is None)
    tokenizer = built if tokenizer is None else tokenizer
    with gguf_parsed_once():
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    return ours, tokenizer, hf


def assert_bos_intermediate_agrees(ours, tokenizer, hf, top_k: int = 5):
    """Feeding bos alone, the layer whose FFN intermediate state holds the largest |value| and that state's
    top-k dims and values agree with HF's (House of Cards' Algorithm 1 input). Returns (HF's bos intermediate
    state per layer {layer: [d_ff]}, our probe row of that layer)."""
    from mwjax.experiments.probe import probe_first_token

    states, _ = capture_hf(hf, np.array([[tokenizer.bos_token_id]]), ("intermediate",))
    captured = {layer: x[0, 0] for (_, layer), x in states.items()}
    ref_layer = max(captured, key=lambda i: captured[i].abs().max().item())
    ref_top = captured[ref_layer].abs().topk(top_k)
    rows = probe_first_token(ours, tokenizer.bos_token_id, top_k=top_k)
    row = max(rows, key=lambda r: abs(r["intermediate"]["top_values"][0]))
    assert row["layer"] == ref_layer
    assert row["intermediate"]["top_indices"] == ref_top.indices.tolist()
    np.testing.assert_allclose(np.abs(row["intermediate"]["top_values"]), ref_top.values.numpy(), rtol=1e-4)
    return captured, row
