"""Mixtral's key table: three checkpoint layouts of the experts read into one mwjax layout.

mwjax: `model.layers.{i}.mlp.gate.kernel` [d, E] (the router) and
`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.kernel` (one llama MLP per expert). The Hub layout
(what transformers 4 and 5 save) keeps one tensor per expert (`block_sparse_moe.experts.{e}.w1/w3/w2`);
transformers 5's modules fuse the experts (`mlp.experts.gate_up_proj` [E, 2 d_ff, d], `mlp.experts.down_proj`
[E, d, d_ff]); llama.cpp stacks each projection over the experts (`ffn_{gate,up,down}_exps`, read under HF
names `block_sparse_moe.experts.w1/w3/w2`). `save_hf` writes the first.
"""

from __future__ import annotations

from mwjax.families.keymap import ATTENTION, EMBED_AND_NORMS, IGNORED, Concat, KeyMap, Rule

_EXPERT = "model.layers.{i}.mlp.experts.{e}"
KEYMAP = KeyMap(
    "mixtral",
    [
        *EMBED_AND_NORMS,
        *ATTENTION,
        # Hub layout (what transformers 4 and 5 save): per-expert w1 = W_gate, w3 = W_up, w2 = W_down
        Rule("model.layers.{i}.mlp.gate.kernel", "model.layers.{i}.block_sparse_moe.gate.weight", transpose=True),
        Rule(f"{_EXPERT}.gate_proj.kernel", "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight", transpose=True),
        Rule(f"{_EXPERT}.up_proj.kernel", "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight", transpose=True),
        Rule(f"{_EXPERT}.down_proj.kernel", "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight", transpose=True),
        # transformers-5 module layout: experts fused, gate rows before up rows
        Rule("model.layers.{i}.mlp.gate.kernel", "model.layers.{i}.mlp.gate.weight", transpose=True),
        Rule(f"{_EXPERT}.{{p}}.kernel", "model.layers.{i}.mlp.experts.gate_up_proj", transpose=True, stack="e",
             concat=Concat("p", ("gate_proj", "up_proj"))),
        Rule(f"{_EXPERT}.down_proj.kernel", "model.layers.{i}.mlp.experts.down_proj", transpose=True, stack="e"),
        # GGUF (llama.cpp stacks each projection over the experts: ffn_{gate,up,down}_exps)
        Rule(f"{_EXPERT}.gate_proj.kernel", "model.layers.{i}.block_sparse_moe.experts.w1.weight", transpose=True,
             stack="e"),
        Rule(f"{_EXPERT}.up_proj.kernel", "model.layers.{i}.block_sparse_moe.experts.w3.weight", transpose=True,
             stack="e"),
        Rule(f"{_EXPERT}.down_proj.kernel", "model.layers.{i}.block_sparse_moe.experts.w2.weight", transpose=True,
             stack="e"),
    ],
    ignored_hf=IGNORED,
)
