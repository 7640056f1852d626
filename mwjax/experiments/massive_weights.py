"""Where are a model's massive weights? House of Cards Table 6 and Figure 3, the thesis' 3D plot.

    python -m experiments.massive_weights                      # the embedded SmolLM2
    python -m experiments.massive_weights --model=PATH --k=5 --output_dir=out/mw

Writes massive_weights.json (the Table 6 row: layer in both numberings and the top-k indices, plus
per-layer statistics) and figures: bos_hidden.png / bos_intermediate.png (Figure 3(b, c): top-3
and median |value| per layer with the bos token alone), states.png (Figure 3(a): the largest
|value| of each state of the first layers, from h_{l-1} through the FFN's gate and up factors to
h_l), corpus_hidden.png / corpus_intermediate.png (the same statistics averaged over text
sequences) and magnitudes_3d.png (|hidden state| over the prompt's tokens at the origin layer);
--format=pdf|svg for vector figures.
"""

from __future__ import annotations

import numpy as np
from absl import flags

from mwjax.core import cli, lazy
from mwjax.data.corpora import check_name as check_corpus
from mwjax.experiments import common, plots
from mwjax.research import defaults

# what needs jax (or matplotlib) loads after the flags are parsed: --help answers without it
jnp = lazy.module("jax.numpy")
probes = lazy.module("mwjax.instrument.probes")
massive = lazy.module("mwjax.research.massive")
likelihood = lazy.module("mwjax.eval.likelihood")

FLAGS = flags.FLAGS
# --help lists the shared flags (--model, --output_dir, ...) too, not only under --helpfull
flags.adopt_module_key_flags(common)
flags.DEFINE_integer("k", 5, "how many massive weights to report", lower_bound=1)
flags.DEFINE_integer("layer", None, "0-based layer to take them from (default: chosen by --layer_rule)",
                     lower_bound=0)
flags.DEFINE_enum("layer_rule", "intermediate", list(defaults.LAYER_RULES), "intermediate: the earliest layer whose "
                  "intermediate state is massive (House of Cards, Algorithm 1); hidden_jump: the largest rise of the "
                  "hidden state's max |x|")
flags.DEFINE_string("prompt", "Summer is warm. Winter is cold.", "prompt of the 3D magnitude plot")
flags.DEFINE_string("stats_corpus", "python_docs", "corpus (name or text file) for the averaged statistics")
common.check_flag("stats_corpus", check_corpus)
flags.DEFINE_integer("stats_sequences", 8, "how many sequences to average the statistics over", lower_bound=1)
flags.DEFINE_integer("stats_seqlen", 256, "tokens per sequence for the averaged statistics", lower_bound=1)

# House of Cards Figure 3(a) (Eq. (1)): the states of layer l in the order the forward pass makes them, with the
# paper's symbols; the intermediate state is shown with its two factors (before / after the gate multiplies).
STATES = {
    "previous_hidden": r"$h_{l-1}$",
    "attn_input": r"LN$(h_{l-1})$",
    "attn_output": r"ATTN(LN$(h_{l-1})$)",
    "attn_residual": r"$\hat{h}_l$",
    "mlp_input": r"LN$(\hat{h}_l)$",
    "up_proj_output": r"$x W_{up}$ (before the gate)",
    "gate_activation": r"$\sigma(x W_{gate})$",
    "intermediate": r"$\sigma(x W_{gate}) \odot x W_{up}$ (after)",
    "down_proj_output": r"FFN(LN$(\hat{h}_l)$)",
    "hidden": r"$h_l$",
}


def table6_row(name: str, mw: massive.MassiveWeights) -> str:
    """House of Cards Table 6's row for one model, as a Markdown table with its header.

    Args:
      name: the model, as the row names it.
      mw: its massive weights (`massive.find_massive_weights`).

    Returns:
      The table: the layer in the paper's (1-based, with the expert for a mixture of experts) and HF's numbering,
      and the top-k row indices of W_down.
    """
    expert = f" expert {mw.expert}" if mw.expert is not None else ""
    return common.markdown_table(["model", "layer (paper)", "HF layer", f"top-{len(mw.indices)} indices"],
                                 [[name, f"{mw.paper_layer}{expert}", mw.layer, list(mw.indices)]])


