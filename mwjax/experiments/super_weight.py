"""The Super Weight, Table 1 and Figure 8 for any model: detect, prune, prune + restore, scale.

    python -m experiments.super_weight --seqlen=512 --max_chunks=8      # the embedded SmolLM2, CPU-sized
    python -m experiments.super_weight --model=PATH --datasets=wikitext2,c4

Detection runs the reference prompt and flags every layer whose down_proj input and output both
spike above --threshold (default 50), with every row of it whose contribution reaches --ratio of the
largest output (`mwjax.research.massive.find_super_weights`). All of them are attacked jointly, as the paper
does for models with several (Llama-3-8B), unless --layer/--row/--col name one. Then perplexity
for: the original model, the super weights pruned, pruned with their super activations restored, the
--non_super_weights largest other weights pruned instead (Table 1's "Prune Non-SW"; every super weight found is
kept), and the weights scaled by each of --factors, measured as perplexity on the first corpus and, with
--scaling_metrics=perplexity,zeroshot, as the paper's Figure 8 plots it: mean zero-shot accuracy over
--tasks (lm-eval; --data_dir for local task files, as experiments.zeroshot).
Writes super_weight.json, scaling.png (and scaling_zeroshot.png; --format=pdf|svg) under --output_dir.
"""

from __future__ import annotations

from absl import flags

from mwjax.core import cli, lazy
from mwjax.data.corpora import check_name as check_corpus
from mwjax.experiments import common, plots, zeroshot_flags
from mwjax.research import defaults

# what needs jax (or matplotlib) loads after the flags are parsed: --help answers without it
attacks = lazy.module("mwjax.research.attacks")
prune = lazy.module("mwjax.research.prune")
massive = lazy.module("mwjax.research.massive")
decoding = lazy.module("mwjax.eval.decoding")
likelihood = lazy.module("mwjax.eval.likelihood")

FLAGS = flags.FLAGS
# --help lists the shared flags (--model, --output_dir, ...) too, not only under --helpfull
flags.adopt_module_key_flags(common)
flags.adopt_module_key_flags(zeroshot_flags)
flags.DEFINE_string("prompt", defaults.DEFAULT_PROMPT, "prompt that detection runs")
cli.define_float("threshold", defaults.SPIKE_THRESHOLD, "spike threshold on |down_proj input| and |output|",
                    above=0)
cli.define_float("ratio", defaults.SUPER_RATIO, "a further row of a spiking layer is a super weight when its own "
                   "contribution reaches this fraction of the largest |output| (research.massive module doc)", above=0,
                    upper_bound=1)
flags.DEFINE_integer("layer", None, "super weight layer (0-based), with --row and --col, instead of detection",
                     lower_bound=0)
flags.DEFINE_integer("row", None, "down_proj.weight row (output channel)", lower_bound=0)
flags.DEFINE_integer("col", None, "down_proj.weight column (input channel)", lower_bound=0)
flags.DEFINE_integer("non_super_weights", defaults.NON_SUPER_WEIGHTS, "Table 1's control: prune this many of the "
                     "largest-magnitude decoder weights other than the super weights (the paper's 7,000; 0: skip)",
                     lower_bound=0)
flags.DEFINE_list("scaling_metrics", ["perplexity"], "what the scaling sweep reports: perplexity (the first "
                  "corpus) and/or zeroshot (mean zero-shot accuracy over --tasks, Figure 8's metric)")
common.check_flag("scaling_metrics", zeroshot_flags.check_metric)
cli.define_numbers("factors", [0.0, 0.2, 0.5, 0.8, 1.0, 1.5, 2.0, 3.0], "scaling factors", float)
flags.DEFINE_list("datasets", ["python_docs"], "corpora: wikitext2, c4, pg19 (hub), python_docs (embedded) or paths")
common.check_flag("datasets", check_corpus)
flags.DEFINE_integer("seqlen", 4096, "tokens per perplexity chunk", lower_bound=2)
flags.DEFINE_integer("max_chunks", None, "cap on chunks per corpus", lower_bound=1)
flags.DEFINE_integer("batch_size", 1, "chunks per forward pass", lower_bound=1)
flags.DEFINE_string("generation_prompt", "What is the capital of France?", "prompt for a sample per setting")



def _all_or_none(values: dict) -> bool:
    """--layer, --row and --col name one weight together: refused at parsing (before the model loads) unless all
    three or none are given."""
    given = [f"--{name}" for name, value in values.items() if value is not None]
    if given and len(given) < 3:
        raise flags.ValidationError(f"{' and '.join(given)} without the rest: --layer, --row and --col name one "
                                    "down_proj weight together (or give none: detection chooses)")
    return True


flags.register_multi_flags_validator(["layer", "row", "col"], _all_or_none)


