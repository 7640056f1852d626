"""OLMo and OLMo 2 (HF `OlmoForCausalLM`, `Olmo2ForCausalLM`): llama's attention and FFN with OLMo's norms.

    model.py  the Flax models: OLMo's parameter-free LayerNorms and q/k/v clipping, OLMo 2's post-sublayer
              RMSNorms and QK-norm over the whole projection
    hf.py     HF config reading / writing (OlmoConfig, Olmo2Config)
    keys.py   the key table: llama's
    gguf.py   GGUF hooks: archs `olmo` (Q/K weight rows un-permuted, `clamp_kqv`) and `olmo2`
"""

from __future__ import annotations

from mwjax.families.olmo import hf
from mwjax.families.olmo.gguf import OLMO2_GGUF, OLMO_GGUF
from mwjax.families.olmo.keys import KEYMAP
from mwjax.families.olmo.model import Olmo2ForCausalLM, OlmoForCausalLM
from mwjax.families.record import Family

OLMO = Family(
    model_type="olmo", architecture="OlmoForCausalLM", model_class=OlmoForCausalLM,
    read_hf=hf.read_olmo_hf, write_hf=hf.write_olmo_hf, keymap=KEYMAP, gguf=OLMO_GGUF, hf_keys=hf.OLMO_HF_KEYS,
)
OLMO2 = Family(
    model_type="olmo2", architecture="Olmo2ForCausalLM", model_class=Olmo2ForCausalLM,
    read_hf=hf.read_olmo2_hf, write_hf=hf.write_olmo2_hf, keymap=KEYMAP, gguf=OLMO2_GGUF, hf_keys=hf.OLMO2_HF_KEYS,
)
RECORDS = (OLMO, OLMO2)
