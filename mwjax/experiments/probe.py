"""Probe a model with its bos token alone: per layer, the largest and median |value| of the hidden
state and of the FFN intermediate state (the input of down_proj), and where the largest
intermediate values sit.

    python -m experiments.probe                       # the embedded SmolLM2-135M-Instruct
    python -m experiments.probe --model=PATH --output_dir=out/

With --output_dir: probe.json and House of Cards Figure 3(b, c)'s plots (bos_hidden.png,
bos_intermediate.png: the top-3 and median |value| per layer).
"""

from __future__ import annotations

import numpy as np
from absl import flags

from mwjax.converters.tokens import first_token_id
from mwjax.core import cli, lazy
from mwjax.core.layer_index import layer_label, layer_numbers
from mwjax.experiments import common, plots

# what needs jax (or matplotlib) loads after the flags are parsed: --help answers without it
massive = lazy.module("mwjax.research.massive")

FLAGS = flags.FLAGS
# --help lists the shared flags (--model, --output_dir, ...) too, not only under --helpfull
flags.adopt_module_key_flags(common)
flags.DEFINE_integer("top_k", 3, "how many of the largest |values| to report per state", lower_bound=1)


def probe_first_token(model, token_id: int, top_k: int) -> list[dict]:
    """Per layer: hidden / intermediate top-k values, indices and median |x| for one token at position 0
    (`mwjax.research.massive.first_token_profile` as JSON-ready rows).

    In a mixture-of-experts model (Mixtral) the intermediate state is the one of the expert the
    router ranks first for the token at that layer, recorded in the row as "expert".

    Args:
      model: an mwjax causal LM.
      token_id: the token fed alone at position 0 (usually bos).
      top_k: how many of the largest |values| to keep per state and layer.

    Returns:
      One dict per layer, as `layer_rows` builds them.
    """
    return layer_rows(massive.first_token_profile(model, token_id, top_k))


def layer_rows(profile: massive.FirstTokenProfile) -> list[dict]:
    """A `FirstTokenProfile` as JSON-ready rows, one per layer.

    Args:
      profile: from `massive.first_token_profile`.

    Returns:
      Dicts with "layer" (0-based, as HF counts), "paper_layer" (1-based), "expert" (mixture of experts only)
      and, for "hidden" and "intermediate", a dict of "top_values", "top_indices" and "median" (|x|).
    """
    rows = []
    for layer in range(profile.num_layers):
        row = {"layer": layer, "paper_layer": layer + 1}
        if profile.expert is not None:
            row["expert"] = int(profile.expert[layer])
        for point in ("hidden", "intermediate"):
            state = getattr(profile, point)
            row[point] = {"top_values": state.values[layer].tolist(), "top_indices": state.indices[layer].tolist(),
                          "median": float(state.median[layer])}
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows of `layer_rows` as a fixed-width text table: a header line, then one line per layer.

    Args:
      rows: from `layer_rows` / `probe_first_token`.

    Returns:
      The table's text.
    """
    fmt = lambda v: " ".join(f"{abs(x):9.1f}" for x in v)
    lines = [f"{'layer':>5} {'HF':>4} | {'hidden top |x|':^30} {'median':>8} | "
             f"{'intermediate top |x|':^30} {'median':>8} | top intermediate dims"]
    for r in rows:
        h, m = r["hidden"], r["intermediate"]
        expert = f"expert {r['expert']}: " if "expert" in r else ""
        lines.append(f"{r['paper_layer']:>5} {r['layer']:>4} | {fmt(h['top_values']):>30} {h['median']:8.3f} | "
                     f"{fmt(m['top_values']):>30} {m['median']:8.3f} | {expert}{m['top_indices']}")
    return "\n".join(lines)


EXPLOSION_SHARE = 0.5  # one layer adding this much of the peak hidden |x| is an explosion


def summary(profile: massive.FirstTokenProfile) -> str:
    """The massive weights' layer as `find_massive_weights` picks it (the same `origin_layer`), then growth.

    Args:
      profile: from `massive.first_token_profile`.

    Returns:
      Two lines of text: the layer, its largest intermediate dim and |x| against the layer's median; then `growth`.
    """
    layer, why = massive.origin_layer(profile)
    state = profile.intermediate
    largest, median = abs(state.values[layer, 0]), state.median[layer]
    expert = f", expert {profile.expert[layer]}" if profile.expert is not None else ""
    return (f"massive weights' layer: {layer_numbers(layer)}{expert} ({why}): dim "
            f"{state.indices[layer, 0]}, |x| = {largest:.1f} ({largest / max(median, 1e-12):.0f}x the "
            f"layer's median)\n" + growth(profile))


def growth(profile: massive.FirstTokenProfile) -> str:
    """How the hidden state's largest |x| grows: in one layer (Llama-style) or over many (Gemma-style).

    A layer that adds at least `EXPLOSION_SHARE` of the peak is a single-layer explosion.

    Args:
      profile: from `massive.first_token_profile`.

    Returns:
      One line of text: the peak, the largest one-layer rise and its share of the peak, and the verdict.
    """
    peaks, rises = np.abs(profile.hidden.values[:, 0]), massive.hidden_jumps(profile)
    peak, jump = int(np.argmax(peaks)), massive.origin_layer(profile, "hidden_jump")[0]
    share = rises[jump] / peaks[peak]
    kind = "a single-layer explosion" if share >= EXPLOSION_SHARE else "gradual growth"
    return (f"hidden state max |x|: {peaks[0]:.1f} after layer 1, peak {peaks[peak]:.1f} at {layer_label(peak)}; "
            f"the largest rise in one layer is {rises[jump]:.1f} at {layer_label(jump)}, {share:.0%} of the "
            f"peak: {kind}")


def main(argv):
    """Probe --model with its first token (bos or --first_token), print the table and summary, write the results.

    Args:
      argv: the command line as absl passes it (flags already parsed); unused.
    """
    del argv
    out = common.output_dir(FLAGS.output_dir, "probe") if FLAGS.output_dir else None  # checked before the model loads
    model, tokenizer = common.load_model()
    token_id = first_token_id(tokenizer, model.config, common.first_token_flag())
    label = tokenizer.convert_ids_to_tokens(token_id) if tokenizer is not None else str(token_id)
    print(f"{FLAGS.model}: {model.config.num_hidden_layers} layers, d_model {model.config.hidden_size}, "
          f"d_ff {model.config.intermediate_size}; first token {label!r} (id {token_id}) alone at position 0\n")
    profile = massive.first_token_profile(model, token_id, FLAGS.top_k)
    rows = layer_rows(profile)
    print(format_table(rows))
    print("\n" + summary(profile))
    if out:
        payload = {"model": FLAGS.model, "dtype": FLAGS.dtype, "token_id": token_id, "layers": rows}
        plots.bos_profile(profile, common.model_name(), lambda figure: common.figure(out, figure))
        common.write_json(out / "probe.json", payload)
        print(f"wrote probe.json and figures in {common.publish(out)}")


if __name__ == "__main__":
    cli.run(main)
