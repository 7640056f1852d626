"""The llama-like family: Llama 2 / 3 / 3.1, SmolLM2, Mistral, Qwen2 (HF `LlamaForCausalLM`, `MistralForCausalLM`,
`Qwen2ForCausalLM`), one model class for the three model types.

    model.py  the Flax model (its decoder layer is Gemma's and Mixtral's too)
    hf.py     HF config reading / writing (LlamaConfig, MistralConfig, Qwen2Config)
    keys.py   the key table (HF checkpoint key <-> parameter path); Gemma's too
    gguf.py   GGUF hooks: arch `llama` (Llama, Mistral, Mixtral: Q/K rows un-permuted) and `qwen2`
"""

from __future__ import annotations

from mwjax.families.llama import hf
from mwjax.families.llama.gguf import LLAMA_GGUF, QWEN2_GGUF
from mwjax.families.llama.keys import KEYMAP
from mwjax.families.llama.model import LlamaForCausalLM
from mwjax.families.record import Family

LLAMA = Family(
    model_type="llama", architecture="LlamaForCausalLM", model_class=LlamaForCausalLM,
    read_hf=hf.read_llama_hf, write_hf=hf.write_llama_hf, keymap=KEYMAP, gguf=LLAMA_GGUF,
    hf_keys=hf.LLAMA_HF_KEYS,
)
MISTRAL = Family(
    model_type="mistral", architecture="MistralForCausalLM", model_class=LlamaForCausalLM,
    read_hf=hf.read_llama_hf, write_hf=hf.write_llama_hf, keymap=KEYMAP,
    gguf=LLAMA_GGUF,  # llama.cpp writes Mistral as arch llama with a sliding window
    hf_keys=hf.LLAMA_HF_KEYS,
)
QWEN2 = Family(
    model_type="qwen2", architecture="Qwen2ForCausalLM", model_class=LlamaForCausalLM,
    read_hf=hf.read_qwen2_hf, write_hf=hf.write_qwen2_hf, keymap=KEYMAP, gguf=QWEN2_GGUF,
    hf_keys=hf.QWEN2_HF_KEYS,
)
RECORDS = (LLAMA, MISTRAL, QWEN2)
