"""Attention sinks and the bos position: House of Cards Figure 2 and Appendix C (Figures 8-18) for any model.

    python -m experiments.attention_sinks                                  # the embedded SmolLM2
    python -m experiments.attention_sinks --model=PATH --output_dir=out/sinks [--layer=15] [--attack=zero_top_k:5]

The prompt (without bos) is fed four times: bos absent, at the start, in the middle (after the first
sentence), at the end. For each, the |hidden state| after the probed layer (default: the middle layer,
or the massive activations' origin layer if deeper; `mwjax.research.attention_sinks`) and the head-averaged
attention probabilities of the next layer. Writes attention_sinks.json, attention_sinks.md (per
placement: the tokens with massive activations, the largest |h|, the token the later tokens attend to
most) and attention_sinks.png (the paper's two rows, one column per placement; --format=pdf|svg).
With --attack the model is attacked first (e.g. zero_top_k:5: do the sinks survive?); the layer is
chosen on the unattacked model.
"""

from __future__ import annotations

import numpy as np
from absl import flags

from mwjax.converters.tokens import first_token_id
from mwjax.core import cli, lazy
from mwjax.core.atomic import write_text_atomically
from mwjax.core.layer_index import layer_label
from mwjax.experiments import common, plots

# what needs jax (or matplotlib) loads after the flags are parsed: --help answers without it
attention_sinks = lazy.module("mwjax.research.attention_sinks")

FLAGS = flags.FLAGS
# --help lists the shared flags (--model, --output_dir, ...) too, not only under --helpfull
flags.adopt_module_key_flags(common)
flags.DEFINE_string("prompt", "Summer is warm. Winter is cold.", "the prompt, tokenized without special tokens "
                    "(the Massive Activations example the paper's appendix figures use)")
flags.DEFINE_integer("layer", None, "0-based layer whose output hidden state is shown; the attention is the next "
                     "layer's (default: the middle layer, or the massive activations' origin layer if deeper)",
                     lower_bound=0)
flags.DEFINE_integer("middle", None, "token index of the middle bos (default: after the first delimiter)",
                     lower_bound=1)
common.define_attack_flag("probing")

PLACEMENT_TITLES = {"absent": "bos absent", "start": "bos at the start", "middle": "bos in the middle",
                    "end": "bos at the end"}


def table(result: attention_sinks.AttentionSinks, labels: dict[str, list[str]]) -> str:
    """The Markdown table of attention_sinks.md: one row per placement of bos.

    Args:
      result: from `attention_sinks.bos_placements`.
      labels: placement -> the label of each token fed (`plots.token_label`).

    Returns:
      The table: the tokens, those with massive activations, the largest |h| (position and dim), the token the
      later tokens attend to most and the mean attention bos receives.
    """
    rows = []
    for p in result.placements:
        names = labels[p.placement]
        peak = int(np.argmax(p.magnitudes.max(-1)))
        received, sink = p.attention_received, p.top_sink
        on_bos = "-" if p.bos_position is None or np.isnan(received[p.bos_position]) else \
            f"{received[p.bos_position]:.2f}"
        rows.append([PLACEMENT_TITLES[p.placement], " ".join(names),
                     ", ".join(f"{names[t]} ({t})" for t in p.massive_positions) or "none",
                     f"{p.magnitudes.max():.1f} at {names[peak]} ({peak}), dim {p.max_dims[peak]}",
                     f"{names[sink]} ({sink}): {received[sink]:.2f}", on_bos])
    return common.markdown_table(["bos", "tokens", "massive activations at", "largest |h|",
                                  "top sink: mean attention from later tokens", "bos: the same"], rows)


def main(argv):
    """Probe --model with bos absent / at the start / in the middle / at the end of --prompt, write the results.

    Args:
      argv: the command line as absl passes it (flags already parsed); unused.
    """
    del argv
    common.needs_tokenizer("attention_sinks", "--prompt")
    out = common.output_dir("outputs/attention_sinks")  # unwritable: fails before the model loads
    model, tokenizer = common.load_model()
    if tokenizer is None:
        raise SystemExit(f"experiments.attention_sinks tokenizes --prompt: {FLAGS.model} has no tokenizer (give one "
                         "with --tokenizer)")
    bos_id = first_token_id(tokenizer, model.config, common.first_token_flag())
    ids = tokenizer(FLAGS.prompt, add_special_tokens=False).input_ids
    ids = [i for i in ids if i != bos_id]  # a tokenizer that adds bos regardless
    texts = [tokenizer.decode([i]) for i in ids]
    middle = attention_sinks.middle_position(texts) if FLAGS.middle is None else FLAGS.middle
    layer = attention_sinks.default_layer(model, bos_id) if FLAGS.layer is None else FLAGS.layer
    model = common.apply_attack(model, tokenizer)
    result = attention_sinks.bos_placements(model, ids, bos_id, layer, middle=middle)

    labels = {p.placement: [plots.token_label(tokenizer, i) for i in p.token_ids] for p in result.placements}
    attack = f", {FLAGS.attack}" if FLAGS.attack else ""
    markdown = (f"{common.model_name()}{attack}: |h| after {layer_label(layer)}, head-averaged attention of "
                f"{layer_label(result.attention_layer)}\n\n{table(result, labels)}\n")
    print(markdown)
    write_text_atomically(out / "attention_sinks.md", markdown)
    plots.attention_sinks(
        [(PLACEMENT_TITLES[p.placement], p.magnitudes, p.attention, labels[p.placement]) for p in result.placements],
        f"{common.model_name()}{attack}: hidden state and attention by the position of the bos token",
        (f"|hidden state| after {layer_label(layer)}", f"attention of {layer_label(result.attention_layer)}, "
         "mean over heads"), common.figure(out, "attention_sinks"))
    payload = {"model": FLAGS.model, "adapter": FLAGS.adapter, "attack": FLAGS.attack, "prompt": FLAGS.prompt,
               "tokens": labels, **result.to_dict()}
    common.write_json(out / "attention_sinks.json", payload)
    print(f"wrote attention_sinks.json, attention_sinks.md and the figure in {common.publish(out)}")


if __name__ == "__main__":
    cli.run(main)
