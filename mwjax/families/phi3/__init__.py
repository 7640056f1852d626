"""Phi-3 (HF `Phi3ForCausalLM`): the llama architecture with fused projections in its checkpoints.

    model.py  the Flax model: llama's, under Phi-3's name
    hf.py     HF config reading / writing (Phi3Config: longrope, partial rotary, sliding window)
    keys.py   the key table: HF's fused `qkv_proj` / `gate_up_proj` split into llama's modules (`FUSED_MODULES`)
    gguf.py   GGUF hooks: arch `phi3` (partial rotary, longrope factors stored as tensors)
"""

from __future__ import annotations

from mwjax.families.phi3 import hf
from mwjax.families.phi3.gguf import PHI3_GGUF
from mwjax.families.phi3.keys import FUSED_MODULES, KEYMAP
from mwjax.families.phi3.model import Phi3ForCausalLM
from mwjax.families.record import Family

PHI3 = Family(
    model_type="phi3", architecture="Phi3ForCausalLM", model_class=Phi3ForCausalLM,
    read_hf=hf.read_phi3_hf, write_hf=hf.write_phi3_hf, read_rope=hf.read_phi3_rope, keymap=KEYMAP,
    gguf=PHI3_GGUF, hf_keys=hf.PHI3_HF_KEYS, ignored_hf_keys=hf.PHI3_IGNORED_HF_KEYS, rope_theta=hf.PHI3_THETA,
    fused_modules=FUSED_MODULES,
)
RECORDS = (PHI3,)