def choose(model, tokenizer) -> tuple[list[massive.SuperWeight], list[massive.SuperWeight]]:
    """The super weights to attack: all found on --prompt, or the one named by --layer/--row/--col.

    SystemExit when detection finds none and none is named (--layer, --row and --col come together: `_all_or_none`).

    Args:
      model: an mwjax causal LM.
      tokenizer: its tokenizer (detection runs --prompt).

    Returns:
      (the super weights to attack jointly, every one detection found).
    """
    candidates = massive.find_super_weights(model, tokenizer, FLAGS.prompt, threshold=FLAGS.threshold,
                                            ratio=FLAGS.ratio)
    if FLAGS.layer is not None:
        return [massive.super_weight_at(model, FLAGS.layer, FLAGS.row, FLAGS.col)], candidates
    if not candidates:
        raise SystemExit(f"no layer's down_proj spikes above {FLAGS.threshold} on this prompt; lower --threshold "
                         "or name the weight with --layer/--row/--col")
    return candidates, candidates


def main(argv):
    """Find --model's super weights, measure pruning, restoring and scaling them, write the results.

    Args:
      argv: the command line as absl passes it (flags already parsed); unused.
    """
    del argv
    out = common.output_dir("outputs/super_weight")  # unwritable: fails before the model loads
    zeroshot = zeroshot_flags.evaluator() if "zeroshot" in FLAGS.scaling_metrics else None
    model, tokenizer = common.load_model()
    sws, candidates = choose(model, tokenizer)
    print(f"super weights found (spike > {FLAGS.threshold:g}, further rows from {FLAGS.ratio:g} of the largest):")
    print(common.markdown_table(["layer", "coordinates", "weight", "input spike", "output spike"],
                                [[c.layer, c.label, c.weight, c.input_value, c.output_value] for c in candidates]))
    print("\nattacking jointly: " + ", ".join(f"{sw.label} = {sw.weight:.4g}" for sw in sws) + "\n")

    corpora = common.load_corpora(FLAGS.datasets, tokenizer, FLAGS.max_chunks)
    chat = getattr(tokenizer, "chat_template", None) is not None

    def evaluate(name, attacked):
        ppl = {c.name: likelihood.perplexity(attacked, c.token_ids, FLAGS.seqlen, max_chunks=c.max_chunks,
                                             batch_size=FLAGS.batch_size).perplexity for c in corpora}
        sample = decoding.generate_text(attacked, tokenizer, [FLAGS.generation_prompt], 30, chat=chat)[0]
        print(f"== {name}: " + ", ".join(f"{c} PPL {v:.2f}" for c, v in ppl.items()) + f"\n   -> {sample!r}")
        return {"perplexity": ppl, "generation": sample}

    results = {"original": evaluate("original", model),
               "prune SW": evaluate("prune SW", attacks.scale_super_weight(model, sws, 0.0)),
               "prune SW, +SA": evaluate("prune SW, +SA", attacks.restore_super_activation(model, sws))}
    if FLAGS.non_super_weights:
        results["prune Non-SW"] = evaluate(f"prune Non-SW ({FLAGS.non_super_weights} largest others)",
                                           prune.prune_largest_weights(model, FLAGS.non_super_weights,
                                                                       exclude=[*sws, *candidates]))
    factors = [float(f) for f in FLAGS.factors]
    title = f"{common.model_name()}: {sws[0].label}" + (f" and {len(sws) - 1} more" if len(sws) > 1 else "")
    payload = {"model": FLAGS.model, "super_weights": [sw.to_dict() for sw in sws],
               "candidates": [c.to_dict() for c in candidates], "settings": results, "scaling": {"factors": factors}}
    first = corpora[0]
    metrics = zeroshot_flags.sweep_metrics(
        FLAGS.scaling_metrics, tokenizer, zeroshot, f"{first.name} PPL",
        lambda m: likelihood.perplexity(m, first.token_ids, FLAGS.seqlen, max_chunks=first.max_chunks,
                                        batch_size=FLAGS.batch_size).perplexity, {"corpus": first.name})
    for metric, sweep in metrics.items():
        values = []
        for f in factors:
            values.append(sweep.measure(attacks.scale_super_weight(model, sws, f)))
            print(f"   factor {f:g}: {sweep.label} {values[-1]:.2f}", flush=True)
        print(f"\nscaling the super weight ({sweep.label}):")
        print(common.markdown_table(["factor", sweep.label], [[f, v] for f, v in zip(factors, values, strict=True)]))
        plots.scaling_curve(factors, values, title, common.figure(out, "scaling" + sweep.suffix), ylabel=sweep.label,
                            log_y=sweep.log_y)
        payload["scaling"][metric] = values
        payload["scaling"][f"{metric}_settings"] = sweep.settings
    common.write_json(out / "super_weight.json", payload)
    print(f"\nwrote super_weight.json and figures in {common.publish(out)}")


if __name__ == "__main__":
    cli.run(main)
