"""mwjax: massive weights, super weights and massive activations in LLMs, in JAX / Flax NNX.

The research API is flat: `from mwjax import massive, attacks, probes, masks, prune, quantize, macdrop, peft, models`
(and `from mwjax.converters import load, save_hf`). Each name is its module in the layered packages below,
imported on first use:

    core/        leaf utilities: atomic writes, compiled programs, layer indices, progress, sharding, run locks
    instrument/  what a forward pass can be asked to do: FFN row masks, activation edits, probes
    nn/          building blocks: config, Linear, norms, RoPE, attention, KV cache, stacked layers, the causal LM
    families/    one folder per model family (model, HF config, key table, GGUF hooks, records) and the registry
    converters/  checkpoints in and out: HF safetensors / torch .bin / GGUF / orbax, tokenizers, save_hf
    data/        text corpora
    adapters/    LoRA / DoRA and HF PEFT files
    research/    the methods: massive weights, attacks, pruning, quantization, attention sinks, MacDrop
    finetune/    training: data, loss, the trainer, its run log
    eval/        perplexity, generation, lm-eval, LongBench, judged generation
    experiments/ command lines (`python -m experiments.<name>`), configs, figures, the report

A module imports from its own package and those above it in this list, never from one below
(tests/test_layering.py).
"""

import importlib

API = {
    "massive": "mwjax.research.massive",
    "attacks": "mwjax.research.attacks",
    "prune": "mwjax.research.prune",
    "quantize": "mwjax.research.quantize",
    "macdrop": "mwjax.research.macdrop",
    "attention_sinks": "mwjax.research.attention_sinks",
    "probes": "mwjax.instrument.probes",
    "masks": "mwjax.instrument.masks",
    "interventions": "mwjax.instrument.interventions",
    "peft": "mwjax.adapters.peft",
    "models": "mwjax.families",
}


def __getattr__(name: str):
    if name in API:
        return importlib.import_module(API[name])
    raise AttributeError(f"module 'mwjax' has no attribute {name!r}")


def __dir__():
    return sorted(API)
