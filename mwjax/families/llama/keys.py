"""The llama-like family's key table: HF `LlamaForCausalLM` checkpoint keys <-> mwjax parameter paths.

`model.layers.{i}.mlp.{gate,up,down}_proj.weight` [out, in] <-> `model.layers.{i}.mlp.{p}.kernel` [in, out],
the embeddings, norms and attention as every family has them (`mwjax.families.keymap`). Mistral, Qwen2 and
Gemma (whose modules carry llama's names) read their checkpoints with it too.
"""

from __future__ import annotations

from mwjax.families.keymap import ATTENTION, EMBED_AND_NORMS, IGNORED, KeyMap, Rule

KEYMAP = KeyMap(
    "llama",
    [
        *EMBED_AND_NORMS,
        *ATTENTION,
        Rule("model.layers.{i}.mlp.{p}.kernel", "model.layers.{i}.mlp.{p}.weight", transpose=True),
        Rule("model.layers.{i}.mlp.{p}.bias", "model.layers.{i}.mlp.{p}.bias"),
    ],
    ignored_hf=IGNORED,
)