def state_magnitudes(model, token_id: int, layers: int) -> dict[str, list[float]]:
    """Figure 3(a): max |value| of each of STATES in the first `layers` layers, the first token alone.

    h_{l-1} of the first layer is the embedding output. A mixture of experts records the FFN's states per
    expert: the largest over experts.

    Args:
      model: an mwjax causal LM.
      token_id: the token fed alone at position 0 (the one the massive weights were found with).
      layers: how many layers, from the first, to measure.

    Returns:
      {state in STATES: [layers] max |value|}.
    """
    points = tuple(p for p in STATES if p != "previous_hidden")
    config = probes.ProbeConfig(points=points, layers=tuple(range(layers)), full=False, top_k=1)
    tokens = jnp.array([[token_id]], jnp.int32)
    result = probes.record(model, tokens, config)
    largest = {p: [float(np.abs(np.asarray(result.point(p)[i].top_values)).max()) for i in range(layers)]
               for p in points}
    embedding = float(jnp.max(jnp.abs(model.embed(tokens).astype(jnp.float32))))
    return {p: [embedding] + largest["hidden"][:-1] if p == "previous_hidden" else largest[p] for p in STATES}


def main(argv):
    """Find --model's massive weights, print Table 6's row, draw Figure 3 and the 3D plot, write the results.

    Args:
      argv: the command line as absl passes it (flags already parsed); unused.
    """
    del argv
    common.needs_tokenizer("massive_weights", "--prompt and --stats_corpus")
    out = common.output_dir("outputs/massive_weights")  # unwritable: fails before the model loads
    model, tokenizer = common.load_model()
    mw = massive.find_massive_weights(model, tokenizer, k=FLAGS.k, layer=FLAGS.layer, layer_rule=FLAGS.layer_rule,
                                      first_token=common.first_token_flag())
    print(table6_row(FLAGS.model, mw))
    print(f"\nintermediate values at {mw.label}: {[round(v, 1) for v in mw.values]} (median |x| {mw.median:.3g}; "
          f"massive-activation criterion {'met' if mw.meets_criterion else 'NOT met'}; layer: {mw.selected_by})")

    name = common.model_name()
    profile = massive.first_token_profile(model, mw.token_id, top_k=3)
    plots.bos_profile(profile, name, lambda figure: common.figure(out, figure))
    states = state_magnitudes(model, mw.token_id, min(model.config.num_hidden_layers, mw.layer + 2))
    plots.grouped_bars({STATES[p]: v for p, v in states.items()}, f"{name}: max |value| per state of layer l, first "
                       "token alone", common.figure(out, "states"))

    corpus = common.load_corpora([FLAGS.stats_corpus], tokenizer, None)[0]
    seqs = likelihood.chunk_tokens(corpus.token_ids, FLAGS.stats_seqlen, FLAGS.stats_sequences)
    averaged = massive.activation_stats(model, seqs, top_k=3)
    for point in ("hidden", "intermediate"):
        plots.layer_magnitudes(averaged[point], f"{name}: {point} state, {len(seqs)} x {FLAGS.stats_seqlen} "
                               f"tokens of {corpus.name}", common.figure(out, f"corpus_{point}"))

    ids = tokenizer(FLAGS.prompt).input_ids
    if ids[0] != mw.token_id:
        ids = [mw.token_id] + ids
    config = probes.ProbeConfig(points=("hidden",), layers=(mw.layer,))
    result = probes.record(model, jnp.asarray([ids], jnp.int32), config)
    plots.magnitudes_3d(np.asarray(result.hidden[mw.layer].full[0]),
                        [plots.token_label(tokenizer, i) for i in ids], f"{name}: |hidden state| after {mw.label}",
                        common.figure(out, "magnitudes_3d"))

    payload = {
        "model": FLAGS.model,
        "massive_weights": mw.to_dict(),
        "bos_profile": profile,
        "states": states,
        "corpus_stats": {"corpus": corpus.name, "sequences": len(seqs), "seqlen": FLAGS.stats_seqlen,
                         **{p: averaged[p] for p in ("hidden", "intermediate")}},
    }
    common.write_json(out / "massive_weights.json", payload)
    print(f"\nwrote massive_weights.json and figures in {common.publish(out)}")


if __name__ == "__main__":
    cli.run(main)
