"""Gemma 1 / 2 / 3 text models (HF `GemmaForCausalLM`, `Gemma2ForCausalLM`, `Gemma3ForCausalLM`), one model class
for the three model types; built on llama's decoder layer and read with llama's key table.

    model.py  the Flax model: `(1 + w)` norms, scaled embeddings, Gemma 2 / 3's sandwich layer, soft-caps
    hf.py     HF config reading / writing (GemmaConfig, Gemma2Config, Gemma3TextConfig, Gemma 3's two RoPEs)
    keys.py   the key table: llama's
    gguf.py   GGUF hooks: archs `gemma`, `gemma2`, `gemma3` (norms stored as 1 + w, what llama.cpp hard-codes)
"""

from __future__ import annotations

from mwjax.families.gemma import hf
from mwjax.families.gemma.gguf import GEMMA2_GGUF, GEMMA3_GGUF, GEMMA_GGUF
from mwjax.families.gemma.keys import KEYMAP
from mwjax.families.gemma.model import GemmaForCausalLM
from mwjax.families.record import Family

GEMMA = Family(
    model_type="gemma", architecture="GemmaForCausalLM", model_class=GemmaForCausalLM,
    read_hf=hf.read_gemma_hf, write_hf=hf.write_gemma_hf, keymap=KEYMAP, gguf=GEMMA_GGUF,
    hf_keys=hf.GEMMA_HF_KEYS, ignored_hf_keys=hf.GEMMA_IGNORED_HF_KEYS,
    hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
)
GEMMA2 = Family(
    model_type="gemma2", architecture="Gemma2ForCausalLM", model_class=GemmaForCausalLM,
    read_hf=hf.read_gemma2_hf, write_hf=hf.write_gemma2_hf, keymap=KEYMAP, gguf=GEMMA2_GGUF,
    hf_keys=hf.GEMMA2_HF_KEYS, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
)
GEMMA3_TEXT = Family(
    model_type="gemma3_text", architecture="Gemma3ForCausalLM", model_class=GemmaForCausalLM,
    read_hf=hf.read_gemma2_hf, write_hf=hf.write_gemma3_hf, read_rope=hf.read_gemma3_rope, keymap=KEYMAP,
    gguf=GEMMA3_GGUF, hf_keys=hf.GEMMA3_HF_KEYS, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
    rope_theta=hf.GEMMA3_GLOBAL_THETA,
)
RECORDS = (GEMMA, GEMMA2, GEMMA3_TEXT)
