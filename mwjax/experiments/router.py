"""Which expert does the router pick for the bos token? House of Cards Figure 5 for any mixture-of-experts model.

    python -m experiments.router --model=PATH_TO_MIXTRAL --output_dir=out/router [--attack=zero_top_k:5]

Feeds the bos token alone (as for the massive weights) and records, per layer, the router's probability of
every expert (softmax of the router logits, before the top-k choice). In Mixtral-8x7B the probabilities
collapse onto one expert at the massive weights' layer (layer 2, expert 4 in the paper), the expert whose
W_up / W_gate rows House of Cards attacks. Writes router.json, router.md (per layer: the experts the router
picks and their probabilities) and router.png (layers x experts, the massive weights' layer framed;
--format=pdf|svg). A dense model has no router: the command says so and stops.
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
massive = lazy.module("mwjax.research.massive")

FLAGS = flags.FLAGS
# --help lists the shared flags (--model, --output_dir, ...) too, not only under --helpfull
flags.adopt_module_key_flags(common)
common.define_attack_flag("probing the router")


def table(probs: np.ndarray, top_k: int, mw: massive.MassiveWeights) -> str:
    """The Markdown table of router.md: per layer, the experts the router picks and the entropy of its choice.

    Args:
      probs: [L, E] router probabilities for the first token (`massive.first_token_router_probs`).
      top_k: experts picked per token (the config's `num_experts_per_tok`).
      mw: the massive weights, whose layer is marked.

    Returns:
      The table: the layer in both numberings, the top-k experts with their probabilities, the entropy (nats).
    """
    rows = []
    for layer, p in enumerate(probs):
        chosen = np.argsort(-p)[:top_k]
        mark = " (massive weights)" if layer == mw.layer else ""
        rows.append([f"{layer + 1}{mark}", layer, ", ".join(f"{e}: {p[e]:.3f}" for e in chosen),
                     f"{-np.sum(p * np.log(np.maximum(p, 1e-30))):.3f}"])
    return common.markdown_table(["layer (paper)", "HF layer", f"top-{top_k} experts: probability",
                                  "entropy (nats)"], rows)


def main(argv):
    """Record --model's router probabilities for the first token alone, per layer; write the table and figure.

    Args:
      argv: the command line as absl passes it (flags already parsed); unused.
    """
    del argv
    out = common.output_dir("outputs/router")  # unwritable: fails before the model loads
    model, tokenizer = common.load_model()
    config = model.config
    if config.num_local_experts is None:
        raise SystemExit(f"{FLAGS.model} is a dense {config.model_type} model: it has no router, so there are no "
                         "router probabilities to plot; run this on a mixture of experts such as Mixtral")
    token_id = first_token_id(tokenizer, config, common.first_token_flag())
    mw = massive.find_massive_weights(model, tokenizer, k=1, first_token=token_id)  # on the unattacked model
    model = common.apply_attack(model, tokenizer)
    probs = massive.first_token_router_probs(model, token_id)
    attack = f", {FLAGS.attack}" if FLAGS.attack else ""
    markdown = (f"{common.model_name()}{attack}: router probabilities for the first token (id {token_id}) alone; "
                f"massive weights at {layer_label(mw.layer)}, expert {mw.expert}\n\n"
                f"{table(probs, config.num_experts_per_tok, mw)}\n")
    print(markdown)
    write_text_atomically(out / "router.md", markdown)
    plots.router_probs(probs, f"{common.model_name()}{attack}: router probabilities, first token alone\n"
                       f"framed: the massive weights' {layer_label(mw.layer)}", common.figure(out, "router"),
                       mark_layer=mw.layer)
    payload = {"model": FLAGS.model, "adapter": FLAGS.adapter, "attack": FLAGS.attack, "token_id": token_id,
               "num_experts_per_tok": config.num_experts_per_tok, "massive_weights": mw.to_dict(),
               "router_probs": probs}
    common.write_json(out / "router.json", payload)
    print(f"wrote router.json, router.md and the figure in {common.publish(out)}")


if __name__ == "__main__":
    cli.run(main)
