"""Mixtral (HF `MixtralForCausalLM`): Mistral's attention with a sparse mixture-of-experts FFN.

    model.py  the Flax model: the MoE block (router, one llama MLP per expert, routed or all-experts dispatch)
    hf.py     HF config reading / writing (MixtralConfig)
    keys.py   the key table: Hub per-expert, transformers-5 fused and llama.cpp stacked expert layouts
    gguf.py   GGUF hooks: llama's (llama.cpp writes Mixtral as arch `llama` with experts)
"""

from __future__ import annotations

from mwjax.families.mixtral import hf
from mwjax.families.mixtral.gguf import LLAMA_GGUF
from mwjax.families.mixtral.keys import KEYMAP
from mwjax.families.mixtral.model import MixtralForCausalLM
from mwjax.families.record import Family

MIXTRAL = Family(
    model_type="mixtral", architecture="MixtralForCausalLM", model_class=MixtralForCausalLM,
    read_hf=hf.read_mixtral_hf, write_hf=hf.write_mixtral_hf, keymap=KEYMAP,
    gguf=LLAMA_GGUF,  # llama.cpp writes Mixtral as arch llama with experts
    hf_keys=hf.MIXTRAL_HF_KEYS, ignored_hf_keys=hf.MIXTRAL_IGNORED_HF_KEYS, rope_theta=hf.MIXTRAL_THETA,
)
RECORDS = (MIXTRAL,)
