"""Probe a model with its bos token alone: per layer, the largest and median |value| of the hidden
state and of the FFN intermediate state (the input of down_proj), and where the largest
intermediate values sit.

    python -m experiments.probe                       # the embedded SmolLM2-135M-Instruct
    python -m experiments.probe --model=PATH --output_dir=out/
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common
from mwjax import probes
from mwjax.tokens import first_token_id

FLAGS = flags.FLAGS
flags.DEFINE_integer("top_k", 3, "how many of the largest |values| to report per state")


def probe_first_token(model, token_id: int, top_k: int) -> list[dict]:
    """Per layer: hidden / intermediate top-k values, indices and median |x| for one token at position 0.

    In a mixture-of-experts model (Mixtral) the intermediate state is the one of the expert the
    router ranks first for the token at that layer, recorded in the row as "expert".
    """
    moe = getattr(model.config, "num_local_experts", None) is not None
    points = ("hidden", "intermediate") + (("router_probs",) if moe else ())
    config = probes.ProbeConfig(points=points, full=False, top_k=top_k, median=True)
    _, result = probes.capture(model, jnp.array([[token_id]], jnp.int32), config)
    rows = []
    for layer in range(model.config.num_hidden_layers):
        row = {"layer": layer, "paper_layer": layer + 1}
        where = (0, 0)
        if moe:  # intermediate stats are per expert: [b, t, E, ...]
            row["expert"] = int(result["router_probs"][layer]["top_indices"][0, 0, 0])
            where = (0, 0, row["expert"])
        for point in ("hidden", "intermediate"):
            stats = result[point][layer]
            at = (0, 0) if point == "hidden" else where
            row[point] = {
                "top_values": np.asarray(stats["top_values"][at], np.float64).tolist(),
                "top_indices": np.asarray(stats["top_indices"][at]).tolist(),
                "median": float(stats["median"][at]),
            }
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
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


def summary(rows: list[dict]) -> str:
    top = max(rows, key=lambda r: abs(r["intermediate"]["top_values"][0]))
    m = top["intermediate"]
    ratio = abs(m["top_values"][0]) / max(m["median"], 1e-12)
    expert = f", expert {top['expert']}" if "expert" in top else ""
    return (f"largest intermediate value: layer {top['paper_layer']} (HF layers[{top['layer']}]){expert}, "
            f"dim {m['top_indices'][0]}, |x| = {abs(m['top_values'][0]):.1f} ({ratio:.0f}x the layer's median)\n"
            + growth(rows))


def growth(rows: list[dict]) -> str:
    """How the hidden state's largest |x| grows: in one layer (Llama-style) or over many (Gemma-style)."""
    peaks = np.abs([r["hidden"]["top_values"][0] for r in rows])
    steps = np.diff(peaks, prepend=0.0)
    peak, jump = int(np.argmax(peaks)), int(np.argmax(steps[1:]) + 1) if len(rows) > 1 else 0
    share = steps[jump] / peaks[peak]
    kind = "a single-layer explosion" if share >= EXPLOSION_SHARE else "gradual growth"
    return (f"hidden state max |x|: {peaks[0]:.1f} after layer 1, peak {peaks[peak]:.1f} at layer {peak + 1} "
            f"(HF layers[{peak}]); the largest rise in one layer is {steps[jump]:.1f} at layer {jump + 1} "
            f"(HF layers[{jump}]), {share:.0%} of the peak: {kind}")


def main(argv):
    del argv
    out = common.output_dir(FLAGS.output_dir) if FLAGS.output_dir else None  # checked before the model loads
    model, tokenizer = common.load_model()
    token_id = first_token_id(tokenizer, model.config, common.first_token_flag())
    label = tokenizer.convert_ids_to_tokens(token_id) if tokenizer is not None else str(token_id)
    print(f"{FLAGS.model}: {model.config.num_hidden_layers} layers, d_model {model.config.hidden_size}, "
          f"d_ff {model.config.intermediate_size}; first token {label!r} (id {token_id}) alone at position 0\n")
    rows = probe_first_token(model, token_id, FLAGS.top_k)
    print(format_table(rows))
    print("\n" + summary(rows))
    if out:
        payload = {"model": FLAGS.model, "dtype": FLAGS.dtype, "token_id": token_id, "layers": rows}
        print(f"wrote {common.write_json(out / 'probe.json', payload)}")


if __name__ == "__main__":
    app.run(main)
